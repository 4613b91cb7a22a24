//! Clarity's signing key: HMAC-SHA256 over each audit record's hash, with a key that only
//! clarity holds and that is kept outside JetStream (a file, `clarity.key_file`).
//!
//! The service credentials can rewrite the audit stream and recompute every SHA-256 of the
//! chain; they cannot compute a record's `sig` without this key. The file holds the key as hex
//! (at least 32 bytes); clarity creates it, with mode 0600, on its first start. The key id is
//! the first 16 hex digits of the key's SHA-256: records name it, so a rotated key (a new id)
//! still verifies the records it signed when kept in `clarity.retired_key_files`.

use std::io::{Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Bytes of a key clarity creates.
const KEY_BYTES: usize = 32;
/// Shortest key accepted from a file.
const MIN_KEY_BYTES: usize = 16;
/// Hex digits of a key id.
const KEY_ID_HEX: usize = 16;

/// Why a key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read, created or written.
    #[error("audit key {path}: {message}")]
    Io {
        /// The key file.
        path: String,
        /// What failed.
        message: String,
    },
    /// The file does not hold a key.
    #[error("audit key {path} is not a key: {message}")]
    Invalid {
        /// The key file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// An HMAC-SHA256 key and its id. Its `Debug` shows the id only.
#[derive(Clone)]
pub struct AuditKey {
    id: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey").field("id", &self.id).finish()
    }
}

impl AuditKey {
    /// A key from its bytes.
    pub fn from_secret(secret: Vec<u8>) -> Self {
        let id = hex(&Sha256::digest(&secret))[..KEY_ID_HEX].to_owned();
        Self { id, secret }
    }

    /// The key's id: the first 16 hex digits of its SHA-256.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signature of a record's `hash`: HMAC-SHA256, lowercase hex.
    pub fn sign(&self, hash: &str) -> String {
        hex(&hmac_sha256(&self.secret, hash.as_bytes()))
    }

    /// True when `sig` is this key's signature of `hash` (compared in constant time).
    pub fn verifies(&self, hash: &str, sig: &str) -> bool {
        let want = self.sign(hash);
        want.len() == sig.len()
            && want
                .bytes()
                .zip(sig.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Reads the key in `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .map_err(|e| KeyError::Io {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        let secret = unhex(text.trim()).ok_or_else(|| KeyError::Invalid {
            path: shown.clone(),
            message: "expected hex digits".into(),
        })?;
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::Invalid {
                path: shown,
                message: format!(
                    "{} bytes, at least {MIN_KEY_BYTES} are needed",
                    secret.len()
                ),
            });
        }
        Ok(Self::from_secret(secret))
    }

    /// Reads the key in `path`, or creates it (32 random bytes, mode 0600, parent folders
    /// included) when the file does not exist. True when it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyError> {
        if path.exists() {
            return Self::load(path).map(|key| (key, false));
        }
        let io = |e: std::io::Error| KeyError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut secret = vec![0u8; KEY_BYTES];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(io)?;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        match options.open(path) {
            Ok(mut file) => {
                writeln!(file, "{}", hex(&secret))
                    .and_then(|()| file.sync_all())
                    .map_err(io)?;
                Ok((Self::from_secret(secret), true))
            }
            // Another clarity on this host created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::load(path).map(|key| (key, false))
            }
            Err(e) => Err(io(e)),
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1 and test case 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_key_is_created_once_private_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/clarity.key");
        let (key, created) = AuditKey::load_or_create(&path).expect("created");
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = AuditKey::load_or_create(&path).expect("read");
        assert!(!created);
        assert_eq!(again.id(), key.id());
        assert_eq!(key.id().len(), KEY_ID_HEX);
        let sig = key.sign("abc");
        assert!(again.verifies("abc", &sig));
        assert!(!again.verifies("abd", &sig));
        let other = AuditKey::from_secret(vec![7; 32]);
        assert!(!other.verifies("abc", &sig));
    }

    #[test]
    fn a_bad_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        std::fs::write(&path, "not hex").expect("write");
        let err = AuditKey::load(&path).expect_err("refused").to_string();
        assert!(err.contains("expected hex digits"), "{err}");
        std::fs::write(&path, "abcd").expect("write");
        let err = AuditKey::load(&path).expect_err("refused").to_string();
        assert!(err.contains("at least 16"), "{err}");
        assert!(format!("{:?}", AuditKey::from_secret(vec![1; 32])).contains("id"));
    }
}
