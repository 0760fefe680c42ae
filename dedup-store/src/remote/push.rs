//! Push: send a remote the snapshots (and their lineage) it lacks, and only the chunks it lacks.
//!
//! 1. Refresh the remote's chunk set (its index objects); a pack that landed without its index
//!    (a push killed between the two) gets its index now, read from the pack's own tail.
//! 2. Plan: for each snapshot asked for, its lineage back to the nearest ancestor the remote
//!    has; parents go before children.
//! 3. For each planned snapshot, the ids it refers to that its parent does not (map diff,
//!    O(changes); the whole map when the parent is unknown), less what the remote holds.
//! 4. Packs: a local pack that is at least half needed (by plaintext bytes) is sent unchanged;
//!    the needed chunks of the others are packed afresh into new packs under
//!    `remotes/<name>/staging/`. Deterministically (same chunks, same order, same bytes, same
//!    name), so a re-run after a kill rebuilds the same packs and finds them on the remote.
//! 5. Upload the packs in parallel (bounded; multipart above [`PushOptions::part_size`] × 2;
//!    one HEAD first, so what landed is skipped), then their index objects, then re-list the
//!    index and check that every needed id is there, then the manifests with
//!    If-None-Match: * (the commit point), then the refs.
//!
//! With `gc --remote` (remote/gc.rs): chunks in packs a gc condemned, and condemned manifests,
//! count as absent; before step 5's check the gc records are read again (a pass that relied on
//! something condemned meanwhile starts over), a condemned manifest is never named by a ref,
//! and manifests and refs are written only within the commit window of that check.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::{ChunkLoc, PackId, PackReader, PackWriter, TRAILER_LEN, parse_trailer};
use crate::remote::gc::{COMMIT_WINDOW, Condemned};
use crate::remote::{KeysPublished, Remote, member_ids};
use crate::store::{Manifest, SnapshotId, Store};

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// Uploads at once.
    pub concurrency: usize,
    /// Bytes of a multipart part.
    pub part_size: usize,
    /// Called with (bytes sent, bytes to send) as packs go up.
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
    /// How long after its last look at the gc records the push may write manifests and refs
    /// (see remote/gc.rs).
    pub commit_window: Duration,
    /// Called once per pass just before that last look (tests interleave a gc there).
    pub before_commit: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("concurrency", &self.concurrency)
            .field("part_size", &self.part_size)
            .field("commit_window", &self.commit_window)
            .finish()
    }
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            concurrency: 4,
            part_size: 8 << 20,
            progress: None,
            commit_window: std::env::var("VMNEST_PUSH_WINDOW")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| *s > 0.0 && *s < 86_400.0)
                .map_or(COMMIT_WINDOW, Duration::from_secs_f64),
            before_commit: None,
        }
    }
}

/// What a push did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PushReport {
    /// Snapshots written to the remote (`name@id`), parents first.
    pub snapshots_pushed: Vec<String>,
    /// Snapshots asked for that the remote had already.
    pub snapshots_present: usize,
    /// Refs written.
    pub refs_updated: Vec<String>,
    /// Chunks and map nodes the remote lacked.
    pub chunks_needed: u64,
    /// Their plaintext bytes.
    pub chunk_bytes_needed: u64,
    /// Local packs sent unchanged.
    pub packs_whole: u64,
    /// Packs built from needed chunks of mostly-not-needed local packs.
    pub packs_built: u64,
    /// Packs found on the remote already (an earlier, interrupted push).
    pub packs_skipped: u64,
    /// Objects written (packs, index objects, manifests, refs).
    pub objects_uploaded: u64,
    /// Bytes written.
    pub bytes_uploaded: u64,
    /// Requests retried after transient failures.
    pub retries: u64,
    /// Passes started over because a gc condemned something the push relied on.
    pub restarts: u64,
    /// The remote's `keys` object was replaced: it kept the store's key an older way.
    pub keys_replaced: bool,
    /// The remote's `keys` object keeps the key a newer way than this store (after a `key
    /// change` elsewhere): this store's should be changed too.
    pub keys_outdated: bool,
    /// Wall time.
    pub seconds: f64,
}

