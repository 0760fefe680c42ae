//! The difference between two maps of the same geometry.

use std::ops::Range;
use std::sync::Arc;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::map::{Geometry, MapRoot, Node, load_node};

/// One changed chunk: its range (one chunk), its id in the old map and in the new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffEntry {
    pub range: Range<u64>,
    pub old: Option<ChunkId>,
    pub new: Option<ChunkId>,
}

/// The chunks that differ between two maps, in ascending order. Descends only into subtrees whose
/// ids differ and never loads a zero subtree: O(changes × depth) node loads.
pub fn diff<S: ChunkStore>(store: S, old: &MapRoot, new: &MapRoot) -> Result<Diff<S>> {
    let geo = Geometry::of(old)?;
    Geometry::of(new)?;
    if (old.size, old.chunk_size) != (new.size, new.chunk_size) {
        return Err(Error::InvalidArgument(format!(
            "cannot diff maps of different geometry ({} bytes in {}-byte chunks vs {} in {})",
            old.size, old.chunk_size, new.size, new.chunk_size
        )));
    }
    let mut diff = Diff {
        store,
        geo,
        stack: Vec::new(),
    };
    if old.root != new.root {
        let top = geo.depth - 1;
        let a = diff.load(old.root, top, 0)?;
        let b = diff.load(new.root, top, 0)?;
        diff.stack.push(Frame {
            a,
            b,
            level: top,
            start: 0,
            slot: 0,
        });
    }
    Ok(diff)
}

struct Frame {
    a: Option<Arc<Node>>,
    b: Option<Arc<Node>>,
    level: u8,
    start: u64,
    slot: usize,
}

/// The iterator returned by [`diff`].
pub struct Diff<S: ChunkStore> {
    store: S,
    geo: Geometry,
    stack: Vec<Frame>,
}

impl<S: ChunkStore> std::fmt::Debug for Diff<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Diff")
            .field("depth", &self.stack.len())
            .finish()
    }
}

impl<S: ChunkStore> Diff<S> {
    fn load(&self, id: Option<ChunkId>, level: u8, start: u64) -> Result<Option<Arc<Node>>> {
        match id {
            None => Ok(None),
            Some(id) => Ok(Some(Arc::new(load_node(
                &self.store,
                &self.geo,
                &id,
                level,
                start,
            )?))),
        }
    }
}

fn entry(node: &Option<Arc<Node>>, slot: usize) -> Option<ChunkId> {
    node.as_ref().and_then(|n| n.entries[slot])
}

impl<S: ChunkStore> Iterator for Diff<S> {
    type Item = Result<DiffEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let frame = self.stack.last_mut()?;
            if frame.slot >= self.geo.count_at(frame.level, frame.start) {
                self.stack.pop();
                continue;
            }
            let slot = frame.slot;
            frame.slot += 1;
            let (a, b) = (entry(&frame.a, slot), entry(&frame.b, slot));
            if a == b {
                continue;
            }
            let (level, (s, e)) = (
                frame.level,
                self.geo.entry_range(frame.level, frame.start, slot),
            );
            if level == 0 {
                return Some(Ok(DiffEntry {
                    range: s..e,
                    old: a,
                    new: b,
                }));
            }
            let children = self
                .load(a, level - 1, s)
                .and_then(|a| Ok((a, self.load(b, level - 1, s)?)));
            match children {
                Ok((a, b)) => self.stack.push(Frame {
                    a,
                    b,
                    level: level - 1,
                    start: s,
                    slot: 0,
                }),
                Err(err) => {
                    self.stack.clear();
                    return Some(Err(err));
                }
            }
        }
    }
}

/// Visits the ids of map `new` that are not at the same place in map `old`: the map nodes on
/// the paths to changed leaves, and the changed leaves (what a replica holding `old` lacks for
/// `new`). `visit(id, is_node)` returns whether to descend into a node (false for one already
/// seen). With no `old`, or one of another geometry, every id of `new` is visited. Reads only
/// nodes on changed paths: O(changes × depth).
pub fn changed<S: ChunkStore + ?Sized>(
    store: &S,
    old: Option<&MapRoot>,
    new: &MapRoot,
    visit: &mut dyn FnMut(&ChunkId, bool) -> bool,
) -> Result<()> {
    let geo = Geometry::of(new)?;
    let old = old.filter(|o| (o.size, o.chunk_size) == (new.size, new.chunk_size));
    let Some(top) = new.root else {
        return Ok(());
    };
    let mut stack = vec![(old.and_then(|o| o.root), top, geo.depth - 1, 0u64)];
    while let Some((was, id, level, start)) = stack.pop() {
        if was == Some(id) || !visit(&id, true) {
            continue;
        }
        let node = load_node(store, &geo, &id, level, start)?;
        let prior = match was {
            Some(w) => Some(load_node(store, &geo, &w, level, start)?),
            None => None,
        };
        for (slot, entry) in node.entries.iter().enumerate() {
            let Some(child) = entry else { continue };
            let before = prior
                .as_ref()
                .and_then(|p| p.entries.get(slot).copied().flatten());
            if level == 0 {
                if before != Some(*child) {
                    visit(child, false);
                }
            } else {
                let (s, _) = geo.entry_range(level, start, slot);
                stack.push((before, *child, level - 1, s));
            }
        }
    }
    Ok(())
}
