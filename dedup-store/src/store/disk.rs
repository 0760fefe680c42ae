//! A stored disk as a [`BlockDevice`] (and an [`Image`], so `info`, `map`, `compare` and
//! `convert` take `store:NAME[@SNAP]` like a file).
//!
//! A read walks the map once for its range ([`Map::iter_range`]: zero runs never load a node)
//! and copies each chunk out of its pack frame (decoded frames are cached by the pack store).
//! The map's depth depends only on the disk and chunk size, so a clone 50 versions deep reads
//! exactly like its gold image: there is no chain to walk.

use std::path::PathBuf;
use std::sync::Arc;

use image_format::blockdev::{self, BlockDevice, Caps, Extent, ExtentKind};
use image_format::{Image, ImageInfo};

use crate::chunk::{ChunkId, ChunkStore};
use crate::map::{Map, MapRoot};
use crate::pack::PackStore;
use crate::remote::RemoteChunks;
use crate::store::{Layout, Member, Resolved, Store};

/// Decoded map nodes a stored disk keeps (about 8 KiB each): the leaves of a 16 GiB disk at
/// 64 KiB chunks.
pub const DISK_NODE_CACHE: usize = 1024;
/// Most map runs one `block_status` call looks at.
const STATUS_RUNS: usize = 4096;

/// Where a stored disk's chunks come from: the local store, or a remote read by range GETs.
#[derive(Clone, Debug)]
pub enum DiskChunks {
    /// The local store's packs.
    Local(Arc<PackStore>),
    /// A remote's packs (`vmnest restore`).
    Remote(Arc<RemoteChunks>),
}

impl DiskChunks {
    fn inner(&self) -> &dyn ChunkStore {
        match self {
            DiskChunks::Local(p) => p.as_ref(),
            DiskChunks::Remote(r) => r.as_ref(),
        }
    }
}

impl ChunkStore for DiskChunks {
    fn put(&self, id: ChunkId, data: &[u8]) -> crate::Result<bool> {
        self.inner().put(id, data)
    }
    fn get(&self, id: &ChunkId) -> crate::Result<Vec<u8>> {
        self.inner().get(id)
    }
    fn contains(&self, id: &ChunkId) -> crate::Result<bool> {
        self.inner().contains(id)
    }
    fn flush(&self) -> crate::Result<()> {
        self.inner().flush()
    }
    fn read_into(
        &self,
        id: &ChunkId,
        len: usize,
        from: usize,
        dst: &mut [u8],
    ) -> crate::Result<()> {
        self.inner().read_into(id, len, from, dst)
    }
    fn id_hasher(&self) -> crate::crypt::IdHasher {
        self.inner().id_hasher()
    }
    fn put_meta(&self, id: ChunkId, data: &[u8]) -> crate::Result<bool> {
        self.inner().put_meta(id, data)
    }
}

/// A disk member of a stored snapshot, readable.
#[derive(Debug)]
pub struct StoredDisk {
    /// Held for the store's lock: gc waits while a stored disk is open.
    _store: Option<Arc<Store>>,
    map: Map<DiskChunks>,
    size: u64,
    chunk_size: u64,
    /// `store:NAME@SNAP` and the store directory, for `info`.
    label: String,
    store_dir: PathBuf,
    snapshot: String,
    member: String,
}

impl StoredDisk {
    /// Opens member `member` (default: the first disk) of a resolved snapshot.
    pub fn open(
        store: &Arc<Store>,
        snap: &Resolved,
        member: Option<&str>,
    ) -> crate::Result<StoredDisk> {
        Self::open_on(
            DiskChunks::Local(store.chunks().clone()),
            Some(store.clone()),
            snap,
            member,
            format!("store:{}@{}", snap.name, snap.id.short()),
            store.root().to_path_buf(),
        )
    }

    /// Opens member `member` of a snapshot of a remote, read through `chunks` (`vmnest
    /// restore`; no local copy).
    pub fn open_remote(
        chunks: Arc<RemoteChunks>,
        snap: &Resolved,
        member: Option<&str>,
    ) -> crate::Result<StoredDisk> {
        let remote = chunks.remote().clone();
        Self::open_on(
            DiskChunks::Remote(chunks),
            None,
            snap,
            member,
            format!("remote:{}:{}@{}", remote.name(), snap.name, snap.id.short()),
            PathBuf::from(remote.url()),
        )
    }

