//! Writable volumes over stored snapshots: `vmnest commit`, `vmnest volume ls|rm`, and the
//! volume side of `vmnest serve store:NAME --rw`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use dedup_store::store::Access;
use dedup_store::store::volume::{self, Committed, Volume};
use fuse_mount::nbd::Export;
use serde_json::json;

use crate::common::{Output, human_size, print_json};
use crate::store_args::open_store;

#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// The volume (`vmnest volume ls` lists them).
    volume: String,
    /// A message, kept as the snapshot's `message` label.
    #[arg(long, short = 'm', value_name = "TEXT")]
    message: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum VolumeCommand {
    /// List the volumes: name, base snapshot, bytes in the write log, whether one is in use.
    Ls(VolumeLsArgs),
    /// Discard volumes and their writes (the base snapshot stays).
    Rm(VolumeRmArgs),
}

#[derive(Debug, clap::Args)]
pub struct VolumeLsArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct VolumeRmArgs {
    /// Volumes to discard.
    #[arg(required = true)]
    volumes: Vec<String>,
}

/// Prints what a commit did: the new snapshot as `NAME@ID` on stdout, notes on stderr.
pub fn report_commit(volume: &str, c: &Committed) {
    if !c.changed {
        println!("{}@{}", c.name, c.id.short());
        eprintln!("vmnest: volume {volume} has no writes; nothing to commit");
        return;
    }
    println!("{}@{}", c.name, c.id.short());
    if let Some(was) = c.name_was_at {
        eprintln!(
            "vmnest: {} had moved to {} since volume {volume} was made; the new snapshot's parent \
             is the volume's base {}, and {} now points to the new snapshot",
            c.name,
            was.short(),
            c.parent.short(),
            c.name
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

pub fn run_commit(args: CommitArgs) -> Result<u8> {
    let store = open_store(Access::Write)?;
    let vol = Volume::open(store, &args.volume)?;
    report_replay(&vol);
    let c = vol
        .commit_report(args.message.as_deref())
        .with_context(|| format!("committing volume {}", args.volume))?;
    report_commit(&args.volume, &c);
    Ok(0)
}

pub fn run_volume(cmd: VolumeCommand) -> Result<u8> {
    match cmd {
        VolumeCommand::Ls(args) => run_ls(args),
        VolumeCommand::Rm(args) => run_rm(args),
    }
}

fn run_ls(args: VolumeLsArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let list = volume::list(&store)?;
    match args.output {
        Output::Json => print_json(&list)?,
        Output::Human => {
            println!("{:<24} {:<36} {:>10} IN USE", "VOLUME", "BASE", "LOG");
            for v in &list {
                let in_use = match v.in_use_by {
                    Some(0) => "yes".to_string(),
                    Some(pid) => format!("pid {pid}"),
                    None => "no".to_string(),
                };
                println!(
                    "{:<24} {:<36} {:>10} {in_use}",
                    v.volume,
                    format!("{}@{}/{}", v.file.name, v.file.base.short(), v.file.member),
                    human_size(v.log_bytes),
                );
            }
        }
    }
    Ok(0)
}

fn run_rm(args: VolumeRmArgs) -> Result<u8> {
    let store = open_store(Access::Write)?;
    for name in &args.volumes {
        let vf = volume::remove(&store, name)?;
        println!(
            "removed volume {name} (its writes over {}@{} are discarded)",
            vf.name,
            vf.base.short()
        );
    }
    Ok(0)
}

/// Volumes for `vmnest ls` and `vmnest du`: `(volume, JSON)` rows, and one human line each.
pub fn volume_rows(store: &dedup_store::store::Store) -> Result<Vec<serde_json::Value>> {
    Ok(volume::list(store)?
        .into_iter()
        .map(|v| {
            json!({
                "volume": v.volume, "name": v.file.name, "base": v.file.base.to_hex(),
                "member": v.file.member, "log_bytes": v.log_bytes, "in_use_by": v.in_use_by,
            })
        })
        .collect())
}

/// Prints one line per volume (nothing when there are none).
pub fn print_volume_lines(rows: &[serde_json::Value]) {
    for v in rows {
        let base = v["base"].as_str().unwrap_or("");
        println!(
            "volume {} over {}@{}: {} in its write log{}",
            v["volume"].as_str().unwrap_or(""),
            v["name"].as_str().unwrap_or(""),
            &base[..base.len().min(12)],
            human_size(v["log_bytes"].as_u64().unwrap_or(0)),
            if v["in_use_by"].is_null() {
                ""
            } else {
                " (in use)"
            }
        );
    }
}

fn report_replay(vol: &Volume) {
    if let Some((at, bytes, why)) = &vol.replay().torn {
        eprintln!(
            "vmnest: volume {}: cut a torn tail of {bytes} bytes at log offset {at} ({why}); \
             writes after the last acknowledged flush may be missing",
            vol.name()
        );
    }
}

/// What `vmnest serve` needs to export a volume.
pub struct VolumeExport {
    pub export: Export,
    pub volume: Arc<Volume>,
}

/// Opens (or creates over `spec`, `NAME[@SNAP][/MEMBER]`) volume `name` (default: the NAME of
/// `spec`), saying on stderr what its replay cut. Returns the volume and its name.
pub fn open_volume(spec: &str, name: Option<&str>) -> Result<(Arc<Volume>, String)> {
    let snap_name = spec.split(['@', '/']).next().unwrap_or("");
    let vol_name = match name {
        Some(n) => n,
        None if !snap_name.is_empty() => snap_name,
        None => bail!("store:{spec}: name the volume with --volume"),
    };
    let store = open_store(Access::Write)?;
    let volume = Volume::open_or_create(store, vol_name, spec)
        .with_context(|| format!("volume {vol_name}"))?;
    report_replay(&volume);
    Ok((volume, vol_name.to_string()))
}

/// Opens (or creates over `spec`, `NAME[@SNAP][/MEMBER]`) volume `name` (default: the NAME of
/// `spec`) and makes a writable export of it, committing when the last client disconnects
/// cleanly if `commit_on_disconnect`.
pub fn open_volume_export(
    spec: &str,
    name: Option<&str>,
    export_name: String,
    commit_on_disconnect: bool,
) -> Result<VolumeExport> {
    let (volume, vol_name) = open_volume(spec, name)?;
    let vol_name = vol_name.as_str();
    let vf = volume.file()?;
    let description = format!(
        "vmnest volume {vol_name} over {}@{}",
        vf.name,
        vf.base.short()
    );
    let device: Arc<dyn image_format::BlockDeviceMut> = volume.clone();
    let mut export = Export::writable(export_name, device).with_description(description);
    if commit_on_disconnect {
        let vol = volume.clone();
        let vol_name = vol_name.to_string();
        export = export.with_on_idle(move || match vol.is_dirty() {
            Ok(false) => {}
            Ok(true) => match vol.commit_report(None) {
                Ok(c) => {
                    print!("committed ");
                    report_commit(&vol_name, &c);
                }
                Err(e) => eprintln!("vmnest: committing volume {vol_name} failed: {e}"),
            },
            Err(e) => eprintln!("vmnest: volume {vol_name}: {e}"),
        });
    }
    Ok(VolumeExport { export, volume })
}
