//! Remotes: a copy of a store's snapshots in object storage (`s3://bucket/prefix`) or in another
//! directory, both reached through the `object_store` crate with one object layout.
//!
//! ```text
//! packs/<hex>.pack     a pack, byte for byte as in a local store (crate::pack): content-named,
//!                      immutable, so an object that exists never needs sending again
//! index/<hex>.idx      the same pack's index: its bytes from the index section to the end
//!                      (entries, frame table, trailer); written only after its pack landed
//! snapshots/<hex>      a manifest, byte for byte (its name is its BLAKE3); written last, with
//!                      If-None-Match: * (the commit point of a push)
//! refs/<name>          "<snapshot hex>\n", written after the manifest
//! keys                 an encrypted store's `encryption` section (wrapped key, salt, costs,
//!                      fingerprint; never a key), written first by a push, If-None-Match: *
//! gc/condemned-*       what a `gc --remote` run condemned (remote/gc.rs)
//! ```
//!
//! An encrypted store pushes its objects as they are (frames sealed, map nodes in unsealed
//! metadata frames, manifests with sealed fields): the remote never sees plaintext. Push, pull,
//! restore and `serve --from` compare key fingerprints before any transfer
//! ([`Remote::check_keys`]); reading sealed frames needs the keys ([`Remote::set_keys`]).
//! `verify --remote` works without them: it walks map nodes (not sealed) without checking their
//! keyed ids, and checks recipe parts for presence only.
//!
//! Invariant, kept by [`push`] and checked by [`verify_remote`]: a manifest exists on the remote
//! only once every chunk and map node it refers to is in a pack whose index object exists.
//! Packs and index objects without a manifest (an interrupted push) are harmless: a later push
//! finds them and does not send them again (a pack that landed without its index gets its
//! index at the next push).
//!
//! The local side keeps `remotes/<name>.json` (the URL) and `remotes/<name>/cache/index/`
//! (copies of the remote's index objects, refreshed by listing) in the store directory.
//!
//! Everything here is synchronous to its callers; a private tokio runtime runs the requests.
//! Transient failures (5xx, SlowDown, dropped connections, timeouts) are retried with
//! exponential backoff; objects read back are untrusted (sizes bounded, checksums and hashes
//! checked). Errors name the remote by its URL and the object key, never a credential.

mod chunks;
mod disk_cache;
mod gc;
mod pull;
mod push;
mod verify;

pub use chunks::{READ_AHEAD, REMOTE_FRAME_CACHE, ReadStats, RemoteChunks, RemoteReadOptions};
pub use disk_cache::DiskFrameCache;
pub use gc::{
    COMMIT_WINDOW, DEFAULT_GRACE, PackDead, RemoteGcOptions, RemoteGcReport, gc_remote,
    parse_condemned_record, remove_refs,
};
pub use pull::{PullProgress, PullReport, pull, pull_with};
pub use push::{PushOptions, PushReport, push};
pub use verify::{RemoteVerifyReport, verify_remote};

use crate::crypt::{EncryptionConfig, Keys};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, aws::AmazonS3Builder,
    local::LocalFileSystem,
};
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::pack::{ChunkLoc, FrameInfo, PackId, TRAILER_LEN, parse_index, parse_trailer};
use crate::store::manifest::MAX_MANIFEST_LEN;
use crate::store::{Layout, Manifest, Member, SnapshotId, check_name, read_capped, write_atomic};

/// Largest index object accepted: a pack's index section at the format's limits, and its trailer.
pub const MAX_INDEX_OBJECT: u64 = crate::pack::MAX_PACK_CHUNKS * crate::pack::ENTRY_LEN
    + crate::pack::MAX_PACK_FRAMES as u64 * crate::pack::FRAME_ENTRY_LEN
    + TRAILER_LEN;
/// Index objects fetched at once by [`Remote::refresh_index`].
const INDEX_FETCHES: usize = 16;
/// Largest ref object accepted.
const MAX_REF_LEN: u64 = 256;
/// Attempts of one request before its error is final, unless `VMNEST_REMOTE_ATTEMPTS` says
/// otherwise (1..=50).
const ATTEMPTS: u32 = 8;
/// Request timeout unless `VMNEST_REMOTE_TIMEOUT` (seconds) says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A remote's entry in the store: `remotes/<name>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://bucket[/prefix]`, `file:///dir` or a directory path.
    pub url: String,
}

/// Where a remote URL points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A bucket and a key prefix ("" or ending in '/').
    S3 { bucket: String, prefix: String },
    /// A directory.
    Dir(PathBuf),
}

/// Parses a remote URL.
pub fn parse_url(url: &str) -> Result<Target> {
    let bad = |why: &str| Error::InvalidArgument(format!("remote URL {url:?}: {why}"));
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            return Err(bad("expected s3://BUCKET[/PREFIX]"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(bad("the prefix may not hold . or .."));
        }
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        return Ok(Target::S3 {
            bucket: bucket.to_string(),
            prefix,
        });
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
        return Err(bad(
            "expected s3://BUCKET[/PREFIX], file:///DIR or a directory",
        ));
    }
    Ok(Target::Dir(PathBuf::from(path)))
}

fn remotes_dir(store_root: &Path) -> PathBuf {
    store_root.join("remotes")
}

