//! `vmnest serve`: the NBD server, against real clients (qemu-img, qemu-io, libnbd's nbdinfo,
//! nbdcopy and nbdsh) and against a hand-written misbehaving client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmnest_tests::*;

/// A running `vmnest serve`, killed when dropped.
pub(crate) struct Served {
    child: Child,
    /// The `nbd://` URL of each export, in order.
    pub(crate) urls: Vec<String>,
    stderr: PathBuf,
}

impl Served {
    /// `vmnest serve ARGS --listen 127.0.0.1:0`, waiting for one `serving` line per export.
    fn start(dir: &Path, args: &[&str], exports: usize) -> Served {
        Served::start_cmd(vmnest(), dir, args, exports)
    }

    /// [`Served::start`] with `cmd` (`vmnest` with options and environment) as the command.
    pub(crate) fn start_cmd(mut cmd: Command, dir: &Path, args: &[&str], exports: usize) -> Served {
        let stderr = dir.join("serve.stderr");
        let mut child = cmd
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn vmnest serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
        let mut urls = Vec::new();
        while urls.len() < exports {
            let mut line = String::new();
            let n = lines.read_line(&mut line).expect("read serve output");
            assert!(
                n > 0,
                "vmnest serve exited early: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            let url = line
                .trim()
                .strip_prefix("serving ")
                .unwrap_or_else(|| panic!("unexpected line {line:?}"));
            urls.push(url.to_string());
        }
        Served {
            child,
            urls,
            stderr,
        }
    }

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> String {
        let url = &self.urls[0];
        let rest = url
            .strip_prefix("nbd://")
            .or_else(|| url.strip_prefix("nbds://"))
            .expect("nbd url");
        rest.split('/').next().expect("host:port").to_string()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The log once `ready` holds for it, or as it stands after 20 s: the server writes a
    /// refused connection's line after the client has already seen the refusal, so a check
    /// made right after the client exits can run ahead of the line on a loaded machine.
    pub(crate) fn log_when(&self, ready: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let log = self.log();
            if ready(&log) || std::time::Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A pattern raw image and its qcow2 and (monolithicSparse) VMDK copies, written by qemu-img.
fn pattern_images(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let raw = dir.join("pattern.raw");
    write_pattern_raw(&raw, PATTERN_SIZE - 7 * 512, 11);
    let qcow2 = dir.join("pattern.qcow2");
    let vmdk = dir.join("pattern.vmdk");
    qemu_from_raw(&raw, "qcow2", &qcow2);
    qemu_from_raw(&raw, "vmdk", &vmdk);
    (raw, qcow2, vmdk)
}

#[test]
fn qemu_img_reads_qcow2_and_vmdk_exports() {
    let dir = scratch("nbd-qemu-img");
    let (raw, qcow2, vmdk) = pattern_images(&dir);
    let served = Served::start(&dir, &[s(&qcow2), s(&vmdk)], 2);
    assert!(
        served.urls[0].ends_with("/pattern.qcow2"),
        "{:?}",
        served.urls
    );
    assert!(served.urls[1].ends_with("/pattern.vmdk"));
    let size = std::fs::metadata(&raw).unwrap().len();
    for url in &served.urls {
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", url])).unwrap();
        assert_eq!(info["virtual-size"].as_u64(), Some(size), "{url}");
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&raw), url]);
        let out = dir.join("copy.raw");
        qemu_img(&["convert", "-f", "raw", "-O", "raw", url, s(&out)]);
        assert_eq!(hash_file(&out), hash_file(&raw), "{url}");
    }
    // No export name: the first export.
    let default = format!("nbd://{}", served.addr());
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &default, s(&qcow2)]);
}

#[test]
fn unix_socket_export_reads_like_the_file() {
    let dir = scratch("nbd-unix");
    let (raw, qcow2, _) = pattern_images(&dir);
    let socket = dir.join("nbd.sock");
    let stderr = dir.join("serve.stderr");
    let mut child = vmnest()
        .args([
            "serve",
            "--export-name",
            "disk",
            "--socket",
            s(&socket),
            s(&qcow2),
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let guard = Served {
        child,
        urls: vec![],
        stderr,
    };
    let url = format!("nbd+unix:///disk?socket={}", socket.display());
    assert_eq!(line.trim(), format!("serving {url}"));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&raw), &url]);
    drop(guard);
}

/// Writes, zeroes, discards and flushes through qemu-io on `url`, then reads back.
fn qemu_io_edits(url: &str) {
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 4096 65536",
        "-c",
        "write -f -P 0xcd 1048576 8192",
        "-c",
        "write -z 0 4096",
        "-c",
        "discard 131072 65536",
        "-c",
        "write -z 3145728 1048576",
        "-c",
        "flush",
        "-c",
        "read -P 0xab 4096 65536",
        "-c",
        "read -P 0 131072 65536",
        url,
    ]));
}

