//! Which store a command uses, and `store:NAME[@SNAP][/MEMBER]` sources.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use dedup_store::remote::{READ_AHEAD, Remote, RemoteChunks, RemoteReadOptions};
use dedup_store::store::disk::StoredDisk;
use dedup_store::store::{Access, Layout, MemberKind, Resolved, Store};

static STORE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Records `--store` (else `$VMNEST_STORE`, else the default) for the whole process.
pub fn set_store_dir(flag: Option<PathBuf>) {
    let dir = flag
        .or_else(|| std::env::var_os("VMNEST_STORE").map(PathBuf::from))
        .unwrap_or_else(default_store_dir);
    let _ = STORE_DIR.set(dir);
}

/// `$XDG_DATA_HOME/vmnest/store`, else `~/.local/share/vmnest/store`.
pub fn default_store_dir() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Path::new(&data).join("vmnest/store");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".local/share/vmnest/store")
}

/// The store directory in use.
pub fn store_dir() -> PathBuf {
    STORE_DIR.get().cloned().unwrap_or_else(default_store_dir)
}

/// `e`, an error of the store at `dir`, with the store named in front unless its text names it
/// already ("store S: store S is encrypted…" said it twice).
pub fn naming_store(dir: &Path, e: dedup_store::Error) -> anyhow::Error {
    let name = format!("store {}", dir.display());
    let text = e.to_string();
    // The name itself, not a longer path that starts with it ("store /a" in "store /a/b").
    let names_it = text.match_indices(&name).any(|(at, _)| {
        text[at + name.len()..]
            .chars()
            .next()
            .is_none_or(|c| c == ':' || c.is_whitespace())
    });
    if names_it {
        anyhow::Error::new(e)
    } else {
        anyhow::Error::new(e).context(name)
    }
}

/// Opens the store, saying on stderr what was repaired after a crash.
pub fn open_store(access: Access) -> Result<Arc<Store>> {
    let dir = store_dir();
    let mut waited = false;
    let mut key = crate::keys::given_key()?;
    if key.is_none() && Store::is_encrypted(&dir) {
        key = crate::keys::key_or_prompt(&format!("store {}", dir.display()), false)?;
    }
    let store = Store::open_keyed(&dir, access, key.as_ref(), &mut || {
        waited = true;
        match access {
            Access::Exclusive => eprintln!(
                "vmnest: waiting for the other vmnest processes using {} to finish",
                dir.display()
            ),
            _ => eprintln!("vmnest: waiting for a gc of {} to finish", dir.display()),
        }
    })
    .map_err(|e| naming_store(&dir, e))?;
    let r = store.report();
    if !r.removed_temp.is_empty() {
        eprintln!(
            "vmnest: store: rolled back an interrupted write (removed {} unfinished files)",
            r.removed_temp.len()
        );
    }
    if !r.unindexed_packs.is_empty() {
        eprintln!(
            "vmnest: store: finished an interrupted write (indexed {} packs)",
            r.unindexed_packs.len()
        );
    }
    if let Some(why) = &r.index_rebuilt {
        eprintln!("vmnest: store: rebuilt the chunk index ({why})");
    }
    for (path, why) in &r.damaged_packs {
        eprintln!("vmnest: store: damaged pack {}: {why}", path.display());
    }
    Ok(Arc::new(store))
}

/// A `store:` source split into its snapshot spec and member.
pub fn parse_store_source(text: &str) -> Option<(&str, Option<&str>)> {
    let rest = text.strip_prefix("store:")?;
    Some(match rest.split_once('/') {
        Some((spec, member)) => (spec, Some(member)),
        None => (rest, None),
    })
}

/// Opens `store:NAME[@SNAP][/MEMBER]` as an image.
pub fn open_stored(spec: &str, member: Option<&str>) -> Result<Arc<StoredDisk>> {
    let store = open_store(Access::Read)?;
    let snap = store.resolve(spec)?;
    Ok(Arc::new(StoredDisk::open(&store, &snap, member)?))
}

/// The disks of `store:NAME[@SNAP][/MEMBER]`: the one member named, else every disk member of
/// the snapshot, each with its member name.
pub fn open_stored_disks(
    spec: &str,
    member: Option<&str>,
) -> Result<Vec<(String, Arc<StoredDisk>)>> {
    let store = open_store(Access::Read)?;
    let snap = store.resolve(spec)?;
    disk_members(spec, &snap, member)?
        .into_iter()
        .map(|name| {
            let disk = StoredDisk::open(&store, &snap, Some(&name))?;
            Ok((name, Arc::new(disk)))
        })
        .collect()
}

