//! The article's flows with its services as real components (`guests/user`, `email`,
//! `subscription`, `user-aggregator`) on a real sled data folder.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Setup, billing, types, wait_until};

const WAIT: Duration = Duration::from_secs(60);

fn register(setup: &Setup, user_id: &str, username: &str, email: &str) {
    setup.send(
        &format!("user:command.{user_id}"),
        "RegisterUser",
        json!({
            "username": username, "email": email, "password": "correct horse battery staple",
            "firstName": "Ann", "lastName": "Lee",
        }),
    );
}

#[test]
fn registers_a_user_end_to_end() {
    let setup = Setup::new(&["user", "email", "user_aggregator"]);
    let _host = setup.start(&[]);
    register(&setup, "u1", "ann", "ann@example.com");

    let events = setup.wait_for_stream("user.u1", 1);
    assert_eq!(types(&events), ["UserRegistered"]);
    let registered = &events[0]["data"];
    assert_eq!(registered["username"], "ann");
    let hash = registered["passwordHash"].as_str().expect("hash");
    assert!(hash.starts_with("pbkdf2-sha256$"), "{hash}");
    let everything = setup
        .ferry_json(&["read", "user", "--limit", "1000"])
        .to_string();
    assert!(
        !everything.contains("correct horse"),
        "the password is never stored in clear"
    );

    // The welcome email: a command with the origin, one file, one EmailSent.
    wait_until(WAIT, "the welcome email is delivered", || {
        setup.emails().len() == 1
    });
    let (file, text) = &setup.emails()[0];
    assert!(text.contains("To: ann@example.com"), "{text}");
    assert!(text.contains("confirm-email?user=u1"), "{text}");
    let email_id = file.strip_suffix(".eml").expect("eml");
    let sent = setup.wait_for_stream(&format!("email.{email_id}"), 1);
    assert_eq!(types(&sent), ["EmailSent"]);
    assert_eq!(sent[0]["metadata"]["originEntity"], "user.u1");

    // The view data, by id and by username and email.
    setup.wait_for_registered_ann(WAIT, &events[0]);

    // A name change is a NameChanged, a NotifyUser for the browser, and a view update.
    setup.send(
        "user:command.u1",
        "ChangeName",
        json!({"firstName": "Annie", "lastName": "Lee"}),
    );
    let events = setup.wait_for_stream("user.u1", 2);
    assert_eq!(types(&events), ["UserRegistered", "NameChanged"]);
    let notify = setup.wait_for_stream("socket-notification:command.u1", 1);
    assert_eq!(notify[0]["type"], "NotifyUser");
    assert_eq!(notify[0]["data"]["eventType"], "NameChanged");
    wait_until(WAIT, "the view shows the new name", || {
        setup
            .view_row("users", "u1")
            .is_some_and(|row| row["value"]["firstName"] == "Annie")
    });
}

#[test]
fn rejects_a_taken_username_or_email_even_with_a_stale_view() {
    // No aggregator: the users view stays empty, as stale as a view can be.
    let setup = Setup::new(&["user", "email"]);
    let _host = setup.start(&[]);
    register(&setup, "u1", "ann", "ann@example.com");
    setup.wait_for_stream("user.u1", 1);
    register(&setup, "u2", "ANN", "other@example.com");
    register(&setup, "u3", "someone", "Ann@Example.com");
    let u2 = setup.wait_for_stream("user.u2", 1);
    let u3 = setup.wait_for_stream("user.u3", 1);
    assert_eq!(types(&u2), ["UserRegistrationRejected"]);
    assert_eq!(u2[0]["data"]["reason"], "username is taken");
    assert_eq!(types(&u3), ["UserRegistrationRejected"]);
    assert_eq!(u3[0]["data"]["reason"], "email is taken");

    // A retried registration (a new command with the same data) changes nothing.
    register(&setup, "u1", "ann", "ann@example.com");
    let commands = setup.wait_for_stream("user:command.u1", 2);
    wait_until(WAIT, "the retry is handled", || {
        setup.ferry_json(&["consumers", "user:command"])["consumers"][0]["position"].as_u64()
            >= commands[1]["globalPosition"].as_u64()
    });
    assert_eq!(types(&setup.read("user.u1")), ["UserRegistered"]);
    wait_until(WAIT, "one welcome email", || setup.emails().len() == 1);
}

