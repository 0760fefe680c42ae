//! qcow2 reader against qemu-img made images (qemu-img info/map/check/convert are the oracle)
//! and the dfvfs sample images.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_format::{Error, ExtentKind, OpenOptions};
use vmnest_tests::{
    PATTERN_SIZE, data_ranges, hash_device, hash_file, open, qemu_img, qemu_info, qemu_map_data,
    require, run_ok, sample, scratch, write_pattern_raw,
};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn qemu_io(args: &[&str], image: &Path) {
    run_ok(Command::new(require("qemu-io")).args(args).arg(image));
}

/// A patterned raw image and its qcow2 conversion with `args` (`-c`, `-o ...`).
fn convert(name: &str, args: &[&str]) -> (PathBuf, PathBuf) {
    let dir = scratch(&format!("qcow2-{name}"));
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 0x9c0f_2000 ^ name.len() as u64);
    // The pattern is incompressible (qemu stores such clusters uncompressed even with -c), so
    // add a compressible run, starting mid-cluster, for the compressed variants to compress.
    let text: Vec<u8> = (0..300u32 << 10)
        .map(|i| b"vmnest qcow2 "[(i % 13) as usize] ^ (i >> 12) as u8)
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&text, (12 << 20) + 512).unwrap();
    let img = dir.join(format!("{name}.qcow2"));
    let mut full = vec!["convert", "-f", "raw", "-O", "qcow2"];
    full.extend_from_slice(args);
    full.extend_from_slice(&[s(&raw), s(&img)]);
    qemu_img(&full);
    (raw, img)
}

/// `qemu-img convert -O raw` of an image (the oracle for content).
fn to_raw(img: &Path) -> PathBuf {
    let out = img.with_extension("oracle.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&out)]);
    out
}

fn qemu_check(img: &Path) -> serde_json::Value {
    let out = vmnest_tests::run(Command::new(require("qemu-img")).args([
        "check",
        "--output=json",
        s(img),
    ]));
    serde_json::from_slice(&out.stdout).expect("qemu-img check json")
}

/// Size, content, data ranges, format-specific info and check agree with qemu.
fn assert_like_qemu(img: &Path, content: &Path) {
    let ours = open(img);
    let q = qemu_info(img, "qcow2");
    assert_eq!(
        ours.size(),
        q["virtual-size"].as_u64().unwrap(),
        "virtual size"
    );
    assert_eq!(
        hash_device(ours.as_ref()),
        hash_file(content),
        "guest content"
    );
    assert_eq!(
        data_ranges(ours.as_ref()),
        qemu_map_data(img, "qcow2"),
        "data ranges"
    );
    let info = ours.info().unwrap();
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.cluster_size, q["cluster-size"].as_u64());
    let specific = serde_json::Value::Object(info.format_specific.clone());
    assert_eq!(
        specific, q["format-specific"]["data"],
        "format-specific info"
    );
    let report = ours.check().unwrap();
    assert!(
        report.corruptions.is_empty() && report.leaks.is_empty(),
        "{report:#?}"
    );
    let qc = qemu_check(img);
    assert_eq!(
        report.allocated_clusters,
        qc["allocated-clusters"].as_u64(),
        "allocated clusters"
    );
    assert_eq!(
        report.total_clusters,
        qc["total-clusters"].as_u64(),
        "total clusters"
    );
    assert_eq!(
        report.image_end_offset,
        qc["image-end-offset"].as_u64(),
        "image end offset"
    );
}

#[test]
fn qcow2_v3_default_matches_qemu() {
    let (raw, img) = convert("v3", &[]);
    assert_like_qemu(&img, &raw);
    assert_eq!(open(&img).info().unwrap().subformat.as_deref(), Some("v3"));
}

#[test]
fn qcow2_v2_compat_0_10_matches_qemu() {
    let (raw, img) = convert("v2", &["-o", "compat=0.10"]);
    assert_like_qemu(&img, &raw);
    assert_eq!(open(&img).info().unwrap().subformat.as_deref(), Some("v2"));
}

#[test]
fn qcow2_4k_clusters_match_qemu() {
    let (raw, img) = convert("c4k", &["-o", "cluster_size=4k"]);
    assert_like_qemu(&img, &raw);
}

#[test]
fn qcow2_2m_clusters_match_qemu() {
    let (raw, img) = convert("c2m", &["-o", "cluster_size=2M"]);
    assert_like_qemu(&img, &raw);
}

