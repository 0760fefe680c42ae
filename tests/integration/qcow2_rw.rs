//! In-place writes to existing qcow2 images (`Image::into_mut_device`), checked against a shadow
//! model of the guest bytes: random writes, write_zeroes and discards over images qemu-img made
//! (v2 and v3, backing files, compressed and zero clusters, internal snapshots, 512-byte
//! clusters that force L2 tables, refcount blocks and the refcount table to grow). After each
//! scenario `qemu-img check` must be clean (no leaks either), `qemu-img compare` must find the
//! image identical to a raw file of the model, and qcow2-rs and our own reader must agree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use image_format::{BlockDeviceMut, OpenOptions};
use vmnest_tests::*;

use super::qcow2::hash_with_qcow2_rs;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Opens `path` writable and returns its in-place device.
pub(crate) fn open_rw(path: &Path) -> Arc<dyn BlockDeviceMut> {
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = image_format::open(path, &options)
        .unwrap_or_else(|e| panic!("open {} writable: {e}", path.display()));
    img.into_mut_device().expect("qcow2 writes in place")
}

/// A small xorshift generator: deterministic scenarios.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The allocation unit of the image under test and what a discard does to it.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub cluster: u64,
    /// Discards make whole units of this size read back as zeros (qcow2: the cluster; 1 for
    /// formats that zero exactly the range); `None`: discard leaves everything alone (qcow2 v2
    /// over a backing file).
    pub discard_unit: Option<u64>,
}

/// Applies `ops` random operations to `dev` and `model`. Offsets lean towards cluster edges
/// so partial and whole clusters both occur.
pub(crate) fn random_ops(
    dev: &dyn BlockDeviceMut,
    model: &mut [u8],
    layout: Layout,
    seed: u64,
    ops: usize,
) {
    let size = model.len() as u64;
    let mut rng = Rng(seed | 1);
    for op in 0..ops {
        let align = [1, 512, layout.cluster][rng.below(3) as usize];
        let off = (rng.below(size) / align * align).min(size - 1);
        let max = (size - off).min(layout.cluster * 5);
        let len = (1 + rng.below(max)).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let mut buf = vec![0u8; len as usize];
                pattern_bytes(&mut buf, off, seed ^ op as u64);
                dev.write_at(&buf, off)
                    .unwrap_or_else(|e| panic!("op {op}: write {len} at {off:#x}: {e}"));
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
            6..=7 => {
                dev.write_zeroes(off, len)
                    .unwrap_or_else(|e| panic!("op {op}: zero {len} at {off:#x}: {e}"));
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                dev.discard(off, len)
                    .unwrap_or_else(|e| panic!("op {op}: discard {len} at {off:#x}: {e}"));
                if let Some(unit) = layout.discard_unit {
                    discard_model(model, unit, off, len);
                }
            }
            _ => dev.flush().expect("flush"),
        }
    }
    dev.flush().expect("final flush");
}

/// Whole units of `[off, off + len)` (the disk's last partial unit counts as whole) read as
/// zeros after a discard; partial units are left alone.
fn discard_model(model: &mut [u8], cluster: u64, off: u64, len: u64) {
    let size = model.len() as u64;
    let end = off + len;
    let mut c = off.div_ceil(cluster) * cluster;
    while c < end {
        let c_end = (c + cluster).min(size);
        if c_end <= end {
            model[c as usize..c_end as usize].fill(0);
        }
        c += cluster;
    }
}

/// The checks every scenario ends with. qcow2-rs reads only clusters of 4 KiB and more.
pub(crate) fn verify(dir: &Path, img: &Path, model: &[u8], name: &str) {
    let out = run(Command::new(require("qemu-img")).args(["check", "-f", "qcow2", s(img)]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name}: qemu-img check: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("No errors were found"), "{name}: {text}");
    assert!(!text.contains("leaked"), "{name}: {text}");
    let raw = dir.join(format!("{name}.model.raw"));
    std::fs::write(&raw, model).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(img)]);
    let want = blake3::hash(model).to_hex().to_string();
    assert_eq!(hash_device(open(img).as_ref()), want, "{name}: our reader");
    let cluster = qemu_info(img, "qcow2")["cluster-size"]
        .as_u64()
        .unwrap_or(0);
    if cluster >= 4096 {
        assert_eq!(hash_with_qcow2_rs(img), want, "{name}: qcow2-rs");
    }
    let ours = run_ok(vmnest().args(["check", s(img)]));
    assert!(!ours.contains("corrupt"), "{name}: vmnest check: {ours}");
    std::fs::remove_file(&raw).unwrap();
}

