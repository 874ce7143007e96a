//! The article's billing flow, shared by the sled and JetStream suites: three overdue payments;
//! the email of one is opened (a discount follows), one is ignored (the subscription is
//! cancelled), one is paid before its follow-up (nothing follows).

use std::time::{Duration, Instant};

use serde_json::json;

use super::{Setup, types, wait_until};

const WAIT: Duration = Duration::from_secs(90);

const ACCOUNTS: [&str; 3] = ["opened", "ignored", "paid"];

/// Marks the three payments overdue, each followed up `follow_up_after` later. Returns a time
/// before which none of the follow-ups is due.
pub fn mark_overdue(setup: &Setup, follow_up_after: Duration) -> Instant {
    // Taken before the first command is stored: each follow-up is due after the command's time.
    let follow_ups_due = Instant::now() + follow_up_after;
    let follow_up_ms = u64::try_from(follow_up_after.as_millis()).expect("a follow-up delay");
    for id in ACCOUNTS {
        setup.send(
            &format!("subscription:command.{id}"),
            "MarkPaymentOverdue",
            json!({"email": format!("{id}@example.com"), "followUpAfterMs": follow_up_ms}),
        );
    }
    follow_ups_due
}

/// Once every notification is sent: opens the first email and pays the third, and waits until
/// both are recorded. All this must happen before the follow-ups are due, or they follow up on
/// something else than the test expects.
pub fn open_one_and_pay_one(setup: &Setup, follow_ups_due: Instant) {
    for id in ACCOUNTS {
        setup.wait_for_stream(&format!("subscription.{id}"), 2);
    }
    assert_before_follow_ups(follow_ups_due, "every notification was sent");
    let email = setup.read("subscription.opened")[1]["data"]["emailId"]
        .as_str()
        .expect("email id")
        .to_owned();
    setup.send(
        &format!("email:command.{email}"),
        "RecordEmailOpened",
        json!({}),
    );
    setup.send("subscription:command.paid", "RecordPayment", json!({}));
    let holds = |stream: &str, event: &str| types(&setup.read(stream)).iter().any(|t| t == event);
    wait_until(WAIT, "the opening and the payment are recorded", || {
        holds("subscription.opened", "PaymentOverdueNotificationOpened")
            && holds("subscription.paid", "PaymentReceived")
    });
    assert_before_follow_ups(follow_ups_due, "the opening and the payment were recorded");
}

/// An overrun is the machine's slowness, not the services' fault: say so, rather than fail later
/// on events in an unexpected order.
fn assert_before_follow_ups(follow_ups_due: Instant, what: &str) {
    let now = Instant::now();
    assert!(
        now < follow_ups_due,
        "the machine was too slow: the follow-ups were due {:?} before {what}; \
         give them a longer delay",
        now - follow_ups_due
    );
}

/// Each subscription followed up by what happened to its email, and no follow-up left waiting.
pub fn assert_followed_up(setup: &Setup) {
    let opened = setup.wait_for_stream("subscription.opened", 4);
    assert_eq!(
        types(&opened),
        [
            "PaymentOverdue",
            "PaymentOverdueNotificationSent",
            "PaymentOverdueNotificationOpened",
            "DiscountOffered"
        ]
    );
    let ignored = setup.wait_for_stream("subscription.ignored", 3);
    assert_eq!(
        types(&ignored),
        [
            "PaymentOverdue",
            "PaymentOverdueNotificationSent",
            "SubscriptionCancelled"
        ]
    );
    // The follow-ups were all handled (none left deferred): the paid one changed nothing.
    wait_until(WAIT, "no follow-up is left", || {
        setup.ferry_json(&["consumers", "subscription:command"])["consumers"][0]["deferred"] == 0
    });
    assert_eq!(
        types(&setup.read("subscription.paid")),
        [
            "PaymentOverdue",
            "PaymentOverdueNotificationSent",
            "PaymentReceived"
        ]
    );
}