#[test]
fn qcow2_zlib_compressed_matches_qemu() {
    let (raw, img) = convert("zlib", &["-c"]);
    assert_like_qemu(&img, &raw);
    let ext = open(&img).block_status(12 << 20, 65536).unwrap();
    assert!(
        ext.compressed && ext.kind == ExtentKind::Data && ext.host.is_none(),
        "{ext:?}"
    );
}

#[test]
fn qcow2_zstd_compressed_matches_qemu() {
    let (raw, img) = convert("zstd", &["-c", "-o", "compression_type=zstd"]);
    assert_like_qemu(&img, &raw);
    assert!(open(&img).block_status(12 << 20, 65536).unwrap().compressed);
}

#[test]
fn qcow2_extended_l2_matches_qemu() {
    let (raw, img) = convert("extl2", &["-o", "extended_l2=on"]);
    assert_like_qemu(&img, &raw);
}

#[test]
fn qcow2_extended_l2_128k_clusters_match_qemu() {
    let (raw, img) = convert("extl2-128k", &["-o", "extended_l2=on,cluster_size=128k"]);
    assert_like_qemu(&img, &raw);
}

#[test]
fn qcow2_extended_l2_subcluster_writes_match_qemu() {
    let (_, img) = convert("extl2-sub", &["-o", "extended_l2=on,cluster_size=128k"]);
    // 4 KiB subclusters: a write inside an unallocated cluster and a zero write in a data one.
    qemu_io(
        &["-c", "write -P 0x33 9M 12k", "-c", "write -z 4k 8k"],
        &img,
    );
    assert_like_qemu(&img, &to_raw(&img));
}

#[test]
fn qcow2_backing_chain_reads_base_plus_changes() {
    let (_, base) = convert("chain", &[]);
    let top = base.with_file_name("top.qcow2");
    qemu_img(&[
        "create",
        "-F",
        "qcow2",
        "-b",
        "chain.qcow2",
        "-f",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&["-c", "write -P 0x5a 1M 64k"], &top);
    let oracle = to_raw(&top);
    assert_like_qemu(&top, &oracle);
    let img = open(&top);
    let info = img.info().unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("chain.qcow2"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    assert!(img.backing().is_some());
    // Unallocated in the overlay, data in the base: reported at depth 1.
    let ext = img.block_status(0, 4096).unwrap();
    assert_eq!((ext.kind, ext.depth), (ExtentKind::Data, 1));
    let ext = img.block_status(1 << 20, 4096).unwrap();
    assert_eq!((ext.kind, ext.depth), (ExtentKind::Data, 0));
}

#[test]
fn qcow2_overlay_larger_than_its_backing_reads_zeros_past_it() {
    let dir = scratch("qcow2-bigger-overlay");
    let base = dir.join("small.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&["-c", "write -P 0x77 0 1M"], &base);
    let top = dir.join("big.qcow2");
    qemu_img(&[
        "create",
        "-F",
        "qcow2",
        "-b",
        "small.qcow2",
        "-f",
        "qcow2",
        s(&top),
        "4M",
    ]);
    assert_eq!(hash_device(open(&top).as_ref()), hash_file(&to_raw(&top)));
}

#[test]
fn qcow2_zero_clusters_read_as_zero() {
    let (_, img) = convert("zero", &[]);
    // Preallocated zero cluster (offset kept) and a plain one (unmapped).
    qemu_io(&["-c", "write -z 0 64k", "-c", "write -z -u 5M 64k"], &img);
    let ours = open(&img);
    for off in [0u64, 5 << 20] {
        let ext = ours.block_status(off, 65536).unwrap();
        assert_eq!(ext.kind, ExtentKind::Zero, "at {off:#x}: {ext:?}");
        let mut buf = vec![1u8; 65536];
        ours.read_at(&mut buf, off).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    assert_like_qemu(&img, &to_raw(&img));
}

#[test]
fn qcow2_internal_snapshot_is_listed_and_checks_clean() {
    let (raw, img) = convert("snap", &[]);
    qemu_img(&["snapshot", "-c", "snap1", s(&img)]);
    assert_like_qemu(&img, &raw);
    // Writing after the snapshot copies clusters on write: still consistent, new content.
    qemu_io(&["-c", "write -P 0x42 0 128k"], &img);
    assert_like_qemu(&img, &to_raw(&img));
    let info = open(&img).info().unwrap();
    assert_eq!(info.snapshots.len(), 1);
    assert_eq!(
        (
            info.snapshots[0].id.as_str(),
            info.snapshots[0].name.as_str()
        ),
        ("1", "snap1")
    );
    assert_eq!(info.snapshots[0].disk_size, Some(PATTERN_SIZE));
}

/// Sets incompatible feature bit 0 (dirty) in byte 72+7 of a copy.
fn dirty_copy(img: &Path) -> PathBuf {
    let copy = img.with_file_name("dirty-copy.qcow2");
    std::fs::copy(img, &copy).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    f.write_all_at(&[b[0] | 1], 79).unwrap();
    copy
}

#[test]
fn qcow2_dirty_image_reads_but_refuses_writing() {
    let (raw, img) = convert("dirty", &[]);
    let dirty = dirty_copy(&img);
    let ours = open(&dirty);
    assert!(ours.info().unwrap().dirty);
    assert_eq!(hash_device(ours.as_ref()), hash_file(&raw));
    let opts = OpenOptions {
        writable: true,
        format: Some("qcow2".into()),
        ..Default::default()
    };
    let err = image_format::open(&dirty, &opts)
        .err()
        .expect("writable open refused");
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
}

#[test]
fn qcow2_missing_backing_file_is_an_error_naming_it() {
    let dir = scratch("qcow2-missing-backing");
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "gone-base.qcow2",
        "-f",
        "qcow2",
        s(&top),
        "8M",
    ]);
    let err = image_format::open(&top, &OpenOptions::default())
        .err()
        .expect("open refused");
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("gone-base.qcow2"), "{err}");
    // Recorded but not opened: unallocated reads fail instead of reading zeros.
    let opts = OpenOptions {
        open_backing: false,
        ..Default::default()
    };
    let img = image_format::open(&top, &opts).unwrap();
    assert!(img.read_at(&mut [0u8; 512], 0).is_err());
}

#[test]
fn qcow2_backing_path_escaping_the_directory_is_refused() {
    let dir = scratch("qcow2-escape");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "8M"]);
    let top = dir.join("sub/top.qcow2");
    qemu_img(&[
        "create",
        "-F",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-f",
        "qcow2",
        s(&top),
    ]);
    let err = image_format::open(&top, &OpenOptions::default())
        .err()
        .expect("open refused");
    assert!(matches!(err, Error::PathOutsideDirectory { .. }), "{err}");
}

