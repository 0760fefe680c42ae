//! Shared helpers of the integration tests: the `vmnest` binary, the peers (qemu-img, libyal's
//! readers), patterned test images, and `../shared/sample_images`.
//!
//! A peer that is missing makes the test fail with a message naming the package to install; it
//! never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use image_format::{BlockDevice, Image, OpenOptions};

pub mod s3;

/// The `target/<profile>` directory the test binary runs from.
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// A `Command` running the `vmnest` binary built alongside the tests (`cargo test --workspace`
/// builds it). Fails when the binary is older than the sources it is built from, so a test never
/// runs a stale binary.
pub fn vmnest() -> Command {
    let bin = target_profile_dir().join("vmnest");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} not built: run `cargo test --workspace`", bin.display()));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    for dir in [
        "cli/src",
        "image-format/src",
        "convert/src",
        "dedup-store/src",
        "fuse-mount/src",
    ] {
        if let Some(newer) = newest_file(&repo.join(dir)).filter(|(t, _)| *t > built) {
            panic!(
                "{} is older than {}: run `cargo test --workspace` (or `cargo build`)",
                bin.display(),
                newer.1.display()
            );
        }
    }
    Command::new(bin)
}

fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        // Unit-test modules (`tests.rs`) are not part of the binary: cargo does not relink it
        // when only they change.
        if path.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok()?.modified().ok().map(|t| (t, path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

/// Runs `cmd`, asserting it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns its output whatever the exit status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The path of a peer tool; fails the test (naming the Debian package) when it is missing.
pub fn require(tool: &str) -> PathBuf {
    let package = match tool {
        "qemu-img" | "qemu-nbd" | "qemu-io" => "qemu-utils",
        "vmdkinfo" => "libvmdk-utils",
        "vhdiinfo" => "libvhdi-utils",
        "qcowinfo" => "libqcow-utils",
        "bzip2" => "bzip2",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        other => other,
    };
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("peer tool {tool} is missing: install the Debian package {package} (see README.md)");
}

/// `qemu-img ARGS`, asserting success; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_ok(Command::new(require("qemu-img")).args(args))
}

/// A fresh, empty scratch directory for one test, under `target/test-scratch/`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = target_profile_dir().join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The `shared/sample_images` directory: `$VMNEST_SAMPLE_IMAGES`, or `../shared/sample_images`
/// beside the repository.
pub fn sample_images_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("VMNEST_SAMPLE_IMAGES") {
        return PathBuf::from(dir);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let dir = repo
        .parent()
        .expect("repo parent")
        .join("shared/sample_images");
    assert!(
        dir.is_dir(),
        "sample images not found at {} (set VMNEST_SAMPLE_IMAGES)",
        dir.display()
    );
    dir
}

/// A sample image by its path under `sample_images/` (for example `qemu-iotests/afl9.vmdk.bz2`).
/// A `.bz2` file is decompressed once into `target/sample-cache/` and that copy's path returned;
/// other files are copied there too, with their siblings, so tests never write into shared/.
pub fn sample(rel: &str) -> PathBuf {
    let src = sample_images_dir().join(rel);
    assert!(src.exists(), "sample image {} missing", src.display());
    let cache = target_profile_dir().join("sample-cache");
    let sub = Path::new(rel).parent().unwrap_or(Path::new(""));
    let dir = cache.join(sub);
    std::fs::create_dir_all(&dir).expect("sample cache dir");
    let name = src
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    if let Some(stem) = name.strip_suffix(".bz2") {
        let out = dir.join(stem);
        if !out.exists() {
            let tmp = dir.join(format!("{stem}.tmp{}-{}", std::process::id(), unique()));
            run_ok(
                Command::new(require("bzip2"))
                    .arg("-dc")
                    .arg(&src)
                    .stdout(std::fs::File::create(&tmp).expect("create")),
            );
            std::fs::rename(&tmp, &out).expect("rename");
        }
        out
    } else {
        let out = dir.join(&name);
        if !out.exists() {
            // Copied under a temporary name, then renamed: a test running alongside never sees a
            // half-copied sample.
            let tmp = dir.join(format!("{name}.tmp{}-{}", std::process::id(), unique()));
            std::fs::copy(&src, &tmp).expect("copy sample");
            std::fs::rename(&tmp, &out).expect("rename sample");
        }
        out
    }
}

/// A number no other call in this process gets (for temporary file names).
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Opens an image with the library, probing its format.
pub fn open(path: &Path) -> Arc<dyn Image> {
    image_format::open(path, &OpenOptions::default())
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// BLAKE3 of a device's whole guest content, read in 1 MiB pieces.
pub fn hash_device(dev: &dyn BlockDevice) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < dev.size() {
        let n = (dev.size() - off).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("read at {off:#x}: {e}"));
        hasher.update(&buf[..n]);
        off += n as u64;
    }
    hasher.finalize().to_hex().to_string()
}