/// The member `member` names, else every disk member (with a map) of the snapshot.
fn disk_members(spec: &str, snap: &Resolved, member: Option<&str>) -> Result<Vec<String>> {
    let names: Vec<String> = match member {
        Some(m) => vec![m.to_string()],
        None => snap
            .manifest
            .members
            .iter()
            .filter(|m| m.kind == MemberKind::Disk && matches!(m.layout, Layout::Map { .. }))
            .map(|m| m.name.clone())
            .collect(),
    };
    if names.is_empty() {
        anyhow::bail!("{spec}: the snapshot has no disk members");
    }
    Ok(names)
}

/// A `remote:REMOTE:NAME[@SNAP][/MEMBER]` source split into remote, snapshot spec and member.
pub fn parse_remote_source(text: &str) -> Option<(&str, &str, Option<&str>)> {
    let rest = text.strip_prefix("remote:")?;
    let (remote, rest) = rest.split_once(':')?;
    Some(match rest.split_once('/') {
        Some((spec, member)) => (remote, spec, Some(member)),
        None => (remote, rest, None),
    })
}

/// Gives an encrypted remote its keys (from the key options, the environment or a prompt),
/// before anything is read from it; a plain remote needs nothing.
pub fn unlock_remote(remote: &Remote) -> Result<()> {
    let Some(section) = remote
        .encryption()
        .with_context(|| format!("remote {}", remote.name()))?
    else {
        return Ok(());
    };
    let key = crate::keys::key_or_prompt(&format!("remote {}", remote.name()), false)?
        .with_context(|| {
            format!(
                "remote {} is encrypted: give its key with --key-file or --passphrase-file \
                 (or VMNEST_KEY_FILE / VMNEST_PASSPHRASE)",
                remote.name()
            )
        })?;
    let keys = dedup_store::crypt::Keys::unlock(Path::new(remote.url()), &section, &key)?;
    remote.set_keys(Some(Arc::new(keys)));
    Ok(())
}

/// The passphrase to ask for now, on this terminal, on behalf of a process that will have none
/// (`vmnest mount`'s background server): None when a key is given some other way, or when what
/// `source` (a `store:` spec, or with `from` a snapshot of that remote) needs is not encrypted.
pub fn passphrase_for_background(from: Option<&str>, source: &str) -> Result<Option<Vec<u8>>> {
    if crate::keys::given_key()?.is_some() {
        return Ok(None);
    }
    let what = match from {
        Some(name) => {
            let remote =
                Remote::open(&store_dir(), name).with_context(|| format!("remote {name}"))?;
            if remote
                .encryption()
                .with_context(|| format!("remote {name}"))?
                .is_none()
            {
                return Ok(None);
            }
            format!("remote {name}")
        }
        None if parse_store_source(source).is_some() && Store::is_encrypted(&store_dir()) => {
            format!("store {}", store_dir().display())
        }
        None => return Ok(None),
    };
    crate::keys::prompt(&what, false)
}

/// Finds `spec` on remote `name`: the snapshot and a reader of the remote's chunks keeping up
/// to `frame_cache` bytes of decoded frames in memory.
pub fn resolve_remote(
    name: &str,
    spec: &str,
    frame_cache: usize,
) -> Result<(Resolved, Arc<RemoteChunks>)> {
    let remote =
        Arc::new(Remote::open(&store_dir(), name).with_context(|| format!("remote {name}"))?);
    unlock_remote(&remote)?;
    remote.refresh_index()?;
    let found = remote.resolve(spec)?;
    let chunks = Arc::new(RemoteChunks::new(remote, frame_cache));
    Ok((Resolved::from(found), chunks))
}

/// The caches of a lazy reader of a remote (`serve --from`, `mount --from`).
#[derive(Clone, Copy, Debug)]
pub struct LazyCaches {
    /// Bytes of decoded frames kept in memory at most.
    pub memory: usize,
    /// Bytes of fetched frames kept in `remotes/NAME/cache/frames/` at most (0: none).
    pub disk: u64,
}

