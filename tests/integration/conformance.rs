//! One conformance suite for every format driver: the same checks (see
//! `vmnest_tests::conformance`), only the image differs. Each image is written by qemu-img from
//! the same patterned raw disk, and qemu-img's own reading of it is the reference.

use std::path::{Path, PathBuf};

use vmnest_tests::*;

/// Converts the pattern to `format` with qemu-img `options`, returns the image and the reference
/// bytes (qemu-img's raw conversion of the image, which may be padded to the format's size rules).
fn make(name: &str, format: &str, options: &[&str]) -> (PathBuf, Vec<u8>) {
    let dir = scratch(&format!("conformance-{name}"));
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 21);
    let img = dir.join(format!("img.{format}"));
    let mut args = vec!["convert", "-f", "raw", "-O", format];
    args.extend_from_slice(options);
    args.push(raw.to_str().unwrap());
    args.push(img.to_str().unwrap());
    qemu_img(&args);
    let back = dir.join("back.raw");
    qemu_img(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        img.to_str().unwrap(),
        back.to_str().unwrap(),
    ]);
    (img, read_raw(&back))
}

fn check(name: &str, format: &str, options: &[&str]) {
    let (img, reference) = make(name, format, options);
    conformance(open(&img).as_ref(), &reference);
}

fn check_file(path: &Path) {
    conformance(open(path).as_ref(), &read_raw(path));
}

#[test]
fn raw_conforms() {
    let dir = scratch("conformance-raw");
    let raw = dir.join("p.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 21);
    check_file(&raw);
}

#[test]
fn parallels_conforms() {
    check("parallels", "parallels", &[]);
}

#[test]
fn vhdx_dynamic_conforms() {
    check("vhdx-dynamic", "vhdx", &["-o", "subformat=dynamic"]);
}

#[test]
fn vhdx_fixed_conforms() {
    check("vhdx-fixed", "vhdx", &["-o", "subformat=fixed"]);
}

#[test]
fn vmdk_monolithic_sparse_conforms() {
    check("vmdk-sparse", "vmdk", &["-o", "subformat=monolithicSparse"]);
}

#[test]
fn vmdk_stream_optimized_conforms() {
    check("vmdk-stream", "vmdk", &["-o", "subformat=streamOptimized"]);
}

#[test]
fn vmdk_two_gb_flat_conforms() {
    check(
        "vmdk-2gbflat",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentFlat"],
    );
}

#[test]
fn qcow2_v3_conforms() {
    check("qcow2-v3", "qcow2", &[]);
}

#[test]
fn qcow2_v2_small_clusters_conforms() {
    check(
        "qcow2-v2",
        "qcow2",
        &["-o", "compat=0.10,cluster_size=4096"],
    );
}

#[test]
fn qcow2_zstd_compressed_conforms() {
    check(
        "qcow2-zstd",
        "qcow2",
        &["-c", "-o", "compression_type=zstd"],
    );
}

#[test]
fn qcow2_extended_l2_conforms() {
    check(
        "qcow2-el2",
        "qcow2",
        &["-o", "extended_l2=on,cluster_size=128k"],
    );
}

#[test]
fn vhd_dynamic_conforms() {
    check(
        "vhd-dynamic",
        "vpc",
        &["-o", "subformat=dynamic,force_size=on"],
    );
}

#[test]
fn vhd_fixed_conforms() {
    check("vhd-fixed", "vpc", &["-o", "subformat=fixed"]);
}
