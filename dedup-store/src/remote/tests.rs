//! Push, pull and verify against a directory remote (the S3 side is driven through the CLI by
//! tests/integration/remote.rs, against moto).

use std::sync::Arc;

use super::*;
use crate::chunker::cdc::xorshift_bytes;
use crate::store::tests::{commit_disk, read_all, tmp};
use crate::store::{Access, Store};

fn remote_at(store: &Store, dir: &Path) -> Arc<Remote> {
    let _ = add_remote(store.root(), "r", &dir.display().to_string());
    Arc::new(Remote::open(store.root(), "r").unwrap())
}

fn all_refs(store: &Store) -> Vec<(String, SnapshotId, bool)> {
    store
        .refs()
        .unwrap()
        .into_iter()
        .map(|(n, id)| (n, id, true))
        .collect()
}

#[test]
fn urls_parse_to_buckets_and_directories() {
    assert_eq!(
        parse_url("s3://bk/a/b/").unwrap(),
        Target::S3 {
            bucket: "bk".into(),
            prefix: "a/b/".into()
        }
    );
    assert_eq!(
        parse_url("s3://bk").unwrap(),
        Target::S3 {
            bucket: "bk".into(),
            prefix: String::new()
        }
    );
    assert_eq!(
        parse_url("file:///x/y").unwrap(),
        Target::Dir(PathBuf::from("/x/y"))
    );
    assert_eq!(parse_url("/x").unwrap(), Target::Dir(PathBuf::from("/x")));
    for bad in ["s3://", "s3:///p", "s3://b/../x", "http://h/b", ""] {
        assert!(parse_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn remotes_are_added_listed_and_removed() {
    let dir = tmp("remote-config");
    let store = Store::create(&dir, Default::default()).unwrap();
    add_remote(store.root(), "site-b", "s3://bk/p").unwrap();
    assert!(add_remote(store.root(), "site-b", "s3://bk/q").is_err());
    assert!(add_remote(store.root(), "../x", "s3://bk/q").is_err());
    assert_eq!(
        list_remotes(store.root())
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![("site-b".to_string(), "s3://bk/p".to_string())]
    );
    remove_remote(store.root(), "site-b").unwrap();
    assert!(list_remotes(store.root()).unwrap().is_empty());
    assert!(remove_remote(store.root(), "site-b").is_err());
}

#[test]
fn push_sends_only_what_changed_and_pull_reads_back_the_same() {
    let dir = tmp("remote-push-pull");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    let mut v1 = xorshift_bytes(7, 2 << 20);
    commit_disk(&src, "disk", &v1);
    let remote = remote_at(&src, &dir.join("remote"));
    let first = push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    assert_eq!(first.snapshots_pushed.len(), 1);
    assert!(first.chunks_needed > 100, "{first:?}");

    // 16 KiB changed: one chunk and the map nodes above it.
    v1[(1 << 20)..(1 << 20) + 16384].copy_from_slice(&xorshift_bytes(8, 16384));
    commit_disk(&src, "disk", &v1);
    let second = push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    assert_eq!(second.snapshots_pushed.len(), 1);
    assert!(second.chunks_needed <= 3, "{second:?}");
    assert!(second.bytes_uploaded < 64 << 10, "{second:?}");

    let dst = Arc::new(Store::create(&dir.join("dst"), Default::default()).unwrap());
    let remote2 = remote_at(&dst, &dir.join("remote"));
    let seen = std::sync::Mutex::new(Vec::new());
    let record = |done: u64, total: u64| seen.lock().unwrap().push((done, total));
    let r = crate::remote::pull_with(&dst, &remote2, "disk", Some(&record)).unwrap();
    assert_eq!(r.snapshots_pulled.len(), 2, "{r:?}");
    // Progress: never past its total, and at the end all that was fetched, out of all of it.
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() as u64 > r.chunks_fetched, "{} calls", seen.len());
    assert!(seen.iter().all(|(d, t)| d <= t), "{seen:?}");
    assert_eq!(
        seen.last(),
        Some(&(r.chunk_bytes_fetched, r.chunk_bytes_fetched))
    );
    assert_eq!(r.ref_updated.as_deref(), Some("disk"));
    assert_eq!(read_all(&dst, "disk"), v1);
    assert!(crate::store::verify::verify(&dst).unwrap().is_clean());
    // Again: nothing to fetch.
    let again = pull(&dst, &remote2, "disk").unwrap();
    assert_eq!(again.chunks_fetched, 0);
    assert!(verify_remote(&remote2).unwrap().is_clean());
    // Temporaries a killed writer left beside the objects are not objects: no ref, no pack.
    for (sub, bytes) in [("refs", &b"half"[..]), ("packs", &b""[..])] {
        std::fs::write(dir.join("remote").join(sub).join("tmp-1-1.obj.tmp"), bytes).unwrap();
    }
    let remote3 = remote_at(&dst, &dir.join("remote"));
    assert_eq!(remote3.refs().unwrap().keys().collect::<Vec<_>>(), ["disk"]);
    assert!(verify_remote(&remote3).unwrap().is_clean());
}

#[test]
fn a_mostly_unneeded_pack_is_repacked_not_sent_whole() {
    let dir = tmp("remote-repack");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    let big = xorshift_bytes(9, 4 << 20);
    commit_disk(&src, "big", &big);
    // Same size, the first 256 KiB of `big` and zeros: its chunks sit in big's pack.
    let mut small = vec![0u8; 4 << 20];
    small[..256 << 10].copy_from_slice(&big[..256 << 10]);
    let id = commit_disk(&src, "small", &small);
    let remote = remote_at(&src, &dir.join("remote"));
    let r = push(
        &src,
        &remote,
        &[("small".into(), id, true)],
        &PushOptions::default(),
    )
    .unwrap();
    assert_eq!(r.packs_built, 1, "{r:?}");
    assert!(r.bytes_uploaded < 512 << 10, "{r:?}");
    let dst = Arc::new(Store::create(&dir.join("dst"), Default::default()).unwrap());
    let remote2 = remote_at(&dst, &dir.join("remote"));
    pull(&dst, &remote2, "small").unwrap();
    assert_eq!(read_all(&dst, "small"), small);
}

#[test]
fn verify_remote_names_the_snapshot_a_missing_pack_breaks() {
    let dir = tmp("remote-verify");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    commit_disk(&src, "a", &xorshift_bytes(3, 1 << 20));
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    assert!(verify_remote(&remote).unwrap().is_clean());
    for ent in std::fs::read_dir(dir.join("remote/packs")).unwrap() {
        std::fs::remove_file(ent.unwrap().path()).unwrap();
    }
    let r = verify_remote(&remote).unwrap();
    assert!(!r.is_clean());
    assert_eq!(r.affected.len(), 1, "{r:?}");
    assert!(r.affected.keys().next().unwrap().starts_with("a@"), "{r:?}");
    // Push trusts index objects (they are written only after their pack): with them gone too,
    // and the manifests, the next push sends everything again.
    for ent in std::fs::read_dir(dir.join("remote/index")).unwrap() {
        std::fs::remove_file(ent.unwrap().path()).unwrap();
    }
    std::fs::remove_dir_all(dir.join("remote/snapshots")).unwrap();
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    assert!(verify_remote(&remote).unwrap().is_clean());
}

#[test]
fn damaged_index_objects_are_errors_not_panics() {
    let dir = tmp("remote-index-damage");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    commit_disk(&src, "a", &xorshift_bytes(4, 1 << 20));
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    let idx = std::fs::read_dir(dir.join("remote/index"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::read(&idx).unwrap();
    assert!(remote.parse_index_object("index/x", &good).is_ok());
    for cut in [0, 1, 63, good.len() - 1] {
        assert!(remote.parse_index_object("index/x", &good[..cut]).is_err());
    }
    for at in [0, good.len() / 2, good.len() - 10, good.len() - 40] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        assert!(remote.parse_index_object("index/x", &bad).is_err(), "{at}");
    }
    // A damaged local copy (same length) is fetched again, and repaired.
    remote.refresh_index().unwrap();
    let copy = dir
        .join("src/remotes/r/cache/index")
        .join(idx.file_name().unwrap());
    let mut bad = good.clone();
    bad[5] ^= 1;
    std::fs::write(&copy, &bad).unwrap();
    remote.refresh_index().unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), good);
    assert!(remote.chunk_count() > 0);
    // Damaged on the remote: refresh fails naming the object.
    let mut bad = good.clone();
    bad[5] ^= 1;
    std::fs::write(&idx, &bad).unwrap();
    let _ = std::fs::remove_dir_all(dir.join("src/remotes/r/cache"));
    let e = remote.refresh_index().unwrap_err().to_string();
    assert!(e.contains("index/"), "{e}");
}

#[test]
fn the_rate_limit_paces_bytes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limit = RateLimit::new(200_000);
    let t = std::time::Instant::now();
    rt.block_on(async {
        for _ in 0..5 {
            limit.take(100_000).await;
        }
    });
    // 500 kB at 200 kB/s, the first 200 kB free (a one-second burst): about 1.5 s.
    let s = t.elapsed().as_secs_f64();
    assert!((1.3..3.0).contains(&s), "{s}");
}

