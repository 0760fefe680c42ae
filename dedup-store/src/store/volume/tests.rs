use std::path::PathBuf;
use std::sync::Arc;

use image_format::{BlockDevice, BlockDeviceMut};

use super::*;
use crate::chunker::cdc::xorshift_bytes;
use crate::store::Access;
use crate::store::gc::{GcOptions, gc};
use crate::store::tests::{commit_disk, open_store, read_all};
use crate::store::verify::verify;

const CHUNK: u32 = 16384;

fn tmp(name: &str) -> PathBuf {
    image_format::scratch::path("volume", name)
}

fn read_dev(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut out = vec![0u8; dev.size() as usize];
    dev.read_at(&mut out, 0).unwrap();
    out
}

/// A disk of `chunks` chunks plus an odd tail, some data, some zeros.
fn base_image(seed: u64) -> Vec<u8> {
    let len = 20 * CHUNK as usize + 1000;
    let mut d = xorshift_bytes(seed, len);
    d[3 * CHUNK as usize..6 * CHUNK as usize].fill(0);
    d
}

fn new_store(name: &str, encrypted: bool) -> (PathBuf, Arc<Store>, Vec<u8>) {
    let dir = tmp(name);
    let store = Arc::new(open_store(&dir, Access::Write, encrypted));
    let base = base_image(1);
    commit_disk(&store, "vm", &base);
    (dir, store, base)
}

/// [`new_store`] and a volume `vol` over `vm`.
fn new_volume(
    name: &str,
    vol: &str,
    encrypted: bool,
) -> (PathBuf, Arc<Store>, Vec<u8>, Arc<Volume>) {
    let (dir, store, base) = new_store(name, encrypted);
    let volume = Volume::open_or_create(store.clone(), vol, "vm").unwrap();
    (dir, store, base, volume)
}

plain_and_encrypted!(
    reads_merge_unaligned_writes_zeroes_and_discards_with_the_base_plain,
    reads_merge_unaligned_writes_zeroes_and_discards_with_the_base_encrypted,
    reads_merge_unaligned_writes_zeroes_and_discards_with_the_base
);

