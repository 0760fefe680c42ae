//! Writable copy-on-write volumes over stored snapshots.
//!
//! A volume is a disk member of a stored snapshot (its base) plus a local write log. Clients
//! write into the log; reads merge the log's overlay with the base; [`Volume::commit`] turns
//! base + log into a new snapshot and rebases the volume on it. Layout, in the store directory:
//!
//! ```text
//! volumes/<NAME>/volume     JSON (VolumeFile): base snapshot, member, size, chunk size, log name
//! volumes/<NAME>/log-<N>    the write log over that base (log.rs)
//! volumes/<NAME>/lock       flock, held by the one process that has the volume open; holds its pid
//! ```
//!
//! Durability: a write is appended to the log (not synced); [`BlockDeviceMut::flush`] is an
//! fdatasync of the log, so every write acknowledged before an acknowledged FLUSH survives a
//! crash. At open the log is replayed up to its last valid record; a torn tail is cut off and
//! reported ([`Volume::replay`]).
//!
//! Commit: the touched chunks are rebuilt (base + overlay), stored, and applied to the base map
//! ([`Map::update`]); a manifest whose parent is the base is written and the ref moved
//! ([`Store::commit`]); then a new empty log over the new snapshot is written and synced, and
//! the volume file is replaced atomically to name both (this rename is the rebase's only commit
//! point); the old log is removed last. A crash leaves either the old base with its whole log,
//! or the new base with an empty log. Files the volume file does not name are leftovers of an
//! interrupted commit and are removed at the next open.
//!
//! The store stays open (its shared lock held) while a volume is, so gc never runs under it; gc
//! also keeps every volume's base as a root ([`crate::store::gc::live_snapshots`]).

pub mod log;
pub mod overlay;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use image_format::blockdev::{self, BlockDevice, BlockDeviceMut, Caps, Extent, ExtentKind};
use image_format::{Image, ImageInfo};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkStore, is_zero_chunk};
use crate::crypt::Keys;
use crate::error::{Error, Result};
use crate::map::{Map, MapRoot};
use crate::pack::{io_err, sync_dir};
use crate::store::disk::StoredDisk;
use crate::store::{
    Layout, RefUpdate, Resolved, SnapshotId, Store, check_name, read_capped, write_atomic,
};

use log::{LOG_HEADER_LEN, MAX_RECORD_PAYLOAD, RecordKind};
use overlay::{Overlay, Source};

/// `format` of a volume file.
pub const VOLUME_FORMAT: &str = "vmnest volume";
/// Largest volume file accepted.
const MAX_VOLUME_FILE_LEN: u64 = 64 << 10;
/// Chunk changes applied to the map at once by a commit (bounds a commit's memory).
const COMMIT_BATCH: usize = 1 << 16;
/// Directory of the volumes, in the store.
pub const VOLUMES_DIR: &str = "volumes";

/// The volume file (`volumes/<NAME>/volume`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeFile {
    /// Always [`VOLUME_FORMAT`].
    pub format: String,
    /// Layout version (1).
    pub version: u32,
    /// The snapshot the log is over.
    pub base: SnapshotId,
    /// The name a commit moves.
    pub name: String,
    /// The disk member of the base.
    pub member: String,
    /// Disk size in bytes.
    pub size: u64,
    /// The member's chunk size.
    pub chunk_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// File name of the current log in the volume's directory (`log-<N>`).
    pub log: String,
}

impl VolumeFile {
    fn read(path: &Path) -> Result<VolumeFile> {
        let bytes = read_capped(path, MAX_VOLUME_FILE_LEN, "volume file")?;
        let vf: VolumeFile = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(path.display().to_string(), 0, e.to_string()))?;
        let generation = vf
            .log
            .strip_prefix("log-")
            .and_then(|n| n.parse::<u64>().ok());
        if vf.format != VOLUME_FORMAT || vf.version != 1 || generation.is_none() {
            return Err(Error::corrupt(
                path.display().to_string(),
                0,
                "not a version 1 vmnest volume file",
            ));
        }
        Ok(vf)
    }

    fn generation(&self) -> u64 {
        self.log
            .strip_prefix("log-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// What opening a volume found in its log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Records replayed.
    pub records: u64,
    /// Bytes of the log (header included) after replay.
    pub log_bytes: u64,
    /// A torn tail cut off: its log offset, length and why its first record was refused.
    pub torn: Option<(u64, u64, String)>,
}

/// What a commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The new snapshot (the base, unchanged, when nothing was written).
    pub id: SnapshotId,
    /// The name that was moved.
    pub name: String,
    /// The snapshot the volume was over (the new snapshot's parent).
    pub parent: SnapshotId,
    /// Where the name pointed when it was not at the base (it had moved since the volume was
    /// created); the new snapshot's parent is still the base.
    pub name_was_at: Option<SnapshotId>,
    /// Chunks rebuilt.
    pub chunks: u64,
    /// False when the log was empty (no snapshot made).
    pub changed: bool,
}

