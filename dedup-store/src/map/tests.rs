//! Properties of maps as a whole: builder, reader, update and diff against a `Vec` model.

use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::chunk::MemoryChunkStore;

const TIB: u64 = 1 << 40;

/// A store that counts the chunks read from it.
#[derive(Debug, Default)]
struct CountingStore {
    inner: MemoryChunkStore,
    gets: AtomicU64,
}

impl CountingStore {
    fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }
}

impl ChunkStore for CountingStore {
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.inner.put(id, data)
    }
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(id)
    }
    fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.inner.contains(id)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
}

/// splitmix64: a seeded generator, so every failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn data_id(i: u64) -> ChunkId {
    ChunkId::of(&i.to_le_bytes())
}

/// A random model: each chunk zero with probability 1 - density/100, ids from a small pool so
/// leaves repeat and deduplicate.
fn random_model(rng: &mut Rng, chunks: u64, density: u64) -> Vec<Option<ChunkId>> {
    (0..chunks)
        .map(|_| (rng.below(100) < density).then(|| data_id(rng.below(50))))
        .collect()
}

fn build_streaming(store: &impl ChunkStore, model: &[Option<ChunkId>], size: u64) -> MapRoot {
    let mut b = MapBuilder::new(store, size, 4096).unwrap();
    for (i, id) in model.iter().enumerate() {
        if id.is_some() {
            b.push(i as u64, *id).unwrap();
        }
    }
    b.finish().unwrap()
}

fn walk(
    map: &Map<impl ChunkStore>,
    from: u64,
    to: u64,
) -> Vec<(std::ops::Range<u64>, Option<ChunkId>)> {
    map.iter_range(from, to).map(Result::unwrap).collect()
}

/// The runs the model expects from `iter_range`.
fn model_runs(
    model: &[Option<ChunkId>],
    from: u64,
    to: u64,
) -> Vec<(std::ops::Range<u64>, Option<ChunkId>)> {
    let mut out: Vec<(std::ops::Range<u64>, Option<ChunkId>)> = Vec::new();
    for i in from..to.min(model.len() as u64) {
        match model[i as usize] {
            Some(id) => out.push((i..i + 1, Some(id))),
            None => match out.last_mut() {
                Some((r, None)) if r.end == i => r.end = i + 1,
                _ => out.push((i..i + 1, None)),
            },
        }
    }
    out
}

fn model_diff(a: &[Option<ChunkId>], b: &[Option<ChunkId>]) -> Vec<DiffEntry> {
    (0..a.len())
        .filter(|&i| a[i] != b[i])
        .map(|i| DiffEntry {
            range: i as u64..i as u64 + 1,
            old: a[i],
            new: b[i],
        })
        .collect()
}

#[test]
fn depth_follows_size_chunk_size_and_fanout() {
    assert_eq!(MapRoot::new(None, 0, 4096).unwrap().depth, 1);
    assert_eq!(MapRoot::new(None, 256 * 4096, 4096).unwrap().depth, 1);
    assert_eq!(MapRoot::new(None, 256 * 4096 + 1, 4096).unwrap().depth, 2);
    assert_eq!(MapRoot::new(None, TIB, 4096).unwrap().depth, 4);
    assert_eq!(MapRoot::new(None, u64::MAX, 4096).unwrap().depth, 7);
    assert!(MapRoot::new(None, TIB, 3000).is_err());
    assert!(MapRoot::new(None, TIB, 2048).is_err());
    assert!(MapRoot::new(None, TIB, 8 << 20).is_err());
}

#[test]
fn small_map_root_matches_the_golden_id() {
    let store = MemoryChunkStore::new();
    let mut b = MapBuilder::new(&store, 10 * 4096 - 100, 4096).unwrap();
    for i in (0..10).step_by(2) {
        b.push(i, Some(data_id(i))).unwrap();
    }
    let root = b.finish().unwrap();
    assert_eq!(
        root.root.unwrap().to_hex(),
        "8b9e38bd6762e17f73acf3b983706a61909db2da841bb75d30e8f20502919e10"
    );
    assert_eq!((root.depth, store.len()), (1, 1));
    // The root is the one leaf, spelled out from the documented layout.
    let mut leaf = node::NODE_MAGIC.to_vec();
    leaf.extend_from_slice(&[1, 0, 0, 0, 10, 0, 0, 0, 0b0101_0101, 0b01]);
    for i in (0..10).step_by(2) {
        leaf.extend_from_slice(&data_id(i).0);
    }
    assert_eq!(root.root, Some(ChunkId::of(&leaf)));
    assert_eq!(store.get(&ChunkId::of(&leaf)).unwrap(), leaf);
}

