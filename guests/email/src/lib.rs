//! The email service of the article. It owns `email` and `email:command`.
//!
//! - `SendEmail { id, from, to, subject, body }` on `email:command.<id>`: projects `email.<id>`;
//!   when the email was sent already it does nothing, otherwise it delivers it (the host's mail
//!   capability, idempotent per id) and writes `EmailSent`, which carries the command's
//!   `originEntity` (the host copies it).
//! - `RecordEmailOpened { id, timestamp }` (what the provider's webhook becomes) → `EmailOpened`,
//!   with the `originEntity` of the email it belongs to.

use ferry_sdk::{
    Manifest, Message, Outcome, Result, Service, host, json, permanent, transient, write,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Email {
    id: String,
    from: String,
    to: String,
    subject: String,
    body: String,
}

#[derive(Debug, Deserialize)]
struct EmailOpened {
    #[serde(default)]
    timestamp: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmailState {
    is_email_sent: bool,
    is_email_opened: bool,
    origin_entity: Option<String>,
}

/// RFC 5322 text of an email; header values are kept on one line.
fn rfc5322(email: &Email) -> String {
    let one_line = |text: &str| text.replace(['\r', '\n'], " ");
    format!(
        "Message-ID: <{}@ferry.local>\r\nFrom: {}\r\nTo: {}\r\nSubject: {}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}\r\n",
        one_line(&email.id),
        one_line(&email.from),
        one_line(&email.to),
        one_line(&email.subject),
        email.body.replace("\r\n", "\n").replace('\n', "\r\n"),
    )
}

struct EmailService;

impl Service for EmailService {
    type State = EmailState;

    fn manifest() -> Manifest {
        Manifest::new("email").handles_commands()
    }

    fn project(mut state: EmailState, event: &Message) -> Result<EmailState> {
        match event.message_type.as_str() {
            "EmailSent" => {
                state.is_email_sent = true;
                state.origin_entity = event.origin_entity().map(str::to_owned);
            }
            "EmailOpened" => state.is_email_opened = true,
            _ => {}
        }
        Ok(state)
    }

    fn handle_command(command: &Message, state: Option<EmailState>) -> Result<Outcome> {
        let state = state.unwrap_or_default();
        let stream = format!("email.{}", command.entity_id());
        match command.message_type.as_str() {
            "SendEmail" => {
                if state.is_email_sent {
                    host::info(&format!("email {} was sent already", command.entity_id()));
                    return Ok(Outcome::none());
                }
                let email: Email = command.data()?;
                if email.id != command.entity_id() {
                    return Err(permanent(format!(
                        "SendEmail for {} arrived on {}",
                        email.id, command.stream
                    )));
                }
                host::deliver_email(&email.id, &rfc5322(&email))
                    .map_err(|e| transient(format!("delivery failed: {e}")))?;
                Ok(Outcome::none().with(write(stream, "EmailSent", &email)))
            }
            "RecordEmailOpened" => {
                if !state.is_email_sent {
                    // The webhook can race the send; the host retries with backoff.
                    return Err(transient(format!(
                        "email {} is not sent yet",
                        command.entity_id()
                    )));
                }
                if state.is_email_opened {
                    return Ok(Outcome::none());
                }
                let opened: EmailOpened = command.data()?;
                let mut metadata = json!({});
                if let Some(origin) = &state.origin_entity {
                    metadata["originEntity"] = json!(origin);
                }
                Ok(Outcome::none().with(
                    write(
                        stream,
                        "EmailOpened",
                        &json!({ "id": command.entity_id(), "timestamp": opened.timestamp }),
                    )
                    .metadata(metadata),
                ))
            }
            other => Err(permanent(format!("unknown command {other}"))),
        }
    }
}

ferry_sdk::service!(EmailService);
