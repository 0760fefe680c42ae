//! `vmnest serve --from REMOTE`: a snapshot on moto's S3 server served over NBD from a store
//! that holds nothing of it, read by qemu-img, qemu-io and nbdinfo.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use vmnest_tests::s3::{FaultProxy, Moto};
use vmnest_tests::{data_ranges_from_json, poke, require, run, run_ok, same_raw, scratch, vmnest};

use crate::nbd::{Served, nbd_data_ranges};

/// The bound given to the frame cache in these tests.
const CACHE: u64 = 4 << 20;
/// Largest stored frame: 512 KiB of plaintext stored raw, and its header.
const FRAME: u64 = (512 << 10) + 16;

/// `vmnest --store STORE` with moto's endpoint and the test credentials.
fn st(store: &Path, moto: &Moto) -> Command {
    crate::remote::st(store, Some(&moto.endpoint()))
}

/// A 48 MiB sparse disk with 22 MiB of incompressible data in three runs.
fn disk(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(48 << 20).unwrap();
    drop(f);
    for (i, (off, len)) in [
        (0u64, 8usize << 20),
        (16 << 20, 4 << 20),
        (30 << 20, 10 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        poke(path, off, len, 40 + i as u64);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Pushes `raw` as `gold` to a fresh bucket; returns moto and the source store.
fn pushed(dir: &Path, raw: &Path, bucket: &str) -> (Moto, PathBuf) {
    let moto = Moto::start();
    moto.bucket(bucket);
    let src = dir.join("src");
    run_ok(
        vmnest()
            .arg("--store")
            .arg(&src)
            .arg("import")
            .arg(raw)
            .arg("gold"),
    );
    let url = format!("s3://{bucket}/v");
    run_ok(st(&src, &moto).args(["remote", "add", "r", &url]));
    run_ok(st(&src, &moto).args(["push", "r"]));
    (moto, src)
}

/// An empty store with remote `r` at `bucket`.
fn empty_store(dir: &Path, name: &str, moto: &Moto, bucket: &str) -> PathBuf {
    let dst = dir.join(name);
    let url = format!("s3://{bucket}/v");
    run_ok(st(&dst, moto).args(["remote", "add", "r", &url]));
    dst
}

fn qemu_io_read(url: &str, off: u64, len: u64) -> std::process::Output {
    run(Command::new(require("qemu-io"))
        .args(["-r", "-f", "raw", "-c"])
        .arg(format!("read {off} {len}"))
        .arg(url))
}

/// [`disk`] in scratch directory `name`, pushed to `bucket`: the directory, the disk, moto, the
/// source store and an empty store with the remote.
fn pushed_disk(name: &str, bucket: &str) -> (PathBuf, PathBuf, Moto, PathBuf, PathBuf) {
    let dir = scratch(name);
    let raw = dir.join("gold.raw");
    disk(&raw);
    let (moto, src) = pushed(&dir, &raw, bucket);
    let dst = empty_store(&dir, "dst", &moto, bucket);
    (dir, raw, moto, src, dst)
}

/// `serve --from r ARGS` on `store`, then a read of the first 4 KiB: the server, and the times
/// from the start to listening and to the end of that read.
fn serve_timed(dir: &Path, store: &Path, moto: &Moto, args: &[&str]) -> (Served, f64, f64) {
    let started = Instant::now();
    let mut all = vec!["--from", "r"];
    all.extend_from_slice(args);
    let served = Served::start_cmd(st(store, moto), dir, &all, 1);
    let listening = started.elapsed().as_secs_f64();
    let first = qemu_io_read(&served.urls[0], 0, 4096);
    let first_reply = started.elapsed().as_secs_f64();
    assert!(first.status.success(), "{first:?} {}", served.log());
    (served, listening, first_reply)
}

#[test]
fn a_remote_snapshot_is_served_lazily_with_a_bounded_cache() {
    let (dir, raw, moto, src, dst) = pushed_disk("serve-from", "vmnest-lazy");

    let (served, listening, first_reply) =
        serve_timed(&dir, &dst, &moto, &["--cache-size", "4M", "gold"]);
    let url = served.urls[0].clone();
    assert!(url.ends_with("/gold"), "{url}");
    println!(
        "serve --from: listening after {listening:.3} s, first 4 KiB read after {first_reply:.3} s \
         (48 MiB disk, moto)"
    );

    // The content, and the map.
    same_raw(&raw, &url);
    let map =
        run_ok(
            vmnest()
                .arg("--store")
                .arg(&src)
                .args(["map", "--output", "json", "store:gold"]),
        );
    let want = data_ranges_from_json(&map);
    assert_eq!(nbd_data_ranges(&url), want);
    assert!(want.len() >= 3, "{want:?}");

    // The whole disk was read through a 4 MiB cache.
    let frames = dst.join("remotes/r/cache/frames");
    let held = dir_bytes(&frames);
    assert!(held > 0, "nothing cached in {}", frames.display());
    assert!(held <= CACHE + FRAME, "{held} bytes cached, bound {CACHE}");
    drop(served);

    // The cache is untrusted: damage every cached frame (same length), and a second server on
    // the same store still serves the source's bytes (it fetches them again); --rw is refused.
    for ent in std::fs::read_dir(&frames).unwrap().flatten() {
        let mut b = std::fs::read(ent.path()).unwrap();
        let at = b.len() - 1;
        b[at] ^= 0x5a;
        std::fs::write(ent.path(), b).unwrap();
    }
    let again = Served::start_cmd(
        st(&dst, &moto),
        &dir,
        &["--from", "r", "--cache-size", "4M", "gold"],
        1,
    );
    same_raw(&raw, &again.urls[0]);
    assert!(dir_bytes(&frames) <= CACHE + FRAME);
    drop(again);
    let out = run(st(&dst, &moto).args(["serve", "--from", "r", "--rw", "gold"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not built"), "{err}");
}

#[test]
fn the_frame_cache_option_bounds_what_a_remote_reader_keeps_and_opening_makes_no_head_request() {
    let (dir, raw, moto, _src, dst) = pushed_disk("serve-from-frames", "vmnest-frames");
    // Every request of the server goes through a proxy that logs it.
    let proxy = FaultProxy::start(moto.port, "NONE", Vec::new());
    let mut second_pass = Vec::new();
    for frame_cache in ["1M", "256M"] {
        proxy.log.lock().unwrap().clear();
        let served = Served::start_cmd(
            crate::remote::st(&dst, Some(&proxy.endpoint())),
            &dir,
            &[
                "--from",
                "r",
                "--cache-size",
                "0",
                "--frame-cache",
                frame_cache,
                "gold",
            ],
            1,
        );
        // Opening: the ref and the manifest, one GET each, and no HEAD at all.
        assert_eq!(proxy.count("HEAD", ""), 0, "{:?}", proxy.log);
        assert_eq!(proxy.count("GET", "/refs/gold"), 1, "{:?}", proxy.log);
        assert_eq!(proxy.count("GET", "/snapshots/"), 1, "{:?}", proxy.log);
        let url = served.urls[0].clone();
        same_raw(&raw, &url);
        let first = proxy.count("GET", "/packs/");
        same_raw(&raw, &url);
        let second = proxy.count("GET", "/packs/") - first;
        println!("--frame-cache {frame_cache}: {first} pack GETs, then {second} reading again");
        assert!(first > 0);
        second_pass.push(second);
        drop(served);
    }
    // 22 MiB of data through 1 MiB of memory and no disk cache: read again, fetched again. In
    // 256 MiB it all stays: nothing is fetched twice.
    assert!(second_pass[0] > 0, "{second_pass:?}");
    assert_eq!(second_pass[1], 0, "{second_pass:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restore_reads_through_the_frame_cache_it_is_given() {
    let (dir, raw, moto, _src, dst) = pushed_disk("restore-frames", "vmnest-restore-frames");
    let proxy = FaultProxy::start(moto.port, "NONE", Vec::new());
    let mut gets = Vec::new();
    for frame_cache in ["4K", "128M"] {
        proxy.log.lock().unwrap().clear();
        let out = dir.join(format!("restored-{frame_cache}.raw"));
        run_ok(
            crate::remote::st(&dst, Some(&proxy.endpoint()))
                .args([
                    "restore",
                    "r",
                    "gold",
                    "-O",
                    "raw",
                    "--frame-cache",
                    frame_cache,
                ])
                .arg(&out),
        );
        same_raw(&raw, &out.display().to_string());
        gets.push(proxy.count("GET", "/packs/"));
        assert_eq!(proxy.count("HEAD", ""), 0, "{:?}", proxy.log);
        std::fs::remove_file(&out).unwrap();
    }
    println!(
        "restore: {} pack GETs with --frame-cache 4K, {} with 128M",
        gets[0], gets[1]
    );
    // A fetch brings up to 8 MiB of frames: in 4 KiB of memory most are gone before they are
    // read, and fetched again.
    assert!(gets[0] > 2 * gets[1], "{gets:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_pack_gives_read_errors_never_wrong_data() {
    let (dir, raw, moto, _src, dst) = pushed_disk("serve-from-damage", "vmnest-lazy-dmg");
    // Damage the largest pack in its first frame's body.
    let key = moto.largest("vmnest-lazy-dmg", "v/packs/");
    moto.flip_byte("vmnest-lazy-dmg", &key, 100);
    let served = Served::start_cmd(st(&dst, &moto), &dir, &["--from", "r", "gold"], 1);
    let url = served.urls[0].clone();
    // Read the disk 1 MiB at a time: the reads of damaged frames fail with EIO, and every read
    // that succeeds returns the source's bytes.
    let script = format!(
        r#"
import errno
want = open({raw:?}, 'rb').read()
bad = 0
for i in range(48):
    try:
        got = h.pread(1 << 20, i << 20)
    except nbd.Error as e:
        assert e.errnum == errno.EIO, (i, e.errnum, e.string)
        bad += 1
        continue
    assert got == want[i << 20:(i + 1) << 20], i
print("failed", bad)
"#,
        raw = raw.to_str().unwrap()
    );
    let out = run_ok(
        Command::new(require("nbdsh"))
            // The system Python, which has libnbd's module.
            .env(
                "PATH",
                format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .args(["-u", &url, "-c"])
            .arg(&script),
    );
    let failed: u32 = out
        .trim()
        .strip_prefix("failed ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(failed > 0, "no read failed: {out} {}", served.log());
    assert!(failed < 48, "every read failed: {}", served.log());
    // The server names the damaged pack.
    let pack = key.rsplit('/').next().unwrap().to_string();
    let log = served.log_when(|l| l.contains(&pack[..16]));
    assert!(log.contains(&pack[..16]), "{log}");
}

#[test]
fn the_first_read_of_a_4_gib_remote_disk_is_served_within_seconds() {
    let dir = scratch("serve-from-4g");
    let raw = dir.join("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 30).unwrap();
    drop(f);
    // 256 MiB of data: 1 MiB every 16 MiB, so the map spans the whole disk and the data fills
    // several packs (each with its index object to fetch before the export listens).
    for k in 0..256u64 {
        poke(&raw, k << 24, 1 << 20, 7 + k);
    }
    let (moto, _src) = pushed(&dir, &raw, "vmnest-lazy-4g");
    let dst = empty_store(&dir, "dst", &moto, "vmnest-lazy-4g");
    let (served, listening, first_reply) = serve_timed(&dir, &dst, &moto, &["gold"]);
    println!(
        "serve --from a 4 GiB disk (256 MiB of data) on moto: listening after {listening:.3} s, \
         first 4 KiB read after {first_reply:.3} s (target < 2 s); {}",
        served.log().trim()
    );
    // Generous against a loaded machine; the figure printed is what counts.
    assert!(first_reply < 10.0, "{first_reply}");
    // A read far into the disk, and one of a hole.
    let far = qemu_io_read(&served.urls[0], (255 << 24) + 4096, 65536);
    assert!(far.status.success(), "{far:?}");
    // The hole reads as zeros (qemu-io's -P fails the command on any other byte).
    let hole = run(Command::new(require("qemu-io"))
        .args(["-r", "-f", "raw", "-c"])
        .arg(format!("read -P 0 {} 65536", (3u64 << 30) + (8 << 20)))
        .arg(&served.urls[0]));
    assert!(hole.status.success(), "{hole:?}");
    let text = String::from_utf8_lossy(&hole.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    drop(served);
    let _ = std::fs::remove_file(&raw);
}
