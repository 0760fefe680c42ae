//! The store: snapshots (manifests), names (refs) and locks over a [`PackStore`].
//!
//! Layout of a store directory:
//!
//! ```text
//! config                 {"format": "vmnest store", "version": 1, "chunk_size": 65536}
//! packs/<hex>.pack       chunk packs            (crate::pack)
//! index/<seq>.idx        chunk index            (crate::index)
//! snapshots/<hex>        manifests, named by the BLAKE3 of their bytes (manifest.rs)
//! refs/<name>            "<snapshot hex>\n": a name's current snapshot
//! locks/store.lock       flock: shared by every user, exclusive for gc
//! locks/refs.lock        flock: held while a ref is read, decided on and replaced
//! volumes/<name>/        writable copy-on-write volumes over snapshots (volume.rs)
//! ```
//!
//! Commit order, so a crash at any instant leaves the store consistent: chunks and map nodes
//! durable (pack fsync, then index), then the manifest (fsync, rename, directory fsync), then the
//! ref (the same). A crash before the ref leaves an unreferenced manifest, which `gc` removes;
//! a crash inside the pack store is repaired at the next open ([`PackStore::open`]'s report says
//! what was rolled back or finished).
//!
//! Concurrency: every process that uses a store holds `locks/store.lock` shared; `gc` holds it
//! exclusively, so it never runs while an import, clone or export does (it waits for them, and
//! they wait for it). Several writers at once are safe: packs and index files never collide
//! (see [`crate::pack::PackStore`]), manifests are content-named, and a ref is replaced under
//! `locks/refs.lock` after re-reading it, so two imports of one name both land, one the parent
//! of the other.

pub mod disk;
pub mod gc;
pub mod import;
pub mod manifest;
pub mod stream;
pub mod verify;
pub mod volume;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use manifest::{Layout, Manifest, Member, MemberKind, SnapshotId, check_name};

use crate::crypt::{Argon2Costs, EncryptionConfig, KeySource, Keys};
use crate::error::{Error, Result};
use crate::pack::{OpenReport, PackStore, create_locked_temp, io_err, sync_dir, temp_path};

/// Default chunk size of disks (chosen by measurement: docs/chunk-size.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 16 << 10;
/// Default zstd level of pack frames (docs/chunk-size.md).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// Default plaintext bytes of a pack frame (docs/chunk-size.md).
pub const DEFAULT_FRAME_SIZE: u32 = 1 << 20;
/// Largest config file accepted.
const MAX_CONFIG_LEN: u64 = 64 << 10;
/// Longest lineage followed (parents of parents).
pub const MAX_LINEAGE: usize = 1 << 20;

/// How a store is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read snapshots; the store must exist.
    Read,
    /// Add snapshots and names; the store is created when missing.
    Write,
    /// Alone (gc): waits until no other process uses the store.
    Exclusive,
}

/// The store's settings, fixed at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Always `vmnest store`.
    pub format: String,
    /// Layout version (1).
    pub version: u32,
    /// Chunk size of disks imported without `--chunk-size`.
    pub chunk_size: u32,
    /// zstd level of pack frames.
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// Plaintext bytes of a pack frame (what a read decompresses).
    #[serde(default = "default_frame_size")]
    pub frame_size: u32,
    /// Present in an encrypted store: how its key is kept (never the key). See [`crate::crypt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionConfig>,
}

fn default_level() -> i32 {
    DEFAULT_COMPRESSION_LEVEL
}

fn default_frame_size() -> u32 {
    DEFAULT_FRAME_SIZE
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            format: "vmnest store".into(),
            version: 1,
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            frame_size: DEFAULT_FRAME_SIZE,
            encryption: None,
        }
    }
}

/// How [`Store::commit`] may change a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefUpdate {
    /// Create the name or add a version on top of its current snapshot (import).
    NewVersion,
    /// Create the name; fail when it exists (clone).
    CreateOnly,
}

/// A snapshot found by [`Store::resolve`].
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The name the spec used.
    pub name: String,
    /// The snapshot.
    pub id: SnapshotId,
    /// Its manifest.
    pub manifest: Manifest,
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    chunks: Arc<PackStore>,
    config: StoreConfig,
    keys: Option<Arc<Keys>>,
    _lock: File,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io_err(path, "create directory"))
}