/// One volume, for `vmnest volume ls`.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeStatus {
    /// The volume's name.
    pub volume: String,
    /// Its file.
    #[serde(flatten)]
    pub file: VolumeFile,
    /// Bytes of records in its log.
    pub log_bytes: u64,
    /// Process id of the holder, when a process has it open.
    pub in_use_by: Option<u32>,
}

struct State {
    file: VolumeFile,
    base: Arc<StoredDisk>,
    overlay: Overlay,
    log: Arc<File>,
    log_path: PathBuf,
}

/// The pieces of one read and the files they come from.
struct ReadPlan {
    pieces: Vec<overlay::Piece>,
    base: Arc<StoredDisk>,
    log: Arc<File>,
    log_path: PathBuf,
    /// The store's keys, when the log is sealed.
    keys: Option<Arc<Keys>>,
}

impl ReadPlan {
    /// Fills `buf`, which starts at guest offset `off`.
    fn read(&self, buf: &mut [u8], off: u64) -> image_format::Result<()> {
        for p in &self.pieces {
            let dst = &mut buf[(p.start - off) as usize..(p.end - off) as usize];
            match p.source {
                None => self.base.read_at(dst, p.start)?,
                Some(Source::Zero) => dst.fill(0),
                Some(Source::Log(at)) => self.read_log(dst, at)?,
                Some(Source::Sealed {
                    at,
                    payload_at,
                    nonce,
                }) => {
                    let Some(keys) = &self.keys else {
                        return Err(image_format::Error::Corrupt {
                            path: self.log_path.clone(),
                            structure: "volume log",
                            offset: at,
                            reason: "a sealed record, and no key".into(),
                        });
                    };
                    self.read_log(dst, at)?;
                    keys.log_keys().apply(&nonce, at - payload_at, dst);
                }
            }
        }
        Ok(())
    }

    fn read_log(&self, dst: &mut [u8], at: u64) -> image_format::Result<()> {
        self.log
            .read_exact_at(dst, at)
            .map_err(|e| image_format::Error::Io {
                path: self.log_path.clone(),
                op: "read volume log",
                offset: at,
                source: e,
            })
    }
}

struct Append {
    /// Log offset of the next record.
    end: u64,
    /// Set when a commit failed after its commit point: the on-disk state is unknown, so
    /// nothing more is written until the volume is reopened.
    broken: Option<String>,
}

/// An open volume; see the module documentation.
pub struct Volume {
    store: Arc<Store>,
    name: String,
    dir: PathBuf,
    size: u64,
    chunk_size: u64,
    state: RwLock<State>,
    append: Mutex<Append>,
    replay: ReplayReport,
    _lock: File,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn poisoned() -> Error {
    Error::InvalidArgument("volume lock poisoned by a panic".into())
}

/// The directory of volume `name`.
pub fn volume_dir(store: &Store, name: &str) -> Result<PathBuf> {
    check_name(name).map_err(|e| Error::InvalidArgument(format!("volume name: {e}")))?;
    Ok(store.root().join(VOLUMES_DIR).join(name))
}

/// The process id written in a lock file, if any.
fn holder(lock: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(lock)
        .ok()?
        .take(64)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

fn in_use(name: &str, lock: &Path) -> Error {
    match holder(lock) {
        Some(pid) => Error::InvalidArgument(format!(
            "volume {name} is in use by another process (pid {pid})"
        )),
        None => Error::InvalidArgument(format!("volume {name} is in use by another process")),
    }
}

/// Takes the volume's lock, or fails naming the holder.
fn take_lock(name: &str, dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "open lock"))?;
    if f.try_lock().is_err() {
        return Err(in_use(name, &path));
    }
    // Who holds it, for the error another process gets (not synced: it only matters while we
    // run).
    let _ = f.set_len(0);
    let _ = f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);
    let _ = f.flush();
    Ok(f)
}

