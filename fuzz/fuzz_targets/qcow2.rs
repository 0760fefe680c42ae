//! Arbitrary bytes as a qcow2 image: open (format named, backing files not followed, so a run
//! never depends on other files), then info, check, a few reads and block_status calls. Errors
//! are fine; a panic, a hang or an unbounded allocation is a finding.
#![no_main]

use std::path::PathBuf;

use image_format::{OpenOptions, open};
use libfuzzer_sys::fuzz_target;

fn input_path() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmnest-fuzz-qcow2-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir.join("input.qcow2")
}

fuzz_target!(|data: &[u8]| {
    let path = input_path();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some("qcow2".into()),
        open_backing: false,
        ..Default::default()
    };
    let Ok(img) = open(&path, &opts) else {
        return;
    };
    let _ = img.info();
    let _ = img.check();
    let size = img.size();
    let mut buf = vec![0u8; 64 << 10];
    for off in [0, size / 3, size / 2, size.saturating_sub(buf.len() as u64)] {
        let len = (size - off.min(size)).min(buf.len() as u64) as usize;
        if len > 0 {
            let _ = img.read_at(&mut buf[..len], off);
            let _ = img.block_status(off, len as u64);
        }
    }
});
