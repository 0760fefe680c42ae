//! The VHD writer against qemu-img (compare, info, convert for allocation figures) and libvhdi's
//! vhdiinfo (an independent reader of the footer), plus our own reader. `qemu-img check` does
//! not support vpc, so libvhdi and our reader's `check` stand in for it.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use vmnest_tests::{
    PATTERN_SIZE, assert_failed_conversion_leaves_nothing, hash_device, hash_file, open,
    qemu_from_raw_with, qemu_img, qemu_info, qemu_to_raw, require, run, run_ok, scratch,
    write_image, write_pattern_raw,
};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Media size as libvhdi's vhdiinfo reports it ("Media size : 20 MiB (20975104 bytes)").
fn vhdi_media_size(img: &Path) -> u64 {
    let out = run_ok(Command::new(require("vhdiinfo")).arg(img));
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Media size"))
        .unwrap_or_else(|| panic!("no media size in vhdiinfo output:\n{out}"));
    let inner = line
        .rsplit_once('(')
        .and_then(|(_, r)| r.split_once(" bytes"))
        .unwrap_or_else(|| panic!("unexpected vhdiinfo line {line:?}"))
        .0;
    inner.trim().parse().expect("media size number")
}

/// The guest size every reader reports: qemu-img info, vhdiinfo, ours; they must agree.
fn agreed_size(img: &Path) -> u64 {
    let qemu = qemu_info(img, "vpc")["virtual-size"]
        .as_u64()
        .expect("virtual-size");
    let libvhdi = vhdi_media_size(img);
    let ours = open(img).size();
    assert_eq!(
        (qemu, libvhdi),
        (ours, ours),
        "{}: qemu-img, vhdiinfo, vmnest",
        img.display()
    );
    // qemu before 10.0 (not installed here) takes the geometry's size for an unknown creator
    // unless the geometry is the maximum: the geometry must be exact or the maximum.
    let f = std::fs::File::open(img).expect("open image");
    let mut footer = [0u8; 512];
    f.read_exact_at(&mut footer, f.metadata().unwrap().len() - 512)
        .expect("read footer");
    let geometry = (
        u16::from_be_bytes([footer[56], footer[57]]),
        footer[58],
        footer[59],
    );
    let chs = u64::from(geometry.0) * u64::from(geometry.1) * u64::from(geometry.2) * 512;
    assert!(
        chs == ours || geometry == (65535, 16, 255),
        "{}: geometry {geometry:?} ({chs} bytes) for a {ours}-byte disk",
        img.display()
    );
    assert_eq!(&footer[28..32], b"vmns", "creator application");
    ours
}

/// `qemu-img compare` of a raw source and a VHD: identical (exit 0).
fn assert_qemu_identical(raw: &Path, vhd: &Path) {
    let out = run(Command::new(require("qemu-img")).args([
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        s(raw),
        s(vhd),
    ]));
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        raw.display(),
        vhd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A patterned source, converted by us with `options`; checks everything and returns (our
/// allocated bytes, qemu's allocated bytes).
fn check_conversion(name: &str, options: &str, qemu_options: &str, expect_size: u64) -> (u64, u64) {
    let dir = scratch(&format!("vhd-write-{name}"));
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 0x5648_4400 ^ name.len() as u64);
    let vhd = dir.join("out.vhd");
    write_image(&raw, "vpc", options, &vhd);

    assert_eq!(agreed_size(&vhd), expect_size, "{name}: size");
    assert_qemu_identical(&raw, &vhd);

    // Our reader: same bytes as qemu reads; structurally clean.
    let ours = open(&vhd);
    let qemu_raw = dir.join("qemu.raw");
    qemu_to_raw(&vhd, "vpc", &qemu_raw);
    assert_eq!(hash_device(ours.as_ref()), hash_file(&qemu_raw), "{name}");
    let report = ours.check().expect("check");
    assert!(
        report.corruptions.is_empty() && report.leaks.is_empty(),
        "{name}: {report:#?}"
    );
    let info = ours.info().expect("info");
    assert_eq!(
        info.format_specific
            .get("creator-app")
            .and_then(|v| v.as_str()),
        Some("vmns")
    );

    // No temporary left beside it.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("vmnest-tmp")), "{names:?}");

    // Allocation against qemu-img's own conversion.
    let theirs = dir.join("qemu.vhd");
    qemu_from_raw_with(&raw, "vpc", qemu_options, &theirs);
    let (a, b) = (allocated(&vhd), allocated(&theirs));
    eprintln!("{name}: vmnest allocates {a} bytes, qemu-img {b}");
    assert!(
        a.abs_diff(b) * 20 <= b,
        "{name}: vmnest allocates {a} bytes, qemu-img {b} (more than 5% apart)"
    );
    (a, b)
}

/// The size qemu-img itself gives a vpc of `size` bytes with `force_size=off`.
fn qemu_chs_size(dir: &Path, size: u64, subformat: &str) -> u64 {
    let img = dir.join("qemu-chs.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        &format!("subformat={subformat},force_size=off"),
        s(&img),
        &size.to_string(),
    ]);
    let got = qemu_info(&img, "vpc")["virtual-size"].as_u64().unwrap();
    std::fs::remove_file(&img).unwrap();
    got
}

