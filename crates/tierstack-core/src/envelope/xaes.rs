//! XAES-256-GCM (<https://c2sp.org/XAES-256-GCM>): AES-256-GCM under a key derived from the
//! input key and the first half of a 192-bit nonce, with the second half as the GCM nonce.
//!
//! Why not AES-256-GCM alone: a cache cannot count its writes across a fleet, and random 96-bit
//! nonces allow only about 2^32 messages per key. Why not AES-256-GCM-SIV, the cipher before:
//! it derives two keys for every message, which made decrypting 1 KB twice as slow
//! (`docs/benchmarks.md`, "Choosing the cipher").
//!
//! What makes it fast here: the derivation (three AES blocks and an AES-256 key schedule) depends
//! only on the nonce's first half, so a writer keeps one first half, drawn at random, for up to
//! [`WRITES_PER_DERIVED_KEY`] writes and draws only the second half per write; readers keep the
//! ciphers they derived, per first half, once an entry under it has authenticated. Each derived
//! key thus encrypts at most [`WRITES_PER_DERIVED_KEY`] messages of one writer under random 96-bit
//! nonces, far inside AES-GCM's bound, and the wire format is the standard one: any XAES-256-GCM
//! implementation opens these entries given the key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aes::Aes256Enc;
use aes::cipher::BlockCipherEncrypt;
use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInOut, Generate, KeyInit};
use aes_gcm::{AesGcm, Tag};
use zeroize::Zeroizing;

/// The length of an input key.
pub(crate) const KEY_LEN: usize = 32;
/// The length of a nonce: the half that selects the derived key, then the GCM nonce.
pub(crate) const NONCE_LEN: usize = 24;
/// The length of the authentication tag.
pub(crate) const TAG_LEN: usize = 16;
/// How many writes one derived key encrypts before the writer draws a new first half. Random
/// 96-bit GCM nonces collide among 2^28 messages with a probability under 2^-41.
pub(crate) const WRITES_PER_DERIVED_KEY: u32 = 1 << 28;
/// The most derived ciphers a key keeps for reading (under 1 KB each). A first half is live as
/// long as entries written under it: one per key ring per writer process (and per 2^28 writes),
/// within the entries' lifetime. Past the limit one cipher is dropped per new one, and a read
/// under a dropped half derives again (about 0.3 µs, a third of decrypting 1 KB).
const MAX_DERIVED: usize = 1024;

/// The half of the nonce that selects the derived key.
type NonceHalf = [u8; NONCE_LEN / 2];
/// The second half: AES-256-GCM's nonce.
type Nonce = aes_gcm::Nonce<U12>;
/// AES-256-GCM on the encrypting half of AES only (GCM never runs AES backwards).
type Aes256Gcm = AesGcm<Aes256Enc, U12>;

/// Why a nonce could not be drawn or a ciphertext did not open; deliberately without detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XaesError {
    /// The system's random number generator failed.
    NoRandomness,
    /// The ciphertext, tag, nonce or associated data is not what this key sealed.
    Unauthentic,
}

/// One XAES-256-GCM key, with the derived ciphers it caches for writing and reading.
pub(crate) struct XaesKey {
    /// AES-256 under the input key (its round keys are zeroized on drop: `aes`'s `zeroize`).
    aes: Aes256Enc,
    /// The CMAC subkey K1 (steps 1 and 2 of the derivation), kept across derivations.
    k1: Zeroizing<[u8; 16]>,
    /// The first half this process writes under, its cipher, and the writes it has left.
    writer: Mutex<Option<Writer>>,
    /// Ciphers derived for first halves whose entries authenticated.
    readers: RwLock<HashMap<NonceHalf, Arc<Aes256Gcm>>>,
}

struct Writer {
    half: NonceHalf,
    cipher: Arc<Aes256Gcm>,
    writes_left: u32,
}

/// What one write encrypts with: its nonce and the cipher derived from the nonce's first half.
/// Sealing consumes it, so that no nonce encrypts twice.
pub(crate) struct Sealer {
    nonce: [u8; NONCE_LEN],
    cipher: Arc<Aes256Gcm>,
}

impl Sealer {
    /// The nonce this write encrypts under (the envelope records it).
    pub(crate) fn nonce(&self) -> &[u8; NONCE_LEN] {
        &self.nonce
    }

