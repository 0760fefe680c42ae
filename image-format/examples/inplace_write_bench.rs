//! Times in-place writes to an existing image (qcow2 or VHD, made beforehand, e.g. by
//! qemu-img): `inplace_write_bench IMAGE PHASE COUNT [PIECES]`. PHASE `fill` writes COUNT
//! 64 KiB pieces sequentially from offset 0 (allocating clusters, L2 tables, refcount blocks,
//! VHD blocks); `overwrite` writes COUNT 4 KiB pieces at pseudo-random offsets inside the first
//! PIECES * 64 KiB (already allocated by `fill`: the in-place path). Prints the seconds taken.

use std::path::Path;
use std::time::Instant;

use image_format::OpenOptions;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (path, phase, count, pieces) = match args.as_slice() {
        [_, path, phase, count] => (path, phase, count, count),
        [_, path, phase, count, pieces] => (path, phase, count, pieces),
        _ => {
            eprintln!("usage: inplace_write_bench IMAGE fill|overwrite COUNT [PIECES]");
            std::process::exit(2);
        }
    };
    let count: u64 = count.parse().expect("COUNT");
    let pieces: u64 = pieces.parse().expect("PIECES");
    let options = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = image_format::open(Path::new(path), &options).expect("open");
    let dev = img.into_mut_device().expect("writes in place");
    let piece = 64u64 << 10;
    let start = Instant::now();
    match phase.as_str() {
        "fill" => {
            let buf = vec![0x5au8; piece as usize];
            for i in 0..count {
                dev.write_at(&buf, i * piece).expect("write");
            }
        }
        "overwrite" => {
            let buf = vec![0xa5u8; 4096];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..count {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (pieces * piece / 4096)) * 4096;
                dev.write_at(&buf, off).expect("write");
            }
        }
        _ => panic!("unknown phase {phase}"),
    }
    dev.flush().expect("flush");
    println!("{:.4}", start.elapsed().as_secs_f64());
}
