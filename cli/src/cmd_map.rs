//! `vmnest map`: extents of the guest disk. The JSON output has qemu-img map's shape (`start`,
//! `length`, `depth`, `present`, `zero`, `data`, `compressed`, `offset`), plus the host `file`.

use anyhow::Result;
use image_format::blockdev::for_each_extent;
use image_format::{Extent, ExtentKind};
use serde::Serialize;

use crate::common::{ImageArgs, Output, shown};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    img: ImageArgs,
}

#[derive(Debug, Serialize)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

impl Entry {
    fn new(start: u64, e: &Extent) -> Self {
        Entry {
            start,
            length: e.len,
            depth: e.depth,
            present: e.kind != ExtentKind::Unallocated,
            zero: e.kind != ExtentKind::Data,
            data: e.kind == ExtentKind::Data,
            compressed: e.compressed,
            offset: e.host.as_ref().map(|h| h.offset),
            file: e.host.as_ref().map(|h| shown(&h.file)),
        }
    }
}

pub fn run(args: Args) -> Result<u8> {
    let image = args.img.open()?;
    match args.img.output {
        Output::Json => {
            // Streamed: a large fragmented image has millions of extents.
            let mut first = true;
            println!("[");
            for_each_extent(image.as_ref(), 0, image.size(), |start, e| {
                let line = serde_json::to_string(&Entry::new(start, e)).unwrap_or_default();
                if first {
                    print!("{line}");
                    first = false;
                } else {
                    print!(",\n{line}");
                }
                Ok(())
            })?;
            println!("\n]");
        }
        Output::Human => {
            println!(
                "{:<19} {:<19} {:<11} {:<6} {:<19} File",
                "Offset", "Length", "Kind", "Depth", "Mapped to"
            );
            for_each_extent(image.as_ref(), 0, image.size(), |start, e| {
                let kind = match (e.kind, e.compressed) {
                    (ExtentKind::Data, true) => "compressed",
                    (ExtentKind::Data, false) => "data",
                    (ExtentKind::Zero, _) => "zero",
                    (ExtentKind::Unallocated, _) => "hole",
                };
                let (mapped, file) = match &e.host {
                    Some(h) => (format!("{:#x}", h.offset), shown(&h.file)),
                    None => (String::new(), String::new()),
                };
                println!(
                    "{:<19} {:<19} {:<11} {:<6} {:<19} {}",
                    format!("{start:#x}"),
                    format!("{:#x}", e.len),
                    kind,
                    e.depth,
                    mapped,
                    file
                );
                Ok(())
            })?;
        }
    }
    Ok(0)
}
