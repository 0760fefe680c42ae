//! `gc --remote` and `rm --remote`: delete from a remote what no snapshot needs any more, without
//! a lock (object stores have none), safe against a push running at the same time.
//!
//! Objects added to the layout:
//!
//! ```text
//! gc/condemned-<ms>-<tag>   JSON: the packs and manifests a gc run found dead ("condemned"); its
//!                           LastModified time (the remote's clock) is the condemnation time
//! gc/clock-<tag>            written, read back (HEAD) and deleted by a gc run to learn the
//!                           remote's clock
//! ```
//!
//! A run, with grace G (remote clock T from `gc/clock-<tag>`, taken before any listing):
//!
//! 1. Roots: every manifest a ref names, every manifest whose LastModified is younger than G (a
//!    push writes its manifest before its ref); live = the roots and their parents, as far as
//!    the remote holds them.
//! 2. Manifests that are not live and were condemned at least G ago are deleted (first, so no
//!    manifest ever outlives what it needs).
//! 3. Mark: the live manifests' maps and recipes are walked (map nodes fetched through the
//!    remote's reader, each shared subtree once), then those of the other remaining manifests.
//!    Each chunk is claimed by one pack (packs no record condemns first, then those holding the
//!    most live bytes), so a chunk that a push re-uploaded lets the condemned copy go.
//! 4. Packs that hold no claimed live chunk are dead. A dead pack condemned at least G ago,
//!    and holding nothing any remaining manifest needs, is deleted (pack object, then its index
//!    object: a pack without its index would be indexed again by the next push). Dead packs
//!    older than G (by the LastModified of the pack or its index object: a younger one may be
//!    a running push's) and dead manifests that no record condemns yet are written in a new
//!    record.
//! 5. Records whose every pack and manifest is gone or alive again are deleted; the local copy
//!    of the remote's index objects is refreshed (deleted packs leave it) and cached frames of
//!    deleted packs are removed.
//!
//! Packs that are partly dead are kept whole (no repacking on the remote); their dead bytes
//! are reported.
//!
//! Push (remote/push.rs) takes part: it treats chunks in condemned packs, and condemned
//! manifests, as absent (so it re-uploads them in new packs, under names no record holds);
//! just before writing its manifests it reads the records again and re-lists the index
//! (records first), starts over if something it relied on was condemned meanwhile, refuses to
//! name a condemned manifest by a ref, and writes manifests and refs only within
//! [`COMMIT_WINDOW`] of that check. Why that is enough: a pack P a push relies on is deleted by
//! a run G2 only if a record R condemned P at least G before G2's clock T2. If the push's check
//! saw R, the push did not rely on P. If R was written after the check began, the push's
//! manifest (written within the window of the check, window + request time < G) landed before
//! T2, so G2's listing holds it: it is a root or still remaining, and P (or another pack
//! holding the same chunks) is marked and kept. A record is deleted only after its packs are
//! (pack, index object, record), so a check that misses a record because it is gone also
//! misses the index objects of its deleted packs. The same holds for a manifest a push names
//! by a ref.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::PackId;
use crate::remote::verify::{keyless_reader, walk_remote_member};
use crate::remote::{DiskFrameCache, Remote};
use crate::store::{Layout, Manifest, SnapshotId, check_name};

/// Default grace period of `gc --remote`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// How long after its last look at the gc records a push may still write manifests and refs
/// (`VMNEST_PUSH_WINDOW`, seconds, changes it). A gc whose grace is shorter than this plus the
/// time a request may take (retries included) is safe only while no push runs.
pub const COMMIT_WINDOW: Duration = Duration::from_secs(60);
/// Margin for LastModified times kept in whole seconds by some servers.
const CLOCK_SLACK_MS: i64 = 1000;
/// Largest condemnation record accepted.
const MAX_RECORD: u64 = 64 << 20;
const RECORD_PREFIX: &str = "condemned-";
const CLOCK_PREFIX: &str = "clock-";
/// Clock objects of runs that died are removed once this old.
const STALE_CLOCK_MS: i64 = 600_000;

