//! `vmnest convert` and `vmnest create`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use convert::{ConvertOptions, ConvertStats, Progress};
use image_format::create::{BackingSpec, DeviceWriter};
use image_format::file::ImageFile;
use image_format::raw::RawImage;
use image_format::{BlockDevice, CreateOptions, ImageWriter};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{JobArgs, OpenArgs, Output, open_image, print_json, shown};
use crate::presets::{self, Target};

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format (probed when absent).
    #[arg(short = 'f')]
    pub(crate) source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O')]
    pub(crate) format: Option<String>,
    /// Where the image is going: picks the format and options hypervisors accept.
    #[arg(long = "for", value_enum)]
    pub(crate) target: Option<Target>,
    /// Format options, `key=value,...` (repeatable).
    #[arg(short = 'o')]
    pub(crate) options: Vec<String>,
    /// Compress the output (qcow2; streamOptimized VMDK always compresses).
    #[arg(short = 'c')]
    pub(crate) compress: bool,
    /// Make the output an overlay on this backing file, holding only what differs (qcow2).
    #[arg(short = 'B')]
    pub(crate) backing: Option<String>,
    /// Format of the backing file (probed when absent).
    #[arg(short = 'F')]
    pub(crate) backing_format: Option<String>,
    /// Write into the existing destination instead of creating it (raw targets).
    #[arg(short = 'n')]
    pub(crate) no_create: bool,
    /// With -n: the destination already reads as zeros, so zero ranges are skipped.
    #[arg(long)]
    pub(crate) target_is_zero: bool,
    /// Replace an existing destination.
    #[arg(long)]
    pub(crate) force: bool,
    /// Do not fsync the finished image (qemu-img's cache=unsafe): faster, but a crash soon after
    /// can lose it. It is still renamed into place only when complete.
    #[arg(long)]
    pub(crate) no_sync: bool,
    #[command(flatten)]
    pub(crate) job: JobArgs,
    #[command(flatten)]
    pub(crate) open: OpenArgs,
    /// Source image.
    pub(crate) src: PathBuf,
    /// Destination.
    pub(crate) dst: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Format.
    #[arg(short = 'f')]
    format: Option<String>,
    /// Where the image is going: picks the format and options hypervisors accept.
    #[arg(long = "for", value_enum)]
    target: Option<Target>,
    /// Format options, `key=value,...` (repeatable).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file of the new overlay (qcow2).
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file (probed when absent).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    open: OpenArgs,
    /// The new image.
    dst: PathBuf,
    /// Guest size (512, 64k, 10G, ...); with -B, defaults to the backing file's size.
    size: Option<String>,
}

pub(crate) struct Bar(pub(crate) ProgressBar);

/// A progress bar over `size` bytes when `show`.
pub(crate) fn bar(show: bool, size: u64) -> Option<Bar> {
    show.then(|| {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar(bar)
    })
}

