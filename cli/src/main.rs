//! `vmnest`: the command-line tool. The only crate that wires the libraries together; it turns
//! their typed errors into messages and exit codes with the habits of `qemu-img` users.

mod cmd_check;
mod cmd_compare;
mod cmd_convert;
mod cmd_info;
mod cmd_map;
mod cmd_mount;
mod cmd_remote;
mod cmd_serve;
mod cmd_store;
mod cmd_volume;
mod common;
mod keys;
mod presets;
mod store_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmnest: convert, store, serve and replicate virtual machine disk images.
#[derive(Debug, Parser)]
#[command(name = "vmnest", version, about, propagate_version = true)]
struct Cli {
    /// The store (default: $VMNEST_STORE, else $XDG_DATA_HOME/vmnest/store, else
    /// ~/.local/share/vmnest/store).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<std::path::PathBuf>,
    #[command(flatten)]
    keys: keys::KeyArgs,
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
    /// Create a store (import creates one with the defaults when there is none).
    Init(cmd_store::InitArgs),
    /// Store an image (any format) as a snapshot; again under the same name, a new version.
    Import(Box<cmd_store::ImportArgs>),
    /// Write a stored snapshot to an image in any format.
    Export(Box<cmd_store::ExportArgs>),
    /// Make new names for a snapshot, in O(1): `vmnest clone gold web-{01..50}`.
    Clone(cmd_store::CloneArgs),
    /// List the store's names.
    Ls(cmd_store::ListArgs),
    /// Show a name's lineage, newest first.
    Log(cmd_store::LogArgs),
    /// Remove names (or one older snapshot); `gc` frees the space.
    Rm(cmd_store::RmArgs),
    /// The byte ranges that differ between two snapshots (exit 0 same, 1 different).
    Diff(cmd_store::DiffArgs),
    /// Space: logical, stored, and per name unique vs shared.
    Du(cmd_store::DuArgs),
    /// Delete what no name reaches; repack packs that are mostly dead.
    Gc(cmd_store::GcArgs),
    /// Re-read and re-hash everything; name the snapshots a damaged chunk touches.
    Verify(cmd_store::VerifyArgs),
    /// Manage remotes: `remote add NAME s3://BUCKET/PREFIX`, `remote ls`, `remote rm NAME`.
    Remote(cmd_remote::RemoteArgs),
    /// Send snapshots to a remote: only what it lacks, manifest last.
    Push(cmd_remote::PushArgs),
    /// Copy a snapshot from a remote into the store: only the chunks the store lacks.
    Pull(cmd_remote::PullArgs),
    /// Write an image straight from a remote snapshot (no local copy), in any format.
    Restore(Box<cmd_remote::RestoreArgs>),
    /// Export images over NBD (loopback unless --allow-remote; read-only unless --rw).
    Serve(cmd_serve::Args),
    /// Show an image's disk and partitions as files over FUSE (read-only unless --rw); returns
    /// once mounted unless -f.
    Mount(cmd_mount::MountArgs),
    /// Unmount a `vmnest mount` and wait until its server has flushed (and committed) and exited.
    Umount(cmd_mount::UmountArgs),
    /// Turn a volume (the writes of `serve store:NAME --rw`) into a new snapshot of NAME.
    Commit(cmd_volume::CommitArgs),
    /// Writable volumes over stored snapshots: list, discard.
    #[command(subcommand)]
    Volume(cmd_volume::VolumeCommand),
    /// An encrypted store's key: `key change` (a new passphrase, or a key file).
    #[command(subcommand)]
    Key(keys::KeyCommand),
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`vmnest map ... | head`).
    // SAFETY: restoring the default disposition of SIGPIPE at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    store_args::set_store_dir(cli.store);
    keys::set_key_args(cli.keys);
    let (result, error_code) = match cli.command {
        Command::Info(args) => (cmd_info::run(args), 1),
        Command::Check(args) => (cmd_check::run(args), 1),
        Command::Map(args) => (cmd_map::run(args), 1),
        Command::Compare(args) => (cmd_compare::run(args), 2),
        Command::Convert(args) => (cmd_convert::run_convert(*args), 1),
        Command::Create(args) => (cmd_convert::run_create(args), 1),
        Command::Init(args) => (cmd_store::run_init(args), 1),
        Command::Key(command) => (keys::run_key(command), 1),
        Command::Import(args) => (cmd_store::run_import(*args), 1),
        Command::Export(args) => (cmd_store::run_export(*args), 1),
        Command::Clone(args) => (cmd_store::run_clone(args), 1),
        Command::Ls(args) => (cmd_store::run_ls(args), 1),
        Command::Log(args) => (cmd_store::run_log(args), 1),
        Command::Rm(args) => (cmd_store::run_rm(args), 1),
        Command::Diff(args) => (cmd_store::run_diff(args), 2),
        Command::Du(args) => (cmd_store::run_du(args), 1),
        Command::Gc(args) => (cmd_store::run_gc(args), 1),
        Command::Verify(args) => (cmd_store::run_verify(args), 2),
        Command::Serve(args) => (cmd_serve::run(args), 1),
        Command::Mount(args) => (cmd_mount::run_mount(args), 1),
        Command::Umount(args) => (cmd_mount::run_umount(args), 1),
        Command::Remote(args) => (cmd_remote::run_remote(args), 1),
        Command::Push(args) => (cmd_remote::run_push(args), 1),
        Command::Pull(args) => (cmd_remote::run_pull(args), 1),
        Command::Restore(args) => (cmd_remote::run_restore(*args), 1),
        Command::Commit(args) => (cmd_volume::run_commit(args), 1),
        Command::Volume(cmd) => (cmd_volume::run_volume(cmd), 1),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("vmnest: {err:#}");
            ExitCode::from(error_code)
        }
    }
}