/// BLAKE3 of a plain file's bytes.
pub fn hash_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    blake3::hash(&data).to_hex().to_string()
}

/// Deterministic bytes for a block at `off` (xorshift seeded by the offset and `seed`).
pub fn pattern_bytes(buf: &mut [u8], off: u64, seed: u64) {
    let mut x = (off ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Overwrites `len` bytes at `off` of a raw file with [`pattern_bytes`] (incompressible).
pub fn poke(path: &Path, off: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    pattern_bytes(&mut buf, off, seed);
    f.write_all_at(&buf, off).expect("write");
}

/// Asserts that `qemu-img compare` finds the guest content of `a` and `b` identical.
pub fn same(a: &Path, b: &Path) {
    let out = qemu_img(&[
        "compare",
        &a.display().to_string(),
        &b.display().to_string(),
    ]);
    assert!(out.contains("identical"), "{out}");
}

/// Asserts that `qemu-img compare` finds the raw image `raw` and `other`, read as raw (a raw
/// file, an NBD URL, a FUSE-exported disk file), identical.
pub fn same_raw(raw: &Path, other: &str) {
    let out = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &raw.display().to_string(),
        other,
    ]);
    assert!(out.contains("identical"), "{out}");
}

/// Size of [`write_pattern_raw`]'s images: 20 MiB plus 7 sectors, so not cluster-aligned.
pub const PATTERN_SIZE: u64 = (20 << 20) + 7 * 512;

/// Writes a sparse raw image of `size` bytes (a multiple of 512, at least 8 MiB) holding, in
/// order: data at 0, a hole, data starting mid-cluster, a run of written zeros, a hole, data
/// crossing a 64 KiB cluster boundary, a run of written zeros, and data in the last sectors; images
/// of 16 MiB or more also get 1 MiB of compressible text starting 3 MiB before the end (so
/// compressed formats really compress something).
pub fn write_pattern_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    assert!(size.is_multiple_of(512) && size >= 8 << 20);
    let f = std::fs::File::create(path).expect("create raw");
    f.set_len(size).expect("set_len");
    let put = |off: u64, len: usize, zero: bool| {
        let mut buf = vec![0u8; len];
        if !zero {
            pattern_bytes(&mut buf, off, seed);
        }
        f.write_all_at(&buf, off).expect("write");
    };
    put(0, 300 << 10, false);
    put((1 << 20) + 3 * 512, 200 << 10, false);
    put(2 << 20, 1 << 20, true);
    put((4 << 20) - 4096, 8192, false);
    put(5 << 20, 512, false);
    put((5 << 20) + 65536 - 512, 1024, false);
    put(6 << 20, 2 << 20, true);
    let text: Vec<u8> = (0..1usize << 20)
        .map(|i| b"vmnest compressible test line 0123456789\n"[i % 41] ^ (seed as u8 & 1))
        .collect();
    if size >= 16 << 20 {
        f.write_all_at(&text, size - (3 << 20)).expect("write text");
    }
    put(size - 3 * 512, 3 * 512, false);
}

/// Merged `[start, end)` ranges of `dev` whose extents are of one of `kinds`, from `block_status`.
pub fn ranges_of(dev: &dyn BlockDevice, kinds: &[image_format::ExtentKind]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    image_format::blockdev::for_each_extent(dev, 0, dev.size(), |start, e| {
        if kinds.contains(&e.kind) {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = start + e.len,
                _ => out.push((start, start + e.len)),
            }
        }
        Ok(())
    })
    .expect("block_status walk");
    out
}

/// Merged data ranges of `dev`, as the library reports them (compare with [`qemu_map_data`]).
pub fn data_ranges(dev: &dyn BlockDevice) -> Vec<(u64, u64)> {
    ranges_of(dev, &[image_format::ExtentKind::Data])
}

