//! VMDK reader against qemu-img-made images of every subformat qemu writes, hand-made vmfs,
//! vmfsThin and COWD descriptors, delta chains, and the sample images of shared/sample_images.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use image_format::{BlockDevice, Error, ExtentKind, Image, OpenOptions};
use vmnest_tests::{
    PATTERN_SIZE, hash_device, hash_file, open, pattern_bytes, qemu_img, qemu_info, qemu_map_data,
    qemu_to_raw, ranges_of, require, run_ok, sample, scratch, write_pattern_raw,
};

/// The error opening `path` gives (the test fails if it opens).
fn open_err(path: &Path) -> Error {
    match image_format::open(path, &OpenOptions::default()) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Merged ranges of `qemu-img map` entries for which `pick(data, zero)` holds.
fn qemu_ranges(path: &Path, pick: impl Fn(bool, bool) -> bool) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output=json", "-f", "vmdk", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !pick(e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap()) {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

/// Our map against qemu's. qemu calls every byte of a flat extent "data" and marks the holes
/// of the flat file `zero: true` on top; we call those holes Zero. So: our Data is qemu's
/// data-and-not-zero, and our Data-or-Zero is qemu's data (for sparse extents, where qemu marks
/// no data as zero, both reduce to qemu's plain data ranges).
fn assert_map_like_qemu(dev: &dyn BlockDevice, path: &Path) {
    assert_eq!(
        ranges_of(dev, &[ExtentKind::Data]),
        qemu_ranges(path, |data, zero| data && !zero),
        "data ranges"
    );
    assert_eq!(
        ranges_of(dev, &[ExtentKind::Data, ExtentKind::Zero]),
        qemu_map_data(path, "vmdk"),
        "data-or-zero ranges"
    );
}

/// A patterned raw image and its conversion to VMDK with `subformat`.
fn converted(name: &str, subformat: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = scratch(&format!("vmdk-{name}"));
    let raw = dir.join("pattern.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 0x7d3a);
    let vmdk = dir.join(format!("{name}.vmdk"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        s(&raw),
        s(&vmdk),
    ]);
    (dir, raw, vmdk)
}

/// Size, content and data ranges agree with qemu-img and the raw source.
fn assert_like_qemu(vmdk: &Path, raw: &Path) -> std::sync::Arc<dyn Image> {
    let img = open(vmdk);
    assert_eq!(img.format(), "vmdk");
    let info = qemu_info(vmdk, "vmdk");
    assert_eq!(img.size(), info["virtual-size"].as_u64().unwrap());
    assert_eq!(hash_device(img.as_ref()), hash_file(raw));
    assert_map_like_qemu(img.as_ref(), vmdk);
    let report = img.check().expect("check");
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    img
}

#[test]
fn vmdk_monolithic_sparse_matches_qemu() {
    let (_d, raw, vmdk) = converted("monolithicSparse", "monolithicSparse");
    let img = assert_like_qemu(&vmdk, &raw);
    let info = img.info().unwrap();
    assert_eq!(info.subformat.as_deref(), Some("monolithicSparse"));
    assert_eq!(info.cluster_size, Some(65536));
    let q = qemu_info(&vmdk, "vmdk");
    assert_eq!(
        info.format_specific["cid"],
        q["format-specific"]["data"]["cid"]
    );
}

#[test]
fn vmdk_stream_optimized_matches_qemu() {
    let (_d, raw, vmdk) = converted("streamOptimized", "streamOptimized");
    let img = assert_like_qemu(&vmdk, &raw);
    let info = img.info().unwrap();
    assert_eq!(info.subformat.as_deref(), Some("streamOptimized"));
    assert_eq!(info.format_specific["extents"][0]["compressed"], true);
}

#[test]
fn vmdk_monolithic_flat_matches_qemu() {
    let (_d, raw, vmdk) = converted("monolithicFlat", "monolithicFlat");
    let img = assert_like_qemu(&vmdk, &raw);
    assert_eq!(img.info().unwrap().files.len(), 2);
}

#[test]
fn vmdk_two_gb_sparse_matches_qemu() {
    let (_d, raw, vmdk) = converted("twoGbMaxExtentSparse", "twoGbMaxExtentSparse");
    assert_like_qemu(&vmdk, &raw);
}

#[test]
fn vmdk_two_gb_flat_matches_qemu() {
    let (_d, raw, vmdk) = converted("twoGbMaxExtentFlat", "twoGbMaxExtentFlat");
    assert_like_qemu(&vmdk, &raw);
}

/// qemu-img does not write ESXi descriptors; these are written by hand around a sparse raw
/// flat file, as ESXi lays out `vmfs` (thick) and `vmfsThin` disks.
fn esxi_descriptor(name: &str, create_type: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(&format!("vmdk-{name}"));
    let raw = dir.join(format!("{name}-flat.vmdk"));
    write_pattern_raw(&raw, PATTERN_SIZE, 0x51);
    let desc = dir.join(format!("{name}.vmdk"));
    std::fs::write(
        &desc,
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=0172e8a4\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n\n# Extent description\nRW {} VMFS \"{name}-flat.vmdk\"\n\n\
             # The Disk Data Base \n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"14\"\n",
            PATTERN_SIZE / 512
        ),
    )
    .unwrap();
    (desc, raw)
}

#[test]
fn vmdk_vmfs_descriptor_matches_qemu() {
    let (desc, raw) = esxi_descriptor("vmfs", "vmfs");
    let img = assert_like_qemu(&desc, &raw);
    let info = img.info().unwrap();
    assert_eq!(info.format_specific["adapter-type"], "lsilogic");
    assert_eq!(info.format_specific["hw-version"], "14");
}

/// qemu refuses `createType="vmfsThin"`, so the oracle is the flat file itself: its content,
/// and its data ranges as qemu maps it as a raw file.
#[test]
fn vmdk_vmfs_thin_reports_flat_file_holes_like_qemu() {
    let (desc, raw) = esxi_descriptor("vmfsThin", "vmfsThin");
    let img = open(&desc);
    assert_eq!(img.size(), PATTERN_SIZE);
    assert_eq!(hash_device(img.as_ref()), hash_file(&raw));
    assert_eq!(
        ranges_of(img.as_ref(), &[ExtentKind::Data]),
        qemu_map_data(&raw, "raw")
    );
    assert_eq!(img.info().unwrap().subformat.as_deref(), Some("vmfsThin"));
    // The hole after the first 300 KiB is a hole of the flat file: zero, not data.
    let e = img.block_status(512 << 10, 4096).unwrap();
    assert_eq!(e.kind, ExtentKind::Zero);
}

/// A base with the pattern, an overlay with one write on top of it.
fn delta_chain(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (dir, raw, base) = converted(name, "monolithicSparse");
    let top = dir.join("top.vmdk");
    let base_name = base.file_name().unwrap().to_str().unwrap();
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        base_name,
        "-F",
        "vmdk",
        s(&top),
    ]);
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "vmdk",
        "-c",
        "write -P 0x5a 1M 128k",
        s(&top),
    ]));
    // The expected content: the raw with the same write.
    let expect = dir.join("expect.raw");
    std::fs::copy(&raw, &expect).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .unwrap();
    f.write_all_at(&vec![0x5a; 128 << 10], 1 << 20).unwrap();
    (dir, top, expect)
}

