use std::path::Path;
use std::sync::Arc;

use image_format::create::ImageWriter;
use image_format::{BlockDevice, ExtentKind};

use super::disk::StoredDisk;
use super::gc::{GcOptions, gc};
use super::import::DiskImporter;
use super::verify::verify;
use super::*;
use crate::chunker::cdc::xorshift_bytes;
use crate::crypt::{Argon2Costs, KeySource};
use crate::{ChunkId, ChunkStore};

/// A passphrase-protected store's key, with argon2 costs low enough for tests.
pub(crate) fn test_key() -> KeySource {
    KeySource::Passphrase(b"correct horse battery staple".to_vec())
}

pub(crate) const TEST_COSTS: Argon2Costs = Argon2Costs {
    memory_kib: 64,
    iterations: 1,
};

/// Opens (creating when missing) the store at `dir`: plain, or encrypted with [`test_key`].
pub(crate) fn open_store(dir: &Path, access: Access, encrypted: bool) -> Store {
    if encrypted && !dir.join("config").exists() {
        return Store::create_encrypted(dir, StoreConfig::default(), &test_key(), TEST_COSTS, None)
            .unwrap();
    }
    let key = encrypted.then(test_key);
    Store::open_keyed(dir, access, key.as_ref(), &mut || {}).unwrap()
}

/// The power cut after an injected fault: files never fsynced lose their content.
fn drop_unsynced(plan: &crate::fault::plan::FaultPlan) {
    for path in &plan.unsynced {
        if path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .unwrap();
        }
    }
}

pub(crate) fn tmp(name: &str) -> PathBuf {
    image_format::scratch::path("store", name)
}

/// Imports `data` as the engine would: windows of 1 MiB, data windows only, ascending commits.
fn import_bytes(store: &Store, data: &[u8], chunk_size: u32) -> Member {
    let (w, handle) =
        DiskImporter::new(store.chunks().clone(), data.len() as u64, chunk_size).unwrap();
    let w: Box<dyn ImageWriter> = Box::new(w);
    let window = 1 << 20;
    let mut off = 0;
    while off < data.len() {
        let end = (off + window).min(data.len());
        let p = w.prepare(off as u64, data[off..end].to_vec()).unwrap();
        w.commit(p).unwrap();
        off = end;
    }
    w.finish().unwrap();
    Member {
        name: "disk0".into(),
        kind: MemberKind::Disk,
        size: data.len() as u64,
        layout: Layout::Map {
            chunk_size,
            root: handle.root().unwrap().root,
        },
    }
}

pub(crate) fn commit_disk(store: &Store, name: &str, data: &[u8]) -> SnapshotId {
    let member = import_bytes(store, data, 16384);
    store
        .commit(name, RefUpdate::NewVersion, |parent| {
            let mut m = Store::new_manifest(format!("test {name}"), vec![member]);
            m.parent = parent;
            Ok(m)
        })
        .unwrap()
}

pub(crate) fn read_all(store: &Arc<Store>, spec: &str) -> Vec<u8> {
    let snap = store.resolve(spec).unwrap();
    let disk = StoredDisk::open(store, &snap, None).unwrap();
    let mut out = vec![0u8; disk.size() as usize];
    disk.read_at(&mut out, 0).unwrap();
    out
}

fn disk_image(seed: u64) -> Vec<u8> {
    // 8 MiB: random data, a zero hole, text, an unaligned tail.
    let mut d = xorshift_bytes(seed, 3 << 20);
    d.extend(std::iter::repeat_n(0u8, 2 << 20));
    d.extend(b"config line\n".iter().cycle().take(3 << 20));
    d.extend_from_slice(&[7u8; 1000]);
    d
}

