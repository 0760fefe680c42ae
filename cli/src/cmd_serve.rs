//! `vmnest serve`: export images over NBD, like `qemu-nbd`, several at once by name.
//!
//! Loopback only unless `--allow-remote` (an export is the whole disk); TLS required with
//! `--tls-cert`/`--tls-key` or with `--tls-psk` (pre-shared keys); read-only unless `--rw`. Stops on SIGINT or SIGTERM. A stored
//! snapshot served `--rw` is written copy-on-write into a volume (cmd_volume.rs).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dedup_store::store::disk::StoredDisk;
use fuse_mount::nbd::{Export, PskKeys, Server, ServerOptions, Tls};
use image_format::{BlockDevice, BlockDeviceMut};

use crate::cmd_volume::open_volume_export;
use crate::common::{OpenArgs, SourceOptions, open_source, open_source_mut};

/// The IANA port of NBD.
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Threads for device I/O per CPU core. Requests of all connections run on them. Measured on 2
/// cores (bench/export.sh, random 4 KiB reads from the page cache): 1 thread per core served 80k
/// requests/s, 2 per core 95-104k, 8 per core 63k and 32 per core 44k (the threads then fight
/// over the cores).
const IO_THREADS_PER_CORE: usize = 2;
/// Bounds on the I/O threads (a few requests may wait on a slow disk).
const MIN_IO_THREADS: usize = 4;
const MAX_IO_THREADS: usize = 64;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Images to serve, one export each (with --from: NAME[@SNAP][/MEMBER] on the remote).
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<String>,
    /// Serve snapshots of this remote without a local copy: chunks are fetched as they are
    /// read (and ahead of sequential reads), cached in the store under remotes/REMOTE/cache.
    #[arg(long, value_name = "REMOTE")]
    from: Option<String>,
    /// With --from: bytes of fetched frames kept on disk at most (`0` keeps none).
    #[arg(long, value_name = "SIZE", default_value = "1G", requires = "from")]
    cache_size: String,
    /// Decoded frames of stored snapshots (`store:` sources, and with --from the remote's)
    /// kept in memory at most, so that random reads decode each frame once (an upper bound,
    /// reached only when that much is read).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    frame_cache: String,
    /// TCP address to listen on (port 0 picks a free port; the line printed names it).
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN, conflicts_with = "socket")]
    listen: String,
    /// Listen on a Unix socket at PATH instead of TCP.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Let clients write: raw (name the format with `-f raw`), qcow2, fixed and dynamic VHD
    /// images in place; a stored snapshot (`store:NAME[@SNAP]`) copy-on-write into a volume
    /// (see --volume).
    #[arg(long)]
    rw: bool,
    /// With --rw, the volume a `store:` source is written into (default: its NAME). It is
    /// created over the snapshot when missing; `vmnest commit VOLUME` makes it a snapshot.
    #[arg(long, value_name = "VOLUME", requires = "rw")]
    volume: Option<String>,
    /// With --rw, commit a volume when its last client disconnects cleanly (NBD_CMD_DISC)
    /// after writing; the new snapshot is printed as `committed NAME@ID`.
    #[arg(long, requires = "rw")]
    commit_on_disconnect: bool,
    /// Export name, once per SOURCE in order (default: the file name; the first export also
    /// answers the empty name).
    #[arg(long = "export-name", value_name = "NAME")]
    export_names: Vec<String>,
    /// Allow listening on an address that is not loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Require TLS, with this PEM certificate chain (server certificate first).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require TLS with a pre-shared key instead of a certificate: FILE holds `identity:hexkey`
    /// lines (qemu's `keys.psk`, made by `psktool`; keys of 16 bytes or more). Clients such as
    /// qemu (`tls-creds-psk`, identity `qemu` by default) and libnbd (`tls-psk-file=`) connect.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_psk: Option<PathBuf>,
    /// With --tls-psk, accept only this identity of the file (repeatable; default: any).
    #[arg(long, value_name = "NAME", requires = "tls_psk")]
    tls_psk_user: Vec<String>,
    /// Format of the sources (probed when absent).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[command(flatten)]
    open: OpenArgs,
}

