//! Pull: copy a remote snapshot (and the part of its lineage the local store lacks) into the
//! local store, fetching only chunks the local store lacks.
//!
//! For each snapshot, parents first: the ids it refers to that its parent does not (the parent
//! is local), read through local-then-remote (map nodes come from wherever they are), less what
//! the local store holds; fetched sorted by their place on the remote (so one range GET serves
//! many), verified (frame checksum, chunk BLAKE3) by [`RemoteChunks`], stored, flushed; then the
//! manifest, byte for byte (same id); then, for a name's current snapshot, the local ref, when
//! that moves the name forward (the local snapshot is an ancestor, or the name is new).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::pack::PackId;
use crate::remote::chunks::REMOTE_FRAME_CACHE;
use crate::remote::push::snapshot_err;
use crate::remote::{Remote, RemoteChunks, member_ids};
use crate::store::{MAX_LINEAGE, RefUpdate, Store};

/// Where a chunk is on the remote: pack, frame, offset in the frame (the order fetches take).
type Place = (PackId, u32, u32);

/// Threads fetching chunks at once.
const FETCHERS: usize = 4;

/// What a pull did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PullReport {
    /// The snapshot asked for (`name@id`).
    pub snapshot: String,
    /// Snapshots copied (`name@id`), parents first.
    pub snapshots_pulled: Vec<String>,
    /// The local name moved to it, if one was.
    pub ref_updated: Option<String>,
    /// Chunks and map nodes fetched.
    pub chunks_fetched: u64,
    /// Their plaintext bytes.
    pub chunk_bytes_fetched: u64,
    /// Bytes read from the remote.
    pub bytes_downloaded: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Local chunks first, then the remote's.
struct Layered<'a> {
    local: &'a dyn ChunkStore,
    remote: &'a RemoteChunks,
}

impl ChunkStore for Layered<'_> {
    fn put(&self, id: ChunkId, data: &[u8]) -> Result<bool> {
        self.local.put(id, data)
    }
    fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        if self.local.contains(id)? {
            self.local.get(id)
        } else {
            self.remote.get(id)
        }
    }
    fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.local.contains(id)? || self.remote.contains(id)?)
    }
    fn flush(&self) -> Result<()> {
        self.local.flush()
    }
}

/// Called with (chunk bytes fetched so far, chunk bytes to fetch as known so far: each
/// snapshot of the lineage adds its share when its turn comes), from the fetching threads.
pub type PullProgress<'a> = dyn Fn(u64, u64) + Send + Sync + 'a;

/// Pulls `spec` (`NAME`, `NAME@HEX`, `@HEX`) from `remote` into `store`.
pub fn pull(store: &Store, remote: &Arc<Remote>, spec: &str) -> Result<PullReport> {
    pull_with(store, remote, spec, None)
}

