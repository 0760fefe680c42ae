//! The `vmnest` binary: output shapes and exit codes.

use vmnest_tests::*;

fn pattern_pair(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    let a = dir.join("a.raw");
    let b = dir.join("b.raw");
    write_pattern_raw(&a, 16 << 20, 7);
    std::fs::copy(&a, &b).unwrap();
    (a, b)
}

#[test]
fn compare_identical_exits_0() {
    let (a, b) = pattern_pair("cli-compare-same");
    let out = run(vmnest().arg("compare").arg(&a).arg(&b));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Images are identical."
    );
}

#[test]
fn compare_different_exits_1_naming_the_first_offset() {
    use std::os::unix::fs::FileExt;
    let (a, b) = pattern_pair("cli-compare-diff");
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    // Inside a hole of the pattern, so one side is a hole and the other data.
    f.write_all_at(&[0, 0, 0x42], 10 << 20).unwrap();
    let out = run(vmnest().arg("compare").arg(&a).arg(&b));
    assert_eq!(out.status.code(), Some(1));
    let expected = format!("Content mismatch at offset {}!", (10 << 20) + 2);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), expected);
    // qemu-img agrees that they differ.
    let q = run(std::process::Command::new(require("qemu-img"))
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&a)
        .arg(&b));
    assert_eq!(q.status.code(), Some(1));
}

#[test]
fn compare_error_exits_2() {
    let (a, _) = pattern_pair("cli-compare-err");
    let out = run(vmnest()
        .arg("compare")
        .arg(&a)
        .arg(a.with_file_name("missing.raw")));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.raw"));
}