    fn open_on(
        chunks: DiskChunks,
        store: Option<Arc<Store>>,
        snap: &Resolved,
        member: Option<&str>,
        label: String,
        store_dir: PathBuf,
    ) -> crate::Result<StoredDisk> {
        let m: &Member = match member {
            Some(name) => snap.manifest.member(name).ok_or_else(|| {
                crate::Error::InvalidArgument(format!(
                    "{}@{} has no member {name} (it has: {})",
                    snap.name,
                    snap.id.short(),
                    member_names(snap)
                ))
            })?,
            None => snap.manifest.primary().ok_or_else(|| {
                crate::Error::InvalidArgument(format!("{} has no members", snap.name))
            })?,
        };
        let Layout::Map { chunk_size, root } = m.layout else {
            return Err(crate::Error::InvalidArgument(format!(
                "member {} of {} is a stream: export it (`vmnest export {} --member {}`)",
                m.name, snap.name, snap.name, m.name
            )));
        };
        let root = MapRoot::new(root, m.size, chunk_size)?;
        Ok(StoredDisk {
            _store: store,
            map: Map::with_cache_cap(chunks, root, DISK_NODE_CACHE)?,
            size: m.size,
            chunk_size: u64::from(chunk_size),
            label,
            store_dir,
            snapshot: snap.id.to_hex(),
            member: m.name.clone(),
        })
    }

    /// The member's name.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// The disk's map.
    pub fn root(&self) -> &MapRoot {
        self.map.root()
    }

    fn err(&self, e: crate::Error) -> image_format::Error {
        let e: image_format::Error = e.into();
        match e {
            image_format::Error::Corrupt {
                path,
                structure,
                offset,
                reason,
            } if path.as_os_str().is_empty() => image_format::Error::Corrupt {
                path: PathBuf::from(&self.label),
                structure,
                offset,
                reason,
            },
            other => other,
        }
    }
}

fn member_names(snap: &Resolved) -> String {
    snap.manifest
        .members
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl BlockDevice for StoredDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::EXTENTS | Caps::MULTI_CONN
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> image_format::Result<()> {
        blockdev::check_range(off, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = off + buf.len() as u64;
        let first = off / self.chunk_size;
        let last = (end - 1) / self.chunk_size;
        for run in self.map.iter_range(first, last + 1) {
            let (chunks, id) = run.map_err(|e| self.err(e))?;
            let run_start = (chunks.start * self.chunk_size).max(off);
            let run_end = (chunks.end * self.chunk_size).min(end);
            let dst = &mut buf[(run_start - off) as usize..(run_end - off) as usize];
            match id {
                None => dst.fill(0),
                Some(id) => {
                    let chunk_start = chunks.start * self.chunk_size;
                    let from = (run_start - chunk_start) as usize;
                    let want = chunk_start
                        .saturating_add(self.chunk_size)
                        .min(self.size)
                        .saturating_sub(chunk_start) as usize;
                    self.map
                        .store()
                        .read_into(&id, want, from, dst)
                        .map_err(|e| self.err(e))?;
                }
            }
        }
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> image_format::Result<Extent> {
        blockdev::check_status_range(off, len, self.size)?;
        let first = off / self.chunk_size;
        let last = (off + len - 1) / self.chunk_size;
        let mut kind = None;
        let mut reach = off;
        // Bounded work per call: a caller asking about the whole disk gets the first runs.
        for run in self.map.iter_range(first, last + 1).take(STATUS_RUNS) {
            let (chunks, id) = run.map_err(|e| self.err(e))?;
            let k = if id.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Unallocated
            };
            if *kind.get_or_insert(k) != k {
                break;
            }
            reach = (chunks.end * self.chunk_size).min(off + len);
        }
        Ok(Extent::new(
            kind.unwrap_or(ExtentKind::Unallocated),
            (reach - off).max(1).min(len),
        ))
    }
}

impl Image for StoredDisk {
    fn format(&self) -> &'static str {
        "vmnest-store"
    }

    fn info(&self) -> image_format::Result<ImageInfo> {
        let mut info = ImageInfo {
            filename: PathBuf::from(&self.label),
            format: "vmnest-store".into(),
            virtual_size: self.size,
            actual_size: 0,
            cluster_size: Some(self.chunk_size),
            files: vec![self.store_dir.clone()],
            ..Default::default()
        };
        info.specific("snapshot", self.snapshot.clone());
        info.specific("member", self.member.clone());
        info.specific("map-depth", self.map.root().depth);
        if let Some(root) = self.map.root().root {
            info.specific("map-root", root.to_hex());
        }
        Ok(info)
    }
}