#[test]
fn vmdk_delta_reads_through_to_its_parent() {
    let (dir, top, expect) = delta_chain("delta-monolithicSparse");
    let img = assert_like_qemu(&top, &expect);
    assert!(img.backing().is_some());
    assert_eq!(
        img.info().unwrap().backing_filename.as_deref(),
        Some("delta-monolithicSparse.vmdk")
    );
    // Below the write: the parent answers (depth 1); the write itself is the child's.
    assert_eq!(img.block_status(0, 4096).unwrap().depth, 1);
    assert_eq!(img.block_status(1 << 20, 4096).unwrap().depth, 0);
    let _ = dir;
}

#[test]
fn vmdk_delta_with_wrong_parent_cid_is_refused() {
    let (dir, top, _) = delta_chain("delta-cid");
    let base = dir.join("delta-cid.vmdk");
    // Patch the parent's CID in its embedded descriptor (same length, different value).
    let bytes = std::fs::read(&base).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == b"CID=")
        .expect("CID line");
    let old = bytes[at + 4];
    let new = if old == b'0' { b'1' } else { b'0' };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .write_all_at(&[new], (at + 4) as u64)
        .unwrap();
    let err = open_err(&top);
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
    assert!(err.to_string().contains("CID"), "{err}");
}

/// A COWD (ESX 3 vmfsSparse) redo log on top of a vmfs base, built by hand: 2 MiB, 1-sector
/// grains, one grain directory entry, one grain table of 4096 entries.
#[test]
fn vmdk_cowd_delta_reads_its_grains_and_the_parent() {
    let dir = scratch("vmdk-cowd");
    let base_flat = dir.join("base-flat.vmdk");
    let mut base_bytes = vec![0u8; 2 << 20];
    pattern_bytes(&mut base_bytes, 0, 3);
    std::fs::write(&base_flat, &base_bytes).unwrap();
    std::fs::write(
        dir.join("base.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=0172e8a4\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\
         RW 4096 VMFS \"base-flat.vmdk\"\n",
    )
    .unwrap();
    // COWD: header (2048 bytes) | GD at sector 4 (1 entry) | GT at sector 5 (4096 entries =
    // 32 sectors) | grains from sector 37.
    let mut cowd = vec![0u8; 37 * 512];
    cowd[0..4].copy_from_slice(b"COWD");
    cowd[4..8].copy_from_slice(&1u32.to_le_bytes()); // version
    cowd[8..12].copy_from_slice(&3u32.to_le_bytes()); // flags
    cowd[12..16].copy_from_slice(&4096u32.to_le_bytes()); // numSectors
    cowd[16..20].copy_from_slice(&1u32.to_le_bytes()); // grainSize
    cowd[20..24].copy_from_slice(&4u32.to_le_bytes()); // gdOffset
    cowd[24..28].copy_from_slice(&1u32.to_le_bytes()); // numGDEntries
    cowd[28..32].copy_from_slice(&39u32.to_le_bytes()); // freeSector
    cowd[4 * 512..4 * 512 + 4].copy_from_slice(&5u32.to_le_bytes()); // GD[0] -> GT
    let gt = 5 * 512;
    cowd[gt + 10 * 4..gt + 10 * 4 + 4].copy_from_slice(&37u32.to_le_bytes()); // sector 10
    cowd[gt + 11 * 4..gt + 11 * 4 + 4].copy_from_slice(&38u32.to_le_bytes()); // sector 11
    cowd.extend_from_slice(&[0xc0; 1024]);
    std::fs::write(dir.join("child-delta.vmdk"), &cowd).unwrap();
    let child = dir.join("child.vmdk");
    std::fs::write(
        &child,
        "# Disk DescriptorFile\nversion=1\nCID=8f67ca74\nparentCID=0172e8a4\ncreateType=\"vmfsSparse\"\n\
         parentFileNameHint=\"base.vmdk\"\nRW 4096 VMFSSPARSE \"child-delta.vmdk\"\n",
    )
    .unwrap();
    let img = open(&child);
    let mut expect = base_bytes.clone();
    expect[10 * 512..12 * 512].fill(0xc0);
    let mut got = vec![0u8; expect.len()];
    img.read_at(&mut got, 0).unwrap();
    assert!(got == expect, "COWD child content differs");
    let e = img.block_status(10 * 512, 4096).unwrap();
    assert_eq!((e.kind, e.len, e.depth), (ExtentKind::Data, 1024, 0));
    assert_eq!(img.block_status(0, 4096).unwrap().depth, 1);
    assert!(img.check().unwrap().corruptions.is_empty());
    // The redo log alone does not know its parent: refused, never read with zeros for the parent.
    let alone = image_format::open(&dir.join("child-delta.vmdk"), &Default::default());
    let msg = alone.err().expect("a lone COWD must not open").to_string();
    assert!(
        msg.contains("child-delta.vmdk") && msg.contains("COWD"),
        "{msg}"
    );
}

// ---- sample images ----

fn vmdk_rs_sample(name: &str) -> PathBuf {
    sample(&format!("vmdk-rs/{name}"))
}

/// The 10 MiB content the vmdk-rs images share, as qemu-img converts it. Computed once: tests
/// running in parallel each emptied the shared scratch folder under the others' feet.
fn vmdk_rs_reference_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        let src = vmdk_rs_sample("monolithicSparse.vmdk");
        let dir = scratch("vmdk-rs-reference");
        let raw = dir.join("ref.raw");
        qemu_to_raw(&src, "vmdk", &raw);
        hash_file(&raw)
    })
    .clone()
}