/// A local pack and the needed chunks it holds.
type PackShare = (Arc<PackReader>, Vec<(ChunkId, ChunkLoc)>);

/// A pack to send.
#[derive(Debug)]
struct Upload {
    id: PackId,
    path: PathBuf,
    size: u64,
}

/// The index object of the pack at `path`: its bytes from the index section to the end.
fn pack_tail(path: &Path, id: &PackId) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(crate::pack::io_err(path, "open pack"))?;
    let len = f
        .metadata()
        .map_err(crate::pack::io_err(path, "stat pack"))?
        .len();
    let mut tb = [0u8; TRAILER_LEN as usize];
    f.read_exact_at(&mut tb, len.saturating_sub(TRAILER_LEN))
        .map_err(crate::pack::io_err(path, "read pack"))?;
    let t = parse_trailer(&format!("pack {id}"), &tb, len)?;
    let mut out = vec![0u8; (len - t.index_offset) as usize];
    f.read_exact_at(&mut out, t.index_offset)
        .map_err(crate::pack::io_err(path, "read pack"))?;
    Ok(out)
}

/// Gives every pack on the remote that has no index object one, read from the pack itself.
/// A pack whose tail does not parse is left alone (it is never counted as holding anything).
fn index_orphans(remote: &Remote) -> Result<()> {
    let indexed = remote.indexed_packs();
    let listed = remote.block_on(remote.list("packs"))?;
    let mut added = false;
    for (file, size) in listed {
        let Some(id) = file.strip_suffix(".pack").and_then(PackId::from_hex) else {
            continue;
        };
        if indexed.contains(&id) || size < TRAILER_LEN + crate::pack::HEADER_LEN {
            continue;
        }
        let rel = format!("packs/{file}");
        let tail = remote.block_on(async {
            let tb = remote.get_range(&rel, size - TRAILER_LEN..size).await?;
            let t = parse_trailer(&rel, &tb, size)?;
            remote.get_range(&rel, t.index_offset..size).await
        });
        let Ok(tail) = tail else { continue };
        let idx = format!("index/{}.idx", id.to_hex());
        if remote.parse_index_object(&idx, &tail).is_ok() {
            remote.block_on(remote.put(&idx, tail))?;
            added = true;
        }
    }
    if added {
        remote.refresh_index()?;
    }
    Ok(())
}

/// Passes of a push that may start over because a gc condemned what they relied on.
const PASSES: u64 = 4;

/// How a pass ended.
enum Pass {
    Done(PushReport),
    /// Something relied on was condemned meanwhile: go again with these records.
    Again(Condemned),
}

/// Pushes `targets` (name, snapshot, whether to set the remote's ref `name` to it) to `remote`.
pub fn push(
    store: &Store,
    remote: &Remote,
    targets: &[(String, SnapshotId, bool)],
    opts: &PushOptions,
) -> Result<PushReport> {
    let started = Instant::now();
    // Traffic is counted over every pass.
    let t0 = (
        remote.traffic().objects_up.load(Ordering::Relaxed),
        remote.traffic().bytes_up.load(Ordering::Relaxed),
        remote.traffic().retries.load(Ordering::Relaxed),
    );
    let mut condemned = Condemned::read(remote)?;
    for pass in 0..PASSES {
        match push_pass(store, remote, targets, opts, &condemned, (started, t0))? {
            Pass::Done(mut report) => {
                report.restarts = pass;
                return Ok(report);
            }
            Pass::Again(c) => condemned = c,
        }
    }
    Err(remote.err(
        "gc/",
        format!("gc runs kept condemning what the push relied on ({PASSES} passes); try again"),
    ))
}

