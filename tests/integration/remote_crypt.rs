//! Encrypted stores and their remotes through the CLI: what lands on moto's S3 server and in a
//! directory remote holds no plaintext (content, labels, origin paths); `verify --remote` needs
//! no key; a new store made from the remote's key with the passphrase alone pulls, restores
//! and serves the snapshot; wrong keys and plain stores are refused before any transfer.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmnest_tests::s3::Moto;
use vmnest_tests::{poke, qemu_img, run, run_ok, same, same_raw, scratch};

use crate::nbd::Served;

const PASSPHRASE: &str = "remote-crypt passphrase 4711";
/// A label value and a directory name that must never reach a remote in plaintext.
const LABEL: &str = "LabelSecret-8xQw";
const ORIGIN_DIR: &str = "OriginPath-Zq7v";

/// `vmnest --store STORE` with moto's S3 settings, low argon2 costs and `passphrase` (if any)
/// in its environment only.
fn st(store: &Path, moto: &Moto, passphrase: Option<&str>) -> Command {
    let mut c = crate::remote::st(store, Some(&moto.endpoint()));
    c.env("VMNEST_ARGON2_MEMORY_KIB", "64")
        .env("VMNEST_ARGON2_ITERATIONS", "1")
        .env_remove("VMNEST_KEY_FILE")
        .env_remove("VMNEST_PASSPHRASE");
    if let Some(p) = passphrase {
        c.env("VMNEST_PASSPHRASE", p);
    }
    c
}

/// The repeated 4 KiB block of the test disk: pseudo-random, so that zstd keeps it as literal
/// bytes and a plain store's packs show it (the control below).
fn block() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A 12 MiB disk: the 4 KiB block repeated over 4 MiB, a hole, 4 MiB of pseudo-random data.
fn disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(12 << 20).unwrap();
    drop(f);
    let b = block();
    let mut data = Vec::with_capacity(4 << 20);
    while data.len() < 4 << 20 {
        data.extend_from_slice(&b);
    }
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&data, 0)
        .unwrap();
    poke(path, 8 << 20, 4 << 20, 21);
}

pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Fails when `bytes` (object `what`) holds any of `needles`.
fn assert_absent(what: &str, bytes: &[u8], needles: &[&[u8]]) {
    for n in needles {
        assert!(
            !bytes.windows(n.len()).any(|w| w == *n),
            "{what} holds {:?}",
            String::from_utf8_lossy(&n[..n.len().min(24)])
        );
    }
}

