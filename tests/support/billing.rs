//! The article's billing flow, shared by the sled and JetStream suites: three overdue payments;
//! the email of one is opened (a discount follows), one is ignored (the subscription is
//! cancelled), one is paid before its follow-up (nothing follows).

use std::time::Duration;

use serde_json::json;

use super::{Setup, types, wait_until};

const WAIT: Duration = Duration::from_secs(90);

const ACCOUNTS: [&str; 3] = ["opened", "ignored", "paid"];

/// Marks the three payments overdue, each followed up after `follow_up_ms`.
pub fn mark_overdue(setup: &Setup, follow_up_ms: u64) {
    for id in ACCOUNTS {
        setup.send(
            &format!("subscription:command.{id}"),
            "MarkPaymentOverdue",
            json!({"email": format!("{id}@example.com"), "followUpAfterMs": follow_up_ms}),
        );
    }
}

/// Once every notification is sent: opens the first email and pays the third.
pub fn open_one_and_pay_one(setup: &Setup) {
    for id in ACCOUNTS {
        setup.wait_for_stream(&format!("subscription.{id}"), 2);
    }
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
