//! Snapshot manifests: small JSON documents naming a snapshot's members and their maps.
//!
//! A manifest is immutable and named by the BLAKE3 of its bytes (`snapshots/<hex>`), so reading
//! one checks it; it is parsed with a size cap and every field is validated before use (the
//! bytes are untrusted like any store object).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::map::MapRoot;

/// Largest manifest accepted (a manifest lists members, not chunks).
pub const MAX_MANIFEST_LEN: usize = 1 << 20;
/// Most members of one snapshot.
pub const MAX_MEMBERS: usize = 256;
/// Most labels of one snapshot.
pub const MAX_LABELS: usize = 256;
/// Longest member name, label key or label value.
pub const MAX_TEXT: usize = 4096;
/// Most recipe parts a stream member lists (each part names up to
/// [`crate::store::stream::PART_ENTRIES`] segments).
pub const MAX_PARTS: usize = 1 << 16;
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// A snapshot's id: BLAKE3 of its manifest's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub [u8; 32]);

impl SnapshotId {
    /// The id of manifest bytes.
    pub fn of(bytes: &[u8]) -> SnapshotId {
        SnapshotId(*blake3::hash(bytes).as_bytes())
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        ChunkId(self.0).to_hex()
    }

    /// The first 12 hex digits, as `log` and `ls` print it.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<SnapshotId> {
        ChunkId::from_hex(text).map(|c| SnapshotId(c.0))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

fn ser_hex<S: Serializer>(bytes: &[u8; 32], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&ChunkId(*bytes).to_hex())
}

fn de_hex<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<[u8; 32], D::Error> {
    let text = String::deserialize(d)?;
    ChunkId::from_hex(&text)
        .map(|c| c.0)
        .ok_or_else(|| serde::de::Error::custom("not 64 hex digits"))
}

impl Serialize for SnapshotId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        ser_hex(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        de_hex(d).map(SnapshotId)
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        ser_hex(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        de_hex(d).map(ChunkId)
    }
}

/// What a member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberKind {
    /// A virtual disk (guest address space).
    Disk,
    /// A VM memory state (a memory file or a migration stream).
    Memory,
    /// A VM configuration file.
    Config,
}

impl MemberKind {
    /// `disk`, `memory`, `config`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberKind::Disk => "disk",
            MemberKind::Memory => "memory",
            MemberKind::Config => "config",
        }
    }
}

/// How a member's bytes are stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "layout", rename_all = "kebab-case")]
pub enum Layout {
    /// Fixed chunks over the address space, in a Merkle map (disks, page-aligned memory).
    Map {
        /// Chunk size in bytes (a power of two, 4 KiB..4 MiB).
        chunk_size: u32,
        /// The map's root node, absent when every byte is zero.
        root: Option<ChunkId>,
    },
    /// A byte stream as a list of variable-length segments (a migration stream, a config file):
    /// the segment list is stored in `parts`, chunks of [`crate::store::stream`] records.
    Recipe {
        /// How the stream was cut: `qemu-migration`, `cdc`.
        cutter: String,
        /// Number of segments.
        segments: u64,
        /// The segment list, in order.
        parts: Vec<ChunkId>,
    },
}

/// One member of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// `disk0`, `disk1`, `memory`, `config`, …
    pub name: String,
    /// What it is.
    pub kind: MemberKind,
    /// Its size in bytes.
    pub size: u64,
    /// How it is stored.
    #[serde(flatten)]
    pub layout: Layout,
}

impl Member {
    /// The map of a [`Layout::Map`] member.
    pub fn map_root(&self) -> Option<MapRoot> {
        match self.layout {
            Layout::Map { chunk_size, root } => MapRoot::new(root, self.size, chunk_size).ok(),
            Layout::Recipe { .. } => None,
        }
    }
}

