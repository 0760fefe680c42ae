//! Writable volumes over stored snapshots: `vmnest serve store:NAME --rw` written by qemu-io,
//! killed with SIGKILL and restarted, `vmnest commit`, `--commit-on-disconnect`, `vmnest volume`,
//! and gc while a volume exists.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use vmnest_tests::*;

use crate::store::st;

/// A `vmnest serve --socket` child whose stdout lines arrive on a channel.
struct Volserve {
    child: KilledOnDrop,
    url: String,
    lines: Receiver<String>,
    stderr: PathBuf,
}

impl Volserve {
    /// `vmnest serve --rw ARGS` on `nbd://127.0.0.1:PORT/vm`, or on a Unix socket in `dir`
    /// when `unix`.
    fn start(dir: &Path, store: &Path, unix: bool, args: &[&str]) -> Volserve {
        let socket = dir.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let stderr = dir.join("volserve.stderr");
        let mut cmd = st(store);
        cmd.args(["serve", "--rw", "--export-name", "vm"]);
        if unix {
            cmd.arg("--socket").arg(&socket);
        } else {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn vmnest serve");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "vmnest serve did not start: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            });
        let url = first
            .strip_prefix("serving ")
            .unwrap_or_else(|| panic!("unexpected line {first:?}"))
            .to_string();
        Volserve {
            child: KilledOnDrop(child),
            url,
            lines,
            stderr,
        }
    }

    /// SIGKILL, as a crash.
    fn kill9(mut self) {
        self.child.0.kill().expect("kill -9");
        self.child.0.wait().expect("wait");
    }

    /// What the server wrote on stderr.
    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// A store holding `vm`, imported from a 16 MiB pattern raw image (returned); encrypted when
/// `encrypted`.
fn setup(name: &str, encrypted: bool) -> (PathBuf, PathBuf, PathBuf) {
    let dir = scratch(name);
    let raw = dir.join("original.raw");
    write_pattern_raw(&raw, 16 << 20, 21);
    let store = dir.join("store");
    if encrypted {
        run_ok(st(&store).args(["init", "--encrypt"]));
    }
    run_ok(st(&store).arg("import").arg(&raw).arg("vm"));
    (dir, store, raw)
}

/// Whether a file under `dir` holds 4 KiB of `byte` in a row (plaintext of a qemu-io pattern).
fn holds_run_of(dir: &Path, byte: u8) -> bool {
    let run = [byte; 4096];
    std::fs::read_dir(dir).unwrap().any(|e| {
        let path = e.unwrap().path();
        path.is_file()
            && std::fs::read(&path)
                .unwrap()
                .windows(run.len())
                .any(|w| w == run)
    })
}