#[test]
fn two_level_map_root_matches_the_golden_id() {
    let store = MemoryChunkStore::new();
    let mut b = MapBuilder::new(&store, 300 * 4096, 4096).unwrap();
    b.push(3, Some(data_id(3))).unwrap();
    b.push(299, Some(data_id(299))).unwrap();
    let root = b.finish().unwrap();
    assert_eq!(
        root.root.unwrap().to_hex(),
        "0af23b1c5fbbdc6f938d77af38a175584a563877c4cc9330edf2a92201f4420d"
    );
    assert_eq!((root.depth, store.len()), (2, 3));
}

#[test]
fn empty_terabyte_disk_stores_nothing() {
    let store = MemoryChunkStore::new();
    let root = MapBuilder::new(&store, TIB, 4096)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(root.root, None);
    assert!(store.is_empty());
    let map = Map::open(&store, root).unwrap();
    assert_eq!(walk(&map, 0, u64::MAX), vec![(0..TIB / 4096, None)]);
    assert_eq!(map.get(TIB / 4096 - 1).unwrap(), None);
}

#[test]
fn sparse_terabyte_map_builds_and_walks_in_o_allocated() {
    let store = CountingStore::default();
    let chunks = TIB / 4096;
    let mut rng = Rng(1);
    let mut indexes: Vec<u64> = (0..1000).map(|_| rng.below(chunks)).collect();
    indexes.sort_unstable();
    indexes.dedup();
    let mut b = MapBuilder::new(&store, TIB, 4096).unwrap();
    for &i in &indexes {
        b.push(i, Some(data_id(i))).unwrap();
    }
    let root = b.finish().unwrap();
    let nodes = store.inner.len() as u64;
    assert!(nodes <= indexes.len() as u64 * 4 + 1, "{nodes} nodes");

    let map = Map::open(&store, root).unwrap();
    let runs = walk(&map, 0, chunks);
    let data: Vec<u64> = runs
        .iter()
        .filter(|r| r.1.is_some())
        .map(|r| r.0.start)
        .collect();
    assert_eq!(data, indexes);
    assert_eq!(
        runs.iter().map(|r| r.0.end - r.0.start).sum::<u64>(),
        chunks
    );
    assert!(runs.windows(2).all(|w| w[0].0.end == w[1].0.start));
    // Every stored node is loaded once by the walk, and nothing else.
    assert_eq!(store.gets(), nodes);
    for &i in indexes.iter().step_by(97) {
        assert_eq!(map.get(i).unwrap(), Some(data_id(i)));
        assert_eq!(
            map.get(i ^ 1).unwrap().is_some(),
            indexes.contains(&(i ^ 1))
        );
    }
}

#[test]
fn random_maps_read_back_like_the_model() {
    let mut rng = Rng(2);
    for round in 0..40 {
        let chunks = match round % 4 {
            0 => rng.below(300),
            1 => 256 * rng.below(4),
            2 => 65_536 + rng.below(3000),
            _ => rng.below(20_000),
        };
        let size = chunks * 4096 - if chunks > 0 { rng.below(4096) } else { 0 };
        let density = [0, 1, 30, 100][rng.below(4) as usize];
        let model = random_model(&mut rng, chunks, density);
        let store = MemoryChunkStore::new();
        let root = build_streaming(&store, &model, size);

        // The same map set in random order has the same root.
        let store2 = MemoryChunkStore::new();
        let mut b = MapBuilder::new(&store2, size, 4096).unwrap();
        let mut order: Vec<u64> = (0..chunks).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &i in &order {
            b.set(i, model[i as usize]).unwrap();
        }
        assert_eq!(b.finish().unwrap(), root, "round {round}");

        let map = Map::open(&store, root).unwrap();
        for _ in 0..200.min(chunks) {
            let i = rng.below(chunks);
            assert_eq!(
                map.get(i).unwrap(),
                model[i as usize],
                "round {round} chunk {i}"
            );
        }
        assert_eq!(
            walk(&map, 0, chunks),
            model_runs(&model, 0, chunks),
            "round {round}"
        );
        for _ in 0..5 {
            let from = rng.below(chunks + 1);
            let to = from + rng.below(chunks + 10);
            assert_eq!(
                walk(&map, from, to),
                model_runs(&model, from, to),
                "round {round} {from}..{to}"
            );
        }
    }
}