#[test]
fn sends_an_email_once_when_send_email_is_delivered_twice() {
    let setup = Setup::new(&["email"]);
    let send_email = json!({
        "id": "e1", "from": "billing@ferry.local", "to": "john@example.com",
        "subject": "Your subscription", "body": "We noticed that your payment is overdue...",
    });
    let host = setup.start(&[]);
    setup.send("email:command.e1", "SendEmail", send_email.clone());
    setup.wait_for_stream("email.e1", 1);
    // The same email asked for again by a second command.
    setup.send("email:command.e1", "SendEmail", send_email);
    let commands = setup.wait_for_stream("email:command.e1", 2);
    wait_until(WAIT, "both commands are handled", || {
        setup.ferry_json(&["consumers", "email:command"])["consumers"][0]["position"]
            == commands[1]["globalPosition"]
    });
    host.stop();
    // And the first command redelivered, as after a lost acknowledgement.
    setup.rewind_consumer("email:command", "microservice:email", 0);
    let _host = setup.start(&[]);
    wait_until(WAIT, "the commands are handled again", || {
        setup.ferry_json(&["consumers", "email:command"])["consumers"][0]["position"]
            == commands[1]["globalPosition"]
    });
    assert_eq!(types(&setup.read("email.e1")), ["EmailSent"]);
    assert_eq!(setup.emails().len(), 1);
    assert_eq!(setup.emails()[0].0, "e1.eml");
}

#[test]
fn refuses_email_delivery_to_a_service_without_the_grant() {
    let setup = Setup::new(&["email"]);
    let _host = setup.start(&["--mail-grant", "somebody-else"]);
    setup.send(
        "email:command.e9",
        "SendEmail",
        json!({"id": "e9", "from": "a@b.c", "to": "d@e.f", "subject": "s", "body": "b"}),
    );
    let mut parked = Vec::new();
    wait_until(WAIT, "the command is parked", || {
        parked = setup.parked();
        !parked.is_empty()
    });
    let reason = parked[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not granted the mail capability"),
        "{reason}"
    );
    assert!(setup.emails().is_empty());
}

/// The article's central claim: the subscription service need not run while the email service
/// works; it catches up later from its durable consumer.
fn subscription_catches_up(email_runs_at_the_end: bool) {
    let setup = Setup::new(&["subscription"]);
    let host = setup.start(&[]);
    setup.send(
        "subscription:command.john",
        "MarkPaymentOverdue",
        json!({"email": "john@example.com", "followUpAfterMs": 3_600_000}),
    );
    let overdue = setup.wait_for_stream("subscription.john", 1);
    assert_eq!(types(&overdue), ["PaymentOverdue"]);
    let commands = setup.wait_for_stream("email:command", 1);
    let email_id = commands[0]["data"]["id"]
        .as_str()
        .expect("email id")
        .to_owned();
    assert_eq!(commands[0]["metadata"]["originEntity"], "subscription.john");
    host.stop();

    // Only the email service runs: it sends the email and records that it was opened.
    setup.uninstall("subscription");
    setup.install("email");
    let host = setup.start(&[]);
    support::wait_until_or_explain(
        Duration::from_secs(60),
        "the email service sends the email",
        || setup.read(&format!("email.{email_id}")).len() == 1,
        || host.log_tail(60),
    );
    setup.send(
        &format!("email:command.{email_id}"),
        "RecordEmailOpened",
        json!({"timestamp": "2022-06-06T08:29:30Z"}),
    );
    let email_events = setup.wait_for_stream(&format!("email.{email_id}"), 2);
    assert_eq!(types(&email_events), ["EmailSent", "EmailOpened"]);
    assert_eq!(
        email_events[1]["metadata"]["originEntity"],
        "subscription.john"
    );
    host.stop();
    assert_eq!(
        types(&setup.read("subscription.john")),
        ["PaymentOverdue"],
        "nobody was looking"
    );

    setup.install("subscription");
    if !email_runs_at_the_end {
        setup.uninstall("email");
    }
    let _host = setup.start(&[]);
    let events = setup.wait_for_stream("subscription.john", 3);
    assert_eq!(
        types(&events),
        [
            "PaymentOverdue",
            "PaymentOverdueNotificationSent",
            "PaymentOverdueNotificationOpened"
        ]
    );
    assert_eq!(events[1]["data"]["emailId"], email_id.as_str());
}