#[test]
fn compare_sizes_differing_by_zeros_is_identical_unless_strict() {
    let (a, b) = pattern_pair("cli-compare-size");
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.set_len((16 << 20) + (1 << 20)).unwrap();
    assert_eq!(
        run(vmnest().arg("compare").arg(&a).arg(&b)).status.code(),
        Some(0)
    );
    assert_eq!(
        run(vmnest().args(["compare", "-s"]).arg(&a).arg(&b))
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn check_of_a_format_without_checks_exits_63() {
    let (a, _) = pattern_pair("cli-check-raw");
    let out = run(vmnest().arg("check").arg(&a));
    assert_eq!(out.status.code(), Some(63));
}

#[test]
fn info_json_has_qemu_img_key_names() {
    let (a, _) = pattern_pair("cli-info-json");
    let mut v = vmnest_info(&a);
    let actual = v["actual-size"].take();
    assert!(actual.as_u64().unwrap() > 0 && actual.as_u64().unwrap() < 16 << 20);
    let golden = serde_json::json!({
        "filename": a.to_str().unwrap(),
        "format": "raw",
        "virtual-size": 16u64 << 20,
        "actual-size": null,
        "dirty-flag": false,
        "files": [a.to_str().unwrap()],
    });
    assert_eq!(v, golden);
}

#[test]
fn map_json_is_qemu_shaped_and_covers_the_disk() {
    let (a, _) = pattern_pair("cli-map-json");
    let out = run_ok(vmnest().args(["map", "--output", "json"]).arg(&a));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut next = 0;
    for e in v.as_array().unwrap() {
        assert_eq!(e["start"].as_u64().unwrap(), next);
        for key in ["length", "depth", "present", "zero", "data", "compressed"] {
            assert!(!e[key].is_null(), "{key} missing in {e}");
        }
        next += e["length"].as_u64().unwrap();
    }
    assert_eq!(next, 16 << 20);
}

#[test]
fn info_of_a_missing_file_fails_naming_it() {
    let out = run(vmnest().args(["info", "/nonexistent/disk.qcow2"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.qcow2"));
}

/// The same guest disk in every format qemu-img writes, from one patterned raw.
fn every_format(name: &str) -> (std::path::PathBuf, Vec<(std::path::PathBuf, &'static str)>) {
    let dir = scratch(name);
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 31);
    let mut out = Vec::new();
    for (fmt, opts, ext, compress) in [
        ("qcow2", "compression_type=zstd", "qcow2", true),
        ("vmdk", "subformat=streamOptimized", "vmdk", false),
        ("vhdx", "subformat=dynamic", "vhdx", false),
        ("vpc", "subformat=dynamic,force_size=on", "vhd", false),
        ("parallels", "cluster_size=64k", "parallels", false),
    ] {
        let img = dir.join(format!("disk.{ext}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt, "-o", opts];
        if compress {
            args.push("-c");
        }
        args.extend([raw.to_str().unwrap(), img.to_str().unwrap()]);
        qemu_img(&args);
        out.push((img, fmt));
    }
    (raw, out)
}

#[test]
fn compare_agrees_with_qemu_img_across_every_format() {
    use std::os::unix::fs::FileExt;
    let (raw, images) = every_format("cli-compare-formats");
    for (img, fmt) in &images {
        let ours = run(vmnest().arg("compare").arg(img).arg(&raw));
        assert_eq!(
            ours.status.code(),
            Some(0),
            "{fmt}: {}",
            String::from_utf8_lossy(&ours.stdout)
        );
        let qemu = run(std::process::Command::new(require("qemu-img"))
            .args(["compare", "-f", fmt, "-F", "raw"])
            .arg(img)
            .arg(&raw));
        assert_eq!(qemu.status.code(), Some(0), "qemu-img disagrees on {fmt}");
    }
    // One changed byte in the raw: every image now differs at that offset, for both tools.
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.write_all_at(&[0x99], 5 << 20).unwrap();
    for (img, fmt) in &images {
        let ours = run(vmnest().arg("compare").arg(img).arg(&raw));
        assert_eq!(ours.status.code(), Some(1), "{fmt}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout).trim(),
            format!("Content mismatch at offset {}!", 5 << 20)
        );
        let qemu = run(std::process::Command::new(require("qemu-img"))
            .args(["compare", "-f", fmt, "-F", "raw"])
            .arg(img)
            .arg(&raw));
        assert_eq!(qemu.status.code(), Some(1), "qemu-img disagrees on {fmt}");
    }
}

#[test]
fn info_backing_chain_and_map_follow_a_cross_format_chain() {
    let dir = scratch("cli-chain");
    let raw = dir.join("src.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 41);
    let base = dir.join("base.vmdk");
    qemu_from_raw(&raw, "vmdk", &base);
    let top = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "vmdk",
        "-b",
        "base.vmdk",
        top.to_str().unwrap(),
    ]);
    run_ok(
        std::process::Command::new(require("qemu-io"))
            .args(["-f", "qcow2", "-c", "write -P 0x5a 3M 64k"])
            .arg(&top),
    );

    let out = run_ok(
        vmnest()
            .args(["info", "--backing-chain", "--output", "json"])
            .arg(&top),
    );
    let chain: serde_json::Value = serde_json::from_str(&out).unwrap();
    let formats: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["format"].as_str().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "vmdk"]);
    assert_eq!(chain[0]["backing-filename"], "base.vmdk");
    assert_eq!(chain[0]["backing-filename-format"], "vmdk");

    // Data at depth 0 is exactly the write; base data shows at depth 1, as qemu-img map says.
    let map: serde_json::Value = serde_json::from_str(&run_ok(
        vmnest().args(["map", "--output", "json"]).arg(&top),
    ))
    .unwrap();
    let qmap: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", top.to_str().unwrap()])).unwrap();
    let data_at = |m: &serde_json::Value, depth: u64| -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for e in m.as_array().unwrap() {
            if e["data"] == true && e["depth"] == depth {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                match v.last_mut() {
                    Some(last) if last.1 == s => last.1 = s + l,
                    _ => v.push((s, s + l)),
                }
            }
        }
        v
    };
    assert_eq!(data_at(&map, 0), vec![(3 << 20, (3 << 20) + 65536)]);
    assert_eq!(data_at(&map, 0), data_at(&qmap, 0));
    assert_eq!(data_at(&map, 1), data_at(&qmap, 1));

    let flat = dir.join("flat.raw");
    qemu_to_raw(&top, "qcow2", &flat);
    assert_eq!(
        run(vmnest().arg("compare").arg(&top).arg(&flat))
            .status
            .code(),
        Some(0)
    );
}