/// A snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The name it was committed under.
    pub name: String,
    /// The snapshot it was derived from: the previous version of the name, or a clone's source.
    pub parent: Option<SnapshotId>,
    /// Commit time, seconds since the Unix epoch.
    pub time: u64,
    /// How it was made (`import disk.qcow2`, `clone gold`).
    pub origin: String,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Members, in order (`disk0` first for a disk).
    pub members: Vec<Member>,
    /// In an encrypted store: `origin` and `labels`, sealed (hex; see
    /// [`crate::crypt::Keys::seal_manifest`]); the two plain fields are then empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// In an encrypted store: keyed BLAKE3 (the manifest key) of the manifest's bytes without
    /// this field, hex, so a keyed reader detects tampering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Manifest {
    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// The first disk member, else the first member.
    pub fn primary(&self) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.kind == MemberKind::Disk)
            .or_else(|| self.members.first())
    }

    /// Guest bytes of all members.
    pub fn logical_size(&self) -> u64 {
        self.members
            .iter()
            .fold(0u64, |a, m| a.saturating_add(m.size))
    }

    /// The manifest's bytes (canonical: field order fixed, labels sorted).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Parses and validates manifest bytes; `object` names them in errors.
    pub fn decode(object: &str, bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(Error::corrupt(
                object,
                0,
                format!(
                    "manifest of {} bytes is over {MAX_MANIFEST_LEN}",
                    bytes.len()
                ),
            ));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
            let at = line_col_offset(bytes, e.line(), e.column());
            Error::corrupt(object, at, format!("manifest: {e}"))
        })?;
        m.validate()
            .map_err(|reason| Error::corrupt(object, 0, reason))?;
        Ok(m)
    }

    /// Checks what serde cannot: version, counts, names, geometry.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is not {MANIFEST_VERSION}",
                self.version
            ));
        }
        check_name(&self.name)?;
        if self.members.len() > MAX_MEMBERS {
            return Err(format!(
                "{} members (at most {MAX_MEMBERS})",
                self.members.len()
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!(
                "{} labels (at most {MAX_LABELS})",
                self.labels.len()
            ));
        }
        if self.sealed.is_some() && (!self.origin.is_empty() || !self.labels.is_empty()) {
            return Err("a manifest with sealed fields has plain origin or labels".into());
        }
        if self.mac.as_ref().is_some_and(|m| m.len() != 64) {
            return Err("manifest mac is not 64 hex digits".into());
        }
        if self.origin.len() > MAX_TEXT
            || self
                .labels
                .iter()
                .any(|(k, v)| k.len() > MAX_TEXT || v.len() > MAX_TEXT)
        {
            return Err("text field over 4096 bytes".into());
        }
        let mut names = BTreeSet::new();
        for m in &self.members {
            if m.name.is_empty() || m.name.len() > 64 || !m.name.bytes().all(name_byte) {
                return Err(format!("bad member name {:?}", m.name));
            }
            if !names.insert(m.name.as_str()) {
                return Err(format!("member {:?} appears twice", m.name));
            }
            if m.size > i64::MAX as u64 {
                return Err(format!("member {} size {} is too large", m.name, m.size));
            }
            match &m.layout {
                Layout::Map { chunk_size, root } => {
                    MapRoot::new(*root, m.size, *chunk_size)
                        .map_err(|e| format!("member {}: {e}", m.name))?;
                }
                Layout::Recipe { cutter, parts, .. } => {
                    if cutter.len() > 64 {
                        return Err(format!("member {}: cutter name too long", m.name));
                    }
                    if parts.len() > MAX_PARTS {
                        return Err(format!(
                            "member {}: {} recipe parts (at most {MAX_PARTS})",
                            m.name,
                            parts.len()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+')
}

/// Checks a snapshot name (a ref): 1..=128 bytes of `[A-Za-z0-9._+-]`, not starting with `.` or
/// `-`.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || name.starts_with('.')
        || name.starts_with('-')
        || !name.bytes().all(name_byte)
    {
        return Err(format!(
            "bad name {name:?}: use 1 to 128 letters, digits, '.', '_', '+' or '-' (not first)"
        ));
    }
    Ok(())
}

fn line_col_offset(bytes: &[u8], line: usize, col: usize) -> u64 {
    let mut at = 0usize;
    for (i, l) in bytes.split(|&b| b == b'\n').enumerate() {
        if i + 1 == line {
            return (at + col.saturating_sub(1)) as u64;
        }
        at += l.len() + 1;
    }
    at as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            name: "gold".into(),
            parent: None,
            time: 1_700_000_000,
            origin: "import gold.qcow2".into(),
            labels: BTreeMap::from([("os".into(), "debian".into())]),
            members: vec![Member {
                name: "disk0".into(),
                kind: MemberKind::Disk,
                size: 1 << 30,
                layout: Layout::Map {
                    chunk_size: 16384,
                    root: Some(ChunkId::of(b"x")),
                },
            }],
            sealed: None,
            mac: None,
        }
    }

    #[test]
    fn round_trips_and_is_canonical() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode("m", &bytes).unwrap(), m);
        assert_eq!(Manifest::decode("m", &bytes).unwrap().encode(), bytes);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"layout\": \"map\""), "{text}");
    }

    #[test]
    fn rejects_bad_fields_naming_the_object() {
        let mut m = sample();
        m.version = 9;
        let e = Manifest::decode("snapshots/ab", &m.encode()).unwrap_err();
        assert!(e.to_string().contains("snapshots/ab"), "{e}");
        let mut m = sample();
        m.members.push(m.members[0].clone());
        assert!(Manifest::decode("m", &m.encode()).is_err());
        let mut m = sample();
        m.members[0].layout = Layout::Map {
            chunk_size: 1000,
            root: None,
        };
        assert!(Manifest::decode("m", &m.encode()).is_err());
        let mut m = sample();
        m.name = "../x".into();
        assert!(Manifest::decode("m", &m.encode()).is_err());
        assert!(Manifest::decode("m", b"{\"version\":1,").is_err());
        assert!(Manifest::decode("m", &vec![b' '; MAX_MANIFEST_LEN + 1]).is_err());
        let text = String::from_utf8(sample().encode()).unwrap();
        let extra = text.replacen("\"version\"", "\"surprise\": 1, \"version\"", 1);
        assert!(Manifest::decode("m", extra.as_bytes()).is_err());
    }
}
