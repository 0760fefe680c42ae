//! [`PackStore`]: a [`ChunkStore`] over a store directory.
//!
//! Layout: `<root>/packs/<hex>.pack` (see [`crate::pack`]) and `<root>/index/<seq>.idx` (see
//! [`crate::index`]). Temporary files (`*.tmp`) are leftovers of a crash and are removed at open.
//!
//! Write order, so a crash at any instant leaves a consistent store: `put` appends to an open
//! pack under a temporary name (nothing is claimed durable); `flush` finishes it (fsync, rename,
//! fsync directory), *then* writes its entries as an index file (fsync, rename, fsync directory).
//! At open, a pack no index file covers (crash between the two) is read through its own index
//! and added to the delta; a pack that does not parse is reported damaged and its chunks are
//! treated as absent (a later `put` stores them again); a missing or damaged index is rebuilt
//! from the packs.
//!
//! Concurrency: every method takes `&self`. Lookups take the index and reader-map read locks
//! only, and pack reads happen with no lock held (readers are `Arc`s; the frame cache has its
//! own short lock). `put` and `flush` serialise on the open-pack mutex, which is held while a
//! frame is compressed and appended and while a pack is finished (fsync, rename): a put may
//! wait for a flush. One process writes a store at a time: opening removes `*.tmp` files, which
//! would break a second writer's open pack.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::{FRAME_CACHE_BYTES, FrameCache, PackId, PackReader, PackWriter};
use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::index::ChunkIndex;

/// What [`PackStore::open`] found and did.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Packs opened intact.
    pub packs: usize,
    /// Temporary files removed (unfinished packs and index files of a crash).
    pub removed_temp: Vec<PathBuf>,
    /// Packs that do not parse, with the error; their chunks are treated as absent.
    pub damaged_packs: Vec<(PathBuf, String)>,
    /// Intact packs no index file covered; their entries were added to the index.
    pub unindexed_packs: Vec<PackId>,
    /// Why the index was rebuilt from the packs, if it was.
    pub index_rebuilt: Option<String>,
    /// Packs the index names that are not present intact.
    pub missing_packs: Vec<PackId>,
}

#[derive(Debug, Default)]
pub(super) struct OpenPack {
    pub(super) writer: Option<PackWriter>,
    pending: HashMap<ChunkId, Vec<u8>>,
}

/// A chunk store over a directory of packs and an index.
#[derive(Debug)]
pub struct PackStore {
    packs_dir: PathBuf,
    pub(super) index: RwLock<ChunkIndex>,
    readers: RwLock<HashMap<PackId, Arc<PackReader>>>,
    pub(super) open: Mutex<OpenPack>,
    cache: FrameCache,
    report: OpenReport,
    frame_target: usize,
}

fn poisoned() -> Error {
    Error::InvalidArgument("pack store lock poisoned".into())
}

impl PackStore {
    /// Opens (or creates) the store at `root`, recovering from a crash; see [`OpenReport`].
    pub fn open(root: &Path) -> Result<PackStore> {
        Self::open_with_frame_target(root, super::FRAME_TARGET)
    }

