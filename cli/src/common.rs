//! Options and output helpers shared by the subcommands.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use image_format::{BlockDeviceMut, Image, OpenOptions};

/// The options of every long job (convert, import, export, restore): progress, threads, summary.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct JobArgs {
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Worker threads (default: 4 per core, 4 to 16).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Summary format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    #[default]
    Human,
    /// For scripts.
    Json,
}

/// Options for opening an image, common to every subcommand that reads one.
#[derive(Clone, Debug, clap::Args)]
pub struct OpenArgs {
    /// Follow backing, parent and extent paths that lead out of the image's directory.
    #[arg(long)]
    pub allow_external_paths: bool,
    /// Cap on the number of images in a backing chain.
    #[arg(long, default_value_t = image_format::registry::DEFAULT_MAX_CHAIN_DEPTH)]
    pub max_chain_depth: usize,
    /// Bytes of decoded frames a `remote:` source keeps in memory (set by `restore
    /// --frame-cache`; default [`dedup_store::remote::REMOTE_FRAME_CACHE`]).
    #[arg(skip)]
    pub remote_frame_cache: Option<usize>,
}

/// The arguments of a subcommand that reads one image: `[-f FMT] [--output human|json] IMAGE`.
#[derive(Clone, Debug, clap::Args)]
pub struct ImageArgs {
    /// Image format (probed when absent).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub open: OpenArgs,
    /// The image.
    pub image: std::path::PathBuf,
}

impl ImageArgs {
    /// Opens the image read-only.
    pub fn open(&self) -> Result<Arc<dyn Image>> {
        open_image(&self.image, self.format.as_deref(), &self.open)
    }
}

/// Opens `path` read-only, with `format` if given, else probing; `store:NAME[@SNAP][/MEMBER]`
/// opens a stored snapshot.
pub fn open_image(path: &Path, format: Option<&str>, args: &OpenArgs) -> Result<Arc<dyn Image>> {
    if let Some((spec, member)) = path
        .to_str()
        .and_then(crate::store_args::parse_store_source)
    {
        return Ok(crate::store_args::open_stored(spec, member)?);
    }
    if let Some((remote, spec, member)) = path
        .to_str()
        .and_then(crate::store_args::parse_remote_source)
    {
        let frame_cache = args
            .remote_frame_cache
            .unwrap_or(dedup_store::remote::REMOTE_FRAME_CACHE);
        return Ok(crate::store_args::open_remote_stored(
            remote,
            spec,
            member,
            frame_cache,
        )?);
    }
    let options = OpenOptions {
        format: format.map(str::to_string),
        writable: false,
        allow_external_paths: args.allow_external_paths,
        max_chain_depth: args.max_chain_depth,
        open_backing: true,
    };
    Ok(image_format::open(path, &options)?)
}

/// How [`open_source`] opens a source.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceOptions<'a> {
    /// The image format (probed when absent).
    pub format: Option<&'a str>,
    /// Open for writing.
    pub writable: bool,
}

/// Opens what a command names as a SOURCE: for now an image file in any format. This is the
/// one place that turns a source spec into an image, so other kinds of sources (a stored
/// snapshot, `store:NAME[@SNAP]`) are added here once and every command takes them.
pub fn open_source(spec: &str, how: &SourceOptions<'_>, args: &OpenArgs) -> Result<Arc<dyn Image>> {
    let path = Path::new(spec);
    if !how.writable {
        return open_image(path, how.format, args);
    }
    let options = OpenOptions {
        format: how.format.map(str::to_string),
        writable: true,
        allow_external_paths: args.allow_external_paths,
        max_chain_depth: args.max_chain_depth,
        open_backing: true,
    };
    Ok(image_format::open(path, &options)?)
}

/// Opens an image file SOURCE for writing in place, for `what` (`served`, `mounted`). The format is
/// learnt read-only first, so a format that cannot be written in place is refused by name before
/// its file is ever opened for writing.
pub fn open_source_mut(
    spec: &str,
    format: Option<&str>,
    args: &OpenArgs,
    what: &str,
) -> Result<Arc<dyn BlockDeviceMut>> {
    let read_only = SourceOptions {
        format,
        writable: false,
    };
    let image = open_source(spec, &read_only, args)?;
    let found = image.format();
    if !image.writes_in_place() {
        bail!(
            "{spec}: {found} images cannot be {what} writable (--rw) here: vmnest writes raw, \
             qcow2 and fixed or dynamic VHD (vpc) images in place, not this one"
        );
    }
    drop(image);
    let writable = SourceOptions {
        format,
        writable: true,
    };
    let image = open_source(spec, &writable, args)?;
    let found = image.format();
    image
        .into_mut_device()
        .with_context(|| format!("{spec}: the {found} driver cannot write this image in place"))
}

/// `1.5 MiB`, as qemu-img prints sizes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A path for display.
pub fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// The chain of images from `top` down through its backing files.
pub fn chain(top: &Arc<dyn Image>) -> Vec<Arc<dyn Image>> {
    let mut out = vec![Arc::clone(top)];
    while let Some(next) = out.last().and_then(|i| i.backing()).cloned() {
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_read_like_qemu_img() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(1536 << 10), "1.5 MiB");
        assert_eq!(human_size(136365211648), "127 GiB");
    }
}
