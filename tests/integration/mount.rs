//! `vmnest mount` / `vmnest umount` over FUSE (runs as root, with /dev/fuse): disks and
//! partitions as files, checked against the source bytes, the kernel's own ext4 driver through
//! `mount -o loop`, `debugfs`, and `fusermount3`.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vmnest_tests::{pattern_bytes, qemu_img, require, run, run_ok, same_raw, scratch, vmnest};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// An ext4 file system image of `size` bytes holding `hello.txt` with `text`.
fn ext4_image(dir: &Path, name: &str, size: u64, text: &str) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("hello.txt"), text).unwrap();
    let image = dir.join(format!("{name}.ext4"));
    File::create(&image).unwrap().set_len(size).unwrap();
    run_ok(Command::new(require("mkfs.ext4")).args(["-q", "-F", "-d", s(&root), s(&image)]));
    image
}

/// A sparse raw disk of `size` bytes partitioned by the sfdisk `script`, with each
/// `(byte offset, image)` copied into place.
fn partitioned_disk(path: &Path, size: u64, script: &str, contents: &[(u64, &Path)]) {
    File::create(path).unwrap().set_len(size).unwrap();
    let mut sfdisk = Command::new(require("sfdisk"))
        .args(["-q", s(path)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk {script}");
    let mut disk = File::options().write(true).open(path).unwrap();
    for (offset, image) in contents {
        disk.seek(SeekFrom::Start(*offset)).unwrap();
        std::io::copy(&mut File::open(image).unwrap(), &mut disk).unwrap();
    }
}

/// `len` bytes of `path` at `offset`.
fn range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// The MBR test disk: partition 1 (ext4, 24 MiB at 1 MiB), an extended partition, and logical
/// partition 5 (ext4, 8 MiB at 32 MiB).
fn mbr_disk(dir: &Path, text: &str) -> PathBuf {
    let p1 = ext4_image(dir, "p1", 24 * MIB, text);
    let p5 = ext4_image(dir, "p5", 8 * MIB, "logical\n");
    let raw = dir.join("mbr.raw");
    partitioned_disk(
        &raw,
        48 * MIB,
        "label: dos\n\
         start=2048, size=49152, type=83\n\
         start=61440, type=5\n\
         start=65536, size=16384, type=83\n",
        &[(MIB, &p1), (32 * MIB, &p5)],
    );
    raw
}

/// A `vmnest mount` that is unmounted (if still mounted) when dropped.
struct Mounted {
    point: PathBuf,
    stdout: String,
    stderr: String,
}

impl Mounted {
    fn new(dir: &Path, args: &[&str]) -> Mounted {
        Mounted::by(vmnest(), dir, args)
    }

    /// Mounts with `cmd` (a `vmnest` command with its environment) and `args`.
    fn by(mut cmd: Command, dir: &Path, args: &[&str]) -> Mounted {
        let point = dir.join("mnt");
        std::fs::create_dir_all(&point).unwrap();
        let out = run(cmd.args(args).arg(&point));
        assert!(
            out.status.success(),
            "vmnest mount {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted {
            point,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.point.join(name)
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.point)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn umount(&self) -> String {
        run_ok(vmnest().arg("umount").arg(&self.point))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.point) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.point)
                .status();
        }
    }
}

/// The disk and partition files of a mount of [`mbr_disk`] read as the source.
fn reads_like_mbr_disk(m: &Mounted, raw: &Path) {
    assert_eq!(
        std::fs::read(m.file("disk")).unwrap(),
        std::fs::read(raw).unwrap()
    );
    assert_eq!(
        std::fs::read(m.file("disk-part1")).unwrap(),
        range(raw, MIB, 24 * MIB)
    );
    assert_eq!(
        std::fs::read(m.file("disk-part5")).unwrap(),
        range(raw, 32 * MIB, 8 * MIB)
    );
}

/// The options `/proc/self/mounts` lists for the mount at `point`.
fn mount_options(point: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = point.canonicalize().unwrap();
    mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(s(&want)))
        .and_then(|l| l.split(' ').nth(3))
        .unwrap_or_default()
        .to_string()
}

fn is_mounted(point: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let want = point.canonicalize().unwrap_or_else(|_| point.to_path_buf());
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(s(&want)))
}

/// A kernel `mount -o loop` of a file, unmounted when dropped.
struct LoopMount(PathBuf);