/// The header's refcount table offset and cluster count (bytes 48..60).
fn refcount_table_field(img: &Path) -> Vec<u8> {
    std::fs::read(img).unwrap()[48..60].to_vec()
}

/// `qemu-img convert -f raw -O qcow2 EXTRA RAW IMG`.
pub(crate) fn to_qcow2(raw: &Path, img: &Path, extra: &[&str]) {
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.extend([s(raw), s(img)]);
    qemu_img(&args);
}

/// A qcow2 overlay `img` of the qcow2 `base` (named by its absolute path, which qcow2-rs needs)
/// with `-o OPTIONS` unless empty.
pub(crate) fn overlay(base: &Path, img: &Path, options: &str) {
    let mut args = vec!["create", "-f", "qcow2", "-b", s(base), "-F", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.push(s(img));
    qemu_img(&args);
}

/// A pattern raw of `size` bytes and the model of its content.
fn pattern(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    write_pattern_raw(&raw, size, seed);
    let model = read_raw(&raw);
    (raw, model)
}

#[test]
fn random_writes_to_a_v3_image_with_compressed_and_zero_clusters() {
    let dir = scratch("qcow2-rw-v3");
    let (raw, mut model) = pattern(&dir, "base", 8 << 20, 3);
    let img = dir.join("disk.qcow2");
    to_qcow2(&raw, &img, &["-c", "-o", "cluster_size=4096"]);
    // Explicit zero clusters, from qemu itself.
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "qcow2",
        "-c",
        "write -z 1048576 65536",
        "-c",
        "write -z -u 3145728 131072",
        s(&img),
    ]));
    model[1 << 20..(1 << 20) + 65536].fill(0);
    model[3 << 20..(3 << 20) + 131072].fill(0);
    let layout = Layout {
        cluster: 4096,
        discard_unit: Some(4096),
    };
    {
        let dev = open_rw(&img);
        random_ops(dev.as_ref(), &mut model, layout, 0x5eed, 400);
    }
    verify(&dir, &img, &model, "v3-compressed");
}

#[test]
fn small_clusters_grow_l2_tables_refcount_blocks_and_the_refcount_table() {
    let dir = scratch("qcow2-rw-grow");
    for (name, opts, seed) in [
        ("v3-rc16", "cluster_size=512", 7u64),
        ("v3-rc4", "cluster_size=512,refcount_bits=4", 8),
        ("v3-rc64", "cluster_size=512,refcount_bits=64", 9),
        ("v2", "cluster_size=512,compat=0.10", 10),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, s(&img), "9M"]);
        let before = qemu_info(&img, "qcow2");
        let table_before = refcount_table_field(&img);
        let mut model = vec![0u8; 9 << 20];
        let layout = Layout {
            cluster: 512,
            discard_unit: Some(512),
        };
        {
            let dev = open_rw(&img);
            // Fill most of the disk so the refcount table (one 512-byte cluster at first,
            // covering 64 blocks) must move.
            let mut buf = vec![0u8; 256 << 10];
            for i in 0..34u64 {
                let off = i * (270 << 10);
                pattern_bytes(&mut buf, off, seed);
                dev.write_at(&buf, off).unwrap();
                model[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
            }
            random_ops(dev.as_ref(), &mut model, layout, seed, 300);
        }
        verify(&dir, &img, &model, name);
        let after = qemu_info(&img, "qcow2");
        assert_eq!(before["virtual-size"], after["virtual-size"]);
        // 4-bit refcounts: one table cluster covers 64 blocks of 1024 clusters, enough.
        if name != "v3-rc4" {
            assert_ne!(
                refcount_table_field(&img),
                table_before,
                "{name}: the refcount table did not move"
            );
        }
    }
}

