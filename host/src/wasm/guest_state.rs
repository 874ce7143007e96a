//! What a guest instance's store holds (its limits, WASI context and host), the host
//! interfaces the guest imports, and the conversions between the WIT types and the host's.

use super::*;

/// A [`GuestHost`] that offers nothing; used while reading a manifest.
pub(super) struct NoHost;

impl GuestHost for NoHost {
    fn read_stream(&mut self, _: &str, _: u64) -> Result<Vec<Message>, String> {
        Err("not available while the manifest is read".into())
    }
    fn view_get(&mut self, _: &str, _: &str) -> Result<Option<String>, String> {
        Err("not available while the manifest is read".into())
    }
    fn new_id(&mut self, name: &str) -> String {
        name.to_owned()
    }
    fn deliver_email(&mut self, _: &str, _: &str) -> Result<(), String> {
        Err("not available while the manifest is read".into())
    }
    fn secret(&mut self, _: &str) -> Result<String, String> {
        Err("not available while the manifest is read".into())
    }
}

pub(super) struct MemoryCeiling {
    pub(super) bytes: usize,
    pub(super) exceeded: Option<String>,
}

impl ResourceLimiter for MemoryCeiling {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.bytes {
            let reason = format!(
                "linear memory would grow from {current} to {desired} bytes, past the limit of {} bytes",
                self.bytes
            );
            self.exceeded = Some(reason.clone());
            return Err(wasmtime::Error::msg(reason));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired.saturating_mul(size_of::<usize>()) <= self.bytes)
    }
}

pub(super) struct GuestState {
    pub(super) service: String,
    pub(super) host: Box<dyn GuestHost>,
    pub(super) memory: MemoryCeiling,
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for GuestState {}

impl bindings::ferry::service::host::Host for GuestState {
    fn read_stream(
        &mut self,
        stream_name: String,
        from_position: u64,
    ) -> Result<Vec<wit::Message>, String> {
        let messages = self.host.read_stream(&stream_name, from_position)?;
        Ok(messages.iter().map(to_wit_message).collect())
    }

    fn view_get(&mut self, table: String, key: String) -> Result<Option<String>, String> {
        self.host.view_get(&table, &key)
    }

    fn new_id(&mut self, name: String) -> String {
        self.host.new_id(&name)
    }

    fn log(&mut self, level: wit::Level, text: String) {
        // Redacted whole, then cut: a cut first could leave a part of a sealed value that no
        // longer matches it.
        let text: String = self.host.redact(text).chars().take(4096).collect();
        let service = &self.service;
        match level {
            wit::Level::Trace => tracing::trace!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Debug => tracing::debug!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Info => tracing::info!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Warn => tracing::warn!(target: "ferry::guest", %service, "{text}"),
            wit::Level::Error => tracing::error!(target: "ferry::guest", %service, "{text}"),
        }
    }
}

impl bindings::ferry::service::mail::Host for GuestState {
    fn deliver(&mut self, email_id: String, message: String) -> Result<(), String> {
        self.host.deliver_email(&email_id, &message)
    }
}

impl bindings::ferry::service::secrets::Host for GuestState {
    fn derive(&mut self, purpose: String) -> Result<String, String> {
        self.host.secret(&purpose)
    }
}

pub(super) fn to_wit_message(message: &Message) -> wit::Message {
    wit::Message {
        id: message.id.clone(),
        stream_name: message.stream.as_str().to_owned(),
        message_type: message.message_type.clone(),
        // Written straight to a string: the map is not cloned into a `Value` first.
        data: json_text(&message.data),
        metadata: json_text(&message.metadata),
        position: message.position,
        global_position: message.global_position,
        time_ms: message.time_ms,
    }
}

pub(super) fn json_text(value: &impl serde::Serialize) -> String {
    // Serializing a `Value` or a map of them cannot fail (keys are strings).
    serde_json::to_string(value).unwrap_or_default()
}

pub(super) fn from_wit_failure(failure: wit::Failure) -> GuestError {
    match failure {
        wit::Failure::Transient(reason) => GuestError::Transient(reason),
        wit::Failure::Permanent(reason) => GuestError::Permanent(reason),
    }
}

pub(super) fn from_wit_outcome(outcome: wit::Outcome) -> Outcome {
    Outcome {
        messages: outcome
            .messages
            .into_iter()
            .map(|m| Outgoing {
                stream: m.stream_name,
                message_type: m.message_type,
                data: m.data,
                metadata: m.metadata,
                not_before_ms: m.not_before_ms,
            })
            .collect(),
        views: outcome
            .views
            .into_iter()
            .map(|change| match change {
                wit::ViewChange::Upsert(row) => ViewChange {
                    table: row.table,
                    key: row.key,
                    value: Some(row.value),
                },
                wit::ViewChange::Delete(key) => ViewChange {
                    table: key.table,
                    key: key.key,
                    value: None,
                },
            })
            .collect(),
    }
}