/// `before` with [`qemu_io_edits`] applied (its discard covers one whole 64 KiB cluster, which
/// reads back as zeros).
fn edited(before: &[u8]) -> Vec<u8> {
    let mut want = before.to_vec();
    want[4096..4096 + 65536].fill(0xab);
    want[1 << 20..(1 << 20) + 8192].fill(0xcd);
    want[..4096].fill(0);
    want[131072..131072 + 65536].fill(0);
    want[3 << 20..4 << 20].fill(0);
    want
}

#[test]
fn qemu_io_writes_land_in_a_writable_raw_export() {
    let dir = scratch("nbd-qemu-io");
    let original = dir.join("original.raw");
    write_pattern_raw(&original, 16 << 20, 5);
    let disk = dir.join("disk.raw");
    std::fs::copy(&original, &disk).unwrap();
    let served = Served::start(&dir, &["--rw", "-f", "raw", s(&disk)], 1);
    qemu_io_edits(&served.urls[0]);
    drop(served);
    let after = read_raw(&disk);
    let want = edited(&read_raw(&original));
    assert_eq!(after.len(), want.len());
    if let Some(i) = image_format::bytes::first_difference(&after, &want) {
        panic!("disk differs from the expected content at {i:#x}");
    }
}

#[test]
fn qemu_io_writes_land_in_a_writable_qcow2_export_over_a_backing_file() {
    use super::qcow2_rw::{overlay, to_qcow2, verify};
    let dir = scratch("nbd-qemu-io-qcow2");
    let original = dir.join("original.raw");
    write_pattern_raw(&original, 16 << 20, 6);
    // The lower half in a compressed backing file, the upper half written into the overlay.
    let base = dir.join("base.qcow2");
    to_qcow2(&original, &base, &["-c"]);
    let disk = dir.join("disk.qcow2");
    overlay(&base, &disk, "");
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 8388608 8388608",
        s(&disk),
    ]));
    let mut before = read_raw(&original);
    before[8 << 20..].fill(0x11);
    let served = Served::start(&dir, &["--rw", s(&disk)], 1);
    qemu_io_edits(&served.urls[0]);
    // Writes into the overlay's own clusters (in place) and across the halves.
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x22 8323072 131072",
        "-c",
        "flush",
        &served.urls[0],
    ]));
    drop(served);
    let mut want = edited(&before);
    want[8323072..8323072 + 131072].fill(0x22);
    // qemu-img check clean, qemu-img compare, our reader and qcow2-rs all see `want`.
    verify(&dir, &disk, &want, "nbd-export");
    // The backing file is unchanged.
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        s(&original),
        s(&base),
    ]);
}

#[test]
fn writes_to_a_read_only_export_fail() {
    let dir = scratch("nbd-read-only");
    let (raw, _, _) = pattern_images(&dir);
    let before = hash_file(&raw);
    let served = Served::start(&dir, &["-f", "raw", s(&raw)], 1);
    let out = run(Command::new(require("qemu-io")).args([
        "-f",
        "raw",
        "-c",
        "write -P 1 0 4096",
        &served.urls[0],
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || text.contains("Read-only"),
        "{text}"
    );
    drop(served);
    assert_eq!(hash_file(&raw), before);
}

#[test]
fn a_guest_write_aimed_at_qcow2_metadata_fails_with_eio_and_changes_nothing() {
    let dir = scratch("nbd-qcow2-overlap");
    let disk = dir.join("crafted.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&disk), "64M"]);
    run_ok(Command::new(require("qemu-io")).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 128k",
        s(&disk),
    ]));
    // The L2 entry of guest cluster 1 (64 KiB clusters) now names the first refcount block,
    // copied flag set: a write there would overwrite the refcounts.
    let bytes = std::fs::read(&disk).unwrap();
    let be64 =
        |off: u64| u64::from_be_bytes(bytes[off as usize..off as usize + 8].try_into().unwrap());
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    let block = be64(be64(48));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&(block | 1 << 63).to_be_bytes(), l2 + 8)
            .unwrap();
    }
    let before = hash_file(&disk);
    let served = Served::start(&dir, &["--rw", s(&disk)], 1);
    let out = run(Command::new(require("qemu-io")).args([
        "-f",
        "raw",
        "-c",
        "write -P 0x22 65536 4096",
        "-c",
        "flush",
        &served.urls[0],
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    let want = format!("at host offset {block:#x} overlaps the refcount block");
    let log = served.log_when(|log| log.contains(&want));
    assert!(log.contains(&want), "{log}");
    assert!(log.contains(&disk.display().to_string()), "{log}");
    assert!(log.contains("guest offset 0x10000"), "{log}");
    drop(served);
    assert_eq!(hash_file(&disk), before, "the file changed");
}

#[test]
fn nbdinfo_lists_exports_and_maps_like_vmnest_map() {
    let dir = scratch("nbd-nbdinfo");
    let (raw, qcow2, vmdk) = pattern_images(&dir);
    let served = Served::start(
        &dir,
        &[
            "--export-name",
            "q",
            "--export-name",
            "v",
            s(&qcow2),
            s(&vmdk),
            s(&raw),
        ],
        3,
    );
    let list: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new(require("nbdinfo"))
            .args(["--list", "--json"])
            .arg(format!("nbd://{}", served.addr())),
    ))
    .unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["q", "v", "pattern.raw"]);
    assert_eq!(
        list["exports"][0]["description"],
        "qcow2 image ".to_string() + s(&qcow2)
    );
    assert_eq!(list["exports"][0]["is_read_only"], true);
    assert_eq!(list["exports"][0]["can_multi_conn"], true);
    for (url, path) in served.urls.iter().zip([&qcow2, &vmdk, &raw]) {
        let data = nbd_data_ranges(url);
        assert_eq!(data, vmnest_map_data(path), "{url}");
        assert!(!data.is_empty());
    }
}

