//! Garbage collection: mark from every name, sweep the rest, repack packs mostly dead.
//!
//! Runs with the store opened [`Access::Exclusive`](crate::store::Access::Exclusive): no other
//! process uses the store meanwhile (imports wait for the gc, and the gc waits for them).
//!
//! 1. Live snapshots: every ref's snapshot, every volume's base, and their ancestors (as far as
//!    their manifests exist).
//! 2. Mark: every node and chunk of their maps and recipes; shared subtrees are walked once.
//!    A node that cannot be read stops the gc (what lies below it cannot be known).
//! 3. Manifests no name reaches are removed first, so no manifest ever points at swept chunks.
//! 4. Each live chunk is kept once (packs most alive first claim it). A pack with nothing live is
//!    deleted; a pack whose live bytes are under the threshold has its live chunks copied into
//!    new packs (durable and indexed) before it is deleted. The index is rebuilt last; a crash
//!    before that leaves index entries for deleted packs, and the next open rebuilds it.

use std::collections::{HashMap, HashSet};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::map::walk;
use crate::pack::PackId;
use crate::store::{Layout, Manifest, SnapshotId, Store};

/// Settings of a gc.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Packs whose live fraction (of plaintext bytes) is below this are repacked.
    pub repack_below: f64,
    /// Report only; change nothing.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            repack_below: 0.5,
            dry_run: false,
        }
    }
}

/// What a gc found and did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Snapshots some name reaches.
    pub live_snapshots: usize,
    /// Manifests removed (nothing reaches them).
    pub removed_snapshots: usize,
    /// Distinct live chunks (map nodes included).
    pub live_chunks: usize,
    /// Packs before.
    pub packs_before: usize,
    /// Packs deleted outright (nothing live).
    pub packs_deleted: usize,
    /// Packs whose live chunks were copied into new packs.
    pub packs_repacked: usize,
    /// Packs written by repacking.
    pub packs_written: usize,
    /// Bytes of pack files before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Every snapshot a name or a volume reaches (a volume's base is a root: its log is written
/// over it), with its manifest.
pub fn live_snapshots(store: &Store) -> Result<HashMap<SnapshotId, Manifest>> {
    let mut live = HashMap::new();
    let roots = store
        .refs()?
        .into_values()
        .chain(crate::store::volume::bases(store)?.into_values());
    for id in roots {
        for (sid, m) in store.lineage(&id)? {
            if live.insert(sid, m).is_some() {
                break;
            }
        }
    }
    Ok(live)
}

/// Marks every chunk the manifests refer to. Stops at the first chunk that cannot be read.
pub fn mark<'a>(
    store: &Store,
    manifests: impl IntoIterator<Item = &'a Manifest>,
) -> Result<HashSet<ChunkId>> {
    let mut live = HashSet::new();
    for m in manifests {
        for member in &m.members {
            match &member.layout {
                Layout::Map { .. } => {
                    let Some(root) = member.map_root() else {
                        continue;
                    };
                    let mut failed = None;
                    walk(
                        store.chunks().as_ref(),
                        &root,
                        &mut |id, _| live.insert(*id),
                        &mut |id, e| {
                            failed.get_or_insert_with(|| {
                                Error::InvalidArgument(format!(
                                    "gc stopped: map node {id} of {} cannot be read ({e}); run vmnest verify",
                                    m.name
                                ))
                            });
                        },
                    )?;
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                Layout::Recipe { parts, .. } => {
                    for part in parts {
                        live.insert(*part);
                        for id in crate::store::stream::part_chunks(store.chunks().as_ref(), part)?
                        {
                            live.insert(id);
                        }
                    }
                }
            }
        }
    }
    Ok(live)
}

/// Collects garbage; see the module documentation.
pub fn gc(store: &Store, options: GcOptions) -> Result<GcReport> {
    let mut report = GcReport::default();
    let live_snaps = live_snapshots(store)?;
    report.live_snapshots = live_snaps.len();
    let live = mark(store, live_snaps.values())?;
    report.live_chunks = live.len();
    let dead_snaps: Vec<SnapshotId> = store
        .snapshots()?
        .into_iter()
        .filter(|id| !live_snaps.contains_key(id))
        .collect();
    report.removed_snapshots = dead_snaps.len();
    if !options.dry_run {
        for id in &dead_snaps {
            store.remove_manifest(id)?;
        }
        crate::pack::sync_dir(&store.root().join("snapshots"))?;
    }

    let chunks = store.chunks();
    let mut packs = chunks.packs();
    report.packs_before = packs.len();
    report.bytes_before = chunks.packed_bytes();
    // Packs with the most live bytes first claim the chunks they hold.
    let live_bytes = |p: &crate::pack::PackReader| -> u64 {
        p.entries()
            .iter()
            .filter(|e| live.contains(&e.id))
            .map(|e| u64::from(e.loc.len))
            .sum()
    };
    packs.sort_by_key(|p| std::cmp::Reverse(live_bytes(p)));
    let mut claimed: HashSet<ChunkId> = HashSet::new();
    let mut delete: Vec<PackId> = Vec::new();
    let mut move_out: Vec<(
        std::sync::Arc<crate::pack::PackReader>,
        Vec<crate::pack::PackEntry>,
    )> = Vec::new();
    for pack in &packs {
        let total: u64 = pack.entries().iter().map(|e| u64::from(e.loc.len)).sum();
        let mine: Vec<crate::pack::PackEntry> = pack
            .entries()
            .iter()
            .filter(|e| live.contains(&e.id) && !claimed.contains(&e.id))
            .copied()
            .collect();
        let mine_bytes: u64 = mine.iter().map(|e| u64::from(e.loc.len)).sum();
        if mine.is_empty() {
            delete.push(pack.id());
            report.packs_deleted += 1;
        } else if (mine_bytes as f64) < options.repack_below * total as f64 {
            claimed.extend(mine.iter().map(|e| e.id));
            delete.push(pack.id());
            report.packs_repacked += 1;
            move_out.push((pack.clone(), mine));
        } else {
            claimed.extend(mine.iter().map(|e| e.id));
        }
    }
    if options.dry_run {
        report.bytes_after = report.bytes_before;
        return Ok(report);
    }
    // Copy what must survive first (durable and indexed), then delete.
    let moved = move_out.iter().flat_map(|(pack, entries)| {
        entries.iter().map(move |e| {
            let meta = pack.is_meta(e.loc);
            pack.read_at(&e.id, e.loc, None)
                .map(|data| (e.id, data, meta))
        })
    });
    report.packs_written = chunks.write_packs(moved)?;
    chunks.delete_packs(&delete)?;
    report.bytes_after = chunks.packed_bytes();
    Ok(report)
}