#[test]
fn vhd_dynamic_2m_default_matches_the_source() {
    check_conversion("dyn2m", "", "subformat=dynamic,force_size=on", PATTERN_SIZE);
}

#[test]
fn vhd_dynamic_512k_blocks_match_the_source() {
    check_conversion(
        "dyn512k",
        "subformat=dynamic,block_size=512k,force_size=on",
        "subformat=dynamic,force_size=on",
        PATTERN_SIZE,
    );
}

#[test]
fn vhd_fixed_matches_the_source() {
    check_conversion(
        "fixed",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
        PATTERN_SIZE,
    );
}

#[test]
fn vhd_force_size_off_rounds_to_the_geometry_qemu_computes() {
    let dir = scratch("vhd-write-chs-qemu");
    let chs = qemu_chs_size(&dir, PATTERN_SIZE, "dynamic");
    assert!(chs > PATTERN_SIZE, "{chs}");
    check_conversion(
        "dynchs",
        "force_size=off",
        "subformat=dynamic,force_size=off",
        chs,
    );
    check_conversion(
        "fixedchs",
        "subformat=fixed,force_size=off",
        "subformat=fixed,force_size=off",
        chs,
    );
}

/// A sparse raw source of `size` bytes with a little data at both ends.
fn sparse_source(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(b"first sector", 0).unwrap();
    f.write_all_at(b"last sector", size - 512).unwrap();
}

#[test]
fn vhd_sizes_agree_across_qemu_libvhdi_and_vmnest() {
    let dir = scratch("vhd-write-sizes");
    let cases: Vec<(&str, u64, &str, u64)> = vec![
        ("odd", PATTERN_SIZE, "", PATTERN_SIZE),
        ("odd-fixed", PATTERN_SIZE, "subformat=fixed", PATTERN_SIZE),
        ("1g", 1 << 30, "", 1 << 30),
        ("1g-fixed", 1 << 30, "subformat=fixed", 1 << 30),
        ("127g", 127 << 30, "", 127 << 30),
        ("200g", 200 << 30, "", 200 << 30),
        ("azure", PATTERN_SIZE, "azure=on", 21 << 20),
        ("sub-sector", (8 << 20) + 1000, "", (8 << 20) + 1024),
        (
            "chs-off",
            1 << 30,
            "force_size=off",
            qemu_chs_size(&dir, 1 << 30, "dynamic"),
        ),
    ];
    for (name, src_size, options, expect) in cases {
        let raw = dir.join(format!("{name}.raw"));
        sparse_source(&raw, src_size);
        let vhd = dir.join(format!("{name}.vhd"));
        write_image(&raw, "vpc", options, &vhd);
        assert_eq!(agreed_size(&vhd), expect, "{name}");
        assert_qemu_identical(&raw, &vhd);
        std::fs::remove_file(&raw).unwrap();
        std::fs::remove_file(&vhd).unwrap();
    }
}