#[test]
fn a_store_without_the_remote_is_told_so() {
    let dir = tmp("remote-missing");
    let store = Store::open(&dir, Access::Write).unwrap();
    let e = Remote::open(store.root(), "nope").unwrap_err().to_string();
    assert!(e.contains("no remote nope"), "{e}");
}

#[test]
fn byte_stream_members_push_and_pull_too() {
    use crate::store::stream::{export_stream, import_stream};
    use crate::store::{Member, MemberKind, RefUpdate};
    let dir = tmp("remote-stream");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    let mut data = xorshift_bytes(11, 3 << 20);
    data.extend(std::iter::repeat_n(7u8, 1 << 20));
    let commit = |data: &[u8]| {
        let (layout, size, _) = import_stream(src.chunks().as_ref(), data).unwrap();
        src.chunks().flush().unwrap();
        let member = Member {
            name: "memory".into(),
            kind: MemberKind::Memory,
            size,
            layout,
        };
        src.commit("vm", RefUpdate::NewVersion, |parent| {
            let mut m = Store::new_manifest("test".into(), vec![member]);
            m.parent = parent;
            Ok(m)
        })
        .unwrap()
    };
    commit(&data);
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    data[100_000..100_100].copy_from_slice(&[1; 100]);
    commit(&data);
    let second = push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    assert!(second.chunk_bytes_needed < 1 << 20, "{second:?}");
    assert!(verify_remote(&remote).unwrap().is_clean());

    let dst = Store::create(&dir.join("dst"), Default::default()).unwrap();
    let remote2 = remote_at(&dst, &dir.join("remote"));
    pull(&dst, &remote2, "vm").unwrap();
    let snap = dst.resolve("vm").unwrap();
    let mut out = Vec::new();
    export_stream(
        dst.chunks().as_ref(),
        &snap.manifest.members[0].layout,
        &mut out,
    )
    .unwrap();
    assert!(out == data, "stream round trip through the remote");
}