/// One pass of [`push`], with `condemned` counting as absent.
fn push_pass(
    store: &Store,
    remote: &Remote,
    targets: &[(String, SnapshotId, bool)],
    opts: &PushOptions,
    condemned: &Condemned,
    (started, t0): (Instant, (u64, u64, u64)),
) -> Result<Pass> {
    let cond_packs = condemned.packs();
    let cond_snaps = condemned.snapshots();
    remote.exclude_packs(cond_packs.keys().copied().collect());
    let mut report = PushReport::default();
    // Keys first: refuse a remote of another key (or a plain one holding objects) before
    // anything is sent, and publish this store's encryption section before any object.
    let section = store.config().encryption.as_ref();
    let there = remote.check_keys(store.root(), section)?;
    if let Some(section) = section {
        match remote.publish_keys(section, there.as_ref())? {
            KeysPublished::Kept => {}
            KeysPublished::Replaced => report.keys_replaced = true,
            KeysPublished::RemoteNewer => report.keys_outdated = true,
        }
    }
    remote.set_keys(store.keys().cloned());
    remote.refresh_index()?;
    index_orphans(remote)?;
    let on_remote: HashSet<SnapshotId> = remote
        .snapshots()?
        .into_iter()
        .filter(|s| !cond_snaps.contains_key(s))
        .collect();

    // Plan: missing lineage, parents first.
    let mut plan: Vec<(SnapshotId, Manifest)> = Vec::new();
    let mut planned: HashSet<SnapshotId> = HashSet::new();
    for (_, id, _) in targets {
        if on_remote.contains(id) {
            report.snapshots_present += 1;
        }
        let mut missing = Vec::new();
        for (sid, m) in store.lineage(id)? {
            if on_remote.contains(&sid) || planned.contains(&sid) {
                break;
            }
            missing.push((sid, m));
        }
        for (sid, m) in missing.into_iter().rev() {
            planned.insert(sid);
            plan.push((sid, m));
        }
    }

    // What the remote lacks.
    let chunks = store.chunks();
    let mut seen: HashSet<ChunkId> = HashSet::new();
    let mut needed: Vec<ChunkId> = Vec::new();
    // What the push relies on the remote to keep: chunks it found there, manifests it diffed
    // against.
    let mut relied: Vec<ChunkId> = Vec::new();
    let mut bases: Vec<SnapshotId> = Vec::new();
    for (sid, m) in &plan {
        let base = match m.parent {
            Some(p) if on_remote.contains(&p) || planned.contains(&p) => {
                if !planned.contains(&p) {
                    bases.push(p);
                }
                store.manifest(&p).ok()
            }
            _ => None,
        };
        for member in &m.members {
            let old = base.as_ref().and_then(|b| b.member(&member.name));
            member_ids(chunks.as_ref(), old, member, &mut |id, _| {
                if !seen.insert(*id) {
                    return false;
                }
                if remote.has_chunk(id) {
                    relied.push(*id);
                } else {
                    needed.push(*id);
                }
                true
            })
            .map_err(|e| snapshot_err(e, m, sid))?;
        }
    }
    report.chunks_needed = needed.len() as u64;

    // Which packs carry them.
    let mut by_pack: HashMap<PackId, PackShare> = HashMap::new();
    for id in &needed {
        let (reader, loc) = chunks.locate(id)?.ok_or(Error::MissingChunk(*id))?;
        report.chunk_bytes_needed += u64::from(loc.len);
        by_pack
            .entry(reader.id())
            .or_insert_with(|| (reader, Vec::new()))
            .1
            .push((*id, loc));
    }
    let mut pack_ids: Vec<PackId> = by_pack.keys().copied().collect();
    pack_ids.sort();
    let mut uploads = Vec::new();
    let mut rebuild: Vec<(Arc<PackReader>, ChunkId, ChunkLoc)> = Vec::new();
    for pid in pack_ids {
        let Some((reader, mut list)) = by_pack.remove(&pid) else {
            continue;
        };
        let need: u64 = list.iter().map(|(_, l)| u64::from(l.len)).sum();
        let total: u64 = reader.entries().iter().map(|e| u64::from(e.loc.len)).sum();
        if need * 2 >= total && !cond_packs.contains_key(&pid) {
            report.packs_whole += 1;
            uploads.push(Upload {
                id: pid,
                path: reader.path().to_path_buf(),
                size: reader.file_len(),
            });
        } else {
            list.sort_by_key(|(_, l)| (l.frame, l.offset));
            rebuild.extend(list.into_iter().map(|(id, l)| (reader.clone(), id, l)));
        }
    }
    let staging = remote
        .cache_dir
        .parent()
        .unwrap_or(&remote.cache_dir)
        .join("staging");
    let _ = std::fs::remove_dir_all(&staging);
    if !rebuild.is_empty() {
        std::fs::create_dir_all(&staging)
            .map_err(crate::pack::io_err(&staging, "create staging"))?;
        let mut writer: Option<PackWriter> = None;
        let mut current: Vec<(Arc<PackReader>, ChunkId, ChunkLoc)> = Vec::new();
        let n = rebuild.len();
        for (i, (reader, id, loc)) in rebuild.into_iter().enumerate() {
            let data = reader.read_at(&id, loc, Some(chunks.cache()))?;
            let w = match writer.as_mut() {
                Some(w) => w,
                None => writer.insert(chunks.new_writer(&staging)?),
            };
            if reader.is_meta(loc) {
                w.add_meta(id, &data)?;
            } else {
                w.add(id, &data)?;
            }
            current.push((reader, id, loc));
            let last = i + 1 == n;
            if (w.is_full() || last)
                && let Some(w) = writer.take()
            {
                let mut done = w.finish()?;
                if cond_packs.contains_key(&done.id) {
                    done = salted_pack(&staging, chunks, &current, done)?;
                }
                current.clear();
                report.packs_built += 1;
                uploads.push(Upload {
                    id: done.id,
                    path: done.path,
                    size: done.size,
                });
            }
        }
    }

    // Packs, then their index objects.
    let total: u64 = uploads.iter().map(|u| u.size).sum();
    let sent = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let indexed = remote.indexed_packs();
    remote.block_on(async {
        let results: Vec<Result<()>> = futures::stream::iter(uploads.iter().map(|u| {
            let (sent, skipped) = (&sent, &skipped);
            async move {
                let rel = format!("packs/{}", u.id.file_name());
                if remote.head(&rel).await? == Some(u.size) {
                    skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let bytes = std::fs::read(&u.path)
                        .map_err(crate::pack::io_err(&u.path, "read pack"))?;
                    remote
                        .put_large(&rel, Bytes::from(bytes), opts.part_size.max(5 << 20))
                        .await?;
                }
                let done = sent.fetch_add(u.size, Ordering::Relaxed) + u.size;
                if let Some(p) = &opts.progress {
                    p(done, total);
                }
                Ok(())
            }
        }))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        let results: Vec<Result<()>> =
            futures::stream::iter(uploads.iter().filter(|u| !indexed.contains(&u.id)).map(
                |u| async move {
                    let tail = pack_tail(&u.path, &u.id)?;
                    remote
                        .put(&format!("index/{}.idx", u.id.to_hex()), Bytes::from(tail))
                        .await
                },
            ))
            .buffer_unordered(opts.concurrency.max(1))
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>>>()
    })?;
    report.packs_skipped = skipped.load(Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&staging);

    // Check, then commit: manifests (parents first), then refs. The gc records are read
    // before the index is listed (a gc deletes a pack and its index object before the record
    // that condemned it).
    if let Some(hook) = &opts.before_commit {
        hook();
    }
    let checked = Instant::now();
    let now = Condemned::read(remote)?;
    let now_snaps = now.snapshots();
    remote.exclude_packs(now.packs().keys().copied().collect());
    remote.refresh_index()?;
    // Chunks it sent may have been condemned too (a pack older than the grace, or one an
    // interrupted push had left there).
    let lost = relied
        .iter()
        .chain(&needed)
        .find(|id| !remote.has_chunk(id));
    let lost_base = bases.iter().any(|b| now_snaps.contains_key(b));
    if (lost.is_some() || lost_base) && now.adds_to(condemned) {
        return Ok(Pass::Again(now));
    }
    if let Some(id) = lost {
        return Err(remote.err(
            "index/",
            format!("chunk {id} is missing from the remote's index; no manifest written"),
        ));
    }
    if let Some((name, id, _)) = targets
        .iter()
        .find(|(_, id, set)| *set && now_snaps.contains_key(id))
    {
        return Err(remote.err(
            &format!("snapshots/{}", id.to_hex()),
            format!(
                "{name}@{} is there but condemned by a gc (no name reached it); a gc past the \
                 grace period deletes it, push {name} again after that",
                id.short()
            ),
        ));
    }
    let in_window = |what: &str| -> Result<()> {
        if checked.elapsed() > opts.commit_window {
            return Err(remote.err(
                what,
                format!(
                    "more than {:.0} s passed since the push last read the gc records; not \
                     written, run the push again",
                    opts.commit_window.as_secs_f64()
                ),
            ));
        }
        Ok(())
    };
    for (sid, m) in &plan {
        in_window(&format!("snapshots/{}", sid.to_hex()))?;
        let bytes = store.manifest_bytes(sid)?;
        remote
            .block_on(remote.put_new(&format!("snapshots/{}", sid.to_hex()), Bytes::from(bytes)))?;
        report
            .snapshots_pushed
            .push(format!("{}@{}", m.name, sid.short()));
    }
    for (name, id, set_ref) in targets {
        if *set_ref && remote.head_of(name)? != Some(*id) {
            in_window(&format!("refs/{name}"))?;
            remote.block_on(remote.put(
                &format!("refs/{name}"),
                Bytes::from(format!("{}\n", id.to_hex())),
            ))?;
            report.refs_updated.push(name.clone());
        }
    }
    report.objects_uploaded = remote.traffic().objects_up.load(Ordering::Relaxed) - t0.0;
    report.bytes_uploaded = remote.traffic().bytes_up.load(Ordering::Relaxed) - t0.1;
    report.retries = remote.traffic().retries.load(Ordering::Relaxed) - t0.2;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(Pass::Done(report))
}

