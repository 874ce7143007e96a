//! The article's registration flow with services written in other languages swapped in for
//! their Rust counterparts: the email service in JavaScript (componentize-js) and the users
//! aggregator in Python (componentize-py), beside the Rust user service, on one host.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Setup, polyglot, wait_until};

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn registers_a_user_with_the_javascript_email_and_the_python_aggregator() {
    let setup = Setup::new(&["user"]);
    setup.install_file(&polyglot("email_js"), "email.wasm");
    setup.install_file(&polyglot("user_aggregator_py"), "user_aggregator.wasm");
    let _host = setup.start(&[]);
    let services = setup.ferry_json(&["services"])["services"].clone();
    assert_eq!(
        services.as_array().map(Vec::len),
        Some(3),
        "user, email (JS), user-aggregator (Python): {services}"
    );

    let register = json!({
        "username": "ann", "email": "ann@example.com", "password": "correct horse battery staple",
        "firstName": "Ann", "lastName": "Lee",
    });
    setup.ferry_json(&[
        "send",
        "user:command.u1",
        "RegisterUser",
        &register.to_string(),
    ]);
    let events = setup.wait_for_stream("user.u1", 1);
    assert_eq!(events[0]["type"], "UserRegistered");

    // The JavaScript email service: one file, one EmailSent with the origin.
    wait_until(WAIT, "the welcome email is delivered", || {
        setup.emails().len() == 1
    });
    let (file, text) = &setup.emails()[0];
    assert!(text.contains("To: ann@example.com"), "{text}");
    let email_id = file.strip_suffix(".eml").expect("eml");
    let sent = setup.wait_for_stream(&format!("email.{email_id}"), 1);
    assert_eq!(sent[0]["type"], "EmailSent");
    assert_eq!(sent[0]["metadata"]["originEntity"], "user.u1");
    // Sent once, even when the command comes again.
    let command = setup.read(&format!("email:command.{email_id}"));
    assert_eq!(command.len(), 1);

    // The Python aggregator: the three views, with lastUpdateSeq.
    setup.wait_for_registered_ann(WAIT, &events[0]);

    setup.ferry_json(&[
        "send",
        "user:command.u1",
        "ChangeName",
        r#"{"firstName": "Annie", "lastName": "Lee"}"#,
    ]);
    wait_until(WAIT, "the view shows the new name", || {
        setup
            .view_row("users", "u1")
            .is_some_and(|row| row["value"]["firstName"] == "Annie")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(setup.emails().len(), 1, "no second email");
    assert!(
        setup.parked().is_empty(),
        "nothing parked: {:?}",
        setup.parked()
    );
}
