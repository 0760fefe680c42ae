//! Client-side encryption of a store: keys, the `encryption` section of a store's config, and
//! the sealing of pack frames.
//!
//! # Keys
//!
//! A store created with `--encrypt` has a random 32-byte *master key*. It is kept either in a
//! key file (hex, mode 0600; the config then records only the key's fingerprint) or wrapped
//! with XChaCha20-Poly1305 under a *key-encryption key* derived from a passphrase with argon2id
//! (the config records the wrapped key, the random salt and the argon2 costs). Unwrapping with
//! a wrong passphrase fails on the AEAD tag and a wrong key file fails on the fingerprint, both
//! before anything is read: [`Error::WrongKey`].
//!
//! Subkeys come from the master key with `blake3::derive_key` under distinct contexts:
//!
//! | subkey | use |
//! |---|---|
//! | id key | chunk ids are `BLAKE3-keyed(id key, plaintext)` ([`IdHasher::Keyed`]) |
//! | frame key | XChaCha20-Poly1305 key of sealed pack frames ([`Keys::seal_frame`]) |
//! | manifest key | keyed BLAKE3 MAC of manifests; a key derived from it seals their `origin` and `labels` |
//! | volume log keys | XChaCha20 stream key and keyed BLAKE3 MAC key of writable volumes' logs ([`LogKeys`]) |
//!
//! The key fingerprint published in the config (and to remotes) is a derived value of the id
//! key under its own context: it identifies the key without revealing it.
//!
//! # Sealed frames
//!
//! A sealed frame's stored bytes are `nonce (24) || ciphertext || tag (16)`, the AEAD applied
//! after compression, with a fresh random nonce per frame. The associated data binds a format
//! label, the frame's plaintext length and its flags, so a header edited to turn a sealed
//! frame into a plain one, or to change its length, fails the tag. The frame header's CRC-32C
//! covers the sealed bytes, so damage is found without keys; after opening, every chunk is
//! still checked against its keyed id.

use std::path::Path;

use chacha20::XChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::store::Manifest;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Bytes of an XChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed frame adds to its stored bytes (nonce and tag).
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Name of the cipher recorded in the config.
pub const CIPHER: &str = "xchacha20poly1305";
/// Default argon2id memory cost in KiB (64 MiB; with 6 passes about 0.5 s on the 2-core test
/// machine: 3 passes measured 0.24 s).
pub const DEFAULT_ARGON2_MEMORY_KIB: u32 = 64 << 10;
/// Default argon2id time cost (passes).
pub const DEFAULT_ARGON2_ITERATIONS: u32 = 6;
/// Largest argon2id memory cost a config may ask for (KiB): 16 times the default. A remote's
/// `keys` object is untrusted, and its costs are paid before the tag can refuse anything.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 16 * DEFAULT_ARGON2_MEMORY_KIB;
/// Largest argon2id time cost a config may ask for (about 3 times the default).
pub const MAX_ARGON2_ITERATIONS: u32 = 16;
/// Largest argon2id parallelism a config may ask for: vmnest always wraps with one lane.
pub const MAX_ARGON2_LANES: u32 = 1;
/// Longest passphrase or key file read.
pub const MAX_SECRET_LEN: u64 = 4096;

const CONTEXT_ID: &str = "vmnest 2026-11 chunk id key";
const CONTEXT_FRAME: &str = "vmnest 2026-11 pack frame key";
const CONTEXT_MANIFEST: &str = "vmnest 2026-11 manifest key";
const CONTEXT_FINGERPRINT: &str = "vmnest 2026-11 key fingerprint";
const CONTEXT_MANIFEST_SEAL: &str = "vmnest 2026-11 manifest sealing key";
const CONTEXT_LOG_STREAM: &str = "vmnest 2026-11 volume log stream key";
const CONTEXT_LOG_MAC: &str = "vmnest 2026-11 volume log mac key";
const FRAME_LABEL: &[u8] = b"vmnest sealed frame v1";
const MANIFEST_LABEL: &[u8] = b"vmnest sealed manifest fields v1";
const WRAP_LABEL: &[u8] = b"vmnest wrapped master key v1";

/// How chunk ids are computed: plain BLAKE3, or BLAKE3 keyed with an encrypted store's id key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IdHasher {
    /// BLAKE3-256 of the plaintext ([`ChunkId::of`]).
    Plain,
    /// BLAKE3-256 keyed with the id key ([`ChunkId::keyed`]).
    Keyed([u8; KEY_LEN]),
}

