//! `rm --remote` and `gc --remote` through the CLI against moto: space comes back in two runs,
//! what the kept names need stays (restored and compared with qemu-img), and a gc running while
//! a push runs leaves the remote whole.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmnest_tests::s3::Moto;
use vmnest_tests::{require, run_ok, same_raw, scratch};

use crate::remote::{fails, images, import_all, json, remote_clean, st, u};

/// Past the one-second slack gc keeps for LastModified times in whole seconds.
fn past_slack() {
    std::thread::sleep(Duration::from_millis(1300));
}

fn gc(store: &Path, endpoint: &str, grace: &str) -> serde_json::Value {
    let v = json(st(store, Some(endpoint)).args(["gc", "--remote", "r", "--grace", grace]));
    v["report"].clone()
}

fn n(v: &serde_json::Value, key: &str) -> usize {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .len()
}

/// moto with `bucket`, a source store holding gold and 3 clones, remote `r` at
/// `s3://BUCKET/PREFIX` added to it. Returns moto, its endpoint, the images and the store.
fn source(
    dir: &Path,
    bucket: &str,
    prefix: &str,
) -> (Moto, String, Vec<(String, PathBuf)>, PathBuf) {
    require("qemu-img");
    let moto = Moto::start();
    moto.bucket(bucket);
    let ep = moto.endpoint();
    let imgs = images(dir, 3);
    let src = dir.join("src");
    import_all(&src, &imgs);
    let url = format!("s3://{bucket}/{prefix}");
    run_ok(st(&src, Some(&ep)).args(["remote", "add", "r", &url]));
    (moto, ep, imgs, src)
}

/// `restore r NAME` from `store` into `out` (raw) is identical to `raw`.
fn restores_equal(store: &Path, ep: &str, name: &str, raw: &Path, out: &Path) {
    run_ok(
        st(store, Some(ep))
            .args(["restore", "r", name])
            .arg(out)
            .args(["-O", "raw"]),
    );
    same_raw(raw, out.to_str().unwrap());
}

#[test]
fn gc_after_rm_frees_what_only_the_removed_clones_needed() {
    let dir = scratch("remote-gc-rm");
    let (moto, ep, imgs, src) = source(&dir, "vmnest-gc", "site");
    run_ok(st(&src, Some(&ep)).args(["push", "r"]));
    let packs_before = moto.keys("vmnest-gc", "site/packs/").len();

    // Unknown names are refused and nothing goes; then two clones lose their names.
    fails(st(&src, Some(&ep)).args(["rm", "--remote", "r", "c1", "nope"]));
    assert_eq!(moto.keys("vmnest-gc", "site/refs/").len(), 4);
    run_ok(st(&src, Some(&ep)).args(["rm", "--remote", "r", "c1", "c2"]));
    assert_eq!(moto.keys("vmnest-gc", "site/refs/").len(), 2);
    past_slack();
    let objects_before = moto.keys("vmnest-gc", "site/").len();

    // A dry run changes nothing; the first run condemns, the second deletes.
    let dry = json(st(&src, Some(&ep)).args(["gc", "--remote", "r", "--grace", "0s", "--dry-run"]))
        ["report"]
        .clone();
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(u(&dry, "packs_condemned"), 2, "{dry}");
    assert_eq!(moto.keys("vmnest-gc", "site/").len(), objects_before);
    let first = gc(&src, &ep, "0s");
    // Each removed clone: its import's pack; its two snapshots (the clone and its new version).
    assert_eq!(u(&first, "packs_condemned"), 2, "{first}");
    assert_eq!(n(&first, "manifests_condemned"), 4, "{first}");
    assert_eq!(u(&first, "packs_deleted"), 0, "{first}");
    assert_eq!(moto.keys("vmnest-gc", "site/packs/").len(), packs_before);
    past_slack();
    let second = gc(&src, &ep, "0s");
    assert_eq!(u(&second, "packs_deleted"), 2, "{second}");
    assert_eq!(n(&second, "manifests_deleted"), 4, "{second}");
    assert!(u(&second, "bytes_freed") > 2 * (3 * (64 << 10)), "{second}");
    assert_eq!(
        moto.keys("vmnest-gc", "site/packs/").len(),
        packs_before - 2
    );
    assert!(moto.keys("vmnest-gc", "site/gc/").is_empty());
    let third = gc(&src, &ep, "0s");
    assert_eq!(u(&third, "packs_deleted"), 0, "{third}");
    assert_eq!(u(&third, "packs_condemned"), 0, "{third}");
    remote_clean(&src, Some(&ep));

    // The kept names come back whole into empty stores; the removed ones are gone.
    let dst = dir.join("dst");
    let bare = dir.join("bare");
    run_ok(st(&dst, Some(&ep)).args(["remote", "add", "r", "s3://vmnest-gc/site"]));
    run_ok(st(&bare, Some(&ep)).args(["remote", "add", "r", "s3://vmnest-gc/site"]));
    for (name, raw) in imgs.iter().filter(|(n, _)| n == "gold" || n == "c3") {
        run_ok(st(&dst, Some(&ep)).args(["pull", "r", name]));
        let out = dir.join(format!("{name}.pulled.raw"));
        run_ok(st(&dst, None).arg("export").arg(name).arg(&out));
        same_raw(raw, out.to_str().unwrap());
        restores_equal(
            &bare,
            &ep,
            name,
            raw,
            &dir.join(format!("{name}.restored.raw")),
        );
    }
    fails(st(&dst, Some(&ep)).args(["pull", "r", "c1"]));
}

