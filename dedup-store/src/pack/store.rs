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
//! wait for a flush. [`PackStore::put_encoded`] takes frames compressed on the caller's threads.
//!
//! Several processes may write one store: each fills its own temporary pack, locked (flock)
//! while open, and opening removes only temporary files whose lock nobody holds; index files
//! are named without ever replacing one ([`crate::index`]). A process sees what others stored
//! after it opened through [`PackStore::refresh`], which `get` runs before reporting a chunk
//! missing. Deleting packs (GC) is left to [`crate::store`], which excludes every other user.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::{EncodedFrame, FrameCache, PackId, PackReader, PackWriter};
use crate::chunk::{ChunkId, ChunkStore};
use crate::crypt::{IdHasher, Keys};
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
    level: i32,
    /// An encrypted store's keys: frames sealed, chunk ids keyed.
    keys: Option<Arc<Keys>>,
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
        Self::open_with_settings(root, frame_target, super::ZSTD_LEVEL)
    }

    /// Like [`PackStore::open`] with frames of `frame_target` plaintext bytes compressed at zstd
    /// `level` (a store's config sets both).
    pub fn open_with_settings(root: &Path, frame_target: usize, level: i32) -> Result<PackStore> {
        Self::open_keyed(root, frame_target, level, None)
    }

    /// Like [`PackStore::open_with_settings`] for an encrypted store (`keys`): data frames are
    /// sealed, map nodes go to metadata frames, chunk ids are keyed.
    pub fn open_keyed(
        root: &Path,
        frame_target: usize,
        level: i32,
        keys: Option<Arc<Keys>>,
    ) -> Result<PackStore> {
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
                if super::remove_stale_temp(&path) {
                    report.removed_temp.push(path);
                }
                continue;
            }
            let Some(id) = name.strip_suffix(".pack").and_then(PackId::from_hex) else {
                continue;
            };
            match PackReader::open_keyed(id, &path, keys.clone()) {
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
        // Another process may have written a pack (and its index file) after the listing.
        let unlisted: Vec<PackId> = covered
            .iter()
            .filter(|id| !readers.contains_key(id))
            .copied()
            .collect();
        for id in &unlisted {
            if let Ok(r) =
                PackReader::open_keyed(*id, &packs_dir.join(id.file_name()), keys.clone())
            {
                readers.insert(*id, Arc::new(r));
            }
        }
        let present: HashSet<PackId> = readers.keys().copied().collect();
        let mut missing: Vec<PackId> = covered.difference(&present).copied().collect();
        missing.sort();
        if !missing.is_empty() {
            // Index entries name packs that are gone: a gc was interrupted between deleting
            // packs and rebuilding the index. Finish it.
            let mut ids: Vec<&PackId> = readers.keys().collect();
            ids.sort();
            index = ChunkIndex::rebuild(
                &index_dir,
                ids.into_iter().map(|id| (*id, readers[id].entries())),
            )?;
            report.index_rebuilt.get_or_insert_with(|| {
                format!(
                    "{} packs it named are gone (an interrupted gc)",
                    missing.len()
                )
            });
        }
        report.missing_packs = missing;
        Ok(PackStore {
            packs_dir,
            index: RwLock::new(index),
            readers: RwLock::new(readers),
            open: Mutex::new(OpenPack::default()),
            cache: FrameCache::new(super::frame_cache_bytes()),
            report,
            frame_target,
            level,
            keys,
        })
    }

    /// The keys of an encrypted store.
    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    /// A new pack writer in `dir` with this store's frame size, level and keys.
    pub fn new_writer(&self, dir: &Path) -> Result<PackWriter> {
        Ok(
            PackWriter::with_settings(dir, self.frame_target, self.level)?
                .sealed_with(self.keys.clone()),
        )
    }

    /// Plaintext bytes of a frame.
    pub fn frame_target(&self) -> usize {
        self.frame_target
    }

    /// zstd level of frames.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// The store directory (the parent of `packs/`).
    pub fn root(&self) -> &Path {
        self.packs_dir.parent().unwrap_or(&self.packs_dir)
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

    /// Picks up packs and index files that other processes wrote since this store was opened.
    /// A pack no index file covers yet (its writer is between the two steps) is indexed in
    /// memory from its own index.
    pub fn refresh(&self) -> Result<()> {
        self.index.write().map_err(|_| poisoned())?.refresh()?;
        let rd = std::fs::read_dir(&self.packs_dir).map_err(|source| Error::Io {
            path: self.packs_dir.clone(),
            op: "list packs",
            source,
        })?;
        let mut fresh = Vec::new();
        {
            let readers = self.readers.read().map_err(|_| poisoned())?;
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".pack").and_then(PackId::from_hex)
                    && !readers.contains_key(&id)
                {
                    fresh.push((id, ent.path()));
                }
            }
        }
        for (id, path) in fresh {
            let Ok(reader) = PackReader::open_keyed(id, &path, self.keys.clone()) else {
                continue;
            };
            let reader = Arc::new(reader);
            let mut index = self.index.write().map_err(|_| poisoned())?;
            if !index.covered_packs().contains(&id) {
                index.insert_pack(id, reader.entries());
            }
            self.readers
                .write()
                .map_err(|_| poisoned())?
                .insert(id, reader);
        }
        Ok(())
    }

    /// Writes `chunks` (id, bytes, whether a map node) into new packs, stored even when the store holds them elsewhere (gc moves
    /// live chunks out of packs it is about to delete), durable and indexed when this returns.
    /// Returns the number of packs written.
    pub fn write_packs(
        &self,
        chunks: impl IntoIterator<Item = Result<(ChunkId, Vec<u8>, bool)>>,
    ) -> Result<usize> {
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        self.finish_open(&mut open, true)?;
        let mut written = 0;
        let mut writer: Option<PackWriter> = None;
        let mut finish = |w: PackWriter| -> Result<()> {
            self.adopt(w)?;
            written += 1;
            Ok(())
        };
        for item in chunks {
            let (id, data, meta) = item?;
            if writer.is_none() {
                writer = Some(self.new_writer(&self.packs_dir)?);
            }
            if let Some(w) = writer.as_mut() {
                if meta {
                    w.add_meta(id, &data)?;
                } else {
                    w.add(id, &data)?;
                }
            }
            if writer.as_ref().is_some_and(PackWriter::is_full)
                && let Some(w) = writer.take()
            {
                finish(w)?;
            }
        }
        if let Some(w) = writer.take() {
            if w.is_empty() {
                w.abandon();
            } else {
                finish(w)?;
            }
        }
        self.index
            .write()
            .map_err(|_| poisoned())?
            .persist_delta()?;
        Ok(written)
    }

    /// Deletes packs (gc, with every other user of the store excluded), then rebuilds the index
    /// from the packs that remain. A crash between the two leaves index entries naming deleted
    /// packs; [`PackStore::open`] rebuilds the index when it finds such entries.
    pub fn delete_packs(&self, ids: &[PackId]) -> Result<()> {
        let _open = self.open.lock().map_err(|_| poisoned())?;
        let mut readers = self.readers.write().map_err(|_| poisoned())?;
        for id in ids {
            let path = self.packs_dir.join(id.file_name());
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Io {
                        path,
                        op: "delete pack",
                        source,
                    });
                }
            }
            readers.remove(id);
        }
        super::sync_dir(&self.packs_dir)?;
        let mut sorted: Vec<&PackId> = readers.keys().collect();
        sorted.sort();
        let rebuilt = ChunkIndex::rebuild(
            &self.root().join("index"),
            sorted.into_iter().map(|id| (*id, readers[id].entries())),
        )?;
        *self.index.write().map_err(|_| poisoned())? = rebuilt;
        Ok(())
    }

    /// Adds a frame compressed by the caller (see [`EncodedFrame::encode`]) whose chunks are
    /// `plain`; like [`ChunkStore::put`], durable after the next flush. Chunks of the frame that
    /// the store already holds are stored again (harmless: the index keeps one, GC drops the
    /// other); callers leave out chunks that [`ChunkStore::contains`] reports.
    pub fn put_encoded(&self, frame: &EncodedFrame, plain: &[u8]) -> Result<()> {
        let mut open = self.open.lock().map_err(|_| poisoned())?;
        if open
            .writer
            .as_ref()
            .is_some_and(|w| w.len() + frame.chunks.len() + 1 >= super::MAX_PACK_CHUNKS as usize)
        {
            self.finish_open(&mut open, false)?;
        }
        if open.writer.is_none() {
            open.writer = Some(self.new_writer(&self.packs_dir)?);
        }
        if let Some(w) = open.writer.as_mut() {
            w.add_encoded(frame)?;
        }
        for &(id, off, len) in &frame.chunks {
            let range = off as usize..off as usize + len as usize;
            if let Some(data) = plain.get(range) {
                open.pending.insert(id, data.to_vec());
            }
        }
        if open.writer.as_ref().is_some_and(|w| w.is_full()) {
            self.finish_open(&mut open, false)?;
        }
        Ok(())
    }

    /// A stored chunk's plaintext length and its share of the stored bytes of its frame
    /// (frames are compressed as a whole), for space accounting.
    pub fn chunk_footprint(&self, id: &ChunkId) -> Result<Option<(u32, f64)>> {
        Ok(self.durable(id)?.map(|(reader, loc)| {
            let stored = reader.frames().get(loc.frame as usize).map_or(0.0, |f| {
                f64::from(f.stored_len) * f64::from(loc.len) / f64::from(f.plain_len.max(1))
            });
            (loc.len, stored)
        }))
    }

    /// Bytes of the intact pack files.
    pub fn packed_bytes(&self) -> u64 {
        self.packs().iter().map(|p| p.file_len()).sum()
    }

    /// The intact pack that durably holds `id` and where in it, if any (push reads chunks and
    /// picks packs to upload through this).
    pub fn locate(&self, id: &ChunkId) -> Result<Option<(Arc<PackReader>, crate::pack::ChunkLoc)>> {
        self.durable(id)
    }

    /// Calls `f` with the bytes of chunk `id`: from the open pack's pending chunks, else from
    /// its pack (checked against its id; the index refreshed once when it is not found, since
    /// another process may have stored it since this store was opened).
    fn with_found<R>(&self, id: &ChunkId, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        if let Some(data) = self.open.lock().map_err(|_| poisoned())?.pending.get(id) {
            return Ok(f(data));
        }
        let (reader, loc) = match self.durable(id)? {
            Some(found) => found,
            None => {
                self.refresh()?;
                self.durable(id)?.ok_or(Error::MissingChunk(*id))?
            }
        };
        reader.with_chunk(id, loc, Some(&self.cache), f)
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

    /// Finishes a pack (durable, named) and makes it readable and indexed (in memory; the
    /// index file is written by the next `persist_delta`).
    fn adopt(&self, w: PackWriter) -> Result<()> {
        let done = w.finish()?;
        let reader = Arc::new(PackReader::open_keyed(
            done.id,
            &done.path,
            self.keys.clone(),
        )?);
        self.readers
            .write()
            .map_err(|_| poisoned())?
            .insert(done.id, reader);
        self.index
            .write()
            .map_err(|_| poisoned())?
            .insert_pack(done.id, &done.entries);
        Ok(())
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
                self.adopt(w)?;
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

impl PackStore {
    fn put_kind(&self, id: ChunkId, data: &[u8], meta: bool) -> Result<bool> {
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
            open.writer = Some(self.new_writer(&self.packs_dir)?);
        }
        if let Some(w) = open.writer.as_mut() {
            if meta {
                w.add_meta(id, data)?;
            } else {
                w.add(id, data)?;
            }
        }
        open.pending.insert(id, data.to_vec());
        if open.writer.as_ref().is_some_and(|w| w.is_full()) {
            // Durable now; the index file is written at the next flush (or rebuilt at open).
            self.finish_open(&mut open, false)?;
        }
        Ok(true)
    }
}

impl ChunkStore for PackStore {
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.put_kind(id, data, false)
    }

    fn put_meta(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.put_kind(id, data, true)
    }

    fn id_hasher(&self) -> IdHasher {
        IdHasher::of(self.keys.as_deref())
    }

    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.with_found(id, <[u8]>::to_vec)
    }

    fn read_into(&self, id: &ChunkId, len: usize, from: usize, dst: &mut [u8]) -> Result<()> {
        self.with_found(id, |data| crate::chunk::copy_part(id, data, len, from, dst))?
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