    /// Like [`PackStore::open`] with frames of `frame_target` plaintext bytes (tests).
    pub fn open_with_frame_target(root: &Path, frame_target: usize) -> Result<PackStore> {
        let packs_dir = root.join("packs");
        let index_dir = root.join("index");
        std::fs::create_dir_all(&packs_dir).map_err(|source| Error::Io {
            path: packs_dir.clone(),
            op: "create packs dir",
            source,
        })?;
        let mut report = OpenReport::default();
        let mut readers = HashMap::new();
        let rd = std::fs::read_dir(&packs_dir).map_err(|source| Error::Io {
            path: packs_dir.clone(),
            op: "list packs",
            source,
        })?;
        for ent in rd {
            let ent = ent.map_err(|source| Error::Io {
                path: packs_dir.clone(),
                op: "list packs",
                source,
            })?;
            let name = ent.file_name().to_string_lossy().into_owned();
            let path = ent.path();
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(&path);
                report.removed_temp.push(path);
                continue;
            }
            let Some(id) = name.strip_suffix(".pack").and_then(PackId::from_hex) else {
                continue;
            };
            match PackReader::open(id, &path) {
                Ok(r) => {
                    readers.insert(id, Arc::new(r));
                }
                Err(e) => report.damaged_packs.push((path, e.to_string())),
            }
        }
        report.packs = readers.len();
        let mut index = match ChunkIndex::open(&index_dir) {
            Ok((index, removed)) => {
                report.removed_temp.extend(removed);
                index
            }
            Err(e) => {
                report.index_rebuilt = Some(e.to_string());
                let mut ids: Vec<&PackId> = readers.keys().collect();
                ids.sort();
                ChunkIndex::rebuild(
                    &index_dir,
                    ids.into_iter().map(|id| (*id, readers[id].entries())),
                )?
            }
        };
        let covered = index.covered_packs();
        let mut unindexed: Vec<PackId> = readers
            .keys()
            .filter(|id| !covered.contains(id))
            .copied()
            .collect();
        unindexed.sort();
        for id in &unindexed {
            index.insert_pack(*id, readers[id].entries());
        }
        if !unindexed.is_empty() {
            index.persist_delta()?;
        }
        report.unindexed_packs = unindexed;
        let present: HashSet<PackId> = readers.keys().copied().collect();
        let mut missing: Vec<PackId> = covered.difference(&present).copied().collect();
        missing.sort();
        report.missing_packs = missing;
        Ok(PackStore {
            packs_dir,
            index: RwLock::new(index),
            readers: RwLock::new(readers),
            open: Mutex::new(OpenPack::default()),
            cache: FrameCache::new(FRAME_CACHE_BYTES),
            report,
            frame_target,
        })
    }

    /// What opening found.
    pub fn report(&self) -> &OpenReport {
        &self.report
    }

    /// The frame cache.
    pub fn cache(&self) -> &FrameCache {
        &self.cache
    }

    /// The intact packs.
    pub fn packs(&self) -> Vec<Arc<PackReader>> {
        self.readers
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Where `id` is durably stored in an intact pack, if anywhere.
    fn durable(&self, id: &ChunkId) -> Result<Option<(Arc<PackReader>, crate::pack::ChunkLoc)>> {
        let locs = self.index.read().map_err(|_| poisoned())?.lookup_all(id);
        if locs.is_empty() {
            return Ok(None);
        }
        let readers = self.readers.read().map_err(|_| poisoned())?;
        Ok(locs
            .into_iter()
            .find_map(|l| readers.get(&l.pack).map(|r| (r.clone(), l.loc))))
    }

    /// Finishes the open pack (durable) and records its entries; the caller holds `open`.
    ///
    /// The pending chunks are dropped first: if finishing fails they are not in the store (the
    /// error goes to the caller of `flush`, which therefore covers nothing), and a later `put`
    /// stores them again.
    pub(super) fn finish_open(&self, open: &mut OpenPack, persist_index: bool) -> Result<()> {
        open.pending.clear();
        if let Some(w) = open.writer.take() {
            if w.is_empty() {
                w.abandon();
            } else {
                let done = w.finish()?;
                let reader = Arc::new(PackReader::open(done.id, &done.path)?);
                self.readers
                    .write()
                    .map_err(|_| poisoned())?
                    .insert(done.id, reader);
                self.index
                    .write()
                    .map_err(|_| poisoned())?
                    .insert_pack(done.id, &done.entries);
            }
        }
        if persist_index {
            self.index
                .write()
                .map_err(|_| poisoned())?
                .persist_delta()?;
        }
        Ok(())
    }
}

impl ChunkStore for PackStore {
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        if self.durable(&id)?.is_some() {
            return Ok(false);
        }
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        if open.pending.contains_key(&id) {
            return Ok(false);
        }
        // A flush may have made it durable since the check above.
        if self.durable(&id)?.is_some() {
            return Ok(false);
        }
        if open.writer.is_none() {
            open.writer = Some(PackWriter::with_frame_target(
                &self.packs_dir,
                self.frame_target,
            )?);
        }
        if let Some(w) = open.writer.as_mut() {
            w.add(id, data)?;
        }
        open.pending.insert(id, data.to_vec());
        if open.writer.as_ref().is_some_and(|w| w.is_full()) {
            // Durable now; the index file is written at the next flush (or rebuilt at open).
            self.finish_open(&mut open, false)?;
        }
        Ok(true)
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if let Some(data) = self.open.lock().map_err(|_| poisoned())?.pending.get(id) {
            return Ok(data.clone());
        }
        match self.durable(id)? {
            Some((reader, loc)) => reader.read_at(id, loc, Some(&self.cache)),
            None => Err(Error::MissingChunk(*id)),
        }
    }

    fn contains(&self, id: &ChunkId) -> Result<bool> {
        if self
            .open
            .lock()
            .map_err(|_| poisoned())?
            .pending
            .contains_key(id)
        {
            return Ok(true);
        }
        Ok(self.durable(id)?.is_some())
    }

    fn flush(&self) -> Result<()> {
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        self.finish_open(&mut open, true)
    }
}
