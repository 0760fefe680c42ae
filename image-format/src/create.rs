//! Creating images: [`CreateOptions`], the [`ImageWriter`] every format's writer implements, and
//! [`TempOutput`], which makes a failed conversion leave no file that looks valid.
//!
//! # The writer contract
//!
//! A writer is made by [`crate::Driver::create`] for a new image of a fixed size. The copy engine
//! (crate `convert`) drives it without knowing the format:
//!
//! 1. [`ImageWriter::prepare`] turns guest bytes into what the format stores (compressed clusters,
//!    say). It is pure CPU work and runs on any thread, many at once.
//! 2. [`ImageWriter::commit`] stores a prepared range. With [`WriteOrder::Any`] it is called from
//!    several threads in any order; with [`WriteOrder::Ascending`] (streams, compressed images) it
//!    is called from one thread in ascending guest order, each range after the previous one.
//! 3. Ranges never committed read as zeros (or as the backing file, for an overlay); the engine
//!    commits nothing for them. [`ImageWriter::write_zeroes`] is called only for an overlay, where a
//!    range must read as zeros over data in the backing file.
//! 4. [`ImageWriter::finish`] writes the remaining metadata, makes everything durable and moves the
//!    temporary files into place, the file a reader opens first (the descriptor, the main image)
//!    last. Dropping a writer without finishing removes its temporaries.
//!
//! The engine calls `prepare`/`commit` with ranges aligned to [`ImageWriter::cluster_size`]
//! (the last one may end at the disk's end instead) and never commits the same range twice.

use std::path::{Path, PathBuf};

use crate::blockdev::BlockDeviceMut;
use crate::error::{Error, Result};
use crate::file::ImageFile;

/// What to create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Guest size in bytes.
    pub size: u64,
    /// `-o key=value` options, in the order given. Drivers reject keys they do not know, naming them.
    pub options: Vec<(String, String)>,
    /// `-c`: compress the data (qcow2, streamOptimized VMDK compress anyway).
    pub compress: bool,
    /// `-B`: the backing file an overlay records (qcow2 only).
    pub backing: Option<BackingSpec>,
    /// `--no-sync`: skip the fsyncs that make the finished image durable. The image is complete
    /// when `finish` returns but may still sit in the page cache, so a crash can lose it (qemu-img's
    /// `cache=unsafe`). The rename into place still happens only when the image is complete.
    pub no_sync: bool,
}

/// The backing file a new overlay records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingSpec {
    /// The path as recorded in the image (relative to the image's directory, usually).
    pub recorded: String,
    /// Its format.
    pub format: String,
}

impl CreateOptions {
    /// Parses `key=value,key=value` (as `-o` takes it) into `options`, appending.
    pub fn parse_options(&mut self, text: &str) -> Result<()> {
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| Error::InvalidArgument {
                path: PathBuf::new(),
                reason: format!("option {part:?} is not key=value"),
            })?;
            self.options
                .push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(())
    }

    /// A reader of the options that remembers which were used; see [`OptionReader::finish`].
    pub fn reader(&self, format: &'static str) -> OptionReader<'_> {
        OptionReader {
            options: &self.options,
            used: vec![false; self.options.len()],
            format,
        }
    }
}

/// Reads `-o` options by key; [`OptionReader::finish`] rejects any key nobody asked for.
#[derive(Debug)]
pub struct OptionReader<'a> {
    options: &'a [(String, String)],
    used: Vec<bool>,
    format: &'static str,
}

