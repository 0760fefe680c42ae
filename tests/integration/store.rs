//! The store through the CLI: import from every format, export to every format (checked by
//! qemu-img), clones, diff, rm/gc/verify, VM bundles with memory, damage, crashes, concurrency.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmnest_tests::{
    PATTERN_SIZE, pattern_bytes, poke, qemu_from_raw, qemu_img, require, run, run_ok, same,
    scratch, vmnest, write_pattern_raw,
};

/// Passphrase of the encrypted stores of these tests (plain stores ignore it).
pub(crate) const PASSPHRASE: &str = "store-test passphrase";

/// `vmnest --store STORE`, with a passphrase and low argon2 costs in its environment.
pub(crate) fn st(store: &Path) -> Command {
    let mut c = vmnest();
    c.arg("--store").arg(store);
    c.env("VMNEST_PASSPHRASE", PASSPHRASE)
        .env("VMNEST_ARGON2_MEMORY_KIB", "64")
        .env("VMNEST_ARGON2_ITERATIONS", "1")
        .env_remove("VMNEST_KEY_FILE");
    c
}

/// `dir/store`: created encrypted (`init --encrypt`) when `encrypted`, else left for the
/// first import to create.
fn new_store(dir: &Path, encrypted: bool) -> PathBuf {
    let store = dir.join("store");
    if encrypted {
        let out = run_ok(st(&store).args(["init", "--encrypt"]));
        assert!(out.contains("encrypted"), "{out}");
    }
    store
}

fn json(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.args(["--output", "json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn pack_count(store: &Path) -> usize {
    std::fs::read_dir(store.join("packs")).map_or(0, |d| d.count())
}

fn gold(dir: &Path) -> PathBuf {
    let raw = dir.join("gold.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 11);
    raw
}

#[test]
fn the_same_disk_from_raw_qcow2_and_vmdk_is_the_same_chunks() {
    let dir = scratch("store-formats");
    let store = dir.join("store");
    let raw = gold(&dir);
    let qcow = dir.join("gold.qcow2");
    let vmdk = dir.join("gold.vmdk");
    qemu_from_raw(&raw, "qcow2", &qcow);
    qemu_from_raw(&raw, "vmdk", &vmdk);
    let first = json(st(&store).arg("import").arg(&raw).arg("gold"));
    assert!(first["new_bytes"].as_u64().unwrap() > 0);
    let packs = pack_count(&store);
    for (src, name) in [(&qcow, "from-qcow2"), (&vmdk, "from-vmdk")] {
        let j = json(st(&store).arg("import").arg(src).arg(name));
        assert_eq!(j["new_bytes"], 0, "{name}: {j}");
    }
    assert_eq!(pack_count(&store), packs);
    let root = |spec: &str| {
        let info = json(st(&store).args(["info", &format!("store:{spec}")]));
        info["format-specific"]["map-root"].clone()
    };
    assert_eq!(root("gold"), root("from-qcow2"));
    assert_eq!(root("gold"), root("from-vmdk"));
}

plain_and_encrypted!(
    exports_to_every_format_compare_identical_and_check_clean,
    exports_to_every_format_compare_identical_and_check_clean_encrypted,
    exports_to_every_format_compare_identical_and_check_clean_in
);

fn exports_to_every_format_compare_identical_and_check_clean_in(encrypted: bool) {
    let dir = scratch(&format!("store-export-{encrypted}"));
    let store = new_store(&dir, encrypted);
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("gold"));
    for fmt in ["raw", "qcow2", "vmdk", "vpc", "vhdx"] {
        let out = dir.join(format!("out.{fmt}"));
        run_ok(
            st(&store)
                .args(["export", "gold"])
                .arg(&out)
                .args(["-O", fmt]),
        );
        same(&raw, &out);
        if fmt == "qcow2" {
            qemu_img(&["check", &out.display().to_string()]);
        }
    }
    // store: sources work where a file does.
    run_ok(st(&store).args(["compare", "store:gold"]).arg(&raw));
    let conv = dir.join("conv.qcow2");
    run_ok(
        st(&store)
            .args(["convert", "store:gold"])
            .arg(&conv)
            .args(["-O", "qcow2"]),
    );
    same(&raw, &conv);
    let map = run_ok(st(&store).args(["map", "--output", "json", "store:gold"]));
    assert!(map.contains("\"data\":true"), "{map}");
}

plain_and_encrypted!(
    a_new_version_stores_only_its_changes_and_diff_finds_them,
    a_new_version_stores_only_its_changes_and_diff_finds_them_encrypted,
    a_new_version_stores_only_its_changes_and_diff_finds_them_in
);

fn a_new_version_stores_only_its_changes_and_diff_finds_them_in(encrypted: bool) {
    let dir = scratch(&format!("store-versions-{encrypted}"));
    let store = new_store(&dir, encrypted);
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("vm"));
    poke(&raw, 5 << 20, 100, 99);
    poke(&raw, (12 << 20) + 1, 5000, 98);
    let j = json(st(&store).arg("import").arg(&raw).arg("vm"));
    // Two changed places, the second across a chunk boundary: at most 3 chunks of 16 KiB.
    assert!(
        j["new_bytes"].as_u64().unwrap() <= 3 * 16384 + 2 * 8192,
        "{j}"
    );
    assert!(j["parent"].is_string(), "{j}");
    let out = run(st(&store).args(["diff", "vm@~1", "vm", "--output", "json"]));
    assert_eq!(out.status.code(), Some(1), "diff exits 1 when they differ");
    let changes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ranges: Vec<(u64, u64)> = changes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["offset"].as_u64().unwrap(), c["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, [(5 << 20, 16384), (12 << 20, 16384)]);
    // exit status: 1 when they differ, 0 when not.
    assert_eq!(
        run(st(&store).args(["diff", "vm", "vm"])).status.code(),
        Some(0)
    );
    let log = run_ok(st(&store).args(["log", "vm"]));
    assert_eq!(log.lines().count(), 2, "{log}");
    let old = dir.join("old.raw");
    run_ok(st(&store).args(["export", "vm@~1"]).arg(&old));
    let out = run(Command::new(require("qemu-img"))
        .arg("compare")
        .arg(&old)
        .arg(&raw));
    assert_eq!(out.status.code(), Some(1), "the old version differs");
}

#[test]
fn an_overlay_export_holds_only_the_delta() {
    let dir = scratch("store-overlay");
    let store = dir.join("store");
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("gold"));
    run_ok(st(&store).args(["clone", "gold", "web"]));
    let base = dir.join("gold.qcow2");
    run_ok(
        st(&store)
            .args(["export", "gold"])
            .arg(&base)
            .args(["-O", "qcow2"]),
    );
    poke(&raw, 3 << 20, 65536, 5);
    run_ok(st(&store).arg("import").arg(&raw).arg("web"));
    let delta = dir.join("web.qcow2");
    run_ok(st(&store).args(["export", "web"]).arg(&delta).args([
        "-O",
        "qcow2",
        "-B",
        "gold.qcow2",
    ]));
    same(&raw, &delta);
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output",
        "json",
        &delta.display().to_string(),
    ]))
    .unwrap();
    assert_eq!(info["backing-filename"], "gold.qcow2");
    let size = std::fs::metadata(&delta).unwrap().len();
    assert!(size < 1 << 20, "overlay of a 64 KiB change is {size} bytes");
}