fn be_u64(f: &std::fs::File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

#[test]
fn qcow2_check_finds_a_zeroed_refcount() {
    let (_, img) = convert("badrefcount", &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let rt = be_u64(&f, 48);
    let block = be_u64(&f, rt);
    let l1 = be_u64(&f, 40);
    let l2 = be_u64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    // Refcount of the first L2 table's cluster (16-bit entries, 64 KiB clusters) set to 0.
    f.write_all_at(&[0, 0], block + (l2 >> 16) * 2).unwrap();
    drop(f);
    let report = open(&img).check().unwrap();
    assert!(
        report
            .corruptions
            .iter()
            .any(|p| p.offset == Some(l2) && p.message.contains("refcount too low")),
        "{report:#?}"
    );
    assert_eq!(
        qemu_check(&img)["corruptions"].as_u64().map(|n| n > 0),
        Some(true)
    );
    assert_check_exit_like_qemu(&img, 2);
}

/// `vmnest check` exits with `code`, and so does `qemu-img check`.
fn assert_check_exit_like_qemu(img: &Path, code: i32) {
    let ours = vmnest_tests::run(vmnest_tests::vmnest().arg("check").arg(img));
    assert_eq!(
        ours.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&ours.stdout)
    );
    let qemu =
        vmnest_tests::run(std::process::Command::new(require("qemu-img")).args(["check", s(img)]));
    assert_eq!(qemu.status.code(), Some(code));
}

#[test]
fn qcow2_l2_entry_past_eof_is_a_read_error_and_a_corruption() {
    let (_, img) = convert("pasteof", &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let l1 = be_u64(&f, 40);
    let l2 = be_u64(&f, l1) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l2)
        .unwrap();
    drop(f);
    let ours = open(&img);
    let err = ours.read_at(&mut [0u8; 4096], 0).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("pasteof.qcow2") && msg.contains("qcow2 data cluster"),
        "{msg}"
    );
    let report = ours.check().unwrap();
    assert!(
        report
            .corruptions
            .iter()
            .any(|p| p.structure == "qcow2 data cluster" && p.offset == Some(1 << 40)),
        "{report:#?}"
    );
}

#[test]
fn qcow2_leaked_cluster_is_a_leak_not_a_corruption() {
    let (_, img) = convert("leak", &[]);
    // Point the first L1 entry away from its L2 table: the table's cluster becomes a leak.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let l1 = be_u64(&f, 40);
    f.write_all_at(&[0u8; 8], l1).unwrap();
    drop(f);
    let report = open(&img).check().unwrap();
    assert!(report.corruptions.is_empty(), "{report:#?}");
    assert_eq!(
        report.leaks.len() as u64,
        qemu_check(&img)["leaks"].as_u64().unwrap()
    );
    assert_check_exit_like_qemu(&img, 3);
}

