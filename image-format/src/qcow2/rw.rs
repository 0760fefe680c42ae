//! In-place writing of an existing qcow2 image: the [`BlockDeviceMut`] of [`Qcow2Image`].
//!
//! # What a write does
//!
//! * Into a normal cluster whose L1 and L2 entries both carry the COPIED flag (refcount 1): the
//!   bytes go straight to the host cluster, without the metadata lock.
//! * Anywhere else (unallocated, zero, compressed, or shared with an internal snapshot: COPIED
//!   clear) the cluster is copied on write: a free host cluster is allocated, filled with what the
//!   guest saw before (backing image, decompressed data, zeros) overlaid with the new bytes, and
//!   the L2 entry is pointed at it; the old host cluster(s) lose one reference. An L2 table
//!   shared with a snapshot (L1 COPIED clear) is copied first the same way.
//! * `write_zeroes` of whole clusters sets the v3 zero flag (or, in v2 without a backing file,
//!   deallocates); partial clusters get zeros written. `discard` deallocates whole clusters (zero
//!   flag when a backing file would show through, nothing in v2 then); partial clusters are
//!   ignored.
//!
//! # Crash safety, without a journal
//!
//! Every metadata change is ordered so that a crash at any point leaves at most leaked clusters:
//!
//! 1. a refcount increase (and the data of a newly allocated cluster, and the contents of a new
//!    L2 table or refcount block) is synced before any L2/L1/refcount-table entry points at it;
//! 2. an L2/L1 entry that stops pointing at a cluster is synced before that cluster's refcount
//!    is decreased;
//! 3. a new refcount table is synced before the header names it, and the header is synced
//!    before the old table is freed.
//!
//! The dirty bit is never set (no lazy refcounts): refcounts on disk are always at least right.
//!
//! New L2 entries are not written at once: the changed table stays in memory (pinned in the L2
//! cache, so reads see it) and its changed entries are written back together, after one
//! `fdatasync` of everything they point at, at the next flush, before any cluster is freed, when
//! more than [`MAX_DIRTY_ENTRIES`] entries or [`MAX_DIRTY_BYTES`] of tables wait, and when the
//! image is dropped. Many allocating writes thus share one sync, as qemu's write-back metadata
//! cache lets them; a crash in between leaves the new clusters counted but unnamed (leaks) and
//! the unflushed writes unseen. [`BlockDeviceMut::flush`] writes back and then `fdatasync`s, which
//! makes every acknowledged write durable.
//!
//! # Concurrency
//!
//! Metadata changes hold one mutex ([`Writer::state`]). Reads and in-place writes hold the
//! image's `in_flight` lock shared for the time between looking up a host offset and using it;
//! before a host cluster loses a reference (and so may be reused), the metadata path takes that
//! lock exclusively once, after the entry that named the cluster is gone, so no request still
//! uses the old host offset.
//!
//! # Overlap check
//!
//! L1 and L2 entries are untrusted: at a writable open [`super::overlap::walk`] (the walker
//! `check` uses) fills a [`MetaMap`] with every metadata cluster. Before a request touches a
//! cluster on the metadata path, the cluster must lie inside the file, hold no metadata, be
//! referenced, and, where the copied flag is set, have refcount 1 and no other entry of its
//! table naming it; the L2 table must be exactly an L2 table of the map. Otherwise the whole
//! request is refused with a corruption error before anything is written. A table that passes
//! whole is marked checked; the in-place path only writes through checked tables and looks each
//! host cluster up in the map again. New L2 tables, refcount blocks and refcount tables are
//! added to the map, freed clusters removed, and the allocator refuses a "free" cluster the map
//! holds.
//!
//! # Limits
//!
//! Images with extended L2 entries (subclusters), dirty or corrupt images, images whose backing
//! file was not opened, and external data files are refused at a writable open. The
//! autoclear feature bits are cleared at a writable open, as the spec asks of a program that
//! does not maintain them (persistent bitmaps then stop being trusted by qemu).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::blockdev::{BlockDevice, BlockDeviceMut, check_range};
use crate::error::{Error, Result};

use super::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::map::{COPIED, Cluster, L2_COMPRESSED, L2_ZERO, OFFSET_MASK, decode_l2};
use super::overlap::{Found, MetaKind, MetaMap, walk};
use super::{Backing, Qcow2Image};

/// Refcount blocks kept in memory (they are written through, so this only bounds reads).
const MAX_CACHED_BLOCKS: usize = 256;
/// L2 entries changed in memory before they are written back without waiting for a flush.
const MAX_DIRTY_ENTRIES: usize = 4096;
/// Bytes of L2 tables held changed in memory (pinned in the cache) before a write-back; at most
/// half the cache.
const MAX_DIRTY_BYTES: u64 = super::io::L2_CACHE_BYTES / 2;
/// Header offset of `refcount_table_offset` (u64) followed by `refcount_table_clusters` (u32).
const HEADER_REFCOUNT_TABLE: u64 = 48;
/// Header offset of the autoclear feature bits (version 3).
const HEADER_AUTOCLEAR: u64 = 88;
/// Clusters past the end of the file that may carry a refcount (leaks of interrupted
/// allocations) before the allocator calls the refcounts corrupt.
const MAX_COUNTED_PAST_END: u64 = 1 << 16;
/// Host offsets must fit the L2 entry's offset field.
const MAX_HOST_OFFSET: u64 = OFFSET_MASK;

/// The in-place write state of an image opened writable.
#[derive(Debug)]
pub(super) struct Writer {
    state: Mutex<State>,
    /// A metadata update failed half-way: memory and file may disagree, so nothing more is
    /// written until the image is reopened (which reads the file again).
    failed: AtomicBool,
    /// Entries per refcount block.
    per_block: u64,
    refcount_bits: u32,
    /// The clusters holding metadata: guest data never goes there (changed only with `state`
    /// held). With them, the L2 tables of the active L1 whose every entry was found to name
    /// clusters of its own (refcount 1 where copied, no other entry of the table, not
    /// metadata, inside the file): the lock-free in-place path writes only through these.
    meta: RwLock<MetaMap>,
}