/// Builds again the pack `clash` (whose name a gc condemned) from the same chunks with a salt
/// chunk first (random bytes nothing refers to), so it lands under a name no record holds.
fn salted_pack(
    staging: &Path,
    chunks: &crate::pack::PackStore,
    items: &[(Arc<PackReader>, ChunkId, ChunkLoc)],
    clash: crate::pack::FinishedPack,
) -> Result<crate::pack::FinishedPack> {
    let _ = std::fs::remove_file(&clash.path);
    // The store's own writer: an encrypted store's frames are sealed here too.
    let mut w = chunks.new_writer(staging)?;
    let salt = format!(
        "vmnest push salt {:?} {}",
        Instant::now(),
        std::process::id()
    );
    w.add(
        crate::chunk::ChunkStore::id_hasher(chunks).id(salt.as_bytes()),
        salt.as_bytes(),
    )?;
    for (reader, id, loc) in items {
        let data = reader.read_at(id, *loc, Some(chunks.cache()))?;
        if reader.is_meta(*loc) {
            w.add_meta(*id, &data)?;
        } else {
            w.add(*id, &data)?;
        }
    }
    w.finish()
}

/// Adds the snapshot an error concerns to it.
pub(crate) fn snapshot_err(e: Error, m: &Manifest, id: &SnapshotId) -> Error {
    e.noted(&format!("needed by snapshot {}@{}", m.name, id.short()))
}
