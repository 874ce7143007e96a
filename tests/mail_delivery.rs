//! Emails are effects after the commit: the decision records each in its service's outbox, and
//! the instance owning the outbox's partition delivers it to a real SMTP server (`aiosmtpd`),
//! waiting while the relay is down, over STARTTLS with a trusted CA, and across instances that
//! pause past their lease and join: every email arrives, and its copies (only from a stop
//! between delivering and recording) carry one Message-ID.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use support::nats::{NatsServer, free_port};
use support::smtp::{SmtpServer, certificate, header};
use support::{Setup, wait_until, wait_until_or_explain};

const WAIT: Duration = Duration::from_secs(90);

fn send_email(setup: &Setup, id: &str) {
    setup.send(
        &format!("email:command.{id}"),
        "SendEmail",
        json!({
            "id": id,
            "from": "Ferry <hello@example.com>",
            "to": format!("{id}@example.com"),
            "subject": format!("welcome {id}"),
            "body": "Confirm with the link.",
        }),
    );
}

/// The Message-ID Ferry gives an email: from its outbox entry's id.
fn message_id_of(setup: &Setup, email_id: &str) -> String {
    let entries = setup.read(&format!("email:outbox.{email_id}"));
    assert_eq!(
        entries.len(),
        1,
        "one outbox entry for {email_id}: {entries:?}"
    );
    let id = entries[0]["id"].as_str().expect("an id");
    format!("<{id}@ferry>")
}

/// Emails received, by the id in their subject: each copy's Message-ID.
fn received_by_email(relay: &SmtpServer) -> BTreeMap<String, Vec<String>> {
    let mut by_email: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for text in relay.received() {
        let subject = header(&text, "Subject").unwrap_or_default();
        let id = subject.trim_start_matches("welcome ").to_owned();
        by_email
            .entry(id)
            .or_default()
            .push(header(&text, "Message-ID").unwrap_or_default());
    }
    by_email
}

#[test]
fn delivers_over_starttls_once_the_relay_is_up() {
    let setup = Setup::new(&["email"]);
    let certs = tempfile::tempdir().expect("temp dir");
    let (cert, key) = certificate(certs.path());
    let port = free_port();
    let url = format!("smtp://127.0.0.1:{port}");
    let cert_arg = cert.display().to_string();
    let host = setup.start(&["--mail", &url, "--mail-ca", &cert_arg]);
    send_email(&setup, "e1");
    // Decided and recorded while nothing listens: the delivery waits, nothing is lost.
    wait_until(WAIT, "EmailSent is recorded", || {
        !setup.read("email.e1").is_empty()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let relay = SmtpServer::start(port, Some((&cert, &key)));
    wait_until_or_explain(
        WAIT,
        "the email reaches the relay",
        || relay.received().len() == 1,
        || format!("{}\n{}", host.log_tail(30), relay.log()),
    );
    let text = &relay.received()[0];
    assert_eq!(
        header(text, "Message-ID"),
        Some(message_id_of(&setup, "e1"))
    );
    assert_eq!(header(text, "To").as_deref(), Some("e1@example.com"));
    // The relay refuses MAIL before STARTTLS (aiosmtpd's require_starttls with a certificate),
    // so the email came over TLS, trusted through --mail-ca.
    assert!(setup.parked().is_empty(), "{:?}", setup.parked());
    assert!(
        setup.emails().is_empty(),
        "nothing went to the local maildir"
    );
}

#[test]
fn an_outbox_is_written_only_by_the_host() {
    let setup = Setup::new(&["email"]);
    let output = setup.ferry(&[
        "send",
        "email:outbox.x1",
        "Email",
        r#"{"emailId":"x1","message":"From: a@example.com\r\nTo: b@example.com\r\n\r\nhi"}"#,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("only the host writes"), "{stderr}");
}

#[test]
fn every_email_arrives_across_an_instance_paused_past_its_lease_and_one_that_joins() {
    const EMAILS: usize = 120;
    let server = NatsServer::start();
    let setup = Setup::with_store(&["email"], &server.url());
    send_email(&setup, "warmup");
    let relay = SmtpServer::start(free_port(), None);
    let url = relay.url();
    let instance = |n: usize| -> (support::Host, PathBuf) {
        let data = setup.dir.path().join(format!("instance-{n}"));
        let host = setup.start_in(
            &data,
            &[
                "--lease-ttl-ms",
                "2000",
                "--mail",
                &url,
                "--mail-tls",
                "none",
            ],
        );
        (host, data)
    };
    let (first, _) = instance(1);
    let (second, _) = instance(2);
    let mut third = None;
    for n in 0..EMAILS {
        send_email(&setup, &format!("m{n}"));
        if n == EMAILS / 3 {
            // The instance that delivered last stops where it is (mid-delivery, perhaps), past
            // its lease; the other takes its partitions over, then it comes back.
            wait_until(WAIT, "both instances deliver", || {
                first.log_text().contains("email delivered")
                    && second.log_text().contains("email delivered")
            });
            first.signal("STOP");
            std::thread::sleep(Duration::from_secs(5));
            first.signal("CONT");
        }
        if n == 2 * EMAILS / 3 {
            third = Some(instance(3));
        }
    }
    let all: Vec<String> = std::iter::once("warmup".to_owned())
        .chain((0..EMAILS).map(|n| format!("m{n}")))
        .collect();
    let explain = || {
        let by_email = received_by_email(&relay);
        let missing: Vec<&String> = all
            .iter()
            .filter(|id| !by_email.contains_key(*id))
            .collect();
        format!(
            "missing {missing:?}\n{}\n{}\n{}",
            first.log_tail(20),
            second.log_tail(20),
            third
                .as_ref()
                .map(|(h, _)| h.log_tail(20))
                .unwrap_or_default()
        )
    };
    wait_until_or_explain(
        WAIT,
        "every email reaches the relay",
        || {
            all.iter()
                .all(|id| received_by_email(&relay).contains_key(id))
        },
        explain,
    );
    // Late copies from a resumed instance would land by now.
    std::thread::sleep(Duration::from_secs(3));
    let by_email = received_by_email(&relay);
    let mut copies = 0;
    for id in &all {
        let ids = &by_email[id];
        let expected = message_id_of(&setup, id);
        assert!(
            ids.iter().all(|got| *got == expected),
            "every copy of {id} carries {expected}: {ids:?}"
        );
        copies += ids.len() - 1;
    }
    assert_eq!(
        by_email.len(),
        all.len(),
        "nothing else arrived: {by_email:?}"
    );
    // Each pause or take-over can repeat the one email its instance was delivering.
    assert!(copies <= 2, "{copies} emails were delivered twice");
    eprintln!("{} emails, {copies} delivered twice", all.len());
    let sent: Vec<Value> = setup.read("email");
    assert_eq!(sent.len(), all.len(), "one EmailSent each");
    assert!(setup.parked().is_empty(), "{:?}", setup.parked());
}