#[test]
fn a_gc_running_while_a_push_runs_leaves_the_remote_whole() {
    let dir = scratch("remote-gc-race");
    let (moto, ep, imgs, src) = source(&dir, "vmnest-gcr", "x");
    run_ok(st(&src, Some(&ep)).args(["push", "r", "gold", "c1"]));
    // Nothing on the remote has a name: gc condemns and deletes it all while c3 (most of whose
    // chunks are gold's) and c2 are pushed. Pushes commit within 1 s of their last look at the
    // gc records; the gc's grace is 3 s.
    run_ok(st(&src, Some(&ep)).args(["rm", "--remote", "r", "gold", "c1"]));
    past_slack();
    // gc runs back to back for 14 s; c3 is pushed as soon as gold's pack is condemned (so it
    // sends gold's chunks again), c2 1.5 s later, while runs go on deleting.
    let gc_loop = {
        let (src, ep) = (src.clone(), ep.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let (mut runs, mut deleted) = (0, 0);
            while started.elapsed() < Duration::from_secs(14) {
                let report = gc(&src, &ep, "3s");
                deleted += u(&report, "packs_deleted");
                runs += 1;
            }
            (runs, deleted)
        })
    };
    let waited = Instant::now();
    while moto.keys("vmnest-gcr", "x/gc/condemned-").is_empty() {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "nothing condemned"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut restarts = 0;
    for (name, delay) in [("c3", 0), ("c2", 1500)] {
        std::thread::sleep(Duration::from_millis(delay));
        let report = json(
            st(&src, Some(&ep))
                .env("VMNEST_PUSH_WINDOW", "1")
                .args(["push", "r", name]),
        );
        if name == "c3" {
            // gold's data (about 510 KiB) went up again (its pack was condemned), not just
            // c3's three 64 KiB changes.
            assert!(u(&report, "chunk_bytes_needed") > 600 << 10, "{report}");
        }
        restarts += u(&report, "restarts");
        remote_clean(&src, Some(&ep));
    }
    let (gcs, deleted) = gc_loop.join().unwrap();
    remote_clean(&src, Some(&ep));
    assert!(gcs >= 3, "{gcs} gc runs");
    // gold's and c1's packs were collected while the pushes ran.
    assert!(deleted >= 2, "{deleted} packs deleted in {gcs} runs");
    eprintln!("{gcs} gc runs deleted {deleted} packs; the pushes started over {restarts} times");
    let dst = dir.join("dst");
    run_ok(st(&dst, Some(&ep)).args(["remote", "add", "r", "s3://vmnest-gcr/x"]));
    for (name, raw) in imgs.iter().filter(|(n, _)| n == "c2" || n == "c3") {
        restores_equal(&dst, &ep, name, raw, &dir.join(format!("{name}.out.raw")));
    }
}