fn sample_like_qemu(rel: &str, virtual_size: u64) {
    let img = sample(rel);
    let ours = open(&img);
    assert_eq!(ours.format(), "qcow2");
    assert_eq!(ours.size(), virtual_size);
    assert_eq!(
        ours.size(),
        qemu_info(&img, "qcow2")["virtual-size"].as_u64().unwrap()
    );
    let dir = scratch(&format!("qcow2-sample-{}", rel.replace('/', "-")));
    let oracle = dir.join("oracle.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&oracle)]);
    assert_eq!(hash_device(ours.as_ref()), hash_file(&oracle));
    assert_eq!(data_ranges(ours.as_ref()), qemu_map_data(&img, "qcow2"));
    let report = ours.check().unwrap();
    assert!(report.corruptions.is_empty(), "{report:#?}");
}

#[test]
fn qcow2_sample_dfvfs_ext2() {
    let size = qemu_info(&sample("dfvfs/ext2.qcow2"), "qcow2")["virtual-size"]
        .as_u64()
        .unwrap();
    sample_like_qemu("dfvfs/ext2.qcow2", size);
}

#[test]
fn qcow2_sample_dfvfs_windows_volume() {
    let size = qemu_info(&sample("dfvfs/windows_volume.qcow2"), "qcow2")["virtual-size"]
        .as_u64()
        .unwrap();
    sample_like_qemu("dfvfs/windows_volume.qcow2", size);
}

#[test]
fn qcow2_persistent_bitmap_is_listed_and_checks_clean() {
    let (raw, img) = convert("bitmap", &[]);
    qemu_img(&["bitmap", "--add", "-g", "128k", s(&img), "b0"]);
    // assert_like_qemu compares format-specific info (with the bitmap list) and a clean check,
    // which needs the bitmap directory and tables counted as references.
    assert_like_qemu(&img, &raw);
    let info = open(&img).info().unwrap();
    assert_eq!(info.format_specific["bitmaps"][0]["name"], "b0");
}

#[test]
fn qcow2_unknown_incompatible_feature_is_refused_naming_the_bit() {
    let (_, img) = convert("future", &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    // Incompatible features are bytes 72..80, big-endian: bit 5 is in byte 79.
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    f.write_all_at(&[b[0] | 1 << 5], 79).unwrap();
    drop(f);
    let err = image_format::open(&img, &OpenOptions::default())
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, Error::Unsupported { .. }), "{msg}");
    assert!(
        msg.contains("future.qcow2") && msg.contains("bit 5"),
        "{msg}"
    );
}

/// BLAKE3 of an image's guest content as qcow2-rs (an independent async reader) reads it.
pub(crate) fn hash_with_qcow2_rs(img: &Path) -> String {
    use qcow2_rs::dev::Qcow2DevParams;
    use qcow2_rs::helpers::Qcow2IoBuf;
    use qcow2_rs::utils::qcow2_setup_dev_sync;
    // 512-byte blocks, default caches, read-only, buffered I/O.
    let params = Qcow2DevParams::new(9, None, None, true, false);
    let dev = qcow2_setup_dev_sync(img, &params).unwrap_or_else(|e| panic!("qcow2-rs open: {e:?}"));
    let size = dev.info.virtual_size();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        dev.qcow2_prep_io().await.expect("qcow2-rs prep");
        let mut hasher = blake3::Hasher::new();
        let mut buf = Qcow2IoBuf::<u8>::new(1 << 20);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20) as usize;
            let got = dev
                .read_at(&mut buf[..n], off)
                .await
                .expect("qcow2-rs read");
            assert_eq!(got, n, "qcow2-rs short read at {off:#x}");
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        hasher.finalize().to_hex().to_string()
    })
}

#[test]
fn qcow2_rs_reads_agree_with_ours() {
    for (name, args) in [
        ("rs-v3", &[][..]),
        ("rs-v2", &["-o", "compat=0.10"][..]),
        ("rs-zlib", &["-c"][..]),
    ] {
        let (raw, img) = convert(name, args);
        let ours = hash_device(open(&img).as_ref());
        assert_eq!(ours, hash_file(&raw), "{name}: ours vs raw");
        assert_eq!(hash_with_qcow2_rs(&img), ours, "{name}: qcow2-rs vs ours");
    }
}