#[test]
fn fifty_clones_add_no_chunk_and_a_terabyte_clone_is_as_cheap() {
    let dir = scratch("store-clones");
    let store = dir.join("store");
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("gold"));
    let big = dir.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", &big.display().to_string(), "1T"]);
    run_ok(st(&store).arg("import").arg(&big).arg("tera"));
    let before = json(st(&store).arg("du"));
    let packs = pack_count(&store);
    let clones = json(st(&store).args(["clone", "gold", "web-{01..50}"]));
    assert_eq!(clones["clones"].as_array().unwrap().len(), 50);
    run_ok(st(&store).args(["clone", "tera", "tera-2"]));
    let after = json(st(&store).arg("du"));
    assert_eq!(pack_count(&store), packs);
    assert_eq!(before["stored_bytes"], after["stored_bytes"]);
    assert_eq!(after["names"], 53);
    // Cloning an existing name fails and changes nothing.
    assert!(
        !run(st(&store).args(["clone", "gold", "web-07"]))
            .status
            .success()
    );
    let out = dir.join("web-49.raw");
    run_ok(st(&store).args(["export", "web-49"]).arg(&out));
    same(&raw, &out);
    let images = after["images"].as_array().unwrap();
    let web = images.iter().find(|i| i["name"] == "web-01").unwrap();
    assert_eq!(web["unique_bytes"], 0, "{web}");
}

plain_and_encrypted!(
    rm_then_gc_frees_space_and_keeps_every_named_snapshot,
    rm_then_gc_frees_space_and_keeps_every_named_snapshot_encrypted,
    rm_then_gc_frees_space_and_keeps_every_named_snapshot_in
);