#[test]
fn lazy_reads_fetch_ahead_once_and_reuse_the_disk_cache() {
    use crate::store::Resolved;
    use crate::store::disk::StoredDisk;
    use image_format::BlockDevice;
    use std::sync::atomic::Ordering::Relaxed;

    let dir = tmp("remote-lazy");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    // Frames of incompressible data (512 KiB of chunks or more each).
    let data = xorshift_bytes(11, 6 << 20);
    commit_disk(&src, "disk", &data);
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    let dst = Store::create(&dir.join("dst"), Default::default()).unwrap();
    let cache = dir.join("dst/remotes/r/cache/frames");
    let read = |read_ahead: u64| {
        let r = remote_at(&dst, &dir.join("remote"));
        r.refresh_index().unwrap();
        let found = r.resolve("disk").unwrap();
        let snap = Resolved::from(found);
        let options = RemoteReadOptions {
            memory_cache: 64 << 20,
            disk_cache: Some((cache.clone(), 64 << 20)),
            // One frame per miss: what comes in larger pieces comes from the read-ahead.
            fetch_window: 1,
            read_ahead,
            ..Default::default()
        };
        let chunks = Arc::new(RemoteChunks::with_options(r, options).unwrap());
        let disk = StoredDisk::open_remote(chunks.clone(), &snap, None).unwrap();
        let mut out = vec![0u8; data.len()];
        for (i, piece) in out.chunks_mut(64 << 10).enumerate() {
            disk.read_at(piece, (i as u64) << 16).unwrap();
        }
        assert!(out == data, "read back differs");
        chunks
    };
    let first = read(READ_AHEAD);
    let s = first.stats();
    let (fetches, ahead) = (s.fetches.load(Relaxed), s.prefetches.load(Relaxed));
    assert!(ahead >= 1, "no read-ahead: {s:?}");
    let files = std::fs::read_dir(&cache).unwrap().count();
    assert!(
        fetches < files,
        "{fetches} fetches for {files} frames, one a miss: {s:?}"
    );
    let held = first.disk_cache_bytes().unwrap();
    assert!(held > 6 << 20, "{held}");
    drop(first);

    // A new reader finds every frame on disk; a damaged copy is fetched again.
    let files = std::fs::read_dir(&cache).unwrap().count();
    assert!(files >= 6, "{files} frames cached");
    let victim = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut b = std::fs::read(&victim).unwrap();
    b[100] ^= 1;
    std::fs::write(&victim, b).unwrap();
    let second = read(0);
    let s = second.stats();
    assert_eq!(s.disk_bad.load(Relaxed), 1, "{s:?}");
    assert_eq!(s.fetches.load(Relaxed), 1, "{s:?}");
    assert_eq!(s.disk_hits.load(Relaxed), files - 1, "{s:?}");
}