impl IdHasher {
    /// The hasher of a store with `keys` (keyed) or without (plain).
    pub fn of(keys: Option<&Keys>) -> IdHasher {
        keys.map_or(IdHasher::Plain, Keys::hasher)
    }

    /// The id of `data`.
    pub fn id(&self, data: &[u8]) -> ChunkId {
        match self {
            IdHasher::Plain => ChunkId::of(data),
            IdHasher::Keyed(key) => ChunkId::keyed(key, data),
        }
    }

    /// Whether ids are keyed.
    pub fn is_keyed(&self) -> bool {
        matches!(self, IdHasher::Keyed(_))
    }
}

impl std::fmt::Debug for IdHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdHasher::Plain => "IdHasher::Plain",
            IdHasher::Keyed(_) => "IdHasher::Keyed(..)",
        })
    }
}

/// Where the key of an encrypted store comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A file holding the master key in hex.
    KeyFile(std::path::PathBuf),
    /// A passphrase (argon2id derives the key that unwraps the master key).
    Passphrase(Vec<u8>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::KeyFile(p) => write!(f, "KeySource::KeyFile({})", p.display()),
            KeySource::Passphrase(_) => f.write_str("KeySource::Passphrase(..)"),
        }
    }
}

/// How the master key is kept, as recorded in the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum Kdf {
    /// The master key is in a key file; the config holds only its fingerprint.
    KeyFile,
    /// The master key is wrapped under a key derived from a passphrase.
    Argon2id {
        /// Memory cost in KiB.
        memory_kib: u32,
        /// Time cost (passes).
        iterations: u32,
        /// Parallelism (lanes).
        lanes: u32,
        /// Random salt, hex.
        salt: String,
        /// `nonce || XChaCha20-Poly1305(master key) || tag`, hex.
        wrapped_key: String,
    },
}

/// The `encryption` section of an encrypted store's config (and the `keys` object of a remote
/// it pushes to). Never holds a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// Always [`CIPHER`].
    pub cipher: String,
    /// How the master key is kept.
    pub kdf: Kdf,
    /// The key's fingerprint, hex (a derived value of the id key; see the module docs).
    pub fingerprint: String,
    /// How many times the key was kept another way since the store was made (`vmnest key
    /// change`); a push replaces a remote's `keys` object only with a higher generation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// argon2id costs for a new passphrase-protected store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Argon2Costs {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Time cost (passes).
    pub iterations: u32,
}

impl Default for Argon2Costs {
    fn default() -> Self {
        Argon2Costs {
            memory_kib: DEFAULT_ARGON2_MEMORY_KIB,
            iterations: DEFAULT_ARGON2_ITERATIONS,
        }
    }
}

impl Argon2Costs {
    /// The defaults, lowered by `VMNEST_ARGON2_MEMORY_KIB` and `VMNEST_ARGON2_ITERATIONS` when
    /// set (tests use them; the costs chosen are recorded in the config).
    pub fn from_env() -> Argon2Costs {
        let get = |name: &str, default: u32| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Argon2Costs {
            memory_kib: get("VMNEST_ARGON2_MEMORY_KIB", DEFAULT_ARGON2_MEMORY_KIB),
            iterations: get("VMNEST_ARGON2_ITERATIONS", DEFAULT_ARGON2_ITERATIONS),
        }
    }
}

/// Raw key bytes, zeroed when dropped.
type RawKey = zeroize::Zeroizing<[u8; KEY_LEN]>;

/// The subkeys of an unlocked encrypted store (the raw ones wiped on drop, as the ciphers wipe
/// theirs).
#[derive(Clone)]
pub struct Keys {
    /// Kept for [`Keys::change`] only.
    master: RawKey,
    id: RawKey,
    frame: XChaCha20Poly1305,
    manifest_seal: XChaCha20Poly1305,
    manifest: RawKey,
    log: LogKeys,
    fingerprint: String,
}

/// Bytes of a volume log record's MAC.
pub const LOG_MAC_LEN: usize = 16;

