//! `vmnest compare`: guest content equality across formats. Exit 0 identical, 1 different
//! (the first differing byte is printed), 2 error.

use anyhow::Result;
use image_format::compare::{CompareOptions, CompareProgress, Comparison, compare};
use indicatif::{ProgressBar, ProgressStyle};

use crate::common::{OpenArgs, Output, open_image, print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Format of the first image (probed when absent).
    #[arg(short = 'f')]
    format_a: Option<String>,
    /// Format of the second image (probed when absent).
    #[arg(short = 'F')]
    format_b: Option<String>,
    /// Images of different sizes differ, even when the excess reads as zeros.
    #[arg(short = 's', long)]
    strict: bool,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    progress: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    open: OpenArgs,
    /// First image.
    a: std::path::PathBuf,
    /// Second image.
    b: std::path::PathBuf,
}

struct Bar(ProgressBar);

impl CompareProgress for Bar {
    fn progress(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }
}

pub fn run(args: Args) -> Result<u8> {
    let a = open_image(&args.a, args.format_a.as_deref(), &args.open)?;
    let b = open_image(&args.b, args.format_b.as_deref(), &args.open)?;
    let bar = if args.progress {
        let bar = ProgressBar::new(a.size().max(b.size()));
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(Bar(bar))
    } else {
        None
    };
    let progress: &dyn CompareProgress = match &bar {
        Some(b) => b,
        None => &(),
    };
    let options = CompareOptions {
        strict: args.strict,
    };
    let result = compare(a.as_ref(), b.as_ref(), options, progress)?;
    if let Some(bar) = bar {
        bar.0.finish_and_clear();
    }
    let (code, text, json) = match result {
        Comparison::Identical => (
            0,
            "Images are identical.".to_string(),
            serde_json::json!({"identical": true}),
        ),
        Comparison::Differ { offset } => (
            1,
            format!("Content mismatch at offset {offset}!"),
            serde_json::json!({"identical": false, "offset": offset}),
        ),
        Comparison::SizeMismatch { a, b } => (
            1,
            format!("Strict mode: image size mismatch ({a} != {b} bytes)!"),
            serde_json::json!({"identical": false, "size-a": a, "size-b": b}),
        ),
    };
    match args.output {
        Output::Human => println!("{text}"),
        Output::Json => print_json(&json)?,
    }
    Ok(code)
}