/// A locked temporary file in `dir` holding `bytes`, fsynced (removed again if that fails).
fn synced_temp(dir: &Path, bytes: &[u8]) -> Result<(PathBuf, File)> {
    let tmp = temp_path(dir, "obj");
    let mut f = create_locked_temp(&tmp, "create")?;
    let done = crate::fault::check("write", &tmp)
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| crate::fault::check("sync", &tmp))
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp, "write"));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok((tmp, f))
}

/// Writes `bytes` to `path` atomically: a locked temporary file, fsync, rename, directory fsync.
pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let (tmp, f) = synced_temp(dir, bytes)?;
    let renamed = crate::fault::check("rename", &tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err(path, "rename"));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed?;
    drop(f);
    sync_dir(dir)
}

/// Creates `path` (in directory `dir`) holding `bytes` unless it exists: a temporary file in
/// `dir`, fsynced, hard-linked to `path` (which fails when `path` exists, so an existing file is
/// never replaced), then `dir` fsynced. Returns false when `path` existed.
pub(crate) fn write_new_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<bool> {
    let (tmp, f) = synced_temp(dir, bytes)?;
    let linked =
        match crate::fault::check("link", &tmp).and_then(|()| std::fs::hard_link(&tmp, path)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err(path, "link")(e)),
        };
    drop(f);
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        sync_dir(dir)?;
        return Ok(true);
    }
    Ok(false)
}

/// Reads at most `cap` bytes of `path`; a longer file is an error naming it.
pub(crate) fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path).map_err(io_err(path, "open"))?;
    let mut bytes = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "read"))?;
    if bytes.len() as u64 > cap {
        return Err(Error::corrupt(
            path.display().to_string(),
            0,
            format!("{what} is larger than {cap} bytes"),
        ));
    }
    Ok(bytes)
}

fn lock_file(path: &Path, exclusive: bool, on_wait: &mut dyn FnMut()) -> Result<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path, "open lock"))?;
    let tried = if exclusive {
        f.try_lock()
    } else {
        f.try_lock_shared()
    };
    if tried.is_err() {
        on_wait();
        let locked = if exclusive { f.lock() } else { f.lock_shared() };
        locked.map_err(io_err(path, "lock"))?;
    }
    Ok(f)
}

impl Store {
    /// Opens the store at `root`; see [`Access`]. Blocks while another process holds a lock
    /// that conflicts.
    pub fn open(root: &Path, access: Access) -> Result<Store> {
        Self::open_with(root, access, &mut || {})
    }

    /// Like [`Store::open`]; `on_wait` is called once before blocking on another process.
    pub fn open_with(root: &Path, access: Access, on_wait: &mut dyn FnMut()) -> Result<Store> {
        Self::open_full(root, access, None, None, None, on_wait)
    }

    /// Like [`Store::open_with`], with the key of an encrypted store (ignored by a plain one).
    /// An encrypted store opened without a key is an error naming it.
    pub fn open_keyed(
        root: &Path,
        access: Access,
        key: Option<&KeySource>,
        on_wait: &mut dyn FnMut(),
    ) -> Result<Store> {
        Self::open_full(root, access, None, key, None, on_wait)
    }

    /// Creates the store at `root` with `config` when it does not exist, then opens it for
    /// writing.
    pub fn create(root: &Path, config: StoreConfig) -> Result<Store> {
        Self::open_full(root, Access::Write, Some(config), None, None, &mut || {})
    }

    /// Creates an encrypted store at `root` (which must not hold one): a new master key kept
    /// as `key` says (see [`Keys::create`]), or, with `shared` (the encryption section of a
    /// remote or another store), that store's key, which `key` must unlock. The config is
    /// written atomically (temporary file, fsync, rename, directory fsync).
    pub fn create_encrypted(
        root: &Path,
        mut config: StoreConfig,
        key: &KeySource,
        costs: Argon2Costs,
        shared: Option<&EncryptionConfig>,
    ) -> Result<Store> {
        if root.join("config").exists() {
            return Err(Error::InvalidArgument(format!(
                "a store exists at {} already",
                root.display()
            )));
        }
        let (section, keys) = match shared {
            Some(section) => (section.clone(), Keys::unlock(root, section, key)?),
            None => Keys::create(key, costs)?,
        };
        config.encryption = Some(section.clone());
        // The keys just made or unlocked serve the open (no second argon2 run), as long as
        // the config it finds is the one written here.
        Self::open_full(
            root,
            Access::Write,
            Some(config),
            Some(key),
            Some((section, keys)),
            &mut || {},
        )
    }