/// The keys of a writable volume's sealed write log (see `store::volume::log`).
///
/// A record's payload is XChaCha20 keystream-xored under a random per-record nonce, so a read
/// of any byte range of a record decrypts only that range (the stream is seekable); the record
/// header and ciphertext are authenticated with a keyed BLAKE3 MAC, checked when the log is
/// replayed at open. No AEAD here: an AEAD tag covers a whole message, and a 4 KiB read of a
/// 4 MiB record would have to decrypt all of it.
#[derive(Clone)]
pub struct LogKeys {
    stream: RawKey,
    mac: RawKey,
}

impl std::fmt::Debug for LogKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogKeys")
    }
}

impl LogKeys {
    /// Encrypts or decrypts (the same operation) `buf`, which sits at byte `pos` of the payload
    /// of the record sealed under `nonce`.
    pub fn apply(&self, nonce: &[u8; NONCE_LEN], pos: u64, buf: &mut [u8]) {
        let mut cipher = XChaCha20::new(&(*self.stream).into(), nonce.into());
        cipher.seek(pos);
        cipher.apply_keystream(buf);
    }

    /// The MAC of the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; LOG_MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        for p in parts {
            h.update(p);
        }
        let mut out = [0u8; LOG_MAC_LEN];
        out.copy_from_slice(&h.finalize().as_bytes()[..LOG_MAC_LEN]);
        out
    }
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys(fingerprint {})", self.fingerprint)
    }
}

/// `len` random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out)
        .map_err(|e| Error::InvalidArgument(format!("randomness: {e}")))?;
    Ok(out)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect()
}

impl Keys {
    /// The subkeys of `master`.
    pub fn from_master(master: &[u8; KEY_LEN]) -> Keys {
        let derive = |context: &str, key: &[u8]| RawKey::new(blake3::derive_key(context, key));
        let id = derive(CONTEXT_ID, master);
        let frame = derive(CONTEXT_FRAME, master);
        let manifest = derive(CONTEXT_MANIFEST, master);
        let manifest_seal = derive(CONTEXT_MANIFEST_SEAL, &manifest[..]);
        let fingerprint = to_hex(&blake3::derive_key(CONTEXT_FINGERPRINT, &id[..])[..16]);
        Keys {
            master: RawKey::new(*master),
            id,
            frame: XChaCha20Poly1305::new(&(*frame).into()),
            manifest_seal: XChaCha20Poly1305::new(&(*manifest_seal).into()),
            manifest,
            log: LogKeys {
                stream: derive(CONTEXT_LOG_STREAM, master),
                mac: derive(CONTEXT_LOG_MAC, master),
            },
            fingerprint,
        }
    }

    /// The keys of writable volumes' logs.
    pub fn log_keys(&self) -> &LogKeys {
        &self.log
    }

    /// How this store computes chunk ids.
    pub fn hasher(&self) -> IdHasher {
        IdHasher::Keyed(*self.id)
    }

    /// The key's fingerprint (hex), as the config records it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The manifest key (keyed BLAKE3 of manifests).
    pub fn manifest_key(&self) -> &[u8; KEY_LEN] {
        &self.manifest
    }

    /// Seals a frame's compressed bytes: `nonce || ciphertext || tag`, with the frame's
    /// plaintext length and flags (including the sealed flag) as associated data.
    pub fn seal_frame(&self, plain_len: u32, flags: u32, data: &[u8]) -> Result<Vec<u8>> {
        seal(&self.frame, &frame_aad(plain_len, flags), data)
    }

    /// Opens sealed frame bytes; `object`, `frame` and `at` name it in the error when the tag
    /// does not match (damage, tampering or another store's key).
    pub fn open_frame(
        &self,
        object: &str,
        frame: u32,
        at: u64,
        plain_len: u32,
        flags: u32,
        stored: &[u8],
    ) -> Result<Vec<u8>> {
        if stored.len() < SEAL_OVERHEAD {
            return Err(Error::corrupt(
                object,
                at,
                format!("sealed frame {frame} is shorter than a nonce and a tag"),
            ));
        }
        open(&self.frame, &frame_aad(plain_len, flags), stored).ok_or_else(|| {
                Error::corrupt(
                    object,
                    at,
                    format!(
                        "sealed frame {frame} fails authentication (damaged, tampered with, or sealed with another key)"
                    ),
                )
            })
    }