/// The body of a condemnation record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordBody {
    version: u32,
    /// The remote's clock when the run started (the record's LastModified is what counts).
    started_ms: i64,
    packs: Vec<String>,
    snapshots: Vec<String>,
}

/// One condemnation record as listed.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    rel: String,
    at: i64,
    packs: Vec<PackId>,
    snapshots: Vec<SnapshotId>,
}

/// The condemnation records on a remote.
#[derive(Debug, Clone, Default)]
pub(crate) struct Condemned {
    records: Vec<Record>,
}

impl Condemned {
    /// Lists and reads the records (a record deleted between the listing and its read is
    /// skipped: records are deleted only once what they name is gone or alive).
    pub(crate) fn read(remote: &Remote) -> Result<Condemned> {
        remote.block_on(async {
            let mut records = Vec::new();
            for (name, _, at) in remote.list_times("gc").await? {
                if !name.starts_with(RECORD_PREFIX) {
                    continue;
                }
                let rel = format!("gc/{name}");
                let Some(bytes) = remote.get_small(&rel, MAX_RECORD).await? else {
                    continue;
                };
                let object = format!("{}/{rel}", remote.url().trim_end_matches('/'));
                let (packs, snapshots) = parse_condemned_record(&object, &bytes)?;
                records.push(Record {
                    rel,
                    at,
                    packs,
                    snapshots,
                });
            }
            Ok(Condemned { records })
        })
    }

    /// Every condemned pack, with its earliest condemnation time.
    pub(crate) fn packs(&self) -> HashMap<PackId, i64> {
        self.earliest(|r| &r.packs)
    }

    /// Every condemned manifest, with its earliest condemnation time.
    pub(crate) fn snapshots(&self) -> HashMap<SnapshotId, i64> {
        self.earliest(|r| &r.snapshots)
    }

    fn earliest<T: Copy + Eq + std::hash::Hash>(
        &self,
        items: impl Fn(&Record) -> &[T],
    ) -> HashMap<T, i64> {
        let mut out: HashMap<T, i64> = HashMap::new();
        for r in &self.records {
            for x in items(r) {
                let t = out.entry(*x).or_insert(r.at);
                *t = (*t).min(r.at);
            }
        }
        out
    }

    /// Whether `self` condemns something `before` did not.
    pub(crate) fn adds_to(&self, before: &Condemned) -> bool {
        let (bp, bs) = (before.packs(), before.snapshots());
        self.packs().keys().any(|p| !bp.contains_key(p))
            || self.snapshots().keys().any(|s| !bs.contains_key(s))
    }
}

/// Parses a condemnation record (`object` names it in errors): the packs and manifests it
/// condemns. The bytes are untrusted (read back from the remote; their size is capped by the
/// caller).
pub fn parse_condemned_record(
    object: &str,
    bytes: &[u8],
) -> Result<(Vec<PackId>, Vec<SnapshotId>)> {
    let body: RecordBody =
        serde_json::from_slice(bytes).map_err(|e| Error::corrupt(object, 0, e.to_string()))?;
    if body.version != 1 {
        return Err(Error::corrupt(object, 0, "unknown record version"));
    }
    let bad = |what: &str, v: &str| Error::corrupt(object, 0, format!("{what} {v:?} is not an id"));
    let packs = body
        .packs
        .iter()
        .map(|p| PackId::from_hex(p).ok_or_else(|| bad("pack", p)))
        .collect::<Result<Vec<_>>>()?;
    let snapshots = body
        .snapshots
        .iter()
        .map(|s| SnapshotId::from_hex(s).ok_or_else(|| bad("snapshot", s)))
        .collect::<Result<Vec<_>>>()?;
    Ok((packs, snapshots))
}