fn config_path(store_root: &Path, name: &str) -> Result<PathBuf> {
    check_name(name).map_err(|e| Error::InvalidArgument(format!("remote name: {e}")))?;
    Ok(remotes_dir(store_root).join(format!("{name}.json")))
}

/// Adds remote `name` with `url` to the store at `store_root`; fails when the name exists.
pub fn add_remote(store_root: &Path, name: &str, url: &str) -> Result<()> {
    parse_url(url)?;
    let path = config_path(store_root, name)?;
    if path.exists() {
        return Err(Error::InvalidArgument(format!(
            "remote {name} exists already"
        )));
    }
    let dir = remotes_dir(store_root);
    std::fs::create_dir_all(&dir).map_err(crate::pack::io_err(&dir, "create remotes dir"))?;
    let bytes = serde_json::to_vec_pretty(&RemoteConfig { url: url.into() })
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    write_atomic(&dir, &path, &bytes)
}

/// The remotes of the store at `store_root`: name -> URL.
pub fn list_remotes(store_root: &Path) -> Result<BTreeMap<String, String>> {
    let dir = remotes_dir(store_root);
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for ent in rd.flatten() {
        let file = ent.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".json")
            && check_name(name).is_ok()
        {
            out.insert(name.to_string(), remote_url(store_root, name)?);
        }
    }
    Ok(out)
}

/// The URL of remote `name`.
pub fn remote_url(store_root: &Path, name: &str) -> Result<String> {
    let path = config_path(store_root, name)?;
    if !path.exists() {
        return Err(Error::InvalidArgument(format!(
            "no remote {name} (vmnest remote add {name} URL)"
        )));
    }
    let bytes = read_capped(&path, 64 << 10, "remote config")?;
    let c: RemoteConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(path.display().to_string(), 0, e.to_string()))?;
    Ok(c.url)
}

/// Removes remote `name` and its local cache (nothing on the remote is touched).
pub fn remove_remote(store_root: &Path, name: &str) -> Result<()> {
    let path = config_path(store_root, name)?;
    std::fs::remove_file(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::InvalidArgument(format!("no remote {name}"))
        } else {
            crate::pack::io_err(&path, "remove remote")(e)
        }
    })?;
    let cache = remotes_dir(store_root).join(name);
    let _ = std::fs::remove_dir_all(&cache);
    crate::pack::sync_dir(&remotes_dir(store_root))
}

/// Whether an object-store error may go away by trying again.
fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

/// A token bucket over bytes sent (`--bwlimit`): at most `rate` bytes a second on average,
/// bursts of one second.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A limit of `rate` bytes a second (at least 1).
    pub fn new(rate: u64) -> RateLimit {
        let rate = rate.max(1) as f64;
        RateLimit {
            rate,
            state: Mutex::new((rate, Instant::now())),
        }
    }

    /// Waits until `n` bytes may be sent.
    async fn take(&self, mut n: u64) {
        while n > 0 {
            let piece = (n as f64).min(self.rate);
            let wait = {
                let Ok(mut g) = self.state.lock() else { return };
                let now = Instant::now();
                let (tokens, last) = *g;
                let tokens =
                    (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
                if tokens >= piece {
                    *g = (tokens - piece, now);
                    n -= piece as u64;
                    None
                } else {
                    *g = (tokens, now);
                    Some(Duration::from_secs_f64((piece - tokens) / self.rate))
                }
            };
            if let Some(w) = wait {
                tokio::time::sleep(w).await;
            }
        }
    }
}

/// Counters of one session with a remote.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Objects written.
    pub objects_up: AtomicU64,
    /// Bytes written.
    pub bytes_up: AtomicU64,
    /// Bytes read.
    pub bytes_down: AtomicU64,
    /// Requests retried after a transient failure.
    pub retries: AtomicU64,
}

/// A pack as the remote's index objects describe it.
#[derive(Debug)]
pub(crate) struct RemotePack {
    pub(crate) frames: Vec<FrameInfo>,
    pub(crate) len: u64,
}

impl From<RemoteSnapshot> for crate::store::Resolved {
    fn from(found: RemoteSnapshot) -> Self {
        crate::store::Resolved {
            name: found.name,
            id: found.id,
            manifest: found.manifest,
        }
    }
}

/// Whether the last component of `rel` is a temporary file's name (`pack::temp_path`).
fn is_temp_name(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name.starts_with("tmp-") && name.ends_with(".tmp")
}

/// A snapshot found on a remote ([`Remote::resolve`]).
#[derive(Debug)]
pub struct RemoteSnapshot {
    /// The name it was found under (for `@HEX`, the name its manifest records).
    pub name: String,
    /// Its id.
    pub id: SnapshotId,
    /// Whether it is the name's current snapshot on the remote.
    pub is_head: bool,
    /// The manifest's bytes as stored (they hash to `id`).
    pub bytes: Bytes,
    /// The manifest, parsed (and opened, on an encrypted remote).
    pub manifest: Manifest,
}

