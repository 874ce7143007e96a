//! The namespace's secret: 32 random bytes created with the store, from which the host derives
//! the ids of what handlers write and the secrets it gives guests (HMAC-SHA256, one label per
//! use). Nobody without it can compute a derived id, so no client can plant one in advance.
//!
//! On the embedded store it is the file `secret` in the data folder (mode 0600, written once,
//! atomically); on JetStream the subject `NS.meta.secret`, claimed by the first process to
//! connect. A store written before secrets existed gets one when it is first opened, with
//! `keyed_after` set to its head: messages up to there keep the ids derived without a key, so
//! handling them again (a rebuild) writes the ids they wrote the first time.

use std::io::Write as _;
use std::path::Path;

use chacha20poly1305::aead::{OsRng, rand_core::RngCore as _};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::StoreError;

/// The namespace's secret key, and the global position from which derivations use it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSecret {
    #[serde(with = "hex_key")]
    key: [u8; 32],
    /// Messages at or below this global position were handled before the namespace had a key.
    #[serde(rename = "keyedAfter")]
    pub keyed_after: u64,
}

impl std::fmt::Debug for NamespaceSecret {
    // The key in a log line would let its reader compute every derived id.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceSecret")
            .field("keyed_after", &self.keyed_after)
            .finish_non_exhaustive()
    }
}

impl NamespaceSecret {
    /// A new random secret, keying what is handled past `keyed_after`.
    pub fn generate(keyed_after: u64) -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self { key, keyed_after }
    }

    /// A secret everyone knows (its key is 32 zero bytes): for `ferry test`, whose scenarios
    /// name the ids a handler derives. Never a real store's.
    pub fn published() -> Self {
        Self {
            key: [0; 32],
            keyed_after: 0,
        }
    }

    /// HMAC-SHA256 under the key, of `label` and `parts` each framed by its length (so no two
    /// different inputs read alike).
    pub fn mac(&self, label: &str, parts: &[&str]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256>>::new_from_slice(&self.key).expect("HMAC takes any key size");
        for part in std::iter::once(label).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("the namespace secret is unreadable: {e}"))
    }

    /// The secret of a data folder: read from `dir/secret`, or created there (readable by the
    /// owner only) with `keyed_after` when the folder has none yet. A store that `had_one` and
    /// lost it is refused: a new one would give everything handled again other ids.
    pub(super) fn load_or_create(
        dir: &Path,
        keyed_after: u64,
        had_one: bool,
    ) -> Result<Self, StoreError> {
        let path = dir.join(FILE);
        let unusable = |reason: String| StoreError::Unusable {
            path: dir.display().to_string(),
            reason,
        };
        match std::fs::read(&path) {
            Ok(bytes) => return Self::from_bytes(&bytes).map_err(unusable),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && had_one => {
                return Err(unusable(lost()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(unusable(format!("reading {FILE}: {e}"))),
        }
        let secret = Self::generate(keyed_after);
        // Written whole under another name, synced, then renamed: a crash leaves either no
        // secret or this one, never half of it.
        let partial = dir.join(format!("{FILE}.partial"));
        let written = (|| -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&partial)?;
            file.write_all(&secret.to_bytes())?;
            file.sync_all()?;
            std::fs::rename(&partial, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        written.map_err(|e| unusable(format!("writing {FILE}: {e}")))?;
        Ok(secret)
    }
}

/// The secret's file in a data folder.
const FILE: &str = "secret";

/// Why a store that had a secret and lost it is not opened.
pub(super) fn lost() -> String {
    "its namespace secret is missing, though the store had one: restore it (the file `secret` \
     of the data folder, or the subject `NS.meta.secret`) from the backup the store came with. \
     A new one would give every message handled again other ids than it wrote"
        .into()
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(super) fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let text: String = key.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let mut key = [0u8; 32];
        if text.len() != 64 {
            return Err(D::Error::custom("the key is not 64 hex digits"));
        }
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = text
                .get(2 * i..2 * i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| D::Error::custom("the key is not 64 hex digits"))?;
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_keeps_its_secret_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let first = NamespaceSecret::load_or_create(dir.path(), 7, false).expect("create");
        assert_eq!(first.keyed_after, 7);
        let again = NamespaceSecret::load_or_create(dir.path(), 99, true).expect("read");
        assert_eq!(first, again, "the secret is created once");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(FILE))
                .expect("file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        let hex: String = first.key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!format!("{first:?}").contains(&hex));
        std::fs::remove_file(dir.path().join(FILE)).expect("lose it");
        match NamespaceSecret::load_or_create(dir.path(), 99, true) {
            Err(StoreError::Unusable { reason, .. }) => assert!(reason.contains("missing")),
            other => panic!("a lost secret is refused, not replaced: {other:?}"),
        }
    }

    #[test]
    fn macs_differ_by_label_part_and_framing() {
        let secret = NamespaceSecret::generate(0);
        let a = secret.mac("ids", &["svc", "m-1", "0"]);
        assert_eq!(a, secret.mac("ids", &["svc", "m-1", "0"]));
        assert_ne!(a, secret.mac("secrets", &["svc", "m-1", "0"]));
        assert_ne!(a, secret.mac("ids", &["svc", "m-10", ""]));
        assert_ne!(
            a,
            NamespaceSecret::generate(0).mac("ids", &["svc", "m-1", "0"])
        );
    }
}