fn open_log(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path, "open volume log"))
}

/// Creates the empty log `path` over `base`, sealed or not, durable (file and directory).
fn create_log(dir: &Path, path: &Path, base: &SnapshotId, sealed: bool) -> Result<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path, "create volume log"))?;
    crate::fault::check("write", path)
        .and_then(|()| f.write_all_at(&log::header(base, sealed), 0))
        .and_then(|()| crate::fault::check("sync", path))
        .and_then(|()| f.sync_all())
        .map_err(io_err(path, "write volume log"))?;
    sync_dir(dir)?;
    Ok(f)
}

/// What a sealed log's MACs bind a record to besides its position: the volume and the log
/// file, so that records cannot move between volumes or between a volume's logs.
fn log_id(volume: &str, log: &str) -> Vec<u8> {
    format!("{volume}/{log}").into_bytes()
}

/// The file name of `path`, as text.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn write_volume_file(dir: &Path, vf: &VolumeFile) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(vf).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(dir, &dir.join("volume"), &bytes)
}

fn resolved_by_id(store: &Store, id: &SnapshotId, name: &str) -> Result<Resolved> {
    Ok(Resolved {
        name: name.to_string(),
        id: *id,
        manifest: store.manifest(id)?,
    })
}

impl Volume {
    /// Opens volume `name`, creating it over `spec` (`NAME[@SNAP][/MEMBER]`, as
    /// [`Store::resolve`] takes it; default member: the first disk) when it does not exist.
    /// An existing volume must be over the snapshot and member `spec` resolves to, except that
    /// a bare `NAME` (no `@`, no member) equal to the volume's name reuses it whatever its base.
    /// Fails when another process holds the volume.
    pub fn open_or_create(store: Arc<Store>, name: &str, spec: &str) -> Result<Arc<Volume>> {
        let dir = volume_dir(&store, name)?;
        let made_dir = !dir.exists();
        if made_dir {
            // A spec that names nothing leaves no empty volume directory behind.
            store.resolve(spec.split('/').next().unwrap_or(spec))?;
            std::fs::create_dir_all(&dir).map_err(io_err(&dir, "create volume directory"))?;
            sync_dir(&store.root().join(VOLUMES_DIR))?;
            sync_dir(store.root())?;
        }
        let lock = take_lock(name, &dir)?;
        let (snap_spec, member) = match spec.split_once('/') {
            Some((s, m)) => (s, Some(m)),
            None => (spec, None),
        };
        let vf_path = dir.join("volume");
        if vf_path.exists() {
            let vf = VolumeFile::read(&vf_path)?;
            let bare = member.is_none() && !snap_spec.contains('@') && snap_spec == vf.name;
            if !bare {
                let want = store.resolve(snap_spec)?;
                let want_member = match member {
                    Some(m) => m.to_string(),
                    None => want
                        .manifest
                        .primary()
                        .map(|m| m.name.clone())
                        .unwrap_or_default(),
                };
                if want.id != vf.base || want_member != vf.member {
                    return Err(Error::InvalidArgument(format!(
                        "volume {name} exists over {}@{} ({}), not over {spec} ({}); \
                         commit it or remove it (vmnest volume rm {name}) first, or name \
                         another volume",
                        vf.name,
                        vf.base.short(),
                        vf.member,
                        want.id.short()
                    )));
                }
            }
            return Self::open_locked(store, name, dir, lock);
        }
        let snap = store.resolve(snap_spec)?;
        let base = StoredDisk::open(&store, &snap, member)?;
        let member_name = base.member().to_string();
        let Layout::Map { chunk_size, .. } = snap
            .manifest
            .member(&member_name)
            .map(|m| m.layout.clone())
            .ok_or_else(|| Error::InvalidArgument(format!("no member {member_name}")))?
        else {
            return Err(Error::InvalidArgument(format!(
                "member {member_name} is not a disk"
            )));
        };
        // Leftovers of an earlier, interrupted creation.
        remove_unnamed(&dir, None);
        let vf = VolumeFile {
            format: VOLUME_FORMAT.into(),
            version: 1,
            base: snap.id,
            name: snap.name.clone(),
            member: member_name,
            size: base.size(),
            chunk_size,
            created: super::now(),
            log: "log-1".into(),
        };
        create_log(&dir, &dir.join(&vf.log), &snap.id, store.keys().is_some())?;
        write_volume_file(&dir, &vf)?;
        drop(base);
        Self::open_locked(store, name, dir, lock)
    }