/// `qemu-img convert -f FORMAT -O raw IMAGE OUT`: the guest content as qemu reads it.
pub fn qemu_to_raw(image: &Path, format: &str, out: &Path) {
    qemu_to_or_from(image, format, "raw", out);
}

/// `qemu-img convert -f raw -O FORMAT RAW OUT`: an image written by the peer.
pub fn qemu_from_raw(raw: &Path, format: &str, out: &Path) {
    qemu_to_or_from(raw, "raw", format, out);
}

/// `qemu-img convert -f raw -O FORMAT -o OPTIONS RAW OUT`.
pub fn qemu_from_raw_with(raw: &Path, format: &str, options: &str, out: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        format,
        "-o",
        options,
        raw.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
}

fn qemu_to_or_from(src: &Path, from: &str, to: &str, out: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        from,
        "-O",
        to,
        src.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    ]);
}

/// Data ranges `[start, end)` of an image as `qemu-img map --output=json` reports them
/// (entries with `"data": true`), merged.
pub fn qemu_map_data(path: &Path, format: &str) -> Vec<(u64, u64)> {
    let out = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        format,
        path.to_str().expect("utf-8 path"),
    ]);
    data_ranges_from_json(&out)
}

/// Data ranges of an image as `vmnest map --output json` reports them, merged.
pub fn vmnest_map_data(path: &Path) -> Vec<(u64, u64)> {
    let out = run_ok(vmnest().args(["map", "--output", "json"]).arg(path));
    data_ranges_from_json(&out)
}

/// Merged `[start, end)` of the entries of a qemu-style map JSON array with `"data": true`.
pub fn data_ranges_from_json(json: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("map json");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("map is an array") {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let start = e["start"].as_u64().expect("start");
        let end = start + e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

/// `qemu-img info --output=json` of an image, parsed.
pub fn qemu_info(path: &Path, format: &str) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        format,
        path.to_str().expect("utf-8 path"),
    ]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

/// `vmnest info --output json` of an image, parsed.
pub fn vmnest_info(path: &Path) -> serde_json::Value {
    let out = run_ok(vmnest().args(["info", "--output", "json"]).arg(path));
    serde_json::from_str(&out).expect("vmnest info json")
}

/// The conformance checks every [`BlockDevice`] must pass, whatever its format, against the
/// guest bytes it should hold (`reference`, as read by a peer):
/// exact reads at aligned and unaligned offsets and lengths, zero-length reads, errors past the
/// end, `block_status` extents that tile the disk and never call non-zero bytes zero, answers
/// bounded by the requested length, and the same bytes when four threads read at once.
pub fn conformance(dev: &dyn BlockDevice, reference: &[u8]) {
    use image_format::blockdev::for_each_extent;
    let size = dev.size();
    assert_eq!(size, reference.len() as u64, "size");

    // Reads of many shapes: sector-aligned, odd, crossing 64 KiB and 2 MiB boundaries, at the end.
    let mut shapes: Vec<(u64, usize)> =
        vec![(0, 0), (0, 1), (0, 512), (size - 1, 1), (size - 512, 512)];
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % size;
        let len = ((x >> 32) % (3 << 20)).min(size - off) as usize;
        shapes.push((off, len));
    }
    for boundary in [65536u64, 2 << 20, 4 << 20] {
        if boundary + 100 < size {
            shapes.push((boundary - 100, 200));
        }
    }
    for &(off, len) in &shapes {
        let mut buf = vec![0xeeu8; len];
        dev.read_at(&mut buf, off)
            .unwrap_or_else(|e| panic!("read {len} at {off:#x}: {e}"));
        let want = &reference[off as usize..off as usize + len];
        if let Some(i) = image_format::bytes::first_difference(&buf, want) {
            panic!("read {len} at {off:#x}: differs at {:#x}", off + i as u64);
        }
    }

    // Past the end: an error, never a short read.
    let mut buf = [0u8; 512];
    assert!(
        dev.read_at(&mut buf, size - 256).is_err(),
        "read across the end must fail"
    );
    assert!(
        dev.read_at(&mut buf[..1], size).is_err(),
        "read at the end must fail"
    );
    assert!(
        dev.block_status(size, 1).is_err(),
        "block_status past the end must fail"
    );

    // Extents tile the disk; zero and unallocated extents hold only zero bytes.
    let mut next = 0u64;
    for_each_extent(dev, 0, size, |start, e| {
        assert_eq!(start, next, "extents must tile the disk");
        let bytes = &reference[start as usize..(start + e.len) as usize];
        if e.kind.reads_as_zero()
            && let Some(i) = image_format::bytes::first_nonzero(bytes)
        {
            panic!(
                "{:?} extent at {start:#x} holds data at {:#x}",
                e.kind,
                start + i as u64
            );
        }
        next = start + e.len;
        Ok(())
    })
    .expect("block_status walk");
    assert_eq!(next, size, "extents must cover the disk");

    // Answers never exceed the request.
    for &(off, len) in shapes.iter().filter(|(_, l)| *l > 0).take(50) {
        let e = dev.block_status(off, len as u64).expect("block_status");
        assert!(
            e.len >= 1 && e.len <= len as u64,
            "extent of {} for a request of {len}",
            e.len
        );
    }

    // Four threads at once read what one thread reads.
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let shapes = &shapes;
            s.spawn(move || {
                for &(off, len) in shapes.iter().skip(t as usize).step_by(4) {
                    let mut buf = vec![0u8; len];
                    dev.read_at(&mut buf, off).expect("concurrent read");
                    assert!(
                        buf == reference[off as usize..off as usize + len],
                        "concurrent read at {off:#x}"
                    );
                }
            });
        }
    });
}

