//! `vmnest check`, with qemu-img check's exit codes:
//! 0 clean, 1 the check could not complete, 2 corruptions, 3 leaks only, 63 no checks for the format.

use anyhow::Result;
use image_format::{CheckReport, Error};

use crate::common::{ImageArgs, Output, print_json, shown};

/// Exit code for a format without consistency checks.
const NOT_SUPPORTED: u8 = 63;
/// Exit code when the check itself failed.
const CHECK_FAILED: u8 = 1;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    img: ImageArgs,
}

pub fn run(args: Args) -> Result<u8> {
    let image = match args.img.open() {
        Ok(image) => image,
        Err(err) => {
            // An image too damaged to open is reported as corrupt, as qemu-img check does for
            // headers it rejects.
            let corrupt = err
                .downcast_ref::<Error>()
                .is_some_and(Error::is_corruption);
            eprintln!("vmnest: {err:#}");
            return Ok(if corrupt { 2 } else { CHECK_FAILED });
        }
    };
    let report = match image.check() {
        Ok(report) => report,
        Err(Error::Unsupported { .. }) => {
            eprintln!(
                "vmnest: {}: the {} format does not support checks",
                shown(&args.img.image),
                image.format()
            );
            return Ok(NOT_SUPPORTED);
        }
        Err(err) => {
            eprintln!("vmnest: check of {} failed: {err}", shown(&args.img.image));
            return Ok(CHECK_FAILED);
        }
    };
    match args.img.output {
        Output::Json => print_json(&report)?,
        Output::Human => print_human(&report),
    }
    Ok(report.exit_code() as u8)
}

fn print_human(report: &CheckReport) {
    for p in &report.corruptions {
        match p.offset {
            Some(off) => println!("ERROR {} at offset {off:#x}: {}", p.structure, p.message),
            None => println!("ERROR {}: {}", p.structure, p.message),
        }
    }
    for p in &report.leaks {
        match p.offset {
            Some(off) => println!("Leaked {} at offset {off:#x}: {}", p.structure, p.message),
            None => println!("Leaked {}: {}", p.structure, p.message),
        }
    }
    if report.corruptions.is_empty() && report.leaks.is_empty() {
        println!("No errors were found on the image.");
    } else {
        if !report.corruptions.is_empty() {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                report.corruptions.len()
            );
        }
        if !report.leaks.is_empty() {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                report.leaks.len()
            );
        }
    }
    if let (Some(a), Some(t)) = (report.allocated_clusters, report.total_clusters) {
        let pct = if t == 0 {
            0.0
        } else {
            a as f64 * 100.0 / t as f64
        };
        println!("{a}/{t} = {pct:.2}% allocated");
    }
    if let Some(end) = report.image_end_offset {
        println!("Image end offset: {end}");
    }
}
