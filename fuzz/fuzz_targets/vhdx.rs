//! Arbitrary bytes as a VHDX image: open (explicit format), then info, check, a few reads and
//! block status calls. Errors are fine; panics, hangs and unbounded allocations are findings.
#![no_main]

use image_format::{OpenOptions, open};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("vmnest-fuzz-vhdx-{}.vhdx", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some("vhdx".into()),
        ..Default::default()
    };
    let Ok(img) = open(&path, &opts) else {
        return;
    };
    let _ = img.info();
    let _ = img.check();
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    for off in [0, size / 3, size.saturating_sub(buf.len() as u64), size / 2 + 511] {
        let len = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        let _ = img.read_at(&mut buf[..len], off);
        if len > 0 {
            let _ = img.block_status(off, len as u64);
        }
    }
    let mut pos = 0u64;
    for _ in 0..64 {
        if pos >= size {
            break;
        }
        match img.block_status(pos, size - pos) {
            Ok(e) => pos += e.len,
            Err(_) => break,
        }
    }
});