/// [`pull`], reporting its progress to `progress`.
pub fn pull_with(
    store: &Store,
    remote: &Arc<Remote>,
    spec: &str,
    progress: Option<&PullProgress<'_>>,
) -> Result<PullReport> {
    let started = Instant::now();
    let down0 = remote
        .traffic()
        .bytes_down
        .load(std::sync::atomic::Ordering::Relaxed);
    remote.check_keys(store.root(), store.config().encryption.as_ref())?;
    remote.set_keys(store.keys().cloned());
    remote.refresh_index()?;
    let found = remote.resolve(spec)?;
    let (name, id, is_head) = (found.name, found.id, found.is_head);
    let mut report = PullReport {
        snapshot: format!("{name}@{}", id.short()),
        ..Default::default()
    };
    let mut chain = Vec::new();
    // The snapshot's own manifest came with it: not fetched twice.
    let mut next = Some((id, Some((found.bytes, found.manifest))));
    while let Some((s, known)) = next.take() {
        if store.has_manifest(&s) || chain.len() >= MAX_LINEAGE {
            break;
        }
        let got = match known {
            Some(k) => Some(k),
            None => remote.manifest(&s)?,
        };
        // A parent the remote lacks ends the lineage here.
        let Some((bytes, m)) = got else {
            break;
        };
        next = m.parent.map(|p| (p, None));
        chain.push((s, bytes, m));
    }
    chain.reverse();
    let rc = RemoteChunks::new(remote.clone(), REMOTE_FRAME_CACHE);
    let local = store.chunks().as_ref();
    let layered = Layered { local, remote: &rc };
    let done = std::sync::atomic::AtomicU64::new(0);
    let mut total = 0u64;
    for (sid, bytes, m) in chain {
        let base = match m.parent {
            Some(p) if store.has_manifest(&p) => Some(store.manifest(&p)?),
            _ => None,
        };
        let mut seen = HashSet::new();
        let mut want: Vec<ChunkId> = Vec::new();
        let mut failed = None;
        for member in &m.members {
            let old = base.as_ref().and_then(|b| b.member(&member.name));
            member_ids(&layered, old, member, &mut |id, _| {
                if !seen.insert(*id) {
                    return false;
                }
                match local.contains(id) {
                    Ok(true) => {}
                    Ok(false) => want.push(*id),
                    Err(e) => failed = Some(e),
                }
                true
            })
            .map_err(|e| snapshot_err(e, &m, &sid))?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        // One pack per fetcher at a time, in pack order: each range GET (with its read-ahead)
        // then serves the chunks after it, and no two fetchers read the same frames.
        // Each id's place on the remote, looked up once (None: not indexed there; its fetch
        // reports it).
        let mut placed: Vec<(Option<Place>, ChunkId, bool)> = want
            .iter()
            .map(|id| {
                let at = remote.locate(id);
                if let Some((_, l, _)) = &at {
                    total += u64::from(l.len);
                }
                // Map nodes sit in metadata frames on the remote: they stay metadata here,
                // so that what this store pushes on can be walked without its key.
                let meta = at
                    .as_ref()
                    .is_some_and(|(_, l, pack)| crate::pack::in_meta_frame(&pack.frames, *l));
                (at.map(|(p, l, _)| (p, l.frame, l.offset)), *id, meta)
            })
            .collect();
        placed.sort();
        let want: Vec<(ChunkId, bool)> = placed.iter().map(|(_, id, m)| (*id, *m)).collect();
        let tick = |n: u64| {
            let now = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            if let Some(p) = progress {
                p(now, total);
            }
        };
        tick(0);
        let mut groups: Vec<&[(ChunkId, bool)]> = Vec::new();
        let mut start = 0;
        for i in 1..=want.len() {
            let pack = |k: usize| placed[k].0.map(|(p, _, _)| p);
            if i == want.len() || pack(i) != pack(start) {
                groups.push(&want[start..i]);
                start = i;
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let fetched: Vec<Result<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..FETCHERS.min(groups.len()))
                .map(|_| {
                    let (rc, groups, next, tick) = (&rc, &groups, &next, &tick);
                    s.spawn(move || -> Result<u64> {
                        let mut bytes = 0;
                        while let Some(group) =
                            groups.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                        {
                            for (id, meta) in *group {
                                let data = rc.get(id)?;
                                bytes += data.len() as u64;
                                if *meta {
                                    local.put_meta(*id, &data)?;
                                } else {
                                    local.put(*id, &data)?;
                                }
                                tick(data.len() as u64);
                            }
                        }
                        Ok(bytes)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::InvalidArgument("a fetch thread failed".into()))
                    })
                })
                .collect()
        });
        for r in fetched {
            report.chunk_bytes_fetched += r.map_err(|e| snapshot_err(e, &m, &sid))?;
        }
        report.chunks_fetched += want.len() as u64;
        local.flush()?;
        store.import_manifest(&sid, &bytes)?;
        report
            .snapshots_pulled
            .push(format!("{}@{}", m.name, sid.short()));
    }
    if is_head {
        let current = store.head(&name)?;
        let forward = match current {
            None => true,
            Some(c) if c == id => false,
            Some(c) => store.lineage(&id)?.iter().any(|(a, _)| *a == c),
        };
        if forward {
            store.point(&name, &id, RefUpdate::NewVersion)?;
            report.ref_updated = Some(name.clone());
        } else if current != Some(id) {
            return Err(Error::InvalidArgument(format!(
                "local {name} is not an ancestor of the remote's {name}@{}: the snapshot was \
                 pulled (vmnest clone @{} NEW names it) but {name} was left alone",
                id.short(),
                id.to_hex()
            )));
        }
    }
    report.bytes_downloaded = remote
        .traffic()
        .bytes_down
        .load(std::sync::atomic::Ordering::Relaxed)
        - down0;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