#[test]
fn vhd_chs_exact_size_stores_its_geometry_and_every_reader_agrees() {
    // 2080 cylinders × 16 heads × 63 sectors: the specification's geometry for this count.
    let size = 2080 * 16 * 63 * 512;
    let dir = scratch("vhd-write-chs-exact");
    let raw = dir.join("src.raw");
    sparse_source(&raw, size);
    let vhd = dir.join("out.vhd");
    write_image(&raw, "vpc", "", &vhd);
    assert_eq!(agreed_size(&vhd), size);
    let f = std::fs::read(&vhd).unwrap();
    let footer = &f[f.len() - 512..];
    assert_eq!(
        &footer[56..60],
        &[0x08, 0x20, 16, 63],
        "geometry 2080/16/63"
    );
    // Size not representable: the maximum geometry.
    let raw2 = dir.join("src2.raw");
    sparse_source(&raw2, size + 512);
    let vhd2 = dir.join("out2.vhd");
    write_image(&raw2, "vpc", "", &vhd2);
    assert_eq!(agreed_size(&vhd2), size + 512);
    let f = std::fs::read(&vhd2).unwrap();
    assert_eq!(
        &f[f.len() - 512 + 56..f.len() - 512 + 60],
        &[0xff, 0xff, 16, 255]
    );
}

/// One's complement of the byte sum, the checksum field taken as zero.
fn vhd_checksum(bytes: &[u8], at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(at..at + 4).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    !sum
}

#[test]
fn vhd_azure_is_a_fixed_disk_of_whole_mib() {
    let dir = scratch("vhd-write-azure");
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 0xa2);
    let vhd = dir.join("azure.vhd");
    write_image(&raw, "vpc", "azure=on", &vhd);
    let size = 21u64 << 20;
    let data = std::fs::read(&vhd).unwrap();
    assert_eq!(data.len() as u64, size + 512, "file length = size + footer");
    let footer = &data[data.len() - 512..];
    assert_eq!(&footer[0..8], b"conectix");
    assert_eq!(
        u32::from_be_bytes(footer[60..64].try_into().unwrap()),
        2,
        "fixed"
    );
    assert_eq!(u64::from_be_bytes(footer[48..56].try_into().unwrap()), size);
    assert_eq!(u64::from_be_bytes(footer[40..48].try_into().unwrap()), size);
    assert_eq!(
        u64::from_be_bytes(footer[16..24].try_into().unwrap()),
        u64::MAX,
        "no data offset"
    );
    assert_eq!(
        u32::from_be_bytes(footer[64..68].try_into().unwrap()),
        vhd_checksum(footer, 64)
    );
    assert_eq!(agreed_size(&vhd), size);
    assert_qemu_identical(&raw, &vhd);
    let err = image_format::default_registry()
        .create(
            "vpc",
            &dir.join("x.vhd"),
            &image_format::CreateOptions {
                size,
                options: vec![
                    ("azure".into(), "on".into()),
                    ("subformat".into(), "dynamic".into()),
                ],
                ..Default::default()
            },
        )
        .err()
        .expect("azure + dynamic must fail")
        .to_string();
    assert!(err.contains("subformat=fixed"), "{err}");
}

#[test]
fn vhd_round_trip_through_raw_is_identical() {
    let dir = scratch("vhd-write-roundtrip");
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 0x77);
    for (name, options) in [("dyn", "block_size=512k"), ("fixed", "subformat=fixed")] {
        let a = dir.join(format!("{name}-a.vhd"));
        let mid = dir.join(format!("{name}-mid.raw"));
        let b = dir.join(format!("{name}-b.vhd"));
        write_image(&raw, "vpc", options, &a);
        write_image(&a, "raw", "", &mid);
        write_image(&mid, "vpc", options, &b);
        assert_eq!(hash_file(&mid), hash_file(&raw), "{name}: vhd -> raw");
        assert_eq!(hash_device(open(&b).as_ref()), hash_file(&raw), "{name}");
        assert_qemu_identical(&raw, &b);
    }
}

#[test]
fn vhd_failed_conversion_leaves_no_file() {
    assert_failed_conversion_leaves_nothing("vhd-write-fail", "vpc", "", false);
    assert_failed_conversion_leaves_nothing(
        "vhd-write-fail-fixed",
        "vpc",
        "subformat=fixed",
        false,
    );
}

#[test]
fn vhd_unknown_option_is_named() {
    let dir = scratch("vhd-write-badopt");
    let dst = dir.join("x.vhd");
    let mut create = image_format::CreateOptions {
        size: 1 << 20,
        ..Default::default()
    };
    create.parse_options("subformat=fixed,colour=blue").unwrap();
    let err = image_format::default_registry()
        .create("vpc", &dst, &create)
        .err()
        .expect("unknown option must fail")
        .to_string();
    assert!(err.contains("\"colour\""), "{err}");
    assert!(!dst.exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
