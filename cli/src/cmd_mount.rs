//! `vmnest mount` and `vmnest umount`: a disk image or stored snapshot as files over FUSE.
//!
//! `--rw` writes into a raw image file in place, or copy-on-write into a volume over a stored
//! snapshot; the volume is committed as a new snapshot when the mount goes away, by whatever
//! unmounts it.
//!
//! Without `-f`, `vmnest mount` starts itself again in the background (`-f` plus a hidden
//! `--daemon-child`, in a session of its own, stderr into a log file) and returns once the
//! child says the mount is live; the child's stdout is that signal: it writes what the mount
//! shows, then a last `READY` line, then points its stdout at /dev/null. A child that fails
//! before that exits, and the parent prints its log.
//!
//! Each serving process keeps three files under the state directory (`$XDG_RUNTIME_DIR/vmnest`,
//! else `/run/user/UID/vmnest`, else `/tmp/vmnest-UID`), named by a hash of the canonical mount
//! point: `.lock` (held with an exclusive lock for the process's whole life; it holds the pid),
//! `.log` (a daemon's stderr) and `.result` (the outcome, written just before exiting).
//! `vmnest umount` runs `fusermount3 -u`, then waits for a shared lock on `.lock` (so until the
//! server has flushed, committed and exited, however it ends), then prints `.result`.
//! A plain `fusermount3 -u` ends the server the same way: it notices the mount is gone,
//! flushes and commits before exiting.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dedup_store::store::disk::StoredDisk;
use dedup_store::store::volume::Volume;
use fuse_mount::fuse::{self as fusefs, Disk, MountOptions, Report};
use image_format::{BlockDevice, BlockDeviceMut};

use crate::cmd_volume::open_volume;
use crate::common::{OpenArgs, SourceOptions, human_size, open_source, open_source_mut};
use crate::store_args;

/// The last line a background child writes when its mount is live.
const READY: &str = "READY";
/// Why `--rw` with `--from` is refused.
const RW_FROM: &str = "--rw with --from is not built: a snapshot on a remote is mounted \
                       read-only (pull it, or mount it without --rw)";
/// The start of a warning line (the parent passes a child's to its stderr).
const WARNING: &str = "vmnest: warning: ";

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// An image file (any format) or `store:NAME[@SNAP][/MEMBER]`; with --from,
    /// `NAME[@SNAP][/MEMBER]` on the remote.
    source: String,
    /// The directory to mount on.
    mountpoint: PathBuf,
    /// Let writes through: into a raw image file, or copy-on-write into a volume over a stored
    /// snapshot, committed as a new snapshot when unmounted.
    #[arg(long)]
    rw: bool,
    /// Let other users than you see the files (FUSE `allow_other`).
    #[arg(long)]
    allow_other: bool,
    /// Stay in the foreground until unmounted (Ctrl-C unmounts).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// With --rw on a `store:` source: the volume to write into (default: the snapshot's NAME;
    /// created over the snapshot when missing, committed as a new snapshot at unmount).
    #[arg(long, value_name = "VOLUME", requires = "rw")]
    volume: Option<String>,
    /// Format of an image file (probed when absent).
    #[arg(long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Mount a snapshot of this remote, read lazily (read-only; nothing needs to be local).
    #[arg(long, value_name = "REMOTE", conflicts_with_all = ["volume", "format"])]
    from: Option<String>,
    /// With --from: bytes of fetched frames kept on disk at most (`0` keeps none).
    #[arg(long, value_name = "SIZE", default_value = "1G", requires = "from")]
    cache_size: String,
    /// Decoded frames of a stored snapshot (`store:` source, or with --from the remote's) kept
    /// in memory at most (an upper bound, reached only when that much is read).
    #[arg(long, value_name = "SIZE", default_value = "1G")]
    frame_cache: String,
    /// FUSE threads.
    #[arg(long, default_value_t = fusefs::DEFAULT_THREADS as u16,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    #[command(flatten)]
    open: OpenArgs,
    /// Internal: started by `vmnest mount` without `-f`; stdout is its readiness pipe.
    #[arg(long, hide = true)]
    daemon_child: bool,
    /// Internal: with --daemon-child, the store's passphrase (asked by the parent on its
    /// terminal) arrives on stdin.
    #[arg(long, hide = true, requires = "daemon_child")]
    passphrase_on_stdin: bool,
}

