//! Raw images against qemu-img, and the registry's safety rules.

use image_format::{Error, OpenOptions};
use vmnest_tests::*;

#[test]
fn patterned_raw_reads_back_and_maps_like_qemu_img() {
    let dir = scratch("raw-pattern");
    let raw = dir.join("p.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 1);
    let img = open(&raw);
    assert_eq!(
        img.size(),
        qemu_info(&raw, "raw")["virtual-size"].as_u64().unwrap()
    );
    assert_eq!(hash_device(img.as_ref()), hash_file(&raw));
    assert_eq!(vmnest_map_data(&raw), qemu_map_data(&raw, "raw"));
}

#[test]
fn probed_raw_is_never_opened_for_writing() {
    let dir = scratch("raw-probe-write");
    let raw = dir.join("guest.img");
    write_pattern_raw(&raw, 8 << 20, 2);
    let probed = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let err = image_format::open(&raw, &probed)
        .err()
        .expect("probed raw must not open rw");
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    let named = OpenOptions {
        writable: true,
        format: Some("raw".into()),
        ..Default::default()
    };
    assert!(image_format::open(&raw, &named).is_ok());
}

#[test]
fn grub_mbr_sample_probes_as_raw() {
    let path = sample("qemu-iotests/grub_mbr.raw.bz2");
    let img = open(&path);
    assert_eq!(img.format(), "raw");
    assert_eq!(img.size(), 512);
    let mut sig = [0u8; 2];
    img.read_at(&mut sig, 510).unwrap();
    assert_eq!(sig, [0x55, 0xaa]);
}

#[test]
fn unknown_format_name_is_refused_with_the_known_list() {
    let dir = scratch("raw-unknown-format");
    let raw = dir.join("x.img");
    std::fs::write(&raw, [0u8; 512]).unwrap();
    let opts = OpenOptions {
        format: Some("qed".into()),
        ..Default::default()
    };
    let msg = image_format::open(&raw, &opts).err().unwrap().to_string();
    assert!(msg.contains("unknown format \"qed\""), "{msg}");
    assert!(msg.contains("raw"), "{msg}");
}