impl Progress for Bar {
    fn progress(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

/// The preset's options, then the user's `-o` (later keys win).
fn create_options(preset: &str, user: &[String], size: u64) -> Result<CreateOptions> {
    let mut o = CreateOptions {
        size,
        ..Default::default()
    };
    o.parse_options(preset)?;
    for text in user {
        o.parse_options(text)
            .with_context(|| format!("-o {text}"))?;
    }
    Ok(o)
}

/// Opens a backing file named on the command line: relative paths are relative to the new
/// image's directory, as the image will record them.
fn open_backing(
    dst: &Path,
    recorded: &str,
    format: Option<&str>,
    open: &OpenArgs,
) -> Result<(Arc<dyn image_format::Image>, String)> {
    let path = if Path::new(recorded).is_absolute() {
        PathBuf::from(recorded)
    } else {
        dst.parent().unwrap_or(Path::new(".")).join(recorded)
    };
    let image = open_image(&path, format, open)
        .with_context(|| format!("backing file {}", shown(&path)))?;
    let fmt = image.format().to_string();
    Ok((image, fmt))
}

fn check_destination(dst: &Path, force: bool) -> Result<()> {
    if dst.exists() && !force {
        bail!(
            "{} exists: use --force to replace it, or -n to write into it",
            shown(dst)
        );
    }
    Ok(())
}

pub fn run_convert(args: ConvertArgs) -> Result<u8> {
    let (format, preset) = presets::resolve(args.format.as_deref(), args.target)?;
    if args.target_is_zero && !args.no_create {
        bail!("--target-is-zero goes with -n");
    }
    let src = open_image(&args.src, args.source_format.as_deref(), &args.open)?;
    let size = src.size();
    let mut engine = ConvertOptions {
        threads: args.job.threads,
        ..Default::default()
    };
    let writer: Box<dyn ImageWriter> = if args.no_create {
        if args.backing.is_some() {
            bail!("-B creates an overlay; it cannot go with -n");
        }
        if format != "raw" {
            bail!("-n writes into existing raw images and block devices only, not {format}");
        }
        let file = ImageFile::open_with(&args.dst, true)
            .with_context(|| format!("destination {}", shown(&args.dst)))?;
        let raw = RawImage::new(file);
        if raw.size() < size {
            bail!(
                "{} holds {} bytes, less than the {size}-byte source",
                shown(&args.dst),
                raw.size()
            );
        }
        engine.target_not_zero = !args.target_is_zero;
        Box::new(DeviceWriter::new(raw, 64 << 10))
    } else {
        check_destination(&args.dst, args.force)?;
        let mut options = create_options(preset, &args.options, size)?;
        options.compress = args.compress;
        options.no_sync = args.no_sync;
        if let Some(recorded) = &args.backing {
            let (image, fmt) = open_backing(
                &args.dst,
                recorded,
                args.backing_format.as_deref(),
                &args.open,
            )?;
            options.backing = Some(BackingSpec {
                recorded: recorded.clone(),
                format: fmt,
            });
            engine.backing = Some(image);
        }
        image_format::default_registry().create(&format, &args.dst, &options)?
    };
    let bar = bar(args.job.progress, size);
    let progress: &dyn Progress = match &bar {
        Some(b) => b,
        None => &(),
    };
    let stats = convert::convert(src.as_ref(), writer, &engine, progress)
        .with_context(|| format!("converting {} to {}", shown(&args.src), shown(&args.dst)))?;
    if let Some(bar) = bar {
        bar.0.finish_and_clear();
    }
    report(&args.src, &args.dst, &format, &stats, args.job.output)?;
    Ok(0)
}

fn report(src: &Path, dst: &Path, format: &str, s: &ConvertStats, output: Output) -> Result<()> {
    match output {
        Output::Json => print_json(&serde_json::json!({
            "source": shown(src),
            "destination": shown(dst),
            "format": format,
            "size": s.size,
            "bytes-read": s.bytes_read,
            "bytes-written": s.bytes_written,
            "bytes-zero": s.bytes_zero,
            "bytes-same-as-backing": s.bytes_same_as_backing,
            "seconds": s.seconds,
        })),
        Output::Human => Ok(()),
    }
}

pub fn run_create(args: CreateArgs) -> Result<u8> {
    let (format, preset) = presets::resolve(args.format.as_deref(), args.target)?;
    check_destination(&args.dst, args.force)?;
    let mut backing = None;
    let mut backing_size = None;
    if let Some(recorded) = &args.backing {
        let (image, fmt) = open_backing(
            &args.dst,
            recorded,
            args.backing_format.as_deref(),
            &args.open,
        )?;
        backing_size = Some(image.size());
        backing = Some(BackingSpec {
            recorded: recorded.clone(),
            format: fmt,
        });
    }
    let size = match (&args.size, backing_size) {
        (Some(text), _) => image_format::create::parse_size(text)
            .with_context(|| format!("size {text:?}: expected 512, 64k, 10G, ..."))?,
        (None, Some(s)) => s,
        (None, None) => bail!("give the size of the new image"),
    };
    let mut options = create_options(preset, &args.options, size)?;
    options.backing = backing;
    let writer = image_format::default_registry().create(&format, &args.dst, &options)?;
    writer.finish()?;
    Ok(0)
}
