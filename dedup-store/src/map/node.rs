//! The byte encoding of one map node (layout in the [`crate::map`] module doc).

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::map::{FANOUT, MAX_DEPTH};

/// Label hashed into [`NODE_MAGIC`].
pub const NODE_MAGIC_LABEL: &str = "vmnest map node v1";
/// The first 8 bytes of BLAKE3([`NODE_MAGIC_LABEL`]): marks a map node.
pub const NODE_MAGIC: [u8; 8] = [0x34, 0x0a, 0x62, 0xd3, 0x08, 0x2c, 0x7f, 0xbb];
/// The node format version this code writes and reads.
pub const NODE_VERSION: u16 = 1;
/// Bytes before the presence bitmap.
pub const NODE_HEADER_LEN: usize = 16;

/// A decoded node: its level (0 = leaf) and its entries (None = zero chunk or zero subtree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub entries: Vec<Option<ChunkId>>,
}

/// Encodes a node. `entries` has 1..=FANOUT entries, at least one present (callers store an
/// all-zero node as nothing at all).
pub fn encode_node(level: u8, entries: &[Option<ChunkId>]) -> Vec<u8> {
    debug_assert!(!entries.is_empty() && entries.len() <= FANOUT && level < MAX_DEPTH);
    let bitmap_len = entries.len().div_ceil(8);
    let present = entries.iter().flatten().count();
    let mut out = Vec::with_capacity(NODE_HEADER_LEN + bitmap_len + 32 * present);
    out.extend_from_slice(&NODE_MAGIC);
    out.extend_from_slice(&NODE_VERSION.to_le_bytes());
    out.push(level);
    out.push(0);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut bitmap = vec![0u8; bitmap_len];
    for (i, e) in entries.iter().enumerate() {
        if e.is_some() {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bitmap);
    for id in entries.iter().flatten() {
        out.extend_from_slice(&id.0);
    }
    out
}

/// Parses the bytes of node `id` (untrusted). Every error names the node and the offset.
pub fn decode_node(id: &ChunkId, bytes: &[u8]) -> Result<Node> {
    let bad = |offset: usize, reason: String| {
        Error::corrupt(format!("map node {id}"), offset as u64, reason)
    };
    if bytes.len() < NODE_HEADER_LEN {
        return Err(bad(
            0,
            format!(
                "{} bytes, shorter than the {NODE_HEADER_LEN}-byte header",
                bytes.len()
            ),
        ));
    }
    if bytes[..8] != NODE_MAGIC {
        return Err(bad(0, "not a map node (bad magic)".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != NODE_VERSION {
        return Err(bad(8, format!("unsupported version {version}")));
    }
    let level = bytes[10];
    if level >= MAX_DEPTH {
        return Err(bad(
            10,
            format!("level {level} exceeds the cap {}", MAX_DEPTH - 1),
        ));
    }
    if bytes[11] != 0 {
        return Err(bad(11, format!("reserved byte is {:#x}, not 0", bytes[11])));
    }
    let count = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if count == 0 || count as usize > FANOUT {
        return Err(bad(12, format!("count {count} outside 1..={FANOUT}")));
    }
    let count = count as usize;
    let bitmap_len = count.div_ceil(8);
    let bitmap = bytes
        .get(NODE_HEADER_LEN..NODE_HEADER_LEN + bitmap_len)
        .ok_or_else(|| {
            bad(
                NODE_HEADER_LEN,
                format!("truncated bitmap of {bitmap_len} bytes"),
            )
        })?;
    if !count.is_multiple_of(8) && bitmap[bitmap_len - 1] >> (count % 8) != 0 {
        return Err(bad(
            NODE_HEADER_LEN + bitmap_len - 1,
            "bitmap bits set past the count".into(),
        ));
    }
    let present: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
    if present == 0 {
        return Err(bad(
            NODE_HEADER_LEN,
            "no entry present (an all-zero node is never stored)".into(),
        ));
    }
    let ids_at = NODE_HEADER_LEN + bitmap_len;
    let want = ids_at + 32 * present;
    if bytes.len() != want {
        let at = bytes.len().min(want);
        return Err(bad(
            at,
            format!(
                "{} bytes where {present} ids need exactly {want}",
                bytes.len()
            ),
        ));
    }
    let mut ids = bytes[ids_at..].chunks_exact(32);
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        if bitmap[i / 8] & (1 << (i % 8)) != 0 {
            let raw = ids
                .next()
                .ok_or_else(|| bad(ids_at, "ids run out".into()))?;
            let mut id = [0u8; 32];
            id.copy_from_slice(raw);
            entries.push(Some(ChunkId(id)));
        } else {
            entries.push(None);
        }
    }
    Ok(Node { level, entries })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn reason(bytes: &[u8]) -> (u64, String) {
        match decode_node(&ChunkId::of(bytes), bytes) {
            Err(Error::Corrupt {
                object,
                offset,
                reason,
            }) => {
                assert_eq!(object, format!("map node {}", ChunkId::of(bytes)));
                (offset, reason)
            }
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn magic_is_the_blake3_prefix_of_its_label() {
        assert_eq!(
            blake3::hash(NODE_MAGIC_LABEL.as_bytes()).as_bytes()[..8],
            NODE_MAGIC
        );
    }

    #[test]
    fn leaf_encoding_matches_the_golden_bytes() {
        let entries = [Some(ChunkId([0x11; 32])), None, Some(ChunkId([0x22; 32]))];
        let bytes = encode_node(0, &entries);
        let golden = format!(
            "{}{}{}{}{}",
            "340a62d3082c7fbb", // magic
            "0100",             // version 1
            "00",               // level 0
            "00",               // reserved
            "03000000",         // count 3
        ) + "05" // bitmap: entries 0 and 2
            + &"11".repeat(32)
            + &"22".repeat(32);
        assert_eq!(hex(&bytes), golden);
        assert_eq!(
            decode_node(&ChunkId::of(&bytes), &bytes).unwrap(),
            Node {
                level: 0,
                entries: entries.to_vec()
            }
        );
    }

    #[test]
    fn full_interior_node_round_trips() {
        let entries: Vec<_> = (0..FANOUT)
            .map(|i| (i % 3 != 0).then(|| ChunkId::of(&i.to_le_bytes())))
            .collect();
        let bytes = encode_node(3, &entries);
        let node = decode_node(&ChunkId::of(&bytes), &bytes).unwrap();
        assert_eq!(node, Node { level: 3, entries });
    }

    #[test]
    fn garbage_nodes_are_rejected_with_their_offset() {
        let good = encode_node(0, &[Some(ChunkId([1; 32])), None, None]);
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (good[..10].to_vec(), 0, "shorter"),
            ([&[0u8; 8][..], &good[8..]].concat(), 0, "magic"),
            (
                {
                    let mut b = good.clone();
                    b[8] = 2;
                    b
                },
                8,
                "version",
            ),
            (
                {
                    let mut b = good.clone();
                    b[10] = MAX_DEPTH;
                    b
                },
                10,
                "level",
            ),
            (
                {
                    let mut b = good.clone();
                    b[11] = 1;
                    b
                },
                11,
                "reserved",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12..16].copy_from_slice(&0u32.to_le_bytes());
                    b
                },
                12,
                "count",
            ),
            (
                {
                    let mut b = good.clone();
                    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
                    b
                },
                12,
                "count",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16] = 0b1001;
                    b
                },
                16,
                "past the count",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16] = 0;
                    b
                },
                16,
                "no entry",
            ),
            (good[..good.len() - 1].to_vec(), 48, "need exactly"),
            ([&good[..], &[0][..]].concat(), 49, "need exactly"),
            (
                {
                    let mut b = good[..16].to_vec();
                    b[12..16].copy_from_slice(&256u32.to_le_bytes());
                    b
                },
                16,
                "truncated bitmap",
            ),
        ];
        for (bytes, offset, words) in cases {
            let (at, why) = reason(&bytes);
            assert_eq!(at, offset, "{why}");
            assert!(why.contains(words), "{why} should mention {words}");
        }
    }

    #[test]
    fn random_garbage_never_panics_and_decoded_nodes_reencode_identically() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let seed = encode_node(1, &[None, Some(ChunkId([7; 32])), Some(ChunkId([8; 32]))]);
        for _ in 0..20_000 {
            let mut bytes = seed.clone();
            let flips = next() % 4;
            for _ in 0..=flips {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            bytes.truncate(bytes.len() - (next() % 3) as usize);
            if let Ok(node) = decode_node(&ChunkId::of(&bytes), &bytes) {
                assert_eq!(encode_node(node.level, &node.entries), bytes);
            }
        }
    }
}
