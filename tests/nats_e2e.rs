//! The article's flows on a real `nats-server -js`, with each service in its own `ferry`
//! process: killed with SIGKILL mid-flow, or with the server restarted under it, the flow
//! completes with nothing lost and nothing written twice.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use support::nats::NatsServer;
use support::{Host, Setup, billing, types, wait_until};

const WAIT: Duration = Duration::from_secs(90);

fn register(setup: &Setup, user: usize) {
    setup.send(
        &format!("user:command.u{user}"),
        "RegisterUser",
        json!({
            "username": format!("user{user}"), "email": format!("user{user}@example.com"),
            "password": "correct horse battery staple", "firstName": "Ann", "lastName": "Lee",
        }),
    );
}

/// One `ferry run --only SERVICE` with its own data folder.
fn start_service(setup: &Setup, service: &str) -> (Host, PathBuf) {
    let data = setup.dir.path().join(format!("data-{service}"));
    (setup.start_in(&data, &["--only", service]), data)
}

fn category(setup: &Setup, name: &str) -> Vec<Value> {
    setup.ferry_json(&["read", name, "--limit", "100000"])["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn registers_users_with_a_process_per_service_through_a_kill() {
    let server = NatsServer::start();
    let setup = Setup::with_store(&["user", "email", "user_aggregator"], &server.url());
    let _user = start_service(&setup, "user");
    let (email, email_data) = start_service(&setup, "email");
    let _aggregator = start_service(&setup, "user-aggregator");

    for user in 0..10 {
        register(&setup, user);
    }
    // Mid-flow: the email process dies without a chance to clean up, while commands arrive.
    wait_until(WAIT, "some welcome emails are out", || {
        !setup.emails_in(&email_data).is_empty()
    });
    email.kill();
    for user in 10..20 {
        register(&setup, user);
    }
    let _email = setup.start_in(&email_data, &["--only", "email"]);

    wait_until(WAIT, "20 welcome emails are delivered", || {
        setup.emails_in(&email_data).len() == 20
    });
    wait_until(WAIT, "20 emails are recorded as sent", || {
        category(&setup, "email").len() >= 20
    });
    wait_until(WAIT, "the users view holds 20 users", || {
        setup.ferry_json(&["view", "users", "--limit", "1000"])["rows"]
            .as_array()
            .is_some_and(|rows| rows.len() == 20)
    });
    // Settle a moment longer: nothing more may appear.
    std::thread::sleep(Duration::from_millis(500));
    let sent = category(&setup, "email");
    assert_eq!(sent.len(), 20, "one EmailSent per user: {sent:?}");
    let streams: HashSet<_> = sent.iter().map(|m| m["stream"].clone()).collect();
    assert_eq!(streams.len(), 20);
    for user in 0..20 {
        let events = setup.read(&format!("user.u{user}"));
        assert_eq!(types(&events), ["UserRegistered"], "user {user}");
    }
    assert_eq!(setup.emails_in(&email_data).len(), 20, "one file per email");

    // Who depends on whom: each service's consumer on the categories it reads.
    let consumers = setup.ferry_json(&["consumers"])["consumers"].clone();
    let pairs: HashSet<(String, String)> = consumers
        .as_array()
        .expect("consumers")
        .iter()
        .map(|c| {
            (
                c["consumer"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                c["consumer"]["category"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    for pair in [
        ("microservice:user", "user:command"),
        ("microservice:email", "email:command"),
        ("microservice:user-aggregator", "user"),
    ] {
        assert!(
            pairs.contains(&(pair.0.to_owned(), pair.1.to_owned())),
            "{pair:?} in {pairs:?}"
        );
    }
    assert!(
        consumers
            .as_array()
            .expect("consumers")
            .iter()
            .all(|c| c["lag"] == 0),
        "{consumers}"
    );
}

#[test]
fn follows_up_overdue_payments_with_a_process_per_service_through_a_kill() {
    let server = NatsServer::start();
    let setup = Setup::with_store(&["subscription", "email"], &server.url());
    let (subscription, subscription_data) = start_service(&setup, "subscription");
    let (_email, email_data) = start_service(&setup, "email");
    // Long enough for the whole flow, a restart included, before the follow-ups on a slow
    // machine; the test waits this long for the ignored one to be cancelled.
    let follow_ups_due = billing::mark_overdue(&setup, Duration::from_secs(15));
    // Killed while the follow-ups wait (deferred) and the emails go out.
    setup.wait_for_stream("subscription.opened", 1);
    subscription.kill();
    let _subscription = setup.start_in(&subscription_data, &["--only", "subscription"]);
    billing::open_one_and_pay_one(&setup, follow_ups_due);
    billing::assert_followed_up(&setup);
    wait_until(WAIT, "four emails are delivered", || {
        setup.emails_in(&email_data).len() == 4
    });
    // The email service delivers the file before it records EmailSent.
    wait_until(WAIT, "5 email events are recorded", || {
        category(&setup, "email").len() >= 5
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        category(&setup, "email").len(),
        5,
        "4 sent and 1 opened, once each"
    );
}

#[test]
fn services_go_on_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let setup = Setup::with_store(&["user", "email"], &server.url());
    let _user = start_service(&setup, "user");
    let (_email, email_data) = start_service(&setup, "email");
    register(&setup, 1);
    wait_until(WAIT, "the first email is delivered", || {
        setup.emails_in(&email_data).len() == 1
    });

    server.restart(Duration::from_secs(1));
    register(&setup, 2);
    wait_until(WAIT, "the second user is handled", || {
        setup.read("user.u2").len() == 1
    });
    wait_until(WAIT, "the second email is delivered", || {
        setup.emails_in(&email_data).len() == 2
    });
    // The email service delivers the file before it records EmailSent.
    wait_until(WAIT, "2 emails are recorded as sent", || {
        category(&setup, "email").len() >= 2
    });
    for user in [1, 2] {
        assert_eq!(
            types(&setup.read(&format!("user.u{user}"))),
            ["UserRegistered"]
        );
    }
    assert_eq!(category(&setup, "email").len(), 2, "one EmailSent each");
}
