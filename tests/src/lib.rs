//! Shared helpers of the integration tests: the `vmnest` binary, the peers (qemu-img, libyal's
//! readers), patterned test images, and `../shared/sample_images`.
//!
//! A peer that is missing makes the test fail with a message naming the package to install; it
//! never skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use image_format::{BlockDevice, Image, OpenOptions};

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
/// builds it).
pub fn vmnest() -> Command {
    let bin = target_profile_dir().join("vmnest");
    assert!(
        bin.exists(),
        "{} not built: run the tests with `cargo test --workspace`",
        bin.display()
    );
    Command::new(bin)
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
            let tmp = dir.join(format!("{stem}.tmp{}", std::process::id()));
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
            std::fs::copy(&src, &out).expect("copy sample");
        }
        out
    }
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

/// Size of [`write_pattern_raw`]'s images: 20 MiB plus 7 sectors, so not cluster-aligned.
pub const PATTERN_SIZE: u64 = (20 << 20) + 7 * 512;

/// Writes a sparse raw image of `size` bytes (a multiple of 512, at least 8 MiB) holding, in
/// order: data at 0, a hole, data starting mid-cluster, a run of written zeros, a hole, data
/// crossing a 64 KiB cluster boundary, a run of written zeros that ends the file's first 16 MiB
/// region, and data in the last sectors.
pub fn write_pattern_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    assert!(size % 512 == 0 && size >= 8 << 20);
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
    put(size - 3 * 512, 3 * 512, false);
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
