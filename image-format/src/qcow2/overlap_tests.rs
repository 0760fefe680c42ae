//! The in-place writer's overlap check against hand-crafted images: a good image made by
//! qemu-img, then one table entry patched to aim at metadata, past the end of the file, or at
//! another entry's cluster. Every request touching it must fail with a corruption error naming
//! the file and the offsets, and leave the file byte for byte as it was.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blockdev::{BlockDevice, BlockDeviceMut};
use crate::crash_test::{open_writable, qemu, qemu_ok, qemu_qcow2, s, scratch};

use super::Qcow2Image;
use super::map::{COPIED, L2_COMPRESSED, L2_ZERO, OFFSET_MASK};

const CS: u64 = 4096;

fn open_rw(path: &Path) -> Arc<Qcow2Image> {
    open_writable(path, Qcow2Image::open)
}

fn be64(bytes: &[u8], off: u64) -> u64 {
    u64::from_be_bytes(bytes[off as usize..off as usize + 8].try_into().unwrap())
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Where qemu-img put things in the base image.
struct Layout {
    l1: u64,
    rt: u64,
    /// The refcount block of the first clusters.
    rb: u64,
    /// The L2 table of guest offset 0.
    l2: u64,
    /// The data cluster of guest offset 0.
    data: u64,
    file_len: u64,
}

/// A 16 MiB image of 4 KiB clusters with the first 16 KiB written (4 data clusters, one L2
/// table), in a scratch directory of its own.
fn base_image(name: &str) -> (PathBuf, Layout) {
    let dir = scratch(name);
    let img = dir.join("disk.qcow2");
    qemu_qcow2(&img, CS, "16M");
    qemu_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 16k", s(&img)],
    );
    let bytes = std::fs::read(&img).unwrap();
    let l1 = be64(&bytes, 40);
    let rt = be64(&bytes, 48);
    let rb = be64(&bytes, rt);
    let l2 = be64(&bytes, l1) & OFFSET_MASK;
    let data = be64(&bytes, l2) & OFFSET_MASK;
    assert!(
        l2 != 0 && data != 0,
        "qemu-img left guest offset 0 unallocated"
    );
    let file_len = bytes.len() as u64;
    (
        img,
        Layout {
            l1,
            rt,
            rb,
            l2,
            data,
            file_len,
        },
    )
}

/// Which request to try.
#[derive(Clone, Copy, Debug)]
enum Req {
    Write,
    Zero,
    Discard,
}

/// Opens `img` writable, runs `req` over the 4 KiB at guest `guest`, and asserts it fails as
/// a corruption whose text holds the file name and every piece of `expect`, and that the file
/// did not change.
fn assert_refused(img: &Path, req: Req, guest: u64, expect: &[String]) {
    let before = std::fs::read(img).unwrap();
    let dev = open_rw(img);
    let r = match req {
        Req::Write => dev.write_at(&[0xab; CS as usize], guest),
        Req::Zero => dev.write_zeroes(guest, CS),
        Req::Discard => dev.discard(guest, CS),
    };
    let err = r.expect_err("the request was carried out");
    assert!(err.is_corruption(), "{req:?}: {err}");
    let msg = err.to_string();
    assert!(msg.contains(&img.display().to_string()), "{msg}");
    for e in expect {
        assert!(msg.contains(e.as_str()), "{req:?}: {msg:?} lacks {e:?}");
    }
    let _ = dev.flush();
    drop(dev);
    assert!(
        std::fs::read(img).unwrap() == before,
        "{req:?} changed the file"
    );
}

#[test]
fn a_data_cluster_on_the_l1_table_is_refused() {
    let (img, l) = base_image("qcow2-overlap-l1");
    patch(&img, l.l2, &(l.l1 | COPIED).to_be_bytes());
    for req in [Req::Write, Req::Zero, Req::Discard] {
        assert_refused(
            &img,
            req,
            0,
            &[
                format!("corrupt qcow2 L2 table at offset {:#x}", l.l2),
                format!("guest offset 0x0 at host offset {:#x}", l.l1),
                "overlaps the L1 table".into(),
            ],
        );
    }
}

#[test]
fn a_data_cluster_on_a_refcount_block_is_refused() {
    let (img, l) = base_image("qcow2-overlap-rb");
    // The second guest cluster: the request starts past the first entry.
    patch(&img, l.l2 + 8, &(l.rb | COPIED).to_be_bytes());
    assert_refused(
        &img,
        Req::Write,
        CS,
        &[
            format!("at offset {:#x}", l.l2 + 8),
            format!("guest offset {CS:#x} at host offset {:#x}", l.rb),
            "overlaps the refcount block".into(),
        ],
    );
}

