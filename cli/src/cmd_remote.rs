//! Replication commands: remote add/ls/rm, push, pull, restore, verify --remote, gc --remote,
//! rm --remote.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::{Context, Result};
use dedup_store::remote::{
    COMMIT_WINDOW, PullProgress, PushOptions, Remote, RemoteGcOptions, add_remote, gc_remote,
    list_remotes, pull_with, push, remove_refs, remove_remote, verify_remote,
};
use dedup_store::store::Access;
use serde_json::json;

use crate::cmd_store::{ExportArgs, export_from, print_affected};
use crate::common::{Output, human_size, print_json};
use crate::store_args::{open_store, store_dir};

#[derive(Debug, clap::Args)]
pub struct RemoteArgs {
    #[command(subcommand)]
    cmd: RemoteCmd,
}

#[derive(Debug, clap::Subcommand)]
enum RemoteCmd {
    /// Add a remote: `s3://BUCKET[/PREFIX]` (endpoint, region and credentials from the AWS_*
    /// variables) or a directory (`file:///DIR` or a path).
    Add {
        /// Its name.
        name: String,
        /// Its URL.
        url: String,
    },
    /// List the remotes.
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Forget a remote (nothing on it is touched).
    Rm {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The remote.
    remote: String,
    /// What to push: NAME (and its ref) or NAME@ID (that snapshot); default every name.
    specs: Vec<String>,
    /// Bandwidth limit in bytes a second (`20M`, `512K`).
    #[arg(long, value_name = "RATE")]
    bwlimit: Option<String>,
    /// Uploads at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// Show a progress bar (on by default on a terminal).
    #[arg(short = 'p')]
    progress: bool,
    /// Summary format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// The remote.
    remote: String,
    /// What to pull: NAME (moves the local name), NAME@ID or @ID.
    spec: String,
    /// Show a progress bar (on by default on a terminal).
    #[arg(long)]
    progress: bool,
    /// Summary format.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The remote.
    remote: String,
    /// Decoded frames of the remote kept in memory at most.
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    frame_cache: String,
    #[command(flatten)]
    export: ExportArgs,
}

fn open_remote(name: &str) -> Result<Arc<Remote>> {
    Ok(Arc::new(
        Remote::open(&store_dir(), name).with_context(|| format!("remote {name}"))?,
    ))
}

pub fn run_remote(args: RemoteArgs) -> Result<u8> {
    match args.cmd {
        RemoteCmd::Add { name, url } => {
            let store = open_store(Access::Write)?;
            add_remote(store.root(), &name, &url)?;
        }
        RemoteCmd::Ls { output } => {
            let list = list_remotes(&store_dir())?;
            match output {
                Output::Json => print_json(&list)?,
                Output::Human => {
                    for (name, url) in &list {
                        println!("{name}\t{url}");
                    }
                }
            }
        }
        RemoteCmd::Rm { name } => {
            let store = open_store(Access::Write)?;
            remove_remote(store.root(), &name)?;
        }
    }
    Ok(0)
}

pub fn run_push(args: PushArgs) -> Result<u8> {
    let store = open_store(Access::Read)?;
    let mut targets = Vec::new();
    if args.specs.is_empty() {
        for (name, id) in store.refs()? {
            targets.push((name, id, true));
        }
    }
    for spec in &args.specs {
        let r = store.resolve(spec)?;
        let head = store.head(&r.name)?;
        targets.push((r.name.clone(), r.id, head == Some(r.id)));
    }
    let mut remote = Remote::open(store.root(), &args.remote)
        .with_context(|| format!("remote {}", args.remote))?;
    if let Some(text) = &args.bwlimit {
        let rate = image_format::create::parse_size(text)
            .filter(|r| *r > 0)
            .with_context(|| format!("--bwlimit {text:?}: expected bytes a second (20M, 512K)"))?;
        remote.set_bwlimit(Some(rate));
    }
    let bar = byte_bar(args.output, args.progress);
    let opts = PushOptions {
        concurrency: args.jobs.max(1),
        progress: bar.clone().map(|b| {
            Arc::new(move |done: u64, total: u64| {
                b.set_length(total);
                b.set_position(done);
            }) as Arc<dyn Fn(u64, u64) + Send + Sync>
        }),
        ..Default::default()
    };
    let r = push(&store, &remote, &targets, &opts)
        .with_context(|| format!("push to {}", args.remote))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match args.output {
        Output::Json => print_json(&r)?,
        Output::Human => {
            for s in &r.snapshots_pushed {
                println!("pushed {s}");
            }
            if r.keys_replaced {
                println!(
                    "replaced the remote's keys object: it now unlocks with the store's current \
                     passphrase or key file"
                );
            }
            if r.keys_outdated {
                eprintln!(
                    "vmnest: warning: the remote keeps the key a newer way than this store (its \
                     passphrase or key file was changed elsewhere); run `vmnest key change` here \
                     to match"
                );
            }
            println!(
                "{} snapshots pushed ({} already there), {} chunks needed ({}); {} objects, {} uploaded \
                 ({} packs whole, {} built, {} found there); {} retries; {:.1} s",
                r.snapshots_pushed.len(),
                r.snapshots_present,
                r.chunks_needed,
                human_size(r.chunk_bytes_needed),
                r.objects_uploaded,
                human_size(r.bytes_uploaded),
                r.packs_whole,
                r.packs_built,
                r.packs_skipped,
                r.retries,
                r.seconds
            );
        }
    }
    Ok(0)
}

/// A progress bar of bytes on stderr, when asked for or when stderr is a terminal (never with
/// `--output json`).
fn byte_bar(output: Output, asked: bool) -> Option<indicatif::ProgressBar> {
    let show = output == Output::Human && (asked || std::io::stderr().is_terminal());
    show.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    })
}