    fn open_full(
        root: &Path,
        access: Access,
        config: Option<StoreConfig>,
        key: Option<&KeySource>,
        unlocked: Option<(EncryptionConfig, Keys)>,
        on_wait: &mut dyn FnMut(),
    ) -> Result<Store> {
        let config_path = root.join("config");
        if !config_path.exists() {
            if access == Access::Read {
                return Err(Error::InvalidArgument(format!(
                    "no store at {} (vmnest import creates one)",
                    root.display()
                )));
            }
            mkdir(root)?;
            let bytes = serde_json::to_vec_pretty(&config.unwrap_or_default())
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            write_atomic(root, &config_path, &bytes)?;
        }
        let bytes = read_capped(&config_path, MAX_CONFIG_LEN, "store config")?;
        let config: StoreConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(config_path.display().to_string(), 0, e.to_string()))?;
        if config.format != "vmnest store" || config.version != 1 {
            return Err(Error::corrupt(
                config_path.display().to_string(),
                0,
                format!(
                    "not a version 1 vmnest store ({:?} {})",
                    config.format, config.version
                ),
            ));
        }
        crate::map::MapRoot::new(None, 0, config.chunk_size)
            .map_err(|e| Error::corrupt(config_path.display().to_string(), 0, e.to_string()))?;
        for dir in ["locks", "snapshots", "refs"] {
            mkdir(&root.join(dir))?;
        }
        let lock = lock_file(
            &root.join("locks/store.lock"),
            access == Access::Exclusive,
            on_wait,
        )?;
        if !(1..=22).contains(&config.compression_level)
            || !(4096..=crate::pack::MAX_FRAME_LEN).contains(&config.frame_size)
        {
            return Err(Error::corrupt(
                config_path.display().to_string(),
                0,
                "compression level must be 1..=22 and frame size 4 KiB..16 MiB",
            ));
        }
        let keys = match (&config.encryption, key) {
            (None, _) => None,
            (Some(section), _) if unlocked.as_ref().is_some_and(|(s, _)| s == section) => {
                unlocked.map(|(_, k)| Arc::new(k))
            }
            (Some(section), Some(key)) => Some(Arc::new(Keys::unlock(root, section, key)?)),
            (Some(_), None) => {
                return Err(Error::InvalidArgument(format!(
                    "store {} is encrypted: give its key with --key-file or --passphrase-file \
                     (or VMNEST_KEY_FILE / VMNEST_PASSPHRASE)",
                    root.display()
                )));
            }
        };
        let chunks = Arc::new(PackStore::open_keyed(
            root,
            config.frame_size as usize,
            config.compression_level,
            keys.clone(),
        )?);
        // The root too: a config rewritten by `key change` goes through a temporary there.
        for dir in ["", "snapshots", "refs"] {
            Self::remove_stale_temps(&root.join(dir));
        }
        Ok(Store {
            root: root.to_path_buf(),
            chunks,
            config,
            keys,
            _lock: lock,
        })
    }

    /// Whether `root` holds an encrypted store (its config has an `encryption` section); false
    /// when there is no store or its config does not parse (opening then says why).
    pub fn is_encrypted(root: &Path) -> bool {
        read_capped(&root.join("config"), MAX_CONFIG_LEN, "store config")
            .ok()
            .and_then(|b| serde_json::from_slice::<StoreConfig>(&b).ok())
            .is_some_and(|c| c.encryption.is_some())
    }

    fn remove_stale_temps(dir: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for ent in rd.flatten() {
                if ent.file_name().to_string_lossy().ends_with(".tmp") {
                    crate::pack::remove_stale_temp(&ent.path());
                }
            }
        }
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The chunk store.
    pub fn chunks(&self) -> &Arc<PackStore> {
        &self.chunks
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The keys of an encrypted store (None for a plain one).
    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    /// Keeps an encrypted store's master key another way: under the passphrase `new`, or in
    /// the key file `new` ([`Keys::change`]); the config section's generation goes up by one.
    /// The config is replaced atomically (temporary file, fsync, rename, directory fsync), so a
    /// crash leaves the old config or the new one, each whole; an error after the rename says
    /// that the new key is in place. Chunk ids and sealed bytes do not change. Open the store
    /// [`Access::Exclusive`] (no other process holds the old config in hand meanwhile). Remotes
    /// keep the key wrapped the old way until the next push replaces their `keys` object.
    pub fn change_key(&mut self, new: &KeySource, costs: Argon2Costs) -> Result<EncryptionConfig> {
        let (Some(section), Some(keys)) = (&self.config.encryption, &self.keys) else {
            return Err(Error::InvalidArgument(format!(
                "store {} is not encrypted",
                self.root.display()
            )));
        };
        let changed = keys.change(section, new, costs)?;
        let mut config = self.config.clone();
        config.encryption = Some(changed.clone());
        let bytes = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let path = self.root.join("config");
        if let Err(e) = write_atomic(&self.root, &path, &bytes) {
            let now = read_capped(&path, MAX_CONFIG_LEN, "store config").ok();
            if now.as_deref() == Some(&bytes[..]) {
                self.config = config;
                return Err(Error::InvalidArgument(format!(
                    "store {}: the config holds the new key already, but making that durable \
                     failed ({e}): the new passphrase or key file opens the store",
                    self.root.display()
                )));
            }
            return Err(e);
        }
        self.config = config;
        Ok(changed)
    }

    /// What opening the chunk store found and repaired.
    pub fn report(&self) -> &OpenReport {
        self.chunks.report()
    }

    fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.root.join("snapshots").join(id.to_hex())
    }

    /// Reads, checks (its name is its hash) and parses a manifest.
    pub fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let object = format!("snapshots/{}", id.to_hex());
        let bytes = read_capped(&path, manifest::MAX_MANIFEST_LEN as u64, "manifest").map_err(
            |e| match e {
                Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                    Error::InvalidArgument(format!("snapshot {} is not in the store", id.short()))
                }
                other => other,
            },
        )?;
        if SnapshotId::of(&bytes) != *id {
            return Err(Error::corrupt(
                object,
                0,
                "manifest does not match its name",
            ));
        }
        let m = Manifest::decode(&object, &bytes)?;
        self.unseal(&object, m)
    }

    /// A manifest as read from the store, with its sealed fields opened and its MAC checked
    /// in an encrypted store; as it is in a plain one.
    pub fn unseal(&self, object: &str, mut m: Manifest) -> Result<Manifest> {
        if let Some(k) = &self.keys {
            k.open_manifest(object, &mut m)?;
        }
        Ok(m)
    }

    /// The bytes of manifest `id`, checked against its name (push sends them unchanged).
    pub fn manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let path = self.manifest_path(id);
        let bytes = read_capped(&path, manifest::MAX_MANIFEST_LEN as u64, "manifest")?;
        if SnapshotId::of(&bytes) != *id {
            return Err(Error::corrupt(
                format!("snapshots/{}", id.to_hex()),
                0,
                "manifest does not match its name",
            ));
        }
        Ok(bytes)
    }

    /// Whether the manifest of `id` exists.
    pub fn has_manifest(&self, id: &SnapshotId) -> bool {
        self.manifest_path(id).exists()
    }

    /// Writes a manifest (durable) and returns its id. Its chunks must be durable already.
    pub fn write_manifest(&self, m: &Manifest) -> Result<SnapshotId> {
        m.validate()
            .map_err(|reason| Error::InvalidArgument(format!("manifest: {reason}")))?;
        let bytes = match &self.keys {
            Some(k) => {
                let mut sealed = m.clone();
                k.seal_manifest(&mut sealed)?;
                sealed.encode()
            }
            None => m.encode(),
        };
        // Sealing makes origin and labels about twice as long: never write what no reader
        // would take back.
        if bytes.len() > manifest::MAX_MANIFEST_LEN {
            return Err(Error::InvalidArgument(format!(
                "manifest of {} bytes is over {} (labels or origin too long)",
                bytes.len(),
                manifest::MAX_MANIFEST_LEN
            )));
        }
        let id = SnapshotId::of(&bytes);
        let path = self.manifest_path(&id);
        if !path.exists() {
            write_atomic(&self.root.join("snapshots"), &path, &bytes)?;
        }
        Ok(id)
    }

    /// Stores manifest bytes received from elsewhere (pull) unchanged, so the snapshot keeps its
    /// id; they must hash to `id` and parse. Everything they refer to must be durable already.
    pub fn import_manifest(&self, id: &SnapshotId, bytes: &[u8]) -> Result<Manifest> {
        let object = format!("snapshots/{}", id.to_hex());
        if SnapshotId::of(bytes) != *id {
            return Err(Error::corrupt(
                object,
                0,
                "manifest does not match its name",
            ));
        }
        let m = self.unseal(&object, Manifest::decode(&object, bytes)?)?;
        let path = self.manifest_path(id);
        if !path.exists() {
            write_atomic(&self.root.join("snapshots"), &path, bytes)?;
        }
        Ok(m)
    }

    /// Every manifest in the store (referenced or not).
    pub fn snapshots(&self) -> Result<Vec<SnapshotId>> {
        let dir = self.root.join("snapshots");
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&dir)
            .map_err(io_err(&dir, "list snapshots"))?
            .flatten()
        {
            if let Some(id) = SnapshotId::from_hex(&ent.file_name().to_string_lossy()) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes a manifest (gc).
    pub(crate) fn remove_manifest(&self, id: &SnapshotId) -> Result<()> {
        let path = self.manifest_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, "remove manifest")(e)),
        }
    }

    fn ref_path(&self, name: &str) -> Result<PathBuf> {
        check_name(name).map_err(Error::InvalidArgument)?;
        Ok(self.root.join("refs").join(name))
    }

    /// The current snapshot of `name`.
    pub fn head(&self, name: &str) -> Result<Option<SnapshotId>> {
        let path = self.ref_path(name)?;
        let bytes = match read_capped(&path, 256, "ref") {
            Ok(b) => b,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let text = std::str::from_utf8(&bytes).unwrap_or("");
        SnapshotId::from_hex(text.trim_end_matches('\n'))
            .map(Some)
            .ok_or_else(|| Error::corrupt(format!("refs/{name}"), 0, "not a snapshot id"))
    }

    /// Every name and its snapshot, sorted by name.
    pub fn refs(&self) -> Result<BTreeMap<String, SnapshotId>> {
        let dir = self.root.join("refs");
        let mut out = BTreeMap::new();
        for ent in std::fs::read_dir(&dir)
            .map_err(io_err(&dir, "list refs"))?
            .flatten()
        {
            let name = ent.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue;
            }
            if let Some(id) = self.head(&name)? {
                out.insert(name, id);
            }
        }
        Ok(out)
    }

    fn set_ref(&self, name: &str, id: &SnapshotId) -> Result<()> {
        let path = self.ref_path(name)?;
        write_atomic(
            &self.root.join("refs"),
            &path,
            format!("{}\n", id.to_hex()).as_bytes(),
        )
    }

    fn refs_lock(&self) -> Result<File> {
        lock_file(&self.root.join("locks/refs.lock"), true, &mut || {})
    }

    /// Commits a snapshot under `name`: under the refs lock, reads the name's current snapshot,
    /// builds the manifest with `make(current)` (which sets the parent), writes it, then moves
    /// the name to it. Everything the manifest refers to must be durable before this is called.
    pub fn commit(
        &self,
        name: &str,
        update: RefUpdate,
        make: impl FnOnce(Option<SnapshotId>) -> Result<Manifest>,
    ) -> Result<SnapshotId> {
        check_name(name).map_err(Error::InvalidArgument)?;
        let _guard = self.refs_lock()?;
        let current = self.head(name)?;
        if update == RefUpdate::CreateOnly && current.is_some() {
            return Err(Error::InvalidArgument(format!("{name} exists already")));
        }
        let mut manifest = make(current)?;
        manifest.name = name.to_string();
        if manifest.time == 0 {
            manifest.time = now();
        }
        let id = self.write_manifest(&manifest)?;
        self.set_ref(name, &id)?;
        Ok(id)
    }

    /// Points `name` at an existing snapshot (`CreateOnly`: the name must not exist).
    pub fn point(&self, name: &str, id: &SnapshotId, update: RefUpdate) -> Result<()> {
        let _guard = self.refs_lock()?;
        if update == RefUpdate::CreateOnly && self.head(name)?.is_some() {
            return Err(Error::InvalidArgument(format!("{name} exists already")));
        }
        self.set_ref(name, id)
    }

    /// A manifest for a new snapshot made now (the name and parent are set by [`Store::commit`]).
    pub fn new_manifest(origin: String, members: Vec<Member>) -> Manifest {
        Manifest {
            version: manifest::MANIFEST_VERSION,
            name: String::new(),
            parent: None,
            time: now(),
            origin,
            labels: BTreeMap::new(),
            members,
            sealed: None,
            mac: None,
        }
    }

    /// Removes one snapshot's manifest (an older version; the lineage of its descendants
    /// then ends there). Its data goes at the next gc.
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let _guard = self.refs_lock()?;
        if self.refs()?.values().any(|h| h == id) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {} is the current snapshot of a name",
                id.short()
            )));
        }
        if let Some((vol, _)) = volume::bases(self)?.into_iter().find(|(_, b)| b == id) {
            return Err(Error::InvalidArgument(format!(
                "snapshot {} is the base of volume {vol}",
                id.short()
            )));
        }
        self.remove_manifest(id)?;
        sync_dir(&self.root.join("snapshots"))
    }

    /// Removes a name; its snapshots stay until `gc` finds nothing refers to them.
    pub fn remove_ref(&self, name: &str) -> Result<SnapshotId> {
        let _guard = self.refs_lock()?;
        let Some(id) = self.head(name)? else {
            return Err(Error::InvalidArgument(format!("no snapshot named {name}")));
        };
        let path = self.ref_path(name)?;
        std::fs::remove_file(&path).map_err(io_err(&path, "remove ref"))?;
        sync_dir(&self.root.join("refs"))?;
        Ok(id)
    }

    /// The snapshot and its ancestors, newest first, as far as their manifests exist.
    pub fn lineage(&self, id: &SnapshotId) -> Result<Vec<(SnapshotId, Manifest)>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut next = Some(*id);
        while let Some(id) = next {
            if !seen.insert(id) || out.len() >= MAX_LINEAGE || !self.has_manifest(&id) {
                break;
            }
            let m = self.manifest(&id)?;
            next = m.parent;
            out.push((id, m));
        }
        Ok(out)
    }

    /// Finds a snapshot: `NAME` (its current snapshot), `NAME@ID` (a snapshot of its lineage,
    /// by a prefix of at least 4 hex digits of its id), `NAME@~N` (N versions back), or `@ID`
    /// (any snapshot in the store).
    pub fn resolve(&self, spec: &str) -> Result<Resolved> {
        let (name, sel) = match spec.split_once('@') {
            Some((n, s)) => (n, Some(s)),
            None => (spec, None),
        };
        if name.is_empty() {
            let prefix = sel.unwrap_or("");
            let id = self.find_by_prefix(prefix, self.snapshots()?.into_iter())?;
            let manifest = self.manifest(&id)?;
            return Ok(Resolved {
                name: manifest.name.clone(),
                id,
                manifest,
            });
        }
        let head = self
            .head(name)?
            .ok_or_else(|| Error::InvalidArgument(format!("no snapshot named {name}")))?;
        let id = match sel {
            None | Some("") | Some("latest") => head,
            Some(s) if s.starts_with('~') => {
                let back: usize = s[1..]
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("{spec}: '~N' takes a number")))?;
                let lineage = self.lineage(&head)?;
                lineage.get(back).map(|(id, _)| *id).ok_or_else(|| {
                    Error::InvalidArgument(format!("{spec}: {name} has {} versions", lineage.len()))
                })?
            }
            Some(prefix) => {
                let lineage = self.lineage(&head)?;
                self.find_by_prefix(prefix, lineage.into_iter().map(|(id, _)| id))?
            }
        };
        let manifest = self.manifest(&id)?;
        Ok(Resolved {
            name: name.to_string(),
            id,
            manifest,
        })
    }

    fn find_by_prefix(
        &self,
        prefix: &str,
        ids: impl Iterator<Item = SnapshotId>,
    ) -> Result<SnapshotId> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "{prefix:?}: a snapshot is named by at least 4 hex digits of its id"
            )));
        }
        let found: Vec<SnapshotId> = ids.filter(|id| id.to_hex().starts_with(&prefix)).collect();
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::InvalidArgument(format!("no snapshot {prefix}"))),
            _ => Err(Error::InvalidArgument(format!(
                "{prefix} names {} snapshots; give more digits",
                found.len()
            ))),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
