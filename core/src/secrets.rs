//! Encryption of secrets at rest: channel-account configs (vendor keys, SMTP passwords, webhook
//! secrets) and vendor access tokens are sealed with AES-256-GCM before they reach the store.
//!
//! A sealed value is `enc:v1:<key id>:<base64 of nonce ‖ ciphertext ‖ tag>`, with a random
//! 96-bit nonce per value and the kind of value (`account`, `token`) as associated data, so a
//! sealed token cannot be passed off as an account config. Values without the `enc:` prefix are
//! stored in clear (written before encryption was configured) and read as they are;
//! `herald secrets rotate` seals them.
//!
//! Keys form a ring: the first key seals, every key opens. To rotate, put a new key first, run
//! `herald secrets rotate` (every value is re-sealed with it), then drop the old key.

use crate::config::SecurityConfig;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rand::RngCore;
use std::path::Path;

const PREFIX: &str = "enc:v1:";

/// Why secrets cannot be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("bad secret key `{0}`: {1}")]
    BadKey(String, String),
    #[error("cannot read or write the key file {0}: {1}")]
    KeyFile(String, std::io::Error),
    #[error("a stored secret is sealed with key `{0}`, which is not configured")]
    UnknownKey(String),
    #[error("a stored secret is sealed, and no secret key is configured (security.secret_keys)")]
    NoKey,
    #[error("a stored secret cannot be opened: it is damaged or was sealed for another use")]
    Damaged,
}

/// The ring of keys secrets are sealed and opened with.
pub struct SecretBox {
    keys: Vec<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("SecretBox").field("key_ids", &ids).finish()
    }
}

