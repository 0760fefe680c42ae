//! Remotes through the CLI: push, pull, restore and verify --remote against moto's S3 server
//! (started per test on a free loopback port) and against a directory; transient faults from a
//! proxy, a kill -9 mid-push, a damaged object, credentials kept out of every output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vmnest_tests::s3::{Fault, FaultProxy, KEY, Moto, SECRET};
use vmnest_tests::{pattern_bytes, poke, run, run_ok, same, scratch, vmnest, write_pattern_raw};

/// `vmnest --store STORE` with the S3 settings of `endpoint` (when given) in its environment only.
pub(crate) fn st(store: &Path, endpoint: Option<&str>) -> Command {
    let mut c = vmnest();
    c.arg("--store").arg(store);
    for k in ["AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"] {
        c.env_remove(k);
    }
    if let Some(e) = endpoint {
        c.env("AWS_ENDPOINT_URL", e)
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("VMNEST_REMOTE_TIMEOUT", "3");
    }
    c
}

pub(crate) fn json(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd.args(["--output", "json"]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

pub(crate) fn fails(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// A gold image and `clones` changed copies (64 KiB changed at three places each); returns
/// (name, raw image) with the gold first.
pub(crate) fn images(dir: &Path, clones: usize) -> Vec<(String, PathBuf)> {
    let gold = dir.join("gold.raw");
    write_pattern_raw(&gold, 8 << 20, 5);
    let mut out = vec![("gold".to_string(), gold.clone())];
    for i in 1..=clones {
        let raw = dir.join(format!("c{i}.raw"));
        std::fs::copy(&gold, &raw).unwrap();
        for (k, off) in [0u64, 3 << 20, 7 << 20].iter().enumerate() {
            poke(
                &raw,
                off + ((i as u64) << 16),
                64 << 10,
                100 * i as u64 + k as u64,
            );
        }
        out.push((format!("c{i}"), raw));
    }
    out
}

/// Imports the gold, clones it, and imports each changed copy as a new version of its clone.
pub(crate) fn import_all(store: &Path, imgs: &[(String, PathBuf)]) {
    run_ok(st(store, None).arg("import").arg(&imgs[0].1).arg("gold"));
    for (name, raw) in &imgs[1..] {
        run_ok(st(store, None).args(["clone", "gold", name]));
        run_ok(st(store, None).arg("import").arg(raw).arg(name));
    }
}

pub(crate) fn remote_clean(store: &Path, endpoint: Option<&str>) {
    let out = run(st(store, endpoint).args(["verify", "--remote", "r"]));
    assert!(
        out.status.success(),
        "verify --remote: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn round_trip(dir: &Path, url: &str, endpoint: Option<&str>) {
    let imgs = images(dir, 3);
    let src = dir.join("src");
    import_all(&src, &imgs);
    run_ok(st(&src, endpoint).args(["remote", "add", "r", url]));
    let first = json(st(&src, endpoint).args(["push", "r"]));
    // gold, then each clone and its new version.
    assert_eq!(
        first["snapshots_pushed"].as_array().unwrap().len(),
        7,
        "{first}"
    );
    assert!(u(&first, "bytes_uploaded") > 1 << 20, "{first}");
    remote_clean(&src, endpoint);
    // Nothing to do the second time.
    let again = json(st(&src, endpoint).args(["push", "r"]));
    assert_eq!(u(&again, "bytes_uploaded"), 0, "{again}");

    // An empty store pulls each name, and an empty store restores each straight from the remote.
    let dst = dir.join("dst");
    let bare = dir.join("bare");
    run_ok(st(&dst, endpoint).args(["remote", "add", "r", url]));
    run_ok(st(&bare, endpoint).args(["remote", "add", "r", url]));
    for (name, raw) in &imgs {
        let pulled = json(st(&dst, endpoint).args(["pull", "r", name]));
        assert_eq!(pulled["ref_updated"], name.as_str(), "{pulled}");
        let out = dir.join(format!("{name}.out.raw"));
        run_ok(st(&dst, None).arg("export").arg(name).arg(&out));
        same(&out, raw);
        let restored = dir.join(format!("{name}.restored.qcow2"));
        run_ok(
            st(&bare, endpoint)
                .args(["restore", "r", name])
                .arg(&restored)
                .args(["-O", "qcow2"]),
        );
        same(&restored, raw);
    }
    let bare_packs = std::fs::read_dir(bare.join("packs")).map_or(0, |d| d.count());
    assert_eq!(bare_packs, 0, "restore kept no local copy");
    let verify = run(st(&dst, None).arg("verify"));
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // One clone changes by 64 KiB: the next push sends about that.
    let (_, c2) = &imgs[2];
    poke(c2, 5 << 20, 64 << 10, 999);
    run_ok(st(&src, None).arg("import").arg(c2).arg("c2"));
    let second = json(st(&src, endpoint).args(["push", "r"]));
    assert_eq!(
        second["snapshots_pushed"].as_array().unwrap().len(),
        1,
        "{second}"
    );
    let sent = u(&second, "bytes_uploaded");
    assert!(
        ((64 << 10)..=2 * (64 << 10) + (64 << 10)).contains(&sent),
        "second push sent {sent} bytes for a 64 KiB change: {second}"
    );
    let pulled = json(st(&dst, endpoint).args(["pull", "r", "c2"]));
    assert!(
        u(&pulled, "chunk_bytes_fetched") <= 2 * (64 << 10),
        "{pulled}"
    );
    let out = dir.join("c2.v2.raw");
    run_ok(st(&dst, None).args(["export", "c2"]).arg(&out));
    same(&out, c2);
    remote_clean(&dst, endpoint);
}

#[test]
fn push_pull_restore_round_trip_over_s3() {
    let dir = scratch("remote-s3-round-trip");
    let moto = Moto::start();
    moto.bucket("vmnest-rt");
    round_trip(&dir, "s3://vmnest-rt/site-a/store", Some(&moto.endpoint()));
    let keys = moto.keys("vmnest-rt", "site-a/store/");
    for dir in ["packs/", "index/", "snapshots/", "refs/"] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with(&format!("site-a/store/{dir}"))),
            "no {dir} objects: {keys:?}"
        );
    }
}

#[test]
fn push_pull_restore_round_trip_over_a_directory() {
    let dir = scratch("remote-dir-round-trip");
    let url = format!("file://{}", dir.join("remote").display());
    round_trip(&dir, &url, None);
    for sub in ["packs", "index", "snapshots", "refs"] {
        assert!(dir.join("remote").join(sub).is_dir(), "{sub}");
    }
}

#[test]
fn push_completes_through_dropped_connections_errors_and_stalls() {
    let dir = scratch("remote-faults");
    let moto = Moto::start();
    moto.bucket("vmnest-faults");
    let imgs = images(&dir, 3);
    let src = dir.join("src");
    import_all(&src, &imgs);
    run_ok(st(&src, None).args(["remote", "add", "r", "s3://vmnest-faults/p"]));

    // Pushes that give up at a fault (one attempt each, the fault repeated past the client's own
    // retries) leave a remote whose every manifest is complete.
    let mut gave_up = 0;
    for (at, fault) in [
        (2, Fault::Status500),
        (5, Fault::Drop),
        (9, Fault::SlowDown),
        (13, Fault::Status500),
    ] {
        let plan = (0..200).map(|k| (at + k, fault)).collect();
        let proxy = FaultProxy::start(moto.port, "PUT", plan);
        let out = run(st(&src, Some(&proxy.endpoint()))
            .env("VMNEST_REMOTE_ATTEMPTS", "1")
            .args(["push", "r"]));
        if proxy.injected.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            assert!(
                !out.status.success(),
                "a push through {fault:?} at PUT {at} gave up"
            );
            gave_up += 1;
        }
        remote_clean(&src, Some(&moto.endpoint()));
    }

    assert!(gave_up >= 2, "only {gave_up} pushes met a fault");

    // With retries, one push (to a fresh prefix) gets through every kind of fault.
    let url = "s3://vmnest-faults/q";
    run_ok(st(&src, None).args(["remote", "rm", "r"]));
    run_ok(st(&src, None).args(["remote", "add", "r", url]));
    let plan = vec![
        (1, Fault::Drop),
        (2, Fault::Status500),
        (3, Fault::SlowDown),
        (4, Fault::Stall(Duration::from_secs(8))),
        (6, Fault::LoseAnswer),
        (8, Fault::Drop),
        (10, Fault::SlowDown),
    ];
    let proxy = FaultProxy::start(moto.port, "PUT", plan);
    let done = json(
        st(&src, Some(&proxy.endpoint()))
            .env("VMNEST_REMOTE_TIMEOUT", "2")
            .args(["push", "r"]),
    );
    assert_eq!(
        proxy.injected.load(std::sync::atomic::Ordering::Relaxed),
        7,
        "every fault was met: {done}"
    );
    assert_eq!(
        done["snapshots_pushed"].as_array().unwrap().len(),
        7,
        "{done}"
    );
    remote_clean(&src, Some(&moto.endpoint()));
    let refs: Vec<String> = moto
        .keys("vmnest-faults", "q/refs/")
        .into_iter()
        .map(|k| k.trim_start_matches("q/refs/").to_string())
        .collect();
    assert_eq!(refs.len(), 4, "{refs:?}");

    let dst = dir.join("dst");
    run_ok(st(&dst, None).args(["remote", "add", "r", url]));
    for (name, raw) in &imgs {
        run_ok(st(&dst, Some(&moto.endpoint())).args(["pull", "r", name]));
        let out = dir.join(format!("{name}.out.raw"));
        run_ok(st(&dst, None).arg("export").arg(name).arg(&out));
        same(&out, raw);
    }
}

