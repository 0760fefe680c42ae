//! The copy engine and the writers, checked with qemu-img as the oracle.

use vmnest_tests::*;

#[test]
fn raw_writer_keeps_holes_and_content() {
    let dir = scratch("convert-raw");
    let src = dir.join("src.raw");
    write_pattern_raw(&src, PATTERN_SIZE, 51);
    let qcow = dir.join("src.qcow2");
    qemu_from_raw(&src, "qcow2", &qcow);
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

#[test]
fn failed_conversion_leaves_no_file_and_names_the_offset() {
    let dir = scratch("convert-fail");
    let src = broken_qcow2(&dir, 40);
    let dst = dir.join("out.raw");
    let out = run(vmnest().args(["convert", "-O", "raw"]).arg(&src).arg(&dst));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.qcow2") && err.contains("offset 0x10000000000"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the source may remain: {left:?}");
}

#[test]
fn existing_destination_needs_force_and_unknown_options_are_named() {
    let dir = scratch("convert-existing");
    let src = dir.join("p.raw");
    write_pattern_raw(&src, 8 << 20, 72);
    let dst = dir.join("out.raw");
    std::fs::write(&dst, b"precious").unwrap();
    let out = run(vmnest().args(["convert", "-O", "raw"]).arg(&src).arg(&dst));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
    let out = run(vmnest()
        .args(["convert", "-O", "raw", "-o", "colour=blue", "--force"])
        .arg(&src)
        .arg(&dst));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"colour\""));
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
    run_ok(
        vmnest()
            .args(["convert", "-O", "raw", "--force"])
            .arg(&src)
            .arg(&dst),
    );
    assert_eq!(hash_file(&dst), hash_file(&src));
}

#[test]
fn convert_into_an_existing_raw_overwrites_old_data_unless_target_is_zero() {
    let dir = scratch("convert-n");
    let src = dir.join("p.raw");
    write_pattern_raw(&src, 8 << 20, 73);
    let dst = dir.join("dev.raw");
    std::fs::write(&dst, vec![0xabu8; 8 << 20]).unwrap();
    run_ok(
        vmnest()
            .args(["convert", "-O", "raw", "-n"])
            .arg(&src)
            .arg(&dst),
    );
    assert_eq!(hash_file(&dst), hash_file(&src));
    // --target-is-zero trusts the target: old bytes in holes stay (as qemu-img does).
    std::fs::write(&dst, vec![0xabu8; 8 << 20]).unwrap();
    run_ok(
        vmnest()
            .args(["convert", "-O", "raw", "-n", "--target-is-zero"])
            .arg(&src)
            .arg(&dst),
    );
    assert_ne!(hash_file(&dst), hash_file(&src));
}

#[test]
fn disk_full_is_reported_with_the_file_and_leaves_nothing() {
    let dir = scratch("convert-full");
    let src = dir.join("p.raw");
    write_pattern_raw(&src, PATTERN_SIZE, 74);
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mnt),
    );
    /// Unmounts the tmpfs however the test ends (a panic would otherwise leave it mounted).
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let mounted = Unmount(&mnt);
    let out = run(vmnest()
        .args(["convert", "-O", "raw"])
        .arg(&src)
        .arg(mnt.join("out.raw")));
    let left = std::fs::read_dir(&mnt).unwrap().count();
    drop(mounted);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("out.raw") && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(left, 0, "a partial file was left behind");
}

/// Source subformats, as qemu-img writes them: (name, qemu-img format, qemu-img options).
const SOURCES: &[(&str, &str, &[&str])] = &[
    ("raw", "raw", &[]),
    ("qcow2-v3", "qcow2", &[]),
    ("qcow2-v2", "qcow2", &["-o", "compat=0.10"]),
    ("qcow2-zlib", "qcow2", &["-c"]),
    (
        "qcow2-zstd-el2",
        "qcow2",
        &["-c", "-o", "compression_type=zstd,extended_l2=on"],
    ),
    ("vmdk-sparse", "vmdk", &["-o", "subformat=monolithicSparse"]),
    ("vmdk-stream", "vmdk", &["-o", "subformat=streamOptimized"]),
    ("vmdk-flat", "vmdk", &["-o", "subformat=monolithicFlat"]),
    (
        "vmdk-2gb-sparse",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
    ),
    (
        "vmdk-2gb-flat",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentFlat"],
    ),
    ("vhd-fixed", "vpc", &["-o", "subformat=fixed,force_size=on"]),
    (
        "vhd-dynamic",
        "vpc",
        &["-o", "subformat=dynamic,force_size=on"],
    ),
    ("vhdx-dynamic", "vhdx", &["-o", "subformat=dynamic"]),
    ("vhdx-fixed", "vhdx", &["-o", "subformat=fixed"]),
    ("parallels", "parallels", &[]),
];

