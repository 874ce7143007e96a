//! `StoreHost`: what the guest's imported `host` and `mail` calls reach while it handles a
//! message: `read-stream` and `view-get` (through the page's overlay, which records what each read),
//! `new-id` (derived from the handled message), `deliver-email` (when granted: it records the
//! email for the outcome's commit to write to the service's outbox, see `mail`) and the
//! `secrets` interface; and the redaction of its log lines while it handles a sealed command.

use std::sync::Arc;

use serde_json::Value;
use tokio::runtime::Handle;

use super::decide::{HostReads, SharedOverlay, read_merged};
use super::outcome::derived_id;
use crate::seal::Redactor;
use crate::store::{Category, Message, MessageStore, StreamName, validate_table_name};
use crate::wasm::GuestHost;

/// The guest's view of the store while it handles one message.
pub(super) struct StoreHost {
    pub(super) runtime: Handle,
    pub(super) store: Arc<dyn MessageStore>,
    pub(super) service: String,
    /// The handled message's id and global position (empty while folding a projection).
    pub(super) handled_id: String,
    pub(super) handled_global: u64,
    /// Granted the mail capability.
    pub(super) mail: bool,
    /// What earlier messages of the same batch decided, not yet committed.
    pub(super) overlay: Option<SharedOverlay>,
    /// A sealed command's clear values, kept out of the guest's log lines.
    pub(super) redactor: Option<Arc<Redactor>>,
}

impl StoreHost {
    /// The host of a fold: it handles no message, so it derives nothing and sends nothing.
    pub(super) fn for_projection(
        runtime: Handle,
        store: Arc<dyn MessageStore>,
        service: String,
    ) -> Self {
        Self {
            runtime,
            store,
            service,
            handled_id: String::new(),
            handled_global: 0,
            mail: false,
            overlay: None,
            redactor: None,
        }
    }

    /// Records what a handler read, for lanes to tell whether it saw another lane's writes.
    fn record_read(&self, read: impl FnOnce(&mut HostReads)) {
        if let Some(overlay) = &self.overlay
            && let Ok(mut overlay) = overlay.lock()
        {
            read(&mut overlay.host_reads);
        }
    }
}

impl GuestHost for StoreHost {
    fn read_stream(&mut self, stream: &str, from_position: u64) -> Result<Vec<Message>, String> {
        let stream = StreamName::parse(stream).map_err(|e| e.to_string())?;
        self.record_read(|reads| {
            reads.streams.insert(stream.clone());
        });
        read_merged(
            &self.runtime,
            Some(self.store.as_ref()),
            self.overlay.as_ref(),
            &stream,
            from_position,
            crate::wasm::READ_STREAM_LIMIT,
        )
        .map_err(|e| e.to_string())
    }

    fn view_get(&mut self, table: &str, key: &str) -> Result<Option<String>, String> {
        validate_table_name(table).map_err(|e| e.to_string())?;
        self.record_read(|reads| {
            reads.views.insert((table.to_owned(), key.to_owned()));
        });
        let row = (table.to_owned(), key.to_owned());
        if let Some(overlay) = &self.overlay
            && let Ok(mut overlay) = overlay.lock()
            && let Some(value) = overlay.views.get(&row).cloned()
        {
            // Written by the page in flight: the commit checks the row still holds it then.
            // Written by this page: the commit writes it, nothing to check.
            if !overlay.written_here.contains(&row) {
                overlay.read_rows.entry(row).or_insert(value.clone());
            }
            return Ok(value.as_ref().map(Value::to_string));
        }
        let stored = self
            .runtime
            .block_on(self.store.view_get(table, key))
            .map_err(|e| e.to_string())?
            .map(|stored| stored.value);
        // What the decision rests on, which its commit checks.
        if let Some(overlay) = &self.overlay
            && let Ok(mut overlay) = overlay.lock()
        {
            overlay.read_rows.entry(row).or_insert(stored.clone());
        }
        Ok(stored.map(|value| value.to_string()))
    }

    fn new_id(&mut self, name: &str) -> String {
        derived_id(
            self.store.secret(),
            &self.service,
            (&self.handled_id, self.handled_global),
            &["new-id", name],
        )
    }

    fn secret(&mut self, purpose: &str) -> Result<String, String> {
        if self.handled_id.is_empty() {
            return Err("secrets are given to handlers, not to project".into());
        }
        let mac = self.store.secret().mac(
            "ferry guest secret",
            &[&self.service, &self.handled_id, purpose],
        );
        Ok(mac.iter().map(|b| format!("{b:02x}")).collect())
    }

    fn redact(&self, text: String) -> String {
        match &self.redactor {
            Some(redactor) => redactor.redact(&text),
            None => text,
        }
    }

    fn deliver_email(&mut self, email_id: &str, message: &str) -> Result<(), String> {
        if !self.mail {
            return Err(format!(
                "service {} is not granted the mail capability",
                self.service
            ));
        }
        let Some(overlay) = self.overlay.clone() else {
            return Err("emails are sent by handlers, not by project".into());
        };
        crate::mail::check_email(email_id, message).map_err(|e| e.to_string())?;
        let stream = Category::outbox_of(&self.service)
            .and_then(|outbox| outbox.stream(email_id))
            .map_err(|e| e.to_string())?;
        self.record_read(|reads| {
            reads.streams.insert(stream.clone());
        });
        // Recorded before (by an earlier handling, or earlier in this page): nothing to add.
        // Read to its end, so the outbox append expects it still empty at commit.
        let recorded = read_merged(
            &self.runtime,
            Some(self.store.as_ref()),
            Some(&overlay),
            &stream,
            0,
            1,
        )
        .map_err(|e| e.to_string())?;
        if !recorded.is_empty() {
            return Ok(());
        }
        let mut overlay = overlay
            .lock()
            .map_err(|_| "the page's overlay is poisoned")?;
        if !overlay.emails.iter().any(|(id, _)| id == email_id) {
            overlay
                .emails
                .push((email_id.to_owned(), message.to_owned()));
        }
        Ok(())
    }
}