    /// Seals a manifest for an encrypted store: `origin` and `labels` (paths, messages) move
    /// into `sealed`; name, parent, time and members stay plain (a remote checks completeness
    /// from them); `mac` authenticates the rest.
    pub fn seal_manifest(&self, m: &mut Manifest) -> Result<()> {
        let fields = SealedFields {
            origin: std::mem::take(&mut m.origin),
            labels: std::mem::take(&mut m.labels),
        };
        let json =
            serde_json::to_vec(&fields).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let blob = seal(&self.manifest_seal, MANIFEST_LABEL, &json)?;
        m.sealed = Some(to_hex(&blob));
        m.mac = None;
        m.mac = Some(
            blake3::keyed_hash(&self.manifest, &m.encode())
                .to_hex()
                .to_string(),
        );
        Ok(())
    }

    /// Checks a manifest's MAC and opens its sealed fields (the reverse of
    /// [`Keys::seal_manifest`]); `object` names it in errors.
    pub fn open_manifest(&self, object: &str, m: &mut Manifest) -> Result<()> {
        let bad = |why: &str| Error::corrupt(object, 0, format!("manifest {why}"));
        let Some(mac) = m.mac.take() else {
            return Err(bad("has no MAC, but the store is encrypted"));
        };
        let want = blake3::keyed_hash(&self.manifest, &m.encode());
        let got = from_hex(&mac)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(blake3::Hash::from_bytes);
        if got != Some(want) {
            return Err(bad("fails its MAC (tampered with, or another key's)"));
        }
        let Some(sealed) = m.sealed.take() else {
            return Err(bad("has no sealed fields"));
        };
        let blob = from_hex(&sealed).ok_or_else(|| bad("sealed fields are not hex"))?;
        if blob.len() < SEAL_OVERHEAD {
            return Err(bad("sealed fields are cut short"));
        }
        let json = open(&self.manifest_seal, MANIFEST_LABEL, &blob)
            .ok_or_else(|| bad("sealed fields fail authentication"))?;
        let fields: SealedFields =
            serde_json::from_slice(&json).map_err(|e| bad(&format!("sealed fields: {e}")))?;
        m.origin = fields.origin;
        m.labels = fields.labels;
        m.validate().map_err(|why| bad(&why))
    }

    /// Creates a new master key kept as `source` says: a key file that does not exist yet is
    /// created (0600) with a fresh key; an existing one is read (two stores may share a key);
    /// a passphrase wraps a fresh key. Returns the config section and the keys.
    pub fn create(source: &KeySource, costs: Argon2Costs) -> Result<(EncryptionConfig, Keys)> {
        match source {
            KeySource::KeyFile(path) => {
                let master = match read_key_file(path) {
                    Ok(k) => k,
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        let k = random_bytes()?;
                        write_key_file(path, &k)?;
                        k
                    }
                    Err(e) => return Err(e),
                };
                let mut master = master;
                let keys = Keys::from_master(&master);
                zeroize::Zeroize::zeroize(&mut master);
                Ok((
                    EncryptionConfig {
                        cipher: CIPHER.into(),
                        kdf: Kdf::KeyFile,
                        fingerprint: keys.fingerprint.clone(),
                        generation: 0,
                    },
                    keys,
                ))
            }
            KeySource::Passphrase(pass) => {
                let mut master: [u8; KEY_LEN] = random_bytes()?;
                let keys = Keys::from_master(&master);
                let kdf = wrap(&master, pass, costs);
                zeroize::Zeroize::zeroize(&mut master);
                Ok((
                    EncryptionConfig {
                        cipher: CIPHER.into(),
                        kdf: kdf?,
                        fingerprint: keys.fingerprint.clone(),
                        generation: 0,
                    },
                    keys,
                ))
            }
        }
    }

    /// The config section `current` with this master key kept another way: wrapped under the
    /// passphrase `new` (fresh salt, `costs`), or in the key file `new` (created 0600 when
    /// missing; an existing one must hold this very key); one generation later. The
    /// fingerprint, and so every id and sealed byte, stays.
    pub fn change(
        &self,
        current: &EncryptionConfig,
        new: &KeySource,
        costs: Argon2Costs,
    ) -> Result<EncryptionConfig> {
        // The generation may come from a remote's keys object: no wrap to 0 (which would make
        // every later push keep the remote's older wrapping).
        let generation = current.generation.checked_add(1).ok_or_else(|| {
            Error::InvalidArgument("the key's generation cannot go any higher".into())
        })?;
        let kdf = match new {
            KeySource::Passphrase(pass) => wrap(&self.master, pass, costs)?,
            KeySource::KeyFile(path) => {
                match read_key_file(path) {
                    Ok(k) if k == *self.master => {}
                    Ok(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "key file {} holds another key",
                            path.display()
                        )));
                    }
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        write_key_file(path, &self.master)?
                    }
                    Err(e) => return Err(e),
                }
                Kdf::KeyFile
            }
        };
        Ok(EncryptionConfig {
            cipher: CIPHER.into(),
            kdf,
            fingerprint: current.fingerprint.clone(),
            generation,
        })
    }

    /// Unlocks the keys of the store at `store` (named in errors) whose config section is
    /// `config`, with `source`. A wrong passphrase or key file is [`Error::WrongKey`].
    pub fn unlock(store: &Path, config: &EncryptionConfig, source: &KeySource) -> Result<Keys> {
        unlocked_keys(store, config, source)
    }
}