#[derive(Debug)]
struct State {
    rt_offset: u64,
    rt_clusters: u64,
    /// The refcount table: refcount block offsets (0: no block).
    rt: Vec<u64>,
    /// Refcount blocks by file offset.
    blocks: HashMap<u64, Vec<u8>>,
    /// Cluster index where the search for a free cluster starts.
    free_hint: u64,
    /// L2 tables changed since the last write-back (pinned in the cache meanwhile): the table
    /// as it now is and the range of entries changed.
    dirty: BTreeMap<u64, (Arc<[u64]>, usize, usize)>,
    /// The entries the ranges of `dirty` span, summed (what a write-back writes).
    dirty_entries: usize,
}

/// What a metadata-path request does to its range.
#[derive(Clone, Copy)]
enum Op<'a> {
    Write(&'a [u8]),
    Zero,
    Discard,
}

/// Validates that `img` can be written in place, loads the refcount table and finds the
/// clusters that hold metadata.
pub(super) fn open_writer(img: &Qcow2Image) -> Result<Writer> {
    let (file, h, backing) = (&img.file, &img.header, &img.backing);
    let path = file.path();
    let refuse = |reason: String| Error::ReadOnly {
        path: path.to_path_buf(),
        reason,
    };
    if h.extended_l2() {
        return Err(Error::unsupported(
            "writing qcow2 images with extended L2 entries (subclusters) in place",
        )
        .in_file(path));
    }
    if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        return Err(refuse(
            "the qcow2 dirty bit is set (not closed cleanly); repair the refcounts first \
             (qemu-img check -r all)"
                .into(),
        ));
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(refuse(
            "the qcow2 corrupt bit is set; repair the image first (qemu-img check -r all)".into(),
        ));
    }
    if let Backing::NotOpened(name) = backing {
        return Err(refuse(format!(
            "backing file {name:?} was not opened; copy-on-write needs it"
        )));
    }
    let cs = h.cluster_size();
    let rt_clusters = u64::from(h.refcount_table_clusters);
    // Bounded by MAX_REFCOUNT_TABLE_BYTES (checked in parse_header).
    let rt = super::io::read_table(
        file,
        h.refcount_table_offset,
        (rt_clusters * cs) as usize,
        "qcow2 refcount table",
    )?;
    for (i, &b) in rt.iter().enumerate() {
        if b & (cs - 1) != 0 || b > MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                "qcow2 refcount table",
                h.refcount_table_offset + i as u64 * 8,
                format!("refcount block offset {b:#x} is not cluster-aligned"),
            )
            .in_file(path));
        }
    }
    let meta = metadata_map(img, &rt)?;
    if h.version >= 3 && h.autoclear_features != 0 {
        file.write_all_at(&0u64.to_be_bytes(), HEADER_AUTOCLEAR)?;
        file.sync_data()?;
    }
    let refcount_bits = h.refcount_bits();
    Ok(Writer {
        state: Mutex::new(State {
            rt_offset: h.refcount_table_offset,
            rt_clusters,
            rt,
            blocks: HashMap::new(),
            free_hint: 0,
            dirty: BTreeMap::new(),
            dirty_entries: 0,
        }),
        failed: AtomicBool::new(false),
        per_block: cs * 8 / u64::from(refcount_bits),
        refcount_bits,
        meta: RwLock::new(meta),
    })
}

/// The metadata clusters of `img` whose refcount table is `rt`. The fixed structures claim
/// their clusters first, then refcount blocks, then L2 tables, so that a table entry aimed at
/// another structure leaves that structure's kind in the map (and the write is refused).
fn metadata_map(img: &Qcow2Image, rt: &[u64]) -> Result<MetaMap> {
    let cs = img.header.cluster_size();
    let mut meta = MetaMap::new(cs);
    // Each table once, however many L1 tables (active and snapshots') name it.
    let mut l2_tables = std::collections::BTreeSet::new();
    let mut problem = None;
    walk(img, &mut |found| match found {
        Found::Range { kind, offset, len } => meta.insert(kind, offset, len),
        Found::L1 { entries, .. } => l2_tables.extend(
            entries
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&off| off != 0 && off & (cs - 1) == 0),
        ),
        Found::Problem {
            structure,
            offset,
            message,
        } => {
            problem.get_or_insert((structure, offset, message));
        }
    })?;
    if let Some((structure, offset, message)) = problem {
        // Where its metadata lies is not known: guest writes could land on it.
        return Err(Error::corrupt(structure, offset, message).in_file(img.file.path()));
    }
    for &b in rt.iter().filter(|&&b| b != 0) {
        meta.insert(MetaKind::RefcountBlock, b, cs);
    }
    for off in l2_tables {
        meta.insert(MetaKind::L2Table, off, cs);
    }
    Ok(meta)
}

