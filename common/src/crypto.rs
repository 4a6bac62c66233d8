//! Keys and sealing. Everything written to a repository is sealed here with
//! AES-256-GCM under the repository data key, a fresh random 96-bit nonce
//! per object, and associated data that binds the object to its name (a
//! chunk to its id, a manifest to its backup id), so that no object can be
//! swapped for another without detection.
//!
//! Key hierarchy: a master key (the coordinator's 0600 file,
//! `keys.master_key_file`, or a recovery key kept elsewhere) wraps the
//! repository keys (the data key and the chunk-id key), which are stored
//! wrapped in the repository itself, once per master key (key slots, owned
//! by the coordinator's `repository`). Rotating the master key wraps them
//! anew; no data is re-encrypted.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::Error;
use crate::pki::random_bytes;

pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

/// A 256-bit secret. Its `Debug` never shows the bytes, and the bytes are
/// overwritten with zeros when the key is dropped, so a freed key does not
/// linger in memory (or a core dump) after its last use.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_BYTES]);

impl Zeroize for SecretKey {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl ZeroizeOnDrop for SecretKey {}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn generate() -> Result<SecretKey, Error> {
        let bytes = Zeroizing::new(random_bytes(KEY_BYTES)?);
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&bytes);
        Ok(SecretKey(key))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<SecretKey, Error> {
        let key: [u8; KEY_BYTES] = bytes
            .try_into()
            .map_err(|_| Error::invalid("key", format!("must be {KEY_BYTES} bytes")))?;
        Ok(SecretKey(key))
    }

    /// Parses 64 hex digits (surrounding whitespace allowed), as key files hold.
    pub fn from_hex(text: &str) -> Result<SecretKey, Error> {
        let bytes = hex::decode(text.trim())
            .map(Zeroizing::new)
            .map_err(|_| Error::invalid("key", format!("must be {} hex digits", KEY_BYTES * 2)))?;
        SecretKey::from_bytes(&bytes)
    }

    /// The key as hex, for writing a key file. Secret.
    pub fn expose_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn expose_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// A short public name for this key (never the key): the first 8 bytes
    /// of its keyed BLAKE3 hash of a fixed label.
    pub fn key_id(&self) -> String {
        let hash = blake3::keyed_hash(&self.0, b"cairn key id v1");
        hex::encode(&hash.as_bytes()[..8])
    }

    /// BLAKE3 keyed hash of `data` under this key.
    pub fn keyed_hash(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }
}

/// What a sealed object is, so one kind can never be opened as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Chunk,
    Manifest,
    WrappedKeys,
}

impl Domain {
    fn label(self) -> &'static [u8] {
        match self {
            Domain::Chunk => b"cairn chunk v1\0",
            Domain::Manifest => b"cairn manifest v1\0",
            Domain::WrappedKeys => b"cairn wrapped keys v1\0",
        }
    }
}

fn associated_data(domain: Domain, binding: &[u8]) -> Vec<u8> {
    let mut aad = domain.label().to_vec();
    aad.extend_from_slice(binding);
    aad
}

/// Seals `plaintext`: `nonce || ciphertext || tag`.
pub fn seal(
    key: &SecretKey,
    domain: Domain,
    binding: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let cipher = Aes256Gcm::new_from_slice(key.expose_bytes())
        .map_err(|_| Error::invalid("key", "bad AES-256 key length"))?;
    let nonce_bytes = random_bytes(NONCE_BYTES)?;
    let nonce = Nonce::try_from(nonce_bytes.as_slice())
        .map_err(|_| Error::invalid("nonce", "bad length"))?;
    let aad = associated_data(domain, binding);
    let ciphertext = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| Error::invalid("plaintext", "too large to seal"))?;
    let mut sealed = nonce_bytes;
    sealed.extend_from_slice(&ciphertext);
    Ok(sealed)
}

/// Opens what [`seal`] made; fails if a single bit of it, the key, the
/// domain or the binding differs.
pub fn open(
    key: &SecretKey,
    domain: Domain,
    binding: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if sealed.len() < NONCE_BYTES + TAG_BYTES {
        return Err(SealError::Truncated);
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
    let cipher =
        Aes256Gcm::new_from_slice(key.expose_bytes()).map_err(|_| SealError::Authentication)?;
    let nonce = Nonce::try_from(nonce).map_err(|_| SealError::Truncated)?;
    let aad = associated_data(domain, binding);
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| SealError::Authentication)
}

/// Why a sealed object could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("too short to be a sealed object")]
    Truncated,
    #[error("authentication failed: the object was altered, or sealed under another key or name")]
    Authentication,
}

/// The repository's own keys, generated once per repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryKeys {
    /// Seals chunks and manifests.
    pub data: SecretKey,
    /// Keys the hash that names a chunk, so that chunk ids reveal nothing
    /// about the content to someone who holds only the bucket.
    pub chunk_id: SecretKey,
}

impl RepositoryKeys {
    pub fn generate() -> Result<RepositoryKeys, Error> {
        Ok(RepositoryKeys {
            data: SecretKey::generate()?,
            chunk_id: SecretKey::generate()?,
        })
    }
}

/// The repository keys sealed under a master key, as stored in the
/// repository (`keys/repository.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKeys {
    pub format: String,
    /// [`SecretKey::key_id`] of the master key that wrapped these keys.
    pub master_key_id: String,
    /// Hex of the sealed `data || chunk_id`.
    pub sealed: String,
}

