//! Arbitrary bytes as a VMDK file (sparse header, grain tables, embedded descriptor, markers),
//! opened with the vmdk driver named explicitly; then info, check, reads and block status.
#![no_main]

use std::io::Write;

use image_format::{BlockDevice as _, OpenOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("vmnest-fuzz-vmdk-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.vmdk");
    {
        let mut f = std::fs::File::create(&path).expect("create input");
        f.write_all(data).expect("write input");
    }
    let options = OpenOptions {
        format: Some("vmdk".into()),
        ..OpenOptions::default()
    };
    let Ok(img) = image_format::open(&path, &options) else {
        return;
    };
    let _ = img.info();
    let _ = img.check();
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    for off in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
        let len = (buf.len() as u64).min(size.saturating_sub(off)) as usize;
        if len > 0 {
            let _ = img.read_at(&mut buf[..len], off);
            let _ = img.block_status(off, len as u64);
        }
    }
});