impl Writer {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn meta(&self) -> RwLockReadGuard<'_, MetaMap> {
        self.meta.read().unwrap_or_else(|e| e.into_inner())
    }

    fn meta_mut(&self) -> RwLockWriteGuard<'_, MetaMap> {
        self.meta.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Qcow2Image {
    fn writer(&self) -> Result<&Writer> {
        let w = self.writer.as_ref().ok_or_else(|| Error::ReadOnly {
            path: self.file.path().to_path_buf(),
            reason: "image opened read-only".into(),
        })?;
        if w.failed.load(Ordering::Acquire) {
            return Err(Error::ReadOnly {
                path: self.file.path().to_path_buf(),
                reason: "an earlier metadata update failed; reopen the image".into(),
            });
        }
        Ok(w)
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Guest bytes from `off` to the end of its L2 table's range, at most `len`.
    fn table_chunk(&self, off: u64, len: u64) -> u64 {
        let per = self.geometry.bytes_per_l2();
        len.min((off / per + 1) * per - off)
    }

    /// Runs `op` over `[off, off + len)` one L2 table at a time. `fast` writes go in place
    /// first where they can.
    fn apply(&self, op: Op<'_>, off: u64, len: u64) -> Result<()> {
        check_range(off, len, self.size())?;
        let w = self.writer()?;
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let n = self.table_chunk(pos, len - done);
            let piece = match op {
                Op::Write(buf) => Op::Write(&buf[done as usize..(done + n) as usize]),
                other => other,
            };
            if let Op::Write(data) = piece
                && self.write_in_place(w, data, pos)?
            {
                done += n;
                continue;
            }
            self.with_state(w, |st| self.modify(w, st, piece, pos, n))?;
            done += n;
        }
        Ok(())
    }

    /// Runs the metadata update `f` under the writer's lock; a failure leaves the writer failed
    /// (memory and file may disagree), and one that failed while this waited is refused.
    fn with_state<T>(&self, w: &Writer, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let mut st = w.lock();
        self.writer()?;
        let r = f(&mut st);
        if r.is_err() {
            w.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Writes `data` at guest `off` (inside one L2 table) if every cluster it touches is a normal
    /// cluster with refcount 1; returns false (having written nothing) otherwise.
    fn write_in_place(&self, w: &Writer, data: &[u8], off: u64) -> Result<bool> {
        let _in_flight = self.in_flight.read().unwrap_or_else(|e| e.into_inner());
        let cs = self.cs();
        let (l1_index, _, _) = self.geometry.split(off);
        let l1_entry = self.l1_entry(l1_index)?;
        let table_off = l1_entry & OFFSET_MASK;
        let meta = w.meta();
        // A table not yet checked goes through the metadata path once, which checks it.
        if l1_entry & COPIED == 0 || table_off == 0 || !meta.is_checked(table_off, l1_index) {
            return Ok(false);
        }
        let table = self.l2_table(table_off)?;
        // First map every cluster, then write: all or nothing.
        let mut hosts = Vec::new();
        let mut pos = off;
        let end = off + data.len() as u64;
        while pos < end {
            let (_, idx, in_cluster) = self.geometry.split(pos);
            let entry = table.get(idx as usize).copied().unwrap_or(0);
            if entry & COPIED == 0 || entry & L2_COMPRESSED != 0 {
                return Ok(false);
            }
            let at = table_off + idx * 8;
            let Cluster::Normal { host } =
                decode_l2(&self.geometry, entry, 0, at).map_err(|e| e.in_file(self.file.path()))?
            else {
                return Ok(false);
            };
            self.check_data_target(&meta, pos - in_cluster, host, cs, at)?;
            let n = (cs - in_cluster).min(end - pos);
            hosts.push((host + in_cluster, (pos - off) as usize, n as usize));
            pos += n;
        }
        drop(meta);
        for (host, start, n) in hosts {
            self.file.write_all_at(&data[start..start + n], host)?;
        }
        Ok(true)
    }

    /// Refuses guest data of the cluster at guest offset `guest` aimed at `[host, host + len)`
    /// (by the L2 entry at `at`) when that lies past the end of the file or on metadata.
    fn check_data_target(
        &self,
        meta: &MetaMap,
        guest: u64,
        host: u64,
        len: u64,
        at: u64,
    ) -> Result<()> {
        let file_len = self.file.len();
        let problem = if host >= file_len {
            format!("lies past the end of the file ({file_len:#x})")
        } else if let Some(o) = meta.find(host, len) {
            format!("overlaps {o}")
        } else {
            return Ok(());
        };
        Err(self.bad_entry(at, guest, host, &problem))
    }

    fn bad_entry(&self, at: u64, guest: u64, host: u64, problem: &str) -> Error {
        Error::corrupt(
            "qcow2 L2 table",
            at,
            format!("data cluster of guest offset {guest:#x} at host offset {host:#x} {problem}"),
        )
        .in_file(self.file.path())
    }

    /// Checks the clusters the L2 entry `entry` (at `at`, for the guest cluster at `guest`)
    /// names before a write, zeroing or discard touches them: inside the file, not metadata,
    /// referenced, and, when the copied flag says the entry is their only user, with refcount
    /// 1 and named by no other entry of its table (`dups`, when the table is not checked yet).
    fn check_entry(
        &self,
        w: &Writer,
        st: &mut State,
        guest: u64,
        entry: u64,
        at: u64,
        dups: Option<&HashMap<u64, [u64; 2]>>,
    ) -> Result<()> {
        let cs = self.cs();
        let cluster =
            decode_l2(&self.geometry, entry, 0, at).map_err(|e| e.in_file(self.file.path()))?;
        let host = match cluster {
            Cluster::Normal { host }
            | Cluster::Zero {
                prealloc: Some(host),
            } => host,
            Cluster::Compressed { host, len } => {
                return self.check_data_target(&w.meta(), guest, host, len, at);
            }
            _ => return Ok(()),
        };
        self.check_data_target(&w.meta(), guest, host, cs, at)?;
        let rc = self.refcount(w, st, host / cs)?;
        let copied = entry & COPIED != 0;
        let problem = if rc == 0 {
            "has refcount 0 (the allocator could hand it out again)".to_string()
        } else if copied && rc != 1 {
            format!("has refcount {rc} but the entry's copied flag says it has no other user")
        } else if let Some(other) = dups
            .filter(|_| copied)
            .and_then(|d| d.get(&host))
            .and_then(|pair| pair.iter().find(|&&o| o != at && o != u64::MAX))
        {
            format!("is also named by the L2 entry at {other:#x}")
        } else {
            return Ok(());
        };
        Err(self.bad_entry(at, guest, host, &problem))
    }

    /// Whether every entry of the L2 table `table` (at `table_off`, for L1 entry `l1_index`)
    /// passes [`Self::check_entry`]; I/O errors are returned.
    fn table_is_sound(
        &self,
        w: &Writer,
        st: &mut State,
        l1_index: u64,
        table_off: u64,
        table: &[u64],
        dups: &HashMap<u64, [u64; 2]>,
    ) -> Result<bool> {
        let base = l1_index * self.geometry.bytes_per_l2();
        for (i, &entry) in table.iter().enumerate() {
            let guest = base.saturating_add((i as u64) << self.geometry.cluster_bits);
            match self.check_entry(w, st, guest, entry, table_off + i as u64 * 8, Some(dups)) {
                Ok(()) => {}
                Err(e) if e.is_corruption() => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// For each host cluster the entries of `table` (at `table_off`) name, the file offsets of
    /// the first two entries naming it (`u64::MAX`: none).
    fn hosts_of(&self, table: &[u64], table_off: u64) -> HashMap<u64, [u64; 2]> {
        let mut hosts: HashMap<u64, [u64; 2]> = HashMap::new();
        for (i, &entry) in table.iter().enumerate() {
            let at = table_off + i as u64 * 8;
            if let Ok(
                Cluster::Normal { host }
                | Cluster::Zero {
                    prealloc: Some(host),
                },
            ) = decode_l2(&self.geometry, entry, 0, at)
            {
                let pair = hosts.entry(host).or_insert([at, u64::MAX]);
                if pair[0] != at && pair[1] == u64::MAX {
                    pair[1] = at;
                }
            }
        }
        hosts
    }

    fn l1_entry(&self, index: u64) -> Result<u64> {
        let l1 = self.l1.read().unwrap_or_else(|e| e.into_inner());
        usize::try_from(index)
            .ok()
            .and_then(|i| l1.get(i))
            .copied()
            .ok_or_else(|| {
                Error::corrupt(
                    "qcow2 L1 table",
                    self.header.l1_table_offset,
                    "guest offset beyond the L1 table",
                )
                .in_file(self.file.path())
            })
    }

    fn set_l1_entry(&self, index: u64, value: u64) -> Result<()> {
        self.file.write_all_at(
            &value.to_be_bytes(),
            self.header.l1_table_offset + index * 8,
        )?;
        let mut l1 = self.l1.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = usize::try_from(index).ok().and_then(|i| l1.get_mut(i)) {
            *e = value;
        }
        Ok(())
    }

    /// Waits until no request still uses a host offset looked up before now.
    fn drain_in_flight(&self) {
        drop(self.in_flight.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The metadata path for `[off, off + len)`, which lies inside one L2 table.
    fn modify(&self, w: &Writer, st: &mut State, op: Op<'_>, off: u64, len: u64) -> Result<()> {
        let cs = self.cs();
        let has_backing = self.backing_name.is_some();
        let (l1_index, _, _) = self.geometry.split(off);
        let l1_entry = self.l1_entry(l1_index)?;
        if l1_entry & OFFSET_MASK == 0 {
            // Nothing is allocated here: without a backing file it reads as zeros already; over
            // one, v2 cannot hide it (discard is advisory).
            match op {
                Op::Discard | Op::Zero if !has_backing => return Ok(()),
                Op::Discard if !self.geometry.v3 => return Ok(()),
                _ => {}
            }
        }
        let table_off = self.writable_l2(w, st, l1_index)?;
        // Copied on the first change only (the cache and readers may hold it).
        let mut table: Arc<[u64]> = self.l2_table(table_off)?;
        // Check every cluster the request touches before anything is written; a table seen for
        // the first time is checked whole, so that later writes can take the in-place path.
        let checked = w.meta().is_checked(table_off, l1_index);
        let dups = (!checked).then(|| self.hosts_of(&table, table_off));
        let mut pos = off & !(cs - 1);
        while pos < off + len {
            let (_, idx, _) = self.geometry.split(pos);
            let at = table_off + idx * 8;
            let entry = table.get(idx as usize).copied().ok_or_else(|| {
                Error::corrupt("qcow2 L2 table", at, "index past the end of the table")
                    .in_file(self.file.path())
            })?;
            self.check_entry(w, st, pos, entry, at, dups.as_ref())?;
            pos += cs;
        }
        if let Some(dups) = &dups
            && self.table_is_sound(w, st, l1_index, table_off, &table, dups)?
        {
            w.meta_mut().set_checked(table_off, l1_index);
        }
        let mut frees = Vec::new();
        let mut changed: Option<(usize, usize)> = None;
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let (_, idx, in_cluster) = self.geometry.split(pos);
            let n = (cs - in_cluster).min(end - pos);
            let whole = in_cluster == 0 && (n == cs || pos + n == self.size());
            let i = idx as usize;
            let at = table_off + idx * 8;
            let old = table.get(i).copied().ok_or_else(|| {
                Error::corrupt("qcow2 L2 table", at, "index past the end of the table")
                    .in_file(self.file.path())
            })?;
            let cluster =
                decode_l2(&self.geometry, old, 0, at).map_err(|e| e.in_file(self.file.path()))?;
            let reads_zero = matches!(cluster, Cluster::Zero { .. })
                || (matches!(cluster, Cluster::Unallocated) && !has_backing);
            let data: Option<&[u8]> = match op {
                Op::Write(buf) => Some(&buf[(pos - off) as usize..(pos - off + n) as usize]),
                Op::Zero if reads_zero => None,
                Op::Zero if whole && (self.geometry.v3 || !has_backing) => {
                    let new = if self.geometry.v3 { L2_ZERO } else { 0 };
                    set_entry(&mut table, &mut changed, i, new);
                    frees.push(old);
                    None
                }
                Op::Zero => Some(&[][..]),
                Op::Discard if !whole => None,
                Op::Discard => {
                    let new = match (has_backing, self.geometry.v3) {
                        (false, _) => Some(0),
                        (true, true) => Some(L2_ZERO),
                        // v2 cannot hide the backing file without storing zeros: discard is
                        // advisory, so leave the cluster as it is.
                        (true, false) => None,
                    };
                    if let Some(new) = new
                        && new != old
                    {
                        set_entry(&mut table, &mut changed, i, new);
                        frees.push(old);
                    }
                    None
                }
            };
            if let Some(data) = data {
                let zeros;
                let data = if data.is_empty() {
                    zeros = vec![0u8; n as usize];
                    &zeros[..]
                } else {
                    data
                };
                match cluster {
                    Cluster::Normal { host } if old & COPIED != 0 => {
                        // Checked above, with every cluster of the request.
                        self.file.write_all_at(data, host + in_cluster)?;
                    }
                    _ => {
                        let host = match cluster {
                            Cluster::Zero { prealloc: Some(h) } if old & COPIED != 0 => h,
                            _ => {
                                frees.push(old);
                                self.alloc_cluster(w, st)?
                            }
                        };
                        if reads_zero
                            && !whole
                            && host >= self.file.len()
                            && self.file.extend_to(host + cs)?
                        {
                            // A new cluster past the end of the file: the file grown over it
                            // reads as zeros, so only the guest's bytes are written (qemu too
                            // skips copying zeros on write).
                            self.file.write_all_at(data, host + in_cluster)?;
                        } else {
                            let cstart = pos - in_cluster;
                            let mut content = vec![0u8; cs as usize];
                            if !whole {
                                let visible = cs.min(self.size() - cstart) as usize;
                                self.read_at(&mut content[..visible], cstart)?;
                            }
                            content[in_cluster as usize..(in_cluster + n) as usize]
                                .copy_from_slice(data);
                            self.file.write_all_at(&content, host)?;
                        }
                        set_entry(&mut table, &mut changed, i, host | COPIED);
                    }
                }
            }
            pos += n;
        }
        let Some((lo, hi)) = changed else {
            return Ok(());
        };
        // The new entries are written back later (see the module doc), in one go with others.
        self.l2_cache.put_pinned(table_off, Arc::clone(&table));
        let (lo, hi) = match st.dirty.remove(&table_off) {
            Some((_, a, b)) => {
                st.dirty_entries -= b - a + 1;
                (a.min(lo), b.max(hi))
            }
            None => (lo, hi),
        };
        st.dirty.insert(table_off, (table, lo, hi));
        st.dirty_entries += hi - lo + 1;
        frees.retain(|&e| self.entry_holds_clusters(e));
        if !frees.is_empty() {
            // An entry that stops naming a cluster is durable before the cluster can be reused.
            self.write_back(st)?;
            self.file.sync_data()?;
            self.drain_in_flight();
            for e in frees {
                self.release_entry(w, st, e)?;
            }
        } else if st.dirty_entries > MAX_DIRTY_ENTRIES
            || st.dirty.len() as u64 > (MAX_DIRTY_BYTES / cs).max(1)
        {
            self.write_back(st)?;
        }
        Ok(())
    }

    /// Writes the L2 entries changed since the last write-back, after syncing what they point
    /// at (new data clusters, their refcounts, new tables): a crash before this leaves the
    /// clusters allocated but unnamed (leaks), never an entry naming unsynced bytes. The entries
    /// themselves are durable at the next sync.
    fn write_back(&self, st: &mut State) -> Result<()> {
        if st.dirty.is_empty() {
            return Ok(());
        }
        self.file.sync_data()?;
        for (table_off, (table, lo, hi)) in std::mem::take(&mut st.dirty) {
            let bytes: Vec<u8> = table[lo..=hi]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            self.file.write_all_at(&bytes, table_off + lo as u64 * 8)?;
            self.l2_cache.unpin(table_off);
        }
        st.dirty_entries = 0;
        Ok(())
    }

    fn entry_holds_clusters(&self, entry: u64) -> bool {
        entry & L2_COMPRESSED != 0 || entry & OFFSET_MASK != 0
    }

    /// Drops the references one old L2 entry made.
    fn release_entry(&self, w: &Writer, st: &mut State, entry: u64) -> Result<()> {
        let cs = self.cs();
        match decode_l2(&self.geometry, entry, 0, 0).map_err(|e| e.in_file(self.file.path()))? {
            Cluster::Normal { host }
            | Cluster::Zero {
                prealloc: Some(host),
            } => self.decref(w, st, host / cs),
            Cluster::Compressed { host, len } => {
                let last = (host + len.max(1) - 1) / cs;
                for c in host / cs..=last {
                    self.decref(w, st, c)?;
                }
                *self.lock_compressed() = None;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The L2 table of L1 entry `l1_index`, made private to the active L1 (refcount 1, COPIED):
    /// allocated when missing, copied when shared with a snapshot.
    fn writable_l2(&self, w: &Writer, st: &mut State, l1_index: u64) -> Result<u64> {
        let cs = self.cs();
        let l1_entry = self.l1_entry(l1_index)?;
        let old = l1_entry & OFFSET_MASK;
        if old != 0 && old & (cs - 1) != 0 {
            return Err(Error::corrupt(
                "qcow2 L1 table",
                self.header.l1_table_offset + l1_index * 8,
                format!("L2 table offset {old:#x} is not cluster-aligned"),
            )
            .in_file(self.file.path()));
        }
        let rc = if old != 0 {
            self.check_l2_target(w, st, l1_index, l1_entry)?
        } else {
            0
        };
        if old != 0 && l1_entry & COPIED != 0 {
            return Ok(old);
        }
        if old != 0 && rc == 1 {
            // Only the active L1 names it: the flag was merely stale.
            self.set_l1_entry(l1_index, old | COPIED)?;
            return Ok(old);
        }
        let words = (cs / 8) as usize;
        let content: Vec<u64> = if old == 0 {
            vec![0; words]
        } else {
            self.l2_table(old)?.to_vec()
        };
        let new = self.alloc_cluster(w, st)?;
        w.meta_mut().insert(MetaKind::L2Table, new, cs);
        let bytes: Vec<u8> = content.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&bytes, new)?;
        self.file.sync_data()?;
        self.set_l1_entry(l1_index, new | COPIED)?;
        self.l2_cache.put(new, content.into());
        if old != 0 {
            self.file.sync_data()?;
            self.drain_in_flight();
            self.decref(w, st, old / cs)?;
        }
        Ok(new)
    }

    /// Refuses an L2 table (named by L1 entry `l1_index`, whose value is `l1_entry`) that lies
    /// past the end of the file, on other metadata, or is shared although the copied flag says
    /// otherwise. Returns its refcount.
    fn check_l2_target(
        &self,
        w: &Writer,
        st: &mut State,
        l1_index: u64,
        l1_entry: u64,
    ) -> Result<u64> {
        let cs = self.cs();
        let table = l1_entry & OFFSET_MASK;
        let file_len = self.file.len();
        let mut rc = 0;
        let problem = if table.saturating_add(cs) > file_len {
            Some(format!("lies past the end of the file ({file_len:#x})"))
        } else if !w.meta().is_l2_table(table) {
            Some(match w.meta().find(table, cs) {
                Some(o) => format!("overlaps {o}"),
                None => "is not among the image's L2 tables".to_string(),
            })
        } else {
            rc = self.refcount(w, st, table / cs)?;
            match rc {
                0 => Some("has refcount 0 (the allocator could hand it out again)".to_string()),
                1 => None,
                _ if l1_entry & COPIED != 0 => Some(format!(
                    "has refcount {rc} but the L1 entry's copied flag says it has no other user"
                )),
                _ => None,
            }
        };
        match problem {
            None => Ok(rc),
            Some(problem) => Err(Error::corrupt(
                "qcow2 L1 table",
                self.header.l1_table_offset + l1_index * 8,
                format!(
                    "L2 table of guest offset {:#x} at host offset {table:#x} {problem}",
                    l1_index * self.geometry.bytes_per_l2()
                ),
            )
            .in_file(self.file.path())),
        }
    }

    /// Refuses to hand out cluster `idx`, which the refcounts call free, when it holds metadata.
    fn check_free(&self, w: &Writer, idx: u64, len: u64) -> Result<()> {
        match w.meta().find(idx * self.cs(), len) {
            None => Ok(()),
            Some(o) => Err(Error::corrupt(
                "qcow2 refcount block",
                idx * self.cs(),
                format!("clusters the refcounts call free hold {o}"),
            )
            .in_file(self.file.path())),
        }
    }

    /// Finds a free cluster, sets its refcount to 1 (written, not synced) and returns its
    /// offset. Grows the refcount structures as needed.
    fn alloc_cluster(&self, w: &Writer, st: &mut State) -> Result<u64> {
        let cs = self.cs();
        loop {
            let idx = st.free_hint;
            if idx.saturating_mul(cs) >= MAX_HOST_OFFSET {
                return Err(
                    Error::unsupported("a qcow2 image past the largest host offset")
                        .in_file(self.file.path()),
                );
            }
            // Past the end of the file only clusters allocated by a write that never finished
            // can be counted (leaks); a long run of them means the refcounts are garbage, and
            // searching on would take unbounded time.
            let past_end = (idx * cs).saturating_sub(self.file.len()) / cs;
            if past_end > MAX_COUNTED_PAST_END {
                return Err(Error::corrupt(
                    "qcow2 refcount block",
                    idx * cs,
                    format!(
                        "more than {MAX_COUNTED_PAST_END} clusters past the end of the file are \
                         counted as in use"
                    ),
                )
                .in_file(self.file.path()));
            }
            let b = idx / w.per_block;
            if b >= st.rt.len() as u64 {
                self.grow_refcount_table(w, st, b)?;
                continue;
            }
            if st.rt[b as usize] == 0 {
                self.new_refcount_block(w, st, b, idx)?;
                st.free_hint = idx + 1;
                continue;
            }
            st.free_hint = idx + 1;
            if self.refcount(w, st, idx)? == 0 {
                self.check_free(w, idx, cs)?;
                self.set_refcount(w, st, idx, 1)?;
                return Ok(idx * cs);
            }
        }
    }

    /// Creates refcount block `b` in cluster `idx` (one of the clusters it covers, all free as
    /// no block counted them), counting itself, and links it into the refcount table.
    fn new_refcount_block(&self, w: &Writer, st: &mut State, b: u64, idx: u64) -> Result<()> {
        let cs = self.cs();
        self.check_free(w, idx, cs)?;
        let mut block = vec![0u8; cs as usize];
        put_refcount(&mut block, idx % w.per_block, w.refcount_bits, 1);
        self.file.write_all_at(&block, idx * cs)?;
        self.file.sync_data()?;
        self.file
            .write_all_at(&(idx * cs).to_be_bytes(), st.rt_offset + b * 8)?;
        st.rt[b as usize] = idx * cs;
        w.meta_mut().insert(MetaKind::RefcountBlock, idx * cs, cs);
        cache_block(st, idx * cs, block);
        Ok(())
    }

    /// Moves the refcount table to a larger one that covers block `need`. The new table and one
    /// refcount block counting it go to a fresh block-aligned range past everything in use.
    fn grow_refcount_table(&self, w: &Writer, st: &mut State, need: u64) -> Result<()> {
        let cs = self.cs();
        let per = w.per_block;
        let file_clusters = self.file.len().div_ceil(cs);
        let start = file_clusters.max(st.rt.len() as u64 * per);
        let first = start.div_ceil(per) * per;
        let b0 = first / per;
        let entries = b0.max(need) + 1;
        let clusters = (entries * 8).div_ceil(cs);
        let bytes = clusters * cs;
        if 1 + clusters > per
            || bytes > super::header::MAX_REFCOUNT_TABLE_BYTES
            || u32::try_from(clusters).is_err()
        {
            return Err(Error::unsupported(format!(
                "growing the qcow2 refcount table to {bytes} bytes"
            ))
            .in_file(self.file.path()));
        }
        self.check_free(w, first, (1 + clusters) * cs)?;
        let mut block = vec![0u8; cs as usize];
        for i in 0..=clusters {
            put_refcount(&mut block, i, w.refcount_bits, 1);
        }
        let mut table = st.rt.clone();
        table.resize((bytes / 8) as usize, 0);
        table[b0 as usize] = first * cs;
        let table_off = (first + 1) * cs;
        self.file.write_all_at(&block, first * cs)?;
        let encoded: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&encoded, table_off)?;
        self.file.sync_data()?;
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&table_off.to_be_bytes());
        header[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.file.write_all_at(&header, HEADER_REFCOUNT_TABLE)?;
        self.file.sync_data()?;
        let (old_off, old_clusters) = (st.rt_offset, st.rt_clusters);
        st.rt = table;
        st.rt_offset = table_off;
        st.rt_clusters = clusters;
        {
            let mut meta = w.meta_mut();
            meta.insert(MetaKind::RefcountBlock, first * cs, cs);
            meta.insert(MetaKind::RefcountTable, table_off, bytes);
        }
        cache_block(st, first * cs, block);
        for c in 0..old_clusters {
            self.decref(w, st, old_off / cs + c)?;
        }
        Ok(())
    }

    /// The refcount block holding cluster `idx`'s count, and the index in it; `None` when no
    /// block exists (the count is 0).
    fn block_of(&self, w: &Writer, st: &mut State, idx: u64) -> Result<Option<(u64, u64)>> {
        let b = idx / w.per_block;
        let Some(&off) = st.rt.get(b as usize) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if !st.blocks.contains_key(&off) {
            let block = self
                .file
                .read_vec(off, self.cs() as usize, "qcow2 refcount block")?;
            cache_block(st, off, block);
        }
        Ok(Some((off, idx % w.per_block)))
    }

    fn refcount(&self, w: &Writer, st: &mut State, idx: u64) -> Result<u64> {
        Ok(match self.block_of(w, st, idx)? {
            Some((off, i)) => st
                .blocks
                .get(&off)
                .map_or(0, |b| get_refcount(b, i, w.refcount_bits)),
            None => 0,
        })
    }

    /// Sets cluster `idx`'s refcount (whose block must exist) and writes it through.
    fn set_refcount(&self, w: &Writer, st: &mut State, idx: u64, value: u64) -> Result<()> {
        let Some((off, i)) = self.block_of(w, st, idx)? else {
            return Err(Error::corrupt(
                "qcow2 refcount table",
                st.rt_offset,
                format!("no refcount block for cluster {:#x}", idx * self.cs()),
            )
            .in_file(self.file.path()));
        };
        let bits = w.refcount_bits;
        if bits < 64 && value >> bits != 0 {
            return Err(Error::unsupported(format!(
                "a refcount above {} ({bits}-bit refcounts)",
                (1u64 << bits) - 1
            ))
            .in_file(self.file.path()));
        }
        let block = st.blocks.get_mut(&off).ok_or_else(|| {
            Error::corrupt("qcow2 refcount block", off, "not loaded").in_file(self.file.path())
        })?;
        put_refcount(block, i, bits, value);
        let (start, len) = if bits >= 8 {
            (i * u64::from(bits) / 8, u64::from(bits) / 8)
        } else {
            (i * u64::from(bits) / 8, 1)
        };
        let bytes = block[start as usize..(start + len) as usize].to_vec();
        self.file.write_all_at(&bytes, off + start)
    }

    /// Drops one reference to cluster `idx`; a cluster no longer used is punched out of the
    /// file and becomes allocatable.
    fn decref(&self, w: &Writer, st: &mut State, idx: u64) -> Result<()> {
        let rc = self.refcount(w, st, idx)?;
        if rc == 0 {
            return Err(Error::corrupt(
                "qcow2 refcount block",
                idx * self.cs(),
                "freeing a cluster whose refcount is already 0",
            )
            .in_file(self.file.path()));
        }
        self.set_refcount(w, st, idx, rc - 1)?;
        if rc == 1 {
            // Whatever it held is gone: it may now take guest data. Plain data clusters were
            // never in the map: no write lock for them (a large discard frees many).
            let cluster = idx * self.cs();
            if w.meta().holds(cluster, self.cs()) {
                w.meta_mut().remove(cluster, self.cs());
            }
            st.free_hint = st.free_hint.min(idx);
            self.file.punch_hole(idx * self.cs(), self.cs())?;
        }
        Ok(())
    }
}

fn set_entry(table: &mut Arc<[u64]>, changed: &mut Option<(usize, usize)>, i: usize, value: u64) {
    Arc::make_mut(table)[i] = value;
    *changed = Some(match *changed {
        None => (i, i),
        Some((lo, hi)) => (lo.min(i), hi.max(i)),
    });
}

fn cache_block(st: &mut State, off: u64, block: Vec<u8>) {
    if st.blocks.len() >= MAX_CACHED_BLOCKS {
        st.blocks.clear();
    }
    st.blocks.insert(off, block);
}

/// Refcount entry `i` of a block of `bits`-wide big-endian entries (sub-byte entries start at
/// the least significant bit).
pub(super) fn get_refcount(block: &[u8], i: u64, bits: u32) -> u64 {
    let bit = i * u64::from(bits);
    let start = (bit / 8) as usize;
    if bits < 8 {
        let byte = block.get(start).copied().unwrap_or(0);
        return u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8);
    }
    let n = (bits / 8) as usize;
    block.get(start..start + n).map_or(0, |b| {
        b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    })
}

fn put_refcount(block: &mut [u8], i: u64, bits: u32, value: u64) {
    let bit = i * u64::from(bits);
    let start = (bit / 8) as usize;
    if bits < 8 {
        if let Some(byte) = block.get_mut(start) {
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        return;
    }
    let n = (bits / 8) as usize;
    if let Some(dst) = block.get_mut(start..start + n) {
        dst.copy_from_slice(&value.to_be_bytes()[8 - n..]);
    }
}

impl BlockDeviceMut for Qcow2Image {
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.apply(Op::Write(buf), off, buf.len() as u64)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.apply(Op::Zero, off, len)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.apply(Op::Discard, off, len)
    }

    fn flush(&self) -> Result<()> {
        let w = self.writer()?;
        self.with_state(w, |st| self.write_back(st))?;
        self.file.sync_data()
    }
}

impl Drop for Qcow2Image {
    /// Writes back the L2 entries changed since the last flush, so that a closed image holds
    /// every write made through it (a flush, which can report an error, is the way to be sure).
    fn drop(&mut self) {
        let Some(w) = &self.writer else {
            return;
        };
        if w.failed.load(Ordering::Acquire) {
            return;
        }
        let mut st = w.lock();
        if !st.dirty.is_empty() && self.write_back(&mut st).is_ok() {
            let _ = self.file.sync_data();
        }
    }
}

impl Qcow2Image {
    /// This image as a writable device, when it was opened writable.
    pub(super) fn mut_device(self: Arc<Self>) -> Option<Arc<dyn BlockDeviceMut>> {
        if self.writer.is_some() {
            Some(self)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crash_test::{
        Scenario, crash_everywhere, open_writable, qemu, qemu_ok, qemu_qcow2, s, scratch,
    };
    use std::path::Path;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        qemu("qemu-img", args)
    }

    fn open_rw(path: &Path) -> Arc<Qcow2Image> {
        open_writable(path, Qcow2Image::open)
    }

    /// `qemu-img check`: exit 0 (clean) or 3 (leaks only).
    fn qemu_check(path: &Path) -> std::result::Result<(), String> {
        let out = qemu_img(&["check", "-f", "qcow2", s(path)]);
        match out.status.code() {
            Some(0 | 3) => Ok(()),
            _ => Err(format!(
                "qemu-img check: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    fn scenario<'a>(
        dir: &'a Path,
        files: &'a [&'a str],
        initial: &'a [u8],
        seed: u64,
        cluster: u64,
    ) -> Scenario<'a, Qcow2Image> {
        Scenario {
            dir,
            files,
            initial,
            seed,
            unit: cluster,
            // v3 images or no backing file: whole discarded clusters read as zeros.
            discard_unit: Some(cluster),
            open: open_rw,
            file: |img| &img.file,
            peer_check: qemu_check,
        }
    }

    /// What a second, read-only opening of the file reads at `off`.
    fn read_from_file(path: &Path, off: u64, len: usize) -> Vec<u8> {
        let img = crate::open(path, &crate::registry::OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; len];
        img.read_at(&mut buf, off).unwrap();
        buf
    }

    #[test]
    fn new_entries_reach_the_file_at_flush_at_drop_and_past_the_bound() {
        let dir = scratch("qcow2-rw-write-back");
        let img = dir.join("disk.qcow2");
        qemu_qcow2(&img, 512, "8M");
        let dev = open_rw(&img);
        dev.write_at(&[0xa1; 4096], 1 << 20).unwrap();
        // The writer reads its own write; the file does not name the clusters yet.
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, vec![0xa1; 4096]);
        assert_eq!(read_from_file(&img, 1 << 20, 4096), vec![0; 4096]);
        dev.flush().unwrap();
        assert_eq!(read_from_file(&img, 1 << 20, 4096), vec![0xa1; 4096]);
        qemu_check(&img).unwrap();

        // Dropped without a flush: the entries are written back on the way out.
        dev.write_at(&[0xb2; 512], 2 << 20).unwrap();
        drop(dev);
        assert_eq!(read_from_file(&img, 2 << 20, 512), vec![0xb2; 512]);
        qemu_check(&img).unwrap();

        // More new entries than the bound are written back without a flush.
        let dev = open_rw(&img);
        let n = MAX_DIRTY_ENTRIES as u64 + 1;
        for i in 0..n {
            dev.write_at(&[0xc3; 512], (3 << 20) + i * 1024).unwrap();
        }
        assert_eq!(read_from_file(&img, 3 << 20, 512), vec![0xc3; 512]);
        dev.flush().unwrap();
        assert_eq!(
            read_from_file(&img, (3 << 20) + (n - 1) * 1024, 512),
            vec![0xc3; 512]
        );
        qemu_check(&img).unwrap();
    }

    #[test]
    fn refcounts_claiming_everything_past_the_file_end_are_a_corruption() {
        let dir = scratch("qcow2-rw-garbage-refcounts");
        let img = dir.join("bad.qcow2");
        qemu_qcow2(&img, 512, "64M");
        // A 600-cluster refcount table (covering 9.8 million clusters) whose every entry names
        // one block that counts every cluster as used.
        let bytes = std::fs::read(&img).unwrap();
        let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
        let block = u64::from_be_bytes(bytes[rt as usize..rt as usize + 8].try_into().unwrap());
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xff; 512], block).unwrap();
        let new_rt = (bytes.len() as u64).div_ceil(512) * 512;
        let entries: Vec<u8> = (0..600 * 64).flat_map(|_| block.to_be_bytes()).collect();
        f.write_all_at(&entries, new_rt).unwrap();
        f.write_all_at(&new_rt.to_be_bytes(), 48).unwrap();
        f.write_all_at(&600u32.to_be_bytes(), 56).unwrap();
        drop(f);
        let dev = open_rw(&img);
        let err = dev.write_at(&[1; 512], 0).unwrap_err();
        assert!(err.is_corruption(), "{err}");
        assert!(
            err.to_string().contains("past the end of the file"),
            "{err}"
        );
        // Nothing more is written after a failed metadata update.
        let err = dev.write_at(&[1; 512], 0).unwrap_err();
        assert!(err.to_string().contains("reopen"), "{err}");
    }

    #[test]
    fn crashes_at_any_point_leave_at_most_leaks_and_keep_flushed_writes() {
        let dir = scratch("qcow2-rw-crash");
        // 2 MiB, first half data, compressed 512-byte clusters, 64-bit refcounts: one
        // refcount table cluster covers 2 MiB of file, so the table grows during the run.
        let raw = dir.join("base.raw");
        let mut initial = vec![0u8; 2 << 20];
        for (i, b) in initial[..1 << 20].iter_mut().enumerate() {
            *b = (i / 512 % 251) as u8 ^ (i % 7) as u8;
        }
        std::fs::write(&raw, &initial).unwrap();
        let img = dir.join("disk.qcow2");
        qemu_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512,refcount_bits=64",
                s(&raw),
                s(&img),
            ],
        );
        crash_everywhere(&scenario(&dir, &["disk.qcow2"], &initial, 12345, 512));
    }

    #[test]
    fn crashes_over_a_backing_file_and_a_snapshot_keep_flushed_writes() {
        let dir = scratch("qcow2-rw-crash-backing");
        let raw = dir.join("base.raw");
        let mut initial = vec![0u8; 1 << 20];
        for (i, b) in initial.iter_mut().enumerate() {
            *b = (i / 1024 % 253) as u8 ^ 0x5a;
        }
        std::fs::write(&raw, &initial).unwrap();
        let base = dir.join("base.qcow2");
        qemu_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)],
        );
        let top = dir.join("top.qcow2");
        qemu_ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "-o",
                "cluster_size=1024",
                s(&top),
            ],
        );
        // Some data of its own, then a snapshot: the active L2 tables and data are shared.
        qemu_ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 7 0 300000",
                "-c",
                "write -z 400000 100000",
                s(&top),
            ],
        );
        initial[..300000].fill(7);
        initial[400000..500000].fill(0);
        qemu_ok("qemu-img", &["snapshot", "-c", "snap", s(&top)]);
        crash_everywhere(&scenario(
            &dir,
            &["top.qcow2", "base.qcow2"],
            &initial,
            777,
            1024,
        ));
    }

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut block = vec![0u8; 512];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let per = 512 * 8 / u64::from(bits);
            for i in 0..per {
                put_refcount(&mut block, i, bits, (i * 7 + 1) & max);
            }
            for i in 0..per {
                assert_eq!(get_refcount(&block, i, bits), (i * 7 + 1) & max, "{bits}");
            }
        }
    }

    #[test]
    fn sixteen_bit_refcounts_are_big_endian() {
        let mut block = vec![0u8; 8];
        put_refcount(&mut block, 1, 16, 0x0102);
        assert_eq!(block, [0, 0, 1, 2, 0, 0, 0, 0]);
    }
}