impl OptionReader<'_> {
    /// The value of `key` (the last one given wins).
    pub fn string(&mut self, key: &str) -> Option<String> {
        let mut found = None;
        for (i, (k, v)) in self.options.iter().enumerate() {
            if k == key {
                self.used[i] = true;
                found = Some(v.clone());
            }
        }
        found
    }

    /// A size (`65536`, `64k`, `2M`, `1G`).
    pub fn size(&mut self, key: &str) -> Result<Option<u64>> {
        self.string(key)
            .map(|v| parse_size(&v).ok_or_else(|| self.bad(key, &v, "a size")))
            .transpose()
    }

    /// A boolean (`on`/`off`, `true`/`false`, `yes`/`no`).
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.string(key)
            .map(|v| match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(self.bad(key, &v, "on or off")),
            })
            .transpose()
    }

    /// One of `choices`.
    pub fn choice(&mut self, key: &str, choices: &[&str]) -> Result<Option<String>> {
        match self.string(key) {
            Some(v) if choices.contains(&v.as_str()) => Ok(Some(v)),
            Some(v) => Err(self.bad(key, &v, &format!("one of {}", choices.join(", ")))),
            None => Ok(None),
        }
    }

    /// An error for an option value.
    pub fn bad(&self, key: &str, value: &str, expected: &str) -> Error {
        Error::InvalidArgument {
            path: PathBuf::new(),
            reason: format!("{} option {key}={value}: expected {expected}", self.format),
        }
    }

    /// Fails naming the first option no call asked for.
    pub fn finish(self) -> Result<()> {
        match self.used.iter().position(|u| !u) {
            Some(i) => Err(Error::InvalidArgument {
                path: PathBuf::new(),
                reason: format!(
                    "the {} format has no option {:?}",
                    self.format, self.options[i].0
                ),
            }),
            None => Ok(()),
        }
    }
}

/// Parses `512`, `64k`, `2M`, `1G`, `1T` (binary units; a trailing `B`/`iB` is allowed).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last()?.to_ascii_lowercase() {
        'k' => (&t[..t.len() - 1], 10),
        'm' => (&t[..t.len() - 1], 20),
        'g' => (&t[..t.len() - 1], 30),
        't' => (&t[..t.len() - 1], 40),
        'p' => (&t[..t.len() - 1], 50),
        _ => (t, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Guest bytes after [`ImageWriter::prepare`].
#[derive(Debug, Default)]
pub struct Prepared {
    /// Guest offset of the range.
    pub off: u64,
    /// Guest length of the range.
    pub len: u64,
    /// The encoded range: one unit for plain writers (the bytes themselves), one per cluster for
    /// compressing writers.
    pub units: Vec<Unit>,
}

/// One encoded piece of a [`Prepared`] range.
#[derive(Debug, Default)]
pub struct Unit {
    /// The bytes to store.
    pub bytes: Vec<u8>,
    /// `bytes` is compressed (else it is the guest data as is).
    pub compressed: bool,
}

impl Prepared {
    /// The range stored as is.
    pub fn plain(off: u64, data: Vec<u8>) -> Self {
        Prepared {
            off,
            len: data.len() as u64,
            units: vec![Unit {
                bytes: data,
                compressed: false,
            }],
        }
    }

    /// Writes the units, in order from `off`, into `file` at the same offsets (raw layouts: a raw
    /// image, a flat extent), refusing bytes past a disk of `size` bytes.
    pub fn write_plain(&self, file: &ImageFile, size: u64) -> Result<()> {
        let mut off = self.off;
        for unit in &self.units {
            let len = unit.bytes.len() as u64;
            if off.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::InvalidArgument {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "write of {len} bytes at {off:#x} past the end of the {size}-byte disk"
                    ),
                });
            }
            file.write_all_at(&unit.bytes, off)?;
            off += len;
        }
        Ok(())
    }
}

/// In which order a writer accepts [`ImageWriter::commit`] calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOrder {
    /// Any order, from several threads at once.
    Any,
    /// Ascending guest offsets, one call at a time.
    Ascending,
}

/// A new image being written. See the module documentation for the contract.
pub trait ImageWriter: Send + Sync {
    /// Guest size in bytes.
    fn size(&self) -> u64;
    /// Allocation unit: the engine aligns ranges on it and skips whole zero units.
    fn cluster_size(&self) -> u64;
    /// Whether commits must come in ascending order.
    fn order(&self) -> WriteOrder;
    /// Encodes guest bytes; CPU only, any thread. The default stores them as they are.
    fn prepare(&self, off: u64, data: Vec<u8>) -> Result<Prepared> {
        Ok(Prepared::plain(off, data))
    }
    /// Stores a prepared range.
    fn commit(&self, prepared: Prepared) -> Result<()>;
    /// Makes a range read as zeros even where a backing file has data (overlays only).
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()>;
    /// Writes the remaining metadata, syncs, and moves the files into place.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// An [`ImageWriter`] over an existing writable device (`convert -n`): plain writes, any order.
#[derive(Debug)]
pub struct DeviceWriter<D> {
    dev: D,
    cluster_size: u64,
}

impl<D: BlockDeviceMut> DeviceWriter<D> {
    /// Writes into `dev`, in units of `cluster_size` bytes.
    pub fn new(dev: D, cluster_size: u64) -> Self {
        DeviceWriter { dev, cluster_size }
    }
}

impl<D: BlockDeviceMut> ImageWriter for DeviceWriter<D> {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }
    fn order(&self) -> WriteOrder {
        WriteOrder::Any
    }
    fn commit(&self, prepared: Prepared) -> Result<()> {
        let mut off = prepared.off;
        for unit in prepared.units {
            self.dev.write_at(&unit.bytes, off)?;
            off += unit.bytes.len() as u64;
        }
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.dev.write_zeroes(off, len)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.dev.flush()
    }
}

