//! The SMTP transport: emails handed to a relay with `lettre` (`--mail smtp://HOST:PORT`, or
//! `smtps://` for TLS from the first byte). The envelope is taken from the email's `From`, `To`,
//! `Cc` and `Bcc` headers; `Bcc` is not sent. A refusal by the relay (a 5xx answer, an address
//! it cannot parse) is permanent; anything else (no connection, a 4xx answer, a timeout) is
//! tried again.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use lettre::Transport as _;
use lettre::address::Envelope;
use lettre::message::Mailboxes;
use lettre::transport::smtp::SmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};

use super::{MailError, header_fields, split_message};

/// How long one SMTP exchange may take before it is given up (and tried again later).
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SmtpTls {
    /// STARTTLS, and nothing is sent if the relay does not offer it.
    Required,
    /// STARTTLS when the relay offers it, plain text otherwise (open to a downgrade).
    Opportunistic,
    /// Plain text: only for a relay on the same machine or a trusted network.
    None,
}

/// An SMTP relay emails are handed to.
pub struct SmtpRelay {
    transport: SmtpTransport,
    shown: String,
}

impl std::fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl SmtpRelay {
    /// A relay from `smtp://HOST[:PORT]` (port 587 by default, STARTTLS as `tls` says) or
    /// `smtps://HOST[:PORT]` (port 465, TLS from the start); credentials from a file holding
    /// `user:password` on its first line; `ca` adds a trusted root (PEM) to the system's.
    pub fn open(
        url: &str,
        tls: SmtpTls,
        credentials: Option<&Path>,
        ca: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let (implicit_tls, rest) = if let Some(rest) = url.strip_prefix("smtps://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("smtp://") {
            (false, rest)
        } else {
            anyhow::bail!(
                "--mail {url:?}: expected maildir, smtp://HOST[:PORT] or smtps://HOST[:PORT]"
            );
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => (
                host,
                port.parse::<u16>()
                    .with_context(|| format!("--mail {url:?}: the port is not a number"))?,
            ),
            _ => (rest, if implicit_tls { 465 } else { 587 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        anyhow::ensure!(!host.is_empty(), "--mail {url:?}: no host");
        let parameters = || -> anyhow::Result<TlsParameters> {
            let mut builder = TlsParameters::builder(host.to_owned());
            if let Some(ca) = ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read --mail-ca {}", ca.display()))?;
                builder = builder.add_root_certificate(Certificate::from_pem(&pem).with_context(
                    || format!("--mail-ca {} is not a PEM certificate", ca.display()),
                )?);
            }
            builder
                .build_rustls()
                .context("the TLS settings for the SMTP relay")
        };
        let tls_mode = match (implicit_tls, tls) {
            (true, _) => Tls::Wrapper(parameters()?),
            (false, SmtpTls::Required) => Tls::Required(parameters()?),
            (false, SmtpTls::Opportunistic) => Tls::Opportunistic(parameters()?),
            (false, SmtpTls::None) => Tls::None,
        };
        let mut builder = SmtpTransport::builder_dangerous(host)
            .port(port)
            .tls(tls_mode)
            .timeout(Some(SMTP_TIMEOUT));
        let mut user = None;
        if let Some(path) = credentials {
            let (name, password) = read_credentials(path)?;
            user = Some(name.clone());
            builder = builder.credentials(Credentials::new(name, password));
        }
        let shown = format!(
            "SMTP relay {host}:{port} ({}{})",
            match (implicit_tls, tls) {
                (true, _) => "TLS",
                (false, SmtpTls::Required) => "STARTTLS required",
                (false, SmtpTls::Opportunistic) => "STARTTLS if offered",
                (false, SmtpTls::None) => "no TLS",
            },
            user.map(|u| format!(", as {u}")).unwrap_or_default()
        );
        Ok(Self {
            transport: builder.build(),
            shown,
        })
    }

    pub(super) fn describe(&self) -> String {
        self.shown.clone()
    }

    /// Sends one email (its Message-ID already set).
    pub(super) fn deliver(&self, text: &str) -> Result<(), MailError> {
        let (envelope, sent) = envelope_of(text)?;
        match self.transport.send_raw(&envelope, sent.as_bytes()) {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(MailError::Refused(e.to_string())),
            Err(e) => Err(MailError::Relay(e.to_string())),
        }
    }
}

/// `user:password` from the first line of a file that only its owner may read.
fn read_credentials(path: &Path) -> anyhow::Result<(String, String)> {
    let bytes = crate::files::read_private(path, "SMTP credentials file")?;
    let text = String::from_utf8(bytes).context("the SMTP credentials file is not UTF-8")?;
    let line = text.lines().next().unwrap_or_default();
    let (user, password) = line.split_once(':').with_context(|| {
        format!(
            "--mail-credentials {}: expected user:password on the first line",
            path.display()
        )
    })?;
    Ok((user.to_owned(), password.to_owned()))
}

/// The envelope an email's headers name, and the text to send (without `Bcc`).
fn envelope_of(text: &str) -> Result<(Envelope, String), MailError> {
    let (head, _) = split_message(text);
    let mut from = None;
    let mut to = Vec::new();
    for (name, value) in header_fields(head) {
        let name = name.to_ascii_lowercase();
        if !matches!(name.as_str(), "from" | "to" | "cc" | "bcc") {
            continue;
        }
        let boxes = Mailboxes::from_str(&value)
            .map_err(|e| MailError::Unsendable(format!("{name}: {value:?}: {e}")))?;
        match name.as_str() {
            "from" => from = boxes.into_single().map(|b| b.email),
            _ => to.extend(boxes.into_iter().map(|b| b.email)),
        }
    }
    let from = from.ok_or_else(|| MailError::Unsendable("no single From address".into()))?;
    let envelope = Envelope::new(Some(from), to)
        .map_err(|e| MailError::Unsendable(format!("no recipient: {e}")))?;
    let mut sent = String::with_capacity(text.len());
    let mut skipping = false;
    let (head, body) = split_message(text);
    for line in head.split("\r\n") {
        if !line.starts_with([' ', '\t']) {
            skipping = line
                .split_once(':')
                .is_some_and(|(name, _)| name.trim().eq_ignore_ascii_case("bcc"));
        }
        if !skipping {
            sent.push_str(line);
            sent.push_str("\r\n");
        }
    }
    sent.push_str("\r\n");
    sent.push_str(body);
    Ok((envelope, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_comes_from_the_headers_and_bcc_is_not_sent() {
        let text = "Message-ID: <1@ferry>\r\nFrom: Ann <ann@example.com>\r\nTo: bob@example.com,\r\n Cy <cy@example.com>\r\nBcc: dee@example.com\r\nSubject: hi\r\n\r\nbody\r\n";
        let (envelope, sent) = envelope_of(text).expect("an envelope");
        assert_eq!(
            envelope.from().map(ToString::to_string).as_deref(),
            Some("ann@example.com")
        );
        let to: Vec<String> = envelope.to().iter().map(ToString::to_string).collect();
        assert_eq!(to, ["bob@example.com", "cy@example.com", "dee@example.com"]);
        assert!(!sent.contains("dee@"), "{sent}");
        assert!(sent.ends_with("\r\n\r\nbody\r\n"), "{sent}");
    }

    #[test]
    fn an_email_without_sender_or_recipient_is_unsendable() {
        for text in ["To: b@example.com\r\n\r\nx", "From: a@example.com\r\n\r\nx"] {
            assert!(
                matches!(envelope_of(text), Err(MailError::Unsendable(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn reads_the_relay_from_its_url() {
        let relay =
            SmtpRelay::open("smtp://127.0.0.1:2525", SmtpTls::None, None, None).expect("a relay");
        assert_eq!(relay.describe(), "SMTP relay 127.0.0.1:2525 (no TLS)");
        assert!(SmtpRelay::open("http://x", SmtpTls::None, None, None).is_err());
        assert!(SmtpRelay::open("smtp://x:port", SmtpTls::None, None, None).is_err());
    }
}
