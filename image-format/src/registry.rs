//! The format registry: scored probing, and opening an image with its backing chain.
//!
//! # Probing
//!
//! Every driver scores the first [`PROBE_HEAD`] bytes and the last [`PROBE_TAIL`] bytes of a file
//! (VHD keeps its footer at the end) from 0 (not mine) to 100 (magic and checksum agree). The
//! highest score wins, the first registered on a tie; raw scores 1, so it wins only when nothing
//! else claims the file.
//!
//! # Safety rules for opening
//!
//! * A raw image found by probing is opened read-only: writing to a file whose format was guessed
//!   could turn a guest's bytes into a header. Name the format (`-f raw`) to write.
//! * Backing files, parents and extents are resolved relative to the directory of the image that
//!   names them, and must stay inside it unless [`OpenOptions::allow_external_paths`] is set.
//! * A backing file that cannot be opened is an error, never zeros.
//! * Chains are capped at [`OpenOptions::max_chain_depth`] images.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::create::{CreateOptions, ImageWriter};
use crate::error::{Error, Result};
use crate::file::ImageFile;
use crate::image::Image;

/// Bytes from the start of a file that drivers probe.
pub const PROBE_HEAD: usize = 64 * 1024;
/// Bytes from the end of a file that drivers probe.
pub const PROBE_TAIL: usize = 4 * 1024;
/// Default cap on the length of a backing chain.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 64;

/// What a driver sees when it is asked whether a file is its format.
#[derive(Debug)]
pub struct Probe<'a> {
    /// Up to [`PROBE_HEAD`] bytes from the start.
    pub head: &'a [u8],
    /// Up to [`PROBE_TAIL`] bytes from the end.
    pub tail: &'a [u8],
    /// Length of the file.
    pub file_len: u64,
}

/// A format driver.
pub trait Driver: Send + Sync {
    /// The format's name, as `-f` takes it.
    fn name(&self) -> &'static str;
    /// Other names `-f` accepts (`vhd` for `vpc`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }
    /// 0 (not this format) to 100 (certain).
    fn probe(&self, probe: &Probe<'_>) -> u32;
    /// Opens the image that `ctx` names.
    fn open(&self, ctx: &OpenContext<'_>) -> Result<Arc<dyn Image>>;
    /// Starts writing a new image at `path` (see [`crate::create`]). Formats without a writer
    /// return [`Error::Unsupported`].
    fn create(&self, path: &Path, options: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
        let _ = options;
        Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!("creating {} images", self.name()),
        })
    }
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The format, or `None` to probe.
    pub format: Option<String>,
    /// Open for writing.
    pub writable: bool,
    /// Follow backing, parent and extent paths out of the image's directory.
    pub allow_external_paths: bool,
    /// Cap on the number of images in the chain.
    pub max_chain_depth: usize,
    /// Open backing files (off: the chain is recorded but not opened; reads of unallocated
    /// ranges then fail instead of returning zeros).
    pub open_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            writable: false,
            allow_external_paths: false,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            open_backing: true,
        }
    }
}

/// Everything a driver needs to open one image of a chain.
#[derive(Debug)]
pub struct OpenContext<'a> {
    /// The image file, opened.
    pub file: ImageFile,
    /// The options of the whole open.
    pub options: &'a OpenOptions,
    /// The format was named by the user or by the overlay, not guessed.
    pub format_explicit: bool,
    /// Position in the chain: 0 for the image the user named.
    pub depth: usize,
    /// The registry, for opening backing files.
    pub registry: &'a Registry,
}

