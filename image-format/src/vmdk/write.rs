//! Writing new VMDK disks: the `-o` options, the text descriptor, the binary header and markers
//! (pure encoders, each round-tripped through the readers' parsers in the tests), and
//! [`create`], which picks the writer of the requested subformat.
//!
//! | subformat (`-o subformat=`) | files                        | writer                      | order     |
//! |-----------------------------|------------------------------|-----------------------------|-----------|
//! | `monolithicSparse` (default)| `NAME.vmdk`                  | [`super::write_sparse`]     | any       |
//! | `streamOptimized`           | `NAME.vmdk`                  | [`super::write_stream`]     | ascending |
//! | `monolithicFlat`            | `NAME.vmdk`, `NAME-flat.vmdk`| [`super::write_flat`]       | any       |
//!
//! Other options: `adapter_type` (`ide`, `lsilogic` (default), `buslogic`, `legacyESX`,
//! `lsisas`, `pvscsi`), `hwversion` (default `4`) and `cluster_size` (the grain of the sparse
//! subformats: a power of two from 8 KiB, 64 KiB by default; at most 64 KiB for
//! streamOptimized, since VMware's stream tools refuse larger grains).
//!
//! # `ddb.virtualHWVersion`
//!
//! The disk database's hardware version is informational: the virtual hardware a VM gets comes
//! from its `.vmx` (or, in an OVA, the OVF's `vmx-NN` system type), and VMware's own
//! `vmdk-convert` writes `4` into every streamOptimized disk it makes for OVAs ("obsolete, used by
//! ESX 3.x and older only"). qemu-img also defaults to 4. We do the same; `-o hwversion=N` sets
//! another number for tools that insist.
//!
//! # Sizes
//!
//! VMDK sizes are in 512-byte sectors: a size that is not a multiple of 512 is rounded up, as
//! qemu-img does. Hosted sparse extents store grain and table positions as 32-bit sector numbers,
//! so a monolithicSparse disk is capped at 2 TiB (VMware's own limit) and any sparse file fails
//! cleanly when it would grow past 2 TiB.

use std::path::Path;

use crate::create::{CreateOptions, ImageWriter};
use crate::error::{Error, Result};

use super::descriptor::ExtentType;
use super::header::{
    COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE_TEST,
    MARKER_EOS, MAX_CAPACITY, SECTOR, SparseHeader, SparseKind,
};

/// Sectors reserved for the embedded descriptor (10 KiB, as VMware reserves).
pub const DESCRIPTOR_SECTORS: u64 = 20;
/// Entries per grain table: the only value VMware's disk library accepts.
pub const GTES_PER_GT: u32 = 512;
/// Sectors of one grain table on disk (512 entries of 4 bytes).
pub const GT_SECTORS: u64 = GTES_PER_GT as u64 * 4 / SECTOR;
/// Default grain: 64 KiB (128 sectors), what VMware writes.
pub const DEFAULT_GRAIN: u64 = 64 << 10;
/// Smallest grain accepted: the spec asks for more than 8 sectors (libvmdk refuses 8), so the
/// smallest power of two is 16 sectors.
pub const MIN_GRAIN: u64 = 8 << 10;
/// Largest grain for monolithicSparse.
pub const MAX_SPARSE_GRAIN: u64 = 1 << 20;
/// Largest grain for streamOptimized (VMware's stream tools take at most 128 sectors).
pub const MAX_STREAM_GRAIN: u64 = 64 << 10;
/// Largest monolithicSparse disk: VMware's hosted sparse limit (32-bit sector pointers).
pub const MAX_SPARSE_CAPACITY: u64 = 2 << 40;
/// The last sector a 32-bit grain or table pointer can name, plus one.
pub const MAX_POINTER_SECTORS: u64 = 1 << 32;

/// Which kind of VMDK to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with the descriptor embedded, grain tables preallocated.
    MonolithicSparse,
    /// One compressed sparse file written front to back (OVA disks).
    StreamOptimized,
    /// A descriptor file and one raw extent file.
    MonolithicFlat,
}

