//! The one place that knows the state files are sealed with AES-256-GCM.

use aes_gcm::{
    aead::{Aead, AeadInOut, KeyInit, Payload},
    Aes256Gcm,
};

/// Length of a nonce, in bytes.
pub const NONCE_LEN: usize = 12;
/// Length of the authentication tag appended to the ciphertext, in bytes.
pub const TAG_LEN: usize = 16;

/// A fresh random nonce from the operating system. Never reused: every write draws a new one.
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).expect("the operating system's random source failed");
    nonce
}

/// Encrypts `buffer` in place, authenticating it together with `aad`; returns the tag,
/// which follows the ciphertext in a state file.
pub fn seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buffer: &mut [u8],
) -> [u8; TAG_LEN] {
    let cipher = Aes256Gcm::new(&(*key).into());
    cipher
        .encrypt_inout_detached(&(*nonce).into(), aad, buffer.into())
        .expect("AES-GCM encryption only fails for messages over 64 GiB")
        .into()
}

/// Decrypts and authenticates; `None` if the key is wrong or anything (ciphertext, tag,
/// associated data) was modified.
pub fn open(key: &[u8; 32], nonce: &[u8; NONCE_LEN], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let cipher = Aes256Gcm::new(&(*key).into());
    cipher
        .decrypt(&(*nonce).into(), Payload { msg: sealed, aad })
        .ok()
}