#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
}

/// What the server writes in `.result` before exiting.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Outcome {
    ok: bool,
    message: String,
}

/// The state files of one mount point.
struct StateFiles {
    lock: PathBuf,
    log: PathBuf,
    result: PathBuf,
}

impl StateFiles {
    fn for_mountpoint(mountpoint: &Path) -> Result<StateFiles> {
        use std::os::unix::ffi::OsStrExt;
        let dir = state_dir()?;
        let key = blake3::hash(mountpoint.as_os_str().as_bytes()).to_hex();
        let base = dir.join(&key.as_str()[..32]);
        Ok(StateFiles {
            lock: base.with_extension("lock"),
            log: base.with_extension("log"),
            result: base.with_extension("result"),
        })
    }

    fn remove(&self) {
        for p in [&self.result, &self.log, &self.lock] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The directory of the state files, made private to this user.
fn state_dir() -> Result<PathBuf> {
    // SAFETY: getuid cannot fail and touches no memory of ours.
    let uid = unsafe { libc::getuid() };
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(run) => PathBuf::from(run).join("vmnest"),
        None if Path::new(&format!("/run/user/{uid}")).is_dir() => {
            PathBuf::from(format!("/run/user/{uid}/vmnest"))
        }
        None => PathBuf::from(format!("/tmp/vmnest-{uid}")),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // In a shared /tmp someone else could have made it first: it must be ours and a real folder.
    let meta = std::fs::symlink_metadata(&dir).with_context(|| dir.display().to_string())?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a private directory of user {uid}; remove it or set XDG_RUNTIME_DIR",
            dir.display()
        );
    }
    Ok(dir)
}

/// The absolute, symlink-free path of a mount point, even when its FUSE server is gone (then
/// the mount point itself cannot be looked at, only its parent).
fn canonical_mountpoint(path: &Path) -> Result<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Ok(p);
    }
    let absolute = std::path::absolute(path).with_context(|| path.display().to_string())?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .with_context(|| parent.display().to_string())?
            .join(name)),
        _ => bail!("{}: not a mount point", path.display()),
    }
}

pub fn run_mount(args: MountArgs) -> Result<u8> {
    if args.from.is_some() && args.rw {
        // Refused before a background server is started.
        bail!("{RW_FROM}");
    }
    // Random reads of a stored snapshot decode each frame once (as `vmnest serve` does).
    dedup_store::pack::set_frame_cache_bytes(crate::cmd_serve::frame_cache_size(
        &args.frame_cache,
    )?);
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .with_context(|| format!("mount point {}", args.mountpoint.display()))?;
    if !mountpoint.is_dir() {
        bail!("mount point {} is not a directory", mountpoint.display());
    }
    if args.passphrase_on_stdin {
        let pass = dedup_store::crypt::read_passphrase(
            std::io::stdin().lock(),
            "the passphrase from the parent process",
        )?;
        crate::keys::set_handed_over(pass);
    }
    if args.foreground || args.daemon_child {
        serve(&args, &mountpoint)
    } else {
        // The background server has no terminal: ask for an encrypted store's (or remote's)
        // passphrase here and hand it over on the child's stdin (never in its arguments or
        // environment).
        let pass =
            crate::store_args::passphrase_for_background(args.from.as_deref(), &args.source)?;
        start_daemon(&mountpoint, pass)
    }
}