impl Subformat {
    /// The `createType` keyword.
    pub fn create_type(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::StreamOptimized => "streamOptimized",
            Subformat::MonolithicFlat => "monolithicFlat",
        }
    }

    const ALL: [Subformat; 3] = [
        Subformat::MonolithicSparse,
        Subformat::StreamOptimized,
        Subformat::MonolithicFlat,
    ];
}

/// `ddb.adapterType`: the controller the disk is meant to sit on (decides the geometry too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterType {
    /// `ide`.
    Ide,
    /// `lsilogic`.
    LsiLogic,
    /// `buslogic`.
    BusLogic,
    /// `legacyESX`.
    LegacyEsx,
    /// `lsisas`.
    LsiSas,
    /// `pvscsi`.
    Pvscsi,
}

impl AdapterType {
    const ALL: [AdapterType; 6] = [
        AdapterType::Ide,
        AdapterType::LsiLogic,
        AdapterType::BusLogic,
        AdapterType::LegacyEsx,
        AdapterType::LsiSas,
        AdapterType::Pvscsi,
    ];

    /// The keyword in the descriptor.
    pub fn keyword(self) -> &'static str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::LsiLogic => "lsilogic",
            AdapterType::BusLogic => "buslogic",
            AdapterType::LegacyEsx => "legacyESX",
            AdapterType::LsiSas => "lsisas",
            AdapterType::Pvscsi => "pvscsi",
        }
    }

    /// Heads of the BIOS geometry: 16 for IDE, 255 for SCSI controllers.
    pub fn heads(self) -> u64 {
        match self {
            AdapterType::Ide => 16,
            _ => 255,
        }
    }
}

/// Sectors per track of the BIOS geometry, for every adapter.
pub const GEOMETRY_SECTORS: u64 = 63;
/// Most cylinders the geometry records.
pub const MAX_CYLINDERS: u64 = 65535;

/// Everything `-o` and the create call decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// What to write.
    pub subformat: Subformat,
    /// Controller.
    pub adapter: AdapterType,
    /// `ddb.virtualHWVersion`.
    pub hw_version: String,
    /// Grain in bytes (sparse subformats).
    pub grain: u64,
    /// Capacity in sectors.
    pub capacity: u64,
    /// fsync the files when finishing (off with `--no-sync`).
    pub durable: bool,
}

/// Reads and validates the options of a new VMDK.
pub fn parse_params(options: &CreateOptions) -> Result<Params> {
    let mut r = options.reader("vmdk");
    let subformat = match r.string("subformat") {
        None => Subformat::MonolithicSparse,
        Some(v) => Subformat::ALL
            .into_iter()
            .find(|s| s.create_type() == v)
            .ok_or_else(|| {
                r.bad(
                    "subformat",
                    &v,
                    "monolithicSparse, streamOptimized or monolithicFlat (the split \
                     twoGbMaxExtent* and vmfs* subformats are not written)",
                )
            })?,
    };
    let adapter = match r.string("adapter_type") {
        None => AdapterType::LsiLogic,
        Some(v) => AdapterType::ALL
            .into_iter()
            .find(|a| a.keyword() == v)
            .ok_or_else(|| {
                let names: Vec<&str> = AdapterType::ALL.iter().map(|a| a.keyword()).collect();
                r.bad("adapter_type", &v, &format!("one of {}", names.join(", ")))
            })?,
    };
    let hw_version = match r.string("hwversion") {
        None => "4".to_string(),
        Some(v) => {
            let ok = !v.is_empty()
                && v.len() <= 3
                && v.bytes().all(|b| b.is_ascii_digit())
                && v.parse::<u32>().is_ok_and(|n| n > 0);
            if !ok {
                return Err(r.bad(
                    "hwversion",
                    &v,
                    "a virtual hardware version number (4, 11, 21...)",
                ));
            }
            v
        }
    };
    let grain = match r.size("cluster_size")? {
        None => DEFAULT_GRAIN,
        Some(g) => {
            let max = match subformat {
                Subformat::MonolithicSparse => MAX_SPARSE_GRAIN,
                Subformat::StreamOptimized => MAX_STREAM_GRAIN,
                Subformat::MonolithicFlat => {
                    return Err(r.bad(
                        "cluster_size",
                        &g.to_string(),
                        "no cluster size: a monolithicFlat disk has no grains",
                    ));
                }
            };
            if !g.is_power_of_two() || !(MIN_GRAIN..=max).contains(&g) {
                return Err(r.bad(
                    "cluster_size",
                    &g.to_string(),
                    &format!("a power of two from {MIN_GRAIN} to {max}"),
                ));
            }
            g
        }
    };
    r.finish()?;
    if options.backing.is_some() {
        return Err(Error::unsupported(
            "a backing file for a new vmdk (delta disks are not written)",
        ));
    }
    if options.compress && subformat != Subformat::StreamOptimized {
        return Err(Error::InvalidArgument {
            path: Default::default(),
            reason: format!(
                "vmdk compression needs subformat=streamOptimized, not {}",
                subformat.create_type()
            ),
        });
    }
    let capacity = options.size.div_ceil(SECTOR);
    let limit = match subformat {
        Subformat::MonolithicSparse => MAX_SPARSE_CAPACITY,
        _ => MAX_CAPACITY,
    };
    if capacity > limit / SECTOR {
        return Err(Error::InvalidArgument {
            path: Default::default(),
            reason: format!(
                "a {} disk holds at most {} TiB, not {} bytes",
                subformat.create_type(),
                limit >> 40,
                options.size
            ),
        });
    }
    Ok(Params {
        subformat,
        adapter,
        hw_version,
        grain,
        capacity,
        durable: !options.no_sync,
    })
}