fn assert_vmdk_rs_sample(path: &Path, expect_size: u64) -> std::sync::Arc<dyn Image> {
    let img = open(path);
    assert_eq!(img.size(), expect_size);
    let dir = scratch(&format!(
        "vmdk-rs-{}",
        path.file_stem().unwrap().to_string_lossy()
    ));
    let raw = dir.join("q.raw");
    qemu_to_raw(path, "vmdk", &raw);
    assert_eq!(hash_device(img.as_ref()), hash_file(&raw));
    assert!(img.check().unwrap().corruptions.is_empty());
    img
}

#[test]
fn vmdk_sample_vmdk_rs_monolithic_sparse() {
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("monolithicSparse.vmdk"), 10 << 20);
    assert_eq!(hash_device(img.as_ref()), vmdk_rs_reference_hash());
    assert_eq!(
        img.info().unwrap().format_specific["adapter-type"],
        "buslogic"
    );
}

#[test]
fn vmdk_sample_vmdk_rs_stream_optimized() {
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("streamOptimized.vmdk"), 10 << 20);
    assert_eq!(hash_device(img.as_ref()), vmdk_rs_reference_hash());
}

#[test]
fn vmdk_sample_vmdk_rs_stream_optimized_with_markers() {
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("streamOptimizedWithMarkers.vmdk"), 1 << 20);
    assert_eq!(img.info().unwrap().format_specific["cid"], 0x7e5b_80a7u32);
}

