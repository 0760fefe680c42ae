//! The store's commands: init, import, export, clone, ls, log, rm, diff, du, gc, verify.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use convert::{ConvertOptions, Progress};
use dedup_store::ChunkId;
use dedup_store::map::{MapRoot, diff as map_diff, walk};
use dedup_store::store::disk::DiskChunks;
use dedup_store::store::gc::{GcOptions, gc, live_snapshots};
use dedup_store::store::import::DiskImporter;
use dedup_store::store::stream::{export_stream, import_stream, import_stream_with, part_chunks};
use dedup_store::store::verify::verify;
use dedup_store::store::{
    Access, Layout, Member, MemberKind, RefUpdate, Resolved, SnapshotId, Store, StoreConfig,
};
use serde_json::json;

use crate::cmd_convert::{ConvertArgs, bar, run_convert};
use crate::cmd_volume::{print_volume_lines, volume_rows};
use crate::common::{JobArgs, OpenArgs, Output, human_size, open_image, print_json, shown};
use crate::presets::Target;
use crate::store_args::{open_store, store_dir};

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Chunk size of disks imported into this store (4K..4M, a power of two).
    #[arg(long, default_value = "16K")]
    chunk_size: String,
    /// zstd level of pack frames (1..=22).
    #[arg(long, default_value_t = dedup_store::store::DEFAULT_COMPRESSION_LEVEL)]
    compression_level: i32,
    /// Plaintext size of a pack frame, the unit a read decompresses (4K..16M).
    #[arg(long, default_value = "1M")]
    frame_size: String,
    /// Encrypt the store: a random master key, kept in the key file (--key-file) or wrapped
    /// under a passphrase (--passphrase-file, $VMNEST_PASSPHRASE, else asked twice).
    #[arg(long)]
    encrypt: bool,
    /// With --encrypt: share the key of the encrypted remote at this URL (s3://bucket/prefix
    /// or a directory) instead of making one; the passphrase or key file must unlock it.
    #[arg(long, value_name = "URL", requires = "encrypt")]
    from_remote: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Chunk size (4K..4M, a power of two; default: the store's).
    #[arg(long)]
    chunk_size: Option<String>,
    /// Import a VM bundle under this name: --config, --disk (repeatable), --memory.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// The VM's configuration file (with --vm).
    #[arg(long, requires = "vm")]
    config: Option<PathBuf>,
    /// A disk of the VM, in any image format (with --vm; repeatable: disk0, disk1, ...).
    #[arg(long, requires = "vm")]
    disk: Vec<PathBuf>,
    /// The VM's memory: a QEMU migration stream, an ELF dump (dump-guest-memory), or a
    /// page-aligned memory image such as a .vmem or a Firecracker memory file (with --vm).
    #[arg(long, requires = "vm")]
    memory: Option<PathBuf>,
    /// A label, `key=value` (repeatable).
    #[arg(long)]
    label: Vec<String>,
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    open: OpenArgs,
    /// The image to import (any format), then the name to store it under.
    #[arg(num_args = 0..=2, value_names = ["SRC", "NAME"])]
    args: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Output format (default raw).
    #[arg(short = 'O')]
    format: Option<String>,
    /// Where the image is going: picks the format and options hypervisors accept.
    #[arg(long = "for", value_enum)]
    target: Option<Target>,
    /// Format options, `key=value,...` (repeatable).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Compress the output (qcow2; streamOptimized VMDK always compresses).
    #[arg(short = 'c')]
    compress: bool,
    /// Make the output a qcow2 overlay on this exported parent, holding only the delta.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file (probed when absent).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Which member (default: the first disk).
    #[arg(long)]
    member: Option<String>,
    /// Replace an existing destination.
    #[arg(long)]
    force: bool,
    /// Do not fsync the finished image.
    #[arg(long)]
    no_sync: bool,
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    open: OpenArgs,
    /// The snapshot: NAME, NAME@ID, NAME@~N.
    snapshot: String,
    /// Destination file.
    dst: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CloneArgs {
    /// The snapshot to clone: NAME, NAME@ID, NAME@~N.
    src: String,
    /// New names (`web-{01..50}` is expanded when the shell did not).
    #[arg(required = true)]
    new: Vec<String>,
    /// Summary format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// The name (or NAME@ID to start from an older snapshot).
    name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RmArgs {
    /// Names to remove, or NAME@ID / NAME@~N to remove one older snapshot of a name. Data goes
    /// at the next `vmnest gc`.
    #[arg(required = true)]
    names: Vec<String>,
    /// Remove the names on this remote instead (`refs/NAME`; the snapshots go at the remote's
    /// gc).
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The older snapshot.
    old: String,
    /// The newer snapshot.
    new: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct DuArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Repack packs whose live bytes are under this fraction.
    #[arg(long, default_value_t = 0.5, conflicts_with = "remote")]
    repack_below: f64,
    /// Collect garbage on this remote instead (safe against pushes running at the same time).
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
    /// With --remote: how long a condemnation stands before what it names is deleted, and how
    /// young a snapshot without a name must be to be kept (`1h`, `30m`, `90s`, `0s`).
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "1h",
        requires = "remote"
    )]
    grace: String,
    /// Report what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Check a remote instead: every manifest there refers only to objects that are there.
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

fn parse_chunk_size(text: &str) -> Result<u32> {
    let n = image_format::create::parse_size(text)
        .with_context(|| format!("chunk size {text:?}: expected 4K, 16K, 64K, ..."))?;
    let n = u32::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two() && (4096..=4 << 20).contains(n));
    n.with_context(|| format!("chunk size {text}: a power of two from 4K to 4M"))
}