/// The body of `answer`, which must be exactly `want` bytes (`want` is bounded by the caller):
/// a local file is read over the range asked; a stream is read no further than `want`, so a
/// server that sends more is refused without its body being buffered. `Err(Some(n))`: only `n`
/// bytes came; `Err(None)`: more than `want` came.
async fn exact_body(
    answer: object_store::GetResult,
    want: u64,
) -> object_store::Result<std::result::Result<Bytes, Option<usize>>> {
    if let object_store::GetResultPayload::File(..) = &answer.payload {
        let b = answer.bytes().await?;
        return Ok(if b.len() as u64 == want {
            Ok(b)
        } else {
            Err(Some(b.len()))
        });
    }
    let mut body = Vec::with_capacity(want as usize);
    let mut parts = answer.into_stream();
    while let Some(part) = parts.next().await {
        let part = part?;
        if (body.len() + part.len()) as u64 > want {
            return Ok(Err(None));
        }
        body.extend_from_slice(&part);
    }
    if body.len() as u64 != want {
        return Ok(Err(Some(body.len())));
    }
    Ok(Ok(Bytes::from(body)))
}

/// The remote's chunk set, from its index objects.
#[derive(Debug, Default)]
pub(crate) struct RemoteIndex {
    pub(crate) chunks: HashMap<ChunkId, (PackId, ChunkLoc)>,
    pub(crate) packs: HashMap<PackId, Arc<RemotePack>>,
    /// Each indexed pack's entries (excluded packs included).
    pub(crate) entries: HashMap<PackId, Vec<crate::pack::PackEntry>>,
}

/// An open remote.
#[derive(Debug)]
pub struct Remote {
    name: String,
    url: String,
    rt: tokio::runtime::Runtime,
    os: Arc<dyn ObjectStore>,
    prefix: String,
    cache_dir: PathBuf,
    index: RwLock<RemoteIndex>,
    /// Packs whose chunks [`Remote::refresh_index`] leaves out of the chunk set (a push's view:
    /// packs a gc condemned are treated as absent).
    excluded: RwLock<HashSet<PackId>>,
    limit: Option<Arc<RateLimit>>,
    traffic: Traffic,
    /// The keys of an encrypted remote, once unlocked (frames opened, ids checked keyed).
    keys: RwLock<Option<Arc<Keys>>>,
    /// A directory remote's root: objects are written by [`write_dir_object`] (fsynced), reads
    /// and listings go through `os`.
    dir: Option<PathBuf>,
}

/// Writes object `rel` of the directory remote at `root` so that a crash or a power cut leaves
/// it whole or absent (`object_store`'s local backend renames without fsync): missing parent
/// directories are created and their parents fsynced, then the object goes through a temporary
/// file, fsync, rename (or, `create_only`, a link that never replaces an existing object) and a
/// fsync of its directory. Returns false when `create_only` found the object there.
fn write_dir_object(root: &Path, rel: &str, bytes: &[u8], create_only: bool) -> Result<bool> {
    let bad = || Error::InvalidArgument(format!("object name {rel:?} for directory remote"));
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || !rel_path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(bad());
    }
    let path = root.join(rel_path);
    let dir = path.parent().ok_or_else(bad)?;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(crate::pack::io_err(dir, "create directory"))?;
        let mut d = dir;
        while d != root {
            let Some(up) = d.parent() else { break };
            crate::pack::sync_dir(up)?;
            d = up;
        }
    }
    if create_only {
        crate::store::write_new_atomic(dir, &path, bytes)
    } else {
        write_atomic(dir, &path, bytes).map(|()| true)
    }
}

/// Largest `keys` object accepted.
const MAX_KEYS_LEN: u64 = 64 << 10;

fn timeout_from_env() -> Duration {
    std::env::var("VMNEST_REMOTE_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && *s < 86_400.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64)
}

/// What [`Remote::publish_keys`] did with the remote's `keys` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysPublished {
    /// Written where there was none, or left as it was (the same generation).
    Kept,
    /// Replaced: it kept the key an older way than the store does now.
    Replaced,
    /// Left: it keeps the key a newer way than this store (whose key should be changed too).
    RemoteNewer,
}

impl Remote {
    /// Opens remote `name` of the store at `store_root` (no request is made).
    pub fn open(store_root: &Path, name: &str) -> Result<Remote> {
        let url = remote_url(store_root, name)?;
        let cache_dir = remotes_dir(store_root).join(name).join("cache");
        Self::open_url(name, &url, cache_dir)
    }

