//! What one message id, type, data, metadata, view key and view row may hold: the same bounds
//! on every store, checked by `validate_commit`, so the gateway (400), `ferry send` and a guest's
//! outcome (the handled message is parked) all meet them and get an error naming the limit.
//!
//! They keep every JetStream subject far below the server's control line (4 KiB: an id becomes
//! `NS.id.<id>` and a view key `NS.v.<table>.<key>`, each byte of it up to three in a subject
//! token) and every stored message below its payload limit (1 MiB), so no write can be refused by
//! the server for its shape, and the same write behaves alike on sled and on JetStream.

use serde::Serialize;

use super::{NewMessage, StoreError, ViewWrite};

/// A message id: 1 to 128 bytes of printable ASCII, no space.
pub const MAX_ID_BYTES: usize = 128;
/// A message type: 1 to 128 bytes of printable ASCII, no space.
pub const MAX_TYPE_BYTES: usize = 128;
/// A message's data, as JSON text.
pub const MAX_DATA_BYTES: usize = 512 * 1024;
/// A message's metadata, as JSON text.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
/// A view row's key (any UTF-8 text).
pub const MAX_VIEW_KEY_BYTES: usize = 512;
/// A view row's value, as JSON text.
pub const MAX_VIEW_ROW_BYTES: usize = 512 * 1024;

/// A parked message's reason, as stored and shown (a guest chooses its failure's text).
pub const MAX_REASON_BYTES: usize = 4096;

/// A reason cut to [`MAX_REASON_BYTES`], at a character boundary.
pub fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES - 3;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push('…');
    }
    reason
}

/// Checks a message id; the reason names the limit.
pub fn check_id(id: &str) -> Result<(), String> {
    check_token(id, "id", MAX_ID_BYTES)
}

/// Checks one message to append.
pub(crate) fn check_message(message: &NewMessage) -> Result<(), StoreError> {
    let refuse = |reason: String| StoreError::InvalidMessage {
        id: shown(&message.id),
        reason,
    };
    check_id(&message.id).map_err(refuse)?;
    check_token(&message.message_type, "type", MAX_TYPE_BYTES).map_err(refuse)?;
    if !message.data.is_object() {
        return Err(refuse("data must be a JSON object".into()));
    }
    let data = json_len(&message.data);
    if data > MAX_DATA_BYTES {
        return Err(refuse(format!(
            "its data is {data} bytes of JSON, more than the limit of {MAX_DATA_BYTES}"
        )));
    }
    let metadata = json_len(&message.metadata);
    if metadata > MAX_METADATA_BYTES {
        return Err(refuse(format!(
            "its metadata is {metadata} bytes of JSON, more than the limit of {MAX_METADATA_BYTES}"
        )));
    }
    Ok(())
}

/// Checks one view change.
pub(crate) fn check_view_write(write: &ViewWrite) -> Result<(), StoreError> {
    super::validate_table_name(&write.table)?;
    // The key is not shown: a handler may key a row by a value it must not echo.
    let refuse = |reason: String| StoreError::InvalidMessage {
        id: format!("a row of view {}", write.table),
        reason,
    };
    if write.key.len() > MAX_VIEW_KEY_BYTES {
        return Err(refuse(format!(
            "the key is {} bytes, more than the limit of {MAX_VIEW_KEY_BYTES}",
            write.key.len()
        )));
    }
    if let Some(value) = &write.value {
        let len = json_len(value);
        if len > MAX_VIEW_ROW_BYTES {
            return Err(refuse(format!(
                "the row is {len} bytes of JSON, more than the limit of {MAX_VIEW_ROW_BYTES}"
            )));
        }
    }
    Ok(())
}

/// Whether a view key could be stored at all: a longer one is never found, so a read of it
/// answers "none" without asking the store.
pub(crate) fn view_key_fits(key: &str) -> bool {
    key.len() <= MAX_VIEW_KEY_BYTES
}

fn check_token(text: &str, what: &str, max: usize) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if text.len() > max {
        return Err(format!(
            "the {what} is {} bytes, more than the limit of {max}",
            text.len()
        ));
    }
    if !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the {what} may hold only printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// An id or key as an error shows it: at most 64 characters, so an oversized one is not echoed
/// whole into logs and answers.
pub(crate) fn shown(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// The length of a value's JSON text, counted without building it.
fn json_len(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serializing a `Value` (or a map of them) to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;

    fn message(id: &str, message_type: &str, data: serde_json::Value) -> NewMessage {
        NewMessage {
            id: id.into(),
            message_type: message_type.into(),
            data,
            metadata: Map::new(),
            not_before_ms: None,
        }
    }

    #[test]
    fn each_bound_is_named_in_its_refusal() {
        let long_id = "x".repeat(MAX_ID_BYTES + 1);
        let refused = check_message(&message(&long_id, "Added", json!({}))).expect_err("long id");
        assert!(refused.to_string().contains("limit of 128"), "{refused}");
        assert!(!refused.to_string().contains(&long_id), "echoed: {refused}");
        for bad in ["", "a b", "é", "a\nb"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("6f1c-x_y:z/1.2@3").is_ok());
        let big = json!({ "blob": "y".repeat(MAX_DATA_BYTES) });
        let refused = check_message(&message("m-1", "Added", big)).expect_err("big data");
        assert!(refused.to_string().contains("limit of 524288"), "{refused}");
        let write = ViewWrite {
            table: "users".into(),
            key: "k".repeat(MAX_VIEW_KEY_BYTES + 1),
            value: Some(json!({})),
            seq: 1,
        };
        let refused = check_view_write(&write).expect_err("long key");
        assert!(refused.to_string().contains("limit of 512"), "{refused}");
    }

    #[test]
    fn json_length_is_that_of_the_text() {
        let value = json!({ "a": [1, "two", null], "b": { "c": true } });
        assert_eq!(json_len(&value), value.to_string().len());
    }
}