/// Downloads every object under `prefix` of `bucket` into `to`.
fn download(moto: &Moto, bucket: &str, prefix: &str, to: &Path) -> Vec<PathBuf> {
    moto.download(bucket, prefix, to);
    files_under(to)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn an_encrypted_store_replicates_only_ciphertext_and_comes_back_with_the_passphrase() {
    let dir = scratch("remote-crypt");
    let origin = dir.join(ORIGIN_DIR);
    std::fs::create_dir_all(&origin).unwrap();
    let raw = origin.join("disk.raw");
    disk(&raw);
    let moto = Moto::start();
    moto.bucket("vmnest-crypt");
    let url = "s3://vmnest-crypt/v";
    let dir_remote = dir.join("dir-remote");
    let p = Some(PASSPHRASE);

    // An encrypted store, a disk imported with a label, pushed to moto and to a directory.
    let src = dir.join("src");
    let out = run_ok(st(&src, &moto, p).args(["init", "--encrypt"]));
    assert!(out.contains("encrypted, key fingerprint"), "{out}");
    run_ok(
        st(&src, &moto, p)
            .arg("import")
            .arg(&raw)
            .arg("vm")
            .args(["--label", &format!("note={LABEL}")]),
    );
    run_ok(st(&src, &moto, p).args(["clone", "vm", "vm-clone"]));
    run_ok(st(&src, &moto, p).args(["remote", "add", "r", url]));
    run_ok(st(&src, &moto, p).args(["remote", "add", "d", s(&dir_remote)]));
    run_ok(st(&src, &moto, p).args(["push", "r"]));
    run_ok(st(&src, &moto, p).args(["push", "d"]));
    // The log shows the label and origin to the key holder.
    let log = run_ok(st(&src, &moto, p).args(["log", "vm", "--output", "json"]));
    assert!(log.contains(ORIGIN_DIR), "{log}");

    // Neither remote holds the content, the label or the origin path.
    let b = block();
    let needles: [&[u8]; 4] = [
        &b[100..164],
        &b[3000..3064],
        LABEL.as_bytes(),
        ORIGIN_DIR.as_bytes(),
    ];
    let keys = moto.keys("vmnest-crypt", "v/");
    assert!(keys.iter().any(|k| k == "v/keys"), "{keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("v/packs/")), "{keys:?}");
    assert!(
        keys.iter().any(|k| k.starts_with("v/snapshots/")),
        "{keys:?}"
    );
    let got = download(&moto, "vmnest-crypt", "v/", &dir.join("downloaded"));
    assert_eq!(got.len(), keys.len());
    for f in &got {
        assert_absent(s(f), &std::fs::read(f).unwrap(), &needles);
    }
    let files = files_under(&dir_remote);
    assert!(files.len() >= 5, "{files:?}");
    for f in &files {
        assert_absent(s(f), &std::fs::read(f).unwrap(), &needles);
    }
    // The plain store of the same disk would have shown the block: the check can fail.
    let plain = dir.join("plain");
    run_ok(st(&plain, &moto, None).arg("import").arg(&raw).arg("vm"));
    let plain_packs: Vec<u8> = files_under(&plain.join("packs"))
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(plain_packs.windows(64).any(|w| w == &b[100..164]));

    // verify --remote needs no key, and says what it could not check.
    for r in ["r", "d"] {
        let out = run_ok(st(&src, &moto, None).args(["verify", "--remote", r]));
        assert!(out.contains("no key was given"), "{out}");
        assert!(out.contains(": ok"), "{out}");
    }
    // With the key it checks ids too.
    let out = run_ok(st(&src, &moto, p).args(["verify", "--remote", "r"]));
    assert!(
        !out.contains("no key was given") && out.contains(": ok"),
        "{out}"
    );

    // A plain store cannot push to the encrypted remote.
    run_ok(st(&plain, &moto, None).args(["remote", "add", "r", url]));
    let out = run(st(&plain, &moto, None).args(["push", "r"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is encrypted"), "{err}");
    assert_eq!(moto.keys("vmnest-crypt", "v/"), keys, "nothing was sent");

    // A new site: a wrong passphrase creates nothing.
    let dst = dir.join("dst");
    let out = run(st(&dst, &moto, Some("wrong")).args(["init", "--encrypt", "--from-remote", url]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase or key file"), "{err}");
    assert!(!dst.join("config").exists());
    // The passphrase alone brings everything back.
    run_ok(st(&dst, &moto, p).args(["init", "--encrypt", "--from-remote", url]));
    run_ok(st(&dst, &moto, p).args(["remote", "add", "r", url]));
    run_ok(st(&dst, &moto, p).args(["pull", "r", "vm"]));
    let pulled = dir.join("pulled.raw");
    run_ok(st(&dst, &moto, p).args(["export", "vm"]).arg(&pulled));
    same(&raw, &pulled);
    // Pulled map nodes stay metadata: pushed on, the next remote is walked without a key.
    let onward = dir.join("onward");
    run_ok(st(&dst, &moto, p).args(["remote", "add", "o", s(&onward)]));
    run_ok(st(&dst, &moto, p).args(["push", "o", "vm"]));
    let out = run_ok(st(&dst, &moto, None).args(["verify", "--remote", "o"]));
    assert!(
        out.contains("no key was given") && out.contains(": ok"),
        "{out}"
    );
    let log = run_ok(st(&dst, &moto, p).args(["log", "vm", "--output", "json"]));
    // The sealed origin opened back (`log` shows origins, not labels).
    assert!(log.contains(ORIGIN_DIR), "{log}");

    // restore straight from the remote: the key is needed, a wrong one writes nothing.
    let restored = dir.join("restored.qcow2");
    let out = run(st(&dst, &moto, Some("wrong"))
        .args(["restore", "r", "vm-clone"])
        .arg(&restored)
        .args(["-O", "qcow2"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase or key file"));
    assert!(!restored.exists());
    run_ok(
        st(&dst, &moto, p)
            .args(["restore", "r", "vm-clone"])
            .arg(&restored)
            .args(["-O", "qcow2"]),
    );
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&restored)]);
    assert!(cmp.contains("identical"), "{cmp}");

    // serve --from the remote; its frame cache holds sealed bytes only.
    let served = Served::start_cmd(st(&dst, &moto, p), &dir, &["--from", "r", "vm"], 1);
    same_raw(&raw, &served.urls[0]);
    drop(served);
    let cached = files_under(&dst.join("remotes"));
    assert!(
        cached.iter().any(|f| s(f).contains("/cache/frames/")),
        "no frame was cached: {cached:?}"
    );
    for f in cached {
        assert_absent(s(&f), &std::fs::read(&f).unwrap(), &needles);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_store_of_another_key_is_refused_before_any_transfer() {
    let dir = scratch("remote-crypt-keys");
    let raw = dir.join("disk.raw");
    disk(&raw);
    let moto = Moto::start();
    moto.bucket("vmnest-crypt-keys");
    let url = "s3://vmnest-crypt-keys/v";
    let a = dir.join("a");
    let b = dir.join("b");
    run_ok(st(&a, &moto, Some("key a")).args(["init", "--encrypt"]));
    run_ok(st(&b, &moto, Some("key b")).args(["init", "--encrypt"]));
    for (store, pass) in [(&a, "key a"), (&b, "key b")] {
        run_ok(
            st(store, &moto, Some(pass))
                .arg("import")
                .arg(&raw)
                .arg("vm"),
        );
        run_ok(st(store, &moto, Some(pass)).args(["remote", "add", "r", url]));
    }
    run_ok(st(&a, &moto, Some("key a")).args(["push", "r"]));
    let before = moto.keys("vmnest-crypt-keys", "v/");
    // b's passphrase from a file this time (its first line).
    let pass_file = dir.join("b.pass");
    std::fs::write(&pass_file, "key b\nnot part of it\n").unwrap();
    for cmd in [&["push", "r"][..], &["pull", "r", "vm"][..]] {
        let out = run(st(&b, &moto, None)
            .arg("--passphrase-file")
            .arg(&pass_file)
            .args(cmd));
        assert!(!out.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("another key"), "{cmd:?}: {err}");
    }
    assert_eq!(moto.keys("vmnest-crypt-keys", "v/"), before);
    // A key file store: created 0600, a second store shares it.
    let key = dir.join("store.key");
    let c = dir.join("c");
    let d = dir.join("d");
    run_ok(
        st(&c, &moto, None)
            .arg("--key-file")
            .arg(&key)
            .args(["init", "--encrypt"]),
    );
    run_ok(
        st(&d, &moto, None)
            .arg("--key-file")
            .arg(&key)
            .args(["init", "--encrypt"]),
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    run_ok(
        st(&c, &moto, None)
            .arg("--key-file")
            .arg(&key)
            .arg("import")
            .arg(&raw)
            .arg("vm"),
    );
    let out = run(st(&c, &moto, None).args(["ls"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is encrypted") && err.contains("--key-file"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vmnest key change`: the store opens with the new passphrase only and reads the same; the
/// next push replaces the remote's `keys` object, so a new site unlocks it with the new
/// passphrase (and no longer with the old one); a key file made from the store opens it too.
#[test]
fn a_changed_passphrase_reaches_the_remote_with_the_next_push() {
    let dir = scratch("remote-crypt-key-change");
    let raw = dir.join("disk.raw");
    disk(&raw);
    let moto = Moto::start();
    let remote = dir.join("remote");
    let (old, new) = (Some(PASSPHRASE), Some("a new passphrase 0815"));
    let src = dir.join("src");
    run_ok(st(&src, &moto, old).args(["init", "--encrypt"]));
    run_ok(st(&src, &moto, old).arg("import").arg(&raw).arg("vm"));
    run_ok(st(&src, &moto, old).args(["remote", "add", "d", s(&remote)]));
    run_ok(st(&src, &moto, old).args(["push", "d"]));
    let keys_before = std::fs::read(remote.join("keys")).unwrap();

    let new_file = dir.join("new.pass");
    std::fs::write(&new_file, "a new passphrase 0815\n").unwrap();
    let out = run_ok(
        st(&src, &moto, old)
            .args(["key", "change", "--new-passphrase-file"])
            .arg(&new_file),
    );
    assert!(out.contains("under the new passphrase"), "{out}");
    let out = run(st(&src, &moto, old).arg("ls"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong passphrase"), "{err}");
    // The error names the store once.
    assert_eq!(err.matches(s(&src)).count(), 1, "{err}");
    let exported = dir.join("exported.raw");
    run_ok(st(&src, &moto, new).args(["export", "vm"]).arg(&exported));
    same(&raw, &exported);
    // Nothing to send, but the keys object is replaced.
    let out = run_ok(st(&src, &moto, new).args(["push", "d"]));
    assert!(out.contains("replaced the remote's keys object"), "{out}");
    assert_ne!(std::fs::read(remote.join("keys")).unwrap(), keys_before);
    let out = run_ok(st(&src, &moto, new).args(["push", "d"]));
    assert!(!out.contains("replaced"), "{out}");

    let url = s(&remote);
    let dst = dir.join("dst");
    let out = run(st(&dst, &moto, old).args(["init", "--encrypt", "--from-remote", url]));
    assert!(!out.status.success());
    run_ok(st(&dst, &moto, new).args(["init", "--encrypt", "--from-remote", url]));
    run_ok(st(&dst, &moto, new).args(["remote", "add", "d", url]));
    run_ok(st(&dst, &moto, new).args(["pull", "d", "vm"]));
    let pulled = dir.join("pulled.raw");
    run_ok(st(&dst, &moto, new).args(["export", "vm"]).arg(&pulled));
    same(&raw, &pulled);

    // To a key file: it opens the store (the passphrase no longer does).
    let key_file = dir.join("store.key");
    run_ok(
        st(&src, &moto, new)
            .args(["key", "change", "--new-key-file"])
            .arg(&key_file),
    );
    run_ok(
        st(&src, &moto, None)
            .arg("--key-file")
            .arg(&key_file)
            .args(["export", "vm", "--force"])
            .arg(&exported),
    );
    same(&raw, &exported);
    assert!(!run(st(&src, &moto, new).arg("ls")).status.success());
    let with_file = || {
        let mut c = st(&src, &moto, None);
        c.arg("--key-file").arg(&key_file);
        c
    };
    let out = run_ok(with_file().args(["push", "d"]));
    assert!(out.contains("replaced the remote's keys object"), "{out}");
    let keys_now = std::fs::read(remote.join("keys")).unwrap();
    // The other site still keeps the key under the older passphrase: its push leaves the
    // remote's newer keys object alone and says so.
    let out = run(st(&dst, &moto, new).args(["push", "d"]));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps the key a newer way"), "{err}");
    assert_eq!(std::fs::read(remote.join("keys")).unwrap(), keys_now);
    let _ = std::fs::remove_dir_all(&dir);
}