/// A short random tag for object names.
fn tag() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// How to collect garbage on a remote.
#[derive(Clone, Copy, Debug)]
pub struct RemoteGcOptions {
    /// How long a condemnation stands before what it names may be deleted, and how young a
    /// manifest without a ref must be to count as a root.
    pub grace: Duration,
    /// Report what would be condemned and deleted; write nothing (but the clock object).
    pub dry_run: bool,
}

impl Default for RemoteGcOptions {
    fn default() -> Self {
        RemoteGcOptions {
            grace: DEFAULT_GRACE,
            dry_run: false,
        }
    }
}

/// A pack kept with some dead chunks in it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PackDead {
    /// The pack.
    pub pack: String,
    /// Its size on the remote.
    pub bytes: u64,
    /// Plaintext bytes of its chunks that nothing live needs.
    pub dead_bytes: u64,
}

/// What a `gc --remote` run found and did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RemoteGcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// The grace period, seconds.
    pub grace_seconds: f64,
    /// Manifests on the remote.
    pub snapshots: usize,
    /// Manifests named by a ref or younger than the grace.
    pub roots: usize,
    /// Roots and their lineage.
    pub live_snapshots: usize,
    /// Manifests deleted (`name@id`).
    pub manifests_deleted: Vec<String>,
    /// Manifests condemned by this run (`name@id`).
    pub manifests_condemned: Vec<String>,
    /// Packs on the remote (listed or indexed).
    pub packs: usize,
    /// Packs condemned by this run.
    pub packs_condemned: usize,
    /// Packs condemned earlier, still dead, not yet past the grace.
    pub packs_pending: usize,
    /// Packs deleted.
    pub packs_deleted: usize,
    /// Bytes of the packs and index objects deleted.
    pub bytes_freed: u64,
    /// Packs kept that hold dead chunks (no repacking on a remote).
    pub partly_dead_packs: Vec<PackDead>,
    /// Their dead plaintext bytes.
    pub partly_dead_bytes: u64,
    /// Condemnation records written and deleted.
    pub records_written: usize,
    pub records_deleted: usize,
    /// What could not be walked in snapshots no name reaches (no pack was deleted then).
    pub problems: Vec<String>,
}