pub fn run_init(args: InitArgs) -> Result<u8> {
    let chunk_size = parse_chunk_size(&args.chunk_size)?;
    let dir = store_dir();
    ensure!(
        !dir.join("config").exists(),
        "a store exists at {} already",
        dir.display()
    );
    let frame_size = image_format::create::parse_size(&args.frame_size)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (4096..=16 << 20).contains(n))
        .with_context(|| format!("frame size {}: 4K to 16M", args.frame_size))?;
    ensure!(
        (1..=22).contains(&args.compression_level),
        "compression level {}: 1 to 22",
        args.compression_level
    );
    let config = StoreConfig {
        chunk_size,
        compression_level: args.compression_level,
        frame_size,
        ..Default::default()
    };
    let mut encrypted = String::new();
    if args.encrypt {
        let shared = match &args.from_remote {
            Some(url) => {
                let remote = dedup_store::remote::Remote::open_url(
                    "from-remote",
                    url,
                    std::env::temp_dir().join(format!("vmnest-init-{}", std::process::id())),
                )?;
                let section = remote.encryption()?.with_context(|| {
                    format!("remote {url} is not encrypted (it has no keys object)")
                })?;
                Some(section)
            }
            None => None,
        };
        let key = crate::keys::key_or_prompt(
            &format!("the new store {}", dir.display()),
            shared.is_none(),
        )?
        .context("--encrypt needs a key: --key-file FILE, --passphrase-file FILE, VMNEST_KEY_FILE or VMNEST_PASSPHRASE (or a terminal to ask on)")?;
        let store = Store::create_encrypted(
            &dir,
            config,
            &key,
            dedup_store::crypt::Argon2Costs::from_env(),
            shared.as_ref(),
        )?;
        if let Some(k) = store.keys() {
            encrypted = format!(", encrypted, key fingerprint {}", k.fingerprint());
        }
    } else {
        Store::create(&dir, config)?;
    }
    println!(
        "created a store at {} ({} chunks{encrypted})",
        dir.display(),
        human_size(chunk_size.into())
    );
    Ok(0)
}

struct Imported {
    member: Member,
    new_bytes: u64,
    stored_bytes: u64,
    data_bytes: u64,
}