    /// Opens `url` as remote `name`, caching index objects under `cache_dir`. An S3 remote takes
    /// its endpoint, region and credentials from the standard `AWS_*` variables; requests go
    /// path-style, and over plain HTTP only when the endpoint says `http://`.
    pub fn open_url(name: &str, url: &str, cache_dir: PathBuf) -> Result<Remote> {
        let target = parse_url(url)?;
        let label = |why: String| Error::Remote {
            object: url.to_string(),
            reason: why,
        };
        let timeout = timeout_from_env();
        let mut dir_root = None;
        let (os, prefix): (Arc<dyn ObjectStore>, String) = match target {
            Target::S3 { bucket, prefix } => {
                let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok());
                let http = endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"));
                let client = object_store::ClientOptions::new()
                    .with_allow_http(http)
                    .with_timeout(timeout)
                    .with_connect_timeout(timeout.min(Duration::from_secs(10)));
                let retry = object_store::RetryConfig {
                    backoff: object_store::BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(2),
                        base: 2.0,
                    },
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(120),
                };
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(false)
                    .with_client_options(client)
                    .with_retry(retry);
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                let s3 = b.build().map_err(|e| label(e.to_string()))?;
                (Arc::new(s3), prefix)
            }
            Target::Dir(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(crate::pack::io_err(&dir, "create remote directory"))?;
                let fs =
                    LocalFileSystem::new_with_prefix(&dir).map_err(|e| label(e.to_string()))?;
                dir_root = Some(dir);
                (Arc::new(fs), String::new())
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vmnest-remote")
            .enable_all()
            .build()
            .map_err(|e| label(format!("start the I/O runtime: {e}")))?;
        Ok(Remote {
            name: name.to_string(),
            url: url.to_string(),
            rt,
            os,
            prefix,
            cache_dir,
            index: RwLock::new(RemoteIndex::default()),
            excluded: RwLock::new(HashSet::new()),
            limit: None,
            traffic: Traffic::default(),
            dir: dir_root,
            keys: RwLock::new(None),
        })
    }

    /// Reads this remote with `keys` (an encrypted remote): sealed frames are opened, chunk ids
    /// checked keyed.
    pub fn set_keys(&self, keys: Option<Arc<Keys>>) {
        if let Ok(mut g) = self.keys.write() {
            *g = keys;
        }
    }

    /// The keys set by [`Remote::set_keys`].
    pub fn keys(&self) -> Option<Arc<Keys>> {
        self.keys.read().ok().and_then(|g| g.clone())
    }

