//! Pre-shared keys for TLS, read from a key file in the format of qemu's `tls-creds-psk`
//! (`keys.psk`) and GnuTLS's `psktool`: one `identity:hexkey` line per client.
//!
//! The file is read with bounds ([`MAX_FILE_BYTES`], [`MAX_LINE_BYTES`]). A malformed line is an
//! error naming the file and the line number; no error or log line ever shows what the file
//! holds (keys, and not identities either). Keys are zeroed when dropped.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest key file read (a few thousand clients' lines).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// The longest identity: OpenSSL's `PSK_MAX_IDENTITY_LEN`.
pub const MAX_IDENTITY: usize = 256;
/// The shortest key, in bytes (128 bits).
pub const MIN_KEY: usize = 16;
/// The longest key, in bytes: OpenSSL's `PSK_MAX_PSK_LEN`.
pub const MAX_KEY: usize = 512;
/// The longest line: an identity, a colon, the hex of a key, and a carriage return.
pub const MAX_LINE_BYTES: usize = MAX_IDENTITY + 1 + 2 * MAX_KEY + 1;

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_BYTES`].
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes; not a key file")]
    TooLarge { path: String },
    /// A line breaks the format.
    #[error("{path}: line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: &'static str,
    },
    /// The file holds no key.
    #[error("{path}: no `identity:hexkey` line")]
    Empty { path: String },
    /// An identity asked for is not in the file.
    #[error("{path}: no key for identity {identity:?}")]
    UnknownIdentity { path: String, identity: String },
}

/// A key's bytes, zeroed when dropped and never printed.
struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The identities and keys of a key file.
pub struct PskKeys {
    path: PathBuf,
    keys: Vec<(Vec<u8>, Secret)>,
}

impl fmt::Debug for PskKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskKeys")
            .field("path", &self.path)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl PskKeys {
    /// Reads and parses the key file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let io = |source| KeyFileError::Io {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut bytes = Vec::new();
        let read = file
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(io);
        let parsed = match read {
            Ok(n) if n as u64 > MAX_FILE_BYTES => Err(KeyFileError::TooLarge {
                path: shown.clone(),
            }),
            Ok(_) => Self::parse(path, &bytes),
            Err(e) => Err(e),
        };
        zeroize::Zeroize::zeroize(&mut bytes);
        parsed
    }

    /// Parses the bytes of a key file; `path` only names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, KeyFileError> {
        let line_error = |line: usize, reason: &'static str| KeyFileError::Line {
            path: path.display().to_string(),
            line,
            reason,
        };
        let mut keys: Vec<(Vec<u8>, Secret)> = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let number = i + 1;
            if line.len() > MAX_LINE_BYTES {
                return Err(line_error(number, "line too long"));
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(line_error(number, "no `:` between identity and key"));
            };
            let (identity, hex) = (&line[..colon], &line[colon + 1..]);
            if identity.is_empty() {
                return Err(line_error(number, "empty identity"));
            }
            if identity.len() > MAX_IDENTITY {
                return Err(line_error(
                    number,
                    "identity longer than 256 bytes (OpenSSL's limit)",
                ));
            }
            if identity.iter().any(|&b| b.is_ascii_control()) {
                return Err(line_error(number, "control character in the identity"));
            }
            let key = decode_hex(hex).map_err(|reason| line_error(number, reason))?;
            if key.0.len() < MIN_KEY {
                return Err(line_error(
                    number,
                    "key shorter than 16 bytes (32 hex digits)",
                ));
            }
            if key.0.len() > MAX_KEY {
                return Err(line_error(
                    number,
                    "key longer than 512 bytes (OpenSSL's limit)",
                ));
            }
            if keys.iter().any(|(id, _)| id == identity) {
                return Err(line_error(number, "identity given on an earlier line too"));
            }
            keys.push((identity.to_vec(), key));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.display().to_string(),
            });
        }
        Ok(PskKeys {
            path: path.to_path_buf(),
            keys,
        })
    }

    /// Keeps only the keys of `identities` (all of which must be in the file); an empty list
    /// keeps every key.
    pub fn restrict(mut self, identities: &[String]) -> Result<Self, KeyFileError> {
        if identities.is_empty() {
            return Ok(self);
        }
        for identity in identities {
            if self.find(identity.as_bytes()).is_none() {
                return Err(KeyFileError::UnknownIdentity {
                    path: self.path.display().to_string(),
                    identity: identity.clone(),
                });
            }
        }
        self.keys
            .retain(|(id, _)| identities.iter().any(|want| want.as_bytes() == id));
        Ok(self)
    }

    /// The key of `identity`.
    pub fn find(&self, identity: &[u8]) -> Option<&[u8]> {
        self.keys
            .iter()
            .find(|(id, _)| id == identity)
            .map(|(_, key)| key.0.as_slice())
    }

    /// How many identities have a key.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no identity has a key (never true of a parsed file).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The file the keys came from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Decodes hexadecimal digits (either case) into a key.
fn decode_hex(hex: &[u8]) -> Result<Secret, &'static str> {
    if hex.is_empty() {
        return Err("empty key");
    }
    if !hex.len().is_multiple_of(2) {
        return Err("odd number of hex digits in the key");
    }
    if hex.len() > 2 * MAX_KEY {
        return Err("key longer than 512 bytes (OpenSSL's limit)");
    }
    let mut key = Secret(Vec::with_capacity(hex.len() / 2));
    for pair in hex.chunks_exact(2) {
        let (Some(high), Some(low)) = (nibble(pair[0]), nibble(pair[1])) else {
            return Err("the key is not hexadecimal (0-9, a-f)");
        };
        key.0.push(high << 4 | low);
    }
    Ok(key)
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff";

    fn parse(text: &[u8]) -> Result<PskKeys, KeyFileError> {
        PskKeys::parse(Path::new("keys.psk"), text)
    }

    fn line_of(e: KeyFileError) -> (usize, &'static str) {
        match e {
            KeyFileError::Line { line, reason, .. } => (line, reason),
            other => panic!("expected a line error, got {other}"),
        }
    }

    #[test]
    fn qemu_style_lines_parse_with_lf_or_crlf_and_blank_lines() {
        let text = format!("qemu:{KEY}\r\n\nalice:{}\n", KEY.to_uppercase().repeat(2));
        let keys = parse(text.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        let want: Vec<u8> = (0..16u8).map(|i| i * 0x11).collect();
        assert_eq!(keys.find(b"qemu"), Some(want.as_slice()));
        assert_eq!(keys.find(b"alice").map(<[u8]>::len), Some(32));
        assert_eq!(keys.find(b"bob"), None);
        // The key after the first colon: an identity cannot hold one, a key cannot either.
        let (line, _) = line_of(parse(format!("a:b:{KEY}").as_bytes()).err().unwrap());
        assert_eq!(line, 1);
    }

    #[test]
    fn malformed_lines_are_named_by_number_and_never_show_the_contents() {
        let secret = "5ec2e75ec2e75ec2e75ec2e75ec2e75e";
        let cases: Vec<(String, &str)> = vec![
            (format!("qemu:{secret}\nqemu {secret}\n"), "no `:`"),
            (format!("qemu:{secret}\n:{secret}\n"), "empty identity"),
            (format!("qemu:{secret}\nbob:{secret}z\n"), "odd number"),
            (
                format!("qemu:{secret}\nbob:{}zz\n", &secret[2..]),
                "not hexadecimal",
            ),
            (
                format!("qemu:{secret}\nbob:{}\n", &secret[..30]),
                "shorter than 16",
            ),
            (format!("qemu:{secret}\nbob:\n"), "empty key"),
            (format!("qemu:{secret}\nqemu:{secret}\n"), "earlier line"),
            (
                format!("qemu:{secret}\nb\tob:{secret}\n"),
                "control character",
            ),
            (
                format!("qemu:{secret}\n{}:{secret}\n", "i".repeat(257)),
                "identity longer",
            ),
            (
                format!("qemu:{secret}\nbob:{}\n", "ab".repeat(513)),
                "key longer",
            ),
            (
                format!("qemu:{secret}\nbob:{secret}  \n"),
                "not hexadecimal",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text.as_bytes()).err().unwrap();
            let shown = e.to_string();
            assert!(shown.starts_with("keys.psk: line 2: "), "{shown}");
            assert!(shown.contains(want), "{shown} should say {want}");
            assert!(!shown.contains(&secret[..8]), "{shown} shows the key");
            assert!(!shown.contains("bob") && !shown.contains("qemu"), "{shown}");
        }
    }

    #[test]
    fn limits_are_inclusive() {
        let longest = format!("{}:{}\r\n", "i".repeat(MAX_IDENTITY), "0f".repeat(MAX_KEY));
        assert_eq!(longest.len() - 1, MAX_LINE_BYTES);
        let keys = parse(longest.as_bytes()).unwrap();
        assert_eq!(
            keys.find("i".repeat(256).as_bytes()).unwrap().len(),
            MAX_KEY
        );
    }

    #[test]
    fn a_long_line_is_refused_before_it_is_looked_at() {
        let mut text = format!("qemu:{KEY}\n").into_bytes();
        text.extend(std::iter::repeat_n(b'a', 1 << 16));
        let (line, reason) = line_of(parse(&text).err().unwrap());
        assert_eq!((line, reason), (2, "line too long"));
    }

    #[test]
    fn empty_files_and_files_of_blank_lines_hold_no_key() {
        for text in [&b""[..], b"\n", b"\r\n\r\n", b"\n\n\n"] {
            let e = parse(text).err().unwrap();
            assert!(matches!(e, KeyFileError::Empty { .. }), "{e}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic generator: every byte value, with colons and newlines often.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            let len = (round * 7) % 700;
            let text: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    match state % 8 {
                        0 => b':',
                        1 => b'\n',
                        2..=4 => b"0123456789abcdef"[(state >> 8) as usize % 16],
                        _ => (state >> 16) as u8,
                    }
                })
                .collect();
            if let Ok(keys) = parse(&text) {
                assert!(!keys.is_empty());
            }
        }
    }

    #[test]
    fn restrict_keeps_the_named_identities_and_refuses_unknown_ones() {
        let text = format!("qemu:{KEY}\nalice:{KEY}\nbob:{KEY}\n");
        let keys = parse(text.as_bytes()).unwrap();
        let keys = keys.restrict(&["alice".into(), "bob".into()]).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.find(b"qemu").is_none());
        let e = keys.restrict(&["carol".into()]).err().unwrap();
        assert_eq!(e.to_string(), "keys.psk: no key for identity \"carol\"");
        let all = parse(text.as_bytes()).unwrap().restrict(&[]).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn files_are_read_with_a_bound() {
        let dir = std::env::temp_dir().join(format!("vmnest-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("keys.psk");
        std::fs::write(&good, format!("qemu:{KEY}\n")).unwrap();
        assert_eq!(PskKeys::from_file(&good).unwrap().len(), 1);
        let big = dir.join("big.psk");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap(); // sparse
        let e = PskKeys::from_file(&big).err().unwrap();
        assert!(matches!(e, KeyFileError::TooLarge { .. }), "{e}");
        let e = PskKeys::from_file(&dir.join("missing.psk")).err().unwrap();
        assert!(e.to_string().contains("missing.psk"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
