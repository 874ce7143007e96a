//! Checking a guest's outcome: its size, stream names, ownership of event categories, JSON and
//! declared views; the ids derived for what it writes (`derived_id`), the metadata propagated
//! from the handled message (`originEntity`, `correlationId`, `causationId`), and grouping the
//! outgoing messages into a commit's appends.

use serde_json::{Map, Value};

use crate::mail::{OUTBOX_EMAIL_TYPE, outbox_email};
use crate::store::{
    Category, Message, NamespaceSecret, NewMessage, StreamAppend, StreamName, ViewWrite,
    check_message, check_view_write,
};
use crate::wasm::Outcome;

/// Upper bounds on what one outcome may hold.
const MAX_OUTCOME_MESSAGES: usize = 1000;
const MAX_OUTCOME_BYTES: usize = 4 * 1024 * 1024;
/// Namespace of the ids derived before namespaces had secrets (a fixed, random UUID).
const LEGACY_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a0f_9a7e_52c4_4f0e_9c1e_2b7d_f1a3_c5e9);

/// The id Ferry derives for something handling one message writes: the same inputs always give
/// the same id, so a handler run again writes the same ids and the store drops the duplicates.
/// `parts` name what it is (an outgoing message's index, or `new-id` and a name).
///
/// It is an HMAC under the namespace's secret, shown as a UUID (version 8): nobody without the
/// secret can compute one, so no client can send a message under the id of an output to come.
/// A message handled before its namespace had a secret (at or below `keyed_after`) keeps the
/// UUIDv5 it was first given, so handling it again (a rebuild) writes the same ids.
pub fn derived_id(
    secret: &NamespaceSecret,
    service: &str,
    handled: (&str, u64),
    parts: &[&str],
) -> String {
    let (handled_id, handled_global) = handled;
    if handled_global <= secret.keyed_after {
        let mut all = vec![service, handled_id];
        all.extend_from_slice(parts);
        return uuid::Uuid::new_v5(&LEGACY_ID_NAMESPACE, all.join("\u{1f}").as_bytes()).to_string();
    }
    let mut all = vec![service, handled_id];
    all.extend_from_slice(parts);
    let mac = secret.mac("ferry derived id", &all);
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&mac[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// An outcome that passed the checks: messages with their ids and metadata, view writes.
#[derive(Debug, Default)]
pub(super) struct CheckedOutcome {
    pub(super) messages: Vec<(StreamName, NewMessage)>,
    pub(super) views: Vec<ViewWrite>,
}

/// Checks what a guest returned for `handled`: sizes, stream names, ownership of event categories,
/// JSON, declared views. Derives the outgoing ids and propagates the metadata. The emails it
/// asked to deliver (id, text) become entries of the service's outbox (see `mail`).
pub(super) fn check_outcome(
    manifest: &crate::wasm::Manifest,
    secret: &NamespaceSecret,
    handled: &Message,
    outcome: Outcome,
    emails: Vec<(String, String)>,
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
        .chain(emails.iter().map(|(_, text)| text.len()))
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
        let id = derived_id(
            secret,
            &manifest.name,
            (&handled.id, handled.global_position),
            &[&index.to_string()],
        );
        let message = NewMessage {
            id,
            message_type: outgoing.message_type,
            data: Value::Object(data),
            metadata,
            not_before_ms: outgoing.not_before_ms,
        };
        check_message(&message).map_err(|e| e.to_string())?;
        checked.messages.push((stream, message));
    }

    for (email_id, text) in emails {
        let stream = Category::outbox_of(&manifest.name)
            .and_then(|outbox| outbox.stream(&email_id))
            .map_err(|e| e.to_string())?;
        let message = NewMessage {
            id: derived_id(
                secret,
                &manifest.name,
                (&handled.id, handled.global_position),
                &["mail", &email_id],
            ),
            message_type: OUTBOX_EMAIL_TYPE.into(),
            data: outbox_email(&email_id, &text),
            metadata: propagated.clone(),
            not_before_ms: None,
        };
        check_message(&message).map_err(|e| format!("email {email_id}: {e}"))?;
        checked.messages.push((stream, message));
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
        let write = ViewWrite {
            table: change.table,
            key: change.key,
            value,
            seq: handled.global_position,
        };
        check_view_write(&write).map_err(|e| e.to_string())?;
        checked.views.push(write);
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