/// Creates the writer of a new VMDK at `path`.
pub fn create(path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let params = parse_params(options)?;
    let name = recorded_name(path)?;
    let ids = Identity::random()?;
    match params.subformat {
        Subformat::MonolithicSparse => {
            super::write_sparse::SparseWriter::create(path, &name, &params, &ids)
        }
        Subformat::StreamOptimized => {
            super::write_stream::StreamWriter::create(path, &name, &params, &ids)
        }
        Subformat::MonolithicFlat => {
            super::write_flat::FlatWriter::create(path, &name, &params, &ids)
        }
    }
}

/// The file name of `path` as a descriptor records it: quotes and line breaks cannot be.
pub fn recorded_name(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::InvalidArgument {
            path: path.to_path_buf(),
            reason: "destination has no file name".into(),
        })?;
    if name.contains(['"', '\n', '\r', '\0']) {
        return Err(Error::InvalidArgument {
            path: path.to_path_buf(),
            reason: "a vmdk file name cannot hold quotes or line breaks (the descriptor \
                     records it quoted)"
                .into(),
        });
    }
    Ok(name)
}

/// The random identity of a new disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Content id.
    pub cid: u32,
    /// `ddb.longContentID`, 128 bits.
    pub long_content_id: [u8; 16],
    /// `ddb.uuid`.
    pub uuid: [u8; 16],
}

impl Identity {
    /// Fresh ids from `/dev/urandom`.
    pub fn random() -> Result<Self> {
        let mut buf = [0u8; 36];
        random_bytes(&mut buf)?;
        let mut cid = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        // ffffffff means "no parent" and fffffffe is reserved by VMware: never use them.
        if cid >= 0xffff_fffe {
            cid &= 0x7fff_ffff;
        }
        let mut long_content_id = [0u8; 16];
        long_content_id.copy_from_slice(&buf[4..20]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[20..36]);
        Ok(Identity {
            cid,
            long_content_id,
            uuid,
        })
    }
}

/// Fills `buf` from `/dev/urandom`.
fn random_bytes(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    let path = Path::new("/dev/urandom");
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            op: "read",
            offset: 0,
            source,
        })
}

/// One extent line to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentSpec {
    /// `SPARSE` or `FLAT`.
    pub kind: ExtentType,
    /// Guest sectors.
    pub sectors: u64,
    /// File name, relative to the descriptor.
    pub file: String,
}

/// What the descriptor of a new disk says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorSpec {
    /// Random ids.
    pub ids: Identity,
    /// `createType`.
    pub create_type: &'static str,
    /// Extent lines.
    pub extents: Vec<ExtentSpec>,
    /// Controller.
    pub adapter: AdapterType,
    /// `ddb.virtualHWVersion`.
    pub hw_version: String,
}