/// A store holding one 2 MiB disk `disk`, pushed to a directory remote; an empty store with
/// that remote, its index refreshed, and the disk's bytes.
fn pushed_for_reading(name: &str) -> (PathBuf, Arc<Remote>, Vec<u8>) {
    let dir = tmp(name);
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    let data = xorshift_bytes(17, 2 << 20);
    commit_disk(&src, "disk", &data);
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    let dst = Store::create(&dir.join("dst"), Default::default()).unwrap();
    let r = remote_at(&dst, &dir.join("remote"));
    r.refresh_index().unwrap();
    (dir, r, data)
}

#[test]
fn a_frame_is_checked_once_and_reads_of_it_are_not_hashed_again() {
    use crate::store::Resolved;
    use crate::store::disk::StoredDisk;
    use image_format::BlockDevice;
    use std::sync::atomic::Ordering::Relaxed;

    let (dir, r, data) = pushed_for_reading("remote-check-once");
    let found = r.resolve("disk").unwrap();
    let snap = Resolved::from(found);
    let indexed: usize = r.with_index(|i| i.entries.values().map(|e| e.len()).sum());
    let chunks = Arc::new(RemoteChunks::new(r.clone(), 64 << 20));
    let disk = StoredDisk::open_remote(chunks.clone(), &snap, None).unwrap();
    let s = chunks.stats();
    let mut checked = Vec::new();
    for _pass in 0..2 {
        let mut out = vec![0u8; data.len()];
        for (i, piece) in out.chunks_mut(4096).enumerate() {
            disk.read_at(piece, (i as u64) * 4096).unwrap();
        }
        assert!(out == data, "read back differs");
        checked.push((
            s.chunks_checked.load(Relaxed),
            s.fetches.load(Relaxed),
            s.frames_decoded.load(Relaxed),
        ));
    }
    // 512 reads of 4 KiB a pass: each chunk was hashed once, in the pass that fetched it.
    let (hashed, fetched, decoded) = checked[0];
    assert!(
        hashed > 0 && hashed <= indexed,
        "{hashed} hashes, {indexed} chunks"
    );
    assert_eq!(checked[1], checked[0], "the second pass fetched or hashed");
    assert!(fetched >= 1);
    // Every frame was decoded once, in the first pass (the cache holds them all), none again.
    let frames: usize = r.with_index(|i| i.packs.values().map(|p| p.frames.len()).sum());
    assert_eq!(decoded, frames, "{fetched} fetches");

    // read_into copies the part asked for, and refuses a length the chunk does not have.
    let (id, len) = r.with_index(|i| {
        let (id, (_, loc)) = i.chunks.iter().max_by_key(|(_, (_, l))| l.len).unwrap();
        (*id, loc.len as usize)
    });
    let whole = chunks.get(&id).unwrap();
    assert_eq!(whole.len(), len);
    let mut part = vec![0u8; 50];
    chunks.read_into(&id, len, 100, &mut part).unwrap();
    assert_eq!(part, whole[100..150]);
    assert!(chunks.read_into(&id, len + 1, 0, &mut part).is_err());
    assert!(chunks.read_into(&id, len, len - 10, &mut part).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_chunk_that_does_not_match_its_id_is_never_returned() {
    let (dir, r, _) = pushed_for_reading("remote-bad-id");
    // The index (as an untrusted remote could make it) places chunk `fake` where another chunk
    // is: the frame's bytes are intact, only that id is wrong.
    let fake = ChunkId([0x5a; 32]);
    let (pack, loc, neighbour) = {
        let mut g = r.index.write().unwrap();
        let (&real, &(pack, loc)) = g.chunks.iter().max_by_key(|(_, (_, l))| l.len).unwrap();
        g.chunks.remove(&real);
        g.chunks.insert(fake, (pack, loc));
        // Another chunk of the same frame, if any.
        let neighbour = g
            .chunks
            .iter()
            .find(|(id, (p, l))| **id != fake && *p == pack && l.frame == loc.frame)
            .map(|(id, _)| *id);
        (pack, loc, neighbour)
    };
    let chunks = RemoteChunks::new(r.clone(), 64 << 20);
    let e = chunks.get(&fake).unwrap_err().to_string();
    assert!(e.contains("does not match its id"), "{e}");
    assert!(e.contains(&pack.file_name()), "{e}");
    let mut part = vec![0u8; 16];
    let e = chunks
        .read_into(&fake, loc.len as usize, 0, &mut part)
        .unwrap_err();
    assert!(e.to_string().contains("does not match its id"), "{e}");
    // The frame stays cached (its bytes are intact), but the chunk is never marked checked:
    // each read hashes it again and fails; the other chunks of the frame read.
    assert!(chunks.get(&fake).is_err());
    let s = chunks.stats();
    assert_eq!(s.fetches.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(
        s.chunks_checked.load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    if let Some(n) = neighbour {
        assert_eq!(ChunkId::of(&chunks.get(&n).unwrap()), n);
    }
    // Without id checks (keyless walks), the same bytes are read.
    let unchecked = RemoteChunks::with_options(
        r.clone(),
        RemoteReadOptions {
            check_ids: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(unchecked.get(&fake).unwrap().len(), loc.len as usize);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn directory_remote_objects_are_whole_or_absent_after_a_fault_at_any_operation() {
    let root = tmp("remote-dir-writes");
    std::fs::create_dir_all(&root).unwrap();
    let bytes = xorshift_bytes(3, 100_000);
    for create_only in [false, true] {
        let rel = format!("packs/{create_only}/obj");
        let path = root.join(&rel);
        let mut clean_run = false;
        for fail_at in 1.. {
            let _ = std::fs::remove_dir_all(root.join("packs"));
            crate::fault::plan::arm(Some(fail_at));
            let r = write_dir_object(&root, &rel, &bytes, create_only);
            let plan = crate::fault::plan::disarm();
            if path.exists() {
                // Linked or renamed into place only once its bytes were synced.
                assert!(plan.unsynced.is_empty(), "{fail_at}: {:?}", plan.unsynced);
                assert_eq!(std::fs::read(&path).unwrap(), bytes, "fault at {fail_at}");
            }
            let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(
                leftovers.iter().all(|n| n == "obj"),
                "fault at {fail_at} left {leftovers:?}"
            );
            if r.is_ok() {
                assert!(path.exists());
                clean_run = true;
                break;
            }
        }
        assert!(clean_run);
        // An existing object is never replaced by a create-only write.
        if create_only {
            let other = xorshift_bytes(4, 10);
            assert!(!write_dir_object(&root, &rel, &other, true).unwrap());
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
        } else {
            let other = xorshift_bytes(4, 10);
            assert!(write_dir_object(&root, &rel, &other, false).unwrap());
            assert_eq!(std::fs::read(&path).unwrap(), other);
        }
    }
    for bad in ["", "../x", "/abs", "a/../../b"] {
        assert!(write_dir_object(&root, bad, b"x", false).is_err(), "{bad}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn refreshing_the_index_leaves_another_process_s_cache_copy_being_written() {
    let dir = tmp("remote-cache-temp");
    let src = Store::create(&dir.join("src"), Default::default()).unwrap();
    commit_disk(&src, "a", &xorshift_bytes(4, 1 << 20));
    let remote = remote_at(&src, &dir.join("remote"));
    push(&src, &remote, &all_refs(&src), &PushOptions::default()).unwrap();
    let cache = remote.cache_dir().join("index");
    // One being written (locked, as write_atomic holds it) and one abandoned.
    let busy = cache.join("tmp-1-1.obj.tmp");
    let held = crate::pack::create_locked_temp(&busy, "create").unwrap();
    let stale = cache.join("tmp-1-2.obj.tmp");
    std::fs::write(&stale, b"x").unwrap();
    remote.refresh_index().unwrap();
    assert!(busy.exists());
    assert!(!stale.exists());
    drop(held);
    remote.refresh_index().unwrap();
    assert!(!busy.exists());
}

/// A streamed answer for `exact_body`, as an HTTP store returns it.
fn streamed(
    parts: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
) -> object_store::GetResult {
    object_store::GetResult {
        payload: object_store::GetResultPayload::Stream(parts),
        meta: object_store::ObjectMeta {
            location: object_store::path::Path::from("x"),
            last_modified: Default::default(),
            size: 8192,
            e_tag: None,
            version: None,
        },
        range: 0..8192,
        attributes: Default::default(),
        extensions: Default::default(),
    }
}

#[test]
fn a_body_is_read_no_further_than_the_bytes_expected() {
    use futures::StreamExt;
    let page = || Ok(Bytes::from_static(&[7u8; 4096]));
    // A server that never stops sending: refused once past the size, not buffered on.
    let endless = futures::stream::repeat_with(page).boxed();
    let got = futures::executor::block_on(super::exact_body(streamed(endless), 8192)).unwrap();
    assert_eq!(got, Err(None));
    let short = futures::stream::iter([page()]).boxed();
    let got = futures::executor::block_on(super::exact_body(streamed(short), 8192)).unwrap();
    assert_eq!(got, Err(Some(4096)));
    let exact = futures::stream::iter([page(), page()]).boxed();
    let got = futures::executor::block_on(super::exact_body(streamed(exact), 8192)).unwrap();
    assert_eq!(got.map(|b| b.len()), Ok(8192));
}
