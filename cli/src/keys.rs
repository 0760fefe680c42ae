//! The key of an encrypted store: `--key-file` / `--passphrase-file` (global options), else
//! `VMNEST_KEY_FILE` / `VMNEST_PASSPHRASE`, else a prompt when there is a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};
use dedup_store::crypt::KeySource;

/// The global key options.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct KeyArgs {
    /// Key file of an encrypted store (hex master key; `init --encrypt` creates it, 0600, when
    /// missing). Default: $VMNEST_KEY_FILE.
    #[arg(long, global = true, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// File holding the passphrase of an encrypted store (its first line). Default:
    /// $VMNEST_PASSPHRASE, else a prompt on the terminal.
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

static KEY_ARGS: OnceLock<KeyArgs> = OnceLock::new();

/// A passphrase handed over by the parent process (`vmnest mount`'s background server reads it
/// from its stdin: it has no terminal to prompt on).
static HANDED_OVER: OnceLock<Vec<u8>> = OnceLock::new();

/// Records a passphrase handed over by the parent process.
pub fn set_handed_over(pass: Vec<u8>) {
    let _ = HANDED_OVER.set(pass);
}

/// Records the global key options for the whole process.
pub fn set_key_args(args: KeyArgs) {
    let _ = KEY_ARGS.set(args);
}

/// The key given without asking: the options first, then the environment.
pub fn given_key() -> Result<Option<KeySource>> {
    let args = KEY_ARGS.get().cloned().unwrap_or_default();
    if let Some(f) = args.key_file {
        return Ok(Some(KeySource::KeyFile(f)));
    }
    if let Some(f) = &args.passphrase_file {
        return Ok(Some(KeySource::Passphrase(
            dedup_store::crypt::read_passphrase_file(f).context("passphrase file")?,
        )));
    }
    if let Some(pass) = HANDED_OVER.get() {
        return Ok(Some(KeySource::Passphrase(pass.clone())));
    }
    if let Some(f) = std::env::var_os("VMNEST_KEY_FILE").filter(|v| !v.is_empty()) {
        return Ok(Some(KeySource::KeyFile(f.into())));
    }
    if let Some(p) = std::env::var_os("VMNEST_PASSPHRASE").filter(|v| !v.is_empty()) {
        use std::os::unix::ffi::OsStrExt;
        return Ok(Some(KeySource::Passphrase(p.as_bytes().to_vec())));
    }
    Ok(None)
}

/// The key given, else a passphrase asked on the terminal (twice when `confirm`), else None.
pub fn key_or_prompt(what: &str, confirm: bool) -> Result<Option<KeySource>> {
    if let Some(k) = given_key()? {
        return Ok(Some(k));
    }
    Ok(prompt(what, confirm)?.map(KeySource::Passphrase))
}

/// A passphrase asked on the terminal (twice when `confirm`); None without a terminal.
pub fn prompt(what: &str, confirm: bool) -> Result<Option<Vec<u8>>> {
    if !std::io::stdin().is_terminal() {
        return Ok(None);
    }
    let pass = rpassword::prompt_password(format!("passphrase for {what}: "))
        .context("reading the passphrase")?;
    if pass.is_empty() {
        bail!("an empty passphrase");
    }
    if confirm {
        let again = rpassword::prompt_password("again: ").context("reading the passphrase")?;
        if again != pass {
            bail!("the passphrases differ");
        }
    }
    Ok(Some(pass.into_bytes()))
}

/// `vmnest key`.
#[derive(Debug, clap::Subcommand)]
pub enum KeyCommand {
    /// Keep an encrypted store's key another way: under a new passphrase (asked twice on the
    /// terminal, or --new-passphrase-file), or in a key file (--new-key-file). The current key
    /// comes from the global --key-file / --passphrase-file, the environment, or the terminal.
    /// Nothing stored changes but the store's config; the next push updates its remotes.
    Change(ChangeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// File holding the new passphrase (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "new_key_file")]
    new_passphrase_file: Option<PathBuf>,
    /// Keep the key in this file instead (created 0600 when missing; an existing one must hold
    /// the store's key).
    #[arg(long, value_name = "FILE")]
    new_key_file: Option<PathBuf>,
}

pub fn run_key(command: KeyCommand) -> Result<u8> {
    let KeyCommand::Change(args) = command;
    let dir = crate::store_args::store_dir();
    let current =
        key_or_prompt(&format!("store {}", dir.display()), false)?.with_context(|| {
            format!(
                "store {}: give its current key with --key-file or --passphrase-file (or \
             VMNEST_KEY_FILE / VMNEST_PASSPHRASE, or a terminal to ask on)",
                dir.display()
            )
        })?;
    let mut store = dedup_store::store::Store::open_keyed(
        &dir,
        dedup_store::store::Access::Exclusive,
        Some(&current),
        &mut || eprintln!("waiting for other users of the store to finish"),
    )
    .map_err(|e| crate::store_args::naming_store(&dir, e))?;
    let new = match (&args.new_key_file, &args.new_passphrase_file) {
        (Some(f), _) => KeySource::KeyFile(f.clone()),
        (None, Some(f)) => KeySource::Passphrase(
            dedup_store::crypt::read_passphrase_file(f).context("new passphrase file")?,
        ),
        (None, None) => KeySource::Passphrase(
            prompt("the new passphrase", true)?
                .context("give --new-passphrase-file or --new-key-file (no terminal to ask on)")?,
        ),
    };
    let section = store.change_key(&new, dedup_store::crypt::Argon2Costs::from_env())?;
    // What still opens the store's key afterwards, case by case.
    let (now, left) = match (&current, &new) {
        (_, KeySource::Passphrase(_)) => (
            "under the new passphrase".to_string(),
            match &current {
                KeySource::KeyFile(old) => format!(
                    "key file {} still holds the key itself: delete it (or keep it somewhere safe)",
                    old.display()
                ),
                KeySource::Passphrase(_) => {
                    "the old passphrase no longer opens the store".to_string()
                }
            },
        ),
        (KeySource::KeyFile(old), KeySource::KeyFile(f)) => (
            format!("in key file {}", f.display()),
            format!(
                "any file holding the key opens the store, key file {} too: delete it if it \
                 should not",
                old.display()
            ),
        ),
        (KeySource::Passphrase(_), KeySource::KeyFile(f)) => (
            format!("in key file {}", f.display()),
            "the old passphrase no longer opens the store".to_string(),
        ),
    };
    println!(
        "store {}: key {} is now kept {now} (generation {}); {left}. The key itself did not \
         change: remotes, and copies of the old config, open with the old passphrase or key \
         file until the next push replaces each remote's copy",
        dir.display(),
        section.fingerprint,
        section.generation
    );
    Ok(0)
}
