//! The VHDX log parser on raw bytes: the first 16 bytes are the log GUID to look for, the rest
//! (cut to whole 4 KiB sectors) the circular log. The overlay it builds is then read back.
#![no_main]

use image_format::vhdx::guid::Guid;
use image_format::vhdx::log::{LOG_SECTOR, replay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (g, rest) = data.split_at(16);
    let mut guid = [0u8; 16];
    guid.copy_from_slice(g);
    let log = &rest[..rest.len() / LOG_SECTOR * LOG_SECTOR];
    if let Ok(Some(r)) = replay(log, Guid(guid), 1 << 20) {
        let mut buf = vec![0xffu8; 3 * LOG_SECTOR];
        for off in [0u64, 4095, r.overlay.end().saturating_sub(5000), r.last_file_offset] {
            r.overlay.patch(&mut buf, off);
            let _ = r.overlay.intersects(off, buf.len() as u64);
        }
    }
});