fn rm_then_gc_frees_space_and_keeps_every_named_snapshot_in(encrypted: bool) {
    let dir = scratch(&format!("store-gc-{encrypted}"));
    let store = new_store(&dir, encrypted);
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("gold"));
    run_ok(st(&store).args(["clone", "gold", "keep"]));
    let other = dir.join("other.raw");
    write_pattern_raw(&other, PATTERN_SIZE, 77);
    run_ok(st(&store).arg("import").arg(&other).arg("junk"));
    poke(&raw, 0, 4096, 3);
    run_ok(st(&store).arg("import").arg(&raw).arg("keep"));
    let before = json(st(&store).arg("du"))["stored_bytes"].as_u64().unwrap();
    run_ok(st(&store).args(["rm", "junk", "gold"]));
    let gc = json(st(&store).arg("gc"));
    assert_eq!(gc["removed_snapshots"], 1, "{gc}");
    let after = json(st(&store).arg("du"))["stored_bytes"].as_u64().unwrap();
    assert!(after < before, "{before} -> {after}");
    run_ok(st(&store).arg("verify"));
    let out = dir.join("keep.raw");
    run_ok(st(&store).args(["export", "keep"]).arg(&out));
    same(&raw, &out);
    // gold's snapshot is still the parent of keep's first version.
    let old = dir.join("keep-old.raw");
    run_ok(st(&store).args(["export", "keep@~2"]).arg(&old));
    run_ok(st(&store).args(["rm", "keep@~1"]));
    let log = run_ok(st(&store).args(["log", "keep"]));
    assert!(log.contains("(removed)"), "{log}");
    run_ok(st(&store).arg("gc"));
    run_ok(st(&store).arg("verify"));
}

#[test]
fn a_vm_bundle_keeps_config_disks_and_memory_and_gives_the_stream_back() {
    let dir = scratch("store-vm");
    let store = dir.join("store");
    let raw = gold(&dir);
    let config = dir.join("vm.conf");
    std::fs::write(&config, "memory = 64M\ndisk0 = gold.raw\n").unwrap();
    let mig = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("dedup-store/tests/data/qemu-7.2-pc-64m.mig");
    // A page-aligned memory image whose pages repeat.
    let vmem = dir.join("vm.vmem");
    let mut pages = Vec::new();
    for i in 0..256u64 {
        let mut page = vec![0u8; 4096];
        if i % 4 != 0 {
            pattern_bytes(&mut page, (i % 8) * 4096, 1);
        }
        pages.extend(page);
    }
    std::fs::write(&vmem, &pages).unwrap();
    let a = json(
        st(&store)
            .args(["import", "--vm", "vm1", "--config"])
            .arg(&config)
            .arg("--disk")
            .arg(&raw)
            .arg("--memory")
            .arg(&mig),
    );
    assert!(a["snapshot"].is_string());
    run_ok(
        st(&store)
            .args(["import", "--vm", "vm2", "--memory"])
            .arg(&vmem),
    );
    let ls = json(st(&store).arg("ls"));
    let vm1 = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "vm1")
        .unwrap();
    let names: Vec<&str> = vm1["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk0", "memory", "config"]);
    for (spec, member, want) in [
        ("vm1", "memory", &mig),
        ("vm1", "config", &config),
        ("vm2", "memory", &vmem),
    ] {
        let out = dir.join(format!("{spec}.{member}"));
        run_ok(
            st(&store)
                .args(["export", spec, "--member", member])
                .arg(&out),
        );
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(want).unwrap(),
            "{spec}/{member} differs"
        );
    }
    let disk = dir.join("vm1.disk.raw");
    run_ok(st(&store).args(["export", "vm1"]).arg(&disk));
    same(&raw, &disk);
    // The .vmem's 64 distinct non-zero pages (of 256) are stored once each.
    let du = json(st(&store).arg("du"));
    let vm2 = du["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "vm2")
        .unwrap();
    assert!(
        vm2["referenced_bytes"].as_u64().unwrap() <= 7 * 4096 + 8192,
        "{vm2}"
    );
    run_ok(st(&store).arg("verify"));
}

plain_and_encrypted!(
    a_flipped_byte_is_caught_on_read_and_by_verify,
    a_flipped_byte_is_caught_on_read_and_by_verify_encrypted,
    a_flipped_byte_is_caught_on_read_and_by_verify_in
);

fn a_flipped_byte_is_caught_on_read_and_by_verify_in(encrypted: bool) {
    let dir = scratch(&format!("store-flip-{encrypted}"));
    let store = new_store(&dir, encrypted);
    let raw = gold(&dir);
    run_ok(st(&store).arg("import").arg(&raw).arg("vm"));
    let pack = std::fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let out = run(st(&store).args(["export", "vm"]).arg(dir.join("x.raw")));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk"), "{err}");
    assert!(!dir.join("x.raw").exists());
    let out = run(st(&store).arg("verify"));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vm@") && text.contains("damaged"), "{text}");
}

