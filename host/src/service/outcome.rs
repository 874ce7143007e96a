//! Checking a guest's outcome: its size, stream names, ownership of event categories, JSON and
//! declared views; the ids derived for what it writes (`derived_id`), the metadata propagated
//! from the handled message (`originEntity`, `correlationId`, `causationId`), and grouping the
//! outgoing messages into a commit's appends.

use serde_json::{Map, Value};

use crate::store::{Message, NewMessage, StreamAppend, StreamName, ViewWrite};
use crate::wasm::Outcome;

/// Upper bounds on what one outcome may hold.
const MAX_OUTCOME_MESSAGES: usize = 1000;
const MAX_OUTCOME_BYTES: usize = 4 * 1024 * 1024;
/// Namespace of the deterministic ids Ferry derives (a fixed, random UUID).
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6a0f_9a7e_52c4_4f0e_9c1e_2b7d_f1a3_c5e9);

/// A deterministic id: the same inputs always give the same UUID.
pub fn derived_id(parts: &[&str]) -> String {
    uuid::Uuid::new_v5(&ID_NAMESPACE, parts.join("\u{1f}").as_bytes()).to_string()
}

/// An outcome that passed the checks: messages with their ids and metadata, view writes.
#[derive(Debug, Default)]
pub(super) struct CheckedOutcome {
    pub(super) messages: Vec<(StreamName, NewMessage)>,
    pub(super) views: Vec<ViewWrite>,
}

/// Checks what a guest returned for `handled`: sizes, stream names, ownership of event categories,
/// JSON, declared views. Derives the outgoing ids and propagates the metadata.
pub(super) fn check_outcome(
    manifest: &crate::wasm::Manifest,
    handled: &Message,
    outcome: Outcome,
) -> Result<CheckedOutcome, String> {
    if outcome.messages.len() > MAX_OUTCOME_MESSAGES {
        return Err(format!(
            "{} messages, more than the limit of {MAX_OUTCOME_MESSAGES}",
            outcome.messages.len()
        ));
    }
    let bytes: usize = outcome
        .messages
        .iter()
        .map(|m| m.data.len() + m.metadata.as_ref().map_or(0, String::len))
        .chain(
            outcome
                .views
                .iter()
                .map(|v| v.value.as_ref().map_or(0, String::len)),
        )
        .sum();
    if bytes > MAX_OUTCOME_BYTES {
        return Err(format!(
            "{bytes} bytes of JSON, more than the limit of {MAX_OUTCOME_BYTES}"
        ));
    }

    let mut propagated = Map::new();
    for key in ["originEntity", "correlationId"] {
        if let Some(value) = handled.metadata.get(key) {
            propagated.insert(key.to_owned(), value.clone());
        }
    }
    propagated.insert("causationId".into(), Value::String(handled.id.clone()));

    let mut checked = CheckedOutcome::default();
    for (index, outgoing) in outcome.messages.into_iter().enumerate() {
        let stream = StreamName::parse(&outgoing.stream).map_err(|e| e.to_string())?;
        if !stream.is_command() && stream.category_str() != manifest.name {
            return Err(format!(
                "service {} may write events only to its own category {}, not to {stream}",
                manifest.name, manifest.name
            ));
        }
        let data = json_object(&outgoing.data, "data")?;
        let mut metadata = propagated.clone();
        if let Some(extra) = &outgoing.metadata {
            metadata.extend(json_object(extra, "metadata")?);
        }
        if outgoing.message_type.is_empty() {
            return Err("a message has an empty type".into());
        }
        let id = derived_id(&[&manifest.name, &handled.id, &index.to_string()]);
        checked.messages.push((
            stream,
            NewMessage {
                id,
                message_type: outgoing.message_type,
                data: Value::Object(data),
                metadata,
                not_before_ms: outgoing.not_before_ms,
            },
        ));
    }

    for change in outcome.views {
        if !manifest.views.contains(&change.table) {
            return Err(format!(
                "view table {} is not declared in the manifest of {}",
                change.table, manifest.name
            ));
        }
        let value = match change.value {
            Some(text) => Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                format!(
                    "view row {}/{}: invalid JSON: {e}",
                    change.table, change.key
                )
            })?),
            None => None,
        };
        checked.views.push(ViewWrite {
            table: change.table,
            key: change.key,
            value,
            seq: handled.global_position,
        });
    }
    Ok(checked)
}

/// Groups messages by stream, streams in order of first appearance, each with its expected
/// version.
pub(super) fn group_appends(
    messages: Vec<(StreamName, NewMessage)>,
    expected_version: impl Fn(&StreamName) -> Option<u64>,
) -> Vec<StreamAppend> {
    let mut appends: Vec<StreamAppend> = Vec::new();
    for (stream, message) in messages {
        match appends.iter_mut().find(|a| a.stream == stream) {
            Some(append) => append.messages.push(message),
            None => appends.push(StreamAppend {
                expected_version: expected_version(&stream),
                stream,
                messages: vec![message],
            }),
        }
    }
    appends
}

fn json_object(text: &str, what: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(format!("{what} must be a JSON object")),
        Err(e) => Err(format!("{what} is not valid JSON: {e}")),
    }
}