    /// Opens the existing volume `name`.
    pub fn open(store: Arc<Store>, name: &str) -> Result<Arc<Volume>> {
        let dir = volume_dir(&store, name)?;
        if !dir.join("volume").exists() {
            return Err(Error::InvalidArgument(format!("no volume named {name}")));
        }
        let lock = take_lock(name, &dir)?;
        Self::open_locked(store, name, dir, lock)
    }

    fn open_locked(store: Arc<Store>, name: &str, dir: PathBuf, lock: File) -> Result<Arc<Volume>> {
        let vf = VolumeFile::read(&dir.join("volume"))?;
        remove_unnamed(&dir, Some(&vf.log));
        let snap = resolved_by_id(&store, &vf.base, &vf.name)?;
        let base = StoredDisk::open(&store, &snap, Some(&vf.member))?;
        if base.size() != vf.size {
            return Err(Error::corrupt(
                dir.join("volume").display().to_string(),
                0,
                format!(
                    "volume size {} but its base member is {} bytes",
                    vf.size,
                    base.size()
                ),
            ));
        }
        let log_path = dir.join(&vf.log);
        let file = open_log(&log_path)?;
        let object = log_path.display().to_string();
        let sealing = store.keys().map(|k| log::Sealing {
            keys: k.log_keys(),
            log_id: log_id(name, &vf.log),
            base: vf.base,
        });
        let mut overlay = Overlay::default();
        let end = log::scan(&file, &object, vf.size, sealing.as_ref(), &mut |r| {
            overlay.insert(r.guest_off, r.guest_off + r.len, r.source());
        })?;
        if end.base != vf.base {
            return Err(Error::corrupt(
                object,
                8,
                format!(
                    "log is over snapshot {}, the volume over {}",
                    end.base.short(),
                    vf.base.short()
                ),
            ));
        }
        let mut replay = ReplayReport {
            records: end.records,
            log_bytes: end.valid_end,
            torn: None,
        };
        if end.torn_bytes > 0 {
            crate::fault::check("write", &log_path)
                .and_then(|()| file.set_len(end.valid_end))
                .and_then(|()| crate::fault::check("sync", &log_path))
                .and_then(|()| file.sync_all())
                .map_err(io_err(&log_path, "cut the torn tail of a volume log"))?;
            replay.torn = Some((
                end.valid_end,
                end.torn_bytes,
                end.torn_reason.unwrap_or_default(),
            ));
        }
        Ok(Arc::new(Volume {
            store,
            name: name.to_string(),
            dir,
            size: vf.size,
            chunk_size: u64::from(vf.chunk_size),
            state: RwLock::new(State {
                file: vf,
                base: Arc::new(base),
                overlay,
                log: Arc::new(file),
                log_path,
            }),
            append: Mutex::new(Append {
                end: end.valid_end,
                broken: None,
            }),
            replay,
            _lock: lock,
        }))
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume file as it is now (its base changes at each commit).
    pub fn file(&self) -> Result<VolumeFile> {
        Ok(self.state.read().map_err(|_| poisoned())?.file.clone())
    }

    /// What replaying the log at open found.
    pub fn replay(&self) -> &ReplayReport {
        &self.replay
    }

    /// Bytes of records in the log now.
    pub fn log_bytes(&self) -> Result<u64> {
        let a = self.append.lock().map_err(|_| poisoned())?;
        Ok(a.end - LOG_HEADER_LEN)
    }

    /// Whether the log holds writes (a commit would make a new snapshot).
    pub fn is_dirty(&self) -> Result<bool> {
        Ok(self.log_bytes()? > 0)
    }

    fn append_record(&self, kind: RecordKind, off: u64, len: u64, data: &[u8]) -> Result<()> {
        let mut a = self.append.lock().map_err(|_| poisoned())?;
        if let Some(why) = &a.broken {
            return Err(Error::InvalidArgument(format!(
                "volume {} must be reopened: {why}",
                self.name
            )));
        }
        let (file, path, base) = {
            let s = self.state.read().map_err(|_| poisoned())?;
            (s.log.clone(), s.log_path.clone(), s.file.base)
        };
        let at = a.end;
        let fault = crate::fault::check("write", &path);
        let (written, source, end) = match self.store.keys() {
            None => {
                let header = log::record_header(kind, off, len, data);
                let payload_at = at + header.len() as u64;
                let written = fault
                    .and_then(|()| file.write_all_at(&header, at))
                    .and_then(|()| file.write_all_at(data, payload_at));
                let end = payload_at + data.len() as u64;
                (written, Source::Log(payload_at), end)
            }
            Some(keys) => {
                // Header and ciphertext in one buffer, one write.
                let sealing = log::Sealing {
                    keys: keys.log_keys(),
                    log_id: log_id(&self.name, &file_name(&path)),
                    base,
                };
                let mut record = Vec::new();
                let nonce = log::seal_record(&sealing, at, kind, off, len, data, &mut record)?;
                let payload_at = at + log::SEALED_RECORD_HEADER_LEN;
                let written = fault.and_then(|()| file.write_all_at(&record, at));
                let source = Source::Sealed {
                    at: payload_at,
                    payload_at,
                    nonce,
                };
                (written, source, at + record.len() as u64)
            }
        };
        if let Err(e) = written {
            // Cut what may have been written; replay would refuse it anyway.
            let _ = file.set_len(at);
            return Err(io_err(&path, "append to volume log")(e));
        }
        a.end = end;
        let source = match kind {
            RecordKind::Data => source,
            RecordKind::Zero => Source::Zero,
        };
        self.state
            .write()
            .map_err(|_| poisoned())?
            .overlay
            .insert(off, off + len, source);
        Ok(())
    }

    /// What a read of `off..end` needs, taken under the state lock so the I/O runs without
    /// it. The plan stays valid after the lock is released: log records are never rewritten,
    /// and a commit replaces the base and the log with new ones, leaving the old ones readable
    /// (open, and kept from gc by the store lock) until the plan is dropped.
    fn plan(&self, s: &State, off: u64, end: u64) -> ReadPlan {
        ReadPlan {
            pieces: s.overlay.pieces(off, end),
            base: s.base.clone(),
            log: s.log.clone(),
            log_path: s.log_path.clone(),
            keys: self.store.keys().cloned(),
        }
    }

    /// Commits the volume (see the module documentation) and returns the new snapshot.
    pub fn commit(&self, message: Option<&str>) -> Result<SnapshotId> {
        self.commit_report(message).map(|c| c.id)
    }

    /// Like [`Volume::commit`], saying what happened.
    pub fn commit_report(&self, message: Option<&str>) -> Result<Committed> {
        let mut a = self.append.lock().map_err(|_| poisoned())?;
        if let Some(why) = &a.broken {
            return Err(Error::InvalidArgument(format!(
                "volume {} must be reopened: {why}",
                self.name
            )));
        }
        let s = self.state.read().map_err(|_| poisoned())?;
        let vf = s.file.clone();
        if s.overlay.is_empty() && a.end == LOG_HEADER_LEN {
            return Ok(Committed {
                id: vf.base,
                name: vf.name.clone(),
                parent: vf.base,
                name_was_at: None,
                chunks: 0,
                changed: false,
            });
        }
        crate::fault::check("sync", &s.log_path)
            .and_then(|()| s.log.sync_data())
            .map_err(io_err(&s.log_path, "fsync volume log"))?;
        let chunks = self.store.chunks();
        let mut root: MapRoot = *s.base.root();
        let mut batch: Vec<(u64, Option<ChunkId>)> = Vec::new();
        let mut rebuilt = 0u64;
        let mut buf = vec![0u8; self.chunk_size as usize];
        let mut last: Option<u64> = None;
        for (start, end, src) in s.overlay.segments() {
            let first = start / self.chunk_size;
            let past = (end - 1) / self.chunk_size + 1;
            for index in first..past {
                if last.is_some_and(|l| l >= index) {
                    continue;
                }
                last = Some(index);
                let c_start = index * self.chunk_size;
                let c_end = (c_start + self.chunk_size).min(self.size);
                let whole_zero = src == Source::Zero && start <= c_start && end >= c_end;
                let id = if whole_zero {
                    None
                } else {
                    let data = &mut buf[..(c_end - c_start) as usize];
                    self.plan(&s, c_start, c_end)
                        .read(data, c_start)
                        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                    if is_zero_chunk(data) {
                        None
                    } else {
                        let id = chunks.id_hasher().id(data);
                        chunks.put(id, data)?;
                        Some(id)
                    }
                };
                rebuilt += 1;
                batch.push((index, id));
                if batch.len() >= COMMIT_BATCH {
                    root = Map::update(chunks, &root, batch.drain(..))?;
                }
            }
        }
        root = Map::update(chunks, &root, batch.drain(..))?;
        chunks.flush()?;

        let base_manifest = self.store.manifest(&vf.base)?;
        let mut manifest = base_manifest.clone();
        for m in &mut manifest.members {
            if m.name == vf.member
                && let Layout::Map { root: r, .. } = &mut m.layout
            {
                *r = root.root;
            }
        }
        manifest.parent = Some(vf.base);
        manifest.time = 0;
        manifest.origin = format!("commit volume {}", self.name);
        manifest.labels.remove("message");
        if let Some(text) = message {
            manifest.labels.insert("message".into(), text.to_string());
        }
        let mut name_was_at = None;
        let id = self
            .store
            .commit(&vf.name, RefUpdate::NewVersion, |current| {
                if current != Some(vf.base) {
                    name_was_at = current;
                }
                Ok(manifest)
            })?;

        // Rebase: everything fallible that leaves state untouched comes before the rename.
        let new_snap = resolved_by_id(&self.store, &id, &vf.name)?;
        let new_base = StoredDisk::open(&self.store, &new_snap, Some(&vf.member))?;
        let mut new_vf = vf.clone();
        new_vf.base = id;
        new_vf.log = format!("log-{}", vf.generation() + 1);
        let new_log_path = self.dir.join(&new_vf.log);
        let new_log = create_log(&self.dir, &new_log_path, &id, self.store.keys().is_some())?;
        drop(s);
        if let Err(e) = write_volume_file(&self.dir, &new_vf) {
            // The rename may or may not have happened (or may not survive a power cut): stop
            // writing until a reopen reads which state is on disk.
            a.broken = Some(format!("a commit failed while rebasing: {e}"));
            return Err(e);
        }
        let old_log = {
            let mut s = self.state.write().map_err(|_| poisoned())?;
            let old = s.log_path.clone();
            *s = State {
                file: new_vf,
                base: Arc::new(new_base),
                overlay: Overlay::default(),
                log: Arc::new(new_log),
                log_path: new_log_path,
            };
            old
        };
        a.end = LOG_HEADER_LEN;
        // After the commit point: a leftover log is removed at the next open.
        if std::fs::remove_file(&old_log).is_ok() {
            let _ = sync_dir(&self.dir);
        }
        Ok(Committed {
            id,
            name: vf.name,
            parent: vf.base,
            name_was_at,
            chunks: rebuilt,
            changed: true,
        })
    }
}

/// Removes the files of a volume directory that are not the volume file, the lock, or `keep`
/// (logs of interrupted commits or creations, temporary files).
fn remove_unnamed(dir: &Path, keep: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = false;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        if name == "volume" || name == "lock" || Some(name.as_str()) == keep {
            continue;
        }
        if name.starts_with("log-") {
            removed |= std::fs::remove_file(ent.path()).is_ok();
        } else if name.ends_with(".tmp") {
            removed |= crate::pack::remove_stale_temp(&ent.path());
        }
    }
    if removed {
        let _ = sync_dir(dir);
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::WRITE
            | Caps::FLUSH
            | Caps::FUA
            | Caps::DISCARD
            | Caps::WRITE_ZEROES
            | Caps::EXTENTS
            | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> image_format::Result<()> {
        blockdev::check_range(off, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let plan = {
            let s = self
                .state
                .read()
                .map_err(|_| image_format::Error::from(poisoned()))?;
            self.plan(&s, off, off + buf.len() as u64)
        };
        plan.read(buf, off)
    }

    fn block_status(&self, off: u64, len: u64) -> image_format::Result<Extent> {
        blockdev::check_status_range(off, len, self.size)?;
        let s = self
            .state
            .read()
            .map_err(|_| image_format::Error::from(poisoned()))?;
        if let Some((_, end, src)) = s.overlay.at(off) {
            let kind = match src {
                Source::Log(_) | Source::Sealed { .. } => ExtentKind::Data,
                Source::Zero => ExtentKind::Zero,
            };
            return Ok(Extent::new(kind, (end - off).min(len)));
        }
        let reach = s
            .overlay
            .next_start(off)
            .map_or(len, |n| (n - off).min(len));
        let base = s.base.clone();
        drop(s);
        base.block_status(off, reach)
    }
}

impl BlockDeviceMut for Volume {
    fn write_at(&self, buf: &[u8], off: u64) -> image_format::Result<()> {
        blockdev::check_range(off, buf.len() as u64, self.size)?;
        for (i, part) in buf.chunks(MAX_RECORD_PAYLOAD as usize).enumerate() {
            let at = off + (i as u64) * MAX_RECORD_PAYLOAD;
            self.append_record(RecordKind::Data, at, part.len() as u64, part)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> image_format::Result<()> {
        blockdev::check_range(off, len, self.size)?;
        if len > 0 {
            self.append_record(RecordKind::Zero, off, len, &[])?;
        }
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> image_format::Result<()> {
        // Discarded bytes read as zeros: the committed snapshot then stores nothing for them.
        self.write_zeroes(off, len)
    }

    fn flush(&self) -> image_format::Result<()> {
        let (file, path) = {
            let s = self
                .state
                .read()
                .map_err(|_| image_format::Error::from(poisoned()))?;
            (s.log.clone(), s.log_path.clone())
        };
        crate::fault::check("sync", &path)
            .and_then(|()| file.sync_data())
            .map_err(|e| image_format::Error::from(io_err(&path, "fsync volume log")(e)))
    }
}

impl Image for Volume {
    fn format(&self) -> &'static str {
        "vmnest-volume"
    }

    fn info(&self) -> image_format::Result<ImageInfo> {
        let s = self
            .state
            .read()
            .map_err(|_| image_format::Error::from(poisoned()))?;
        let mut info = ImageInfo {
            filename: PathBuf::from(format!("volume:{}", self.name)),
            format: "vmnest-volume".into(),
            virtual_size: self.size,
            actual_size: s.log.metadata().map_or(0, |m| m.len()),
            cluster_size: Some(self.chunk_size),
            files: vec![self.dir.clone()],
            ..Default::default()
        };
        info.specific("base", s.file.base.to_hex());
        info.specific("name", s.file.name.clone());
        info.specific("member", s.file.member.clone());
        Ok(info)
    }

    fn into_mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        Some(self)
    }
}

/// Every volume of the store, sorted by name.
pub fn list(store: &Store) -> Result<Vec<VolumeStatus>> {
    let dir = store.root().join(VOLUMES_DIR);
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    let mut names: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    for name in names {
        let vdir = dir.join(&name);
        let vf_path = vdir.join("volume");
        if !vf_path.exists() {
            continue;
        }
        let file = VolumeFile::read(&vf_path)?;
        let log_bytes = std::fs::metadata(vdir.join(&file.log))
            .map_or(0, |m| m.len().saturating_sub(LOG_HEADER_LEN));
        let lock = vdir.join("lock");
        let in_use_by = match File::open(&lock) {
            Ok(f) => match f.try_lock_shared() {
                Ok(()) => None,
                Err(_) => Some(holder(&lock).unwrap_or(0)),
            },
            Err(_) => None,
        };
        out.push(VolumeStatus {
            volume: name,
            file,
            log_bytes,
            in_use_by,
        });
    }
    Ok(out)
}

/// The base snapshot of every volume (gc keeps them).
pub fn bases(store: &Store) -> Result<BTreeMap<String, SnapshotId>> {
    Ok(list(store)?
        .into_iter()
        .map(|v| (v.volume, v.file.base))
        .collect())
}

/// Discards volume `name` and its log. Fails when a process holds it.
pub fn remove(store: &Store, name: &str) -> Result<VolumeFile> {
    let dir = volume_dir(store, name)?;
    let vf_path = dir.join("volume");
    if !vf_path.exists() {
        return Err(Error::InvalidArgument(format!("no volume named {name}")));
    }
    let _lock = take_lock(name, &dir)?;
    let vf = VolumeFile::read(&vf_path)?;
    // The volume file goes first: without it, what is left is leftovers.
    std::fs::remove_file(&vf_path).map_err(io_err(&vf_path, "remove volume file"))?;
    sync_dir(&dir)?;
    remove_unnamed(&dir, None);
    let _ = std::fs::remove_file(dir.join("lock"));
    std::fs::remove_dir(&dir).map_err(io_err(&dir, "remove volume directory"))?;
    sync_dir(&store.root().join(VOLUMES_DIR))?;
    Ok(vf)
}

#[cfg(test)]
mod tests;