pub fn run_pull(args: PullArgs) -> Result<u8> {
    let store = open_store(Access::Write)?;
    let remote = open_remote(&args.remote)?;
    let bar = byte_bar(args.output, args.progress);
    let progress = bar.clone().map(|b| {
        move |done: u64, total: u64| {
            b.set_length(total);
            b.set_position(done);
        }
    });
    let r = pull_with(
        &store,
        &remote,
        &args.spec,
        progress.as_ref().map(|p| p as &PullProgress),
    )
    .with_context(|| format!("pull {} from {}", args.spec, args.remote))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    match args.output {
        Output::Json => print_json(&r)?,
        Output::Human => println!(
            "{}: {} snapshots pulled, {} chunks ({}) fetched, {} downloaded{}; {:.1} s",
            r.snapshot,
            r.snapshots_pulled.len(),
            r.chunks_fetched,
            human_size(r.chunk_bytes_fetched),
            human_size(r.bytes_downloaded),
            r.ref_updated
                .as_ref()
                .map(|n| format!(", {n} updated"))
                .unwrap_or_default(),
            r.seconds
        ),
    }
    Ok(0)
}

pub fn run_restore(args: RestoreArgs) -> Result<u8> {
    let frame_cache = crate::cmd_serve::frame_cache_size(&args.frame_cache)?;
    export_from(args.export, Some((&args.remote, frame_cache)))
}