#[test]
fn subscription_catches_up_on_email_events_after_being_down() {
    subscription_catches_up(true);
}

#[test]
fn subscription_and_email_work_without_ever_running_together() {
    subscription_catches_up(false);
}

#[test]
fn follows_up_an_overdue_payment_by_what_happened_to_the_email() {
    let setup = Setup::new(&["subscription", "email"]);
    let _host = setup.start(&[]);
    // Long enough for the whole flow before the follow-ups on a slow machine; the test waits
    // this long for the ignored one to be cancelled.
    let follow_ups_due = billing::mark_overdue(&setup, Duration::from_secs(10));
    billing::open_one_and_pay_one(&setup, follow_ups_due);
    billing::assert_followed_up(&setup);
    // The discount email went out, to the right person, with the right origin.
    wait_until(WAIT, "four emails are delivered", || {
        setup.emails().len() == 4
    });
    let discount = setup
        .emails()
        .into_iter()
        .find(|(_, text)| text.contains("20% off"))
        .expect("discount email");
    assert!(discount.1.contains("To: opened@example.com"));
}

fn all_rows(setup: &Setup, table: &str) -> Vec<Value> {
    setup.ferry_json(&["view", table, "--limit", "100000"])["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn rebuilds_the_users_view_from_the_event_history() {
    const USERS: usize = 40;
    let setup = Setup::new(&["user", "email", "user_aggregator"]);
    let host = setup.start(&[]);
    for n in 0..USERS {
        register(
            &setup,
            &format!("u{n}"),
            &format!("user{n}"),
            &format!("user{n}@example.com"),
        );
    }
    setup.send(
        "user:command.u3",
        "ChangeName",
        json!({"firstName": "Renamed", "lastName": "Three"}),
    );
    wait_until(WAIT, "the view has every user and the rename", || {
        all_rows(&setup, "users").len() == USERS
            && setup
                .view_row("users", "u3")
                .is_some_and(|r| r["value"]["firstName"] == "Renamed")
    });
    let before: Vec<Vec<Value>> = ["users", "users-by-username", "users-by-email"]
        .iter()
        .map(|table| all_rows(&setup, table))
        .collect();

    // Through the running host.
    let output = setup.ferry(&["rebuild", "users"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("rebuilding"));
    let summary = String::from_utf8_lossy(&output.stdout).into_owned();
    let replayed: usize = summary
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("rebuilt ... from N events: {summary:?}"));
    // Every user event was replayed: registrations, claims, the rename.
    assert!(replayed > USERS * 3, "{summary}");
    let after: Vec<Vec<Value>> = ["users", "users-by-username", "users-by-email"]
        .iter()
        .map(|table| all_rows(&setup, table))
        .collect();
    assert_eq!(after, before, "the same rows, with the same lastUpdateSeq");
    host.stop();

    // And with no host running: the CLI runs the aggregator's subscription itself.
    let output = setup.ferry(&["rebuild", "users-by-email"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("rebuilding"), "progress is shown: {stderr}");
    let again: Vec<Vec<Value>> = ["users", "users-by-username", "users-by-email"]
        .iter()
        .map(|table| all_rows(&setup, table))
        .collect();
    assert_eq!(again, before);
}

#[test]
fn rejects_a_taken_username_among_commands_handled_together() {
    // Sent while no host runs, the registrations are read and decided as one batch: the second
    // must see the claim the first made, although it is not committed yet.
    let setup = Setup::new(&["user"]);
    register(&setup, "first", "sam", "sam@example.com");
    register(&setup, "second", "Sam", "sam2@example.com");
    register(&setup, "third", "sam3", "SAM@example.com");
    let _host = setup.start(&[]);
    assert_eq!(
        types(&setup.wait_for_stream("user.first", 1)),
        ["UserRegistered"]
    );
    let second = setup.wait_for_stream("user.second", 1);
    assert_eq!(types(&second), ["UserRegistrationRejected"]);
    assert_eq!(second[0]["data"]["reason"], "username is taken");
    let third = setup.wait_for_stream("user.third", 1);
    assert_eq!(third[0]["data"]["reason"], "email is taken");
}
