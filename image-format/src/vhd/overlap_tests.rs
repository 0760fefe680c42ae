//! The in-place writer's refusal of blocks whose bitmap and data overlap another structure or
//! run past the file's data: a dynamic VHD made by qemu-img, then one BAT entry patched.
//! Every request touching the block must fail with a corruption error naming the file, the
//! block and the offsets, and leave the file byte for byte as it was.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::blockdev::{BlockDevice, BlockDeviceMut};
use crate::crash_test::{open_writable, qemu_ok, s, scratch};

use super::VhdImage;

/// qemu's default block size for dynamic VHDs.
const BLOCK: u64 = 2 << 20;

fn open_rw(path: &Path) -> Arc<VhdImage> {
    open_writable(path, VhdImage::open)
}

fn be(bytes: &[u8], off: u64, n: usize) -> u64 {
    bytes[off as usize..off as usize + n]
        .iter()
        .fold(0, |acc, &b| (acc << 8) | u64::from(b))
}

/// Where qemu-img put things.
struct Layout {
    /// The BAT's file offset.
    bat: u64,
    /// Block 0's host offset.
    block0: u64,
    file_len: u64,
}

/// A 16 MiB dynamic VHD with blocks 0 and 1 allocated.
fn base_image(name: &str) -> (PathBuf, Layout) {
    let dir = scratch(name);
    let img = dir.join("disk.vhd");
    qemu_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "vpc",
            "-o",
            "subformat=dynamic",
            s(&img),
            "16M",
        ],
    );
    qemu_ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x11 0 4M", s(&img)],
    );
    let bytes = std::fs::read(&img).unwrap();
    let header = be(&bytes, 16, 8);
    let bat = be(&bytes, header + 16, 8);
    let block0 = be(&bytes, bat, 4) * 512;
    assert!(be(&bytes, bat + 4, 4) != 0xffff_ffff, "block 1 unallocated");
    (
        img,
        Layout {
            bat,
            block0,
            file_len: bytes.len() as u64,
        },
    )
}

fn set_bat(img: &Path, l: &Layout, block: u64, sector: u32) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&sector.to_be_bytes(), l.bat + 4 * block)
        .unwrap();
}

/// Opens `img` writable, writes (or, `zero`, zeroes) 64 KiB at guest `guest`, and asserts the
/// request fails as a corruption whose text holds the file name and every piece of `expect`,
/// with the file unchanged.
fn assert_refused(img: &Path, zero: bool, guest: u64, expect: &[String]) {
    let before = std::fs::read(img).unwrap();
    let dev = open_rw(img);
    let r = if zero {
        dev.write_zeroes(guest, 64 << 10)
    } else {
        dev.write_at(&[0xab; 64 << 10], guest)
    };
    let err = r.expect_err("the request was carried out");
    assert!(err.is_corruption(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&img.display().to_string()), "{msg}");
    for e in expect {
        assert!(msg.contains(e.as_str()), "{msg:?} lacks {e:?}");
    }
    dev.flush().unwrap();
    drop(dev);
    assert!(std::fs::read(img).unwrap() == before, "the file changed");
}

#[test]
fn a_block_on_the_bat_is_refused() {
    let (img, l) = base_image("vhd-overlap-bat");
    set_bat(&img, &l, 1, (l.bat / 512) as u32);
    for zero in [false, true] {
        assert_refused(
            &img,
            zero,
            BLOCK + 4096,
            &[
                format!(
                    "corrupt VHD block allocation table at offset {:#x}",
                    l.bat + 4
                ),
                format!("block 1 at host offset {:#x}", l.bat),
                "overlaps the block allocation table".into(),
                format!("guest offset {:#x}", BLOCK + 4096),
            ],
        );
    }
}

#[test]
fn blocks_on_the_footers_are_refused() {
    let (img, l) = base_image("vhd-overlap-footer");
    let good = std::fs::read(&img).unwrap();
    // On the footer copy at offset 0 (and the dynamic header after it).
    set_bat(&img, &l, 1, 0);
    assert_refused(
        &img,
        false,
        BLOCK,
        &[
            "block 1 at host offset 0x0".into(),
            "overlaps the footer copy at 0x0..0x200".into(),
        ],
    );
    // On the footer at the end: the block runs past the file's data.
    std::fs::write(&img, &good).unwrap();
    let footer = l.file_len - 512;
    set_bat(&img, &l, 0, (footer / 512) as u32);
    assert_refused(
        &img,
        true,
        0,
        &[
            format!("block 0 at host offset {footer:#x}"),
            "runs past the file's data".into(),
        ],
    );
}

#[test]
fn overlapping_blocks_are_both_refused() {
    let (img, l) = base_image("vhd-overlap-blocks");
    let b1 = l.block0 + 4096;
    set_bat(&img, &l, 1, (b1 / 512) as u32);
    assert_refused(
        &img,
        false,
        0,
        &[
            format!("block 0 at host offset {:#x}", l.block0),
            format!("overlaps the block 1 at {b1:#x}.."),
        ],
    );
    assert_refused(
        &img,
        false,
        BLOCK,
        &[
            format!("block 1 at host offset {b1:#x}"),
            format!("overlaps the block 0 at {:#x}..", l.block0),
        ],
    );
}

#[test]
fn no_block_is_allocated_over_a_stray_one_past_the_end() {
    // Block 1 claims space past the end of the file; a new block would go where the footer
    // is, under block 1's range: refused too, while block 0 stays writable.
    let (img, l) = base_image("vhd-overlap-past-end");
    let stray = l.file_len + (1 << 20);
    set_bat(&img, &l, 1, (stray / 512) as u32);
    assert_refused(
        &img,
        false,
        BLOCK,
        &[
            format!("block 1 at host offset {stray:#x}"),
            "runs past the file's data".into(),
        ],
    );
    assert_refused(
        &img,
        false,
        3 * BLOCK,
        &[
            format!(
                "block 3 would be allocated at host offset {:#x}",
                l.file_len - 512
            ),
            format!("existing structures reach {:#x}", stray + 512 + BLOCK),
        ],
    );
    let dev = open_rw(&img);
    dev.write_at(&[0x5a; 4096], 8192).unwrap();
    let mut back = [0u8; 4096];
    dev.read_at(&mut back, 8192).unwrap();
    assert_eq!(back, [0x5a; 4096]);
}

#[test]
fn good_images_keep_allocating_and_check_clean() {
    let (img, _) = base_image("vhd-overlap-good");
    let dev = open_rw(&img);
    let mut model = vec![0u8; 16 << 20];
    model[..4 << 20].fill(0x11);
    for (i, off) in (0..16u64 << 20).step_by(1 << 20).enumerate() {
        let buf = vec![i as u8 | 0x80; 8192];
        dev.write_at(&buf, off + 512).unwrap();
        model[off as usize + 512..off as usize + 512 + 8192].copy_from_slice(&buf);
    }
    dev.flush().unwrap();
    drop(dev);
    let img = crate::open(&img, &crate::registry::OpenOptions::default()).unwrap();
    let report = img.check().unwrap();
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    let mut back = vec![0u8; 16 << 20];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == model, "read back differs");
}