pub fn run(args: Args) -> Result<u8> {
    let frame_cache = frame_cache_size(&args.frame_cache)?;
    dedup_store::pack::set_frame_cache_bytes(frame_cache);
    if args.export_names.len() > args.sources.len() {
        bail!(
            "{} export names for {} sources",
            args.export_names.len(),
            args.sources.len()
        );
    }
    let listen = match &args.socket {
        Some(_) => None,
        None => Some(listen_addr(&args.listen, args.allow_remote)?),
    };
    let stored = args
        .sources
        .iter()
        .filter(|s| s.starts_with("store:"))
        .count();
    if args.volume.is_some() && stored != 1 {
        bail!("--volume names the volume of one store: source ({stored} given)");
    }
    if args.commit_on_disconnect && stored == 0 {
        bail!("--commit-on-disconnect applies to store: sources only");
    }
    let mut exports = Vec::new();
    // What clients may write, with how errors name it: flushed when the server stops.
    let mut writable: Vec<(String, Arc<dyn BlockDeviceMut>)> = Vec::new();
    let lazy = match &args.from {
        Some(remote) => Some(open_from(remote, &args, frame_cache)?),
        None => None,
    };
    for (i, spec) in args.sources.iter().enumerate() {
        let name = match args.export_names.get(i) {
            Some(n) => n.clone(),
            None if lazy.is_some() => spec.clone(),
            None => default_name(spec),
        };
        if let Some(disks) = &lazy {
            let device: Arc<dyn BlockDevice> = disks[i].clone();
            let description = format!(
                "{spec} on remote {}",
                args.from.as_deref().unwrap_or_default()
            );
            exports.push(Export::read_only(name, device).with_description(description));
            continue;
        }
        match spec.strip_prefix("store:") {
            Some(stored) if args.rw => {
                let v = open_volume_export(
                    stored,
                    args.volume.as_deref(),
                    name,
                    args.commit_on_disconnect,
                )?;
                exports.push(v.export);
                writable.push((format!("volume {}", v.volume.name()), v.volume));
            }
            _ => {
                let (export, device) = open_export(spec, name, &args)?;
                exports.push(export);
                writable.extend(device.map(|d| (spec.clone(), d)));
            }
        }
    }
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_psk) {
        (Some(cert), Some(key), _) => {
            Some(Tls::from_pem_files(cert, key).context("--tls-cert/--tls-key")?)
        }
        (_, _, Some(file)) => {
            let keys = PskKeys::from_file(file)
                .and_then(|keys| keys.restrict(&args.tls_psk_user))
                .context("--tls-psk")?;
            Some(Tls::from_psk(keys).context("--tls-psk")?)
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "nbds" } else { "nbd" };
    let options = ServerOptions {
        tls,
        ..Default::default()
    };
    let server = Server::with_options(exports, options)
        .context("export names (set them with --export-name)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(io_threads())
        .thread_name("vmnest-nbd")
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(serve(server, listen, args.socket, scheme));
    // Stopped by a signal: what clients wrote without a flush is made durable too.
    for (what, device) in &writable {
        if let Err(e) = device.flush() {
            eprintln!("vmnest: {what}: {e}");
        }
    }
    result
}

/// The size of the blocking pool that runs device I/O.
fn io_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * IO_THREADS_PER_CORE).clamp(MIN_IO_THREADS, MAX_IO_THREADS)
}

/// The file name of a source, as its export name.
fn default_name(spec: &str) -> String {
    Path::new(spec)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| spec.to_string())
}

/// Resolves `--listen` and enforces the loopback rule.
fn listen_addr(text: &str, allow_remote: bool) -> Result<SocketAddr> {
    let addr = text
        .to_socket_addrs()
        .with_context(|| format!("--listen {text}"))?
        .next()
        .with_context(|| format!("--listen {text}: no address"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        bail!(
            "--listen {text}: {} is not a loopback address; pass --allow-remote to serve other \
             hosts (and --tls-cert/--tls-key or --tls-psk to encrypt)",
            addr.ip()
        );
    }
    Ok(addr)
}

/// A `--frame-cache` size.
pub fn frame_cache_size(text: &str) -> Result<usize> {
    let bytes = image_format::create::parse_size(text)
        .with_context(|| format!("--frame-cache {text:?}: expected a size (1G, 512M)"))?;
    Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// Opens the sources of `serve --from REMOTE`, keeping up to `frame_cache` bytes of decoded
/// frames in memory.
fn open_from(remote: &str, args: &Args, frame_cache: usize) -> Result<Vec<Arc<StoredDisk>>> {
    if args.rw {
        bail!(
            "--rw with --from is not built: a snapshot on a remote is served read-only (pull it, \
             or serve it without --rw)"
        );
    }
    let cache = image_format::create::parse_size(&args.cache_size).with_context(|| {
        format!(
            "--cache-size {:?}: expected a size (1G, 512M, 0)",
            args.cache_size
        )
    })?;
    let started = std::time::Instant::now();
    let caches = crate::store_args::LazyCaches {
        memory: frame_cache,
        disk: cache,
    };
    let (disks, chunks) = crate::store_args::open_lazy(remote, &args.sources, caches)
        .with_context(|| format!("serve --from {remote}"))?;
    eprintln!(
        "vmnest: remote {remote}: {} chunks indexed, {} snapshots opened in {:.3} s",
        chunks.remote().chunk_count(),
        disks.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(disks)
}

/// The export of an image file, and its writable device with `--rw`.
fn open_export(
    spec: &str,
    name: String,
    args: &Args,
) -> Result<(Export, Option<Arc<dyn BlockDeviceMut>>)> {
    let how = SourceOptions {
        format: args.format.as_deref(),
        writable: false,
    };
    let image = open_source(spec, &how, &args.open)?;
    let description = format!("{} image {spec}", image.format());
    if !args.rw {
        let device: Arc<dyn BlockDevice> = image;
        return Ok((
            Export::read_only(name, device).with_description(description),
            None,
        ));
    }
    drop(image);
    let device = open_source_mut(spec, args.format.as_deref(), &args.open, "served")?;
    let export = Export::writable(name, Arc::clone(&device)).with_description(description);
    Ok((export, Some(device)))
}

async fn serve(
    server: Server,
    listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    scheme: &str,
) -> Result<u8> {
    // Handlers first: a signal that comes right after the `serving` lines must not kill us.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let names: Vec<String> = server.exports().iter().map(|e| e.name.clone()).collect();
    let serving = async {
        match (&socket, listen) {
            (Some(path), _) => {
                let listener = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?;
                for name in &names {
                    println!("serving {scheme}+unix:///{name}?socket={}", path.display());
                }
                flush_stdout();
                server.serve_unix_listener(listener).await?;
            }
            (None, Some(addr)) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let local = listener.local_addr()?;
                for name in &names {
                    println!("serving {scheme}://{local}/{name}");
                }
                flush_stdout();
                server.serve_tcp_listener(listener).await?;
            }
            (None, None) => bail!("nowhere to listen"),
        }
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = serving => r,
        _ = int.recv() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    if let Some(path) = &socket {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| 0)
}

fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