/// Starts `vmnest mount -f` in the background and waits until its mount is live.
fn start_daemon(mountpoint: &Path, passphrase: Option<Vec<u8>>) -> Result<u8> {
    let state = StateFiles::for_mountpoint(mountpoint)?;
    // A server already there keeps its log: refuse before touching it.
    if File::open(&state.lock).is_ok_and(|l| l.try_lock_shared().is_err()) {
        bail!("{} is already mounted by vmnest", mountpoint.display());
    }
    let log = File::create(&state.log).with_context(|| state.log.display().to_string())?;
    let exe = std::env::current_exe().context("finding the vmnest executable")?;
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .arg("--daemon-child")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if passphrase.is_some() {
        command.arg("--passphrase-on-stdin").stdin(Stdio::piped());
    }
    // SAFETY: setsid is async-signal-safe and the closure touches no memory of the parent.
    // A session of its own: closing the terminal or Ctrl-C there does not reach the server.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting the mount's server")?;
    if let (Some(pass), Some(mut stdin)) = (passphrase, child.stdin.take()) {
        // A child that exits early closes the pipe; its log says why.
        let _ = stdin.write_all(&pass).and_then(|()| stdin.write_all(b"\n"));
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut text)
            .context("reading from the mount's server")?;
    }
    if let Some(shown) = text.strip_suffix(&format!("{READY}\n")) {
        for line in shown.lines() {
            if line.starts_with(WARNING) {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        return Ok(0);
    }
    let status = child.wait().context("waiting for the mount's server")?;
    let log = std::fs::read_to_string(&state.log).unwrap_or_default();
    eprint!("{log}");
    if log.is_empty() {
        eprintln!("vmnest: the mount's server exited ({status}) before the mount was live");
    }
    Ok(1)
}

/// What a mount serves: its disks, and the volume a writable stored snapshot is written into.
struct Opened {
    disks: Vec<Disk>,
    volume: Option<(Arc<Volume>, String)>,
}

/// The disks of the source, writable for `--rw`: image files in place, a stored snapshot
/// copy-on-write into a volume.
fn open_disks(args: &MountArgs) -> Result<Opened> {
    let spec = args.source.as_str();
    if let Some(remote) = &args.from {
        return open_from(remote, args);
    }
    if let Some((snapshot, member)) = store_args::parse_store_source(spec) {
        let disks = store_args::open_stored_disks(snapshot, member)?;
        let single = disks.len() == 1;
        if args.rw {
            if !single {
                let names: Vec<&str> = disks.iter().map(|(n, _)| n.as_str()).collect();
                bail!(
                    "{spec} has {} disks ({}); a writable mount takes one: name it as \
                     {spec}/MEMBER",
                    disks.len(),
                    names.join(", ")
                );
            }
            drop(disks);
            let stored = spec.strip_prefix("store:").unwrap_or(spec);
            let (volume, name) = open_volume(stored, args.volume.as_deref())?;
            let device: Arc<dyn BlockDeviceMut> = volume.clone();
            return Ok(Opened {
                disks: vec![Disk::writable("disk", device)],
                volume: Some((volume, name)),
            });
        }
        return Ok(Opened {
            disks: read_only(disks),
            volume: None,
        });
    }
    if args.volume.is_some() {
        bail!("--volume applies to store: sources only");
    }
    if args.rw {
        let device =
            open_source_mut(spec, args.format.as_deref(), &args.open, "mounted").map_err(|e| {
                match args.format {
                    None => e.context("vmnest mount takes the format as --format FMT"),
                    Some(_) => e,
                }
            })?;
        return Ok(Opened {
            disks: vec![Disk::writable("disk", device)],
            volume: None,
        });
    }
    let how = SourceOptions {
        format: args.format.as_deref(),
        writable: false,
    };
    let device: Arc<dyn BlockDevice> = open_source(spec, &how, &args.open)?;
    Ok(Opened {
        disks: vec![Disk::read_only("disk", device)],
        volume: None,
    })
}

/// The disks of `mount --from REMOTE NAME[@SNAP][/MEMBER]`, read lazily from the remote. Opened
/// in the serving process itself (a background child opens it after its re-execution: the
/// remote's runtime and threads would not survive a fork).
fn open_from(remote: &str, args: &MountArgs) -> Result<Opened> {
    if args.rw {
        bail!("{RW_FROM}");
    }
    let cache = image_format::create::parse_size(&args.cache_size).with_context(|| {
        format!(
            "--cache-size {:?}: expected a size (1G, 512M, 0)",
            args.cache_size
        )
    })?;
    let caches = store_args::LazyCaches {
        memory: crate::cmd_serve::frame_cache_size(&args.frame_cache)?,
        disk: cache,
    };
    let disks = store_args::open_lazy_disks(remote, &args.source, caches)
        .with_context(|| format!("mount --from {remote}"))?;
    Ok(Opened {
        disks: read_only(disks),
        volume: None,
    })
}

/// A snapshot's disks as read-only files: `disk` for one, else named by member.
fn read_only(disks: Vec<(String, Arc<StoredDisk>)>) -> Vec<Disk> {
    let single = disks.len() == 1;
    disks
        .into_iter()
        .map(|(name, disk)| {
            let name = if single { "disk".to_string() } else { name };
            let device: Arc<dyn BlockDevice> = disk;
            Disk::read_only(name, device)
        })
        .collect()
}

/// Commits the volume a writable mount of a stored snapshot wrote into, once the mount is gone.
/// Returns whether that went well and what to say.
fn commit_volume(volume: &Volume, name: &str, report: &Report) -> (bool, String) {
    if !report.is_clean() {
        return (
            false,
            format!(
                "nothing committed after I/O errors: volume {name} keeps the writes (check, then \
                 `vmnest commit {name}`, or `vmnest volume rm {name}`)"
            ),
        );
    }
    match volume.is_dirty() {
        Ok(false) => return (true, format!("nothing written; volume {name} unchanged")),
        Ok(true) => {}
        Err(e) => return (false, format!("volume {name}: {e}")),
    }
    match volume.commit_report(None) {
        Ok(c) => {
            let mut text = format!("committed {}@{}", c.name, c.id.short());
            if let Some(was) = c.name_was_at {
                text += &format!(
                    " (its parent is the volume's base {}; {} had moved to {} meanwhile)",
                    c.parent.short(),
                    c.name,
                    was.short()
                );
            }
            (true, text)
        }
        Err(e) => (
            false,
            format!("committing volume {name} failed: {e}; the volume keeps the writes"),
        ),
    }
}

/// Mounts and serves until unmounted (`-f`, or the background child).
fn serve(args: &MountArgs, mountpoint: &Path) -> Result<u8> {
    let state = StateFiles::for_mountpoint(mountpoint)?;
    let mut lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(&state.lock)
        .with_context(|| state.lock.display().to_string())?;
    if lock.try_lock().is_err() {
        let holder = std::fs::read_to_string(&state.lock).unwrap_or_default();
        let pid = holder.lines().next().unwrap_or("?");
        bail!(
            "{} is already mounted by vmnest (process {pid})",
            mountpoint.display()
        );
    }
    let _ = std::fs::remove_file(&state.result);
    lock.set_len(0)?;
    write!(
        lock,
        "{}\n{}\n{}\n",
        std::process::id(),
        mountpoint.display(),
        args.source
    )?;

    // Until the mount is live, a failure leaves no lock file behind (the log stays: a parent
    // prints it).
    let mut not_live = RemoveOnDrop(Some(state.lock.clone()));
    let Opened { disks, volume } = open_disks(args)?;
    let layout = fusefs::layout(&disks);
    for w in &layout.warnings {
        // A background child's stderr is its log: the user hears of it through the parent.
        if args.daemon_child {
            println!("{WARNING}{w}");
        } else {
            eprintln!("{WARNING}{w}");
        }
    }
    let options = MountOptions {
        writable: args.rw,
        allow_other: args.allow_other,
        threads: usize::from(args.threads),
        fsname: format!(
            "vmnest:{}",
            args.source.replace([',', ' ', '\t', '\n'], "_")
        ),
        ..Default::default()
    };
    // Handlers first: a signal right after the mount is live must unmount, not kill.
    unmount_on_signal(mountpoint.to_path_buf());
    let mount = fusefs::mount(mountpoint, disks, layout, &options)?;
    not_live.0 = None;
    for note in mount.notes() {
        eprintln!("vmnest: note: {note}");
    }
    let mode = if args.rw { "writable" } else { "read-only" };
    println!(
        "mounted {} on {} ({mode})",
        args.source,
        mountpoint.display()
    );
    for f in mount.files() {
        let what = match &f.partition {
            None => String::new(),
            Some((scheme, number, kind)) => {
                format!("  {} partition {number}, type {kind}", scheme.as_str())
            }
        };
        println!(
            "{}  {}{what}",
            mountpoint.join(&f.name).display(),
            human_size(f.len)
        );
    }
    if args.daemon_child {
        println!("{READY}");
    }
    let _ = std::io::stdout().flush();
    if args.daemon_child {
        detach_stdout()?;
    }

    let report = mount.run()?;
    let mut message = format!("unmounted {}", mountpoint.display());
    if report.writes > 0 {
        message += &format!(
            ": {} writes ({}) flushed to {}",
            report.writes,
            human_size(report.bytes_written),
            args.source
        );
    }
    if !report.is_clean() {
        message = format!(
            "{message}; {} I/O errors while mounted: {}",
            report.error_count,
            report.errors.join("; ")
        );
    }
    let mut ok = report.is_clean();
    if let Some((volume, name)) = &volume {
        let (committed, text) = commit_volume(volume, name, &report);
        ok &= committed;
        message = format!("{message}; {text}");
    }
    let outcome = Outcome { ok, message };
    finish(&state, &outcome, args.daemon_child);
    drop(lock);
    Ok(if outcome.ok { 0 } else { 1 })
}

/// Removes a file when dropped, unless emptied first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Says how the mount ended: in `.result`, and on stdout in the foreground (stderr, so the log,
/// in the background).
fn finish(state: &StateFiles, outcome: &Outcome, daemon: bool) {
    if daemon {
        eprintln!("vmnest: {}", outcome.message);
    } else {
        println!("{}", outcome.message);
    }
    let tmp = state.result.with_extension("result.tmp");
    let written = serde_json::to_vec(outcome)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &state.result));
    if let Err(e) = written {
        eprintln!("vmnest: writing {}: {e}", state.result.display());
    }
}