/// The keys of the store at `store` (named in errors) whose config section is `config`: the
/// master key unwrapped with `source`, checked against the fingerprint.
fn unlocked_keys(store: &Path, config: &EncryptionConfig, source: &KeySource) -> Result<Keys> {
    let object = format!("{}/config", store.display());
    let bad = |why: &str| Error::corrupt(&object, 0, format!("encryption section: {why}"));
    if config.cipher != CIPHER {
        return Err(bad(&format!("unknown cipher {:?}", config.cipher)));
    }
    let wrong = || Error::WrongKey(store.display().to_string());
    let master = match (&config.kdf, source) {
        (Kdf::KeyFile, KeySource::KeyFile(path)) => read_key_file(path)?,
        (Kdf::KeyFile, KeySource::Passphrase(_)) => {
            return Err(Error::InvalidArgument(format!(
                "store {} is encrypted with a key file, not a passphrase: give --key-file or VMNEST_KEY_FILE",
                store.display()
            )));
        }
        (
            Kdf::Argon2id {
                memory_kib,
                iterations,
                lanes,
                salt,
                wrapped_key,
            },
            KeySource::Passphrase(pass),
        ) => {
            let salt = from_hex(salt).ok_or_else(|| bad("salt is not hex"))?;
            let blob = from_hex(wrapped_key).ok_or_else(|| bad("wrapped key is not hex"))?;
            if blob.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
                return Err(bad("wrapped key has the wrong length"));
            }
            if *memory_kib > MAX_ARGON2_MEMORY_KIB
                || *iterations > MAX_ARGON2_ITERATIONS
                || *lanes > MAX_ARGON2_LANES
            {
                return Err(bad("argon2id costs are out of bounds"));
            }
            let mut kek = derive_kek(pass, &salt, *memory_kib, *iterations, *lanes)
                .map_err(|e| bad(&e.to_string()))?;
            let unwrapper = XChaCha20Poly1305::new(&kek.into());
            zeroize::Zeroize::zeroize(&mut kek);
            let mut master = open(&unwrapper, WRAP_LABEL, &blob).ok_or_else(wrong)?;
            let key: Option<[u8; KEY_LEN]> = master.as_slice().try_into().ok();
            zeroize::Zeroize::zeroize(&mut master);
            key.ok_or_else(wrong)?
        }
        (Kdf::Argon2id { .. }, KeySource::KeyFile(_)) => {
            return Err(Error::InvalidArgument(format!(
                "store {} is encrypted with a passphrase, not a key file: give --passphrase-file or VMNEST_PASSPHRASE",
                store.display()
            )));
        }
    };
    let mut master = master;
    let keys = Keys::from_master(&master);
    zeroize::Zeroize::zeroize(&mut master);
    if keys.fingerprint != config.fingerprint {
        return Err(wrong());
    }
    Ok(keys)
}