/// Collects garbage on `remote`; see the module documentation.
pub fn gc_remote(remote: &Arc<Remote>, opts: RemoteGcOptions) -> Result<RemoteGcReport> {
    let mut report = RemoteGcReport {
        dry_run: opts.dry_run,
        grace_seconds: opts.grace.as_secs_f64(),
        ..Default::default()
    };
    let grace_ms = i64::try_from(opts.grace.as_millis()).unwrap_or(i64::MAX / 4);
    let run = tag();
    let now = remote.block_on(remote.clock(&format!("gc/{CLOCK_PREFIX}{run}")))?;
    let cutoff = now.saturating_sub(grace_ms).saturating_sub(CLOCK_SLACK_MS);
    let condemned = Condemned::read(remote)?;
    let cond_packs = condemned.packs();
    let cond_snaps = condemned.snapshots();
    let refs = remote.refs()?;
    let listed: HashMap<SnapshotId, i64> = remote
        .block_on(remote.list_times("snapshots"))?
        .into_iter()
        .filter_map(|(n, _, at)| Some((SnapshotId::from_hex(&n)?, at)))
        .collect();
    report.snapshots = listed.len();

    // Roots and their lineage.
    let mut manifests: HashMap<SnapshotId, Manifest> = HashMap::new();
    let mut roots: Vec<SnapshotId> = refs
        .values()
        .copied()
        .filter(|id| listed.contains_key(id))
        .chain(
            listed
                .iter()
                .filter(|(_, at)| **at > cutoff)
                .map(|(id, _)| *id),
        )
        .collect();
    roots.sort();
    roots.dedup();
    report.roots = roots.len();
    let mut live: HashSet<SnapshotId> = HashSet::new();
    for root in roots {
        let mut next = Some(root);
        while let Some(id) = next {
            if !listed.contains_key(&id) || !live.insert(id) {
                break;
            }
            let Some((_, m)) = remote.manifest(&id)? else {
                live.remove(&id);
                break;
            };
            next = m.parent;
            manifests.insert(id, m);
        }
    }
    report.live_snapshots = live.len();

    // Manifests condemned long enough ago and still not live go; the rest remain.
    let mut due_snaps: Vec<SnapshotId> = listed
        .keys()
        .filter(|id| !live.contains(id) && cond_snaps.get(id).is_some_and(|t| *t <= cutoff))
        .copied()
        .collect();
    due_snaps.sort();
    let due: HashSet<SnapshotId> = due_snaps.iter().copied().collect();
    let mut remaining: Vec<SnapshotId> = listed
        .keys()
        .filter(|id| !live.contains(id) && !due.contains(id))
        .copied()
        .collect();
    remaining.sort();
    for id in &remaining {
        if let Some((_, m)) = remote.manifest(id)? {
            manifests.insert(*id, m);
        }
    }
    let label = |id: &SnapshotId, manifests: &HashMap<SnapshotId, Manifest>| {
        let name = manifests.get(id).map(|m| m.name.as_str()).unwrap_or("");
        format!("{name}@{}", id.short())
    };

    // An encrypted remote read without its key: map nodes are not sealed, so maps are walked
    // (their keyed ids unchecked); recipe parts are sealed, so what a byte stream needs would be
    // unknown and no pack could be judged dead: that case needs the key.
    let keyless = remote.encryption()?.is_some() && remote.keys().is_none();
    if keyless
        && let Some(m) = manifests.values().find(|m| {
            m.members
                .iter()
                .any(|x| matches!(x.layout, Layout::Recipe { .. }))
        })
    {
        return Err(Error::InvalidArgument(format!(
            "gc --remote needs the key of this encrypted remote: snapshot {} holds a byte \
             stream whose parts are sealed (give --key-file or --passphrase-file)",
            m.name
        )));
    }
    // Mark: live first, then what the other remaining manifests need. The index is listed
    // after the manifests, so it holds every pack a listed manifest needs.
    remote.exclude_packs(HashSet::new());
    remote.refresh_index()?;
    let rc = keyless_reader(remote, keyless)?;
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut problems = BTreeSet::new();
    let mut mark = |ids: &[SnapshotId],
                    marked: HashSet<ChunkId>,
                    problems: &mut BTreeSet<String>|
     -> Result<HashSet<ChunkId>> {
        let marked = RefCell::new(marked);
        for member in ids
            .iter()
            .filter_map(|id| manifests.get(id))
            .flat_map(|m| &m.members)
        {
            walk_remote_member(&rc, member, &mut seen, problems, &|c, _, _| {
                marked.borrow_mut().insert(*c);
            })?;
        }
        Ok(marked.into_inner())
    };
    let mut live_sorted: Vec<SnapshotId> = live.iter().copied().collect();
    live_sorted.sort();
    let live_ids = mark(&live_sorted, HashSet::new(), &mut problems)?;
    if let Some(p) = problems.iter().next() {
        return Err(Error::InvalidArgument(format!(
            "gc --remote stopped, nothing deleted: a live snapshot cannot be walked ({} \
             problems; first: {p}); run vmnest verify --remote",
            problems.len()
        )));
    }
    // A manifest no name reaches that cannot be walked (damaged, or another gc run deleting
    // what it needed) leaves its chunks unknown: this run then deletes no pack.
    let needed_ids = mark(&remaining, live_ids.clone(), &mut problems)?;
    report.problems = problems.into_iter().collect();

    // Packs: listed ones with their sizes, indexed ones with their entries.
    let listing = |dir: &str, ext: &str| -> Result<HashMap<PackId, (u64, i64)>> {
        Ok(remote
            .block_on(remote.list_times(dir))?
            .into_iter()
            .filter_map(|(f, size, at)| {
                Some((f.strip_suffix(ext).and_then(PackId::from_hex)?, (size, at)))
            })
            .collect())
    };
    let pack_objects = listing("packs", ".pack")?;
    let index_objects = listing("index", ".idx")?;
    let pack_sizes: HashMap<PackId, u64> =
        pack_objects.iter().map(|(p, (s, _))| (*p, *s)).collect();
    let index_sizes: HashMap<PackId, u64> =
        index_objects.iter().map(|(p, (s, _))| (*p, *s)).collect();
    // A pack (or index object) younger than the grace may belong to a push still running.
    let young = |p: &PackId| {
        [pack_objects.get(p), index_objects.get(p)]
            .iter()
            .flatten()
            .any(|(_, at)| *at > cutoff)
    };
    let (entries, lens) = remote.with_index(|i| {
        let lens: HashMap<PackId, u64> = i.packs.iter().map(|(p, r)| (*p, r.len)).collect();
        (i.entries.clone(), lens)
    });
    let mut all: Vec<PackId> = pack_sizes
        .keys()
        .chain(entries.keys())
        .copied()
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    report.packs = all.len();
    let holds = |p: &PackId, ids: &HashSet<ChunkId>| -> u64 {
        entries.get(p).map_or(0, |es| {
            es.iter()
                .filter(|e| ids.contains(&e.id))
                .map(|e| u64::from(e.loc.len))
                .sum()
        })
    };
    // Only a pack that is there whole can hold a chunk for the others.
    let whole = |p: &PackId| pack_sizes.get(p).is_some_and(|s| lens.get(p) == Some(s));
    all.sort_by_key(|p| {
        (
            cond_packs.contains_key(p),
            std::cmp::Reverse(holds(p, &live_ids)),
            *p,
        )
    });
    let claim = |ids: &HashSet<ChunkId>| -> HashMap<PackId, u64> {
        let mut claimed: HashSet<ChunkId> = HashSet::new();
        let mut kept = HashMap::new();
        for p in all.iter().filter(|p| whole(p)) {
            let Some(es) = entries.get(p) else { continue };
            let mine: Vec<_> = es
                .iter()
                .filter(|e| ids.contains(&e.id) && !claimed.contains(&e.id))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let bytes: u64 = mine.iter().map(|e| u64::from(e.loc.len)).sum();
            claimed.extend(mine.iter().map(|e| e.id));
            kept.insert(*p, bytes);
        }
        kept
    };
    let kept_live = claim(&live_ids);
    let kept_needed = claim(&needed_ids);
    let mut new_packs = Vec::new();
    let mut delete_packs = Vec::new();
    for p in &all {
        if let Some(live_bytes) = kept_live.get(p) {
            let total: u64 = entries
                .get(p)
                .map_or(0, |es| es.iter().map(|e| u64::from(e.loc.len)).sum());
            if total > *live_bytes {
                report.partly_dead_packs.push(PackDead {
                    pack: p.to_hex(),
                    bytes: pack_sizes.get(p).copied().unwrap_or(0),
                    dead_bytes: total - live_bytes,
                });
                report.partly_dead_bytes += total - live_bytes;
            }
            continue;
        }
        match cond_packs.get(p) {
            None if young(p) => {}
            None => new_packs.push(*p),
            Some(t)
                if *t <= cutoff && !kept_needed.contains_key(p) && report.problems.is_empty() =>
            {
                delete_packs.push(*p)
            }
            Some(_) => report.packs_pending += 1,
        }
    }
    report.packs_condemned = new_packs.len();
    report.packs_deleted = delete_packs.len();
    report.bytes_freed = delete_packs
        .iter()
        .map(|p| pack_sizes.get(p).copied().unwrap_or(0) + index_sizes.get(p).copied().unwrap_or(0))
        .sum();
    let new_snaps: Vec<SnapshotId> = remaining
        .iter()
        .filter(|id| !cond_snaps.contains_key(id))
        .copied()
        .collect();
    report.manifests_condemned = new_snaps.iter().map(|id| label(id, &manifests)).collect();
    for id in &due_snaps {
        // A manifest that goes is read once for its name in the report.
        if let Ok(Some((_, m))) = remote.manifest(id) {
            manifests.insert(*id, m);
        }
    }
    report.manifests_deleted = due_snaps.iter().map(|id| label(id, &manifests)).collect();

    // Records done with: everything they name is gone (or goes now) or is alive again.
    let deleted_packs: HashSet<PackId> = delete_packs.iter().copied().collect();
    let exists = |p: &PackId| pack_sizes.contains_key(p) || entries.contains_key(p);
    let done: Vec<&Record> = condemned
        .records
        .iter()
        .filter(|r| {
            r.packs
                .iter()
                .all(|p| deleted_packs.contains(p) || !exists(p) || kept_live.contains_key(p))
                && r.snapshots
                    .iter()
                    .all(|s| due.contains(s) || !listed.contains_key(s) || live.contains(s))
        })
        .collect();
    report.records_deleted = done.len();
    report.records_written = usize::from(!new_packs.is_empty() || !new_snaps.is_empty());
    if opts.dry_run {
        return Ok(report);
    }

    // Act: the new record, then manifests, then packs (pack, then index), then done records.
    // Each change passes `fault::check` first: tests stop a run there, as a kill would.
    let delete = |rel: String| async move {
        crate::fault::check("remote delete", Path::new(&rel)).map_err(|e| remote.err(&rel, e))?;
        remote.delete(&rel).await
    };
    if report.records_written > 0 {
        let mut packs: Vec<String> = new_packs.iter().map(PackId::to_hex).collect();
        packs.sort();
        let body = RecordBody {
            version: 1,
            started_ms: now,
            packs,
            snapshots: new_snaps.iter().map(SnapshotId::to_hex).collect(),
        };
        let bytes = serde_json::to_vec(&body).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let rel = format!("gc/{RECORD_PREFIX}{now}-{run}");
        crate::fault::check("remote put", Path::new(&rel)).map_err(|e| remote.err(&rel, e))?;
        remote.block_on(remote.put(&rel, Bytes::from(bytes)))?;
    }
    remote.block_on(async {
        for id in &due_snaps {
            delete(format!("snapshots/{}", id.to_hex())).await?;
        }
        for p in &delete_packs {
            delete(format!("packs/{}", p.file_name())).await?;
            delete(format!("index/{}.idx", p.to_hex())).await?;
        }
        for r in &done {
            delete(r.rel.clone()).await?;
        }
        // Clock objects of runs that died.
        for (name, _, at) in remote.list_times("gc").await? {
            if name.starts_with(CLOCK_PREFIX) && at < now - STALE_CLOCK_MS {
                remote.delete(&format!("gc/{name}")).await?;
            }
        }
        Ok::<(), Error>(())
    })?;
    remote.refresh_index()?;
    DiskFrameCache::remove_packs(&remote.frame_cache_dir(), &deleted_packs);
    Ok(report)
}

/// Deletes the refs `names` on `remote` (their manifests stay until a gc). Every name must
/// exist; nothing is deleted otherwise. Returns each name and the snapshot it named.
pub fn remove_refs(remote: &Remote, names: &[String]) -> Result<Vec<(String, SnapshotId)>> {
    let mut found = Vec::new();
    for name in names {
        check_name(name).map_err(Error::InvalidArgument)?;
        let id = remote.head_of(name)?.ok_or_else(|| {
            Error::InvalidArgument(format!("remote {} has no name {name}", remote.name()))
        })?;
        found.push((name.clone(), id));
    }
    for (name, _) in &found {
        remote.block_on(remote.delete(&format!("refs/{name}")))?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests;