impl OpenContext<'_> {
    /// The image's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// True when the caller wants to write.
    pub fn writable(&self) -> bool {
        self.options.writable && self.depth == 0
    }

    /// Resolves a path that the image records (`what` names it in errors: "backing file",
    /// "parent", "extent"), enforcing the directory rule.
    pub fn resolve_related(&self, what: &'static str, recorded: &str) -> Result<PathBuf> {
        resolve_related_path(
            self.path(),
            what,
            recorded,
            self.options.allow_external_paths,
        )
    }

    /// Opens the backing file the image records, read-only, probing its format unless
    /// `format` names one. A backing file that cannot be opened is an error.
    pub fn open_backing(&self, recorded: &str, format: Option<&str>) -> Result<Arc<dyn Image>> {
        let target = self.resolve_related("backing file", recorded)?;
        if self.depth + 1 >= self.options.max_chain_depth {
            return Err(Error::ChainTooDeep {
                path: self.path().to_path_buf(),
                max: self.options.max_chain_depth,
            });
        }
        let file = ImageFile::open(&target).map_err(|err| match err {
            Error::Io { source, .. } => Error::MissingFile {
                path: self.path().to_path_buf(),
                what: "backing file",
                target: target.clone(),
                source,
            },
            other => other,
        })?;
        self.registry
            .open_file(file, self.options, format, self.depth + 1)
    }
}

/// Resolves `recorded`, a path found inside `image`, against the image's directory. Unless
/// `allow_external` is set, the result must lie inside that directory (checked lexically and,
/// when the file exists, after resolving symbolic links).
pub fn resolve_related_path(
    image: &Path,
    what: &'static str,
    recorded: &str,
    allow_external: bool,
) -> Result<PathBuf> {
    if recorded.is_empty() || recorded.contains('\0') {
        return Err(Error::corrupt(what, 0, format!("invalid path {recorded:?}")).in_file(image));
    }
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let recorded_path = Path::new(recorded);
    let joined = if recorded_path.is_absolute() {
        recorded_path.to_path_buf()
    } else {
        dir.join(recorded_path)
    };
    if allow_external {
        return Ok(joined);
    }
    let outside = || Error::PathOutsideDirectory {
        path: image.to_path_buf(),
        what,
        target: joined.clone(),
        dir: dir.to_path_buf(),
    };
    let canon_dir = dir.canonicalize().map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        op: "resolve directory",
        offset: 0,
        source,
    })?;
    // Lexical check first, so a missing target is still judged.
    let lexical = if recorded_path.is_absolute() {
        normalize(recorded_path)
    } else {
        normalize(&canon_dir.join(recorded_path))
    };
    if !lexical.starts_with(&canon_dir) {
        return Err(outside());
    }
    if let Ok(real) = joined.canonicalize()
        && !real.starts_with(&canon_dir)
    {
        return Err(outside());
    }
    Ok(joined)
}

/// Removes `.` and resolves `..` without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for comp in path.components() {
        match comp {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The set of format drivers.
pub struct Registry {
    drivers: Vec<Box<dyn Driver>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.drivers.iter().map(|d| d.name()))
            .finish()
    }
}

impl Registry {
    /// A registry of the given drivers.
    pub fn new(drivers: Vec<Box<dyn Driver>>) -> Self {
        Registry { drivers }
    }