#[test]
fn a_compressed_cluster_in_the_header_is_refused() {
    // A data pointer at 0 means "unallocated", but a compressed one may start inside the
    // header cluster: copying it on write would free (punch out) the header.
    let (img, l) = base_image("qcow2-overlap-header");
    let entry = L2_COMPRESSED | 0x200;
    patch(&img, l.l2, &entry.to_be_bytes());
    for req in [Req::Write, Req::Zero, Req::Discard] {
        assert_refused(
            &img,
            req,
            0,
            &[
                format!("at offset {:#x}", l.l2),
                "at host offset 0x200".into(),
                "overlaps the header".into(),
            ],
        );
    }
}

#[test]
fn a_preallocated_zero_cluster_on_an_l2_table_is_refused() {
    let (img, l) = base_image("qcow2-overlap-prealloc");
    patch(&img, l.l2 + 16, &(l.l2 | COPIED | L2_ZERO).to_be_bytes());
    assert_refused(
        &img,
        Req::Write,
        2 * CS,
        &[
            format!("at offset {:#x}", l.l2 + 16),
            format!("at host offset {:#x}", l.l2),
            "overlaps the L2 table".into(),
        ],
    );
}

#[test]
fn an_l2_table_on_the_refcount_structures_is_refused() {
    let (img, l) = base_image("qcow2-overlap-l1-rt");
    let before = std::fs::read(&img).unwrap();
    for (target, what) in [(l.rt, "refcount table"), (l.rb, "refcount block")] {
        std::fs::write(&img, &before).unwrap();
        patch(&img, l.l1, &(target | COPIED).to_be_bytes());
        for req in [Req::Write, Req::Zero] {
            assert_refused(
                &img,
                req,
                0,
                &[
                    format!("corrupt qcow2 L1 table at offset {:#x}", l.l1),
                    format!("L2 table of guest offset 0x0 at host offset {target:#x}"),
                    format!("overlaps the {what}"),
                ],
            );
        }
    }
}

#[test]
fn a_data_cluster_past_the_end_of_the_file_is_refused() {
    let (img, l) = base_image("qcow2-overlap-eof");
    let host = l.file_len.div_ceil(CS) * CS + 16 * CS;
    patch(&img, l.l2 + 24, &(host | COPIED).to_be_bytes());
    assert_refused(
        &img,
        Req::Write,
        3 * CS,
        &[
            format!("guest offset {:#x} at host offset {host:#x}", 3 * CS),
            format!("lies past the end of the file ({:#x})", l.file_len),
        ],
    );
}

#[test]
fn two_entries_sharing_a_cluster_are_refused() {
    let (img, l) = base_image("qcow2-overlap-shared");
    let bytes = std::fs::read(&img).unwrap();
    let first = be64(&bytes, l.l2);
    // The second guest cluster now names the first one's cluster, copied flag and all; the
    // refcount still says 1 (only a whole-image walk could tell), but both entries are in
    // one table.
    patch(&img, l.l2 + 8, &first.to_be_bytes());
    for guest in [0, CS] {
        let other = if guest == 0 { l.l2 + 8 } else { l.l2 };
        assert_refused(
            &img,
            Req::Write,
            guest,
            &[
                format!("at host offset {:#x}", l.data),
                format!("is also named by the L2 entry at {other:#x}"),
            ],
        );
    }
    // With the refcount raised to 2 (qemu-img check's "OFLAG_COPIED data cluster" case) the
    // refcount gives it away, whatever the table holds.
    patch(&img, l.rb + 2 * (l.data / CS), &2u16.to_be_bytes());
    assert_refused(
        &img,
        Req::Write,
        0,
        &[
            format!("at host offset {:#x}", l.data),
            "has refcount 2 but the entry's copied flag says it has no other user".into(),
        ],
    );
}

#[test]
fn other_clusters_of_a_corrupt_table_stay_writable() {
    // Only the requests touching the bad entry are refused; a table with one is never trusted
    // for the lock-free path.
    let (img, l) = base_image("qcow2-overlap-rest");
    patch(&img, l.l2 + 8, &(l.l1 | COPIED).to_be_bytes());
    let dev = open_rw(&img);
    dev.write_at(&[0x22; CS as usize], 2 * CS).unwrap();
    dev.write_at(&[0x33; CS as usize], 0).unwrap();
    assert!(!dev.writer.as_ref().unwrap().meta().is_checked(l.l2, 0));
    let mut buf = vec![0u8; 3 * CS as usize];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf[..CS as usize].iter().all(|&b| b == 0x33));
    assert!(buf[2 * CS as usize..].iter().all(|&b| b == 0x22));
    dev.flush().unwrap();
    let l1_before = std::fs::read(&img).unwrap()[l.l1 as usize..(l.l1 + CS) as usize].to_vec();
    let err = dev.write_at(&[0x44; 512], CS + 512).unwrap_err();
    assert!(err.to_string().contains("overlaps the L1 table"), "{err}");
    drop(dev);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(&after[l.l1 as usize..(l.l1 + CS) as usize], &l1_before[..]);
}