/// Points stdout at /dev/null: the parent that read it has gone, and a write to a pipe without
/// a reader would kill this process.
fn detach_stdout() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = File::options()
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    // SAFETY: dup2 onto fd 1 with a descriptor we own; Rust's stdout keeps using fd 1.
    if unsafe { libc::dup2(null.as_raw_fd(), 1) } < 0 {
        return Err(std::io::Error::last_os_error()).context("redirecting stdout");
    }
    Ok(())
}

/// SIGINT and SIGTERM unmount (the server then finishes as for any unmount); a mount that is
/// still in use stays, and says so. Returns once the handlers are installed.
fn unmount_on_signal(mountpoint: PathBuf) {
    let (installed, wait) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("vmnest-signals".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return eprintln!("vmnest: no signal handling: {e}"),
            };
            runtime.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return eprintln!("vmnest: no signal handling");
                };
                drop(installed);
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    if let Err(e) = fusefs::unmount(&mountpoint) {
                        eprintln!("vmnest: {e}; still mounted");
                    }
                }
            });
        });
    match spawned {
        // Returns when the thread drops its end: handlers installed, or gave up.
        Ok(_) => {
            let _ = wait.recv();
        }
        Err(e) => eprintln!("vmnest: no signal handling: {e}"),
    }
}

