//! `vmnest`: the command-line tool. The only crate that wires the libraries together; it turns
//! their typed errors into messages and exit codes with the habits of `qemu-img` users.

mod cmd_check;
mod cmd_compare;
mod cmd_convert;
mod cmd_info;
mod cmd_map;
mod cmd_serve;
mod common;
mod presets;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmnest: convert, store, serve and replicate virtual machine disk images.
#[derive(Debug, Parser)]
#[command(name = "vmnest", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Describe an image: format, sizes, allocation unit, backing chain, format-specific fields.
    Info(cmd_info::Args),
    /// Check an image's structures; exit 0 clean, 1 check failed, 2 corrupt, 3 leaks only,
    /// 63 format has no checks (as qemu-img check).
    Check(cmd_check::Args),
    /// Show which ranges of the guest disk hold data, read as zeros, or are unallocated.
    Map(cmd_map::Args),
    /// Convert an image to another format (or the same one with other options).
    Convert(Box<cmd_convert::ConvertArgs>),
    /// Create a new, empty image (or an overlay on a backing file).
    Create(cmd_convert::CreateArgs),
    /// Compare the guest content of two images of any formats; exit 0 identical, 1 different,
    /// 2 error.
    Compare(cmd_compare::Args),
    /// Export images over NBD (loopback unless --allow-remote; read-only unless --rw).
    Serve(cmd_serve::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (result, error_code) = match cli.command {
        Command::Info(args) => (cmd_info::run(args), 1),
        Command::Check(args) => (cmd_check::run(args), 1),
        Command::Map(args) => (cmd_map::run(args), 1),
        Command::Compare(args) => (cmd_compare::run(args), 2),
        Command::Convert(args) => (cmd_convert::run_convert(*args), 1),
        Command::Create(args) => (cmd_convert::run_create(args), 1),
        Command::Serve(args) => (cmd_serve::run(args), 1),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("vmnest: {err:#}");
            ExitCode::from(error_code)
        }
    }
}