fn import_disk(
    store: &Arc<Store>,
    name: &str,
    kind: MemberKind,
    src: &Path,
    format: Option<&str>,
    chunk_size: u32,
    args: &ImportArgs,
) -> Result<Imported> {
    let image = open_image(src, format, &args.open)?;
    let size = image.size();
    let (writer, handle) = DiskImporter::new(store.chunks().clone(), size, chunk_size)?;
    let engine = ConvertOptions {
        threads: args.job.threads,
        ..Default::default()
    };
    let bar = bar(args.job.progress, size);
    let progress: &dyn Progress = match &bar {
        Some(b) => b,
        None => &(),
    };
    convert::convert(image.as_ref(), Box::new(writer), &engine, progress)
        .with_context(|| format!("importing {}", shown(src)))?;
    if let Some(b) = bar {
        b.0.finish_and_clear();
    }
    let root = handle.root().context("the import did not finish")?;
    let s = handle.stats();
    use std::sync::atomic::Ordering::Relaxed;
    Ok(Imported {
        member: Member {
            name: name.to_string(),
            kind,
            size,
            layout: Layout::Map {
                chunk_size,
                root: root.root,
            },
        },
        new_bytes: s.new_bytes.load(Relaxed),
        stored_bytes: s.stored_bytes.load(Relaxed),
        data_bytes: s.chunks.load(Relaxed) * u64::from(chunk_size),
    })
}

fn import_file_stream(
    store: &Arc<Store>,
    name: &str,
    kind: MemberKind,
    src: &Path,
) -> Result<Imported> {
    let file = std::fs::File::open(src).with_context(|| format!("opening {}", shown(src)))?;
    let len = file.metadata()?.len();
    let before = pack_bytes(store);
    let (layout, size, report) = if len == 0 {
        import_stream(store.chunks().as_ref(), &[])?
    } else {
        // SAFETY: the file is opened read-only and only read through the map; a file changed by
        // another process while it is imported yields wrong content, never unsafety of our own
        // data structures, and the recipe's size check catches truncation.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("mapping {}", shown(src)))?;
        let mut released = 0usize;
        import_stream_with(store.chunks().as_ref(), &map, &mut |upto| {
            let upto = upto / 4096 * 4096;
            // Pages behind the cursor are not read again: drop them from our memory.
            // SAFETY: the mapping is a read-only private map of a file; after MADV_DONTNEED
            // the pages read back from the file, so the bytes seen through `map` do not change.
            let _ = unsafe {
                map.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    released,
                    upto - released,
                )
            };
            released = upto;
        })?
    };
    if let Some(why) = &report.stopped {
        eprintln!(
            "vmnest: {}: the migration stream was parsed up to where it stopped ({why}); the rest is cut by content",
            shown(src)
        );
    }
    let stored = pack_bytes(store).saturating_sub(before);
    Ok(Imported {
        member: Member {
            name: name.to_string(),
            kind,
            size,
            layout,
        },
        new_bytes: stored,
        stored_bytes: stored,
        data_bytes: size,
    })
}

/// A QEMU migration stream or an ELF memory dump: stored as a recipe whose pages are chunks
/// wherever they sit in the file.
fn is_structured_memory(path: &Path) -> bool {
    let mut head = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && (head[..4] == *b"QEVM" || head[..4] == *b"\x7fELF")
}

fn pack_bytes(store: &Store) -> u64 {
    store.chunks().packed_bytes()
}