    /// Encrypts `payload` in place and returns its tag.
    pub(crate) fn seal(self, associated_data: &[u8], payload: &mut [u8]) -> Result<Tag, XaesError> {
        let gcm_nonce = Nonce::from(second_half(&self.nonce));
        self.cipher
            .encrypt_inout_detached(&gcm_nonce, associated_data, payload.into())
            .map_err(|_| XaesError::Unauthentic)
    }
}

impl XaesKey {
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        let aes = Aes256Enc::new(key.into());
        // L = AES(0^128); K1 = L << 1, reduced by x^128 + x^7 + x^2 + x + 1 when L's top bit is
        // set (a mask, not a branch on key material).
        let mut block = aes::Block::default();
        aes.encrypt_block(&mut block);
        let mut l_bytes = Zeroizing::new([0u8; 16]);
        l_bytes.copy_from_slice(&block);
        zeroize::Zeroize::zeroize(block.as_mut_slice());
        let l = Zeroizing::new(u128::from_be_bytes(*l_bytes));
        let reduction = 0x87 & 0u128.wrapping_sub(*l >> 127);
        let k1 = Zeroizing::new(((*l << 1) ^ reduction).to_be_bytes());
        Self {
            aes,
            k1,
            writer: Mutex::new(None),
            readers: RwLock::new(HashMap::new()),
        }
    }

    /// The derived key Kx for `half` (step 3 to 5 of the derivation).
    fn derive(&self, half: &NonceHalf) -> Aes256Gcm {
        let mut kx = Zeroizing::new([0u8; KEY_LEN]);
        for (counter, block) in [1u8, 2].into_iter().zip(kx.chunks_exact_mut(16)) {
            let mut m = aes::Block::default();
            m[..4].copy_from_slice(&[0x00, counter, b'X', 0x00]);
            m[4..].copy_from_slice(half);
            for (byte, k1) in m.iter_mut().zip(self.k1.iter()) {
                *byte ^= k1;
            }
            self.aes.encrypt_block(&mut m);
            block.copy_from_slice(&m);
            zeroize::Zeroize::zeroize(m.as_mut_slice());
        }
        Aes256Gcm::new((&*kx).into())
    }

    /// A fresh nonce for one write and its cipher: the writer's current first half (a new random
    /// one every [`WRITES_PER_DERIVED_KEY`] writes) and a random second half.
    pub(crate) fn sealer(&self) -> Result<Sealer, XaesError> {
        let second = NonceHalf::try_generate().map_err(|_| XaesError::NoRandomness)?;
        let (half, cipher) = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            let current = match writer.as_mut() {
                Some(current) if current.writes_left > 0 => current,
                _ => {
                    let half = NonceHalf::try_generate().map_err(|_| XaesError::NoRandomness)?;
                    let cipher = Arc::new(self.derive(&half));
                    self.remember(half, &cipher);
                    writer.insert(Writer {
                        half,
                        cipher,
                        writes_left: WRITES_PER_DERIVED_KEY,
                    })
                }
            };
            current.writes_left -= 1;
            (current.half, Arc::clone(&current.cipher))
        };
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..NONCE_LEN / 2].copy_from_slice(&half);
        nonce[NONCE_LEN / 2..].copy_from_slice(&second);
        Ok(Sealer { nonce, cipher })
    }

    /// Decrypts `ciphertext` sealed under `nonce` with `tag` into a new buffer.
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        associated_data: &[u8],
        ciphertext: &[u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<Vec<u8>, XaesError> {
        let half = first_half(nonce);
        let known = self
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&half)
            .cloned();
        let (cipher, derived) = match known {
            Some(cipher) => (cipher, false),
            None => (Arc::new(self.derive(&half)), true),
        };
        let mut plain = ciphertext.to_vec();
        cipher
            .decrypt_inout_detached(
                &Nonce::from(second_half(nonce)),
                associated_data,
                plain.as_mut_slice().into(),
                &Tag::from(*tag),
            )
            .map_err(|_| XaesError::Unauthentic)?;
        // Only once it authenticated: forged entries under random first halves cannot crowd
        // the map.
        if derived {
            self.remember(half, &cipher);
        }
        Ok(plain)
    }

    fn remember(&self, half: NonceHalf, cipher: &Arc<Aes256Gcm>) {
        let mut readers = self.readers.write().unwrap_or_else(PoisonError::into_inner);
        if readers.len() >= MAX_DERIVED && !readers.contains_key(&half) {
            // One out, in the map's (randomly seeded) order: the others stay.
            let evicted = readers.keys().next().copied();
            if let Some(evicted) = evicted {
                readers.remove(&evicted);
            }
        }
        readers.insert(half, Arc::clone(cipher));
    }
}

