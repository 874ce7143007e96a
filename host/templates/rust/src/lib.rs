//! The {{name}} service. It owns the streams `{{name}}.<id>` and the commands on
//! `{{name}}:command.<id>`:
//!
//! - `Add { amount }` → `Added { amount, total }` on the entity's stream, the total folded from
//!   its earlier events by `project`;
//! - every `Added` event keeps the entity's total in the view `{{name}}-totals`.
//!
//! A handler only decides: it returns the messages to write and the view rows to change, and the
//! host writes them in one commit with the handled message's position.

wit_bindgen::generate!({ world: "service", path: "wit" });

use exports::ferry::service::handler::Guest;
use ferry::service::types::{
    Failure, Message, Outcome, Outgoing, ServiceManifest, Subscription, ViewChange, ViewRow,
};
use serde::{Deserialize, Serialize};

const NAME: &str = "{{name}}";
const TOTALS: &str = "{{name}}-totals";

/// One entity's state, folded from its events.
#[derive(Default, Deserialize, Serialize)]
struct State {
    total: i64,
}

#[derive(Deserialize)]
struct Add {
    amount: i64,
}

#[derive(Deserialize, Serialize)]
struct Added {
    amount: i64,
    total: i64,
}

fn parse<T: for<'a> Deserialize<'a>>(text: &str, what: &str) -> Result<T, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Permanent(format!("{what}: {e}")))
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn state_of(text: Option<&str>) -> Result<State, Failure> {
    text.map_or(Ok(State::default()), |text| parse(text, "state"))
}

/// The part of a stream name after the first `.`: the entity.
fn entity(stream: &str) -> &str {
    stream.split_once('.').map_or("", |(_, id)| id)
}

struct Service;

impl Guest for Service {
    fn manifest() -> ServiceManifest {
        ServiceManifest {
            name: NAME.into(),
            handles_commands: true,
            subscriptions: vec![Subscription {
                category: NAME.into(),
                origin_prefix: None,
            }],
            views: vec![TOTALS.into()],
        }
    }

    fn project(state: Option<String>, event: Message) -> Result<String, Failure> {
        let mut state = state_of(state.as_deref())?;
        if event.message_type == "Added" {
            state.total = parse::<Added>(&event.data, "Added")?.total;
        }
        Ok(to_json(&state))
    }

    fn handle_command(command: Message, state: Option<String>) -> Result<Outcome, Failure> {
        match command.message_type.as_str() {
            "Add" => {
                let Add { amount } = parse(&command.data, "Add needs an integer `amount`")?;
                let total = state_of(state.as_deref())?.total + amount;
                Ok(Outcome {
                    messages: vec![Outgoing {
                        stream_name: format!("{NAME}.{}", entity(&command.stream_name)),
                        message_type: "Added".into(),
                        data: to_json(&Added { amount, total }),
                        metadata: None,
                        not_before_ms: None,
                    }],
                    views: vec![],
                })
            }
            other => Err(Failure::Permanent(format!("unknown command {other}"))),
        }
    }

    fn handle_event(event: Message, _state: Option<String>) -> Result<Outcome, Failure> {
        if event.message_type != "Added" {
            return Ok(Outcome {
                messages: vec![],
                views: vec![],
            });
        }
        let Added { total, .. } = parse(&event.data, "Added")?;
        Ok(Outcome {
            messages: vec![],
            views: vec![ViewChange::Upsert(ViewRow {
                table: TOTALS.into(),
                key: entity(&event.stream_name).into(),
                value: to_json(&State { total }),
            })],
        })
    }
}

export!(Service);