/// Imports and clones and gcs, killing each at a random point, `rounds` times; then every
/// committed snapshot must read back bit-exact and verify must be clean.
fn crash_rounds(name: &str, rounds: u64) {
    let dir = scratch(name);
    let store = dir.join("store");
    let mut sources = Vec::new();
    for i in 0..3u64 {
        let raw = dir.join(format!("src{i}.raw"));
        write_pattern_raw(&raw, 48 << 20, 100 + i);
        poke(&raw, 30 << 20, 8 << 20, 200 + i);
        sources.push(raw);
    }
    run_ok(st(&store).arg("import").arg(&sources[0]).arg("base"));
    let mut expected: Vec<(String, PathBuf)> = vec![("base".into(), sources[0].clone())];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ rounds;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..rounds {
        let src = &sources[(round % 3) as usize];
        let name = format!("n{round}");
        let kind = next() % 4;
        let mut cmd = st(&store);
        match kind {
            0 | 1 => cmd.arg("import").arg(src).arg(&name),
            2 => cmd.args(["clone", "base", &format!("{name}-{{1..20}}")]),
            _ => {
                // Something for gc to do.
                let _ = run(st(&store).args(["rm", &format!("n{}", round.saturating_sub(1))]));
                expected.retain(|(n, _)| *n != format!("n{}", round.saturating_sub(1)));
                cmd.arg("gc")
            }
        };
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(next() % 400));
        let _ = child.kill();
        let status = child.wait().unwrap();
        // What committed must read back; what did not must not exist.
        match kind {
            0 | 1 => {
                let ls = run_ok(st(&store).arg("ls"));
                if ls.contains(&format!("{name} ")) {
                    expected.push((name, src.clone()));
                } else {
                    assert!(
                        !status.success(),
                        "import {name} succeeded but is not listed"
                    );
                }
            }
            2 => {
                let ls = run_ok(st(&store).arg("ls"));
                for i in 1..=20 {
                    let n = format!("{name}-{i}");
                    if ls.contains(&format!("{n} ")) {
                        expected.push((n, sources[0].clone()));
                    }
                }
            }
            _ => {}
        }
        let v = run(st(&store).arg("verify"));
        assert!(
            v.status.success(),
            "round {round} (kind {kind}): verify failed\n{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    for (name, src) in &expected {
        let out = dir.join("check.raw");
        let _ = std::fs::remove_file(&out);
        run_ok(st(&store).args(["export", name]).arg(&out));
        same(src, &out);
    }
}

#[test]
fn killed_imports_clones_and_gcs_lose_nothing_committed() {
    let rounds = std::env::var("VMNEST_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("VMNEST_HEAVY").is_some() {
            60
        } else {
            6
        });
    crash_rounds("store-crash", rounds);
}

#[test]
fn two_imports_and_a_gc_at_once_lose_nothing() {
    let dir = scratch("store-concurrent");
    let store = dir.join("store");
    let a = dir.join("a.raw");
    let b = dir.join("b.raw");
    write_pattern_raw(&a, 64 << 20, 1);
    write_pattern_raw(&b, 64 << 20, 2);
    poke(&b, 10 << 20, 20 << 20, 9);
    let old = dir.join("old.raw");
    write_pattern_raw(&old, PATTERN_SIZE, 3);
    run_ok(st(&store).arg("import").arg(&old).arg("old"));
    run_ok(st(&store).arg("import").arg(&a).arg("keep"));
    run_ok(st(&store).args(["rm", "old"]));
    let spawn = |args: &[&std::ffi::OsStr]| {
        st(&store)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let i1 = spawn(&["import".as_ref(), a.as_os_str(), "a".as_ref()]);
    let i2 = spawn(&["import".as_ref(), b.as_os_str(), "b".as_ref()]);
    let g = spawn(&["gc".as_ref()]);
    let i3 = spawn(&["import".as_ref(), b.as_os_str(), "a".as_ref()]);
    for child in [i1, i2, g, i3] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    run_ok(st(&store).arg("verify"));
    for (spec, src) in [("a@~1", &a), ("a", &b), ("b", &b), ("keep", &a)] {
        let (spec, src) = if spec == "a@~1" || spec == "a" {
            // The two imports of `a` landed in some order: one is the parent of the other.
            let newest = dir.join("a-new.raw");
            let _ = std::fs::remove_file(&newest);
            run_ok(st(&store).args(["export", "a"]).arg(&newest));
            let newest_is_b = run(Command::new(require("qemu-img"))
                .arg("compare")
                .arg(&newest)
                .arg(&b))
            .status
            .success();
            match (spec, newest_is_b) {
                ("a", true) | ("a@~1", false) => (spec, &b),
                _ => (spec, &a),
            }
        } else {
            (spec, src)
        };
        let out = dir.join("out.raw");
        let _ = std::fs::remove_file(&out);
        run_ok(st(&store).args(["export", spec]).arg(&out));
        same(src, &out);
    }
    let gc = json(st(&store).arg("gc"));
    assert_eq!(
        gc["removed_snapshots"], 0,
        "the first gc removed old already: {gc}"
    );
}