/// BIOS geometry `(cylinders, heads, sectors)` of a disk of `capacity` sectors on `adapter`:
/// cylinders are the whole tracks the disk holds, at least 1 and at most [`MAX_CYLINDERS`].
pub fn geometry(capacity: u64, adapter: AdapterType) -> (u64, u64, u64) {
    let heads = adapter.heads();
    let cylinders = (capacity / (heads * GEOMETRY_SECTORS)).clamp(1, MAX_CYLINDERS);
    (cylinders, heads, GEOMETRY_SECTORS)
}

/// Writes the descriptor text of a new disk.
pub fn encode_descriptor(spec: &DescriptorSpec) -> String {
    use std::fmt::Write;
    let total: u64 = spec.extents.iter().map(|e| e.sectors).sum();
    let (cyl, heads, sectors) = geometry(total, spec.adapter);
    let mut t = String::new();
    // Writing into a String cannot fail.
    let _ = write!(
        t,
        "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID=ffffffff\ncreateType=\"{}\"\n\n\
         # Extent description\n",
        spec.ids.cid, spec.create_type
    );
    for e in &spec.extents {
        let _ = write!(t, "RW {} {} \"{}\"", e.sectors, e.kind.keyword(), e.file);
        if e.kind == ExtentType::Flat {
            t.push_str(" 0");
        }
        t.push('\n');
    }
    let long_id: String = spec
        .ids
        .long_content_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let u = &spec.ids.uuid;
    let half = |bytes: &[u8]| -> String {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = write!(
        t,
        "\n# The Disk Data Base\n#DDB\n\n\
         ddb.adapterType = \"{}\"\n\
         ddb.geometry.cylinders = \"{cyl}\"\n\
         ddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"{sectors}\"\n\
         ddb.longContentID = \"{long_id}\"\n\
         ddb.uuid = \"{}-{}\"\n\
         ddb.virtualHWVersion = \"{}\"\n",
        spec.adapter.keyword(),
        half(&u[..8]),
        half(&u[8..]),
        spec.hw_version
    );
    t
}

/// The embedded descriptor of a one-file sparse VMDK (monolithicSparse, streamOptimized) whose
/// single extent is the file itself, recorded as `name`.
pub fn single_sparse_descriptor(params: &Params, ids: &Identity, name: &str) -> Result<Vec<u8>> {
    embedded_descriptor(&DescriptorSpec {
        ids: *ids,
        create_type: params.subformat.create_type(),
        extents: vec![ExtentSpec {
            kind: ExtentType::Sparse,
            sectors: params.capacity,
            file: name.to_string(),
        }],
        adapter: params.adapter,
        hw_version: params.hw_version.clone(),
    })
}

/// The descriptor of a monolithic sparse file, NUL-padded to [`DESCRIPTOR_SECTORS`].
pub fn embedded_descriptor(spec: &DescriptorSpec) -> Result<Vec<u8>> {
    let mut text = encode_descriptor(spec).into_bytes();
    let room = (DESCRIPTOR_SECTORS * SECTOR) as usize;
    if text.len() >= room {
        return Err(Error::InvalidArgument {
            path: Default::default(),
            reason: format!(
                "the descriptor takes {} bytes, more than the {room} reserved (file name too long?)",
                text.len()
            ),
        });
    }
    text.resize(room, 0);
    Ok(text)
}

/// Encodes a hosted sparse extent header (`KDMV`), the inverse of
/// [`super::header::parse_hosted`]. `gd_entries` is derived, not stored.
pub fn encode_header(h: &SparseHeader) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..4].copy_from_slice(b"KDMV"); // magicNumber
    b[4..8].copy_from_slice(&h.version.to_le_bytes()); // version
    b[8..12].copy_from_slice(&h.flags.to_le_bytes()); // flags
    b[12..20].copy_from_slice(&h.capacity.to_le_bytes()); // capacity (sectors)
    b[20..28].copy_from_slice(&h.grain_sectors.to_le_bytes()); // grainSize (sectors)
    b[28..36].copy_from_slice(&h.descriptor_offset.to_le_bytes()); // descriptorOffset
    b[36..44].copy_from_slice(&h.descriptor_size.to_le_bytes()); // descriptorSize
    b[44..48].copy_from_slice(&h.gtes_per_gt.to_le_bytes()); // numGTEsPerGT
    b[48..56].copy_from_slice(&h.rgd_offset.to_le_bytes()); // rgdOffset
    b[56..64].copy_from_slice(&h.gd_offset.to_le_bytes()); // gdOffset
    b[64..72].copy_from_slice(&h.overhead.to_le_bytes()); // overHead
    b[72] = u8::from(h.unclean_shutdown); // uncleanShutdown
    b[73..77].copy_from_slice(b"\n \r\n"); // newline test characters
    b[77..79].copy_from_slice(&h.compress_algorithm.to_le_bytes()); // compressAlgorithm
    b
}