/// `qemu-img check`: exit 0 (clean) or 3 (leaks only).
fn assert_qemu_check_clean(path: &Path) {
    let out = qemu("qemu-img", &["check", "-f", "qcow2", s(path)]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn many_allocating_writes_pass_their_own_overlap_check() {
    // 512-byte clusters: every 32 KiB of guest space needs an L2 table, every 128 KiB of file
    // a refcount block, and the one-cluster refcount table (64 blocks, 8 MiB of file) must
    // grow: the metadata map has to follow every one of those, or the writer would refuse its
    // own new clusters (or hand out the old refcount table's).
    let dir = scratch("qcow2-overlap-many");
    let img = dir.join("disk.qcow2");
    let size: u64 = 32 << 20;
    qemu_qcow2(&img, 512, "32M");
    let rt_before = be64(&std::fs::read(&img).unwrap(), 48);
    let mut model = vec![0u8; size as usize];
    let dev = open_rw(&img);
    let ranges_before = dev.writer.as_ref().unwrap().meta().len();
    let mut k = 0u8;
    let mut write = |dev: &Qcow2Image, model: &mut [u8], off: u64, len: usize| {
        k = k.wrapping_add(1) | 1;
        let buf: Vec<u8> = (0..len).map(|i| k ^ (i / 512) as u8).collect();
        dev.write_at(&buf, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    };
    for off in (0..size).step_by(32 << 10) {
        write(&dev, &mut model, off, 8 << 10);
    }
    // Free some clusters (discard) and overwrite others in place.
    for off in (0..size).step_by(256 << 10) {
        dev.discard(off, 4096).unwrap();
        model[off as usize..off as usize + 4096].fill(0);
        write(&dev, &mut model, off + 4096, 1024);
    }
    // Allocating again reuses the freed clusters (and the old refcount table's).
    for off in (16 << 10..size).step_by(64 << 10) {
        write(&dev, &mut model, off, 2048);
    }
    dev.flush().unwrap();
    let w = dev.writer.as_ref().unwrap();
    assert!(
        w.meta().len() > ranges_before + 1000,
        "{} ranges",
        w.meta().len()
    );
    assert!(
        w.meta()
            .is_checked(dev.l1.read().unwrap()[0] & OFFSET_MASK, 0)
    );
    let mut back = vec![0u8; size as usize];
    dev.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs");
    drop(dev);
    let bytes = std::fs::read(&img).unwrap();
    assert_ne!(
        be64(&bytes, 48),
        rt_before,
        "the refcount table did not grow"
    );
    assert_qemu_check_clean(&img);
    let raw = dir.join("back.raw");
    qemu_ok(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&raw)],
    );
    assert!(
        std::fs::read(&raw).unwrap() == model,
        "qemu reads other bytes"
    );
    let report = crate::open(&img, &crate::registry::OpenOptions::default())
        .unwrap()
        .check()
        .unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
}

#[test]
fn bitmap_tables_are_walked_within_one_cap_for_all_of_them() {
    // Two bitmaps whose tables claim 3M entries each (24 MiB of zeros in a file grown to hold
    // them), once as two tables and once as one table both name: the entries are counted as
    // often as a table is named, and the writable open is refused at the cap for all together.
    for shared in [false, true] {
        let dir = scratch("qcow2-overlap-bitmaps");
        let img = dir.join("disk.qcow2");
        qemu_qcow2(&img, CS, "64M");
        for name in ["b0", "b1"] {
            qemu_ok("qemu-img", &["bitmap", "--add", s(&img), name]);
        }
        let dir_off = open_rw(&img).ext.bitmaps.as_ref().unwrap().directory_offset;
        let bytes = std::fs::read(&img).unwrap();
        let at = dir_off as usize;
        let first_table = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        // Entries of 24 bytes and a 2-byte name, padded to 32.
        for entry in [dir_off, dir_off + 32] {
            patch(&img, entry + 8, &(3u32 << 20).to_be_bytes());
        }
        if shared {
            patch(&img, dir_off + 32, &first_table.to_be_bytes());
        }
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        drop(f);
        let options = crate::registry::OpenOptions {
            writable: true,
            ..Default::default()
        };
        let err = crate::open(&img, &options)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("entries in all"), "shared {shared}: {err}");
    }
}
