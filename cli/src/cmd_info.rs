//! `vmnest info`.

use anyhow::Result;
use image_format::ImageInfo;

use crate::common::{ImageArgs, Output, chain, human_size, print_json, shown};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Describe every image of the backing chain, not only the top one.
    #[arg(long)]
    backing_chain: bool,
    #[command(flatten)]
    img: ImageArgs,
}

pub fn run(args: Args) -> Result<u8> {
    let top = args.img.open()?;
    let images = if args.backing_chain {
        chain(&top)
    } else {
        vec![top]
    };
    let infos = images
        .iter()
        .map(|i| i.info())
        .collect::<Result<Vec<_>, _>>()?;
    match args.img.output {
        Output::Json if args.backing_chain => print_json(&infos)?,
        Output::Json => print_json(&infos[0])?,
        Output::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(info);
            }
        }
    }
    Ok(0)
}

fn print_human(info: &ImageInfo) {
    println!("image: {}", shown(&info.filename));
    println!("file format: {}", info.format);
    if let Some(sub) = &info.subformat {
        println!("subformat: {sub}");
    }
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    println!("disk size: {}", human_size(info.actual_size));
    if let Some(cs) = info.cluster_size {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = &info.backing_filename {
        println!("backing file: {b}");
    }
    if let Some(f) = &info.backing_format {
        println!("backing file format: {f}");
    }
    if info.dirty {
        println!("dirty: yes");
    }
    if info.files.len() > 1 {
        println!("files:");
        for f in &info.files {
            println!("    {}", shown(f));
        }
    }
    if !info.snapshots.is_empty() {
        println!("Snapshot list:");
        println!(
            "{:<4} {:<20} {:>12} {:>20} {:>16}",
            "ID", "TAG", "VM SIZE", "DATE (unix s)", "VM CLOCK (ns)"
        );
        for s in &info.snapshots {
            println!(
                "{:<4} {:<20} {:>12} {:>20} {:>16}",
                s.id,
                s.name,
                human_size(s.vm_state_size),
                s.date_sec,
                s.vm_clock_nsec
            );
        }
    }
    if !info.format_specific.is_empty() {
        println!("Format specific information:");
        for (k, v) in &info.format_specific {
            print_value(k, v, 1);
        }
    }
}

fn print_value(key: &str, value: &serde_json::Value, depth: usize) {
    let pad = "    ".repeat(depth);
    match value {
        serde_json::Value::Object(map) => {
            println!("{pad}{key}:");
            for (k, v) in map {
                print_value(k, v, depth + 1);
            }
        }
        serde_json::Value::Array(items) => {
            println!("{pad}{key}:");
            for (i, v) in items.iter().enumerate() {
                print_value(&format!("[{i}]"), v, depth + 1);
            }
        }
        serde_json::Value::String(s) => println!("{pad}{key}: {s}"),
        other => println!("{pad}{key}: {other}"),
    }
}