/// A file written under a temporary name beside its destination (`.NAME.vmnest-tmp-PID`), moved
/// into place by [`TempOutput::commit`] after an fsync, and removed if dropped uncommitted.
#[derive(Debug)]
pub struct TempOutput {
    file: ImageFile,
    dest: PathBuf,
    committed: bool,
    durable: bool,
}

impl TempOutput {
    /// Creates the temporary file for `dest`, made durable by [`TempOutput::commit`].
    pub fn create(dest: &Path) -> Result<Self> {
        Self::create_with(dest, true)
    }

    /// Creates the temporary file for `dest`; `durable` false skips the fsyncs (`--no-sync`).
    pub fn create_with(dest: &Path, durable: bool) -> Result<Self> {
        let name = dest.file_name().ok_or_else(|| Error::InvalidArgument {
            path: dest.to_path_buf(),
            reason: "destination has no file name".into(),
        })?;
        let tmp = dest.with_file_name(format!(
            ".{}.vmnest-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|source| Error::Io {
                path: tmp.clone(),
                op: "create",
                offset: 0,
                source,
            })?;
        let mut file = ImageFile::open_with(&tmp, true)?;
        if !durable {
            file.disable_writeback();
        }
        Ok(TempOutput {
            file,
            dest: dest.to_path_buf(),
            committed: false,
            durable,
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> &ImageFile {
        &self.file
    }

    /// The final path.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Sets the file's length (sparse).
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .as_file()
            .set_len(len)
            .map_err(|source| Error::Io {
                path: self.file.path().to_path_buf(),
                op: "set length",
                offset: len,
                source,
            })
    }

    /// `fdatasync`, unless the output was made with `--no-sync`. For writers that order their
    /// metadata (data durable before the headers that point at it).
    pub fn sync_if_durable(&self) -> Result<()> {
        if self.durable {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    /// fsyncs the file and renames it to its destination (replacing what was there), then syncs
    /// the directory so the rename is durable too. Without durability (`--no-sync`) it only
    /// renames.
    pub fn commit(mut self) -> Result<()> {
        if self.durable {
            self.file.as_file().sync_all().map_err(|source| Error::Io {
                path: self.file.path().to_path_buf(),
                op: "sync",
                offset: 0,
                source,
            })?;
        }
        std::fs::rename(self.file.path(), &self.dest).map_err(|source| Error::Io {
            path: self.dest.clone(),
            op: "rename into place",
            offset: 0,
            source,
        })?;
        self.committed = true;
        if !self.durable {
            return Ok(());
        }
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(self.file.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn unknown_option_is_named() {
        let mut o = CreateOptions::default();
        o.parse_options("cluster_size=64k,colour=blue").unwrap();
        let mut r = o.reader("qcow2");
        assert_eq!(r.size("cluster_size").unwrap(), Some(65536));
        let err = r.finish().unwrap_err().to_string();
        assert!(err.contains("\"colour\""), "{err}");
    }

    #[test]
    fn bad_option_value_names_key_and_value() {
        let mut o = CreateOptions::default();
        o.parse_options("lazy_refcounts=maybe").unwrap();
        let err = o
            .reader("qcow2")
            .bool("lazy_refcounts")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lazy_refcounts=maybe"), "{err}");
    }

    #[test]
    fn uncommitted_temp_output_leaves_nothing() {
        let dir = std::env::temp_dir().join(format!("vmnest-temp-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.img");
        {
            let t = TempOutput::create(&dest).unwrap();
            t.file().write_all_at(b"half", 0).unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let t = TempOutput::create(&dest).unwrap();
        t.file().write_all_at(b"whole", 0).unwrap();
        t.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
    }
}
