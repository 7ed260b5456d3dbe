//! The encrypted object format: a 25-byte header followed by the AES-256-GCM ciphertext and
//! its 16-byte tag.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "MRSE" (medray stage encrypted)
//! 4       1     format version (1)
//! 5       8     key id (see [`KeyId`])
//! 13      12    nonce (random per object)
//! 25      n+16  ciphertext and GCM tag
//! ```
//!
//! The header and the object's key (its path in the stage) are authenticated as associated
//! data, so a flipped header byte, a truncated body or an object copied to another key are
//! all detected.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;

use super::key::{KeyId, StageKey, KEY_ID_BYTES};
use crate::{Error, Result};

/// Magic bytes at the start of every encrypted object.
pub const MAGIC: &[u8; 4] = b"MRSE";
/// Version of the format written by [`seal`].
pub const VERSION: u8 = 1;
/// Nonce length of AES-GCM in bytes (96 bits).
pub const NONCE_BYTES: usize = 12;
/// Length of the header in bytes.
pub const HEADER_BYTES: usize = 4 + 1 + KEY_ID_BYTES + NONCE_BYTES;
/// Length of the GCM authentication tag in bytes.
pub const TAG_BYTES: usize = 16;

fn aad(header: &[u8], object: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + object.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(object.as_bytes());
    aad
}

/// Encrypts `plaintext` stored under `object` with a fresh random nonce.
///
/// # Errors
/// [`Error::Decrypt`] only if the cipher refuses the input (larger than GCM allows).
pub fn seal(key: &StageKey, object: &str, plaintext: &[u8]) -> Result<Vec<u8>> {
    use rand::RngCore;
    let mut nonce = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend_from_slice(MAGIC);
    header.push(VERSION);
    header.extend_from_slice(&key.id().0);
    header.extend_from_slice(&nonce);
    let cipher = Aes256Gcm::new(&(*key.bytes()).into());
    let ciphertext = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: plaintext,
                aad: &aad(&header, object),
            },
        )
        .map_err(|_| Error::Decrypt {
            object: object.to_string(),
            key_id: key.id().to_string(),
            reason: "encryption failed (object too large for AES-GCM)".into(),
        })?;
    let mut out = header;
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Decrypts an object written by [`seal`]; never returns unauthenticated data.
///
/// # Errors
/// [`Error::WrongStageKey`] if the object names another key id; [`Error::Decrypt`] if it is
/// not a medray encrypted object, has an unknown version, is truncated or was modified.
pub fn open(key: &StageKey, object: &str, sealed: &[u8]) -> Result<Vec<u8>> {
    let bad = |reason: &str| Error::Decrypt {
        object: object.to_string(),
        key_id: key.id().to_string(),
        reason: reason.to_string(),
    };
    if sealed.len() < HEADER_BYTES + TAG_BYTES {
        return Err(bad(&format!(
            "object is {} bytes, shorter than the {} bytes of header and tag (truncated?)",
            sealed.len(),
            HEADER_BYTES + TAG_BYTES
        )));
    }
    let (header, body) = sealed.split_at(HEADER_BYTES);
    if &header[..4] != MAGIC {
        return Err(bad(
            "no medray encryption header (not encrypted, or damaged)",
        ));
    }
    if header[4] != VERSION {
        return Err(bad(&format!("unknown format version {}", header[4])));
    }
    let mut stored = [0u8; KEY_ID_BYTES];
    stored.copy_from_slice(&header[5..5 + KEY_ID_BYTES]);
    let stored = KeyId(stored);
    if stored != key.id() {
        return Err(Error::WrongStageKey {
            object: object.to_string(),
            stored_key_id: stored.to_string(),
            key_id: key.id().to_string(),
        });
    }
    let mut nonce = [0u8; NONCE_BYTES];
    nonce.copy_from_slice(&header[5 + KEY_ID_BYTES..]);
    let cipher = Aes256Gcm::new(&(*key.bytes()).into());
    cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: body,
                aad: &aad(header, object),
            },
        )
        .map_err(|_| bad("authentication failed: the object was modified or truncated"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trip_differs_from_plaintext_and_uses_fresh_nonces() {
        let key = StageKey::from_bytes([1; 32]);
        let plain = b"some voxels".repeat(10);
        let a = seal(&key, "x/a", &plain).unwrap();
        let b = seal(&key, "x/a", &plain).unwrap();
        assert_ne!(a, b);
        assert!(!a.windows(plain.len()).any(|w| w == plain.as_slice()));
        assert_eq!(open(&key, "x/a", &a).unwrap(), plain);
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let key = StageKey::from_bytes([1; 32]);
        let sealed = seal(&key, "k", b"hello world").unwrap();
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(open(&key, "k", &t).is_err(), "flip at {i} accepted");
        }
        for n in 0..sealed.len() {
            assert!(open(&key, "k", &sealed[..n]).is_err(), "truncation {n}");
        }
        assert!(
            open(&key, "other", &sealed).is_err(),
            "moved object accepted"
        );
    }

    #[test]
    fn wrong_key_names_both_key_ids() {
        let a = StageKey::from_bytes([1; 32]);
        let b = StageKey::from_bytes([2; 32]);
        let sealed = seal(&a, "k", b"data").unwrap();
        let msg = open(&b, "k", &sealed).unwrap_err().to_string();
        assert!(msg.contains(&a.id().to_string()), "{msg}");
        assert!(msg.contains(&b.id().to_string()), "{msg}");
        assert!(msg.contains("wrong stage.key"), "{msg}");
    }
}
