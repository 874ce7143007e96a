//! Where each record lives: the subjects of the namespace's stream (see the module's table), and
//! how any text becomes a subject token.

use super::*;

impl NatsStore {
    pub(super) fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.inner.ns)
    }

    pub(super) fn message_subject(&self, stream: &StreamName) -> String {
        self.subject(&format!("m.{}", stream.as_str()))
    }

    pub(super) fn category_filter(&self, category: &Category) -> String {
        self.subject(&format!("m.{}.*", category.as_str()))
    }

    pub(super) fn consumer_part(consumer: &ConsumerId) -> String {
        format!("{}.{}", consumer.category.as_str(), token(&consumer.name))
    }

    /// A consumer's position in the format before groups.
    pub(super) fn position_subject(&self, consumer: &ConsumerId) -> String {
        self.subject(&format!("pos.{}", Self::consumer_part(consumer)))
    }

    pub(super) fn partition_subject(&self, consumer: &ConsumerId, partition: u32) -> String {
        self.subject(&format!(
            "pos.{}.{partition}",
            Self::consumer_part(consumer)
        ))
    }

    pub(super) fn parked_subject(&self, consumer: &ConsumerId, global: u64) -> String {
        self.subject(&format!("park.{}.{global}", Self::consumer_part(consumer)))
    }

    pub(super) fn deferred_subject(&self, consumer: &ConsumerId, global: u64) -> String {
        self.subject(&format!("defer.{}.{global}", Self::consumer_part(consumer)))
    }

    pub(super) fn claim_subject(&self, id: &str) -> String {
        self.subject(&format!("id.{}", token(id)))
    }

    pub(super) fn snapshot_subject(&self, stream: &StreamName, component: &str) -> String {
        self.subject(&format!("snap.{component}.{}", stream.as_str()))
    }

    /// Where the read check of `subject` (a full subject of this namespace) is carried.
    pub(super) fn check_subject(&self, subject: &str) -> String {
        let rest = subject
            .strip_prefix(&format!("{}.", self.inner.ns))
            .unwrap_or(subject);
        self.subject(&format!("chk.{rest}"))
    }

    pub(super) fn seal_key_subject(&self, message_id: &str) -> String {
        self.subject(&format!("key.{}", token(message_id)))
    }

    /// The subjects a settle changes: the positions of the partitions it advances, or one
    /// deferred entry.
    pub(super) fn settle_subjects(&self, settle: &Settle) -> Vec<String> {
        match settle {
            Settle::Advance {
                consumer,
                partitions,
                ..
            } => partitions
                .iter()
                .map(|moved| self.partition_subject(consumer, moved.partition))
                .collect(),
            Settle::ClearDeferred {
                consumer,
                global_position,
                partition,
                ..
            } => vec![
                self.deferred_subject(consumer, *global_position),
                self.partition_subject(consumer, *partition),
            ],
        }
    }

    pub(super) fn view_subject(&self, table: &str, key: &str) -> String {
        self.subject(&format!("v.{table}.{}", token(key)))
    }
}

/// A subject token for any text: letters, digits, `-`, `_` and `:` as they are, every other
/// byte as `~XX`; the empty text as `~`.
pub(super) fn token(text: &str) -> String {
    if text.is_empty() {
        return "~".into();
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b':') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("~{byte:02X}"));
        }
    }
    out
}

/// The text a [`token`] stands for.
pub(super) fn untoken(token: &str) -> Option<String> {
    if token == "~" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'~' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The durable JetStream consumer's name: the Ferry consumer and its category, so that
/// `nats consumer ls` shows who depends on whom.
pub(super) fn durable_name(consumer: &ConsumerId) -> String {
    format!(
        "{}@{}",
        token(&consumer.name),
        token(consumer.category.as_str())
    )
}