#[test]
fn vmdk_sample_vmdk_rs_two_gb_sparse() {
    vmdk_rs_sample("twoGbMaxExtentSparse-s001.vmdk");
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("twoGbMaxExtentSparse.vmdk"), 10 << 20);
    assert_eq!(hash_device(img.as_ref()), vmdk_rs_reference_hash());
}

#[test]
fn vmdk_sample_vmdk_rs_monolithic_flat() {
    vmdk_rs_sample("monolithicFlat-flat.vmdk.bz2");
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("monolithicFlat.vmdk"), 10 << 20);
    assert_eq!(hash_device(img.as_ref()), vmdk_rs_reference_hash());
}

#[test]
fn vmdk_sample_vmdk_rs_two_gb_flat() {
    vmdk_rs_sample("twoGbMaxExtentFlat-f001.vmdk.bz2");
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("twoGbMaxExtentFlat.vmdk"), 10 << 20);
    assert_eq!(hash_device(img.as_ref()), vmdk_rs_reference_hash());
}

#[test]
fn vmdk_sample_vmdk_rs_vmfs_thick() {
    vmdk_rs_sample("vmfs_thick-flat.vmdk");
    let img = assert_vmdk_rs_sample(&vmdk_rs_sample("vmfs_thick.vmdk"), 2 << 20);
    assert_eq!(img.info().unwrap().subformat.as_deref(), Some("vmfs"));
}