fn labels(list: &[String]) -> Result<BTreeMap<String, String>> {
    list.iter()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("label {l:?}: expected key=value"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

pub fn run_import(args: ImportArgs) -> Result<u8> {
    let started = Instant::now();
    let store = open_store(Access::Write)?;
    let chunk_size = match &args.chunk_size {
        Some(t) => parse_chunk_size(t)?,
        None => store.config().chunk_size,
    };
    let (name, origin, imported) = if let Some(vm) = &args.vm {
        ensure!(
            args.args.is_empty(),
            "--vm takes its files from --config, --disk and --memory"
        );
        ensure!(
            args.config.is_some() || !args.disk.is_empty() || args.memory.is_some(),
            "--vm needs at least one of --config, --disk, --memory"
        );
        let mut members = Vec::new();
        for (i, disk) in args.disk.iter().enumerate() {
            members.push(import_disk(
                &store,
                &format!("disk{i}"),
                MemberKind::Disk,
                disk,
                args.format.as_deref(),
                chunk_size,
                &args,
            )?);
        }
        if let Some(mem) = &args.memory {
            let len = std::fs::metadata(mem)
                .with_context(|| format!("memory {}", shown(mem)))?
                .len();
            if !is_structured_memory(mem) && len % 4096 == 0 && len > 0 {
                // A page-aligned memory image: 4 KiB pages in a map.
                members.push(import_disk(
                    &store,
                    "memory",
                    MemberKind::Memory,
                    mem,
                    Some("raw"),
                    4096,
                    &args,
                )?);
            } else {
                members.push(import_file_stream(
                    &store,
                    "memory",
                    MemberKind::Memory,
                    mem,
                )?);
            }
        }
        if let Some(config) = &args.config {
            members.push(import_file_stream(
                &store,
                "config",
                MemberKind::Config,
                config,
            )?);
        }
        (vm.clone(), format!("import --vm {vm}"), members)
    } else {
        let [src, name] = args.args.as_slice() else {
            bail!("usage: vmnest import SRC NAME (or --vm NAME --disk FILE ...)");
        };
        let name = name.to_string_lossy().into_owned();
        let member = import_disk(
            &store,
            "disk0",
            MemberKind::Disk,
            src,
            args.format.as_deref(),
            chunk_size,
            &args,
        )?;
        (name, format!("import {}", shown(src)), vec![member])
    };
    let labels = labels(&args.label)?;
    let members: Vec<Member> = imported.iter().map(|i| i.member.clone()).collect();
    let mut parent = None;
    let id = store.commit(&name, RefUpdate::NewVersion, |p| {
        parent = p;
        let mut m = Store::new_manifest(origin, members);
        m.parent = p;
        m.labels = labels;
        Ok(m)
    })?;
    let logical: u64 = imported.iter().map(|i| i.member.size).sum();
    let new: u64 = imported.iter().map(|i| i.new_bytes).sum();
    let stored: u64 = imported.iter().map(|i| i.stored_bytes).sum();
    let data: u64 = imported.iter().map(|i| i.data_bytes).sum();
    let secs = started.elapsed().as_secs_f64();
    match args.job.output {
        Output::Json => print_json(&json!({
            "name": name,
            "snapshot": id.to_hex(),
            "parent": parent.map(|p| p.to_hex()),
            "logical_bytes": logical,
            "data_bytes": data,
            "new_bytes": new,
            "stored_bytes": stored,
            "seconds": secs,
        }))?,
        Output::Human => println!(
            "{name}@{}: {} logical, {} data, {} new ({} stored) in {secs:.1} s",
            id.short(),
            human_size(logical),
            human_size(data),
            human_size(new),
            human_size(stored),
        ),
    }
    Ok(0)
}

pub fn run_export(args: ExportArgs) -> Result<u8> {
    export_from(args, None)
}

/// Export (`remote` None) or restore (from remote `remote`, through a frame cache of that many
/// bytes, without a local copy): a disk goes through the convert engine from `store:` or
/// `remote:` sources; a byte stream is concatenated.
pub fn export_from(args: ExportArgs, remote: Option<(&str, usize)>) -> Result<u8> {
    // Held to the end: the store's shared lock keeps gc from removing packs mid-export.
    let mut _store = None;
    let (snap, chunks, src_prefix): (Resolved, DiskChunks, String) = match remote {
        None => {
            let store = _store.insert(open_store(Access::Read)?);
            let snap = store.resolve(&args.snapshot)?;
            (
                snap,
                DiskChunks::Local(store.chunks().clone()),
                "store:".into(),
            )
        }
        Some((name, frame_cache)) => {
            let (snap, chunks) =
                crate::store_args::resolve_remote(name, &args.snapshot, frame_cache)?;
            (snap, DiskChunks::Remote(chunks), format!("remote:{name}:"))
        }
    };
    let member = match &args.member {
        Some(m) => snap
            .manifest
            .member(m)
            .with_context(|| format!("{} has no member {m}", args.snapshot))?,
        None => snap
            .manifest
            .primary()
            .context("the snapshot has no members")?,
    }
    .clone();
    if let Layout::Recipe { .. } = member.layout {
        ensure!(
            args.format.as_deref().is_none_or(|f| f == "raw") && args.target.is_none(),
            "member {} is a byte stream: it exports as it was imported (-O raw)",
            member.name
        );
        if args.dst.exists() && !args.force {
            bail!("{} exists: use --force to replace it", shown(&args.dst));
        }
        // The convert engine's temporary output: removed unless committed, fsynced and renamed
        // into place (with its directory) when complete.
        let result = (|| -> Result<u64> {
            let out = image_format::create::TempOutput::create_with(&args.dst, !args.no_sync)?;
            let mut f = std::io::BufWriter::with_capacity(1 << 20, out.file().as_file());
            let n = export_stream(&chunks, &member.layout, &mut f)?;
            f.into_inner().map_err(|e| e.into_error())?;
            out.commit()?;
            Ok(n)
        })();
        let n = result.with_context(|| {
            format!(
                "exporting {}@{} to {}",
                snap.name,
                snap.id.short(),
                shown(&args.dst)
            )
        })?;
        if args.job.output == Output::Json {
            print_json(&json!({"snapshot": snap.id.to_hex(), "member": member.name, "bytes": n}))?;
        }
        return Ok(0);
    }
    drop(chunks);
    let src = format!(
        "{src_prefix}{}@{}/{}",
        snap.name,
        snap.id.to_hex(),
        member.name
    );
    let format = if args.target.is_none() && args.format.is_none() {
        Some("raw".to_string())
    } else {
        args.format
    };
    let what = match remote {
        Some((r, _)) => format!("restore {}@{} from remote {r}", snap.name, snap.id.short()),
        None => format!("export {}@{}", snap.name, snap.id.short()),
    };
    let mut open = args.open;
    if let Some((_, frame_cache)) = remote {
        // The convert engine opens the `remote:` source itself, with this bound.
        open.remote_frame_cache = Some(frame_cache);
    }
    run_convert(ConvertArgs {
        source_format: None,
        format,
        target: args.target,
        options: args.options,
        compress: args.compress,
        backing: args.backing,
        backing_format: args.backing_format,
        no_create: false,
        target_is_zero: false,
        force: args.force,
        no_sync: args.no_sync,
        job: args.job,
        open,
        src: PathBuf::from(src),
        dst: args.dst,
    })
    .with_context(|| what)
}

/// Expands `prefix{A..B}suffix` (numbers; zero-padded when A is), as bash does.
pub fn expand_braces(name: &str) -> Result<Vec<String>> {
    let (Some(open), Some(close)) = (name.find('{'), name.find('}')) else {
        return Ok(vec![name.to_string()]);
    };
    ensure!(open < close, "bad name {name:?}");
    let inner = &name[open + 1..close];
    let Some((a, b)) = inner.split_once("..") else {
        bail!("bad name {name:?}: only {{A..B}} ranges are expanded");
    };
    let (from, to): (u64, u64) = (
        a.parse()
            .with_context(|| format!("bad range in {name:?}"))?,
        b.parse()
            .with_context(|| format!("bad range in {name:?}"))?,
    );
    ensure!(from <= to && to - from < 100_000, "bad range in {name:?}");
    let width = if a.starts_with('0') && a.len() > 1 {
        a.len()
    } else {
        0
    };
    let mut out = Vec::new();
    for n in from..=to {
        let rest = expand_braces(&name[close + 1..])?;
        for r in rest {
            out.push(format!("{}{n:0width$}{r}", &name[..open]));
        }
    }
    Ok(out)
}

pub fn run_clone(args: CloneArgs) -> Result<u8> {
    let started = Instant::now();
    let store = open_store(Access::Write)?;
    let src = store.resolve(&args.src)?;
    let mut names = Vec::new();
    for n in &args.new {
        names.extend(expand_braces(n)?);
    }
    let mut made = Vec::new();
    for name in &names {
        let members = src.manifest.members.clone();
        let origin = format!("clone {}@{}", src.name, src.id.short());
        let id = store
            .commit(name, RefUpdate::CreateOnly, |_| {
                let mut m = Store::new_manifest(origin, members);
                m.parent = Some(src.id);
                m.labels = src.manifest.labels.clone();
                Ok(m)
            })
            .with_context(|| format!("clone {name}"))?;
        made.push((name.clone(), id));
    }
    let secs = started.elapsed().as_secs_f64();
    match args.output {
        Output::Json => print_json(&json!({
            "source": src.id.to_hex(),
            "clones": made.iter().map(|(n, id)| json!({"name": n, "snapshot": id.to_hex()})).collect::<Vec<_>>(),
            "seconds": secs,
        }))?,
        Output::Human => {
            for (n, id) in &made {
                println!(
                    "{n}@{} (clone of {}@{})",
                    id.short(),
                    src.name,
                    src.id.short()
                );
            }
        }
    }
    Ok(0)
}

fn time_text(secs: u64) -> String {
    // Civil date from days since the epoch (UTC).
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn members_text(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{} {}", m.name, human_size(m.size)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run_ls(args: ListArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let refs = store.refs()?;
    let mut rows = Vec::new();
    for (name, id) in &refs {
        let m = store.manifest(id)?;
        rows.push((name.clone(), *id, m));
    }
    let volumes = volume_rows(&store)?;
    let volumes_of = |name: &str| -> Vec<&str> {
        volumes
            .iter()
            .filter(|v| v["name"] == name)
            .filter_map(|v| v["volume"].as_str())
            .collect()
    };
    match args.output {
        Output::Json => print_json(
            &rows
                .iter()
                .map(|(n, id, m)| {
                    json!({
                        "name": n,
                        "snapshot": id.to_hex(),
                        "parent": m.parent.map(|p| p.to_hex()),
                        "time": m.time,
                        "origin": m.origin,
                        "logical_bytes": m.logical_size(),
                        "labels": m.labels,
                        "members": m.members.iter().map(|x| json!({"name": x.name, "kind": x.kind.as_str(), "size": x.size})).collect::<Vec<_>>(),
                        "volumes": volumes_of(n),
                    })
                })
                .collect::<Vec<_>>(),
        )?,
        Output::Human => {
            println!("{:<24} {:<12} {:<19} MEMBERS", "NAME", "SNAPSHOT", "CREATED (UTC)");
            for (n, id, m) in &rows {
                println!(
                    "{n:<24} {:<12} {:<19} {}",
                    id.short(),
                    time_text(m.time),
                    members_text(&m.members)
                );
            }
            print_volume_lines(&volumes);
        }
    }
    Ok(0)
}

pub fn run_log(args: LogArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let snap = store.resolve(&args.name)?;
    let lineage = store.lineage(&snap.id)?;
    let cut = lineage.last().and_then(|(_, m)| m.parent);
    match args.output {
        Output::Json => print_json(&json!({
            "lineage": lineage.iter().map(|(id, m)| json!({
                "snapshot": id.to_hex(), "name": m.name, "time": m.time, "origin": m.origin,
                "parent": m.parent.map(|p| p.to_hex()), "logical_bytes": m.logical_size(),
            })).collect::<Vec<_>>(),
            "removed_ancestor": cut.map(|c| c.to_hex()),
        }))?,
        Output::Human => {
            for (id, m) in &lineage {
                println!(
                    "{}  {}  {:<16} {}  ({})",
                    id.short(),
                    time_text(m.time),
                    m.name,
                    m.origin,
                    members_text(&m.members)
                );
            }
            if let Some(c) = cut {
                println!("{}  (removed)", c.short());
            }
        }
    }
    Ok(0)
}

pub fn run_rm(args: RmArgs) -> Result<u8> {
    if let Some(remote) = &args.remote {
        return crate::cmd_remote::run_rm_remote(remote, &args.names);
    }
    let store = open_store(Access::Write)?;
    for spec in &args.names {
        if spec.contains('@') {
            let snap = store.resolve(spec)?;
            let heads: HashSet<SnapshotId> = store.refs()?.values().copied().collect();
            ensure!(
                !heads.contains(&snap.id),
                "{spec} is the current snapshot of a name: remove the name instead"
            );
            store.remove_snapshot(&snap.id)?;
            println!("removed {}@{}", snap.name, snap.id.short());
        } else {
            let id = store.remove_ref(spec)?;
            println!(
                "removed {spec} (was {}); vmnest gc frees its space",
                id.short()
            );
        }
    }
    Ok(0)
}

pub fn run_diff(args: DiffArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let old = store.resolve(&args.old)?;
    let new = store.resolve(&args.new)?;
    let mut changes = Vec::new();
    for nm in &new.manifest.members {
        let Some(om) = old.manifest.member(&nm.name) else {
            changes.push(json!({"member": nm.name, "added": true, "size": nm.size}));
            continue;
        };
        match (om.map_root(), nm.map_root()) {
            (Some(o), Some(n)) if (o.size, o.chunk_size) == (n.size, n.chunk_size) => {
                let cs = u64::from(n.chunk_size);
                let mut ranges: Vec<(u64, u64)> = Vec::new();
                for e in map_diff(store.chunks().as_ref(), &o, &n)? {
                    let e = e?;
                    let (s, end) = (e.range.start * cs, (e.range.end * cs).min(n.size));
                    match ranges.last_mut() {
                        Some(last) if last.1 == s => last.1 = end,
                        _ => ranges.push((s, end)),
                    }
                }
                for (s, e) in ranges {
                    changes.push(json!({"member": nm.name, "offset": s, "length": e - s}));
                }
            }
            (Some(_), Some(_)) => bail!(
                "member {} has a different size or chunk size in the two snapshots",
                nm.name
            ),
            _ => {
                if om.layout != nm.layout {
                    changes.push(json!({"member": nm.name, "changed": true, "size": nm.size}));
                }
            }
        }
    }
    for om in &old.manifest.members {
        if new.manifest.member(&om.name).is_none() {
            changes.push(json!({"member": om.name, "removed": true}));
        }
    }
    match args.output {
        Output::Json => print_json(&changes)?,
        Output::Human => {
            let mut total = 0u64;
            for c in &changes {
                if let (Some(o), Some(l)) = (c["offset"].as_u64(), c["length"].as_u64()) {
                    total += l;
                    println!("{} {o:#x} +{l:#x}", c["member"].as_str().unwrap_or(""));
                } else {
                    println!("{c}");
                }
            }
            println!("{} changed", human_size(total));
        }
    }
    Ok(if changes.is_empty() { 0 } else { 1 })
}

/// Every chunk (map nodes and recipe parts included) a member refers to.
fn member_chunks(store: &Store, m: &Member, out: &mut HashSet<ChunkId>) -> Result<()> {
    match &m.layout {
        Layout::Map { .. } => {
            let root: MapRoot = m.map_root().context("bad map")?;
            let mut err = None;
            walk(
                store.chunks().as_ref(),
                &root,
                &mut |id, _| out.insert(*id),
                &mut |id, e| {
                    err.get_or_insert(format!("map node {id}: {e}"));
                },
            )?;
            if let Some(e) = err {
                bail!("{}: {e}", m.name);
            }
        }
        Layout::Recipe { parts, .. } => {
            for p in parts {
                out.insert(*p);
                out.extend(part_chunks(store.chunks().as_ref(), p)?);
            }
        }
    }
    Ok(())
}

pub fn run_du(args: DuArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let refs = store.refs()?;
    let mut per_image: Vec<(String, SnapshotId, u64, HashSet<ChunkId>)> = Vec::new();
    let mut users: HashMap<ChunkId, u32> = HashMap::new();
    for (name, id) in &refs {
        let m = store.manifest(id)?;
        let mut set = HashSet::new();
        for member in &m.members {
            member_chunks(&store, member, &mut set)?;
        }
        for c in &set {
            *users.entry(*c).or_default() += 1;
        }
        per_image.push((name.clone(), *id, m.logical_size(), set));
    }
    let live = live_snapshots(&store)?;
    let stored = pack_bytes(&store);
    let mut footprint: HashMap<ChunkId, (u32, f64)> = HashMap::new();
    for c in users.keys() {
        if let Some(f) = store.chunks().chunk_footprint(c)? {
            footprint.insert(*c, f);
        }
    }
    let images: Vec<serde_json::Value> = per_image
        .iter()
        .map(|(name, id, logical, set)| {
            let (mut referenced, mut unique, mut unique_stored) = (0u64, 0u64, 0f64);
            for c in set {
                let (len, st) = footprint.get(c).copied().unwrap_or((0, 0.0));
                referenced += u64::from(len);
                if users.get(c) == Some(&1) {
                    unique += u64::from(len);
                    unique_stored += st;
                }
            }
            json!({
                "name": name, "snapshot": id.to_hex(), "logical_bytes": logical,
                "referenced_bytes": referenced, "unique_bytes": unique,
                "shared_bytes": referenced - unique, "unique_stored_bytes": unique_stored as u64,
            })
        })
        .collect();
    let logical: u64 = per_image.iter().map(|i| i.2).sum();
    let summary = json!({
        "store": shown(store.root()),
        "names": refs.len(),
        "snapshots": live.len(),
        "logical_bytes": logical,
        "stored_bytes": stored,
        "packs": store.chunks().packs().len(),
        "images": images,
        "volumes": volume_rows(&store)?,
    });
    match args.output {
        Output::Json => print_json(&summary)?,
        Output::Human => {
            println!(
                "{:<24} {:>10} {:>10} {:>10} {:>10}",
                "NAME", "LOGICAL", "DATA", "UNIQUE", "SHARED"
            );
            for i in &images {
                println!(
                    "{:<24} {:>10} {:>10} {:>10} {:>10}",
                    i["name"].as_str().unwrap_or(""),
                    human_size(i["logical_bytes"].as_u64().unwrap_or(0)),
                    human_size(i["referenced_bytes"].as_u64().unwrap_or(0)),
                    human_size(i["unique_bytes"].as_u64().unwrap_or(0)),
                    human_size(i["shared_bytes"].as_u64().unwrap_or(0)),
                );
            }
            println!(
                "{} names, {} snapshots: {} logical in {} stored ({:.1}x)",
                refs.len(),
                live.len(),
                human_size(logical),
                human_size(stored),
                logical as f64 / stored.max(1) as f64
            );
            print_volume_lines(summary["volumes"].as_array().map_or(&[], |v| v.as_slice()));
        }
    }
    Ok(0)
}

pub fn run_gc(args: GcArgs) -> Result<u8> {
    if let Some(remote) = &args.remote {
        return crate::cmd_remote::run_gc_remote(remote, &args.grace, args.dry_run, args.output);
    }
    let store = open_store(Access::Exclusive)?;
    let r = gc(
        &store,
        GcOptions {
            repack_below: args.repack_below,
            dry_run: args.dry_run,
        },
    )?;
    match args.output {
        Output::Json => print_json(&r)?,
        Output::Human => println!(
            "{} snapshots live, {} removed; {} packs: {} deleted, {} repacked into {}; {} -> {}",
            r.live_snapshots,
            r.removed_snapshots,
            r.packs_before,
            r.packs_deleted,
            r.packs_repacked,
            r.packs_written,
            human_size(r.bytes_before),
            human_size(r.bytes_after)
        ),
    }
    Ok(0)
}

/// Prints each snapshot of `affected` and its first 20 problems.
pub fn print_affected(affected: &BTreeMap<String, Vec<String>>, what: &str) {
    for (snap, problems) in affected {
        println!("{snap} {what}:");
        for p in problems.iter().take(20) {
            println!("  {p}");
        }
        if problems.len() > 20 {
            println!("  ... {} more", problems.len() - 20);
        }
    }
}

pub fn run_verify(args: VerifyArgs) -> Result<u8> {
    if let Some(name) = &args.remote {
        return crate::cmd_remote::run_verify_remote(name, args.output);
    }
    let store = open_store(Access::Read)?;
    let r = verify(&store)?;
    match args.output {
        Output::Json => print_json(&r)?,
        Output::Human => {
            for (id, why) in &r.damaged {
                println!("damaged chunk {id}: {why}");
            }
            for (path, why) in &r.damaged_packs {
                println!("damaged pack {path}: {why}");
            }
            print_affected(&r.affected, "is damaged");
            println!(
                "{} packs, {} chunks ({}) checked, {} snapshots: {}",
                r.packs,
                r.chunks_ok,
                human_size(r.bytes),
                r.snapshots,
                if r.is_clean() { "ok" } else { "DAMAGED" }
            );
        }
    }
    let _ = std::io::stdout().flush();
    Ok(if r.is_clean() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_bash() {
        assert_eq!(
            expand_braces("web-{01..03}").unwrap(),
            ["web-01", "web-02", "web-03"]
        );
        assert_eq!(expand_braces("a{8..10}b").unwrap(), ["a8b", "a9b", "a10b"]);
        assert_eq!(expand_braces("plain").unwrap(), ["plain"]);
        assert!(expand_braces("x{3..1}").is_err());
        assert!(expand_braces("x{a..b}").is_err());
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(time_text(0), "1970-01-01 00:00:00");
        assert_eq!(time_text(1_763_769_600), "2025-11-22 00:00:00");
    }
}