/// The header of a new sparse extent, before the layout fills in offsets.
pub fn new_header(params: &Params, stream: bool) -> SparseHeader {
    let grain_sectors = params.grain / SECTOR;
    let coverage = grain_sectors * u64::from(GTES_PER_GT);
    SparseHeader {
        kind: SparseKind::Hosted,
        version: if stream { 3 } else { 1 },
        flags: if stream {
            FLAG_VALID_NEWLINE_TEST | FLAG_COMPRESSED | FLAG_MARKERS
        } else {
            FLAG_VALID_NEWLINE_TEST | FLAG_REDUNDANT_GT
        },
        capacity: params.capacity,
        grain_sectors,
        descriptor_offset: 1,
        descriptor_size: DESCRIPTOR_SECTORS,
        gtes_per_gt: GTES_PER_GT,
        rgd_offset: 0,
        gd_offset: 0,
        gd_entries: params.capacity.div_ceil(coverage),
        overhead: 0,
        unclean_shutdown: false,
        compress_algorithm: if stream { COMPRESSION_DEFLATE } else { 0 },
    }
}

/// Checks an encoded header with the reader's parser, so a disk this writer makes is one the
/// reader (and its caps) accepts.
pub fn validate_header(h: &SparseHeader) -> Result<()> {
    let parsed = super::header::parse_hosted(&encode_header(h), 0)?;
    if parsed != *h {
        return Err(Error::InvalidArgument {
            path: Default::default(),
            reason: "internal: the sparse header does not round-trip".into(),
        });
    }
    Ok(())
}

/// Sectors of a grain directory of `entries` entries (at least one sector).
pub fn gd_sectors(entries: u64) -> u64 {
    (entries * 4).div_ceil(SECTOR).max(1)
}

/// A metadata marker sector: `sectors` of metadata of `kind` (`MARKER_*`) follow.
pub fn encode_metadata_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&sectors.to_le_bytes()); // numSectors
    // 8..12: size, 0 for metadata markers.
    b[12..16].copy_from_slice(&kind.to_le_bytes()); // type
    b
}

/// The end-of-stream marker: a sector of zeros.
pub fn encode_eos_marker() -> [u8; 512] {
    encode_metadata_marker(0, MARKER_EOS)
}

/// The 12-byte head of a grain marker: guest sector `lba`, then `size` bytes of deflate data.
pub fn encode_grain_marker_head(lba: u64, size: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..12].copy_from_slice(&size.to_le_bytes());
    b
}