fn first_half(nonce: &[u8; NONCE_LEN]) -> NonceHalf {
    let mut half = [0u8; NONCE_LEN / 2];
    half.copy_from_slice(&nonce[..NONCE_LEN / 2]);
    half
}

fn second_half(nonce: &[u8; NONCE_LEN]) -> NonceHalf {
    let mut half = [0u8; NONCE_LEN / 2];
    half.copy_from_slice(&nonce[NONCE_LEN / 2..]);
    half
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut out, b| {
            use std::fmt::Write as _;
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// Seals with an explicit nonce (the tests' way to reach the C2SP vectors).
    fn seal_with(key: &XaesKey, nonce: [u8; NONCE_LEN], ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let sealer = Sealer {
            nonce,
            cipher: Arc::new(key.derive(&first_half(&nonce))),
        };
        let mut out = plain.to_vec();
        let tag = sealer.seal(ad, &mut out).unwrap_or_else(|_| unreachable!());
        out.extend_from_slice(&tag);
        out
    }

    fn open_wire(
        key: &XaesKey,
        nonce: &[u8; NONCE_LEN],
        ad: &[u8],
        wire: &[u8],
    ) -> Option<Vec<u8>> {
        let (ciphertext, tag) = wire.split_at(wire.len() - TAG_LEN);
        key.open(nonce, ad, ciphertext, tag.try_into().ok()?).ok()
    }

    /// The two vectors of the specification, one for each branch of the doubling of L.
    #[test]
    fn the_c2sp_test_vectors_hold() {
        let nonce = *b"ABCDEFGHIJKLMNOPQRSTUVWX";
        for (byte, k1, ad, expected) in [
            (
                0x01,
                "e531954aca063d5b8d9c47a47d4cc6f0",
                &b""[..],
                "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271",
            ),
            (
                0x03,
                "23810ec50edb99f374409466ed1f4b7b",
                &b"c2sp.org/XAES-256-GCM"[..],
                "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d",
            ),
        ] {
            let key = XaesKey::new(&[byte; KEY_LEN]);
            assert_eq!(hex(&*key.k1), k1);
            let wire = seal_with(&key, nonce, ad, b"XAES-256-GCM");
            assert_eq!(hex(&wire), expected);
            assert_eq!(
                open_wire(&key, &nonce, ad, &wire).as_deref(),
                Some(&b"XAES-256-GCM"[..])
            );
            let fresh = XaesKey::new(&[byte; KEY_LEN]);
            assert_eq!(
                open_wire(&fresh, &nonce, ad, &wire).as_deref(),
                Some(&b"XAES-256-GCM"[..]),
                "a reader that never wrote derives the key itself"
            );
        }
    }

    /// The cached derivation seals and opens exactly as the `RustCrypto` crate `xaes-256-gcm`, which
    /// derives per message, over random keys, nonces, data and lengths (both ways).
    #[test]
    fn it_matches_rustcryptos_xaes_256_gcm() {
        use xaes_256_gcm::Xaes256Gcm;
        use xaes_256_gcm::aead::{Aead, Payload};

        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for round in 0..200 {
            let mut bytes = |n: usize| (0..n).map(|_| next().to_le_bytes()[0]).collect::<Vec<u8>>();
            let key: [u8; KEY_LEN] = bytes(KEY_LEN).try_into().unwrap_or_else(|_| unreachable!());
            let nonce: [u8; NONCE_LEN] = bytes(NONCE_LEN)
                .try_into()
                .unwrap_or_else(|_| unreachable!());
            let ad = bytes(round % 40);
            let plain = bytes(round * 7 % 1500);
            let theirs = Xaes256Gcm::new((&key).into());
            let payload = Payload {
                msg: &plain,
                aad: &ad,
            };
            let expected = theirs
                .encrypt((&nonce).into(), payload)
                .unwrap_or_else(|_| unreachable!());
            let ours = XaesKey::new(&key);
            assert_eq!(
                seal_with(&ours, nonce, &ad, &plain),
                expected,
                "round {round}"
            );
            let sealer = ours.sealer().unwrap_or_else(|_| unreachable!());
            let sealer_nonce = *sealer.nonce();
            let mut wire = plain.clone();
            let tag = sealer
                .seal(&ad, &mut wire)
                .unwrap_or_else(|_| unreachable!());
            wire.extend_from_slice(&tag);
            let payload = Payload {
                msg: &wire,
                aad: &ad,
            };
            assert_eq!(
                theirs.decrypt((&sealer_nonce).into(), payload).ok(),
                Some(plain.clone()),
                "round {round}"
            );
            assert_eq!(open_wire(&ours, &nonce, &ad, &expected), Some(plain));
        }
    }

    #[test]
    fn writers_keep_one_first_half_and_draw_every_second_half() {
        let key = XaesKey::new(&[7; KEY_LEN]);
        let nonces: Vec<_> = (0..64)
            .map(|_| *key.sealer().unwrap_or_else(|_| unreachable!()).nonce())
            .collect();
        assert!(nonces.iter().all(|n| n[..12] == nonces[0][..12]));
        let mut seconds: Vec<_> = nonces.iter().map(second_half).collect();
        seconds.sort_unstable();
        seconds.dedup();
        assert_eq!(seconds.len(), 64);
        let other = XaesKey::new(&[7; KEY_LEN]);
        let theirs = *other.sealer().unwrap_or_else(|_| unreachable!()).nonce();
        assert_ne!(
            theirs[..12],
            nonces[0][..12],
            "each writer draws its own first half"
        );
    }

    #[test]
    fn a_writer_draws_a_new_first_half_when_its_derived_key_is_used_up() {
        let key = XaesKey::new(&[9; KEY_LEN]);
        let first = *key.sealer().unwrap_or_else(|_| unreachable!()).nonce();
        if let Some(writer) = key
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            writer.writes_left = 1;
        }
        let last = *key.sealer().unwrap_or_else(|_| unreachable!()).nonce();
        let next = *key.sealer().unwrap_or_else(|_| unreachable!()).nonce();
        assert_eq!(first[..12], last[..12]);
        assert_ne!(last[..12], next[..12]);
    }

    #[test]
    fn past_its_bound_the_reader_map_drops_one_cipher_per_new_one() {
        let writer = XaesKey::new(&[4; KEY_LEN]);
        let reader = XaesKey::new(&[4; KEY_LEN]);
        let mut last = [0u8; NONCE_LEN];
        for i in 0..=MAX_DERIVED + 1 {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let wire = seal_with(&writer, nonce, b"ad", b"v");
            assert_eq!(
                open_wire(&reader, &nonce, b"ad", &wire).as_deref(),
                Some(&b"v"[..])
            );
            last = nonce;
        }
        let readers = reader
            .readers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        assert_eq!(readers.len(), MAX_DERIVED);
        assert!(readers.contains_key(&first_half(&last)));
    }

    #[test]
    fn only_authentic_entries_leave_a_derived_cipher_behind() {
        let writer = XaesKey::new(&[5; KEY_LEN]);
        let reader = XaesKey::new(&[5; KEY_LEN]);
        let sealer = writer.sealer().unwrap_or_else(|_| unreachable!());
        let nonce = *sealer.nonce();
        let mut wire = b"value".to_vec();
        let tag = sealer
            .seal(b"ad", &mut wire)
            .unwrap_or_else(|_| unreachable!());
        wire.extend_from_slice(&tag);
        let mut forged = nonce;
        forged[0] ^= 1;
        assert!(open_wire(&reader, &forged, b"ad", &wire).is_none());
        assert!(open_wire(&reader, &nonce, b"other ad", &wire).is_none());
        assert!(
            reader
                .readers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );
        assert_eq!(
            open_wire(&reader, &nonce, b"ad", &wire).as_deref(),
            Some(&b"value"[..])
        );
        assert_eq!(
            reader
                .readers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            1
        );
        let wrong_key = XaesKey::new(&[6; KEY_LEN]);
        assert!(open_wire(&wrong_key, &nonce, b"ad", &wire).is_none());
    }
}