fn pack_bytes(root: &Path) -> u64 {
    std::fs::read_dir(root.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

plain_and_encrypted!(
    import_read_back_versions_and_lineage,
    import_read_back_versions_and_lineage_encrypted,
    import_read_back_versions_and_lineage_in
);

fn import_read_back_versions_and_lineage_in(encrypted: bool) {
    let dir = tmp(&format!("versions-{encrypted}"));
    let store = Arc::new(open_store(&dir, Access::Write, encrypted));
    let v1 = disk_image(1);
    let a = commit_disk(&store, "gold", &v1);
    assert_eq!(read_all(&store, "gold"), v1);
    let before = pack_bytes(&dir);
    let mut v2 = v1.clone();
    v2[5 << 20..(5 << 20) + 100].fill(9);
    let b = commit_disk(&store, "gold", &v2);
    let added = pack_bytes(&dir) - before;
    assert!(added < 64 << 10, "a one-chunk change stored {added} bytes");
    assert_eq!(read_all(&store, "gold"), v2);
    assert_eq!(read_all(&store, &format!("gold@{}", &a.to_hex()[..8])), v1);
    assert_eq!(read_all(&store, "gold@~1"), v1);
    let lineage = store.lineage(&b).unwrap();
    assert_eq!(
        lineage.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [b, a]
    );
    assert!(store.resolve("gold@~2").is_err());
    assert!(store.resolve("nope").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stored_disk_reads_any_range_and_reports_extents() {
    let dir = tmp("ranges");
    let store = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let data = disk_image(2);
    commit_disk(&store, "d", &data);
    let snap = store.resolve("d").unwrap();
    let disk = StoredDisk::open(&store, &snap, None).unwrap();
    for (off, len) in [
        (0, 1),
        (16383, 2),
        (3 << 20, 4096),
        (100, 5 << 20),
        (data.len() - 7, 7),
    ] {
        let mut buf = vec![1u8; len];
        disk.read_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, &data[off..off + len], "{off}+{len}");
    }
    let mut past = [0u8; 2];
    assert!(disk.read_at(&mut past, data.len() as u64 - 1).is_err());
    let hole = disk.block_status(3 << 20, 1 << 20).unwrap();
    assert_eq!(hole.kind, ExtentKind::Unallocated);
    assert_eq!(hole.len, 1 << 20);
    let data_ext = disk.block_status(0, 8 << 20).unwrap();
    assert_eq!((data_ext.kind, data_ext.len), (ExtentKind::Data, 3 << 20));
    let _ = std::fs::remove_dir_all(&dir);
}

plain_and_encrypted!(
    clones_cost_nothing_and_gc_keeps_what_names_reach,
    clones_cost_nothing_and_gc_keeps_what_names_reach_encrypted,
    clones_cost_nothing_and_gc_keeps_what_names_reach_in
);

fn clones_cost_nothing_and_gc_keeps_what_names_reach_in(encrypted: bool) {
    let dir = tmp(&format!("gc-{encrypted}"));
    let store = Arc::new(open_store(&dir, Access::Write, encrypted));
    let gold = disk_image(3);
    commit_disk(&store, "gold", &gold);
    let before = pack_bytes(&dir);
    let head = store.head("gold").unwrap().unwrap();
    for i in 0..5 {
        store
            .point(&format!("web-{i}"), &head, RefUpdate::CreateOnly)
            .unwrap();
    }
    assert!(store.point("web-0", &head, RefUpdate::CreateOnly).is_err());
    assert_eq!(pack_bytes(&dir), before);
    // A changed clone, then an unrelated image that is deleted again.
    let mut web = gold.clone();
    web[..4096].fill(0x55);
    commit_disk(&store, "web-0", &web);
    commit_disk(&store, "junk", &disk_image(99));
    drop(store);
    let store = Arc::new(open_store(&dir, Access::Exclusive, encrypted));
    store.remove_ref("junk").unwrap();
    let r = gc(&store, GcOptions::default()).unwrap();
    assert_eq!(r.removed_snapshots, 1);
    assert!(r.packs_deleted + r.packs_repacked > 0, "{r:?}");
    assert!(r.bytes_after < r.bytes_before, "{r:?}");
    assert!(verify(&store).unwrap().is_clean());
    assert_eq!(read_all(&store, "web-0"), web);
    assert_eq!(read_all(&store, "web-3"), gold);
    assert_eq!(read_all(&store, "web-0@~1"), gold);
    drop(store);
    // Reopened: everything still reads.
    let store = Arc::new(open_store(&dir, Access::Read, encrypted));
    assert_eq!(read_all(&store, "gold"), gold);
    let _ = std::fs::remove_dir_all(&dir);
}

plain_and_encrypted!(
    a_flipped_byte_is_an_error_naming_the_chunk_and_verify_names_the_snapshot,
    a_flipped_byte_is_an_error_naming_the_chunk_and_verify_names_the_snapshot_encrypted,
    a_flipped_byte_is_an_error_naming_the_chunk_and_verify_names_the_snapshot_in
);

fn a_flipped_byte_is_an_error_naming_the_chunk_and_verify_names_the_snapshot_in(encrypted: bool) {
    let dir = tmp(&format!("flip-{encrypted}"));
    let store = Arc::new(open_store(&dir, Access::Write, encrypted));
    let data = disk_image(4);
    commit_disk(&store, "vm", &data);
    drop(store);
    let pack = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&pack, &bytes).unwrap();
    let store = Arc::new(open_store(&dir, Access::Read, encrypted));
    let snap = store.resolve("vm").unwrap();
    let disk = StoredDisk::open(&store, &snap, None).unwrap();
    let mut buf = vec![0u8; data.len()];
    let err = disk.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("chunk"), "{err}");
    let report = verify(&store).unwrap();
    assert!(!report.is_clean());
    assert!(!report.damaged.is_empty());
    let (label, problems) = report.affected.iter().next().unwrap();
    assert!(label.starts_with("vm@"), "{label}");
    assert!(problems[0].contains("damaged chunk"), "{problems:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn concurrent_writers_in_one_process_both_land() {
    let dir = tmp("two");
    let a = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let b = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let da = disk_image(5);
    let db = disk_image(6);
    std::thread::scope(|s| {
        s.spawn(|| commit_disk(&a, "x", &da));
        s.spawn(|| commit_disk(&b, "x", &db));
    });
    // Both versions exist, one the parent of the other; both read back from a fresh open.
    let c = Arc::new(Store::open(&dir, Access::Read).unwrap());
    let head = c.head("x").unwrap().unwrap();
    let lineage = c.lineage(&head).unwrap();
    assert_eq!(lineage.len(), 2);
    let newest = read_all(&c, "x");
    let older = read_all(&c, "x@~1");
    assert!((newest == da && older == db) || (newest == db && older == da));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_store_sees_what_another_wrote_after_it_opened() {
    let dir = tmp("refresh");
    let reader = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let writer = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let data = disk_image(7);
    commit_disk(&writer, "late", &data);
    assert_eq!(read_all(&reader, "late"), data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_empty_terabyte_disk_is_free() {
    let dir = tmp("tib");
    let store = Arc::new(Store::open(&dir, Access::Write).unwrap());
    let (w, handle) = DiskImporter::new(store.chunks().clone(), 1 << 40, 65536).unwrap();
    Box::new(w).finish().unwrap();
    assert_eq!(handle.root().unwrap().root, None);
    assert_eq!(pack_bytes(&dir), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Like [`commit_disk`], returning the first error instead of panicking.
fn try_commit_disk(store: &Store, name: &str, data: &[u8]) -> crate::Result<SnapshotId> {
    let chunk_size = 16384;
    let (w, handle) = DiskImporter::new(store.chunks().clone(), data.len() as u64, chunk_size)?;
    let w: Box<dyn ImageWriter> = Box::new(w);
    let mut off = 0;
    let fail = |e: image_format::Error| Error::InvalidArgument(e.to_string());
    while off < data.len() {
        let end = (off + (1 << 20)).min(data.len());
        let p = w
            .prepare(off as u64, data[off..end].to_vec())
            .map_err(fail)?;
        w.commit(p).map_err(fail)?;
        off = end;
    }
    w.finish().map_err(fail)?;
    let root = handle
        .root()
        .ok_or_else(|| Error::InvalidArgument("no root".into()))?;
    let member = Member {
        name: "disk0".into(),
        kind: MemberKind::Disk,
        size: data.len() as u64,
        layout: Layout::Map {
            chunk_size,
            root: root.root,
        },
    };
    store.commit(name, RefUpdate::NewVersion, |parent| {
        let mut m = Store::new_manifest("test".into(), vec![member]);
        m.parent = parent;
        Ok(m)
    })
}

#[test]
fn a_write_failing_at_any_point_then_a_power_cut_loses_nothing_committed() {
    let base = disk_image(10);
    let mut v2 = base.clone();
    v2[..3 << 20].copy_from_slice(&xorshift_bytes(11, 3 << 20));
    let mut n = 1;
    loop {
        let dir = tmp(&format!("fault-{n}"));
        {
            let store = Store::open(&dir, Access::Write).unwrap();
            commit_disk(&store, "vm", &base);
        }
        let store = Store::open(&dir, Access::Write).unwrap();
        crate::fault::plan::arm(Some(n));
        let result = try_commit_disk(&store, "vm", &v2);
        let plan = crate::fault::plan::disarm();
        drop(store);
        // The power cut: whatever was written and not fsynced is gone.
        drop_unsynced(&plan);
        let store = Arc::new(Store::open(&dir, Access::Write).unwrap());
        let report = verify(&store).unwrap();
        assert!(report.is_clean(), "fault at op {n}: {report:?}");
        let head = store.head("vm").unwrap().unwrap();
        let versions = store.lineage(&head).unwrap().len();
        match versions {
            1 => {
                assert!(
                    result.is_err(),
                    "op {n}: the import succeeded but did not land"
                );
                assert_eq!(read_all(&store, "vm"), base);
            }
            2 => {
                assert_eq!(read_all(&store, "vm"), v2, "op {n}");
                assert_eq!(read_all(&store, "vm@~1"), base, "op {n}");
            }
            v => panic!("op {n}: {v} versions"),
        }
        // The store takes the same import again after the failure.
        if versions == 1 {
            commit_disk(&store, "vm", &v2);
            assert_eq!(read_all(&store, "vm"), v2);
        }
        let _ = std::fs::remove_dir_all(&dir);
        if result.is_ok() {
            assert!(
                n > plan.ops,
                "op {n} of {} failed yet the import succeeded",
                plan.ops
            );
            assert!(n > 5, "the write path had only {} operations", n - 1);
            eprintln!("a fault was injected at each of the {} operations", n - 1);
            break;
        }
        n += 1;
        assert!(n < 10_000);
    }
}

#[test]
fn an_encrypted_store_holds_no_plaintext_and_needs_its_key() {
    let dir = tmp("enc-plaintext");
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 13) as u8).collect();
    let mut data = Vec::new();
    for _ in 0..256 {
        data.extend_from_slice(&pattern);
    }
    data.extend_from_slice(&xorshift_bytes(5, 1 << 20));
    let store = Arc::new(open_store(&dir, Access::Write, true));
    commit_disk(&store, "secret-vm", &data);
    assert_eq!(read_all(&store, "secret-vm"), data);
    drop(store);
    let needle = &pattern[1000..1064];
    let random = &data[(1 << 20) + 5000..(1 << 20) + 5064];
    let stored = ["packs", "index", "snapshots"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join(d)).unwrap().flatten())
        .map(|e| e.path())
        .chain([dir.join("config")]);
    for f in stored {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!bytes.windows(64).any(|w| w == needle), "{}", f.display());
        assert!(!bytes.windows(64).any(|w| w == random), "{}", f.display());
    }
    // Every frame of every pack is sealed or a map-node frame.
    let store = open_store(&dir, Access::Read, true);
    let mut meta = 0;
    for p in store.chunks().packs() {
        for f in p.frames() {
            assert!(f.flags & (crate::pack::FLAG_SEALED | crate::pack::FLAG_META) != 0);
            meta += usize::from(f.flags & crate::pack::FLAG_META != 0);
        }
    }
    assert!(meta > 0);
    assert!(verify(&store).unwrap().is_clean());
    drop(store);
    let err = Store::open(&dir, Access::Read).unwrap_err().to_string();
    assert!(err.contains("is encrypted"), "{err}");
    assert!(err.contains(&dir.display().to_string()), "{err}");
    let wrong = KeySource::Passphrase(b"not it".to_vec());
    let err = Store::open_keyed(&dir, Access::Read, Some(&wrong), &mut || {}).unwrap_err();
    assert!(matches!(err, Error::WrongKey(_)), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_data_gets_other_ids_in_an_encrypted_store() {
    let plain_dir = tmp("ids-plain");
    let enc_dir = tmp("ids-enc");
    let data = disk_image(8);
    let plain = Arc::new(open_store(&plain_dir, Access::Write, false));
    let enc = Arc::new(open_store(&enc_dir, Access::Write, true));
    commit_disk(&plain, "d", &data);
    commit_disk(&enc, "d", &data);
    let root = |s: &Store| match &s.resolve("d").unwrap().manifest.members[0].layout {
        Layout::Map { root, .. } => *root,
        other => panic!("{other:?}"),
    };
    assert_ne!(root(&plain), root(&enc));
    let first = ChunkId::of(&data[..16384]);
    assert!(plain.chunks().contains(&first).unwrap());
    assert!(!enc.chunks().contains(&first).unwrap());
    let _ = std::fs::remove_dir_all(&plain_dir);
    let _ = std::fs::remove_dir_all(&enc_dir);
}

#[test]
fn creating_an_encrypted_store_failing_at_any_point_leaves_none_or_a_whole_one() {
    let mut n = 1;
    loop {
        let dir = tmp(&format!("enc-init-{n}"));
        crate::fault::plan::arm(Some(n));
        let result =
            Store::create_encrypted(&dir, StoreConfig::default(), &test_key(), TEST_COSTS, None);
        let plan = crate::fault::plan::disarm();
        drop_unsynced(&plan);
        let ok = result.is_ok();
        drop(result);
        if dir.join("config").exists() {
            // Whatever landed is a whole encrypted store that opens with its key.
            let store = open_store(&dir, Access::Read, true);
            assert!(store.keys().is_some(), "op {n}");
        } else {
            assert!(!ok, "op {n}: created, yet no config");
            // The retry succeeds.
            let store = open_store(&dir, Access::Write, true);
            assert!(store.keys().is_some());
        }
        let _ = std::fs::remove_dir_all(&dir);
        if ok {
            assert!(n > 2, "creating had only {} operations", n - 1);
            break;
        }
        n += 1;
        assert!(n < 1000);
    }
}

#[test]
fn a_manifest_too_long_to_read_back_is_never_written() {
    use crate::store::manifest::{MAX_LABELS, MAX_TEXT};
    let dir = tmp("manifest-too-long");
    let store = open_store(&dir, Access::Write, true);
    let id = commit_disk(&store, "vm", &disk_image(1));
    let mut m = store.manifest(&id).unwrap();
    // Every label at its longest: each field valid, the whole over the size a reader takes.
    for i in 0..MAX_LABELS {
        m.labels.insert(
            format!("{i:04}{}", "k".repeat(MAX_TEXT - 4)),
            "v".repeat(MAX_TEXT),
        );
    }
    assert!(m.validate().is_ok());
    let before = std::fs::read_dir(dir.join("snapshots")).unwrap().count();
    let err = store.write_manifest(&m).unwrap_err().to_string();
    assert!(err.contains("over"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.join("snapshots")).unwrap().count(),
        before
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_changed_passphrase_or_key_file_opens_the_same_store_and_a_power_cut_keeps_one_whole() {
    let base = xorshift_bytes(41, 5 * 16384 + 3);
    let new_pass = KeySource::Passphrase(b"the new one".to_vec());
    let mut n = 1;
    loop {
        let dir = tmp(&format!("key-change-{n}"));
        {
            let store = open_store(&dir, Access::Write, true);
            commit_disk(&store, "vm", &base);
        }
        let mut store =
            Store::open_keyed(&dir, Access::Exclusive, Some(&test_key()), &mut || {}).unwrap();
        let before = store.config().encryption.clone().unwrap();
        crate::fault::plan::arm(Some(n));
        let result = store.change_key(&new_pass, TEST_COSTS);
        let plan = crate::fault::plan::disarm();
        drop(store);
        drop_unsynced(&plan);
        // Exactly one of the two passphrases opens the store, and it reads the same.
        let open_with = |k: &KeySource| Store::open_keyed(&dir, Access::Read, Some(k), &mut || {});
        let (old, new) = (open_with(&test_key()), open_with(&new_pass));
        assert!(old.is_ok() != new.is_ok(), "op {n}: {old:?} / {new:?}");
        let landed = new.is_ok();
        let store = Arc::new(old.or(new).unwrap());
        let now = store.config().encryption.clone().unwrap();
        assert_eq!(now.fingerprint, before.fingerprint);
        assert_eq!(now.generation, before.generation + u64::from(landed));
        assert_eq!(read_all(&store, "vm"), base, "op {n}");
        match &result {
            Ok(section) => assert_eq!(Some(section), Some(&now), "op {n}"),
            // A failure after the rename says the new key is in place (it may or may not
            // survive the power cut: the directory fsync is what failed).
            Err(e) if e.to_string().contains("holds the new key already") => {}
            Err(e) => assert!(!landed, "op {n}: {e}, yet the new key landed"),
        }
        // No temporary copy of the config (a wrapped key) is left once the store is opened.
        let temps: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(temps.is_empty(), "op {n}: {temps:?}");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        if result.is_ok() {
            assert!(n > 2, "changing had only {} operations", n - 1);
            break;
        }
        n += 1;
        assert!(n < 100);
    }

    // To a key file: a key file made from the store holds its key; another key's file is
    // refused; the old passphrase no longer opens the store.
    let dir = tmp("key-change-file");
    {
        let store = open_store(&dir, Access::Write, true);
        commit_disk(&store, "vm", &base);
    }
    let key_file = dir.join("master.key");
    let mut store =
        Store::open_keyed(&dir, Access::Exclusive, Some(&test_key()), &mut || {}).unwrap();
    let as_file = KeySource::KeyFile(key_file.clone());
    let section = store.change_key(&as_file, TEST_COSTS).unwrap();
    assert_eq!(store.config().encryption.as_ref(), Some(&section));
    drop(store);
    let err = Store::open_keyed(&dir, Access::Read, Some(&test_key()), &mut || {}).unwrap_err();
    assert!(err.to_string().contains("key file"), "{err}");
    let mut store =
        Arc::new(Store::open_keyed(&dir, Access::Exclusive, Some(&as_file), &mut || {}).unwrap());
    assert_eq!(read_all(&store, "vm"), base);
    let other = dir.join("other.key");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    let err = Arc::get_mut(&mut store)
        .unwrap()
        .change_key(&KeySource::KeyFile(other), TEST_COSTS)
        .unwrap_err();
    assert!(err.to_string().contains("holds another key"), "{err}");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