/// Merged data ranges (type 0) of an export, from `nbdinfo --map --json`.
pub(crate) fn nbd_data_ranges(url: &str) -> Vec<(u64, u64)> {
    let map: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new(require("nbdinfo"))
            .args(["--map", "--json"])
            .arg(url),
    ))
    .unwrap();
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["type"].as_u64() != Some(0) {
            continue;
        }
        let start = e["offset"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match data.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => data.push((start, end)),
        }
    }
    data
}

#[test]
fn nbdcopy_with_four_connections_copies_both_ways() {
    let dir = scratch("nbd-nbdcopy");
    let (raw, qcow2, _) = pattern_images(&dir);
    let served = Served::start(&dir, &[s(&qcow2)], 1);
    let out = dir.join("out.raw");
    run_ok(
        Command::new(require("nbdcopy"))
            .args(["--connections", "4", "--requests", "16"])
            .arg(&served.urls[0])
            .arg(&out),
    );
    assert_eq!(hash_file(&out), hash_file(&raw));
    drop(served);

    // Into a writable export, over four connections at once (multi-conn).
    let target = dir.join("target.raw");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(std::fs::metadata(&raw).unwrap().len())
        .unwrap();
    nbdcopy_into_export(&dir, &raw, &["--rw", "-f", "raw", s(&target)]);
    assert_eq!(hash_file(&target), hash_file(&raw));

    // Into a writable qcow2 export with small clusters: four connections allocating at once.
    let size = std::fs::metadata(&raw).unwrap().len();
    let target = dir.join("target.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&target),
        &size.to_string(),
    ]);
    nbdcopy_into_export(&dir, &raw, &["--rw", s(&target)]);
    super::qcow2_rw::verify(&dir, &target, &read_raw(&raw), "nbdcopy-qcow2");
}

#[test]
fn writes_never_flushed_are_in_the_qcow2_file_once_the_server_stops() {
    let dir = scratch("nbd-unflushed");
    let (raw, _, _) = pattern_images(&dir);
    let size = std::fs::metadata(&raw).unwrap().len();
    let target = dir.join("target.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&target), &size.to_string()]);
    let mut served = Served::start(&dir, &["--rw", s(&target)], 1);
    // No --flush: the client never asks for durability; the server holds new L2 entries.
    run_ok(
        Command::new(require("nbdcopy"))
            .arg(&raw)
            .arg(&served.urls[0]),
    );
    run_ok(
        Command::new("kill")
            .arg("-TERM")
            .arg(served.child.id().to_string()),
    );
    let status = served.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", served.log());
    super::qcow2_rw::verify(&dir, &target, &read_raw(&raw), "unflushed");
}

/// `nbdcopy --connections 4 --flush SRC URL` into the one export `vmnest serve ARGS` serves.
fn nbdcopy_into_export(dir: &Path, src: &Path, args: &[&str]) {
    let served = Served::start(dir, args, 1);
    run_ok(
        Command::new(require("nbdcopy"))
            .args(["--connections", "4", "--flush"])
            .arg(src)
            .arg(&served.urls[0]),
    );
}

/// `nbdsh` runs Debian's python3 (which has the `nbd` module), whatever python3 comes first in
/// PATH.
fn nbdsh(script: &str) -> String {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run_ok(
        Command::new(require("nbdsh"))
            .env("PATH", path)
            .args(["-c", script]),
    )
}

#[test]
fn simple_replies_serve_clients_without_structured_replies() {
    let dir = scratch("nbd-simple");
    let (raw, qcow2, _) = pattern_images(&dir);
    let served = Served::start(&dir, &[s(&qcow2)], 1);
    let script = format!(
        r#"
import hashlib
h.set_request_structured_replies(False)
h.set_strict_mode(0)
h.connect_uri("{url}")
assert not h.get_structured_replies_negotiated()
assert not h.can_meta_context("base:allocation")
size = h.get_size()
digest = hashlib.sha256()
off = 0
while off < size:
    n = min(1 << 20, size - off)
    digest.update(h.pread(n, off))
    off += n
try:
    h.pread(4096, size - 512)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert "EINVAL" in str(e), e
assert len(h.pread(512, 0)) == 512
print(digest.hexdigest())
"#,
        url = served.urls[0]
    );
    let out = nbdsh(&script);
    let want = {
        use std::process::Command as C;
        let o = run_ok(C::new("sha256sum").arg(&raw));
        o.split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(out.trim(), want);
}

// ---------------------------------------------------------------------------------------------
// A hand-written client that breaks the rules
// ---------------------------------------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads the greeting and sends the client flags (fixed newstyle, no zeroes).
fn greet(stream: &mut TcpStream) {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
}

fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut msg = IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    stream.write_all(&msg).unwrap();
}

/// Reads one option reply: (option, reply type, data).
fn option_reply(stream: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h).expect("option reply");
    assert_eq!(
        u64::from_be_bytes(h[..8].try_into().unwrap()),
        0x0003_e889_0455_65a9
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    stream.read_exact(&mut data).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        data,
    )
}