/// Target subformats vmnest writes: (name, format, vmnest convert arguments).
const TARGETS: &[(&str, &str, &[&str])] = &[
    ("raw", "raw", &[]),
    ("qcow2-v3", "qcow2", &[]),
    ("qcow2-v2", "qcow2", &["-o", "compat=0.10"]),
    ("qcow2-zlib", "qcow2", &["-c"]),
    (
        "qcow2-zstd",
        "qcow2",
        &["-c", "-o", "compression_type=zstd"],
    ),
    ("vmdk-sparse", "vmdk", &["-o", "subformat=monolithicSparse"]),
    ("vmdk-stream", "vmdk", &["-o", "subformat=streamOptimized"]),
    ("vmdk-flat", "vmdk", &["-o", "subformat=monolithicFlat"]),
    ("vhd-fixed", "vpc", &["-o", "subformat=fixed"]),
    ("vhd-dynamic", "vpc", &["-o", "subformat=dynamic"]),
    ("vhdx-dynamic", "vhdx", &["-o", "subformat=dynamic"]),
    ("vhdx-fixed", "vhdx", &["-o", "subformat=fixed"]),
];

/// Every source subformat into every target subformat with `vmnest convert`: qemu-img compare
/// says identical, and converting back into the source's own format gives identical content.
#[test]
fn every_source_into_every_target_and_back() {
    let dir = scratch("convert-matrix");
    let raw = dir.join("pattern.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 61);
    let vm = |args: &[&str], src: &std::path::Path, dst: &std::path::Path| {
        run_ok(vmnest().arg("convert").args(args).arg(src).arg(dst));
    };
    let mut failures = Vec::new();
    for (sname, sfmt, sopts) in SOURCES {
        let src = dir.join(format!("src-{sname}.img"));
        if *sfmt == "raw" {
            std::fs::copy(&raw, &src).unwrap();
        } else {
            let mut a = vec!["convert", "-f", "raw", "-O", sfmt];
            a.extend_from_slice(sopts);
            a.extend([raw.to_str().unwrap(), src.to_str().unwrap()]);
            qemu_img(&a);
        }
        for (tname, tfmt, targs) in TARGETS {
            let dst = dir.join(format!("{sname}--{tname}.img"));
            let mut a = vec!["-O", tfmt];
            a.extend_from_slice(targs);
            vm(&a, &src, &dst);
            let same = run(std::process::Command::new(require("qemu-img"))
                .args(["compare", "-q", "-f", sfmt, "-F", tfmt])
                .arg(&src)
                .arg(&dst));
            if same.status.code() != Some(0) {
                failures.push(format!(
                    "{sname} -> {tname}: qemu-img compare exit {:?}",
                    same.status.code()
                ));
            }
            // Back into a format of the source's family (raw for the formats vmnest only reads).
            let back_args: Vec<&str> = match TARGETS.iter().find(|t| t.0 == *sname) {
                Some((_, f, a)) => [&["-O", f][..], a].concat(),
                None => vec!["-O", if *sfmt == "parallels" { "raw" } else { sfmt }],
            };
            let back = dir.join(format!("{sname}--{tname}--back.img"));
            vm(&back_args, &dst, &back);
            let out = run(vmnest().arg("compare").arg(&raw).arg(&back));
            if out.status.code() != Some(0) {
                failures.push(format!(
                    "{sname} -> {tname} -> back: {}",
                    String::from_utf8_lossy(&out.stdout).trim()
                ));
            }
            for p in [&dst, &back] {
                for f in vmnest_info(p)["files"].as_array().unwrap() {
                    let _ = std::fs::remove_file(f.as_str().unwrap());
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn presets_pick_what_each_hypervisor_takes() {
    let dir = scratch("convert-presets");
    let src = dir.join("p.raw");
    write_pattern_raw(&src, PATTERN_SIZE, 81);
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        ("esxi", "vmdk", "vmdk", Some("streamOptimized")),
        ("azure", "vhd", "vpc", Some("fixed")),
        ("hyperv", "vhdx", "vhdx", Some("dynamic")),
        ("openstack", "qcow2", "qcow2", Some("v3")),
        ("virtualbox", "vmdk", "vmdk", Some("monolithicSparse")),
    ];
    for (preset, ext, fmt, sub) in cases {
        let dst = dir.join(format!("out-{preset}.{ext}"));
        run_ok(
            vmnest()
                .args(["convert", "--for", preset])
                .arg(&src)
                .arg(&dst),
        );
        let info = vmnest_info(&dst);
        assert_eq!(info["format"], *fmt, "{preset}");
        assert_eq!(info["subformat"].as_str(), *sub, "{preset}");
        let same = run(std::process::Command::new(require("qemu-img"))
            .args(["compare", "-q", "-f", "raw", "-F", fmt])
            .arg(&src)
            .arg(&dst));
        assert_eq!(same.status.code(), Some(0), "{preset}");
    }
    // Azure: a whole number of MiB, the footer's size as qemu-img reads it.
    let azure = dir.join("out-azure.vhd");
    let size = qemu_info(&azure, "vpc")["virtual-size"].as_u64().unwrap();
    assert_eq!(size, PATTERN_SIZE.div_ceil(1 << 20) << 20);
    // A preset and a different -O disagree.
    let out = run(vmnest()
        .args(["convert", "--for", "esxi", "-O", "qcow2"])
        .arg(&src)
        .arg(dir.join("x")));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn overlay_from_the_cli_holds_only_the_changed_clusters() {
    use std::os::unix::fs::FileExt;
    let dir = scratch("convert-overlay-cli");
    let raw = dir.join("gold.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 82);
    let gold = dir.join("gold.qcow2");
    qemu_from_raw(&raw, "qcow2", &gold);
    let patched = dir.join("patched.raw");
    std::fs::copy(&raw, &patched).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&patched)
        .unwrap();
    f.write_all_at(b"patched", 3 << 20).unwrap();
    let delta = dir.join("delta.qcow2");
    let out = run_ok(
        vmnest()
            .args([
                "convert",
                "-O",
                "qcow2",
                "-B",
                "gold.qcow2",
                "--output",
                "json",
            ])
            .arg(&patched)
            .arg(&delta),
    );
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["bytes-written"], 65536, "{stats}");
    let map: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        delta.to_str().unwrap(),
    ]))
    .unwrap();
    let top: Vec<_> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["data"] == true)
        .collect();
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(top[0]["start"], 3 << 20);
    let same = run(std::process::Command::new(require("qemu-img"))
        .args(["compare", "-q", "-f", "raw"])
        .arg(&patched)
        .arg(&delta));
    assert_eq!(same.status.code(), Some(0));
    assert_eq!(
        run(std::process::Command::new(require("qemu-img"))
            .arg("check")
            .arg(&delta))
        .status
        .code(),
        Some(0)
    );
}

#[test]
fn a_conversion_killed_midway_leaves_no_destination() {
    let dir = scratch("convert-kill");
    let src = dir.join("big.raw");
    // 256 MiB of compressible data: slow enough (zlib) to be killed in the middle.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for i in 0..256u64 {
            pattern_bytes(&mut buf[..4096], i, 83);
            for j in 1..256 {
                buf.copy_within(0..4096, j * 4096);
            }
            f.write_all_at(&buf, i << 20).unwrap();
        }
    }
    let dst = dir.join("out.qcow2");
    let mut child = vmnest()
        .args(["convert", "-O", "qcow2", "-c", "--threads", "1"])
        .arg(&src)
        .arg(&dst)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the conversion finished before it was killed; make the input larger"
    );
    assert!(!dst.exists(), "a killed conversion left a destination file");
}

#[test]
fn no_sync_still_writes_a_complete_image_into_place() {
    let dir = scratch("convert-no-sync");
    let src = dir.join("p.raw");
    write_pattern_raw(&src, PATTERN_SIZE, 84);
    for (fmt, ext) in [
        ("qcow2", "qcow2"),
        ("vmdk", "vmdk"),
        ("vpc", "vhd"),
        ("vhdx", "vhdx"),
        ("raw", "img"),
    ] {
        let dst = dir.join(format!("out.{ext}"));
        run_ok(
            vmnest()
                .args(["convert", "--no-sync", "-O", fmt])
                .arg(&src)
                .arg(&dst),
        );
        assert_eq!(
            run(vmnest().arg("compare").arg(&src).arg(&dst))
                .status
                .code(),
            Some(0),
            "{fmt}"
        );
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("vmnest-tmp")), "{names:?}");
}