#[test]
fn updates_and_diffs_match_the_model() {
    let mut rng = Rng(3);
    for round in 0..30 {
        let chunks = [1, 200, 256, 257, 5000, 66_000][rng.below(6) as usize];
        let density = [0, 5, 50][rng.below(3) as usize];
        let model = random_model(&mut rng, chunks, density);
        let store = MemoryChunkStore::new();
        let root = build_streaming(&store, &model, chunks * 4096);
        let mut changed = model.clone();
        let changes: Vec<(u64, Option<ChunkId>)> = (0..rng.below(40))
            .map(|_| {
                let i = rng.below(chunks);
                let id = (rng.below(3) != 0).then(|| data_id(1000 + rng.below(20)));
                changed[i as usize] = id;
                (i, id)
            })
            .collect();
        let new = Map::update(&store, &root, changes).unwrap();
        assert_eq!(new.depth, root.depth);
        // Copy-on-write gives the same tree as building the result from scratch.
        assert_eq!(
            new,
            build_streaming(&MemoryChunkStore::new(), &changed, chunks * 4096)
        );
        let old_map = Map::open(&store, root).unwrap();
        let new_map = Map::open(&store, new).unwrap();
        assert_eq!(
            walk(&old_map, 0, chunks),
            model_runs(&model, 0, chunks),
            "round {round}"
        );
        assert_eq!(
            walk(&new_map, 0, chunks),
            model_runs(&changed, 0, chunks),
            "round {round}"
        );
        let d: Vec<DiffEntry> = diff(&store, &root, &new)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(d, model_diff(&model, &changed), "round {round}");
        let back: Vec<DiffEntry> = diff(&store, &new, &root)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(back, model_diff(&changed, &model), "round {round}");
    }
}

#[test]
fn clone_is_the_same_root_and_diffs_empty() {
    let store = CountingStore::default();
    let root = build_streaming(&store, &[Some(data_id(1)); 1000], 1000 * 4096);
    let clone = root;
    let gets = store.gets();
    assert_eq!(diff(&store, &root, &clone).unwrap().count(), 0);
    assert_eq!(store.gets(), gets);
    assert_eq!(Map::update(&store, &root, []).unwrap(), root);
}

#[test]
fn chain_of_fifty_clones_stores_one_path_per_write_and_reads_at_equal_depth() {
    let store = MemoryChunkStore::new();
    let mut rng = Rng(4);
    let mut b = MapBuilder::new(&store, TIB, 4096).unwrap();
    for i in (0..TIB / 4096).step_by(1 << 20) {
        b.push(i, Some(data_id(i))).unwrap();
    }
    let base = b.finish().unwrap();
    let mut roots = vec![base];
    for n in 0..50u64 {
        let before = store.len();
        let parent = *roots.last().unwrap();
        let i = rng.below(TIB / 4096);
        let next = Map::update(&store, &parent, [(i, Some(data_id(10_000 + n)))]).unwrap();
        assert!(
            store.len() - before <= usize::from(base.depth),
            "clone {n} wrote {} nodes",
            store.len() - before
        );
        assert_eq!(next.depth, base.depth);
        assert_eq!(
            Map::open(&store, next).unwrap().get(i).unwrap(),
            Some(data_id(10_000 + n))
        );
        roots.push(next);
    }
    // Every clone still reads its own data, with the same number of node loads.
    let counting = CountingStore {
        inner: store,
        gets: AtomicU64::new(0),
    };
    let mut loads = Vec::new();
    for root in &roots {
        let map = Map::open(&counting, *root).unwrap();
        let before = counting.gets();
        assert_eq!(map.get(0).unwrap(), Some(data_id(0)));
        loads.push(counting.gets() - before);
    }
    assert!(
        loads.iter().all(|&l| l == u64::from(base.depth)),
        "{loads:?}"
    );
}

#[test]
fn diff_of_a_sparse_terabyte_map_loads_only_the_changed_paths() {
    let store = CountingStore::default();
    let chunks = TIB / 4096;
    let mut b = MapBuilder::new(&store, TIB, 4096).unwrap();
    for i in (0..chunks).step_by(1 << 14) {
        b.push(i, Some(data_id(i))).unwrap();
    }
    let a = b.finish().unwrap();
    let changes = [
        (5, Some(data_id(5))),
        (chunks / 2, None),
        (chunks - 1, Some(data_id(7))),
    ];
    let b = Map::update(&store, &a, changes).unwrap();
    let before = store.gets();
    let d: Vec<DiffEntry> = diff(&store, &a, &b).unwrap().map(Result::unwrap).collect();
    let loads = store.gets() - before;
    assert_eq!(
        d,
        vec![
            DiffEntry {
                range: 5..6,
                old: None,
                new: Some(data_id(5))
            },
            DiffEntry {
                range: chunks / 2..chunks / 2 + 1,
                old: Some(data_id(chunks / 2)),
                new: None
            },
            DiffEntry {
                range: chunks - 1..chunks,
                old: None,
                new: Some(data_id(7))
            },
        ]
    );
    assert!(loads <= 2 * u64::from(a.depth) * 3, "{loads} node loads");
}

