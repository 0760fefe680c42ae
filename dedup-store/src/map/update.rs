//! Copy-on-write updates of a map.

use std::collections::BTreeMap;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::map::{Geometry, Map, MapRoot, load_node, put_node};

impl<S: ChunkStore> Map<S> {
    /// Applies `changes` (chunk index, new id or None for zero; a later change of the same index
    /// wins) to the map `root` and returns the new root. Only the nodes on the paths to changed
    /// leaves are written; every node of `root` stays as it is, so the old root remains valid.
    /// The store is flushed before the root is returned.
    pub fn update(
        store: &S,
        root: &MapRoot,
        changes: impl IntoIterator<Item = (u64, Option<ChunkId>)>,
    ) -> Result<MapRoot> {
        let geo = Geometry::of(root)?;
        let mut sorted = BTreeMap::new();
        for (index, id) in changes {
            if index >= geo.chunks {
                return Err(Error::InvalidArgument(format!(
                    "chunk index {index} is past the map's {} chunks",
                    geo.chunks
                )));
            }
            sorted.insert(index, id);
        }
        if sorted.is_empty() {
            return Ok(*root);
        }
        let changes: Vec<_> = sorted.into_iter().collect();
        let new = rewrite(store, &geo, root.root, geo.depth - 1, 0, &changes)?;
        store.flush()?;
        Ok(MapRoot { root: new, ..*root })
    }
}

/// Rewrites the subtree `id` (None = zero) at `level` starting at chunk `start` with `changes`
/// (sorted, all inside the subtree), returning its new id. Recursion depth is the tree depth.
fn rewrite<S: ChunkStore + ?Sized>(
    store: &S,
    geo: &Geometry,
    id: Option<ChunkId>,
    level: u8,
    start: u64,
    changes: &[(u64, Option<ChunkId>)],
) -> Result<Option<ChunkId>> {
    if changes.is_empty() {
        return Ok(id);
    }
    let mut entries = match id {
        Some(id) => load_node(store, geo, &id, level, start)?.entries,
        None => vec![None; geo.count_at(level, start)],
    };
    let mut rest = changes;
    while let Some(&(first, _)) = rest.first() {
        let slot = (u128::from(first - start) / crate::map::span(level)) as usize;
        let (child_start, child_end) = geo.entry_range(level, start, slot);
        let n = rest.partition_point(|&(i, _)| i < child_end);
        let (group, tail) = rest.split_at(n);
        entries[slot] = if level == 0 {
            group[group.len() - 1].1
        } else {
            rewrite(store, geo, entries[slot], level - 1, child_start, group)?
        };
        rest = tail;
    }
    put_node(store, level, &entries)
}
