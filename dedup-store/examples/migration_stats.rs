//! What the store can achieve on QEMU migration streams, before the CLI exists (bench, issue 4).
//!
//! Splits each stream with `chunker::qemu_migration::split`, checks that the segments tile it
//! byte for byte, and reports per stream: whether the ram section was read to its end (else the
//! `stop()` offset and reason), the RAMBlocks, pages, zero pages, opaque bytes; then across all
//! streams: distinct pages (BLAKE3 of the 4 KiB), pages shared between streams, and an estimate of
//! the stored bytes: distinct non-zero pages compressed with zstd in frames of the pack's
//! FRAME_TARGET at its ZSTD_LEVEL (in first-seen order), plus each stream's opaque bytes
//! compressed the same way, plus 32 bytes of map per non-zero page record (a chunk id); zero pages
//! cost nothing.
//!
//! Usage: cargo run --release -p dedup-store --example migration_stats -- A.mig [B.mig ...]

use std::collections::HashMap;
use std::fs::File;

use dedup_store::chunker::qemu_migration::{PAGE_SIZE, Segment, split};
use dedup_store::pack::{FRAME_TARGET, ZSTD_LEVEL};

fn compressed_in_frames(frames: &mut Vec<u8>, total: &mut u64, flush: bool) {
    while frames.len() >= FRAME_TARGET || (flush && !frames.is_empty()) {
        let n = frames.len().min(FRAME_TARGET);
        let z = zstd::bulk::compress(&frames[..n], ZSTD_LEVEL).expect("zstd");
        *total += z.len().min(n) as u64;
        frames.drain(..n);
    }
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        eprintln!("usage: migration_stats A.mig [B.mig ...]");
        std::process::exit(2);
    }
    // Distinct non-zero pages: hash -> bitmask of the streams holding it.
    let mut distinct: HashMap<[u8; 32], u64> = HashMap::new();
    let mut page_frames = Vec::with_capacity(2 * FRAME_TARGET);
    let mut pages_z = 0u64;
    let mut opaque_z = 0u64;
    let mut map_bytes = 0u64;
    let mut raw_total = 0u64;
    let mut opaque_total = 0u64;
    let mut all_complete = true;
    for (i, path) in paths.iter().enumerate() {
        let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: the benchmark's streams are not modified while this runs.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap_or_else(|e| panic!("{path}: {e}"));
        let data: &[u8] = &map;
        raw_total += data.len() as u64;
        let mut s = split(data);
        let (mut pos, mut n_bytes_segs, mut opaque, mut pages, mut zero_pages, mut fill_pages) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut zero_data_pages, mut new_here) = (0u64, 0u64);
        let mut largest_opaque = 0u64..0u64;
        let mut opaque_frames = Vec::with_capacity(2 * FRAME_TARGET);
        for seg in s.by_ref() {
            let r = seg.range();
            assert_eq!(r.start, pos, "{path}: segments must tile the stream");
            assert!(r.end > r.start, "{path}: empty segment");
            pos = r.end;
            match seg {
                Segment::Bytes(r) => {
                    n_bytes_segs += 1;
                    opaque += r.end - r.start;
                    if r.end - r.start > largest_opaque.end - largest_opaque.start {
                        largest_opaque = r.clone();
                    }
                    opaque_frames.extend_from_slice(&data[r.start as usize..r.end as usize]);
                    compressed_in_frames(&mut opaque_frames, &mut opaque_z, false);
                }
                Segment::Page { data: r, .. } => {
                    pages += 1;
                    assert_eq!(r.end - r.start, PAGE_SIZE);
                    let page = &data[r.start as usize..r.end as usize];
                    if page.iter().all(|&b| b == 0) {
                        zero_data_pages += 1;
                        continue;
                    }
                    map_bytes += 32;
                    let id = *blake3::hash(page).as_bytes();
                    let mask = distinct.entry(id).or_insert(0);
                    if *mask == 0 {
                        new_here += 1;
                        page_frames.extend_from_slice(page);
                        compressed_in_frames(&mut page_frames, &mut pages_z, false);
                    }
                    *mask |= 1 << i;
                }
                Segment::ZeroPage { fill, .. } => {
                    if fill == 0 {
                        zero_pages += 1;
                    } else {
                        fill_pages += 1;
                        map_bytes += 32;
                    }
                }
            }
        }
        compressed_in_frames(&mut opaque_frames, &mut opaque_z, true);
        opaque_total += opaque;
        assert_eq!(
            pos,
            data.len() as u64,
            "{path}: segments must cover the stream"
        );
        let complete = s.is_complete() && s.stop().is_none();
        all_complete &= complete;
        println!("{path}: {} bytes", data.len());
        match s.stop() {
            None if s.is_complete() => {
                println!("  split: complete (ram section read to its END/EOS)")
            }
            None => println!("  split: NOT complete, no stop reason"),
            Some(stop) => println!(
                "  split: STOPPED at offset {:#x} ({}): {:?}",
                stop.offset, stop.offset, stop.reason
            ),
        }
        let blocks: Vec<String> = s
            .blocks()
            .iter()
            .map(|b| format!("{} {} KiB", b.id, b.length >> 10))
            .collect();
        println!("  RAMBlocks: {}", blocks.join(", "));
        println!(
            "  pages: {pages} with data ({zero_data_pages} of them all-zero), {zero_pages} zero pages, {fill_pages} filled with another byte; {} in all ({} MiB of RAM)",
            pages + zero_pages + fill_pages,
            ((pages + zero_pages + fill_pages) * PAGE_SIZE) >> 20
        );
        println!(
            "  opaque: {opaque} bytes in {n_bytes_segs} segments (largest {} bytes at {:#x})",
            largest_opaque.end - largest_opaque.start,
            largest_opaque.start
        );
        println!(
            "  new distinct non-zero pages (not in an earlier stream nor earlier here): {new_here}"
        );
    }
    compressed_in_frames(&mut page_frames, &mut pages_z, true);
    let n = paths.len();
    let all = distinct.len() as u64;
    let in_all = distinct
        .values()
        .filter(|&&m| m.count_ones() as usize == n)
        .count();
    let in_several = distinct.values().filter(|&&m| m.count_ones() > 1).count();
    println!("across {n} streams ({raw_total} bytes):");
    println!(
        "  distinct non-zero pages: {all} ({} MiB); in every stream: {in_all}; in more than one: {in_several}",
        (all * PAGE_SIZE) >> 20
    );
    let est = pages_z + opaque_z + map_bytes;
    println!(
        "  estimate: pages {pages_z} + opaque {opaque_z} (zstd {ZSTD_LEVEL}, {} KiB frames) + maps {map_bytes} = {est} bytes",
        FRAME_TARGET >> 10
    );
    println!(
        "  dedup only (distinct pages uncompressed + opaque): {:.3} of raw",
        (all * PAGE_SIZE + opaque_total) as f64 / raw_total as f64
    );
    println!(
        "  estimated stored / raw: {:.3} (target <= 0.35){}",
        est as f64 / raw_total as f64,
        if all_complete {
            ""
        } else {
            "  [a stream was not split to its end]"
        }
    );
}
