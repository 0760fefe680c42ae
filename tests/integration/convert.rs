//! The copy engine and the writers, checked with qemu-img as the oracle.

use vmnest_tests::*;

#[test]
fn raw_writer_keeps_holes_and_content() {
    let dir = scratch("convert-raw");
    let src = dir.join("src.raw");
    write_pattern_raw(&src, PATTERN_SIZE, 51);
    let qcow = dir.join("src.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]);
    let out = dir.join("out.raw");
    let stats = write_image(&qcow, "raw", "", &out);
    assert_eq!(hash_file(&out), hash_file(&src));
    assert_eq!(stats.size, PATTERN_SIZE);
    // Written zeros in the source become holes: the output allocates no more than qemu's.
    let q = dir.join("qemu.raw");
    qemu_to_raw(&qcow, "qcow2", &q);
    let ours = open(&out).info().unwrap().actual_size;
    let theirs = open(&q).info().unwrap().actual_size;
    assert!(ours <= theirs + theirs / 20, "ours {ours} vs qemu {theirs}");
    assert_eq!(
        data_ranges(open(&out).as_ref()),
        data_ranges(open(&q).as_ref())
    );
}
