//! Parallels images: the three samples from qemu-iotests and images qemu-img writes.

use vmnest_tests::*;

/// Guest content of a sample as qemu-img reads it, hashed.
fn qemu_raw_hash(path: &std::path::Path, dir: &std::path::Path) -> String {
    let raw = dir.join("qemu.raw");
    qemu_to_raw(path, "parallels", &raw);
    hash_file(&raw)
}

#[test]
fn sample_parallels_v1_reads_like_qemu() {
    let path = sample("qemu-iotests/parallels-v1.bz2");
    let img = open(&path);
    assert_eq!(img.format(), "parallels");
    assert_eq!(img.size(), 2 << 20);
    let dir = scratch("parallels-v1");
    assert_eq!(hash_device(img.as_ref()), qemu_raw_hash(&path, &dir));
    assert_eq!(vmnest_map_data(&path), qemu_map_data(&path, "parallels"));
}

#[test]
fn sample_parallels_v2_reads_like_qemu() {
    let path = sample("qemu-iotests/parallels-v2.bz2");
    let img = open(&path);
    assert_eq!(img.size(), 2 << 20);
    let dir = scratch("parallels-v2");
    assert_eq!(hash_device(img.as_ref()), qemu_raw_hash(&path, &dir));
    assert_eq!(vmnest_map_data(&path), qemu_map_data(&path, "parallels"));
}

#[test]
fn sample_parallels_with_bitmap_is_64_gib_and_empty() {
    let path = sample("qemu-iotests/parallels-with-bitmap.bz2");
    let img = open(&path);
    assert_eq!(img.size(), 64 << 30);
    assert_eq!(vmnest_map_data(&path), Vec::<(u64, u64)>::new());
    assert_eq!(qemu_map_data(&path, "parallels"), Vec::<(u64, u64)>::new());
    let info = vmnest_info(&path);
    assert_eq!(info["format-specific"]["format-extension-offset"], 2 << 20);
}

#[test]
fn qemu_written_parallels_matches_its_source() {
    let dir = scratch("parallels-qemu");
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 11);
    let img_path = dir.join("p.parallels");
    qemu_from_raw(&raw, "parallels", &img_path);
    let img = open(&img_path);
    let qemu_size = qemu_info(&img_path, "parallels")["virtual-size"]
        .as_u64()
        .unwrap();
    assert_eq!(img.size(), qemu_size);
    assert_eq!(hash_device(img.as_ref()), hash_file(&raw));
    assert_eq!(
        vmnest_map_data(&img_path),
        qemu_map_data(&img_path, "parallels")
    );
    let out = run(vmnest().arg("check").arg(&img_path));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn parallels_bat_pointing_past_the_file_is_a_named_corruption() {
    use std::os::unix::fs::FileExt;
    let src = sample("qemu-iotests/parallels-v2.bz2");
    let dir = scratch("parallels-bad-bat");
    let bad = dir.join("bad.parallels");
    std::fs::copy(&src, &bad).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
    f.write_all_at(&1000u32.to_le_bytes(), 64).unwrap(); // BAT[0] -> cluster 1000
    let out = run(vmnest().arg("check").arg(&bad));
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("BAT at offset 0x40"), "{text}");
    let read = run(vmnest().args(["compare"]).arg(&bad).arg(&src));
    assert_eq!(read.status.code(), Some(2));
    let err = String::from_utf8_lossy(&read.stderr);
    assert!(
        err.contains("bad.parallels") && err.contains("data cluster"),
        "{err}"
    );
}