#[test]
fn writes_over_a_backing_file_copy_on_write_what_the_guest_saw() {
    let dir = scratch("qcow2-rw-backing");
    let (raw, model) = pattern(&dir, "base", 8 << 20, 21);
    let base = dir.join("base.qcow2");
    to_qcow2(&raw, &base, &["-c"]);
    for (name, opts, discard_zeroes) in [
        ("overlay-v3", "cluster_size=2048", true),
        ("overlay-v2", "cluster_size=1024,compat=0.10", false),
        ("overlay-v3-4k", "cluster_size=4096", true),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        overlay(&base, &img, opts);
        let mut model = model.clone();
        let cluster = match name {
            "overlay-v3" => 2048,
            "overlay-v2" => 1024,
            _ => 4096,
        };
        let layout = Layout {
            cluster,
            discard_unit: discard_zeroes.then_some(cluster),
        };
        {
            let dev = open_rw(&img);
            random_ops(dev.as_ref(), &mut model, layout, 77, 400);
        }
        verify(&dir, &img, &model, name);
    }
    // The backing file is untouched.
    let untouched = dir.join("base-again.raw");
    qemu_to_raw(&base, "qcow2", &untouched);
    assert_eq!(hash_file(&untouched), hash_file(&raw));
}

#[test]
fn internal_snapshots_keep_their_data_while_the_active_image_changes() {
    let dir = scratch("qcow2-rw-snapshot");
    let (raw, mut model) = pattern(&dir, "base", 8 << 20, 31);
    let img = dir.join("disk.qcow2");
    to_qcow2(&raw, &img, &["-o", "cluster_size=4096"]);
    qemu_img(&["snapshot", "-c", "before", s(&img)]);
    let layout = Layout {
        cluster: 4096,
        discard_unit: Some(4096),
    };
    {
        let dev = open_rw(&img);
        random_ops(dev.as_ref(), &mut model, layout, 99, 300);
    }
    verify(&dir, &img, &model, "snapshot-active");
    let snap = dir.join("snapshot.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-l",
        "snapshot.name=before",
        "-O",
        "raw",
        s(&img),
        s(&snap),
    ]);
    assert_eq!(
        hash_file(&snap),
        hash_file(&raw),
        "snapshot content changed"
    );
}

#[test]
fn concurrent_writers_to_shared_and_separate_clusters_all_land() {
    let dir = scratch("qcow2-rw-threads");
    let (raw, mut model) = pattern(&dir, "base", 8 << 20, 41);
    let base = dir.join("base.qcow2");
    to_qcow2(&raw, &base, &["-c"]);
    let img = dir.join("top.qcow2");
    overlay(&base, &img, "cluster_size=4096");
    const THREADS: u64 = 4;
    const PIECE: u64 = 1024;
    {
        let dev = open_rw(&img);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let dev = Arc::clone(&dev);
                scope.spawn(move || {
                    // Every thread writes its own quarter of the same clusters (copy-on-write
                    // of one cluster from several threads at once), then a region of its own.
                    for c in 0..256u64 {
                        let off = c * 4096 * 3 + t * PIECE;
                        let mut buf = vec![0u8; PIECE as usize];
                        pattern_bytes(&mut buf, off, t);
                        dev.write_at(&buf, off).unwrap();
                    }
                    let own = (4 << 20) + t * (512 << 10);
                    let mut buf = vec![0u8; 300 << 10];
                    pattern_bytes(&mut buf, own, t + 100);
                    dev.write_at(&buf, own + 100).unwrap();
                    dev.write_zeroes(own + (400 << 10), 8192).unwrap();
                    dev.flush().unwrap();
                });
            }
        });
    }
    for t in 0..THREADS {
        for c in 0..256u64 {
            let off = c * 4096 * 3 + t * PIECE;
            pattern_bytes(&mut model[off as usize..(off + PIECE) as usize], off, t);
        }
        let own = (4 << 20) + t * (512 << 10);
        pattern_bytes(
            &mut model[own as usize + 100..own as usize + 100 + (300 << 10)],
            own,
            t + 100,
        );
        model[(own + (400 << 10)) as usize..(own + (400 << 10) + 8192) as usize].fill(0);
    }
    verify(&dir, &img, &model, "threads");
}

#[test]
fn writable_opens_refuse_what_cannot_be_written_in_place() {
    let dir = scratch("qcow2-rw-refusals");
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let ext = dir.join("extl2.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&ext),
        "1M",
    ]);
    let err = image_format::open(&ext, &options).err().expect("refused");
    assert!(err.to_string().contains("extended L2"), "{err}");
    // Read-only opens still work.
    open(&ext);

    let dirty = dir.join("dirty.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&dirty), "1M"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dirty)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &1u64.to_be_bytes(), 72).unwrap();
    drop(f);
    let err = image_format::open(&dirty, &options).err().expect("refused");
    assert!(err.to_string().contains("dirty"), "{err}");

    let ro = dir.join("ro.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&ro), "1M"]);
    assert!(open(&ro).into_mut_device().is_none());
}
