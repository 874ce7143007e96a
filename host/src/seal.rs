//! Sealed command fields: secrets (a password, a card number) that the history must never hold in
//! clear. Owns the stored form of a sealed field, its encryption, opening it for the handler, and
//! hiding it from every read.
//!
//! A command sent with `sealed: ["password"]` stores that top-level data field as
//! `{"sealed": true, "box": "<base64url of nonce (24 bytes) || ciphertext>"}`, encrypted with
//! XChaCha20-Poly1305 under a fresh random key of the message's own. The key is kept in the store
//! beside the message ([`crate::store::SealKey`]), the consumer opens the fields for the handler
//! only, and the commit that settles the command removes the key in the same atomic write
//! (crypto-shredding): afterwards the history holds ciphertext whose key no longer exists.
//!
//! Why shred a key instead of deleting the clear value: both stores are log-structured, so an
//! overwritten value stays in their files until they compact them, and the message itself is
//! history that is never rewritten. A 32-byte key is the one thing that has to go, and it is
//! written only for the short time between receipt and handling.
//!
//! The associated data of each box is the message id and the field name, so a box cannot be
//! moved to another message or field and still open.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde_json::{Map, Value};

use crate::store::{Message, SealKey};

/// Bytes of an XChaCha20-Poly1305 nonce, stored at the start of a box.
const NONCE_BYTES: usize = 24;

/// Why fields could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the sealed field {0:?} is not a top-level field of the data")]
    MissingField(String),
    #[error("the sealed field {0:?} is named twice")]
    NamedTwice(String),
    #[error(
        "the field {0:?} looks sealed already (an object with \"sealed\": true); only the host seals fields"
    )]
    AlreadySealed(String),
    #[error("the key of the sealed fields is gone (the command was settled already)")]
    KeyGone,
    #[error("the sealed field {0:?} does not open with its message's key")]
    Unopenable(String),
}

/// Whether a data value is a sealed field as stored (or as shown, without its box).
fn is_sealed_value(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|object| object.get("sealed") == Some(&Value::Bool(true)))
}

/// Whether any top-level data field of the message is sealed. Cheap: a look at each field's kind,
/// no decoding, so a consumer can scan every page with it.
pub fn is_sealed(message: &Message) -> bool {
    message
        .data
        .as_object()
        .is_some_and(|data| data.values().any(is_sealed_value))
}

/// The names of the data fields that look sealed (an object with `"sealed": true`). A message
/// whose data carries such a field it did not get from [`seal_fields`] would be taken for
/// sealed, so the edge refuses it.
pub fn sealed_looking_fields(data: &Map<String, Value>) -> Vec<String> {
    data.iter()
        .filter(|(_, value)| is_sealed_value(value))
        .map(|(name, _)| name.clone())
        .collect()
}

/// The associated data of a box: the message id (length-prefixed, so no id and field name can
/// run into each other) and the field name.
fn associated_data(message_id: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(8 + message_id.len() + field.len());
    aad.extend_from_slice(&(message_id.len() as u64).to_be_bytes());
    aad.extend_from_slice(message_id.as_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad
}

/// Seals the named top-level fields of `data` in place under a fresh random key, and returns
/// the key for the store to keep until the message is settled. Every field must exist and be
/// named once; an empty list is the caller's no-op (no key is made for nothing).
pub fn seal_fields(
    message_id: &str,
    data: &mut Map<String, Value>,
    fields: &[String],
) -> Result<SealKey, SealError> {
    for (n, field) in fields.iter().enumerate() {
        if fields[..n].contains(field) {
            return Err(SealError::NamedTwice(field.clone()));
        }
        match data.get(field) {
            None => return Err(SealError::MissingField(field.clone())),
            Some(value) if is_sealed_value(value) => {
                return Err(SealError::AlreadySealed(field.clone()));
            }
            Some(_) => {}
        }
    }
    let key = XChaCha20Poly1305::generate_key(&mut OsRng);
    let cipher = XChaCha20Poly1305::new(&key);
    for field in fields {
        let Some(value) = data.get_mut(field) else {
            return Err(SealError::MissingField(field.clone()));
        };
        // Serializing a JSON value cannot fail.
        let clear = serde_json::to_vec(&*value).unwrap_or_default();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated_data(message_id, field);
        // Encryption fails only for plaintexts past 2^38 bytes, far beyond any message.
        let ciphertext = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &clear,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Unopenable(field.clone()))?;
        let mut boxed = nonce.to_vec();
        boxed.extend_from_slice(&ciphertext);
        let mut sealed = Map::new();
        sealed.insert("sealed".into(), Value::Bool(true));
        sealed.insert("box".into(), Value::String(URL_SAFE_NO_PAD.encode(boxed)));
        *value = Value::Object(sealed);
    }
    Ok(SealKey {
        message_id: message_id.to_owned(),
        key: key.to_vec(),
    })
}