/// Reads a raw file into memory (test images are tens of MiB).
pub fn read_raw(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Converts the image at `src` (format probed) into a new `format` image at `dst` with the
/// library (registry writer + copy engine); `options` is `-o`'s `key=value,...` text.
pub fn write_image(src: &Path, format: &str, options: &str, dst: &Path) -> convert::ConvertStats {
    let source = open(src);
    let mut create = image_format::CreateOptions {
        size: source.size(),
        ..Default::default()
    };
    create.parse_options(options).expect("options");
    let writer = image_format::default_registry()
        .create(format, dst, &create)
        .unwrap_or_else(|e| panic!("create {format} {}: {e}", dst.display()));
    convert::convert(
        source.as_ref(),
        writer,
        &convert::ConvertOptions::default(),
        &(),
    )
    .unwrap_or_else(|e| panic!("convert {} to {format}: {e}", src.display()))
}

/// A qcow2 copy of the test pattern (64 KiB clusters) whose L2 entry for guest cluster `cluster`
/// points far past the end of the file: a conversion reads the clusters before it, then fails
/// with an error naming `broken.qcow2` and offset 0x10000000000.
pub fn broken_qcow2(dir: &Path, cluster: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let raw = dir.join("broken-source.raw");
    write_pattern_raw(&raw, PATTERN_SIZE, 71);
    let img = dir.join("broken.qcow2");
    qemu_from_raw(&raw, "qcow2", &img);
    std::fs::remove_file(&raw).expect("remove raw");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .expect("open qcow2");
    let be = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).expect("read qcow2");
        u64::from_be_bytes(b)
    };
    let l2 = be(be(40)) & 0x00ff_ffff_ffff_fe00; // L1[0] -> the first L2 table
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l2 + cluster * 8)
        .expect("patch L2 entry");
    img
}

/// Converts a [`broken_qcow2`] into `format` (with `-o options` and `compress`) through the
/// registry writer and the engine, and asserts the conversion fails naming the source and leaves
/// no file at all in the output directory (no destination, no temporary).
pub fn assert_failed_conversion_leaves_nothing(
    name: &str,
    format: &str,
    options: &str,
    compress: bool,
) {
    let dir = scratch(name);
    let src = broken_qcow2(&dir, 80);
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).expect("out dir");
    let source = open(&src);
    let mut create = image_format::CreateOptions {
        size: source.size(),
        compress,
        ..Default::default()
    };
    create.parse_options(options).expect("options");
    let writer = image_format::default_registry()
        .create(format, &out_dir.join("dst.img"), &create)
        .unwrap_or_else(|e| panic!("create {format} {options}: {e}"));
    let err = convert::convert(
        source.as_ref(),
        writer,
        &convert::ConvertOptions::default(),
        &(),
    )
    .err()
    .unwrap_or_else(|| panic!("{format} {options}: converting a broken source must fail"));
    assert!(err.to_string().contains("broken.qcow2"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("read out dir")
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{format} {options}: left behind {left:?}");
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test leaves no
/// server behind.
#[derive(Debug)]
pub struct KilledOnDrop(pub std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