pub fn run_umount(args: UmountArgs) -> Result<u8> {
    let mountpoint = canonical_mountpoint(&args.mountpoint)?;
    let state = StateFiles::for_mountpoint(&mountpoint)?;
    let lock = match File::open(&state.lock) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| state.lock.display().to_string()),
    };
    let served = lock.as_ref().is_some_and(|l| l.try_lock_shared().is_err());
    if served || fusefs::is_fuse_mounted(&mountpoint) {
        fusefs::unmount(&mountpoint)?;
    } else if lock.is_none() || !state.result.exists() {
        // No server, no mount, and no outcome left by one that ended (a stale lock file).
        state.remove();
        bail!("{}: nothing is mounted there", mountpoint.display());
    }
    let Some(lock) = lock else {
        println!(
            "unmounted {} (no vmnest server recorded for it)",
            mountpoint.display()
        );
        return Ok(0);
    };
    if served {
        // Released when the server exits, whichever way it ends.
        lock.lock_shared()
            .with_context(|| format!("waiting on {}", state.lock.display()))?;
    }
    let outcome = std::fs::read(&state.result)
        .ok()
        .and_then(|b| serde_json::from_slice::<Outcome>(&b).ok());
    let code = match outcome {
        Some(o) if o.ok => {
            println!("{}", o.message);
            0
        }
        Some(o) => {
            eprintln!("vmnest: {}", o.message);
            1
        }
        None => {
            let log = std::fs::read_to_string(&state.log).unwrap_or_default();
            eprint!("{log}");
            eprintln!(
                "vmnest: the server of {} ended without reporting how (it crashed or was killed)",
                mountpoint.display()
            );
            1
        }
    };
    state.remove();
    Ok(code)
}