/// Opens `NAME[@SNAP][/MEMBER]` specs of remote `name` as disks read lazily through one
/// reader of the remote: frames fetched on demand and ahead of sequential reads, kept in
/// memory and in `remotes/NAME/cache/frames/`, as bounded by `caches`, for `serve --from`.
pub fn open_lazy(
    name: &str,
    specs: &[String],
    caches: LazyCaches,
) -> Result<(Vec<Arc<StoredDisk>>, Arc<RemoteChunks>)> {
    let chunks = lazy_reader(name, caches)?;
    let mut disks = Vec::new();
    for text in specs {
        let (spec, member) = split_member(text);
        let snap = resolve_on(&chunks, spec)?;
        disks.push(Arc::new(StoredDisk::open_remote(
            chunks.clone(),
            &snap,
            member,
        )?));
    }
    Ok((disks, chunks))
}

/// `NAME[@SNAP][/MEMBER]` of remote `name` as disks read lazily (as [`open_lazy`]): the member
/// named, else every disk member of the snapshot, each with its member name (`vmnest mount
/// --from`).
pub fn open_lazy_disks(
    name: &str,
    text: &str,
    caches: LazyCaches,
) -> Result<Vec<(String, Arc<StoredDisk>)>> {
    let chunks = lazy_reader(name, caches)?;
    let (spec, member) = split_member(text);
    let snap = resolve_on(&chunks, spec)?;
    disk_members(text, &snap, member)?
        .into_iter()
        .map(|m| {
            let disk = StoredDisk::open_remote(chunks.clone(), &snap, Some(&m))?;
            Ok((m, Arc::new(disk)))
        })
        .collect()
}

fn split_member(text: &str) -> (&str, Option<&str>) {
    match text.split_once('/') {
        Some((s, m)) => (s, Some(m)),
        None => (text, None),
    }
}

/// One reader of remote `name` for lazy reads: its index listed, frames fetched on demand and
/// ahead, kept in memory and in `remotes/NAME/cache/frames/` as `caches` bound them.
fn lazy_reader(name: &str, caches: LazyCaches) -> Result<Arc<RemoteChunks>> {
    let remote =
        Arc::new(Remote::open(&store_dir(), name).with_context(|| format!("remote {name}"))?);
    unlock_remote(&remote)?;
    remote.refresh_index()?;
    let options = RemoteReadOptions {
        memory_cache: caches.memory,
        disk_cache: (caches.disk > 0).then(|| (remote.frame_cache_dir(), caches.disk)),
        fetch_window: LAZY_FETCH_WINDOW,
        read_ahead: READ_AHEAD,
        ..Default::default()
    };
    Ok(Arc::new(RemoteChunks::with_options(remote, options)?))
}

/// Finds snapshot `spec` on the remote `chunks` reads.
fn resolve_on(chunks: &RemoteChunks, spec: &str) -> Result<Resolved> {
    Ok(Resolved::from(chunks.remote().resolve(spec)?))
}

/// What one miss of `serve --from` fetches at most: small, so that the first reply is quick;
/// sequential readers are served by the read-ahead behind it.
const LAZY_FETCH_WINDOW: u64 = 1 << 20;

/// Opens `remote:REMOTE:NAME[@SNAP][/MEMBER]` as an image read from the remote, keeping up to
/// `frame_cache` bytes of decoded frames in memory.
pub fn open_remote_stored(
    remote: &str,
    spec: &str,
    member: Option<&str>,
    frame_cache: usize,
) -> Result<Arc<StoredDisk>> {
    let (snap, chunks) = resolve_remote(remote, spec, frame_cache)?;
    Ok(Arc::new(StoredDisk::open_remote(chunks, &snap, member)?))
}

#[cfg(test)]
mod naming_tests {
    use super::*;

    #[test]
    fn a_store_error_names_the_store_once_and_never_drops_it() {
        let err = |text: &str| dedup_store::Error::InvalidArgument(text.into());
        let a = Path::new("/stores/a");
        let shown = |e| format!("{:#}", naming_store(a, e));
        assert_eq!(
            shown(err("store /stores/a is encrypted")),
            "store /stores/a is encrypted"
        );
        assert_eq!(
            shown(err("wrong passphrase or key file for store /stores/a")),
            "wrong passphrase or key file for store /stores/a"
        );
        // Another store whose path starts with this one's, or no store at all: named in front.
        assert_eq!(
            shown(err("store /stores/ab is encrypted")),
            "store /stores/a: store /stores/ab is encrypted"
        );
        assert_eq!(shown(err("disk full")), "store /stores/a: disk full");
    }
}
