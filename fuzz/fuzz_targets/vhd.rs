//! Fuzz the VHD ("vpc") reader: the input is an image file.
//!
//! Before writing the file, the target recomputes the checksums of the footer at the end, the
//! footer copy at 0 and the dynamic header the footer points to: otherwise nearly every
//! mutation would stop at a checksum mismatch and the parsers behind it would go unexplored.
//! The first input byte decides whether that repair happens, so checksum handling itself is
//! fuzzed too.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use image_format::vhd::header::checksum;
use image_format::{OpenOptions, blockdev::for_each_extent};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vmnest-fuzz-vhd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Recomputes the footer checksum of the 512 bytes at `at`, if they start with the cookie.
fn fix_footer(bytes: &mut [u8], at: usize) -> Option<u64> {
    let footer = bytes.get_mut(at..at + 512)?;
    if &footer[..8] != b"conectix" {
        return None;
    }
    let sum = checksum(footer, 64);
    footer[64..68].copy_from_slice(&sum.to_be_bytes());
    Some(u64::from_be_bytes(footer[16..24].try_into().ok()?))
}

fn repair(bytes: &mut [u8]) {
    let len = bytes.len();
    let mut header_at = None;
    if len >= 512 {
        header_at = fix_footer(bytes, len - 512);
    }
    if len > 512 {
        header_at = fix_footer(bytes, 0).or(header_at);
    }
    if let Some(at) = header_at.and_then(|a| usize::try_from(a).ok())
        && let Some(header) = bytes.get_mut(at..at.saturating_add(1024))
        && header.len() == 1024
    {
        let sum = checksum(header, 36);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut bytes = rest.to_vec();
    if mode & 1 == 0 {
        repair(&mut bytes);
    }
    let path = scratch().join("image.vhd");
    std::fs::write(&path, &bytes).expect("write input");
    let options = OpenOptions {
        format: Some("vpc".into()),
        ..Default::default()
    };
    let Ok(image) = image_format::open(&path, &options) else { return };
    let _ = image.info();
    let _ = image.check();
    let size = image.size();
    let mut buf = vec![0u8; size.min(64 << 10) as usize];
    for off in [0, size / 2, size.saturating_sub(buf.len() as u64)] {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], off);
    }
    if size > 0 {
        let _ = image.block_status(size / 3, size - size / 3);
        // Walk at most the first 64 MiB extent by extent.
        let _ = for_each_extent(image.as_ref(), 0, size.min(64 << 20), |_, _| Ok(()));
    }
});