/// Grain and table pointers are 32-bit sector numbers: refuses a file that outgrows them.
pub fn pointer(sector: u64, path: &Path) -> Result<u32> {
    u32::try_from(sector).map_err(|_| Error::Unsupported {
        path: path.to_path_buf(),
        what: "a sparse vmdk file larger than 2 TiB (grain pointers are 32-bit sector numbers)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::descriptor;
    use super::super::header::{self, GD_AT_END, MARKER_GD, MARKER_GT, Marker};
    use super::*;

    fn ids() -> Identity {
        Identity {
            cid: 0x1234_abcd,
            long_content_id: [0xab; 16],
            uuid: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        }
    }

    fn spec(adapter: AdapterType) -> DescriptorSpec {
        DescriptorSpec {
            ids: ids(),
            create_type: "monolithicFlat",
            extents: vec![ExtentSpec {
                kind: ExtentType::Flat,
                sectors: 41_943_040,
                file: "disk one-flat.vmdk".into(),
            }],
            adapter,
            hw_version: "4".into(),
        }
    }

    fn opts(text: &str) -> CreateOptions {
        let mut o = CreateOptions {
            size: 1 << 30,
            ..CreateOptions::default()
        };
        o.parse_options(text).unwrap();
        o
    }

    #[test]
    fn descriptor_round_trips_through_the_parser() {
        let text = encode_descriptor(&spec(AdapterType::LsiLogic));
        let d = descriptor::parse(text.as_bytes(), 0).unwrap();
        assert_eq!(d.version, Some(1));
        assert_eq!(d.cid, Some(0x1234_abcd));
        assert!(!d.has_parent());
        assert_eq!(d.create_type.as_deref(), Some("monolithicFlat"));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, ExtentType::Flat);
        assert_eq!(d.extents[0].sectors, 41_943_040);
        assert_eq!(d.extents[0].filename, "disk one-flat.vmdk");
        assert_eq!(d.extents[0].offset_sectors, 0);
        assert_eq!(d.ddb("ddb.adapterType"), Some("lsilogic"));
        assert_eq!(d.ddb("ddb.geometry.heads"), Some("255"));
        assert_eq!(d.ddb("ddb.geometry.sectors"), Some("63"));
        assert_eq!(d.ddb("ddb.geometry.cylinders"), Some("2610"));
        assert_eq!(d.ddb("ddb.virtualHWVersion"), Some("4"));
        assert_eq!(
            d.ddb("ddb.longContentID"),
            Some("abababababababababababababababab")
        );
        assert_eq!(
            d.ddb("ddb.uuid"),
            Some("01 02 03 04 05 06 07 08-09 0a 0b 0c 0d 0e 0f 10")
        );
        assert!(text.starts_with("# Disk DescriptorFile\n"));
        assert_eq!(descriptor::probe_text(text.as_bytes()), 90);
    }

    #[test]
    fn ide_geometry_has_16_heads_and_cylinders_are_capped() {
        assert_eq!(geometry(41_943_040, AdapterType::Ide), (41610, 16, 63));
        assert_eq!(geometry(1 << 40, AdapterType::Ide), (65535, 16, 63));
        assert_eq!(geometry(100, AdapterType::BusLogic), (1, 255, 63));
        let d =
            descriptor::parse(encode_descriptor(&spec(AdapterType::Ide)).as_bytes(), 0).unwrap();
        assert_eq!(d.ddb("ddb.adapterType"), Some("ide"));
        assert_eq!(d.ddb("ddb.geometry.heads"), Some("16"));
    }

    #[test]
    fn sparse_extent_line_has_no_offset_and_embedded_text_is_nul_padded() {
        let mut s = spec(AdapterType::BusLogic);
        s.create_type = "monolithicSparse";
        s.extents[0].kind = ExtentType::Sparse;
        let text = embedded_descriptor(&s).unwrap();
        assert_eq!(text.len(), 20 * 512);
        assert!(
            String::from_utf8_lossy(&text).contains("RW 41943040 SPARSE \"disk one-flat.vmdk\"\n")
        );
        let d = descriptor::parse(&text, 512).unwrap();
        assert_eq!(d.extents[0].kind, ExtentType::Sparse);
    }

    #[test]
    fn random_identities_differ_and_avoid_reserved_cids() {
        let a = Identity::random().unwrap();
        let b = Identity::random().unwrap();
        assert_ne!(a, b);
        assert!(a.cid < 0xffff_fffe && b.cid < 0xffff_fffe);
    }

    #[test]
    fn headers_round_trip_through_the_parser() {
        let p = parse_params(&opts("")).unwrap();
        let mut h = new_header(&p, false);
        h.rgd_offset = 21;
        h.gd_offset = 30;
        h.overhead = 128;
        let parsed = header::parse_hosted(&encode_header(&h), 0).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.flags, 0x3);
        let mut s = new_header(&p, true);
        s.gd_offset = GD_AT_END;
        s.overhead = 128;
        let parsed = header::parse_hosted(&encode_header(&s), 0).unwrap();
        assert_eq!(parsed, s);
        assert_eq!((parsed.version, parsed.flags), (3, 0x30001));
        assert_eq!(parsed.compress_algorithm, 1);
        assert!(validate_header(&s).is_ok());
    }

    #[test]
    fn markers_round_trip_through_the_parser() {
        assert_eq!(
            header::parse_marker(&encode_metadata_marker(4, MARKER_GT), 0).unwrap(),
            Marker::Metadata {
                sectors: 4,
                kind: MARKER_GT
            }
        );
        assert_eq!(
            header::parse_marker(&encode_metadata_marker(1, MARKER_GD), 0).unwrap(),
            Marker::Metadata {
                sectors: 1,
                kind: MARKER_GD
            }
        );
        assert_eq!(encode_eos_marker(), [0u8; 512]);
        let mut g = encode_grain_marker_head(256, 1000).to_vec();
        g.resize(16, 0);
        assert_eq!(
            header::parse_marker(&g, 0).unwrap(),
            Marker::Grain {
                lba: 256,
                size: 1000
            }
        );
    }

    #[test]
    fn options_default_to_monolithic_sparse_lsilogic_hw4_64k() {
        let p = parse_params(&opts("")).unwrap();
        assert_eq!(
            p,
            Params {
                subformat: Subformat::MonolithicSparse,
                adapter: AdapterType::LsiLogic,
                hw_version: "4".into(),
                grain: 65536,
                capacity: 2 << 20,
                durable: true,
            }
        );
        let p = parse_params(&opts(
            "subformat=streamOptimized,adapter_type=ide,hwversion=11",
        ))
        .unwrap();
        assert_eq!(p.subformat, Subformat::StreamOptimized);
        assert_eq!(p.adapter, AdapterType::Ide);
        assert_eq!(p.hw_version, "11");
    }

    #[test]
    fn bad_options_are_named() {
        let err = |t: &str| parse_params(&opts(t)).unwrap_err().to_string();
        let e = err("subformat=twoGbMaxExtentSparse");
        assert!(
            e.contains("subformat=twoGbMaxExtentSparse") && e.contains("streamOptimized"),
            "{e}"
        );
        let e = err("adapter_type=scsi");
        assert!(
            e.contains("adapter_type=scsi") && e.contains("pvscsi"),
            "{e}"
        );
        assert!(err("hwversion=x1").contains("hwversion=x1"));
        assert!(err("cluster_size=12k").contains("power of two"));
        assert!(err("cluster_size=4k").contains("from 8192"));
        assert!(err("subformat=streamOptimized,cluster_size=128k").contains("cluster_size"));
        assert!(err("subformat=monolithicFlat,cluster_size=64k").contains("no grains"));
        assert!(err("colour=blue").contains("\"colour\""));
    }

    #[test]
    fn compression_needs_stream_and_backing_is_refused() {
        let mut o = opts("");
        o.compress = true;
        assert!(
            parse_params(&o)
                .unwrap_err()
                .to_string()
                .contains("streamOptimized")
        );
        o.options = vec![("subformat".into(), "streamOptimized".into())];
        assert!(parse_params(&o).is_ok());
        let mut o = opts("");
        o.backing = Some(crate::create::BackingSpec {
            recorded: "b.vmdk".into(),
            format: "vmdk".into(),
        });
        assert!(parse_params(&o).is_err());
    }

    #[test]
    fn sizes_round_up_to_sectors_and_sparse_is_capped_at_2_tib() {
        let mut o = opts("");
        o.size = 1000;
        assert_eq!(parse_params(&o).unwrap().capacity, 2);
        o.size = 3 << 40;
        assert!(parse_params(&o).unwrap_err().to_string().contains("2 TiB"));
        o.options = vec![("subformat".into(), "streamOptimized".into())];
        assert!(parse_params(&o).is_ok());
    }

    #[test]
    fn pointers_past_2_tib_are_refused() {
        assert_eq!(pointer(5, Path::new("x")).unwrap(), 5);
        assert!(pointer(1 << 32, Path::new("x")).is_err());
    }
}