const WRAPPED_KEYS_FORMAT: &str = "cairn-wrapped-keys-v1";

impl WrappedKeys {
    pub fn wrap(master: &SecretKey, keys: &RepositoryKeys) -> Result<WrappedKeys, Error> {
        let mut plaintext = Vec::with_capacity(2 * KEY_BYTES);
        plaintext.extend_from_slice(keys.data.expose_bytes());
        plaintext.extend_from_slice(keys.chunk_id.expose_bytes());
        let master_key_id = master.key_id();
        let sealed = seal(
            master,
            Domain::WrappedKeys,
            master_key_id.as_bytes(),
            &plaintext,
        )?;
        Ok(WrappedKeys {
            format: WRAPPED_KEYS_FORMAT.to_string(),
            master_key_id,
            sealed: hex::encode(sealed),
        })
    }

    pub fn unwrap(&self, master: &SecretKey) -> Result<RepositoryKeys, Error> {
        let fail = |reason: &str| Error::invalid("repository keys", reason.to_string());
        if self.format != WRAPPED_KEYS_FORMAT {
            return Err(fail("unknown format"));
        }
        if self.master_key_id != master.key_id() {
            return Err(fail(&format!(
                "wrapped under master key {}, but the configured master key is {}: use the master key this repository was made or last rotated with",
                self.master_key_id,
                master.key_id()
            )));
        }
        let sealed = hex::decode(&self.sealed).map_err(|_| fail("not hex"))?;
        let plaintext = open(
            master,
            Domain::WrappedKeys,
            self.master_key_id.as_bytes(),
            &sealed,
        )
        .map_err(|e| fail(&e.to_string()))?;
        if plaintext.len() != 2 * KEY_BYTES {
            return Err(fail("wrong length"));
        }
        Ok(RepositoryKeys {
            data: SecretKey::from_bytes(&plaintext[..KEY_BYTES])?,
            chunk_id: SecretKey::from_bytes(&plaintext[KEY_BYTES..])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_binds_key_domain_and_name() {
        let key = SecretKey::generate().unwrap();
        let other = SecretKey::generate().unwrap();
        let sealed = seal(&key, Domain::Chunk, b"id-1", b"hello").unwrap();
        assert_eq!(
            open(&key, Domain::Chunk, b"id-1", &sealed).unwrap(),
            b"hello"
        );
        let check_refused = |key: &SecretKey, domain, binding: &[u8], sealed: &[u8]| {
            assert!(open(key, domain, binding, sealed).is_err());
        };
        check_refused(&other, Domain::Chunk, b"id-1", &sealed);
        check_refused(&key, Domain::Manifest, b"id-1", &sealed);
        check_refused(&key, Domain::Chunk, b"id-2", &sealed);
        for position in [0, NONCE_BYTES, sealed.len() - 1] {
            let mut altered = sealed.clone();
            altered[position] ^= 1;
            check_refused(&key, Domain::Chunk, b"id-1", &altered);
        }
        check_refused(&key, Domain::Chunk, b"id-1", &sealed[..10]);
        // Two seals of the same plaintext differ (fresh nonces).
        assert_ne!(
            sealed,
            seal(&key, Domain::Chunk, b"id-1", b"hello").unwrap()
        );
    }

    #[test]
    fn wrapped_keys_round_trip_and_name_the_wrong_master_key() {
        let master = SecretKey::generate().unwrap();
        let keys = RepositoryKeys::generate().unwrap();
        let wrapped = WrappedKeys::wrap(&master, &keys).unwrap();
        assert_eq!(wrapped.unwrap(&master).unwrap(), keys);
        let json = serde_json::to_string(&wrapped).unwrap();
        assert!(!json.contains(&keys.data.expose_hex()));
        let other = SecretKey::generate().unwrap();
        let error = wrapped.unwrap(&other).unwrap_err().to_string();
        assert!(error.contains(&master.key_id()), "{error}");
        assert!(!format!("{keys:?}").contains(&keys.data.expose_hex()));
    }

    #[test]
    fn key_bytes_are_wiped_on_drop_and_never_in_debug_output() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<SecretKey>();
        // What `Drop` does.
        let mut key = SecretKey::generate().unwrap();
        assert_ne!(key.expose_bytes(), &[0u8; KEY_BYTES]);
        key.zeroize();
        assert_eq!(key.expose_bytes(), &[0u8; KEY_BYTES]);

        let key = SecretKey::generate().unwrap();
        let keys = RepositoryKeys {
            data: key.clone(),
            chunk_id: SecretKey::generate().unwrap(),
        };
        for shown in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{keys:?}"),
            format!("{keys:#?}"),
        ] {
            assert!(shown.contains("<redacted>"), "{shown}");
            for secret in [&key, &keys.chunk_id] {
                let bytes = secret.expose_bytes();
                assert!(!shown.contains(&secret.expose_hex()), "{shown}");
                assert!(!shown.contains(&hex::encode_upper(bytes)), "{shown}");
                // The bytes as a derived `Debug` would print them.
                let listed = format!("{bytes:?}");
                assert!(!shown.contains(listed.trim_matches(['[', ']'])), "{shown}");
            }
        }
    }

    #[test]
    fn hex_keys() {
        let key = SecretKey::generate().unwrap();
        assert_eq!(
            SecretKey::from_hex(&format!("{}\n", key.expose_hex())).unwrap(),
            key
        );
        assert!(SecretKey::from_hex("abc").is_err());
    }
}