impl LoopMount {
    fn new(file: &Path, at: &Path, options: &str) -> LoopMount {
        std::fs::create_dir_all(at).unwrap();
        run_ok(Command::new(require("mount")).args(["-o", options, s(file), s(at)]));
        LoopMount(at.to_path_buf())
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `debugfs -R 'cat PATH'` on a file system image.
fn debugfs_cat(image: &Path, path: &str) -> String {
    run_ok(Command::new(require("debugfs")).args(["-R", &format!("cat {path}"), s(image)]))
}

#[test]
fn an_mbr_qcow2_shows_its_partitions_as_files_that_read_like_the_source() {
    let dir = scratch("mount-mbr");
    let raw = mbr_disk(&dir, "hello from p1\n");
    let qcow2 = dir.join("mbr.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    let m = Mounted::new(&dir, &["mount", s(&qcow2)]);
    assert_eq!(m.names(), ["disk", "disk-part1", "disk-part5"]);
    assert!(
        m.stdout.contains("disk-part5  8 MiB  mbr partition 5"),
        "{}",
        m.stdout
    );
    reads_like_mbr_disk(&m, &raw);
    // qemu-img reads the partition file as the same bytes as the source range.
    let part1 = dir.join("part1.raw");
    std::fs::write(&part1, range(&raw, MIB, 24 * MIB)).unwrap();
    same_raw(&part1, s(&m.file("disk-part1")));
    {
        let lo = LoopMount::new(&m.file("disk-part1"), &dir.join("lo"), "loop,ro");
        assert_eq!(
            std::fs::read_to_string(lo.0.join("hello.txt")).unwrap(),
            "hello from p1\n"
        );
    }
    // Read-only: opening for writing fails with EROFS.
    let err = File::options()
        .write(true)
        .open(m.file("disk-part1"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let out = m.umount();
    assert!(out.contains("unmounted"), "{out}");
    assert!(!is_mounted(&m.point));
}

#[test]
fn a_gpt_qcow2_numbers_partitions_by_entry() {
    let dir = scratch("mount-gpt");
    let p1 = ext4_image(&dir, "esp", 4 * MIB, "first\n");
    let p2 = ext4_image(&dir, "root", 16 * MIB, "hello from gpt\n");
    let raw = dir.join("gpt.raw");
    partitioned_disk(
        &raw,
        32 * MIB,
        "label: gpt\n\
         start=2048, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=10240, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n",
        &[(MIB, &p1), (5 * MIB, &p2)],
    );
    let qcow2 = dir.join("gpt.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&qcow2)]);
    let m = Mounted::new(&dir, &["mount", s(&qcow2)]);
    assert_eq!(m.names(), ["disk", "disk-part1", "disk-part2"]);
    assert!(
        m.stdout
            .contains("gpt partition 2, type 0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        "{}",
        m.stdout
    );
    assert_eq!(
        std::fs::read(m.file("disk-part2")).unwrap(),
        range(&raw, 5 * MIB, 16 * MIB)
    );
    {
        let lo = LoopMount::new(&m.file("disk-part2"), &dir.join("lo"), "loop,ro");
        assert_eq!(
            std::fs::read_to_string(lo.0.join("hello.txt")).unwrap(),
            "hello from gpt\n"
        );
    }
    // Unmounted by fusermount3 alone: the server still records how it ended.
    run_ok(Command::new(require("fusermount3")).arg("-u").arg(&m.point));
    let out = m.umount();
    assert!(out.contains("unmounted"), "{out}");
}

#[test]
fn a_corrupt_gpt_shows_the_disk_only_and_says_why() {
    let dir = scratch("mount-bad-gpt");
    let p1 = ext4_image(&dir, "p", 4 * MIB, "x\n");
    let raw = dir.join("bad.raw");
    partitioned_disk(
        &raw,
        8 * MIB,
        "label: gpt\nstart=2048, size=8192\n",
        &[(MIB, &p1)],
    );
    // Break the primary header and the backup header (their CRCs no longer match).
    let f = File::options().write(true).open(&raw).unwrap();
    f.write_all_at(&[0xff], 512 + 40).unwrap();
    f.write_all_at(&[0xff], 8 * MIB - 512 + 40).unwrap();
    let m = Mounted::new(
        &dir,
        &["mount", "--allow-other", "--format", "raw", s(&raw)],
    );
    assert!(mount_options(&m.point).contains("allow_other"));
    assert_eq!(m.names(), ["disk"]);
    assert!(
        m.stderr
            .contains("disk: partition table at offset 0x210: header CRC32"),
        "{}",
        m.stderr
    );
    m.umount();
}

#[test]
fn a_writable_raw_mount_takes_changes_through_a_loop_mount() {
    let dir = scratch("mount-rw");
    let raw = mbr_disk(&dir, "before\n");
    // Formats without an in-place writer are refused by name; raw must be named.
    let vmdk = dir.join("d.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&raw), s(&vmdk)]);
    std::fs::create_dir_all(dir.join("mnt")).unwrap();
    let out = run(vmnest().args(["mount", "--rw", s(&vmdk), s(&dir.join("mnt"))]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vmdk images cannot be mounted writable"),
        "{err}"
    );

    let m = Mounted::new(&dir, &["mount", "--rw", "--format", "raw", s(&raw)]);
    let meta = std::fs::metadata(m.file("disk-part1")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o644
    );
    let lo = LoopMount::new(&m.file("disk-part1"), &dir.join("lo"), "loop");
    std::fs::write(lo.0.join("hello.txt"), "after\n").unwrap();
    // Busy (the loop device holds it): vmnest umount fails and leaves it mounted.
    let busy = run(vmnest().arg("umount").arg(&m.point));
    assert!(!busy.status.success());
    assert!(is_mounted(&m.point));
    drop(lo);
    let out = m.umount();
    assert!(out.contains("flushed to"), "{out}");
    let part1 = dir.join("part1.ext4");
    std::fs::write(&part1, range(&raw, MIB, 24 * MIB)).unwrap();
    assert_eq!(debugfs_cat(&part1, "/hello.txt"), "after\n");
    // The logical partition was not touched.
    let part5 = dir.join("part5.ext4");
    std::fs::write(&part5, range(&raw, 32 * MIB, 8 * MIB)).unwrap();
    assert_eq!(debugfs_cat(&part5, "/hello.txt"), "logical\n");
}

#[test]
fn fusermount_alone_makes_a_foreground_server_flush_and_exit() {
    let dir = scratch("mount-fg");
    let raw = dir.join("plain.raw");
    File::create(&raw).unwrap().set_len(4 * MIB).unwrap();
    let point = dir.join("mnt");
    std::fs::create_dir_all(&point).unwrap();
    let server = vmnest()
        .args(["mount", "-f", "--rw", "--format", "raw", s(&raw), s(&point)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !point.join("disk").exists() {
        assert!(started.elapsed().as_secs() < 30, "mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let f = File::options()
        .write(true)
        .open(point.join("disk"))
        .unwrap();
    f.write_all_at(b"written through fuse", 3 * MIB).unwrap();
    // Writes past the end of the disk are refused; the size never changes.
    let err = f.write_all_at(b"x", 4 * MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(f.set_len(MIB).is_err());
    drop(f);
    run_ok(Command::new(require("fusermount3")).arg("-u").arg(&point));
    let out = server.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 writes (20 B) flushed"), "{stdout}");
    assert_eq!(range(&raw, 3 * MIB, 20), b"written through fuse");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 4 * MIB);
}

#[test]
fn a_stored_snapshot_mounts_read_only_with_its_partitions() {
    let dir = scratch("mount-store");
    let raw = mbr_disk(&dir, "stored\n");
    let store = dir.join("store");
    run_ok(
        vmnest()
            .arg("--store")
            .arg(&store)
            .arg("import")
            .arg(&raw)
            .arg("vm"),
    );
    let m = Mounted::new(&dir, &["--store", s(&store), "mount", "store:vm"]);
    assert_eq!(m.names(), ["disk", "disk-part1", "disk-part5"]);
    assert_eq!(
        std::fs::read(m.file("disk-part1")).unwrap(),
        range(&raw, MIB, 24 * MIB)
    );
    m.umount();

    // A bundle shows each disk member by name (the config member is no disk), and one member
    // alone is `disk`.
    let second = dir.join("second.raw");
    std::fs::write(&second, b"second disk").unwrap();
    File::options()
        .write(true)
        .open(&second)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let config = dir.join("vm.conf");
    std::fs::write(&config, "memory = 1G\n").unwrap();
    run_ok(vmnest().arg("--store").arg(&store).args([
        "import",
        "--vm",
        "bundle",
        "--disk",
        s(&raw),
        "--disk",
        s(&second),
        "--config",
        s(&config),
    ]));
    let m = Mounted::new(&dir, &["--store", s(&store), "mount", "store:bundle"]);
    assert_eq!(m.names(), ["disk0", "disk0-part1", "disk0-part5", "disk1"]);
    assert_eq!(
        std::fs::read(m.file("disk1")).unwrap(),
        std::fs::read(&second).unwrap()
    );
    m.umount();
    let m = Mounted::new(&dir, &["--store", s(&store), "mount", "store:bundle/disk1"]);
    assert_eq!(m.names(), ["disk"]);
    m.umount();
}

/// The pid the server of a mount recorded (first line of its `.lock` state file).
fn server_pid(point: &Path) -> i32 {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("vmnest"))
        .or_else(|| Some(PathBuf::from("/run/user/0/vmnest")).filter(|d| d.is_dir()))
        .unwrap_or_else(|| PathBuf::from("/tmp/vmnest-0"));
    let key = blake3::hash(s(&point.canonicalize().unwrap()).as_bytes()).to_hex();
    let text = std::fs::read_to_string(dir.join(format!("{}.lock", &key.as_str()[..32]))).unwrap();
    text.lines().next().unwrap().parse().unwrap()
}

#[test]
fn a_killed_server_keeps_what_fsync_acknowledged_and_umount_says_it_died() {
    let dir = scratch("mount-kill");
    let raw = dir.join("plain.raw");
    File::create(&raw).unwrap().set_len(4 * MIB).unwrap();
    let m = Mounted::new(&dir, &["mount", "--rw", "--format", "raw", s(&raw)]);
    let f = File::options().write(true).open(m.file("disk")).unwrap();
    f.write_all_at(b"durable", MIB).unwrap();
    f.sync_all().unwrap();
    let pid = server_pid(&m.point);
    // SAFETY: sending a signal to the server process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    drop(f);
    assert_eq!(range(&raw, MIB, 7), b"durable");
    // The dead mount is taken down, and umount says the server ended without reporting.
    let out = run(vmnest().arg("umount").arg(&m.point));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ended without reporting"), "{err}");
    assert!(!is_mounted(&m.point));
}

#[test]
fn sigterm_unmounts_and_the_outcome_is_kept_for_umount() {
    let dir = scratch("mount-term");
    let raw = dir.join("plain.raw");
    File::create(&raw).unwrap().set_len(4 * MIB).unwrap();
    let m = Mounted::new(&dir, &["mount", "--rw", "--format", "raw", s(&raw)]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(m.file("disk"))
        .unwrap()
        .write_all_at(b"term", 0)
        .unwrap();
    let pid = server_pid(&m.point);
    // SAFETY: sending a signal to the server process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = std::time::Instant::now();
    while is_mounted(&m.point) {
        assert!(
            started.elapsed().as_secs() < 30,
            "still mounted after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = m.umount();
    assert!(out.contains("1 writes (4 B) flushed"), "{out}");
    assert_eq!(range(&raw, 0, 4), b"term");
}

#[test]
fn a_source_that_cannot_be_opened_fails_the_mount_with_its_reason() {
    let dir = scratch("mount-missing");
    let point = dir.join("mnt");
    std::fs::create_dir_all(&point).unwrap();
    let out = run(vmnest().args(["mount", s(&dir.join("nope.qcow2")), s(&point)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nope.qcow2"), "{err}");
    assert!(!is_mounted(&point));
    // A snapshot that is not in the store.
    let store = dir.join("store");
    let out =
        run(vmnest()
            .arg("--store")
            .arg(&store)
            .args(["mount", "--rw", "store:vm", s(&point)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no store at"), "{err}");
    assert!(!is_mounted(&point));
}

plain_and_encrypted!(
    offline_patching_commits_a_new_snapshot_and_keeps_the_old_one,
    offline_patching_of_an_encrypted_store_commits_a_new_snapshot_and_keeps_the_old_one,
    offline_patching_in
);

/// The offline-patching workflow of issue 5: import an ext4 disk, mount it writable from the
/// store, change a file through a loop mount, unmount both, and read the new snapshot back with
/// debugfs, the old one unchanged.
fn offline_patching_in(encrypted: bool) {
    let dir = scratch(&format!("mount-patch-{encrypted}"));
    let raw = mbr_disk(&dir, "original\n");
    let store = dir.join("store");
    // The passphrase reaches the mount's background server through its environment.
    let vmn = || crate::store::st(&store);
    if encrypted {
        run_ok(vmn().args(["init", "--encrypt"]));
    }
    run_ok(vmn().arg("import").arg(&raw).arg("vm"));
    let m = Mounted::by(vmn(), &dir, &["mount", "--rw", "store:vm"]);
    assert_eq!(m.names(), ["disk", "disk-part1", "disk-part5"]);
    let mut blob = vec![0u8; 64 << 10];
    pattern_bytes(&mut blob, 0, 7);
    {
        let lo = LoopMount::new(&m.file("disk-part1"), &dir.join("lo"), "loop");
        std::fs::write(lo.0.join("hello.txt"), "patched offline\n").unwrap();
        std::fs::create_dir(lo.0.join("etc")).unwrap();
        std::fs::write(lo.0.join("etc/motd"), "new file\n").unwrap();
        std::fs::write(lo.0.join("blob.bin"), &blob).unwrap();
    }
    let out = m.umount();
    assert!(out.contains("committed vm@"), "{out}");
    // The blob does not compress: a plain store holds it as it is, an encrypted one nowhere.
    let held = crate::remote_crypt::files_under(&store).iter().any(|f| {
        std::fs::read(f)
            .unwrap()
            .windows(4096)
            .any(|w| w == &blob[..4096])
    });
    assert_eq!(
        held, !encrypted,
        "encrypted {encrypted}: the patched bytes in the store"
    );

    let new = dir.join("vm2.raw");
    run_ok(vmn().arg("export").arg("vm").arg(&new));
    let part1 = dir.join("new-part1.ext4");
    std::fs::write(&part1, range(&new, MIB, 24 * MIB)).unwrap();
    assert_eq!(debugfs_cat(&part1, "/hello.txt"), "patched offline\n");
    assert_eq!(debugfs_cat(&part1, "/etc/motd"), "new file\n");
    // The file system is clean (the loop mount was unmounted before the commit).
    run_ok(Command::new(require("e2fsck")).args(["-fn", s(&part1)]));

    // vm@~1 is the snapshot that was imported, byte for byte.
    let old = dir.join("vm1.raw");
    run_ok(vmn().arg("export").arg("vm@~1").arg(&old));
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&raw), s(&old)]);

    // A writable mount with no writes commits nothing.
    let m = Mounted::by(vmn(), &dir, &["mount", "--rw", "store:vm"]);
    let out = m.umount();
    assert!(out.contains("nothing written"), "{out}");
    let log = run_ok(vmn().args(["log", "vm"]));
    assert_eq!(
        log.lines().filter(|l| l.contains(" vm ")).count(),
        2,
        "{log}"
    );
}

/// `mount --from`: an MBR disk pushed to moto mounts on a store that holds none of it; the
/// disk and partition files read as the source; a damaged pack gives EIO for the reads that
/// need it and the source's bytes for all others.
#[test]
fn a_remote_snapshot_mounts_with_its_partitions_and_damage_is_eio() {
    use crate::remote::st;
    use vmnest_tests::s3::Moto;
    let dir = scratch("mount-from");
    let raw = mbr_disk(&dir, "from a remote\n");
    let moto = Moto::start();
    moto.bucket("vmnest-mnt");
    let ep = moto.endpoint();
    let src = dir.join("src");
    run_ok(st(&src, None).arg("import").arg(&raw).arg("vm"));
    run_ok(st(&src, Some(&ep)).args(["remote", "add", "r", "s3://vmnest-mnt/m"]));
    run_ok(st(&src, Some(&ep)).args(["push", "r"]));
    let empty = |name: &str| {
        let store = dir.join(name);
        run_ok(st(&store, Some(&ep)).args(["remote", "add", "r", "s3://vmnest-mnt/m"]));
        store
    };

    let dst = empty("dst");
    let point = dir.join("mnt");
    std::fs::create_dir_all(&point).unwrap();
    let out = run(st(&dst, Some(&ep)).args(["mount", "--from", "r", "--rw", "vm", s(&point)]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--rw with --from"));
    assert!(!is_mounted(&point));

    let m = Mounted::by(
        st(&dst, Some(&ep)),
        &dir,
        &["mount", "--from", "r", "--cache-size", "4M", "vm"],
    );
    assert_eq!(m.names(), ["disk", "disk-part1", "disk-part5"]);
    // An option of its own: "ro" is also inside "group_id=…", which every FUSE mount lists.
    let options = mount_options(&m.point);
    assert!(options.split(',').any(|o| o == "ro"), "{options}");
    reads_like_mbr_disk(&m, &raw);
    let out = m.umount();
    assert!(out.contains("unmounted"), "{out}");
    assert!(!is_mounted(&m.point));
    assert!(std::fs::read_dir(dst.join("packs")).map_or(0, |d| d.count()) == 0);

    // A flipped byte in the first frame of the largest pack, mounted from another empty store
    // (no cached frames): reads of the damaged frame fail with EIO, all others read true.
    let key = moto.largest("vmnest-mnt", "m/packs/");
    moto.flip_byte("vmnest-mnt", &key, 100);
    let dmg = empty("dmg");
    let m = Mounted::by(
        st(&dmg, Some(&ep)),
        &dir,
        &["mount", "--from", "r", "--cache-size", "0", "vm"],
    );
    let want = std::fs::read(&raw).unwrap();
    let disk = File::open(m.file("disk")).unwrap();
    let (mut bad, mut good) = (0, 0);
    for i in 0..48u64 {
        let mut buf = vec![0u8; MIB as usize];
        match disk.read_exact_at(&mut buf, i * MIB) {
            Ok(()) => {
                assert_eq!(
                    buf,
                    want[(i * MIB) as usize..((i + 1) * MIB) as usize],
                    "MiB {i}"
                );
                good += 1;
            }
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EIO), "MiB {i}: {e}");
                bad += 1;
            }
        }
    }
    drop(disk);
    assert!(bad > 0 && good > 0, "{bad} failed, {good} read");
    let out = run(vmnest().arg("umount").arg(&m.point));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&m.point), "{text}");
    // umount reports the server's I/O errors, naming the pack, and fails.
    assert_eq!(out.status.code(), Some(1), "{text}");
    let pack = key.rsplit('/').next().unwrap();
    assert!(
        text.contains("I/O errors") && text.contains(&pack[..16]),
        "{text}"
    );
    eprintln!("damaged pack: {bad} of 48 MiB failed with EIO; umount said: {text}");
}

/// `vmnest mount` of an encrypted store from a terminal: the background server has none, so the
/// parent asks for the passphrase and hands it over; a wrong one fails the mount and says so.
/// `script` (util-linux) gives the command a terminal, and the passphrase is typed into it.
#[test]
fn mounting_an_encrypted_store_asks_for_the_passphrase_on_the_terminal() {
    let dir = scratch("mount-prompt");
    let raw = mbr_disk(&dir, "secret\n");
    let store = dir.join("store");
    run_ok(crate::store::st(&store).args(["init", "--encrypt"]));
    run_ok(crate::store::st(&store).arg("import").arg(&raw).arg("vm"));
    let point = dir.join("mnt");
    std::fs::create_dir_all(&point).unwrap();
    let typed = |pass: &str, source: &str| {
        let cmd = format!(
            "{} --store {} mount {source} {}",
            vmnest().get_program().to_string_lossy(),
            s(&store),
            s(&point)
        );
        let mut child = Command::new(require("script"))
            .env_remove("VMNEST_PASSPHRASE")
            .env_remove("VMNEST_KEY_FILE")
            .env("VMNEST_ARGON2_MEMORY_KIB", "64")
            .env("VMNEST_ARGON2_ITERATIONS", "1")
            .args(["-qec", &cmd, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The prompt turns echo off before it reads; typing early is fine, the pty buffers it.
        std::thread::sleep(std::time::Duration::from_millis(500));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{pass}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = typed("not the passphrase", "store:vm");
    assert!(!ok, "{out}");
    assert!(out.contains("wrong passphrase"), "{out}");
    assert!(!is_mounted(&point));
    // Mounted: the disk reads as the source, and unmounts.
    let mounted_like_raw = |ok: bool, out: String, asked: &str| {
        assert!(ok, "{out}");
        assert!(out.contains(asked), "{out}");
        let m = Mounted {
            point: point.clone(),
            stdout: out,
            stderr: String::new(),
        };
        same_raw(&raw, s(&m.file("disk")));
        m.umount();
    };
    let (ok, out) = typed(crate::store::PASSPHRASE, "store:vm");
    mounted_like_raw(ok, out, "passphrase for store");

    // mount --from an encrypted remote: the passphrase asked for is the remote's.
    let remote = dir.join("remote");
    run_ok(crate::store::st(&store).args(["remote", "add", "d", s(&remote)]));
    run_ok(crate::store::st(&store).args(["push", "d"]));
    let (ok, out) = typed(crate::store::PASSPHRASE, "--from d vm");
    mounted_like_raw(ok, out, "passphrase for remote d");
}
