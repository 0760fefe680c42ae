//! Test support for in-place writers: crash an editing session at many points with the fault
//! injection of [`ImageFile`] and check what a power cut would leave.
//!
//! A fixed pseudo-random sequence of writes, zeroings, discards and flushes runs once without
//! faults to count the file operations, then again for every `stride`-th operation with that
//! operation failing (and every later one). The file is then rebuilt as a power cut could leave
//! it: the synced state plus all, none, or a pseudo-random half of the writes not yet synced.
//! After each crash the format's peer check must pass (`qemu-img check`: at most leaks) and every
//! 512-byte sector that no request touched since the last successful flush must read as it did
//! at that flush.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::blockdev::BlockDeviceMut;
use crate::error::Result;
use crate::file::ImageFile;
use crate::registry::{OpenContext, OpenOptions};

/// A fresh directory under `target/<profile>/test-scratch/`.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let dir = profile.join("test-scratch").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a qemu tool (`qemu-img`, `qemu-io`); a missing tool fails the test.
pub(crate) fn qemu(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is missing ({e}): install the Debian package qemu-utils")
    })
}

/// Runs a qemu tool and asserts it succeeded.
pub(crate) fn qemu_ok(tool: &str, args: &[&str]) {
    let out = qemu(tool, args);
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
}

/// Creates the empty qcow2 image `img` of `size` (qemu-img's notation) with `cluster`-byte
/// clusters, by qemu-img.
pub(crate) fn qemu_qcow2(img: &Path, cluster: u64, size: &str) {
    let cluster = format!("cluster_size={cluster}");
    qemu_ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", &cluster, s(img), size],
    );
}

/// Opens `path` writable with a driver's own `open` (for tests that need the concrete type).
pub(crate) fn open_writable<T>(
    path: &Path,
    open: fn(ImageFile, &OpenContext<'_>) -> Result<T>,
) -> Arc<T> {
    let registry = crate::default_registry();
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let ctx = OpenContext {
        file: ImageFile::open_with(path, true).unwrap(),
        options: &options,
        format_explicit: true,
        depth: 0,
        registry: &registry,
    };
    let file = ImageFile::open_with(path, true).unwrap();
    Arc::new(open(file, &ctx).unwrap_or_else(|e| panic!("open {} writable: {e}", path.display())))
}

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// One editing session to crash.
pub(crate) struct Scenario<'a, T> {
    pub dir: &'a Path,
    /// The image's files in `dir`, the image first (a backing file after it).
    pub files: &'a [&'a str],
    /// The guest content before the session.
    pub initial: &'a [u8],
    pub seed: u64,
    /// Requests are up to 12 of these long; offsets lean towards multiples of it.
    pub unit: u64,
    /// Discards zero whole units of this size (`None`: discards change nothing).
    pub discard_unit: Option<u64>,
    pub open: fn(&Path) -> Arc<T>,
    pub file: fn(&T) -> &ImageFile,
    /// The peer's verdict on a crashed image: `Err` describes a corruption.
    pub peer_check: fn(&Path) -> std::result::Result<(), String>,
}

/// The guest at the last successful flush, and the 512-byte sectors touched since.
struct Model {
    current: Vec<u8>,
    flushed: Vec<u8>,
    touched: Vec<bool>,
}

impl Model {
    fn new(initial: &[u8]) -> Self {
        Model {
            current: initial.to_vec(),
            flushed: initial.to_vec(),
            touched: vec![false; initial.len().div_ceil(512)],
        }
    }

    fn flushed(&mut self) {
        self.flushed.clone_from(&self.current);
        self.touched.fill(false);
    }
}

/// The session: 60 requests, stopping at the first error (the injected crash).
fn run_ops<T: BlockDeviceMut>(dev: &T, m: &mut Model, sc: &Scenario<'_, T>) -> Result<()> {
    let size = m.current.len() as u64;
    let mut x = sc.seed | 1;
    for op in 0..60u64 {
        let align = [1, 512, sc.unit][(xorshift(&mut x) % 3) as usize];
        let off = (xorshift(&mut x) % size) / align * align;
        let len = (1 + xorshift(&mut x) % (sc.unit * 12)).min(size - off);
        let (a, b) = (off as usize, (off + len) as usize);
        let kind = xorshift(&mut x) % 10;
        if kind < 9 {
            for t in &mut m.touched[a / 512..b.div_ceil(512)] {
                *t = true;
            }
        }
        match kind {
            0..=4 => {
                let buf: Vec<u8> = (0..len)
                    .map(|i| (op * 31 + i * 7 + sc.seed) as u8)
                    .collect();
                dev.write_at(&buf, off)?;
                m.current[a..b].copy_from_slice(&buf);
            }
            5..=6 => {
                dev.write_zeroes(off, len)?;
                m.current[a..b].fill(0);
            }
            7..=8 => {
                dev.discard(off, len)?;
                if let Some(unit) = sc.discard_unit {
                    let mut c = off.div_ceil(unit) * unit;
                    while c < off + len {
                        let end = (c + unit).min(size);
                        if end <= off + len {
                            m.current[c as usize..end as usize].fill(0);
                        }
                        c += unit;
                    }
                }
            }
            _ => {
                dev.flush()?;
                m.flushed();
            }
        }
    }
    dev.flush()?;
    m.flushed();
    Ok(())
}

/// Crashes the scenario at about 150 points, three ways each, and checks every outcome.
pub(crate) fn crash_everywhere<T: BlockDeviceMut>(sc: &Scenario<'_, T>) {
    let work = sc.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let copy = || {
        for f in sc.files {
            std::fs::copy(sc.dir.join(f), work.join(f)).unwrap();
        }
        work.join(sc.files[0])
    };
    // A run without faults counts the operations (and must itself succeed).
    let total = {
        let dev = (sc.open)(&copy());
        (sc.file)(&dev).arm_faults(0);
        run_ops(&*dev, &mut Model::new(sc.initial), sc).unwrap();
        (sc.file)(&dev).fault_ops()
    };
    assert!(total > 100, "only {total} operations");
    let stride = (total / 150).max(1);
    for fail_at in (1..=total).step_by(stride as usize) {
        for keep_mode in 0..3u64 {
            let path = copy();
            let mut m = Model::new(sc.initial);
            {
                let dev = (sc.open)(&path);
                let file = (sc.file)(&dev);
                file.arm_faults(fail_at);
                assert!(
                    run_ops(&*dev, &mut m, sc).is_err(),
                    "operation {fail_at} did not fail"
                );
                let mut x = fail_at ^ 0xdead_beef;
                file.simulate_crash(|_| match keep_mode {
                    0 => true,
                    1 => false,
                    _ => xorshift(&mut x) & 1 == 0,
                });
            }
            let at = format!("crash at operation {fail_at}/{total} (keep mode {keep_mode})");
            if let Err(e) = (sc.peer_check)(&path) {
                panic!("{at}: {e}");
            }
            let img = crate::open(&path, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{at}: reopen: {e}"));
            let mut got = vec![0u8; sc.initial.len()];
            img.read_at(&mut got, 0).unwrap();
            for (i, touched) in m.touched.iter().enumerate() {
                let r = i * 512..((i + 1) * 512).min(got.len());
                assert!(
                    *touched || got[r.clone()] == m.flushed[r.clone()],
                    "{at}: flushed sector {i} lost: got {:?}, want {:?}",
                    &got[r.start..r.start + 8],
                    &m.flushed[r.start..r.start + 8]
                );
            }
        }
    }
}