    /// The names of the registered formats.
    pub fn formats(&self) -> Vec<&'static str> {
        self.drivers.iter().map(|d| d.name()).collect()
    }

    /// The driver for a format name or alias.
    pub fn driver(&self, name: &str) -> Option<&dyn Driver> {
        self.drivers
            .iter()
            .find(|d| d.name() == name || d.aliases().contains(&name))
            .map(|d| d.as_ref())
    }

    /// Scores every driver on `file` and returns the best, with its score.
    pub fn probe(&self, file: &ImageFile) -> Result<(&dyn Driver, u32)> {
        let head_len = (file.len().min(PROBE_HEAD as u64)) as usize;
        let head = file.read_vec(0, head_len, "probe head")?;
        let tail_len = file.len().min(PROBE_TAIL as u64);
        let tail = file.read_vec(file.len() - tail_len, tail_len as usize, "probe tail")?;
        let probe = Probe {
            head: &head,
            tail: &tail,
            file_len: file.len(),
        };
        let mut best: Option<(&dyn Driver, u32)> = None;
        for driver in &self.drivers {
            let score = driver.probe(&probe);
            // Strictly greater: on a tie the driver registered first keeps the file.
            if score > 0 && best.is_none_or(|(_, s)| score > s) {
                best = Some((driver.as_ref(), score));
            }
        }
        best.ok_or_else(|| Error::UnknownFormat {
            path: file.path().to_path_buf(),
        })
    }

    /// Starts writing a new `format` image at `path`.
    pub fn create(
        &self,
        format: &str,
        path: &Path,
        options: &CreateOptions,
    ) -> Result<Box<dyn ImageWriter>> {
        let driver = self.driver(format).ok_or_else(|| Error::InvalidArgument {
            path: path.to_path_buf(),
            reason: format!(
                "unknown format {format:?} (known: {})",
                self.formats().join(", ")
            ),
        })?;
        driver.create(path, options).map_err(|e| e.in_file(path))
    }

    /// Opens the image at `path` and its backing chain.
    pub fn open(&self, path: &Path, options: &OpenOptions) -> Result<Arc<dyn Image>> {
        let file = ImageFile::open_with(path, options.writable)?;
        let format = options.format.clone();
        self.open_file(file, options, format.as_deref(), 0)
    }

    fn open_file(
        &self,
        file: ImageFile,
        options: &OpenOptions,
        format: Option<&str>,
        depth: usize,
    ) -> Result<Arc<dyn Image>> {
        if depth >= options.max_chain_depth {
            return Err(Error::ChainTooDeep {
                path: file.path().to_path_buf(),
                max: options.max_chain_depth,
            });
        }
        let (driver, explicit) = match format {
            Some(name) => {
                let driver = self.driver(name).ok_or_else(|| Error::InvalidArgument {
                    path: file.path().to_path_buf(),
                    reason: format!(
                        "unknown format {name:?} (known: {})",
                        self.formats().join(", ")
                    ),
                })?;
                (driver, true)
            }
            None => (self.probe(&file)?.0, false),
        };
        if options.writable && depth == 0 && !explicit && driver.name() == "raw" {
            return Err(Error::ReadOnly {
                path: file.path().to_path_buf(),
                reason: "format probed as raw; name it (-f raw) to open it for writing".into(),
            });
        }
        let ctx = OpenContext {
            file,
            options,
            format_explicit: explicit,
            depth,
            registry: self,
        };
        let path = ctx.path().to_path_buf();
        driver.open(&ctx).map_err(|e| e.in_file(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = crate::scratch::path("registry", name);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        dir
    }

    #[test]
    fn related_path_inside_directory_is_accepted() {
        let dir = scratch_dir("inside");
        let image = dir.join("top.qcow2");
        let got = resolve_related_path(&image, "backing file", "sub/base.qcow2", false).unwrap();
        assert_eq!(got, dir.join("sub/base.qcow2"));
    }

    #[test]
    fn related_path_escaping_with_dotdot_is_refused() {
        let dir = scratch_dir("dotdot");
        let image = dir.join("top.qcow2");
        let err = resolve_related_path(&image, "backing file", "../etc/passwd", false).unwrap_err();
        assert!(matches!(err, Error::PathOutsideDirectory { .. }), "{err}");
    }

    #[test]
    fn related_absolute_path_outside_is_refused_unless_allowed() {
        let dir = scratch_dir("abs");
        let image = dir.join("top.vmdk");
        assert!(resolve_related_path(&image, "extent", "/etc/passwd", false).is_err());
        assert_eq!(
            resolve_related_path(&image, "extent", "/etc/passwd", true).unwrap(),
            PathBuf::from("/etc/passwd")
        );
    }

    #[test]
    fn related_path_through_symlink_out_is_refused() {
        let dir = scratch_dir("symlink");
        let link = dir.join("escape");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let image = dir.join("top.qcow2");
        assert!(resolve_related_path(&image, "backing file", "escape", false).is_err());
    }
}