    /// The remote's `keys` object (an encrypted store's encryption section), if it has one.
    pub fn encryption(&self) -> Result<Option<EncryptionConfig>> {
        let Some(bytes) = self.block_on(self.get_small("keys", MAX_KEYS_LEN))? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::corrupt(
                format!("{}/keys", self.url.trim_end_matches('/')),
                0,
                e.to_string(),
            )
        })
    }

    /// Checks, before any transfer, that a store whose encryption section is `local` (None: a
    /// plain store) and this remote use the same key: a plain store and an encrypted remote, an
    /// encrypted store and a remote of another key, or an encrypted store and a remote that
    /// holds a plain store's objects are refused with an error naming both. Returns the
    /// remote's section.
    pub fn check_keys(
        &self,
        store: &Path,
        local: Option<&EncryptionConfig>,
    ) -> Result<Option<EncryptionConfig>> {
        let remote = self.encryption()?;
        let err = |why: String| Error::InvalidArgument(format!("remote {}: {why}", self.name));
        match (local, &remote) {
            (None, None) => {}
            (None, Some(r)) => {
                return Err(err(format!(
                    "it is encrypted (key fingerprint {}) and store {} is not; \
                     `vmnest init --encrypt --from-remote {}` makes a store that shares its key",
                    r.fingerprint,
                    store.display(),
                    self.name
                )));
            }
            (Some(l), Some(r)) if l.fingerprint != r.fingerprint => {
                return Err(err(format!(
                    "it is encrypted with another key (fingerprint {}) than store {} ({})",
                    r.fingerprint,
                    store.display(),
                    l.fingerprint
                )));
            }
            (Some(_), Some(_)) => {}
            (Some(_), None) => {
                let used = !self.block_on(self.list("snapshots"))?.is_empty()
                    || !self.block_on(self.list("packs"))?.is_empty();
                if used {
                    return Err(err(format!(
                        "it holds a plain store's objects and store {} is encrypted",
                        store.display()
                    )));
                }
            }
        }
        Ok(remote)
    }

    /// Publishes `section` as the remote's `keys` object, given `there`, the one the remote has
    /// ([`Remote::check_keys`] returned it; same fingerprint). None there: written with
    /// If-None-Match (one that appeared meanwhile must have the same fingerprint). One of an
    /// older generation (the store's key was changed since, `vmnest key change`) is replaced, so
    /// that a new site unlocks the remote the way the store is unlocked now; one of a newer
    /// generation is kept (this store keeps the key an older way).
    pub fn publish_keys(
        &self,
        section: &EncryptionConfig,
        there: Option<&EncryptionConfig>,
    ) -> Result<KeysPublished> {
        let bytes = serde_json::to_vec_pretty(section)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        match there {
            None => {
                if !self.block_on(self.put_new("keys", Bytes::from(bytes)))? {
                    let now = self.encryption()?;
                    if now.as_ref().map(|t| &t.fingerprint) != Some(&section.fingerprint) {
                        return Err(Error::InvalidArgument(format!(
                            "remote {}: another key was published there meanwhile",
                            self.name
                        )));
                    }
                }
                Ok(KeysPublished::Kept)
            }
            Some(t) if t.generation < section.generation => {
                self.block_on(self.put("keys", Bytes::from(bytes)))?;
                Ok(KeysPublished::Replaced)
            }
            Some(t) if t.generation > section.generation => Ok(KeysPublished::RemoteNewer),
            Some(_) => Ok(KeysPublished::Kept),
        }
    }

    /// Limits uploads to `rate` bytes a second.
    pub fn set_bwlimit(&mut self, rate: Option<u64>) {
        self.limit = rate.map(|r| Arc::new(RateLimit::new(r)));
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The remote's URL (never holds credentials: they come from the environment).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What went over the wire so far.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    fn key(&self, rel: &str) -> ObjPath {
        ObjPath::from(format!("{}{rel}", self.prefix))
    }

    /// An error about object `rel`.
    pub(crate) fn err(&self, rel: &str, reason: impl std::fmt::Display) -> Error {
        Error::Remote {
            object: format!("{}/{rel}", self.url.trim_end_matches('/')),
            reason: reason.to_string(),
        }
    }

    fn os_err(&self, rel: &str, e: object_store::Error) -> Error {
        // object_store's messages name the request and the server's answer; credentials are
        // sent in signed headers and never appear in them.
        self.err(rel, e)
    }

    /// Runs `op` with retries of transient failures (exponential backoff from 200 ms).
    pub(crate) async fn retry<T, F, Fut>(&self, rel: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, object_store::Error>>,
    {
        let attempts = std::env::var("VMNEST_REMOTE_ATTEMPTS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|n| (1..=50).contains(n))
            .unwrap_or(ATTEMPTS);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=attempts {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < attempts && transient(&e) => {
                    self.traffic.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(self.os_err(rel, e)),
            }
        }
        Err(self.err(rel, "gave up"))
    }

    pub(crate) fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Runs `f` in the background on the remote's runtime.
    pub(crate) fn spawn<F: Future<Output = ()> + Send + 'static>(&self, f: F) {
        drop(self.rt.spawn(f));
    }

    /// The directory of this remote's local caches (`remotes/<name>/cache`).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The directory of the frames `serve --from` and `mount --from` cache on disk
    /// ([`DiskFrameCache`]).
    pub fn frame_cache_dir(&self) -> PathBuf {
        self.cache_dir.join("frames")
    }

    /// Names of the objects under `dir/` (relative to it) and their sizes.
    pub(crate) async fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_times(dir)
            .await?
            .into_iter()
            .map(|(name, size, _)| (name, size))
            .collect())
    }

    /// Names of the objects under `dir/` (relative to it), their sizes and their
    /// LastModified times (milliseconds since the epoch, by the remote's clock).
    pub(crate) async fn list_times(&self, dir: &str) -> Result<Vec<(String, u64, i64)>> {
        let prefix = self.key(dir);
        let what = format!("{dir}/");
        self.retry(&what, || async {
            let mut out = Vec::new();
            let mut s = self.os.list(Some(&prefix));
            while let Some(meta) = s.next().await {
                let meta = meta?;
                let full = meta.location.to_string();
                let rel = full
                    .strip_prefix(&format!("{}{dir}/", self.prefix))
                    .unwrap_or(&full)
                    .to_string();
                // A directory remote's objects are written through temporaries beside them
                // (`write_dir_object`): one in flight, or left by a crash, is not an object.
                if self.dir.is_some() && is_temp_name(&rel) {
                    continue;
                }
                out.push((rel, meta.size, meta.last_modified.timestamp_millis()));
            }
            Ok(out)
        })
        .await
    }

    /// Deletes object `rel` (one that is not there is not an error).
    pub(crate) async fn delete(&self, rel: &str) -> Result<()> {
        let key = self.key(rel);
        self.retry(rel, || async {
            match self.os.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The remote's clock, in milliseconds since the epoch: the LastModified time of an
    /// object written for the purpose (`rel`, deleted again).
    pub(crate) async fn clock(&self, rel: &str) -> Result<i64> {
        self.put(rel, Bytes::from_static(b"vmnest clock\n")).await?;
        let key = self.key(rel);
        let at = self
            .retry(rel, || self.os.head(&key))
            .await?
            .last_modified
            .timestamp_millis();
        self.delete(rel).await?;
        Ok(at)
    }

    /// Sets the packs whose chunks the next [`Remote::refresh_index`] leaves out.
    pub(crate) fn exclude_packs(&self, packs: HashSet<PackId>) {
        if let Ok(mut x) = self.excluded.write() {
            *x = packs;
        }
    }

    /// Size of object `rel`, or None when it does not exist.
    pub(crate) async fn head(&self, rel: &str) -> Result<Option<u64>> {
        let key = self.key(rel);
        self.retry(rel, || async {
            match self.os.head(&key).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Bytes `range` of object `rel` (exactly that many, or an error; a body longer than the
    /// range is refused without being buffered).
    pub(crate) async fn get_range(&self, rel: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let key = self.key(rel);
        let want = range.end - range.start;
        let got = self
            .retry(rel, || async {
                let options = object_store::GetOptions {
                    range: Some(range.clone().into()),
                    ..Default::default()
                };
                exact_body(self.os.get_opts(&key, options).await?, want).await
            })
            .await?;
        let b = got.map_err(|len| {
            self.err(
                rel,
                match len {
                    Some(n) => format!("{n} bytes at {:#x} where {want} were asked", range.start),
                    None => format!("more bytes at {:#x} than the {want} asked", range.start),
                },
            )
        })?;
        self.traffic
            .bytes_down
            .fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b)
    }

    /// The whole of object `rel`, which must be at most `cap` bytes; None when it does not exist.
    /// One GET: the size the answer declares is checked before its body is read, and no more
    /// than that size of the body is read whatever comes.
    pub(crate) async fn get_small(&self, rel: &str, cap: u64) -> Result<Option<Bytes>> {
        let key = self.key(rel);
        let got = self
            .retry(rel, || async {
                let answer = match self.os.get(&key).await {
                    Ok(a) => a,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let size = answer.meta.size;
                if size > cap {
                    return Ok(Some(Err(format!("{size} bytes, more than {cap}"))));
                }
                Ok(Some(exact_body(answer, size).await?.map_err(
                    |len| match len {
                        Some(n) => format!("{n} bytes where its answer declared {size}"),
                        None => format!("more bytes than the {size} its answer declared"),
                    },
                )))
            })
            .await?;
        match got {
            None => Ok(None),
            Some(Err(why)) => Err(self.err(rel, why)),
            Some(Ok(b)) => {
                self.traffic
                    .bytes_down
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
        }
    }

    /// Writes object `rel` (replacing it), paced by the bandwidth limit.
    pub(crate) async fn put(&self, rel: &str, bytes: Bytes) -> Result<()> {
        if let Some(l) = &self.limit {
            l.take(bytes.len() as u64).await;
        }
        let len = bytes.len() as u64;
        if self.dir.is_some() {
            self.write_file(rel, bytes, false).await?;
        } else {
            let key = self.key(rel);
            self.retry(rel, || self.os.put(&key, PutPayload::from(bytes.clone())))
                .await?;
        }
        self.count_up(len);
        Ok(())
    }

    /// Writes object `rel` of a directory remote ([`write_dir_object`]) on the blocking pool.
    async fn write_file(&self, rel: &str, bytes: Bytes, create_only: bool) -> Result<bool> {
        let Some(root) = self.dir.clone() else {
            return Err(self.err(rel, "not a directory remote"));
        };
        let name = format!("{}{rel}", self.prefix);
        tokio::task::spawn_blocking(move || write_dir_object(&root, &name, &bytes, create_only))
            .await
            .map_err(|e| self.err(rel, e))?
    }

    fn count_up(&self, len: u64) {
        self.traffic.objects_up.fetch_add(1, Ordering::Relaxed);
        self.traffic.bytes_up.fetch_add(len, Ordering::Relaxed);
    }

    /// Writes object `rel` only if it does not exist (If-None-Match: *). Returns false when it
    /// existed already.
    pub(crate) async fn put_new(&self, rel: &str, bytes: Bytes) -> Result<bool> {
        let len = bytes.len() as u64;
        if self.dir.is_some() {
            let r = self.write_file(rel, bytes, true).await?;
            if r {
                self.count_up(len);
            }
            return Ok(r);
        }
        let key = self.key(rel);
        let opts = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let r = self
            .retry(rel, || {
                let key = key.clone();
                let payload = PutPayload::from(bytes.clone());
                async move {
                    match self.os.put_opts(&key, payload, opts()).await {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::AlreadyExists { .. })
                        | Err(object_store::Error::Precondition { .. }) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        if r {
            self.count_up(len);
        }
        Ok(r)
    }

    /// Writes a large object in parts of `part` bytes (multipart upload), paced by the limit.
    pub(crate) async fn put_large(&self, rel: &str, bytes: Bytes, part: usize) -> Result<()> {
        if bytes.len() <= part * 2 || self.dir.is_some() {
            return self.put(rel, bytes).await;
        }
        let key = self.key(rel);
        let len = bytes.len() as u64;
        self.retry(rel, || async {
            let mut up = self.os.put_multipart(&key).await?;
            for piece in bytes.chunks(part) {
                if let Some(l) = &self.limit {
                    l.take(piece.len() as u64).await;
                }
                let sent = up.put_part(PutPayload::from(bytes.slice_ref(piece))).await;
                if let Err(e) = sent {
                    let _ = up.abort().await;
                    return Err(e);
                }
            }
            match up.complete().await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let _ = up.abort().await;
                    Err(e)
                }
            }
        })
        .await?;
        self.count_up(len);
        Ok(())
    }

    /// The snapshots on the remote.
    pub fn snapshots(&self) -> Result<HashSet<SnapshotId>> {
        let listed = self.block_on(self.list("snapshots"))?;
        Ok(listed
            .into_iter()
            .filter_map(|(n, _)| SnapshotId::from_hex(&n))
            .collect())
    }

    /// The names on the remote and their snapshots.
    pub fn refs(&self) -> Result<BTreeMap<String, SnapshotId>> {
        let listed = self.block_on(self.list("refs"))?;
        let mut out = BTreeMap::new();
        for (name, _) in listed {
            if check_name(&name).is_err() {
                continue;
            }
            if let Some(id) = self.head_of(&name)? {
                out.insert(name, id);
            }
        }
        Ok(out)
    }

    /// The snapshot `refs/<name>` names on the remote, if any.
    pub fn head_of(&self, name: &str) -> Result<Option<SnapshotId>> {
        check_name(name).map_err(Error::InvalidArgument)?;
        let rel = format!("refs/{name}");
        let Some(b) = self.block_on(self.get_small(&rel, MAX_REF_LEN))? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&b).unwrap_or("");
        SnapshotId::from_hex(text.trim_end_matches('\n'))
            .map(Some)
            .ok_or_else(|| self.err(&rel, "not a snapshot id"))
    }

    /// The bytes and parsed manifest of snapshot `id` (checked against its name), or None.
    pub fn manifest(&self, id: &SnapshotId) -> Result<Option<(Bytes, Manifest)>> {
        let rel = format!("snapshots/{}", id.to_hex());
        let Some(b) = self.block_on(self.get_small(&rel, MAX_MANIFEST_LEN as u64))? else {
            return Ok(None);
        };
        let object = format!("{}/{rel}", self.url.trim_end_matches('/'));
        if SnapshotId::of(&b) != *id {
            return Err(Error::corrupt(
                object,
                0,
                "manifest does not match its name",
            ));
        }
        let mut m = Manifest::decode(&object, &b)?;
        if let Some(k) = self.keys() {
            k.open_manifest(&object, &mut m)?;
        }
        Ok(Some((b, m)))
    }

    /// Finds a snapshot on the remote: `NAME` (its ref), `NAME@HEX` (a snapshot of that name by
    /// an id prefix of at least 4 hex digits), `@HEX` (any). Returns it with its manifest, which
    /// is fetched once, here.
    pub fn resolve(&self, spec: &str) -> Result<RemoteSnapshot> {
        let (name, sel) = match spec.split_once('@') {
            Some((n, s)) => (n, Some(s)),
            None => (spec, None),
        };
        let head = if name.is_empty() {
            None
        } else {
            self.head_of(name)?
        };
        match sel {
            None | Some("") => {
                let id = head.ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "remote {} has no snapshot named {name}",
                        self.name
                    ))
                })?;
                let (bytes, manifest) = self.manifest_there(&id)?;
                Ok(RemoteSnapshot {
                    name: name.to_string(),
                    id,
                    is_head: true,
                    bytes,
                    manifest,
                })
            }
            Some(prefix) => {
                let prefix = prefix.to_ascii_lowercase();
                if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::InvalidArgument(format!(
                        "{spec}: a snapshot is named by at least 4 hex digits of its id"
                    )));
                }
                let found: Vec<SnapshotId> = self
                    .snapshots()?
                    .into_iter()
                    .filter(|id| id.to_hex().starts_with(&prefix))
                    .collect();
                let [id] = found.as_slice() else {
                    return Err(Error::InvalidArgument(format!(
                        "{spec}: {} snapshots on remote {} match",
                        found.len(),
                        self.name
                    )));
                };
                let (bytes, manifest) = self.manifest_there(id)?;
                let name = if name.is_empty() {
                    manifest.name.clone()
                } else {
                    name.to_string()
                };
                Ok(RemoteSnapshot {
                    name,
                    id: *id,
                    is_head: head == Some(*id),
                    bytes,
                    manifest,
                })
            }
        }
    }

    /// [`Remote::manifest`] of a snapshot that must be there (a ref or a listing named it).
    fn manifest_there(&self, id: &SnapshotId) -> Result<(Bytes, Manifest)> {
        self.manifest(id)?
            .ok_or_else(|| self.err(&format!("snapshots/{}", id.to_hex()), "not found"))
    }

    /// Re-reads the remote's chunk set: lists `index/`, fetches index objects not cached yet
    /// (checking them), drops cached ones no longer listed.
    pub fn refresh_index(&self) -> Result<()> {
        let listed = self.block_on(self.list("index"))?;
        let dir = self.cache_dir.join("index");
        std::fs::create_dir_all(&dir).map_err(crate::pack::io_err(&dir, "create cache"))?;
        let mut fresh = RemoteIndex::default();
        let mut keep = HashSet::new();
        let mut have = Vec::new();
        let mut missing = Vec::new();
        for (file, size) in listed {
            let Some(id) = file.strip_suffix(".idx").and_then(PackId::from_hex) else {
                continue;
            };
            keep.insert(format!("{}.idx", id.to_hex()));
            let rel = format!("index/{file}");
            let cached = dir.join(&file);
            // The local copy is untrusted too: one that does not parse is fetched again.
            let copy = read_capped(&cached, MAX_INDEX_OBJECT, "cached index")
                .ok()
                .filter(|b| b.len() as u64 == size)
                .and_then(|b| self.parse_index_object(&rel, &b).ok());
            match copy {
                Some(parsed) => have.push((id, parsed)),
                None => {
                    if size > MAX_INDEX_OBJECT {
                        return Err(
                            self.err(&rel, format!("{size} bytes, more than {MAX_INDEX_OBJECT}"))
                        );
                    }
                    missing.push((id, rel, cached, size));
                }
            }
        }
        // Index objects not cached yet are fetched several at once (a store just set up to
        // serve from the remote has none: they are all that stands before the first read).
        let fetched: Vec<Result<(PackId, String, std::path::PathBuf, Bytes)>> =
            self.block_on(
                futures::stream::iter(missing.into_iter().map(
                    |(id, rel, cached, size)| async move {
                        let b = self.get_range(&rel, 0..size).await?;
                        Ok((id, rel, cached, b))
                    },
                ))
                .buffer_unordered(INDEX_FETCHES)
                .collect(),
            );
        for r in fetched {
            let (id, rel, cached, b) = r?;
            let parsed = self.parse_index_object(&rel, &b)?;
            write_atomic(&dir, &cached, &b)?;
            have.push((id, parsed));
        }
        let excluded = self.excluded.read().map(|x| x.clone()).unwrap_or_default();
        for (id, (entries, frames, len)) in have {
            for e in entries.iter().filter(|_| !excluded.contains(&id)) {
                fresh.chunks.entry(e.id).or_insert((id, e.loc));
            }
            fresh.entries.insert(id, entries);
            fresh.packs.insert(id, Arc::new(RemotePack { frames, len }));
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for ent in rd.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                if name.ends_with(".tmp") {
                    // Another process's copy being written (a gc and a push, two servers)
                    // holds a lock on it: only an abandoned one goes.
                    crate::pack::remove_stale_temp(&ent.path());
                } else if !keep.contains(&name) {
                    let _ = std::fs::remove_file(ent.path());
                }
            }
        }
        *self
            .index
            .write()
            .map_err(|_| Error::InvalidArgument("remote index lock poisoned".into()))? = fresh;
        Ok(())
    }

    /// Parses index object `rel` of this remote; see [`parse_index_object`].
    pub(crate) fn parse_index_object(
        &self,
        rel: &str,
        bytes: &[u8],
    ) -> Result<(Vec<crate::pack::PackEntry>, Vec<FrameInfo>, u64)> {
        parse_index_object(&format!("{}/{rel}", self.url.trim_end_matches('/')), bytes)
    }

    /// Runs `f` on the remote's index as last refreshed.
    pub(crate) fn with_index<R>(&self, f: impl FnOnce(&RemoteIndex) -> R) -> R {
        match self.index.read() {
            Ok(i) => f(&i),
            Err(_) => f(&RemoteIndex::default()),
        }
    }

    /// Whether the remote's chunk set (as last refreshed) holds `id`.
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.index
            .read()
            .map(|i| i.chunks.contains_key(id))
            .unwrap_or(false)
    }

    /// Where the remote holds `id`, and its pack.
    pub(crate) fn locate(&self, id: &ChunkId) -> Option<(PackId, ChunkLoc, Arc<RemotePack>)> {
        let i = self.index.read().ok()?;
        let (p, loc) = *i.chunks.get(id)?;
        let pack = i.packs.get(&p)?.clone();
        Some((p, loc, pack))
    }

    /// Packs the remote's index objects describe.
    pub(crate) fn indexed_packs(&self) -> HashSet<PackId> {
        self.index
            .read()
            .map(|i| i.packs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Chunks in the remote's chunk set.
    pub fn chunk_count(&self) -> usize {
        self.index.read().map(|i| i.chunks.len()).unwrap_or(0)
    }
}

/// Parses an index object (a pack's bytes from its index section to its end), `object` naming
/// it in errors: returns the pack's entries, frames and file length. Bounded and checked by the
/// pack's own parsers (trailer checksum, index checksum, frames contiguous, entries sorted).
pub fn parse_index_object(
    object: &str,
    bytes: &[u8],
) -> Result<(Vec<crate::pack::PackEntry>, Vec<FrameInfo>, u64)> {
    let n = bytes.len();
    if (n as u64) < TRAILER_LEN {
        return Err(Error::corrupt(object, 0, "index object too short"));
    }
    let tb = &bytes[n - TRAILER_LEN as usize..];
    let at = |o: usize| u64::from_le_bytes(tb[o..o + 8].try_into().unwrap_or([0; 8]));
    let file_len = at(24)
        .checked_add(at(32))
        .and_then(|v| v.checked_add(TRAILER_LEN))
        .ok_or_else(|| Error::corrupt(object, 0, "index offsets overflow"))?;
    let t = parse_trailer(object, tb, file_len)?;
    if t.index_len + TRAILER_LEN != n as u64 {
        return Err(Error::corrupt(
            object,
            0,
            format!(
                "{n} bytes, where the trailer says {}",
                t.index_len + TRAILER_LEN
            ),
        ));
    }
    let (entries, frames) = parse_index(object, &t, &bytes[..t.index_len as usize])?;
    Ok((entries, frames, file_len))
}

/// Visits the ids member `new` refers to that a replica holding `old` (the same member of an
/// ancestor, if any) may lack: see [`crate::map::changed`]. A recipe's parts that `old` has
/// too are skipped; `visit(id, is_node)` returning false skips a node's or part's contents.
pub(crate) fn member_ids<S: ChunkStore + ?Sized>(
    store: &S,
    old: Option<&Member>,
    new: &Member,
    visit: &mut dyn FnMut(&ChunkId, bool) -> bool,
) -> Result<()> {
    match &new.layout {
        Layout::Map { .. } => {
            let Some(root) = new.map_root() else {
                return Ok(());
            };
            let old_root = old.and_then(Member::map_root);
            crate::map::changed(store, old_root.as_ref(), &root, visit)
        }
        Layout::Recipe { parts, .. } => {
            let before: HashSet<ChunkId> = match old.map(|o| &o.layout) {
                Some(Layout::Recipe { parts, .. }) => parts.iter().copied().collect(),
                _ => HashSet::new(),
            };
            for part in parts {
                if before.contains(part) || !visit(part, true) {
                    continue;
                }
                for id in crate::store::stream::part_chunks(store, part)? {
                    visit(&id, false);
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
