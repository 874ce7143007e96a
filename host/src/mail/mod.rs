//! The mail capability. A handler's `deliver` performs nothing: it records the email in its
//! service's outbox (`<service>:outbox.<email id>`), written by the same commit as the decision
//! it belongs to, so an email exists exactly when its decision does, and an id recorded once is
//! never recorded again (the append expects the stream empty). The host then delivers what the
//! outbox holds (`outbox`, a consumer of the outbox category run by whichever instance owns the
//! partition) through a transport — a maildir under the data folder (`maildir`, the default) or
//! an SMTP relay (`smtp`) — and records each delivery by advancing that consumer.
//!
//! The guarantee: every recorded email is delivered at least once, and more than once only when
//! an instance stops (a crash, a pause past its lease) between handing an email to the transport
//! and recording it; every copy carries the same `Message-ID`, derived from the outbox entry's
//! id, so a receiver can drop it.

mod maildir;
mod outbox;
mod smtp;

pub use maildir::Maildir;
pub use outbox::{Deliverer, OUTBOX_EMAIL_TYPE, outbox_email};
pub use smtp::{SmtpRelay, SmtpTls};

/// Largest email accepted, in bytes: its outbox entry stays inside a message's data limit.
pub const MAX_EMAIL_BYTES: usize = 384 * 1024;

/// Why an email was not recorded or not delivered.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid email id {0:?}: use 1 to 200 letters, digits, '-' or '_'")]
    InvalidId(String),
    #[error("the email is {0} bytes, more than the limit of {MAX_EMAIL_BYTES}")]
    TooLarge(usize),
    #[error("the email cannot be sent: {0}")]
    Unsendable(String),
    #[error("maildir I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the SMTP relay refused the email: {0}")]
    Refused(String),
    #[error("the SMTP relay could not be reached or failed: {0}")]
    Relay(String),
}

impl MailError {
    /// True when delivering again cannot succeed (the email stays parked until an operator acts).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::InvalidId(_) | Self::TooLarge(_) | Self::Unsendable(_) | Self::Refused(_)
        )
    }
}

/// Checks what a handler asks to deliver: an id that names a stream and a file, and a size.
pub fn check_email(email_id: &str, message: &str) -> Result<(), MailError> {
    let valid = !email_id.is_empty()
        && email_id.len() <= 200
        && email_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if !valid {
        return Err(MailError::InvalidId(email_id.chars().take(80).collect()));
    }
    if message.len() > MAX_EMAIL_BYTES {
        return Err(MailError::TooLarge(message.len()));
    }
    Ok(())
}

/// Where emails go.
#[derive(Debug)]
pub enum Transport {
    Maildir(Maildir),
    Smtp(SmtpRelay),
}

impl Transport {
    /// Hands one email over; `message_id` becomes its `Message-ID` header (replacing one the
    /// handler wrote), the same on every attempt.
    pub fn deliver(&self, email_id: &str, message_id: &str, text: &str) -> Result<(), MailError> {
        check_email(email_id, text)?;
        let text = with_message_id(text, message_id);
        match self {
            Self::Maildir(maildir) => maildir.deliver(email_id, &text),
            Self::Smtp(relay) => relay.deliver(&text),
        }
    }

    /// How it is shown in the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Maildir(maildir) => format!("maildir {}", maildir.root().display()),
            Self::Smtp(relay) => relay.describe(),
        }
    }
}

/// The header part of an RFC 5322 text and its body (after the empty line; empty if none).
fn split_message(text: &str) -> (&str, &str) {
    for separator in ["\r\n\r\n", "\n\n"] {
        if let Some(at) = text.find(separator) {
            return (&text[..at], &text[at + separator.len()..]);
        }
    }
    (text, "")
}

/// The header fields of a header part, each unfolded: (name, value).
fn header_fields(head: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    fields
}

/// The text with its `Message-ID` set to `<message_id@ferry>` and lines ending in CRLF.
fn with_message_id(text: &str, message_id: &str) -> String {
    let (head, body) = split_message(text);
    let mut out = format!("Message-ID: <{message_id}@ferry>\r\n");
    let mut skipping = false;
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        let continued = line.starts_with([' ', '\t']);
        if !continued {
            skipping = line
                .split_once(':')
                .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("message-id"));
        }
        if !skipping {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    for line in body.lines() {
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_is_the_hosts_whatever_the_handler_wrote() {
        let text = "Message-ID: <mine@x>\r\nFrom: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n there\r\n\r\nbody\nline";
        let sent = with_message_id(text, "6b1c");
        assert_eq!(
            sent,
            "Message-ID: <6b1c@ferry>\r\nFrom: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n there\r\n\r\nbody\r\nline\r\n"
        );
        let fields = header_fields(split_message(&sent).0);
        assert_eq!(fields[3], ("Subject".into(), "hi there".into()));
    }

    #[test]
    fn refuses_ids_that_could_escape_the_folder_or_the_stream() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", "a.b", "a*"] {
            assert!(
                matches!(check_email(bad, "x"), Err(MailError::InvalidId(_))),
                "{bad:?}"
            );
        }
        assert!(check_email("e-1_a", "x").is_ok());
    }
}
