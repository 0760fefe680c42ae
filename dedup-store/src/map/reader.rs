//! Reading a map: point lookups and range walks.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::map::{Geometry, MAX_DEPTH, MapRoot, Node, load_node, span};

/// Nodes a [`Map`] keeps decoded (at most ~8 KiB each): enough for the upper levels of any tree
/// and a working set of leaves.
pub const NODE_CACHE_CAP: usize = 256;

/// An open map: lookups through a bounded cache of decoded nodes.
#[derive(Debug)]
pub struct Map<S: ChunkStore> {
    store: S,
    root: MapRoot,
    geo: Geometry,
    cache: Mutex<NodeCache>,
    cache_cap: usize,
}

#[derive(Debug, Default)]
struct NodeCache {
    nodes: HashMap<ChunkId, Arc<Node>>,
    /// Insertion order, for first-in first-out eviction.
    order: VecDeque<ChunkId>,
}

impl<S: ChunkStore> Map<S> {
    /// Opens the map `root` (no node is read until needed).
    pub fn open(store: S, root: MapRoot) -> Result<Self> {
        Self::with_cache_cap(store, root, NODE_CACHE_CAP)
    }

    /// Like [`Map::open`], keeping up to `nodes` decoded nodes (a long-lived reader, such as a
    /// stored disk served for random reads, keeps its whole working set of leaves).
    pub fn with_cache_cap(store: S, root: MapRoot, nodes: usize) -> Result<Self> {
        let geo = Geometry::of(&root)?;
        Ok(Map {
            store,
            root,
            geo,
            cache: Mutex::new(NodeCache::default()),
            cache_cap: nodes.max(usize::from(MAX_DEPTH)),
        })
    }

    /// The store the map reads from.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The root this map was opened at.
    pub fn root(&self) -> &MapRoot {
        &self.root
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.geo.chunks
    }

    pub(crate) fn node(&self, id: &ChunkId, level: u8, start: u64) -> Result<Arc<Node>> {
        if let Ok(cache) = self.cache.lock()
            && let Some(node) = cache.nodes.get(id)
        {
            // The same bytes can sit at several places only if they fit each (same level and
            // count), so a cached node is re-checked against this place.
            if node.level == level && node.entries.len() == self.geo.count_at(level, start) {
                return Ok(node.clone());
            }
        }
        let node = Arc::new(load_node(&self.store, &self.geo, id, level, start)?);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.nodes.len() >= self.cache_cap
                && let Some(old) = cache.order.pop_front()
            {
                cache.nodes.remove(&old);
            }
            if cache.nodes.insert(*id, node.clone()).is_none() {
                cache.order.push_back(*id);
            }
        }
        Ok(node)
    }

    /// The id of chunk `index`, or None when it is zero. Loads at most `depth` nodes.
    pub fn get(&self, index: u64) -> Result<Option<ChunkId>> {
        if index >= self.geo.chunks {
            return Err(Error::InvalidArgument(format!(
                "chunk index {index} is past the map's {} chunks",
                self.geo.chunks
            )));
        }
        let mut current = self.root.root;
        let mut level = self.geo.depth - 1;
        let mut start = 0u64;
        while let Some(id) = current {
            let node = self.node(&id, level, start)?;
            let slot = (u128::from(index - start) / span(level)) as usize;
            let entry = node.entries[slot];
            if level == 0 {
                return Ok(entry);
            }
            start = self.geo.entry_range(level, start, slot).0;
            level -= 1;
            current = entry;
        }
        Ok(None)
    }

    /// Walks chunks `from..to` (clamped to the map) as runs in ascending order: each stored
    /// chunk as a run of one with its id, each stretch of zero chunks as one run with None.
    /// Zero subtrees are never loaded, so a sparse map costs O(allocated).
    pub fn iter_range(&self, from: u64, to: u64) -> RangeIter<'_, S> {
        let to = to.min(self.geo.chunks);
        RangeIter {
            map: self,
            from,
            to,
            stack: Vec::new(),
            zero: None,
            held: None,
            root_pending: from < to,
        }
    }
}

struct Frame {
    node: Arc<Node>,
    level: u8,
    start: u64,
    slot: usize,
}

/// The runs of [`Map::iter_range`].
pub struct RangeIter<'m, S: ChunkStore> {
    map: &'m Map<S>,
    from: u64,
    to: u64,
    stack: Vec<Frame>,
    /// A zero run being extended.
    zero: Option<Range<u64>>,
    /// A data run found while a zero run was still to be returned.
    held: Option<(Range<u64>, Option<ChunkId>)>,
    root_pending: bool,
}

impl<S: ChunkStore> std::fmt::Debug for RangeIter<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeIter")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("depth", &self.stack.len())
            .finish()
    }
}

impl<S: ChunkStore> RangeIter<'_, S> {
    /// The next run before coalescing: a zero span or one stored chunk.
    fn next_raw(&mut self) -> Option<Result<(Range<u64>, Option<ChunkId>)>> {
        let geo = self.map.geo;
        if self.root_pending {
            self.root_pending = false;
            let top = geo.depth - 1;
            match self.map.root.root {
                None => return Some(Ok((self.from..self.to, None))),
                Some(id) => match self.map.node(&id, top, 0) {
                    Ok(node) => self.stack.push(Frame {
                        node,
                        level: top,
                        start: 0,
                        slot: (u128::from(self.from) / span(top)) as usize,
                    }),
                    Err(e) => return Some(Err(e)),
                },
            }
        }
        loop {
            let frame = self.stack.last_mut()?;
            if frame.slot >= frame.node.entries.len() {
                self.stack.pop();
                continue;
            }
            let (s, e) = geo.entry_range(frame.level, frame.start, frame.slot);
            if s >= self.to {
                self.stack.clear();
                return None;
            }
            let entry = frame.node.entries[frame.slot];
            let level = frame.level;
            frame.slot += 1;
            let run = s.max(self.from)..e.min(self.to);
            match entry {
                None => return Some(Ok((run, None))),
                Some(id) if level == 0 => return Some(Ok((run, Some(id)))),
                Some(id) => match self.map.node(&id, level - 1, s) {
                    Ok(node) => self.stack.push(Frame {
                        node,
                        level: level - 1,
                        start: s,
                        slot: (u128::from(run.start - s) / span(level - 1)) as usize,
                    }),
                    Err(e) => {
                        self.stack.clear();
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}

impl<S: ChunkStore> Iterator for RangeIter<'_, S> {
    type Item = Result<(Range<u64>, Option<ChunkId>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(held) = self.held.take() {
            return Some(Ok(held));
        }
        loop {
            match self.next_raw() {
                None => return self.zero.take().map(|z| Ok((z, None))),
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok((run, None))) => match &mut self.zero {
                    Some(z) if z.end == run.start => z.end = run.end,
                    Some(_) => {
                        let done = self.zero.replace(run).expect("checked some");
                        return Some(Ok((done, None)));
                    }
                    None => self.zero = Some(run),
                },
                Some(Ok(data)) => {
                    return match self.zero.take() {
                        Some(z) => {
                            self.held = Some(data);
                            Some(Ok((z, None)))
                        }
                        None => Some(Ok(data)),
                    };
                }
            }
        }
    }
}