/// Handshake with GO on the default export; returns the export size.
fn go(stream: &mut TcpStream, structured: bool) -> u64 {
    greet(stream);
    if structured {
        send_option(stream, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(option_reply(stream).1, 1);
    }
    send_option(stream, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    let mut size = None;
    loop {
        let (opt, kind, data) = option_reply(stream);
        assert_eq!(opt, OPT_GO);
        match kind {
            3 if data[..2] == [0, 0] => {
                size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
            }
            3 => {}
            1 => break,
            other => panic!("GO failed with reply {other:#x}"),
        }
    }
    size.expect("NBD_INFO_EXPORT")
}

fn request(stream: &mut TcpStream, kind: u16, handle: u64, offset: u64, len: u32) {
    let mut msg = 0x2560_9513u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&0u16.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&handle.to_be_bytes());
    msg.extend_from_slice(&offset.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&msg).unwrap();
}

/// Reads a simple reply header: (error, handle).
fn simple_reply(stream: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    stream.read_exact(&mut h).expect("simple reply");
    assert_eq!(&h[..4], &0x6744_6698u32.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// True when the server closes the connection (EOF or reset) within the read timeout.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn misbehaving_clients_get_errors_or_disconnect_while_others_keep_working() {
    let dir = scratch("nbd-misbehaving");
    let (raw, qcow2, _) = pattern_images(&dir);
    let served = Served::start(&dir, &[s(&qcow2)], 1);
    let addr = served.addr();

    // A client that connects and never speaks stays open while others are served.
    let mut idle = connect(&addr);
    let mut greeting = [0u8; 18];
    idle.read_exact(&mut greeting).unwrap();

    // A good connection, opened before the trouble and used after it.
    let mut good = connect(&addr);
    let size = go(&mut good, false);

    // Garbage instead of the client flags and options.
    let mut garbage = connect(&addr);
    let mut junk = vec![0u8; 4096];
    pattern_bytes(&mut junk, 0, 3);
    garbage.write_all(&junk).unwrap();
    assert!(
        closed_by_server(&mut garbage),
        "garbage must end the connection"
    );

    // An option announcing 4 GiB of data: disconnected, nothing allocated.
    let mut huge_option = connect(&addr);
    greet(&mut huge_option);
    let mut msg = IHAVEOPT.to_be_bytes().to_vec();
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    huge_option.write_all(&msg).unwrap();
    assert!(closed_by_server(&mut huge_option));

    // An unknown option is refused with ERR_UNSUP, a malformed GO with ERR_INVALID, an unknown
    // export with ERR_UNKNOWN; the connection goes on and enters transmission.
    let mut picky = connect(&addr);
    greet(&mut picky);
    send_option(&mut picky, 0x4242, b"what is this");
    assert_eq!(
        option_reply(&mut picky),
        (
            0x4242,
            (1 << 31) + 1,
            option_reply_text("option 16962 is not supported")
        )
    );
    send_option(&mut picky, OPT_GO, &[0, 0, 1, 0, b'x']);
    assert_eq!(option_reply(&mut picky).1, (1 << 31) + 3);
    send_option(
        &mut picky,
        OPT_GO,
        &[0, 0, 0, 4, b'n', b'o', b'p', b'e', 0, 0],
    );
    assert_eq!(option_reply(&mut picky).1, (1 << 31) + 6);
    send_option(&mut picky, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    while option_reply(&mut picky).1 != 1 {}

    // Reads past the end, overflowing, and over the 32 MiB cap get EINVAL; the connection goes on.
    request(&mut picky, 0, 1, size - 100, 4096);
    assert_eq!(simple_reply(&mut picky), (22, 1));
    request(&mut picky, 0, 2, u64::MAX - 10, 4096);
    assert_eq!(simple_reply(&mut picky), (22, 2));
    request(&mut picky, 0, 3, 0, u32::MAX);
    assert_eq!(simple_reply(&mut picky), (22, 3));
    // An unknown command: EINVAL. A write to the read-only export: EPERM.
    request(&mut picky, 99, 4, 0, 0);
    assert_eq!(simple_reply(&mut picky), (22, 4));
    request(&mut picky, 1, 5, 0, 4);
    picky.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(simple_reply(&mut picky), (1, 5));
    // BLOCK_STATUS without a negotiated context: EINVAL.
    request(&mut picky, 7, 6, 0, 4096);
    assert_eq!(simple_reply(&mut picky), (22, 6));
    // A read that is fine still works.
    request(&mut picky, 0, 7, 0, 512);
    assert_eq!(simple_reply(&mut picky), (0, 7));
    let mut data = [0u8; 512];
    picky.read_exact(&mut data).unwrap();
    assert_eq!(&data[..], &read_raw(&raw)[..512]);
    // A WRITE announcing a payload over the cap: disconnected (its payload cannot be skipped).
    request(&mut picky, 1, 8, 0, 1 << 30);
    assert!(closed_by_server(&mut picky));

    // A request with a wrong magic after a good handshake: disconnected.
    let mut bad_magic = connect(&addr);
    go(&mut bad_magic, true);
    bad_magic.write_all(&[0xffu8; 28]).unwrap();
    assert!(closed_by_server(&mut bad_magic));

    // The good connection, and new ones, still work.
    request(&mut good, 0, 9, 4096, 4096);
    assert_eq!(simple_reply(&mut good), (0, 9));
    let mut data = vec![0u8; 4096];
    good.read_exact(&mut data).unwrap();
    assert_eq!(data, read_raw(&raw)[4096..8192]);
    same_raw(&raw, &served.urls[0]);
    drop(idle);

    // Each broken connection was logged by number with what was wrong.
    let log = served.log_when(|l| {
        l.contains("handshake failed")
            && l.contains("exceeds the 33554432-byte cap; closing")
            && l.contains("is not NBD_REQUEST_MAGIC")
    });
    assert!(log.contains("handshake failed"), "{log}");
    assert!(
        log.contains("exceeds the 33554432-byte cap; closing"),
        "{log}"
    );
    assert!(log.contains("is not NBD_REQUEST_MAGIC"), "{log}");
}

fn option_reply_text(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

#[test]
fn serve_refuses_remote_listening_without_allow_remote_and_rw_on_vmdk() {
    let dir = scratch("nbd-refusals");
    let (_, qcow2, vmdk) = pattern_images(&dir);
    let out = run(vmnest().args(["serve", "--listen", "0.0.0.0:0", s(&qcow2)]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--allow-remote"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vmdk_bytes = std::fs::read(&vmdk).unwrap();
    let out = run(vmnest().args(["serve", "--rw", s(&vmdk)]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vmdk images cannot be served writable"),
        "{err}"
    );
    assert_eq!(std::fs::read(&vmdk).unwrap(), vmdk_bytes);
    let out = run(vmnest().args(["serve", s(&qcow2), s(&qcow2)]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--export-name"));
}

#[test]
fn sigterm_and_sigint_stop_the_server_cleanly() {
    let dir = scratch("nbd-signals");
    let (_, qcow2, _) = pattern_images(&dir);
    for signal in ["-TERM", "-INT"] {
        let socket = dir.join("stop.sock");
        let mut child = vmnest()
            .args(["serve", "--socket", s(&socket), s(&qcow2)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("serving nbd+unix:///"), "{line}");
        // A connected client does not keep the server from stopping.
        let _client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        run_ok(Command::new("kill").arg(signal).arg(child.id().to_string()));
        let mut status = None;
        for _ in 0..100 {
            status = child.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let Some(status) = status else {
            let _ = child.kill();
            panic!("vmnest serve did not stop on SIG{signal}");
        };
        assert_eq!(status.code(), Some(0), "{signal}");
        assert!(!socket.exists(), "the socket file is removed on {signal}");
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1 made with openssl, in `dir/pki`; the CA
/// alone is copied to `dir/ca` (the folder qemu and libnbd read `ca-cert.pem` from).
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let pki = dir.join("pki");
    let ca_dir = dir.join("ca");
    std::fs::create_dir_all(&pki).unwrap();
    std::fs::create_dir_all(&ca_dir).unwrap();
    let openssl = require("openssl");
    let at = |name: &str| pki.join(name).to_str().unwrap().to_string();
    run_ok(Command::new(&openssl).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=vmnest test CA",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &at("ca-key.pem"),
        "-out",
        &at("ca-cert.pem"),
    ]));
    run_ok(Command::new(&openssl).args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &at("server-key.pem"),
        "-out",
        &at("server.csr"),
    ]));
    std::fs::write(
        pki.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(Command::new(&openssl).args([
        "x509",
        "-req",
        "-days",
        "2",
        "-in",
        &at("server.csr"),
        "-CA",
        &at("ca-cert.pem"),
        "-CAkey",
        &at("ca-key.pem"),
        "-CAcreateserial",
        "-extfile",
        &at("ext.cnf"),
        "-out",
        &at("server-cert.pem"),
    ]));
    std::fs::copy(pki.join("ca-cert.pem"), ca_dir.join("ca-cert.pem")).unwrap();
    (
        pki.join("server-cert.pem"),
        pki.join("server-key.pem"),
        ca_dir,
    )
}

#[test]
fn tls_exports_serve_clients_that_upgrade_and_refuse_the_others() {
    let dir = scratch("nbd-tls");
    let (raw, qcow2, _) = pattern_images(&dir);
    let (cert, key) = {
        let (c, k, _) = make_pki(&dir);
        (c, k)
    };
    let ca = dir.join("ca");
    let served = Served::start(
        &dir,
        &["--tls-cert", s(&cert), "--tls-key", s(&key), s(&qcow2)],
        1,
    );
    let url = &served.urls[0];
    assert!(url.starts_with("nbds://127.0.0.1:"), "{url}");
    let port = served.addr().rsplit(':').next().unwrap().to_string();

    // qemu, verifying the server against the CA.
    let out = dir.join("copy.raw");
    qemu_img(&[
        "convert",
        "--object",
        &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", s(&ca)),
        "--image-opts",
        &format!("driver=nbd,host=127.0.0.1,port={port},export=pattern.qcow2,tls-creds=tls0"),
        "-O",
        "raw",
        s(&out),
    ]);
    assert_eq!(hash_file(&out), hash_file(&raw));

    // libnbd: nbdinfo says TLS, nbdcopy copies over two encrypted connections.
    let tls_url = format!("{url}?tls-certificates={}", s(&ca));
    let info = run_ok(Command::new(require("nbdinfo")).arg(&tls_url));
    assert!(info.contains("with TLS"), "{info}");
    let out2 = dir.join("copy2.raw");
    run_ok(
        Command::new(require("nbdcopy"))
            .args(["--connections", "2"])
            .arg(&tls_url)
            .arg(&out2),
    );
    assert_eq!(hash_file(&out2), hash_file(&raw));

    plain_clients_are_refused(&served.addr());
}

/// Without TLS, a client of a TLS server at `addr` is refused (ERR_TLS_REQD) and sees no data:
/// nbdinfo fails, GO gets the error, and EXPORT_NAME (which cannot be refused politely) ends
/// the connection.
fn plain_clients_are_refused(addr: &str) {
    let refused = run(Command::new(require("nbdinfo")).arg(format!("nbd://{addr}/pattern.qcow2")));
    assert!(!refused.status.success());
    let mut client = connect(addr);
    greet(&mut client);
    send_option(&mut client, OPT_GO, &[0, 0, 0, 0, 0, 0]);
    let (_, kind, _) = option_reply(&mut client);
    assert_eq!(kind, (1 << 31) + 5, "NBD_REP_ERR_TLS_REQD");
    send_option(&mut client, 1, b"pattern.qcow2");
    assert!(closed_by_server(&mut client));
}

/// A key file in qemu's `keys.psk` format in a folder of its own (what `tls-creds-psk,dir=`
/// names): identities `qemu` and `alice`, keys made from `seed`. Returns the folder, the file,
/// and the hex of qemu's key.
fn psk_creds(dir: &Path, name: &str, seed: u8) -> (PathBuf, PathBuf, String) {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let hex = |salt: u8| -> String {
        (0..32u8)
            .map(|i| format!("{:02x}", i.wrapping_mul(37) ^ seed ^ salt))
            .collect()
    };
    let qemu_key = hex(0);
    let file = folder.join("keys.psk");
    std::fs::write(&file, format!("qemu:{qemu_key}\nalice:{}\n", hex(0x5a))).unwrap();
    (folder, file, qemu_key)
}

/// qemu-img's image options for export `export` at 127.0.0.1:`port` over TLS object `tls0`.
fn nbd_tls_opts(port: &str, export: &str) -> String {
    format!("driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0")
}

/// qemu's PSK client credentials `tls0` from `folder`/keys.psk, as `user` (qemu's default: `qemu`).
fn psk_client(folder: &Path, user: Option<&str>) -> String {
    let mut object = format!("tls-creds-psk,id=tls0,endpoint=client,dir={}", s(folder));
    if let Some(user) = user {
        object.push_str(&format!(",username={user}"));
    }
    object
}

/// `qemu-img ARGS --object OBJECT --image-opts IMAGES...`, whatever its exit status.
fn qemu_img_tls(args: &[&str], object: &str, images: &[&str]) -> std::process::Output {
    run(Command::new(require("qemu-img"))
        .args(args)
        .args(["--object", object, "--image-opts"])
        .args(images))
}

/// [`qemu_img_tls`], asserting success; returns stdout.
fn qemu_img_tls_ok(args: &[&str], object: &str, images: &[&str]) -> String {
    let out = qemu_img_tls(args, object, images);
    assert!(
        out.status.success(),
        "qemu-img {args:?} {images:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn psk_exports_serve_qemu_and_libnbd_and_refuse_wrong_keys_and_plain_clients() {
    let dir = scratch("nbd-psk");
    let (raw, qcow2, _) = pattern_images(&dir);
    let (creds, keys, qemu_key) = psk_creds(&dir, "creds", 0);
    let (wrong_creds, wrong_keys, _) = psk_creds(&dir, "wrong", 0x80);
    let served = Served::start(&dir, &["--tls-psk", s(&keys), s(&qcow2)], 1);
    let url = &served.urls[0];
    assert!(url.starts_with("nbds://127.0.0.1:"), "{url}");
    let addr = served.addr();
    let port = addr.rsplit(':').next().unwrap().to_string();
    let opts = nbd_tls_opts(&port, "pattern.qcow2");
    let good = psk_client(&creds, None);

    // qemu: info and compare through tls-creds-psk (identity "qemu", qemu's default).
    let info = qemu_img_tls_ok(&["info", "--output=json"], &good, &[&opts]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let size = std::fs::metadata(&raw).unwrap().len();
    assert_eq!(info["virtual-size"].as_u64(), Some(size), "{info}");
    let raw_opts = format!("driver=raw,file.driver=file,file.filename={}", s(&raw));
    qemu_img_tls_ok(&["compare"], &good, &[&raw_opts, &opts]);
    // qemu held to TLS 1.2 by its GnuTLS priority (as older clients are) connects too; TLS 1.1
    // is refused, which shows the priority is obeyed.
    let held_to = |version: &str| {
        format!("{good},priority=NORMAL:-VERS-TLS-ALL:+VERS-TLS{version}:+ECDHE-PSK:+PSK")
    };
    qemu_img_tls_ok(&["compare"], &held_to("1.2"), &[&raw_opts, &opts]);
    let old = qemu_img_tls(&["info"], &held_to("1.1"), &[&opts]);
    assert!(!old.status.success());

    let psk_url = |user: &str, file: &Path| {
        format!(
            "nbds://{user}@{addr}/pattern.qcow2?tls-psk-file={}",
            s(file)
        )
    };
    // libnbd: the identity is the URI's user name. nbdcopy copies into a pipe that is not read
    // until the bad clients below are done, so its connection stays open (and blocked) meanwhile.
    let info = run_ok(Command::new(require("nbdinfo")).arg(psk_url("qemu", &keys)));
    assert!(info.contains("with TLS"), "{info}");
    let mut copying = Command::new(require("nbdcopy"))
        .arg(psk_url("alice", &keys))
        .arg("-")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut copied = Vec::new();
    let mut pipe = copying.stdout.take().unwrap();
    let mut first = vec![0u8; 4096];
    pipe.read_exact(&mut first).unwrap();
    copied.extend_from_slice(&first);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        copying.try_wait().unwrap().is_none(),
        "nbdcopy did not wait for the pipe"
    );

    // A wrong key, an unknown identity, no TLS at all: each refused.
    let wrong = qemu_img_tls(&["info"], &psk_client(&wrong_creds, None), &[&opts]);
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");
    let wrong = run(Command::new(require("nbdinfo")).arg(psk_url("qemu", &wrong_keys)));
    assert!(!wrong.status.success());
    // (libnbd does not send an identity missing from its own file: qemu does.)
    let mallory = dir.join("mallory");
    std::fs::create_dir_all(&mallory).unwrap();
    std::fs::write(mallory.join("keys.psk"), format!("mallory:{qemu_key}\n")).unwrap();
    let unknown = qemu_img_tls(&["info"], &psk_client(&mallory, Some("mallory")), &[&opts]);
    assert!(!unknown.status.success());
    plain_clients_are_refused(&addr);

    // The good client was not disturbed, and new ones still connect.
    pipe.read_to_end(&mut copied).unwrap();
    let done = copying.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        copied == std::fs::read(&raw).unwrap(),
        "nbdcopy's bytes differ"
    );
    qemu_img_tls_ok(&["compare"], &good, &[&raw_opts, &opts]);

    // The log names the refused identity and the connection, never a key.
    let log = served.log_when(|l| {
        l.contains("unknown PSK identity \"mallory\"") && l.contains("the client's key differs")
    });
    assert!(
        log.lines().any(|l| l.starts_with("vmnest nbd: connection ")
            && l.contains("unknown PSK identity \"mallory\"")),
        "{log}"
    );
    assert!(
        log.contains("PSK identity \"qemu\": the client's key differs"),
        "{log}"
    );
    assert!(log.contains("unsupported protocol"), "{log}");
    let wrong_key = std::fs::read_to_string(&wrong_keys).unwrap();
    for key in wrong_key.lines().chain([qemu_key.as_str()]) {
        let hex = key.rsplit(':').next().unwrap();
        assert!(!log.contains(&hex[..16]), "{log}");
    }
}

#[test]
fn psk_users_restrict_the_identities_and_bad_key_files_are_refused_by_line() {
    let dir = scratch("nbd-psk-user");
    let (_, qcow2, _) = pattern_images(&dir);
    let (creds, keys, _) = psk_creds(&dir, "creds", 7);
    let served = Served::start(
        &dir,
        &["--tls-psk", s(&keys), "--tls-psk-user", "alice", s(&qcow2)],
        1,
    );
    let port = served.addr().rsplit(':').next().unwrap().to_string();
    let opts = nbd_tls_opts(&port, "pattern.qcow2");
    qemu_img_tls_ok(&["info"], &psk_client(&creds, Some("alice")), &[&opts]);
    // qemu's key is right, but the server was told to accept alice only.
    let refused = qemu_img_tls(&["info"], &psk_client(&creds, Some("qemu")), &[&opts]);
    assert!(!refused.status.success());
    let log = served.log_when(|l| l.contains("unknown PSK identity \"qemu\""));
    assert!(log.contains("unknown PSK identity \"qemu\""), "{log}");
    drop(served);

    let serve = |args: &[&str]| {
        let out = run(vmnest()
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .arg(&qcow2));
        assert!(!out.status.success(), "serve {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = serve(&["--tls-psk", s(&keys), "--tls-psk-user", "carol"]);
    assert!(e.contains("no key for identity \"carol\""), "{e}");
    let (cert, key, _) = make_pki(&dir);
    let e = serve(&[
        "--tls-psk",
        s(&keys),
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = serve(&["--tls-psk-user", "alice"]);
    assert!(e.contains("--tls-psk"), "{e}");
    let bad = dir.join("bad.psk");
    let secret = "0123456789abcdef0123456789abcdeX";
    std::fs::write(
        &bad,
        format!("qemu:{}\r\nalice:{secret}\r\n", "ab".repeat(16)),
    )
    .unwrap();
    let e = serve(&["--tls-psk", s(&bad)]);
    assert!(
        e.contains(&format!("{}: line 2: the key is not hexadecimal", s(&bad))),
        "{e}"
    );
    assert!(!e.contains("0123456789") && !e.contains("alice"), "{e}");
}

#[test]
fn pipelined_requests_get_one_reply_each_with_the_right_data() {
    let dir = scratch("nbd-pipelined");
    let disk = dir.join("disk.raw");
    write_pattern_raw(&disk, 16 << 20, 9);
    let before = read_raw(&disk);
    let served = Served::start(&dir, &["--rw", "-f", "raw", s(&disk)], 1);
    let mut client = connect(&served.addr());
    go(&mut client, false);

    // Sent back to back without waiting: small reads (batched by the server), small writes
    // (with their payloads), large reads (run alone), and an invalid request in the middle.
    let mut expected: std::collections::HashMap<u64, (u32, Option<Vec<u8>>)> =
        std::collections::HashMap::new();
    let mut msg = Vec::new();
    let push = |msg: &mut Vec<u8>, kind: u16, handle: u64, offset: u64, len: u32| {
        msg.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
    };
    let mut handle = 100u64;
    for i in 0..40u64 {
        handle += 1;
        match i % 5 {
            0 | 1 => {
                let off = i * 12_345;
                push(&mut msg, 0, handle, off, 4096);
                expected.insert(
                    handle,
                    (0, Some(before[off as usize..off as usize + 4096].to_vec())),
                );
            }
            2 => {
                // Writes go past 8 MiB, reads stay below: no request depends on another.
                let off = (8 << 20) + i * 8192;
                push(&mut msg, 1, handle, off, 512);
                msg.extend_from_slice(&[i as u8; 512]);
                expected.insert(handle, (0, None));
            }
            3 => {
                let off = i * 65_536;
                push(&mut msg, 0, handle, off, 1 << 20);
                expected.insert(
                    handle,
                    (
                        0,
                        Some(before[off as usize..off as usize + (1 << 20)].to_vec()),
                    ),
                );
            }
            _ => {
                push(&mut msg, 0, handle, 16 << 20, 4096);
                expected.insert(handle, (22, None));
            }
        }
    }
    client.write_all(&msg).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..expected.len() {
        let (error, h) = simple_reply(&mut client);
        let (want_error, data) = expected
            .get(&h)
            .unwrap_or_else(|| panic!("unknown handle {h}"));
        assert!(seen.insert(h), "two replies for handle {h}");
        assert_eq!(error, *want_error, "handle {h}");
        if let (0, Some(want)) = (error, data) {
            let mut got = vec![0u8; want.len()];
            client.read_exact(&mut got).unwrap();
            assert!(got == *want, "data of handle {h}");
        }
    }
    request(&mut client, 2, 0, 0, 0); // DISC
    assert!(closed_by_server(&mut client));
    drop(served);
    let after = read_raw(&disk);
    for i in (0..40u64).filter(|i| i % 5 == 2) {
        let off = ((8 << 20) + i * 8192) as usize;
        assert!(
            after[off..off + 512].iter().all(|&b| b == i as u8),
            "write {i}"
        );
    }
}

#[test]
fn a_stored_snapshot_is_served_like_a_file() {
    let dir = scratch("nbd-store");
    let (raw, qcow2, _) = pattern_images(&dir);
    let store = dir.join("store");
    vmnest_tests::run_ok(
        vmnest()
            .arg("--store")
            .arg(&store)
            .arg("import")
            .arg(&qcow2)
            .arg("gold"),
    );
    vmnest_tests::run_ok(
        vmnest()
            .arg("--store")
            .arg(&store)
            .args(["clone", "gold", "web"]),
    );
    let served = Served::start(
        &dir,
        &["--store", s(&store), "store:web", "store:gold@~0"],
        2,
    );
    assert!(served.urls[0].ends_with("/store:web"), "{:?}", served.urls);
    for url in &served.urls {
        qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&raw), url]);
    }
    // base:allocation agrees with vmnest map of the same snapshot.
    let map = std::process::Command::new(vmnest_tests::require("nbdinfo"))
        .args(["--map", &served.urls[0]])
        .output()
        .unwrap();
    assert!(map.status.success(), "{}", served.log());
    let text = String::from_utf8_lossy(&map.stdout);
    assert!(text.contains("data") && text.contains("hole"), "{text}");
}