#[test]
fn builder_rejects_indexes_out_of_range_or_already_streamed() {
    let store = MemoryChunkStore::new();
    let mut b = MapBuilder::new(&store, 10 * 4096, 4096).unwrap();
    assert!(b.push(10, None).is_err());
    b.push(5, Some(data_id(5))).unwrap();
    assert!(b.push(5, None).is_err());
    assert!(b.set(2, None).is_err());
    b.set(9, Some(data_id(9))).unwrap();
    b.set(7, Some(data_id(7))).unwrap();
    let root = b.finish().unwrap();
    let map = Map::open(&store, root).unwrap();
    assert_eq!(map.get(7).unwrap(), Some(data_id(7)));
    assert_eq!(map.get(9).unwrap(), Some(data_id(9)));
    assert!(map.get(10).is_err());
    assert!(Map::update(&store, &root, [(10, None)]).is_err());
}

#[test]
fn a_node_at_the_wrong_place_is_corruption_naming_the_node() {
    let store = MemoryChunkStore::new();
    // A leaf of 3 entries used as the root of a 10-chunk map (which needs 10 entries).
    let leaf = encode_node(0, &[Some(data_id(1)), None, None]);
    let id = ChunkId::of(&leaf);
    store.put(id, &leaf).unwrap();
    let root = MapRoot::new(Some(id), 10 * 4096, 4096).unwrap();
    let err = Map::open(&store, root)
        .unwrap()
        .get(0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("map node {id}")) && err.contains("0xc"),
        "{err}"
    );
    // The same leaf as the root of a two-level map has the wrong level.
    let root = MapRoot::new(Some(id), 300 * 4096, 4096).unwrap();
    let err = Map::open(&store, root)
        .unwrap()
        .get(0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("map node {id}")) && err.contains("0xa"),
        "{err}"
    );
    // Garbage bytes under a node id.
    store.put(data_id(99), b"not a node at all").unwrap();
    let root = MapRoot::new(Some(data_id(99)), 10 * 4096, 4096).unwrap();
    let runs: Vec<_> = Map::open(&store, root).unwrap().iter_range(0, 10).collect();
    assert!(
        matches!(&runs[..], [Err(Error::Corrupt { offset: 0, .. })]),
        "{runs:?}"
    );
    assert!(diff(&store, &MapRoot::new(None, 10 * 4096, 4096).unwrap(), &root).is_err());
}

#[test]
fn changed_visits_what_a_holder_of_the_old_map_lacks() {
    use std::collections::HashSet;
    let mut rng = Rng(5);
    for round in 0..20 {
        let chunks = [1, 256, 257, 5000, 66_000][rng.below(5) as usize];
        let model = random_model(&mut rng, chunks, 50);
        let store = MemoryChunkStore::new();
        let root = build_streaming(&store, &model, chunks * 4096);
        let mut after = model.clone();
        let edits: Vec<(u64, Option<ChunkId>)> = (0..rng.below(40))
            .map(|_| {
                let i = rng.below(chunks);
                let id = (rng.below(3) != 0).then(|| data_id(2000 + rng.below(20)));
                after[i as usize] = id;
                (i, id)
            })
            .collect();
        let new = Map::update(&store, &root, edits).unwrap();
        let nodes_of = |r: &MapRoot| {
            let mut nodes = HashSet::new();
            crate::map::walk(
                &store,
                r,
                &mut |id, is_node| {
                    if is_node {
                        nodes.insert(*id);
                    }
                    true
                },
                &mut |id, e| panic!("{id}: {e}"),
            )
            .unwrap();
            nodes
        };
        let (old_nodes, new_nodes) = (nodes_of(&root), nodes_of(&new));
        let (mut leaves, mut nodes) = (HashSet::new(), HashSet::new());
        changed(&store, Some(&root), &new, &mut |id, is_node| {
            if is_node {
                nodes.insert(*id)
            } else {
                leaves.insert(*id);
                true
            }
        })
        .unwrap();
        let want: HashSet<ChunkId> = model_diff(&model, &after)
            .iter()
            .filter_map(|d| d.new)
            .collect();
        assert_eq!(leaves, want, "round {round}");
        assert!(nodes.is_subset(&new_nodes), "round {round}");
        assert!(
            new_nodes.difference(&old_nodes).all(|n| nodes.contains(n)),
            "round {round}"
        );
        // With no old map, everything.
        let mut all = HashSet::new();
        changed(&store, None, &new, &mut |id, is_node| {
            if is_node { all.insert(*id) } else { true }
        })
        .unwrap();
        assert_eq!(all, new_nodes, "round {round}");
    }
}
