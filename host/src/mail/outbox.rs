//! The outbox: what a handler's `deliver` records, and the host's deliverer of it. An entry is
//! one message `Email { emailId, message }` on `<service>:outbox.<email id>`; the deliverer is a
//! service compiled into the host, run as the consumer `microservice:<service>` of that
//! category with the same partitions and leases as every consumer, so exactly one instance
//! delivers each entry and records it by advancing its position.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{MailError, Transport};
use crate::store::Message;
use crate::wasm::{GuestError, GuestHost, Manifest, NativeService, Outcome};

/// The type of an outbox entry.
pub const OUTBOX_EMAIL_TYPE: &str = "Email";

/// The data of the outbox entry for an email.
pub fn outbox_email(email_id: &str, message: &str) -> Value {
    json!({ "emailId": email_id, "message": message })
}

/// Delivers a service's outbox entries through a transport.
pub struct Deliverer {
    service: String,
    transport: Arc<Transport>,
}

impl Deliverer {
    pub fn new(service: &str, transport: Arc<Transport>) -> Self {
        Self {
            service: service.to_owned(),
            transport,
        }
    }
}

impl NativeService for Deliverer {
    fn manifest(&self) -> Manifest {
        // Not a category's service name (it has a space): nothing is folded for an entry, and
        // its counters are apart from the service's.
        Manifest {
            name: format!("{} mail", self.service),
            handles_commands: false,
            subscriptions: Vec::new(),
            views: Vec::new(),
        }
    }

    fn project(
        &self,
        _: &mut dyn GuestHost,
        state: Option<&str>,
        _: &Message,
    ) -> Result<String, GuestError> {
        Ok(state.unwrap_or_default().to_owned())
    }

    fn handle_command(
        &self,
        _: &mut dyn GuestHost,
        command: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        Err(GuestError::Permanent(format!(
            "an outbox holds no commands, not {}",
            command.stream
        )))
    }

    fn handle_event(
        &self,
        _: &mut dyn GuestHost,
        entry: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        if entry.message_type != OUTBOX_EMAIL_TYPE {
            return Err(GuestError::Permanent(format!(
                "an outbox entry of type {}, not {OUTBOX_EMAIL_TYPE}",
                entry.message_type
            )));
        }
        let field = |name: &str| {
            entry.data.get(name).and_then(Value::as_str).ok_or_else(|| {
                GuestError::Permanent(format!("the outbox entry has no text field {name}"))
            })
        };
        let (email_id, text) = (field("emailId")?, field("message")?);
        match self.transport.deliver(email_id, &entry.id, text) {
            Ok(()) => {
                tracing::info!(service = %self.service, email = %email_id, "email delivered");
                Ok(Outcome::default())
            }
            Err(e) if e.is_permanent() => Err(GuestError::Permanent(e.to_string())),
            Err(e @ (MailError::Io(_) | MailError::Relay(_))) => {
                tracing::warn!(service = %self.service, email = %email_id, "delivery failed, trying again: {e}");
                Err(GuestError::Transient(e.to_string()))
            }
            Err(e) => Err(GuestError::Transient(e.to_string())),
        }
    }
}