/// A full-size incompressible image of `mib` MiB.
fn noise(path: &Path, mib: usize, seed: u64) {
    let mut buf = vec![0u8; mib << 20];
    pattern_bytes(&mut buf, 0, seed);
    std::fs::write(path, &buf).unwrap();
}

#[test]
fn a_push_killed_mid_way_resumes_without_sending_again_what_landed() {
    let dir = scratch("remote-kill");
    let moto = Moto::start();
    moto.bucket("vmnest-kill");
    let src = dir.join("src");
    // Seven packs of about 2 MiB each: one per import.
    for i in 0..7 {
        let raw = dir.join(format!("v{i}.raw"));
        noise(&raw, 2, 40 + i);
        run_ok(st(&src, None).arg("import").arg(&raw).arg(format!("v{i}")));
    }
    run_ok(st(&src, None).args(["remote", "add", "full", "s3://vmnest-kill/full"]));
    run_ok(st(&src, None).args(["remote", "add", "r", "s3://vmnest-kill/resumed"]));
    let full = json(st(&src, Some(&moto.endpoint())).args(["push", "full"]));

    let mut child = st(&src, Some(&moto.endpoint()))
        .args(["push", "r", "--jobs", "1", "--bwlimit", "4M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the push ended before the kill"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let landed = moto.keys("vmnest-kill", "resumed/packs/").len();
    assert!(landed > 0, "nothing landed in 2 s at 4 MB/s");
    remote_clean(&src, Some(&moto.endpoint()));

    let resumed = json(st(&src, Some(&moto.endpoint())).args(["push", "r"]));
    let sent = u(&resumed, "bytes_uploaded");
    // What landed is found (a pack without its index object gets one) and not sent again.
    assert!(
        u(&resumed, "chunks_needed") < u(&full, "chunks_needed"),
        "{resumed} vs {full}"
    );
    assert!(
        sent < u(&full, "bytes_uploaded"),
        "the resume sent {sent} bytes, a full push {full}"
    );
    assert_eq!(resumed["snapshots_pushed"].as_array().unwrap().len(), 7);
    remote_clean(&src, Some(&moto.endpoint()));
}

#[test]
fn a_damaged_pack_on_the_remote_is_named_and_no_wrong_data_is_written() {
    let dir = scratch("remote-damage");
    let moto = Moto::start();
    moto.bucket("vmnest-dmg");
    let imgs = images(&dir, 1);
    let src = dir.join("src");
    import_all(&src, &imgs);
    run_ok(st(&src, None).args(["remote", "add", "r", "s3://vmnest-dmg/x"]));
    run_ok(st(&src, Some(&moto.endpoint())).args(["push", "r"]));
    // Flip a byte in the gold's pack (the largest) through the S3 API.
    let key = moto.largest("vmnest-dmg", "x/packs/");
    moto.flip_byte("vmnest-dmg", &key, 100);
    let pack_name = key.rsplit('/').next().unwrap().to_string();

    let dst = dir.join("dst");
    run_ok(st(&dst, None).args(["remote", "add", "r", "s3://vmnest-dmg/x"]));
    let out = fails(st(&dst, Some(&moto.endpoint())).args(["pull", "r", "gold"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&pack_name), "{err}");
    assert!(err.contains("gold@"), "{err}");
    let listed = run_ok(st(&dst, None).arg("ls"));
    assert!(
        !listed.contains("gold"),
        "a failed pull named nothing: {listed}"
    );

    let restored = dir.join("gold.restored.raw");
    let out = fails(
        st(&dst, Some(&moto.endpoint()))
            .args(["restore", "r", "gold"])
            .arg(&restored),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&pack_name), "{err}");
    assert!(err.contains("gold@"), "{err}");
    assert!(!restored.exists(), "no partial image is left");
}

#[test]
fn credentials_never_appear_in_errors_or_json() {
    let dir = scratch("remote-secrets");
    let moto = Moto::start();
    let imgs = images(&dir, 0);
    let src = dir.join("src");
    import_all(&src, &imgs);
    // No such bucket, then nobody listening: both fail.
    run_ok(st(&src, None).args(["remote", "add", "nobucket", "s3://vmnest-none/p"]));
    run_ok(st(&src, None).args(["remote", "add", "r", "s3://vmnest-any/p"]));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for (remote, endpoint) in [
        ("nobucket", moto.endpoint()),
        ("r", format!("http://127.0.0.1:{closed}")),
    ] {
        for args in [
            vec!["push", remote, "--output", "json"],
            vec!["pull", remote, "gold", "--output", "json"],
            vec!["verify", "--remote", remote, "--output", "json"],
        ] {
            let out = fails(
                st(&src, Some(&endpoint))
                    .env("AWS_SESSION_TOKEN", format!("{SECRET}-token"))
                    .env("VMNEST_REMOTE_ATTEMPTS", "2")
                    .args(&args),
            );
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(all.contains("remote"), "{args:?}: {all}");
            assert!(!all.contains(SECRET), "{args:?} printed the secret: {all}");
        }
    }
}

#[test]
fn pushes_and_pulls_killed_at_any_moment_leave_both_sides_consistent() {
    let dir = scratch("remote-kill-anywhere");
    let moto = Moto::start();
    moto.bucket("vmnest-anywhere");
    let imgs = images(&dir, 3);
    let src = dir.join("src");
    import_all(&src, &imgs);
    let url = "s3://vmnest-anywhere/k";
    run_ok(st(&src, None).args(["remote", "add", "r", url]));
    let e = moto.endpoint();
    let kill_after = |cmd: &mut Command, ms: u64| {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        child.wait().unwrap();
    };
    for ms in [30, 80, 150, 250, 400] {
        kill_after(st(&src, Some(&e)).args(["push", "r", "--jobs", "1"]), ms);
        remote_clean(&src, Some(&e));
    }
    run_ok(st(&src, Some(&e)).args(["push", "r"]));
    remote_clean(&src, Some(&e));

    let dst = dir.join("dst");
    run_ok(st(&dst, None).args(["remote", "add", "r", url]));
    for ms in [30, 80, 150, 250, 400] {
        kill_after(st(&dst, Some(&e)).args(["pull", "r", "c3"]), ms);
        let v = run(st(&dst, None).arg("verify"));
        assert!(
            v.status.success(),
            "verify after a pull killed at {ms} ms: {}",
            String::from_utf8_lossy(&v.stdout)
        );
    }
    run_ok(st(&dst, Some(&e)).args(["pull", "r", "c3"]));
    let out = dir.join("c3.out.raw");
    run_ok(st(&dst, None).args(["export", "c3"]).arg(&out));
    same(&out, &imgs[3].1);
}
