//! What the store could save on the bench set with other compression settings, without a store:
//! the images of `bench/make-store-set.sh` are cut into 16 KiB chunks, deduplicated by BLAKE3
//! across all of them in import order, and the new chunks compressed the way packs do (zstd over
//! frames of consecutive new chunks, raw when that does not shrink a frame). With `--similar`,
//! a new chunk that resembles one seen before (the same sampled content features) is also tried
//! as a zstd delta against it (the earlier chunk as a raw dictionary, 40 bytes counted for its
//! reference), and kept as a delta when that is under three quarters of its size compressed
//! alone; such chunks then leave the frames.
//!
//! Prints, per image and in all: new chunks, the framed bytes, bytes stored raw (frames that
//! would not shrink) and compression CPU seconds (one thread). Metadata (pack and chunk indexes,
//! maps: about 14 MB on the set) is not counted.
//!
//! Usage: cargo run --release -p dedup-store --example store_bound -- DIR [--level N]
//!        [--frame BYTES] [--similar]   (DIR holds gold.raw, clone-pkgs.raw, clone-upgrade.raw,
//!        clone-config.raw)

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use dedup_store::chunk::is_zero_chunk;
use dedup_store::chunker::cdc::GEAR;
use dedup_store::chunker::fixed::FixedChunker;

const CHUNK: usize = 16 << 10;
const IMAGES: [&str; 4] = ["gold", "clone-pkgs", "clone-upgrade", "clone-config"];
/// Bytes a delta chunk is charged for naming its base.
const DELTA_REF: usize = 40;

struct Args {
    dir: String,
    level: i32,
    frame: usize,
    similar: bool,
}

fn args() -> Args {
    let mut a = Args {
        dir: String::new(),
        level: 3,
        frame: 1 << 20,
        similar: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match arg.as_str() {
            "--level" => a.level = value("--level") as i32,
            "--frame" => a.frame = value("--frame"),
            "--similar" => a.similar = true,
            _ => a.dir = arg,
        }
    }
    assert!(
        !a.dir.is_empty(),
        "usage: store_bound DIR [--level N] [--frame BYTES] [--similar]"
    );
    a
}

/// Three super-features of a chunk: the store's gear hash (the CDC's table) rolled over it,
/// sampled where its low 3 bits are 0; for 12 fixed multipliers the maximum of the multiplied hash; the maxima folded 4 by 4.
/// Chunks sharing a super-feature share most of their sampled windows.
fn features(c: &[u8]) -> [u64; 3] {
    const M: [u64; 12] = [
        0x9E37_79B9_7F4A_7C15,
        0xBF58_476D_1CE4_E5B9,
        0x94D0_49BB_1331_11EB,
        0xD6E8_FEB8_6659_FD93,
        0xA076_1D64_78BD_642F,
        0xE703_7ED1_A0B4_28DB,
        0x8EBC_6AF0_9C88_C6E3,
        0x5899_65CC_7537_4CC3,
        0x1D8E_4E27_C47D_124F,
        0xC2B2_AE3D_27D4_EB4F,
        0x1656_67B1_9E37_79F9,
        0x27D4_EB2F_1656_67C5,
    ];
    let mut max = [0u64; 12];
    let mut h = 0u64;
    for (i, &b) in c.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[b as usize]);
        if i < 32 || h & 7 != 0 {
            continue;
        }
        for (k, m) in max.iter_mut().enumerate() {
            *m = (*m).max(h.wrapping_mul(M[k]).rotate_left(k as u32 * 5));
        }
    }
    let mut sf = [0u64; 3];
    for (j, f) in sf.iter_mut().enumerate() {
        let q = &max[4 * j..4 * j + 4];
        *f = (q[0] ^ q[1].rotate_left(17) ^ q[2].rotate_left(31) ^ q[3].rotate_left(47))
            .wrapping_add(j as u64);
    }
    sf
}

#[derive(Default)]
struct Tally {
    new_chunks: usize,
    stored: usize,
    raw_frames: usize,
    deltas: usize,
    delta_plain: usize,
    delta_stored: usize,
    secs: f64,
}