pub fn run_verify_remote(name: &str, output: Output) -> Result<u8> {
    let remote = open_remote(name)?;
    // No key is needed; one that is given makes verify check the ids of what it reads.
    if crate::keys::given_key()?.is_some() {
        crate::store_args::unlock_remote(&remote)?;
    }
    let r = verify_remote(&remote).with_context(|| format!("verify remote {name}"))?;
    match output {
        Output::Json => print_json(&json!({"remote": name, "report": r, "clean": r.is_clean()}))?,
        Output::Human => {
            for d in &r.dangling_refs {
                println!("dangling ref {d}");
            }
            print_affected(&r.affected, "is incomplete or damaged");
            if !r.ids_checked {
                println!(
                    "remote {name} is encrypted and no key was given: map nodes were walked and \
                     every object checked for presence and checksums, but ids cannot be checked \
                     without the key, nor recipe parts read"
                );
            }
            println!(
                "remote {name}: {} packs, {} chunks, {} snapshots, {} refs: {}",
                r.packs,
                r.chunks,
                r.snapshots,
                r.refs,
                if r.is_clean() { "ok" } else { "DAMAGED" }
            );
        }
    }
    Ok(if r.is_clean() { 0 } else { 1 })
}

/// `vmnest rm --remote REMOTE NAME...`: deletes the names on the remote (all or none).
pub fn run_rm_remote(name: &str, names: &[String]) -> Result<u8> {
    let remote = open_remote(name)?;
    for n in names {
        if n.contains('@') {
            anyhow::bail!(
                "rm --remote takes names, not snapshots ({n}): a gc --remote removes snapshots no name reaches"
            );
        }
    }
    let removed = remove_refs(&remote, names).with_context(|| format!("rm on remote {name}"))?;
    for (n, id) in removed {
        println!(
            "removed {n} on {name} (was {}); vmnest gc --remote {name} frees its space",
            id.short()
        );
    }
    Ok(0)
}

/// Parses a duration: a number with `ms`, `s`, `m`, `h` or `d` (seconds without a unit).
pub fn parse_duration(text: &str) -> Result<std::time::Duration> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .with_context(|| format!("duration {text:?}: expected a number and ms, s, m, h or d"))?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => anyhow::bail!("duration {text:?}: unknown unit {unit:?} (ms, s, m, h, d)"),
    };
    std::time::Duration::try_from_secs_f64(n * scale)
        .with_context(|| format!("duration {text:?} is out of range"))
}

/// `vmnest gc --remote REMOTE`.
pub fn run_gc_remote(name: &str, grace: &str, dry_run: bool, output: Output) -> Result<u8> {
    let grace = parse_duration(grace).context("--grace")?;
    let remote = open_remote(name)?;
    if grace < COMMIT_WINDOW * 10 && output == Output::Human {
        eprintln!(
            "vmnest: warning: a grace of {:.0} s does not cover a push running at the same time \
             (it may write for {:.0} s after its last look, plus retried requests); use it only \
             when no push runs",
            grace.as_secs_f64(),
            COMMIT_WINDOW.as_secs_f64()
        );
    }
    // An encrypted remote is collected without its key unless it holds byte streams; a key
    // that is given is used.
    if crate::keys::given_key()?.is_some() {
        crate::store_args::unlock_remote(&remote)?;
    }
    let r = gc_remote(&remote, RemoteGcOptions { grace, dry_run })
        .with_context(|| format!("gc on remote {name}"))?;
    match output {
        Output::Json => print_json(&json!({"remote": name, "report": r}))?,
        Output::Human => {
            let verb = if dry_run { "would delete" } else { "deleted" };
            for p in r.problems.iter().take(20) {
                println!("cannot walk (no pack deleted this run): {p}");
            }
            for m in &r.manifests_deleted {
                println!("{verb} snapshot {m}");
            }
            for m in &r.manifests_condemned {
                println!("condemned snapshot {m}");
            }
            println!(
                "remote {name}{}: {} snapshots ({} live); {} packs: {} condemned, {} waiting for the \
                 grace, {} {verb} ({} freed); {} partly dead packs keep {} of dead data",
                if dry_run { " (dry run)" } else { "" },
                r.snapshots,
                r.live_snapshots,
                r.packs,
                r.packs_condemned,
                r.packs_pending,
                r.packs_deleted,
                human_size(r.bytes_freed),
                r.partly_dead_packs.len(),
                human_size(r.partly_dead_bytes)
            );
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "h", "1y", "-1s", "1e400s", "1 h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
