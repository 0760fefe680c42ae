//! What every image fuzz target does with its input: write it to a file, open it with one driver
//! named explicitly (backing files not followed), and, if it opens, describe it, check it, and read and map a few ranges.
//! Errors are expected; panics, hangs and unbounded allocations are findings.

use std::io::Write;

use image_format::{OpenOptions, blockdev::for_each_extent};

/// Feeds `data` to the driver of `format` as an image file.
pub fn exercise(format: &str, data: &[u8]) {
    with_input_file(data, |path| exercise_file(format, path));
}

fn exercise_file(format: &str, path: &std::path::Path) {
    // Backing files are not followed, so a run never depends on other files.
    let options = OpenOptions {
        format: Some(format.to_string()),
        open_backing: false,
        ..Default::default()
    };
    let opened = image_format::open(path, &options);
    if let Ok(image) = opened {
        let _ = image.info();
        let _ = image.check();
        let size = image.size();
        let mut buf = vec![0u8; 64 * 1024];
        for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..n], off);
        }
        let mut extents = 0;
        let _ = for_each_extent(image.as_ref(), 0, size, |_, _| {
            extents += 1;
            // Bound the walk: a fuzzed table may describe millions of extents.
            if extents > 10_000 {
                Err(image_format::Error::unsupported("extent walk capped by the fuzzer"))
            } else {
                Ok(())
            }
        });
    }
}

/// Feeds `data` to the driver of `format` as an image file opened writable and, if it opens,
/// writes, zeroes, discards and flushes a few ranges (the in-place writers' allocation, refcount
/// and table code on hostile metadata), then reads back.
pub fn exercise_writes(format: &str, data: &[u8]) {
    with_input_file(data, |path| exercise_writes_file(format, path));
}

fn exercise_writes_file(format: &str, path: &std::path::Path) {
    let options = OpenOptions {
        format: Some(format.to_string()),
        open_backing: false,
        writable: true,
        ..Default::default()
    };
    if let Ok(image) = image_format::open(path, &options) {
        let size = image.size();
        if let Some(dev) = image.into_mut_device() {
            let buf = vec![0x5au8; 8192];
            for off in [0, size / 3, size / 2 + 777, size.saturating_sub(5000)] {
                let n = (size - off.min(size)).min(buf.len() as u64) as usize;
                let _ = dev.write_at(&buf[..n], off);
                let len = (size - off.min(size)).min(1 << 20);
                let _ = dev.write_zeroes(off, len);
                let _ = dev.discard(off / 2, len);
                let _ = dev.write_at(&buf[..n], off);
            }
            let _ = dev.flush();
            let mut back = vec![0u8; 8192];
            let n = size.min(back.len() as u64) as usize;
            let _ = dev.read_at(&mut back[..n], 0);
        }
    }
}

/// Writes `data` to a scratch file, runs `f` on it, and removes it.
fn with_input_file(data: &[u8], f: impl FnOnce(&std::path::Path)) {
    let Ok(mut file) = tempfile_in_tmp() else { return };
    if file.1.write_all(data).is_ok() {
        f(&file.0);
    }
    let _ = std::fs::remove_file(&file.0);
}

fn tempfile_in_tmp() -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let dir = std::env::temp_dir().join(format!("vmnest-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("input.img");
    let file = std::fs::File::create(&path)?;
    Ok((path, file))
}
