//! The article's userSubscription service. It owns `subscription` and `subscription:command`.
//!
//! - `MarkPaymentOverdue { email, followUpAfterMs? }` → `PaymentOverdue`, a `SendEmail` to the
//!   email service with `originEntity: subscription.<id>`, and a `FollowUpOverdue` command to
//!   itself, not before `followUpAfterMs` (default three days) later.
//! - It follows the `email` category, filtered to origin entities `subscription.`: `EmailSent` →
//!   `PaymentOverdueNotificationSent`, `EmailOpened` → `PaymentOverdueNotificationOpened`, on the
//!   subscription stream the origin names.
//! - `RecordPayment` → `PaymentReceived`.
//! - `FollowUpOverdue`: paid → nothing; notification opened and unpaid → a second email with a
//!   discount (`DiscountOffered`); never opened → `SubscriptionCancelled`.

use ferry_sdk::{Manifest, Message, Outcome, Result, Service, host, json, permanent, write};
use serde::{Deserialize, Serialize};

const THREE_DAYS_MS: u64 = 3 * 24 * 60 * 60 * 1000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MarkPaymentOverdue {
    email: String,
    #[serde(default)]
    follow_up_after_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionState {
    email: String,
    overdue: bool,
    notification_sent: bool,
    notification_opened: bool,
    paid: bool,
    discount_offered: bool,
    cancelled: bool,
}

fn timestamp_of(message: &Message) -> u64 {
    message.time_ms
}

struct SubscriptionService;

impl SubscriptionService {
    fn send_email(
        id_name: &str,
        subscription_id: &str,
        to: &str,
        subject: &str,
        body: &str,
    ) -> ferry_sdk::Write {
        let email_id = host::new_id(id_name);
        write(
            format!("email:command.{email_id}"),
            "SendEmail",
            &json!({
                "id": email_id,
                "from": "billing@ferry.local",
                "to": to,
                "subject": subject,
                "body": body,
            }),
        )
        .metadata(json!({ "originEntity": format!("subscription.{subscription_id}") }))
    }
}

impl Service for SubscriptionService {
    type State = SubscriptionState;

    fn manifest() -> Manifest {
        Manifest::new("subscription")
            .handles_commands()
            .subscribe_origin("email", "subscription.")
    }

    fn project(mut state: SubscriptionState, event: &Message) -> Result<SubscriptionState> {
        match event.message_type.as_str() {
            "PaymentOverdue" => {
                state.overdue = true;
                state.paid = false;
                state.email = event.data["email"].as_str().unwrap_or_default().to_owned();
            }
            "PaymentOverdueNotificationSent" => state.notification_sent = true,
            "PaymentOverdueNotificationOpened" => state.notification_opened = true,
            "PaymentReceived" => {
                state.paid = true;
                state.overdue = false;
            }
            "DiscountOffered" => state.discount_offered = true,
            "SubscriptionCancelled" => state.cancelled = true,
            _ => {}
        }
        Ok(state)
    }

    fn handle_command(command: &Message, state: Option<SubscriptionState>) -> Result<Outcome> {
        let state = state.unwrap_or_default();
        let id = command.entity_id().to_owned();
        let stream = format!("subscription.{id}");
        let stamp = json!({ "subscriptionId": id, "timestamp": timestamp_of(command) });
        match command.message_type.as_str() {
            "MarkPaymentOverdue" => {
                if state.overdue || state.cancelled {
                    return Ok(Outcome::none());
                }
                let overdue: MarkPaymentOverdue = command.data()?;
                let follow_up =
                    command.time_ms + overdue.follow_up_after_ms.unwrap_or(THREE_DAYS_MS);
                Ok(Outcome::none()
                    .with(write(
                        stream,
                        "PaymentOverdue",
                        &json!({ "subscriptionId": id, "email": overdue.email, "timestamp": command.time_ms }),
                    ))
                    .with(Self::send_email(
                        "overdue-email",
                        &id,
                        &overdue.email,
                        "Your subscription",
                        "We noticed that your payment is overdue...",
                    ))
                    .with(
                        write(format!("subscription:command.{id}"), "FollowUpOverdue", &stamp)
                            .not_before(follow_up),
                    ))
            }
            "RecordPayment" => {
                if state.paid {
                    return Ok(Outcome::none());
                }
                Ok(Outcome::none().with(write(stream, "PaymentReceived", &stamp)))
            }
            "FollowUpOverdue" => {
                if state.paid || state.cancelled || !state.overdue || state.discount_offered {
                    return Ok(Outcome::none());
                }
                if state.notification_opened {
                    Ok(Outcome::none()
                        .with(write(stream, "DiscountOffered", &stamp))
                        .with(Self::send_email(
                            "discount-email",
                            &id,
                            &state.email,
                            "20% off if you renew today",
                            "Your payment is still overdue. Renew today and get 20% off.",
                        )))
                } else {
                    Ok(Outcome::none().with(write(stream, "SubscriptionCancelled", &stamp)))
                }
            }
            other => Err(permanent(format!("unknown command {other}"))),
        }
    }

    fn handle_event(event: &Message, state: Option<SubscriptionState>) -> Result<Outcome> {
        // The host projected the subscription named by the event's originEntity.
        let (Some(origin), Some(state)) = (event.origin_entity(), state) else {
            return Ok(Outcome::none());
        };
        let id = origin.split_once('.').map(|(_, id)| id).unwrap_or_default();
        let stamp = json!({ "subscriptionId": id, "timestamp": event.time_ms, "emailId": event.entity_id() });
        match event.message_type.as_str() {
            "EmailSent" if !state.notification_sent => {
                Ok(Outcome::none().with(write(origin, "PaymentOverdueNotificationSent", &stamp)))
            }
            "EmailOpened" if !state.notification_opened => {
                Ok(Outcome::none().with(write(origin, "PaymentOverdueNotificationOpened", &stamp)))
            }
            _ => Ok(Outcome::none()),
        }
    }
}

ferry_sdk::service!(SubscriptionService);