struct Framer {
    level: i32,
    frame: usize,
    buf: Vec<u8>,
}

impl Framer {
    fn add(&mut self, chunk: &[u8], t: &mut Tally) {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= self.frame {
            self.finish(t);
        }
    }

    fn finish(&mut self, t: &mut Tally) {
        if self.buf.is_empty() {
            return;
        }
        let start = Instant::now();
        let packed = zstd::bulk::compress(&self.buf, self.level).expect("zstd");
        t.secs += start.elapsed().as_secs_f64();
        if packed.len() < self.buf.len() {
            t.stored += packed.len();
        } else {
            t.stored += self.buf.len();
            t.raw_frames += self.buf.len();
        }
        self.buf.clear();
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / 1048576.0
}

fn main() {
    let a = args();
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    // With --similar: every new chunk so far, and its super-features.
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut by_feature: HashMap<u64, usize> = HashMap::new();
    let mut total = Tally::default();
    println!(
        "level {}, frames of {} KiB{}",
        a.level,
        a.frame >> 10,
        if a.similar { ", similarity deltas" } else { "" }
    );
    for name in IMAGES {
        let path = format!("{}/{name}.raw", a.dir);
        let f = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let size = f.metadata().expect("stat").len();
        let mut t = Tally::default();
        let mut framer = Framer {
            level: a.level,
            frame: a.frame,
            buf: Vec::new(),
        };
        let mut chunk = vec![0u8; CHUNK];
        for range in FixedChunker::new(size, CHUNK as u64)
            .expect("grid")
            .chunks()
        {
            let n = (range.end - range.start) as usize;
            f.read_exact_at(&mut chunk[..n], range.start).expect("read");
            let c = &chunk[..n];
            if is_zero_chunk(c) || !seen.insert(*blake3::hash(c).as_bytes()) {
                continue;
            }
            t.new_chunks += 1;
            if !a.similar {
                framer.add(c, &mut t);
                continue;
            }
            let start = Instant::now();
            let sf = features(c);
            let base = sf.iter().find_map(|f| by_feature.get(f)).copied();
            let mut delta = None;
            if let Some(b) = base {
                let d = zstd::bulk::Compressor::with_dictionary(a.level, &kept[b])
                    .and_then(|mut z| z.compress(c))
                    .expect("zstd");
                let alone = zstd::bulk::compress(c, a.level).expect("zstd").len();
                if d.len() + DELTA_REF < alone * 3 / 4 {
                    delta = Some(d.len() + DELTA_REF);
                }
            }
            t.secs += start.elapsed().as_secs_f64();
            match delta {
                Some(len) => {
                    t.deltas += 1;
                    t.delta_plain += n;
                    t.delta_stored += len;
                    t.stored += len;
                }
                None => framer.add(c, &mut t),
            }
            let i = kept.len();
            kept.push(c.to_vec());
            for f in sf {
                by_feature.entry(f).or_insert(i);
            }
        }
        framer.finish(&mut t);
        println!(
            "{name:14} new chunks {:6}  stored {:7.1} MiB  (raw frames {:6.1} MiB; deltas {} chunks, \
             {:.1} MiB -> {:.2} MiB)  {:.1} s",
            t.new_chunks,
            mib(t.stored),
            mib(t.raw_frames),
            t.deltas,
            mib(t.delta_plain),
            mib(t.delta_stored),
            t.secs
        );
        total.new_chunks += t.new_chunks;
        total.stored += t.stored;
        total.raw_frames += t.raw_frames;
        total.deltas += t.deltas;
        total.secs += t.secs;
    }
    println!(
        "all            new chunks {:6}  stored {:7.1} MiB  (raw frames {:6.1} MiB; {} deltas)  \
         {:.1} s of compression CPU",
        total.new_chunks,
        mib(total.stored),
        mib(total.raw_frames),
        total.deltas,
        total.secs
    );
}