fn reads_merge_unaligned_writes_zeroes_and_discards_with_the_base(encrypted: bool) {
    let (dir, store, base, vol) = new_volume(&format!("overlay-{encrypted}"), "vm", encrypted);
    let mut want = base.clone();
    let size = want.len() as u64;
    let random = xorshift_bytes(99, 8 * 5000);
    let mut words = random
        .chunks(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
    let mut next = || words.next().unwrap();
    for i in 0..300 {
        let off = next() % size;
        let len = (1 + next() % 50_000).min(size - off);
        match i % 5 {
            0 => {
                vol.write_zeroes(off, len).unwrap();
                want[off as usize..(off + len) as usize].fill(0);
            }
            1 => {
                vol.discard(off, len).unwrap();
                want[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let data = xorshift_bytes(i, len as usize);
                vol.write_at(&data, off).unwrap();
                want[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        if i % 37 == 0 {
            let a = next() % size;
            let b = (a + 1 + next() % 70_000).min(size);
            let mut got = vec![0u8; (b - a) as usize];
            vol.read_at(&mut got, a).unwrap();
            assert_eq!(got, want[a as usize..b as usize], "step {i}");
        }
    }
    assert_eq!(read_dev(vol.as_ref()), want);
    // Block status agrees with the bytes: zero kinds read as zeros.
    let mut off = 0;
    while off < size {
        let e = vol.block_status(off, size - off).unwrap();
        assert!(e.len >= 1 && off + e.len <= size);
        if e.kind.reads_as_zero() {
            assert!(
                want[off as usize..(off + e.len) as usize]
                    .iter()
                    .all(|&b| b == 0)
            );
        }
        off += e.len;
    }
    // Past the end fails.
    assert!(vol.write_at(&[1], size).is_err());
    assert!(vol.read_at(&mut [0u8; 2], size - 1).is_err());
    // The base is untouched.
    assert_eq!(read_all(&store, "vm"), base);
    drop(vol);
    // Reopened, the log replays to the same bytes.
    let vol = Volume::open(store.clone(), "vm").unwrap();
    assert_eq!(vol.replay().records, 300);
    assert_eq!(vol.replay().torn, None);
    assert_eq!(read_dev(vol.as_ref()), want);
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

plain_and_encrypted!(
    concurrent_writers_and_readers_see_whole_writes_plain,
    concurrent_writers_and_readers_see_whole_writes_encrypted,
    concurrent_writers_and_readers_see_whole_writes
);

fn concurrent_writers_and_readers_see_whole_writes(encrypted: bool) {
    let (dir, store, base, vol) = new_volume(&format!("threads-{encrypted}"), "vm", encrypted);
    let size = base.len();
    let stripe = size / 8;
    std::thread::scope(|scope| {
        for t in 0..8usize {
            let vol = vol.clone();
            scope.spawn(move || {
                for i in 0..40usize {
                    let off = t * stripe + (i * 997) % (stripe - 4096);
                    vol.write_at(&[t as u8 + 1; 4096], off as u64).unwrap();
                    let mut back = vec![0u8; 4096];
                    vol.read_at(&mut back, off as u64).unwrap();
                    assert!(
                        back.iter().all(|&b| b == t as u8 + 1),
                        "thread {t} write {i}"
                    );
                }
            });
        }
        let vol = vol.clone();
        scope.spawn(move || {
            for _ in 0..50 {
                vol.flush().unwrap();
            }
        });
    });
    let mut want = base.clone();
    for t in 0..8usize {
        for i in 0..40usize {
            let off = t * stripe + (i * 997) % (stripe - 4096);
            want[off..off + 4096].fill(t as u8 + 1);
        }
    }
    assert_eq!(read_dev(vol.as_ref()), want);
    vol.commit(None).unwrap();
    assert_eq!(read_all(&store, "vm"), want);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_opener_is_refused_while_the_volume_is_held() {
    let (dir, store, _, vol) = new_volume("lock", "vm", false);
    let err = Volume::open(store.clone(), "vm").unwrap_err().to_string();
    assert!(
        err.contains("volume vm is in use by another process")
            && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    assert!(remove(&store, "vm").is_err());
    assert_eq!(list(&store).unwrap()[0].in_use_by, Some(std::process::id()));
    drop(vol);
    assert_eq!(list(&store).unwrap()[0].in_use_by, None);
    let _ = Volume::open(store.clone(), "vm").unwrap();
    // A spec naming nothing creates nothing.
    let err = Volume::open_or_create(store.clone(), "new", "nope").unwrap_err();
    assert!(err.to_string().contains("no snapshot named nope"), "{err}");
    assert!(!dir.join("volumes/new").exists());
    assert!(Volume::open(store.clone(), "new").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

plain_and_encrypted!(
    a_torn_tail_is_cut_and_reported_and_flushed_writes_survive_plain,
    a_torn_tail_is_cut_and_reported_and_flushed_writes_survive_encrypted,
    a_torn_tail_is_cut_and_reported_and_flushed_writes_survive
);

fn a_torn_tail_is_cut_and_reported_and_flushed_writes_survive(encrypted: bool) {
    let (dir, store, base, vol) = new_volume(&format!("torn-{encrypted}"), "vm", encrypted);
    vol.write_at(&[7u8; 5000], 100).unwrap();
    vol.flush().unwrap();
    let flushed_end = vol.log_bytes().unwrap() + LOG_HEADER_LEN;
    vol.write_at(&[9u8; 3000], 200_000).unwrap();
    let log_path = dir.join("volumes/vm").join(&vol.file().unwrap().log);
    drop(vol);
    // Cut the second record in its payload, as a crash in the middle of an append would.
    let f = File::options().write(true).open(&log_path).unwrap();
    let header = log::record_header_len(encrypted);
    f.set_len(flushed_end + header + 1000).unwrap();
    drop(f);
    let vol = Volume::open(store.clone(), "vm").unwrap();
    let (at, bytes, why) = vol.replay().torn.clone().unwrap();
    assert_eq!((at, bytes), (flushed_end, header + 1000));
    assert!(why.contains("record of 3000 bytes"), "{why}");
    let mut want = base.clone();
    want[100..5100].fill(7);
    assert_eq!(read_dev(vol.as_ref()), want);
    assert_eq!(std::fs::metadata(&log_path).unwrap().len(), flushed_end);
    // Appends go on after the cut.
    vol.write_at(&[5u8; 10], 0).unwrap();
    want[..10].fill(5);
    drop(vol);
    let vol = Volume::open(store.clone(), "vm").unwrap();
    assert_eq!(vol.replay().torn, None);
    assert_eq!(read_dev(vol.as_ref()), want);
    drop(vol);
    // Garbage in the header is an error naming the log.
    let mut bytes = std::fs::read(&log_path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&log_path, &bytes).unwrap();
    let err = Volume::open(store.clone(), "vm").unwrap_err().to_string();
    assert!(err.contains("log-1") && err.contains("offset 0x0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

plain_and_encrypted!(
    commit_makes_a_snapshot_of_base_plus_writes_and_rebases_plain,
    commit_makes_a_snapshot_of_base_plus_writes_and_rebases_encrypted,
    commit_makes_a_snapshot_of_base_plus_writes_and_rebases
);

fn commit_makes_a_snapshot_of_base_plus_writes_and_rebases(encrypted: bool) {
    let (dir, store, base) = new_store(&format!("commit-{encrypted}"), encrypted);
    let base_id = store.head("vm").unwrap().unwrap();
    let vol = Volume::open_or_create(store.clone(), "vm", "vm").unwrap();
    let mut want = base.clone();
    vol.write_at(&[1u8; 3], 5).unwrap();
    want[5..8].fill(1);
    let cs = CHUNK as u64;
    // A whole chunk zeroed, a write into the zero area, the odd tail.
    vol.write_zeroes(cs, cs).unwrap();
    want[cs as usize..2 * cs as usize].fill(0);
    vol.write_at(&[2u8; 100], 4 * cs + 7).unwrap();
    want[4 * cs as usize + 7..4 * cs as usize + 107].fill(2);
    let size = want.len() as u64;
    vol.write_at(&[3u8; 10], size - 10).unwrap();
    want[size as usize - 10..].fill(3);
    let c = vol.commit_report(Some("patched")).unwrap();
    assert!(c.changed);
    assert_eq!(c.parent, base_id);
    assert_eq!(c.name_was_at, None);
    assert_eq!(c.chunks, 4);
    assert_eq!(store.head("vm").unwrap(), Some(c.id));
    let m = store.manifest(&c.id).unwrap();
    assert_eq!(m.parent, Some(base_id));
    assert_eq!(m.labels.get("message").map(String::as_str), Some("patched"));
    assert_eq!(read_all(&store, "vm"), want);
    assert_eq!(read_all(&store, "vm@~1"), base);
    // Rebased: the volume reads the same, over the new snapshot, with an empty log.
    assert_eq!(vol.file().unwrap().base, c.id);
    assert_eq!(vol.log_bytes().unwrap(), 0);
    assert_eq!(read_dev(vol.as_ref()), want);
    // Nothing written: nothing to commit.
    let again = vol.commit_report(None).unwrap();
    assert!(!again.changed);
    assert_eq!(again.id, c.id);
    // A second round on the new base.
    vol.write_at(&[4u8; 4], 0).unwrap();
    want[..4].fill(4);
    let c2 = vol.commit(None).unwrap();
    assert_eq!(store.manifest(&c2).unwrap().parent, Some(c.id));
    assert_eq!(read_all(&store, "vm"), want);
    drop(vol);
    // Only the current log is left, and the volume opens over the new base.
    let files: Vec<String> = std::fs::read_dir(dir.join("volumes/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 3, "{files:?}");
    let vol = Volume::open_or_create(store.clone(), "vm", "vm").unwrap();
    assert_eq!(vol.file().unwrap().base, c2);
    assert!(verify(&store).unwrap().is_clean());
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commit_when_the_name_moved_keeps_the_base_as_parent_and_says_so() {
    let (dir, store, base) = new_store("moved", false);
    let base_id = store.head("vm").unwrap().unwrap();
    let vol = Volume::open_or_create(store.clone(), "other", "vm").unwrap();
    let moved = commit_disk(&store, "vm", &base_image(2));
    vol.write_at(&[8u8; 10], 0).unwrap();
    let c = vol.commit_report(None).unwrap();
    assert_eq!(c.parent, base_id);
    assert_eq!(c.name_was_at, Some(moved));
    assert_eq!(store.manifest(&c.id).unwrap().parent, Some(base_id));
    let mut want = base.clone();
    want[..10].fill(8);
    assert_eq!(read_all(&store, "vm"), want);
    drop(vol);
    // The volume is over the new snapshot now: a spec naming the old one is refused.
    let err = Volume::open_or_create(store.clone(), "other", &format!("vm@{}", base_id.short()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("volume other exists over vm@"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gc_keeps_the_base_of_a_volume() {
    let (dir, store, base, vol) = new_volume("gc", "keep", false);
    vol.write_at(&[1u8; 10], 0).unwrap();
    vol.flush().unwrap();
    drop(vol);
    // The name goes; only the volume refers to its base now.
    store.remove_ref("vm").unwrap();
    let base_id = list(&store).unwrap()[0].file.base;
    assert!(store.remove_snapshot(&base_id).is_err());
    drop(store);
    let store = Arc::new(Store::open(&dir, Access::Exclusive).unwrap());
    let report = gc(&store, GcOptions::default()).unwrap();
    assert_eq!(report.live_snapshots, 1);
    assert_eq!(report.removed_snapshots, 0);
    drop(store);
    let store = Arc::new(Store::open(&dir, Access::Write).unwrap());
    assert!(verify(&store).unwrap().is_clean());
    let vol = Volume::open(store.clone(), "keep").unwrap();
    let mut want = base.clone();
    want[..10].fill(1);
    assert_eq!(read_dev(vol.as_ref()), want);
    drop(vol);
    // Once the volume is removed, gc takes the base.
    remove(&store, "keep").unwrap();
    assert!(!dir.join("volumes/keep").exists());
    drop(store);
    let store = Store::open(&dir, Access::Exclusive).unwrap();
    let report = gc(&store, GcOptions::default()).unwrap();
    assert_eq!(report.removed_snapshots, 1);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The power cut after a fault: every file keeps what it had at its last fsync.
fn power_cut(plan: &crate::fault::plan::FaultPlan) {
    for path in &plan.unsynced {
        if path.is_file() {
            let keep = plan.synced_len.get(path).copied().unwrap_or(0);
            let f = File::options().write(true).open(path).unwrap();
            if f.metadata().unwrap().len() > keep {
                f.set_len(keep).unwrap();
            }
        }
    }
}

plain_and_encrypted!(
    a_fault_at_any_operation_of_write_flush_commit_then_a_power_cut_loses_nothing_acknowledged_plain,
    a_fault_at_any_operation_of_write_flush_commit_then_a_power_cut_loses_nothing_acknowledged_encrypted,
    a_fault_at_any_operation_of_write_flush_commit_then_a_power_cut_loses_nothing_acknowledged
);

fn a_fault_at_any_operation_of_write_flush_commit_then_a_power_cut_loses_nothing_acknowledged(
    encrypted: bool,
) {
    let base = base_image(3);
    let cs = CHUNK as usize;
    let mut with_a = base.clone();
    with_a[10..20_000].fill(0xaa);
    let mut with_ab = with_a.clone();
    with_ab[5 * cs..7 * cs + 3].fill(0xbb);
    with_ab[9 * cs..10 * cs].fill(0);
    let mut n = 1;
    loop {
        let dir = tmp(&format!("fault-{encrypted}-{n}"));
        {
            let store = open_store(&dir, Access::Write, encrypted);
            commit_disk(&store, "vm", &base);
        }
        let store = Arc::new(open_store(&dir, Access::Write, encrypted));
        let vol = Volume::open_or_create(store.clone(), "vm", "vm").unwrap();
        crate::fault::plan::arm(Some(n));
        let mut flushed = false;
        let step = (|| -> image_format::Result<SnapshotId> {
            vol.write_at(&with_a[10..20_000], 10)?;
            vol.flush()?;
            flushed = true;
            vol.write_at(&with_ab[5 * cs..7 * cs + 3], 5 * cs as u64)?;
            vol.write_zeroes(9 * cs as u64, cs as u64)?;
            Ok(vol.commit(Some("fault"))?)
        })();
        let plan = crate::fault::plan::disarm();
        drop(vol);
        drop(store);
        power_cut(&plan);
        let store = Arc::new(open_store(&dir, Access::Write, encrypted));
        assert!(verify(&store).unwrap().is_clean(), "fault at op {n}");
        let vol = Volume::open(store.clone(), "vm").unwrap();
        let seen = read_dev(vol.as_ref());
        if let Ok(id) = step {
            assert_eq!(store.head("vm").unwrap(), Some(id), "op {n}");
            assert_eq!(vol.file().unwrap().base, id, "op {n}");
            assert_eq!(vol.log_bytes().unwrap(), 0, "op {n}");
            assert_eq!(seen, with_ab, "op {n}");
        } else if flushed {
            assert!(
                seen == with_a || seen == with_ab,
                "op {n}: flushed data lost"
            );
        } else {
            assert!(seen == base || seen == with_a, "op {n}");
        }
        // Whatever the name points at is base, or base + A + B (a commit that landed).
        let head = read_all(&store, "vm");
        assert!(
            head == base || head == with_ab,
            "op {n}: the name reads neither"
        );
        assert_eq!(
            read_all(&store, &format!("@{}", vol.file().unwrap().base.short())).len(),
            base.len()
        );
        // The volume commits again after the failure.
        vol.write_at(&[1], 0).unwrap();
        let mut last = seen.clone();
        last[0] = 1;
        vol.commit(None).unwrap();
        assert_eq!(read_all(&store, "vm"), last, "op {n}");
        drop(vol);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        // A fault after the commit point (removing the old log) is ignored: go on until no
        // operation failed.
        if step.is_ok() && n > plan.ops {
            assert!(n > 8, "the path had only {} operations", n - 1);
            eprintln!("a fault was injected at each of the {} operations", n - 1);
            break;
        }
        n += 1;
        assert!(n < 10_000);
    }
}

#[test]
fn an_encrypted_store_s_volume_log_holds_no_plaintext_and_reads_back_after_reopening() {
    let (dir, store, base, vol) = new_volume("sealed", "vm", true);
    // A recognisable pattern, written twice: it must appear in no file under the volume.
    let pattern = xorshift_bytes(77, 3 * CHUNK as usize);
    vol.write_at(&pattern, 1000).unwrap();
    vol.write_at(&pattern, 7 * CHUNK as u64).unwrap();
    vol.flush().unwrap();
    let mut want = base.clone();
    want[1000..1000 + pattern.len()].copy_from_slice(&pattern);
    want[7 * CHUNK as usize..10 * CHUNK as usize].copy_from_slice(&pattern);
    // Reads of ranges that start and end inside records decrypt the right part.
    let mut part = vec![0u8; 5000];
    vol.read_at(&mut part, 7 * CHUNK as u64 + 12_345).unwrap();
    assert_eq!(part, want[7 * CHUNK as usize + 12_345..][..5000]);
    assert_eq!(read_dev(vol.as_ref()), want);
    let log_path = dir.join("volumes/vm").join(&vol.file().unwrap().log);
    let log = std::fs::read(&log_path).unwrap();
    assert!(log.len() > 2 * pattern.len());
    for probe in pattern.chunks(64) {
        assert!(!log.windows(64).any(|w| w == probe), "plaintext in the log");
    }
    drop(vol);
    drop(store);
    // Reopened with the key: the same bytes, and a commit stores them.
    let store = Arc::new(open_store(&dir, Access::Write, true));
    let vol = Volume::open(store.clone(), "vm").unwrap();
    assert_eq!(read_dev(vol.as_ref()), want);
    let id = vol.commit(None).unwrap();
    assert_eq!(read_all(&store, &format!("@{}", id.short())), want);
    assert!(verify(&store).unwrap().is_clean());
    drop(vol);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