fn qemu_io(url: &str, commands: &[&str]) {
    let mut cmd = Command::new(require("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_ok(cmd.arg(url));
}

/// Writes `bytes` as a raw file and compares it with `what` (a file or nbd URL) by qemu-img.
fn compare_with(dir: &Path, bytes: &[u8], what: &str) {
    let want = dir.join("want.raw");
    std::fs::write(&want, bytes).unwrap();
    let raw_pair = ["compare", "-f", "raw", "-F", "raw"];
    qemu_img(&[&raw_pair[..], &[want.to_str().unwrap(), what]].concat());
}

/// Compares `bytes` with a stored snapshot (`vmnest compare`, which takes `store:` sources).
fn compare_stored(dir: &Path, store: &Path, bytes: &[u8], spec: &str) {
    let want = dir.join("want.raw");
    std::fs::write(&want, bytes).unwrap();
    run_ok(
        st(store)
            .args(["compare", "-f", "raw"])
            .arg(&want)
            .arg(spec),
    );
}

/// [`setup`], with the original bytes and what [`PATCH`] makes of them.
fn setup_patched(name: &str, encrypted: bool) -> (PathBuf, PathBuf, Vec<u8>, Vec<u8>) {
    let (dir, store, raw) = setup(name, encrypted);
    let original = read_raw(&raw);
    let want = patched(&original);
    (dir, store, original, want)
}

/// The content the qemu-io commands of these tests produce.
fn patched(original: &[u8]) -> Vec<u8> {
    let mut want = original.to_vec();
    want[4096..4096 + 65536].fill(0xab);
    want[(1 << 20) + 100..(1 << 20) + 100 + 8192].fill(0xcd);
    want[(2 << 20)..(3 << 20)].fill(0);
    want[(5 << 20)..(5 << 20) + 65536].fill(0);
    want
}

const PATCH: [&str; 5] = [
    "write -P 0xab 4096 65536",
    "write -f -P 0xcd 1048676 8192",
    "write -z 2097152 1048576",
    "discard 5242880 65536",
    "flush",
];

plain_and_encrypted!(
    flushed_writes_survive_kill_9_and_commit_makes_a_new_snapshot,
    flushed_writes_survive_kill_9_and_commit_makes_a_new_snapshot_encrypted,
    flushed_writes_survive_kill_9_and_commit_makes_a_new_snapshot_in
);

fn flushed_writes_survive_kill_9_and_commit_makes_a_new_snapshot_in(encrypted: bool) {
    let (dir, store, original, want) =
        setup_patched(&format!("volume-kill9-{encrypted}"), encrypted);
    let served = Volserve::start(&dir, &store, false, &["store:vm"]);
    qemu_io(&served.url, &PATCH);
    // The write log holds the client's bytes in the clear only in a plain store.
    assert_eq!(holds_run_of(&store.join("volumes/vm"), 0xab), !encrypted);
    // A second server (or a commit) cannot take the volume while it is held.
    let pid = served.child.0.id().to_string();
    let busy = run(st(&store).args(["commit", "vm"]));
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success());
    assert!(
        err.contains("volume vm is in use by another process") && err.contains(&pid),
        "{err}"
    );
    let ls = run_ok(st(&store).args(["volume", "ls"]));
    assert!(
        ls.contains("vm") && ls.contains(&format!("pid {pid}")),
        "{ls}"
    );
    served.kill9();

    // Restarted, the server reads what was flushed.
    let served = Volserve::start(&dir, &store, false, &["store:vm"]);
    compare_with(&dir, &want, &served.url);
    // The snapshot itself is untouched until a commit.
    compare_stored(&dir, &store, &original, "store:vm");
    served.kill9();

    let out = run_ok(st(&store).args(["commit", "vm", "-m", "patched"]));
    let spec = out.trim();
    assert!(spec.starts_with("vm@") && spec.len() == 15, "{out}");
    let exported = dir.join("exported.raw");
    run_ok(st(&store).args(["export", spec]).arg(&exported));
    compare_with(&dir, &want, exported.to_str().unwrap());
    run_ok(
        st(&store)
            .args(["export", "vm@~1", "--force"])
            .arg(&exported),
    );
    compare_with(&dir, &original, exported.to_str().unwrap());
    let log = run_ok(st(&store).args(["log", "vm"]));
    assert!(log.contains("commit volume vm"), "{log}");
    // The volume is rebased on the new snapshot with an empty log.
    let ls = run_ok(st(&store).args(["volume", "ls", "--output", "json"]));
    let list: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(list[0]["log_bytes"], 0, "{ls}");
    assert!(
        list[0]["base"].as_str().unwrap().starts_with(&spec[3..]),
        "{ls}"
    );
    assert!(list[0]["in_use_by"].is_null());
    // Asking for the old snapshot over the existing volume is refused.
    let again = run(st(&store).args([
        "serve",
        "--rw",
        "--socket",
        dir.join("other.sock").to_str().unwrap(),
        "store:vm@~1",
    ]));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success());
    assert!(err.contains("volume vm exists over vm@"), "{err}");
    // Discarded, the volume is gone.
    run_ok(st(&store).args(["volume", "rm", "vm"]));
    assert!(!store.join("volumes/vm").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commit_on_disconnect_commits_when_qemu_io_disconnects() {
    let (dir, store, original, want) = setup_patched("volume-disconnect", false);
    let served = Volserve::start(
        &dir,
        &store,
        true,
        &["--volume", "patch", "--commit-on-disconnect", "store:vm"],
    );
    // Only reading: nothing to commit.
    qemu_io(&served.url, &["read 0 512"]);
    qemu_io(&served.url, &PATCH);
    let line = served
        .lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no commit: {}", served.stderr_text()));
    let spec = line
        .strip_prefix("committed ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    assert!(spec.starts_with("vm@"), "{line}");
    // Exactly one commit, from the writing connection.
    let heads = run_ok(st(&store).args(["log", "vm"]));
    assert_eq!(heads.lines().count(), 2, "{heads}");
    compare_stored(&dir, &store, &want, "store:vm");
    compare_stored(&dir, &store, &original, "store:vm@~1");
    // The server goes on serving the rebased volume.
    compare_with(&dir, &want, &served.url);
    let ls = run_ok(st(&store).arg("ls"));
    assert!(ls.contains("volume patch over vm@"), "{ls}");
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gc_keeps_the_base_of_a_volume_whose_name_was_removed() {
    let (dir, store, original, want) = setup_patched("volume-gc", false);
    let served = Volserve::start(&dir, &store, false, &["store:vm"]);
    qemu_io(&served.url, &PATCH);
    drop(served);
    run_ok(st(&store).args(["rm", "vm"]));
    let gc = run_ok(st(&store).args(["gc", "--output", "json"]));
    let report: serde_json::Value = serde_json::from_str(&gc).unwrap();
    assert_eq!(report["removed_snapshots"], 0, "{gc}");
    run_ok(st(&store).arg("verify"));
    let du = run_ok(st(&store).arg("du"));
    assert!(du.contains("volume vm over vm@"), "{du}");
    // The volume still reads base + writes, and its commit brings the name back.
    let out = run_ok(st(&store).args(["commit", "vm"]));
    assert!(out.trim().starts_with("vm@"), "{out}");
    compare_stored(&dir, &store, &want, "store:vm");
    compare_stored(&dir, &store, &original, "store:vm@~1");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nbdcopy_with_four_connections_writes_a_volume_that_commits_once_all_disconnect() {
    let (dir, store, _) = setup("volume-nbdcopy", false);
    let new = dir.join("new.raw");
    write_pattern_raw(&new, 16 << 20, 77);
    let served = Volserve::start(&dir, &store, true, &["--commit-on-disconnect", "store:vm"]);
    run_ok(
        Command::new(require("nbdcopy"))
            .args(["--connections=4", "--flush"])
            .arg(&new)
            .arg(&served.url),
    );
    let line = served
        .lines
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no commit: {}", served.stderr_text()));
    assert!(line.starts_with("committed vm@"), "{line}");
    // The multi-conn copy wrote every byte, and each commit saw a finished copy.
    compare_stored(&dir, &store, &read_raw(&new), "store:vm");
    compare_with(&dir, &read_raw(&new), &served.url);
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}