/// `master` wrapped under a key derived from `pass` with argon2id at `costs`, fresh salt.
fn wrap(master: &[u8; KEY_LEN], pass: &[u8], costs: Argon2Costs) -> Result<Kdf> {
    // What opening accepts: a store wrapped at higher costs could never be opened.
    if costs.memory_kib > MAX_ARGON2_MEMORY_KIB || costs.iterations > MAX_ARGON2_ITERATIONS {
        return Err(Error::InvalidArgument(format!(
            "argon2id costs of {} KiB and {} passes exceed the caps ({MAX_ARGON2_MEMORY_KIB} \
             KiB, {MAX_ARGON2_ITERATIONS} passes)",
            costs.memory_kib, costs.iterations
        )));
    }
    let salt: [u8; 16] = random_bytes()?;
    let lanes = 1;
    let mut kek = derive_kek(pass, &salt, costs.memory_kib, costs.iterations, lanes)?;
    let wrapper = XChaCha20Poly1305::new(&kek.into());
    zeroize::Zeroize::zeroize(&mut kek);
    let blob = seal(&wrapper, WRAP_LABEL, master)?;
    Ok(Kdf::Argon2id {
        memory_kib: costs.memory_kib,
        iterations: costs.iterations,
        lanes,
        salt: to_hex(&salt),
        wrapped_key: to_hex(&blob),
    })
}

/// The fields of a manifest that an encrypted store seals.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedFields {
    origin: String,
    labels: std::collections::BTreeMap<String, String>,
}

/// `nonce || ciphertext || tag` of `msg` under `cipher`, with a fresh random nonce.
fn seal(cipher: &XChaCha20Poly1305, aad: &[u8], msg: &[u8]) -> Result<Vec<u8>> {
    let nonce: [u8; NONCE_LEN] = random_bytes()?;
    let sealed = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg, aad })
        .map_err(|_| Error::InvalidArgument("sealing failed".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The plaintext of `nonce || ciphertext || tag`, or None when it does not authenticate (or is
/// shorter than a nonce and a tag).
fn open(cipher: &XChaCha20Poly1305, aad: &[u8], blob: &[u8]) -> Option<Vec<u8>> {
    if blob.len() < SEAL_OVERHEAD {
        return None;
    }
    let (nonce, msg) = blob.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg, aad })
        .ok()
}

fn frame_aad(plain_len: u32, flags: u32) -> Vec<u8> {
    let mut aad = FRAME_LABEL.to_vec();
    aad.extend_from_slice(&plain_len.to_le_bytes());
    aad.extend_from_slice(&flags.to_le_bytes());
    aad
}

fn derive_kek(
    pass: &[u8],
    salt: &[u8],
    memory_kib: u32,
    iterations: u32,
    lanes: u32,
) -> Result<[u8; KEY_LEN]> {
    let params = argon2::Params::new(memory_kib, iterations, lanes, Some(KEY_LEN))
        .map_err(|e| Error::InvalidArgument(format!("argon2id parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; KEY_LEN];
    argon
        .hash_password_into(pass, salt, &mut out)
        .map_err(|e| Error::InvalidArgument(format!("argon2id: {e}")))?;
    Ok(out)
}

/// Reads a key file: the 32-byte master key as 64 hex digits (surrounding white space allowed).
pub fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN]> {
    let bytes = crate::store::read_capped(path, MAX_SECRET_LEN, "key file")?;
    let text = String::from_utf8_lossy(&bytes);
    from_hex(&text)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "key file {} does not hold a key (64 hex digits)",
                path.display()
            ))
        })
}

/// Reads a passphrase file: its first line (without a trailing CR), at most
/// [`MAX_SECRET_LEN`] bytes of file; an empty first line is an error.
pub fn read_passphrase_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = crate::store::read_capped(path, MAX_SECRET_LEN, "passphrase file")?;
    first_line(&bytes, &path.display().to_string())
}

/// The passphrase on the first line of what `reader` gives (at most [`MAX_SECRET_LEN`] bytes
/// are read); `what` names the source in errors.
pub fn read_passphrase(reader: impl std::io::Read, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    reader
        .take(MAX_SECRET_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))?;
    if bytes.len() as u64 > MAX_SECRET_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what}: larger than {MAX_SECRET_LEN} bytes"
        )));
    }
    first_line(&bytes, what)
}

/// The first line of `bytes` without its line ending; empty is an error naming `what`.
fn first_line(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(Error::InvalidArgument(format!("{what}: empty first line")));
    }
    Ok(line.to_vec())
}

/// Writes a new key file (mode 0600, created exclusively, fsynced with its directory).
fn write_key_file(path: &Path, key: &[u8; KEY_LEN]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = crate::pack::io_err(path, "create key file");
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(crate::pack::io_err(path, "create key file"))?;
    f.write_all(format!("{}\n", to_hex(key)).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    crate::pack::sync_dir(dir.unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests;