/// One box opened: the field's clear value.
fn open_box(
    cipher: &XChaCha20Poly1305,
    message_id: &str,
    field: &str,
    value: &Value,
) -> Option<Value> {
    let boxed = URL_SAFE_NO_PAD.decode(value.get("box")?.as_str()?).ok()?;
    if boxed.len() < NONCE_BYTES {
        return None;
    }
    let (nonce, ciphertext) = boxed.split_at(NONCE_BYTES);
    let clear = cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &associated_data(message_id, field),
            },
        )
        .ok()?;
    serde_json::from_slice(&clear).ok()
}

fn cipher_of(key: &[u8]) -> Option<XChaCha20Poly1305> {
    XChaCha20Poly1305::new_from_slice(key).ok()
}

/// A copy of the message with its sealed fields in clear, for the handler: every one must open,
/// or the handler would decide on a placeholder as if it were the value.
pub fn unseal(message: &Message, key: Option<&[u8]>) -> Result<Message, SealError> {
    let mut clear = message.clone();
    let Some(data) = clear.data.as_object_mut() else {
        return Ok(clear);
    };
    let cipher = key.and_then(cipher_of);
    for (field, value) in data.iter_mut() {
        if !is_sealed_value(value) {
            continue;
        }
        let Some(cipher) = &cipher else {
            return Err(SealError::KeyGone);
        };
        *value = open_box(cipher, &message.id, field, value)
            .ok_or_else(|| SealError::Unopenable(field.clone()))?;
    }
    Ok(clear)
}

/// A copy of the message with the sealed fields that open under `key` in clear; a field without
/// a key (already shredded) or whose box does not open is shown as `{"sealed": true}`.
pub fn open(message: &Message, key: Option<&[u8]>) -> Message {
    let mut opened = message.clone();
    let cipher = key.and_then(cipher_of);
    if let Some(data) = opened.data.as_object_mut() {
        for (field, value) in data.iter_mut() {
            if !is_sealed_value(value) {
                continue;
            }
            *value = cipher
                .as_ref()
                .and_then(|cipher| open_box(cipher, &message.id, field, value))
                .unwrap_or_else(placeholder);
        }
    }
    opened
}

/// What every read shows for a sealed field.
fn placeholder() -> Value {
    let mut shown = Map::new();
    shown.insert("sealed".into(), Value::Bool(true));
    Value::Object(shown)
}

/// Turns every sealed top-level field of message data into exactly `{"sealed": true}`: the box
/// is ciphertext, but a read has no use for it and should not hand it out for keeping.
pub fn redact_data(data: &mut Value) {
    if let Some(data) = data.as_object_mut() {
        for value in data.values_mut() {
            if is_sealed_value(value) {
                *value = placeholder();
            }
        }
    }
}

/// [`redact_data`] on a message.
pub fn redact(message: &mut Message) {
    redact_data(&mut message.data);
}

/// The clear values of a sealed command's fields, taken out of every text that could leave its
/// handling (a failure reason, a guest's log line, an error) before it is stored, logged or
/// answered. A guest's failure may quote what it was given ("invalid type: integer 987654321"),
/// and that text would otherwise outlive the key.
pub struct Redactor {
    /// Every text a clear value may appear as, longest first (so a value that holds another is
    /// replaced whole).
    texts: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor(<{} texts>)", self.texts.len())
    }
}

/// What a redacted value reads as.
pub const REDACTED: &str = "[sealed]";

impl Redactor {
    /// The values `clear` holds for the fields `sealed` stores sealed; `None` when it has none.
    pub fn of(sealed: &Message, clear: &Message) -> Option<Self> {
        let (Some(stored), Some(opened)) = (sealed.data.as_object(), clear.data.as_object()) else {
            return None;
        };
        let mut texts = Vec::new();
        for (field, value) in stored {
            if is_sealed_value(value)
                && let Some(clear) = opened.get(field)
            {
                if !matches!(clear, Value::String(_)) {
                    texts.push(clear.to_string());
                }
                leaf_texts(clear, &mut texts);
            }
        }
        texts.retain(|text| !text.is_empty());
        texts.sort_by_key(|text| std::cmp::Reverse(text.len()));
        texts.dedup();
        (!texts.is_empty()).then_some(Self { texts })
    }

    /// `text` with every clear value replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.texts {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), REDACTED);
            }
        }
        out
    }
}

