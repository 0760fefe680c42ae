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
