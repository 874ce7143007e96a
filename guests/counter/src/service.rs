// The counter service, shared by `counter`, `counter-next` (which differ in `HANDLED_BY`) and
// `counter-commands` (no subscription: `KEEPS_TOTALS` is false).

wit_bindgen::generate!({ world: "service", path: "../../wit" });

use exports::ferry::service::handler::Guest;
use ferry::service::types::{
    Failure, Message, Outcome, Outgoing, ServiceManifest, Subscription, ViewChange, ViewRow,
};
use serde_json::{Value, json};

struct Counter;

fn parse(text: &str) -> Result<Value, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Permanent(format!("bad JSON: {e}")))
}

fn total(state: Option<&str>) -> Result<i64, Failure> {
    Ok(match state {
        Some(text) => parse(text)?["total"].as_i64().unwrap_or(0),
        None => 0,
    })
}

fn entity_id(stream: &str) -> &str {
    stream.split_once('.').map(|(_, id)| id).unwrap_or(stream)
}

impl Guest for Counter {
    fn manifest() -> ServiceManifest {
        ServiceManifest {
            name: "counter".into(),
            handles_commands: true,
            subscriptions: if KEEPS_TOTALS {
                vec![Subscription {
                    category: "counter".into(),
                    origin_prefix: None,
                }]
            } else {
                vec![]
            },
            views: if KEEPS_TOTALS {
                vec!["totals".into()]
            } else {
                vec![]
            },
        }
    }

    fn project(state: Option<String>, event: Message) -> Result<String, Failure> {
        let mut total = total(state.as_deref())?;
        if event.message_type == "Incremented" {
            total += parse(&event.data)?["by"].as_i64().unwrap_or(0);
        }
        Ok(json!({ "total": total }).to_string())
    }

    fn handle_command(command: Message, state: Option<String>) -> Result<Outcome, Failure> {
        match command.message_type.as_str() {
            "Increment" => {
                let by = parse(&command.data)?["by"]
                    .as_i64()
                    .ok_or_else(|| Failure::Permanent("Increment needs an integer `by`".into()))?;
                let total = total(state.as_deref())? + by;
                Ok(Outcome {
                    messages: vec![Outgoing {
                        stream_name: format!("counter.{}", entity_id(&command.stream_name)),
                        message_type: "Incremented".into(),
                        data: json!({ "by": by, "total": total }).to_string(),
                        metadata: Some(json!({ "handledBy": HANDLED_BY }).to_string()),
                        not_before_ms: None,
                    }],
                    views: vec![],
                })
            }
            "Schedule" => {
                let data = parse(&command.data)?;
                let delay = data["delayMs"].as_u64().unwrap_or(0);
                Ok(Outcome {
                    messages: vec![Outgoing {
                        stream_name: command.stream_name.clone(),
                        message_type: "Increment".into(),
                        data: json!({ "by": data["by"].as_i64().unwrap_or(1) }).to_string(),
                        metadata: None,
                        not_before_ms: Some(command.time_ms + delay),
                    }],
                    views: vec![],
                })
            }
            other => Err(Failure::Permanent(format!("unknown command {other}"))),
        }
    }

    fn handle_event(event: Message, state: Option<String>) -> Result<Outcome, Failure> {
        if event.message_type != "Incremented" {
            return Ok(Outcome {
                messages: vec![],
                views: vec![],
            });
        }
        // `state` is the projection of the event's own stream, which already includes this event.
        Ok(Outcome {
            messages: vec![],
            views: vec![ViewChange::Upsert(ViewRow {
                table: "totals".into(),
                key: entity_id(&event.stream_name).into(),
                value: json!({ "total": total(state.as_deref())? }).to_string(),
            })],
        })
    }
}

export!(Counter);