/// The texts under which the leaves (and object keys) of a value may be quoted: a string as it
/// is, JSON-escaped and Rust-escaped (as serde's errors show it); a number as written. Booleans
/// and null say too little to hide and would blank every `true` in a text.
fn leaf_texts(value: &Value, texts: &mut Vec<String>) {
    match value {
        Value::String(text) => {
            texts.push(text.clone());
            let json = Value::String(text.clone()).to_string();
            texts.push(json[1..json.len() - 1].to_owned());
            let debug = format!("{text:?}");
            texts.push(debug[1..debug.len() - 1].to_owned());
        }
        Value::Number(number) => texts.push(number.to_string()),
        Value::Array(items) => items.iter().for_each(|item| leaf_texts(item, texts)),
        Value::Object(fields) => {
            // A sealed object's keys are part of what it hides (an address book's names).
            for (key, item) in fields {
                leaf_texts(&Value::String(key.clone()), texts);
                leaf_texts(item, texts);
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::StreamName;

    fn command(id: &str, data: Value) -> Message {
        Message {
            id: id.into(),
            stream: StreamName::parse("user:command.42").expect("stream"),
            message_type: "RegisterUser".into(),
            data,
            metadata: Map::new(),
            position: 0,
            global_position: 1,
            time_ms: 0,
            not_before_ms: None,
        }
    }

    fn sealed(id: &str, data: Value, fields: &[&str]) -> (Message, SealKey) {
        let Value::Object(mut map) = data else {
            panic!("test data is an object");
        };
        let fields: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
        let key = seal_fields(id, &mut map, &fields).expect("seal");
        (command(id, Value::Object(map)), key)
    }

    #[test]
    fn sealed_fields_open_with_their_key_and_nothing_is_left_in_clear() {
        let data = json!({"username": "ann", "password": "hunter2", "pin": [1, 2]});
        let (message, key) = sealed("m1", data.clone(), &["password", "pin"]);
        assert_eq!(key.message_id, "m1");
        assert_eq!(key.key.len(), 32);
        let stored = message.data.to_string();
        assert!(!stored.contains("hunter2"), "{stored}");
        assert_eq!(message.data["username"], "ann");
        assert_eq!(message.data["password"]["sealed"], true);
        assert!(is_sealed(&message));
        assert_eq!(unseal(&message, Some(&key.key)).expect("opens").data, data);
        assert_eq!(open(&message, Some(&key.key)).data, data);
    }

    #[test]
    fn a_box_does_not_open_on_another_message_or_field() {
        let (message, key) = sealed("m1", json!({"a": "x", "b": "y"}), &["a", "b"]);
        let mut moved = message.clone();
        moved.id = "m2".into();
        assert_eq!(
            unseal(&moved, Some(&key.key)),
            Err(SealError::Unopenable("a".into()))
        );
        let mut swapped = message.clone();
        swapped.data["a"] = message.data["b"].clone();
        assert!(unseal(&swapped, Some(&key.key)).is_err());
        // Shown, not opened, and never a panic.
        assert_eq!(
            open(&moved, Some(&key.key)).data["a"],
            json!({"sealed": true})
        );
        assert_eq!(
            open(&message, Some(&[7u8; 32])).data["b"],
            json!({"sealed": true})
        );
    }

    #[test]
    fn without_the_key_the_handler_is_refused_and_a_read_shows_a_placeholder() {
        let (message, _) = sealed("m1", json!({"password": "p", "n": 1}), &["password"]);
        assert_eq!(unseal(&message, None), Err(SealError::KeyGone));
        let shown = open(&message, None);
        assert_eq!(shown.data, json!({"password": {"sealed": true}, "n": 1}));
        let mut damaged = message.clone();
        damaged.data["password"]["box"] = json!("!!not base64");
        assert_eq!(
            open(&damaged, Some(&[0u8; 32])).data["password"],
            json!({"sealed": true})
        );
        damaged.data["password"]["box"] = json!("AAAA");
        assert!(unseal(&damaged, Some(&[0u8; 32])).is_err());
    }

    #[test]
    fn redacting_leaves_only_the_sealed_mark() {
        let (mut message, _) = sealed("m1", json!({"password": "p", "n": 1}), &["password"]);
        redact(&mut message);
        assert_eq!(message.data, json!({"password": {"sealed": true}, "n": 1}));
        assert!(is_sealed(&message), "still known to be sealed");
    }

    #[test]
    fn refuses_missing_repeated_and_forged_fields() {
        let mut data = Map::new();
        data.insert("password".into(), json!("p"));
        data.insert("forged".into(), json!({"sealed": true}));
        let names = |n: &[&str]| n.iter().map(|f| (*f).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            seal_fields("m", &mut data, &names(&["nope"])),
            Err(SealError::MissingField("nope".into()))
        );
        assert_eq!(
            seal_fields("m", &mut data, &names(&["password", "password"])),
            Err(SealError::NamedTwice("password".into()))
        );
        assert_eq!(
            seal_fields("m", &mut data, &names(&["forged"])),
            Err(SealError::AlreadySealed("forged".into()))
        );
        assert_eq!(data["password"], "p", "a refusal changes nothing");
        assert_eq!(sealed_looking_fields(&data), ["forged"]);
    }

    #[test]
    fn unsealed_messages_are_left_alone() {
        let message = command("m", json!({"sealed": true, "n": {"sealed": false}}));
        assert!(!is_sealed(&message));
        assert_eq!(unseal(&message, None).expect("nothing to open"), message);
        let mut shown = message.clone();
        redact(&mut shown);
        assert_eq!(shown, message);
    }
}