#[test]
fn vmdk_sample_vmdk_rs_vmfs_snapshot_with_missing_delta_is_an_error_naming_it() {
    vmdk_rs_sample("vmfs_thick-flat.vmdk");
    vmdk_rs_sample("vmfs_thick.vmdk");
    let path = vmdk_rs_sample("vmfs_thick-000001.vmdk");
    let err = open_err(&path);
    let msg = err.to_string();
    assert!(
        matches!(err, Error::MissingFile { what: "extent", .. }),
        "{msg}"
    );
    assert!(msg.contains("vmfs_thick-000001-delta.vmdk"), "{msg}");
    assert!(msg.contains("vmfs_thick-000001.vmdk:"), "{msg}");
}

#[test]
fn vmdk_sample_forensic_ms3_win_missing_extents_is_an_error_naming_one() {
    let path = sample("vmdk-forensic/ms3-win.vmdk");
    let err = open_err(&path);
    let msg = err.to_string();
    assert!(
        matches!(err, Error::MissingFile { what: "extent", .. }),
        "{msg}"
    );
    assert!(
        msg.contains("ms3-win.vmdk:") && msg.contains("-s001.vmdk"),
        "{msg}"
    );
}

#[test]
fn vmdk_sample_forensic_plaso_image() {
    let path = sample("vmdk-forensic/plaso_image.vmdk");
    let img = open(&path);
    assert_eq!(img.size(), 200 * 512);
    let dir = scratch("vmdk-plaso");
    let raw = dir.join("q.raw");
    qemu_to_raw(&path, "vmdk", &raw);
    assert_eq!(hash_device(img.as_ref()), hash_file(&raw));
    assert_map_like_qemu(img.as_ref(), &path);
}

#[test]
fn vmdk_sample_iotest_version3_stream_with_gd_at_end() {
    let path = sample("qemu-iotests/iotest-version3.vmdk.bz2");
    let img = open(&path);
    assert_eq!(img.size(), 16 << 30);
    assert_eq!(
        img.size(),
        qemu_info(&path, "vmdk")["virtual-size"].as_u64().unwrap()
    );
    // 16 GiB is mostly unallocated: compare the data ranges, then the data itself, with qemu.
    assert_map_like_qemu(img.as_ref(), &path);
    let ranges = ranges_of(img.as_ref(), &[ExtentKind::Data]);
    let dir = scratch("vmdk-iotest-version3");
    let raw = dir.join("q.raw");
    qemu_to_raw(&path, "vmdk", &raw);
    let f = std::fs::File::open(&raw).unwrap();
    for (start, end) in ranges {
        let mut ours = vec![0u8; (end - start) as usize];
        let mut theirs = ours.clone();
        img.read_at(&mut ours, start).unwrap();
        f.read_exact_at(&mut theirs, start).unwrap();
        assert!(ours == theirs, "content differs in [{start:#x}, {end:#x})");
    }
    let info = img.info().unwrap();
    assert_eq!(info.subformat.as_deref(), Some("streamOptimized"));
    assert_eq!(info.format_specific["adapter-type"], "lsilogic");
    assert!(img.check().unwrap().corruptions.is_empty());
}

#[test]
fn vmdk_sample_iotest_afl9_fails_cleanly_with_bounded_memory() {
    let path = sample("qemu-iotests/afl9.vmdk.bz2");
    let before = peak_rss_kib();
    let err = open_err(&path);
    let after = peak_rss_kib();
    let msg = err.to_string();
    assert!(msg.contains("afl9.vmdk"), "{msg}");
    assert!(
        msg.contains("sparse extent header") || msg.contains("grain"),
        "{msg}"
    );
    assert!(
        after.saturating_sub(before) < 256 * 1024,
        "peak RSS grew {before} -> {after} KiB"
    );
}

/// Peak resident set of this process (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