impl SecretBox {
    /// A ring from `id:base64` entries (32-byte keys), separated by commas or new lines; the
    /// first seals.
    pub fn parse(ring: &str) -> Result<SecretBox, SecretError> {
        let mut keys = Vec::new();
        for entry in ring
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let (id, b64) = entry.split_once(':').ok_or_else(|| {
                SecretError::BadKey("?".into(), "expected `id:base64-of-32-bytes`".into())
            })?;
            let bad = |why: &str| SecretError::BadKey(id.to_string(), why.to_string());
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(bad("the id must be letters, digits or `-`"));
            }
            let raw = STANDARD.decode(b64).map_err(|_| bad("not base64"))?;
            let cipher = Aes256Gcm::new_from_slice(&raw).map_err(|_| bad("not 32 bytes"))?;
            keys.push((id.to_string(), cipher));
        }
        if keys.is_empty() {
            return Err(SecretError::BadKey("".into(), "no key given".into()));
        }
        Ok(SecretBox { keys })
    }

    /// A new random key as an `id:base64` entry.
    pub fn generate_entry(id: &str) -> String {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        format!("{id}:{}", STANDARD.encode(raw))
    }

    /// The ring `config` names: `secret_keys`, else the `secret_key_file`, else (when
    /// `default_file` is given: the embedded deployment) that file, made with a new key when
    /// missing. `None` when nothing is configured and there is no default file.
    pub fn from_config(
        config: &SecurityConfig,
        default_file: Option<&Path>,
    ) -> Result<Option<SecretBox>, SecretError> {
        if let Some(ring) = config
            .secret_keys
            .as_deref()
            .filter(|r| !r.trim().is_empty())
        {
            return SecretBox::parse(ring).map(Some);
        }
        let file = match (&config.secret_key_file, default_file) {
            (Some(f), _) => f.as_path(),
            (None, Some(f)) => {
                if !f.exists() {
                    write_new_key_file(f)?;
                }
                f
            }
            (None, None) => return Ok(None),
        };
        let ring = std::fs::read_to_string(file)
            .map_err(|e| SecretError::KeyFile(file.display().to_string(), e))?;
        SecretBox::parse(&ring).map(Some)
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals `plain` for use `kind` with the first key.
    pub fn seal(&self, kind: &str, plain: &str) -> String {
        let (id, cipher) = &self.keys[0];
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: kind.as_bytes(),
                },
            )
            .expect("AES-GCM seals any input under 64 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("{PREFIX}{id}:{}", STANDARD.encode(out))
    }

    /// Opens a stored value of use `kind`; a value in clear is returned as it is.
    pub fn open(&self, kind: &str, stored: &str) -> Result<String, SecretError> {
        let Some((id, body)) = split_sealed(stored) else {
            return Ok(stored.to_string());
        };
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, c)| c)
            .ok_or_else(|| SecretError::UnknownKey(id.to_string()))?;
        let raw = STANDARD.decode(body).map_err(|_| SecretError::Damaged)?;
        if raw.len() < 12 {
            return Err(SecretError::Damaged);
        }
        let (nonce, sealed) = raw.split_at(12);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: kind.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Damaged)?;
        String::from_utf8(plain).map_err(|_| SecretError::Damaged)
    }

    /// Whether a stored value should be sealed again: it is in clear, or sealed with a key
    /// other than the first.
    pub fn needs_resealing(&self, stored: &str) -> bool {
        split_sealed(stored).is_none_or(|(id, _)| id != self.primary_id())
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(stored: &str) -> bool {
    split_sealed(stored).is_some()
}

/// The key id and body of a sealed value.
fn split_sealed(stored: &str) -> Option<(&str, &str)> {
    stored.strip_prefix(PREFIX)?.split_once(':')
}

/// Writes a new one-key ring to `path`, readable by its owner only.
fn write_new_key_file(path: &Path) -> Result<(), SecretError> {
    use std::io::Write;
    let err = |e| SecretError::KeyFile(path.display().to_string(), e);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    let entry = SecretBox::generate_entry(&format!("k{}", chrono::Utc::now().format("%Y%m%d")));
    file.write_all(format!("{entry}\n").as_bytes())
        .map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_use() {
        let old = SecretBox::generate_entry("old");
        let new = SecretBox::generate_entry("new");
        let before = SecretBox::parse(&old).unwrap();
        let sealed = before.seal("account", r#"{"secret":"hunter2"}"#);
        assert!(sealed.starts_with("enc:v1:old:"), "{sealed}");
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            sealed,
            before.seal("account", r#"{"secret":"hunter2"}"#),
            "fresh nonce"
        );
        assert_eq!(
            before.open("account", &sealed).unwrap(),
            r#"{"secret":"hunter2"}"#
        );
        // Another use, a flipped byte, an unknown key: refused.
        assert!(matches!(
            before.open("token", &sealed),
            Err(SecretError::Damaged)
        ));
        let mut raw = STANDARD.decode(&sealed["enc:v1:old:".len()..]).unwrap();
        raw[20] ^= 1;
        let flipped = format!("enc:v1:old:{}", STANDARD.encode(raw));
        assert!(matches!(
            before.open("account", &flipped),
            Err(SecretError::Damaged)
        ));
        let other = SecretBox::parse(&new).unwrap();
        assert!(
            matches!(other.open("account", &sealed), Err(SecretError::UnknownKey(id)) if id == "old")
        );
        // Rotation: the new key seals, the old one still opens.
        let ring = SecretBox::parse(&format!("{new},{old}")).unwrap();
        assert_eq!(ring.primary_id(), "new");
        assert!(ring.needs_resealing(&sealed));
        assert!(ring.needs_resealing("{}"));
        let resealed = ring.seal("account", &ring.open("account", &sealed).unwrap());
        assert!(!ring.needs_resealing(&resealed));
        // Values in clear read as they are.
        assert_eq!(ring.open("account", "{}").unwrap(), "{}");
    }

    #[test]
    fn bad_rings_are_refused_without_echoing_the_key() {
        for ring in ["", "nocolon", "a:notbase64!", "a:AAAA", "bad id:AAAA"] {
            let e = SecretBox::parse(ring).unwrap_err().to_string();
            assert!(!e.contains("AAAA"), "{e}");
        }
    }

    #[test]
    fn the_default_key_file_is_made_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret.key");
        let config = SecurityConfig::default();
        let a = SecretBox::from_config(&config, Some(&file))
            .unwrap()
            .unwrap();
        let b = SecretBox::from_config(&config, Some(&file))
            .unwrap()
            .unwrap();
        assert_eq!(b.open("account", &a.seal("account", "x")).unwrap(), "x");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(SecretBox::from_config(&config, None).unwrap().is_none());
    }
}
