//! One message as the log stores it: postcard, with the JSON of its data and metadata kept as
//! text (postcard cannot carry a self-describing `serde_json::Value`, and the text is what a
//! reader hands on anyway).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::store::{Message, StoreError, StreamName};

/// The stored form, borrowing from the bytes it was read from.
#[derive(Serialize, Deserialize)]
struct Record<'a> {
    global: u64,
    position: u64,
    time_ms: u64,
    not_before_ms: Option<u64>,
    id: &'a str,
    stream: &'a str,
    message_type: &'a str,
    data: &'a str,
    /// Empty for no metadata, the common case.
    metadata: &'a str,
}

pub(super) fn encode(message: &Message) -> Vec<u8> {
    let data = message.data.to_string();
    let metadata = if message.metadata.is_empty() {
        String::new()
    } else {
        Value::Object(message.metadata.clone()).to_string()
    };
    let record = Record {
        global: message.global_position,
        position: message.position,
        time_ms: message.time_ms,
        not_before_ms: message.not_before_ms,
        id: &message.id,
        stream: message.stream.as_str(),
        message_type: &message.message_type,
        data: &data,
        metadata: &metadata,
    };
    // Serialising plain fields into a Vec cannot fail.
    postcard::to_allocvec(&record).unwrap_or_default()
}

pub(super) fn decode(bytes: &[u8]) -> Result<Message, StoreError> {
    let damaged =
        |what: String| StoreError::Backend(format!("a logged message is damaged: {what}"));
    let record: Record = postcard::from_bytes(bytes).map_err(|e| damaged(e.to_string()))?;
    let metadata: Map<String, Value> = if record.metadata.is_empty() {
        Map::new()
    } else {
        serde_json::from_str(record.metadata).map_err(|e| damaged(e.to_string()))?
    };
    Ok(Message {
        id: record.id.to_owned(),
        stream: StreamName::parse(record.stream)?,
        message_type: record.message_type.to_owned(),
        data: serde_json::from_str(record.data).map_err(|e| damaged(e.to_string()))?,
        metadata,
        position: record.position,
        global_position: record.global,
        time_ms: record.time_ms,
        not_before_ms: record.not_before_ms,
    })
}

/// What a reader needs to check an index entry without decoding the JSON: the record's stream,
/// its position in it and its id.
pub(super) struct Head<'a> {
    pub global: u64,
    pub position: u64,
    pub id: &'a str,
    pub stream: &'a str,
}

pub(super) fn head(bytes: &[u8]) -> Result<Head<'_>, StoreError> {
    let record: Record = postcard::from_bytes(bytes)
        .map_err(|e| StoreError::Backend(format!("a logged message is damaged: {e}")))?;
    Ok(Head {
        global: record.global,
        position: record.position,
        id: record.id,
        stream: record.stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_comes_back_as_it_went_in() -> Result<(), StoreError> {
        let mut metadata = Map::new();
        metadata.insert("originEntity".into(), Value::from("user.7"));
        for metadata in [Map::new(), metadata] {
            let message = Message {
                id: "7c1e".into(),
                stream: StreamName::parse("user:command.7")?,
                message_type: "Register".into(),
                data: serde_json::json!({"email": "a@b", "n": [1, 2.5, null]}),
                metadata,
                position: 3,
                global_position: 99,
                time_ms: 1_700_000_000_000,
                not_before_ms: Some(5),
            };
            let bytes = encode(&message);
            assert_eq!(decode(&bytes)?, message);
            let head = head(&bytes)?;
            assert_eq!(
                (head.position, head.id, head.stream),
                (3, "7c1e", "user:command.7")
            );
        }
        Ok(())
    }
}
