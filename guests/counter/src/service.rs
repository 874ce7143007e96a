// The counter service, shared by `counter`, `counter-next` (which differ in `HANDLED_BY`) and
// `counter-commands` (no subscription: `KEEPS_TOTALS` is false).

wit_bindgen::generate!({ world: "service", path: "../../wit" });

use exports::ferry::service::handler::Guest;
use ferry::service::types::{
    Failure, Message, Outcome, Outgoing, ServiceManifest, Subscription, ViewChange, ViewRow,
};
use serde::{Deserialize, Serialize};

struct Counter;

// Message data and state are read into typed structs rather than `serde_json::Value`: fields the
// counter does not read are skipped, not allocated (the guest's share of a reused call fell from
// about half to about a third in a profile).

/// The projected state.
#[derive(Deserialize, Serialize)]
struct Total {
    #[serde(default)]
    total: i64,
}

#[derive(Deserialize, Serialize)]
struct Increment {
    by: i64,
}

#[derive(Deserialize)]
struct Incremented {
    #[serde(default)]
    by: i64,
}

#[derive(Serialize)]
struct IncrementedData {
    by: i64,
    total: i64,
}

#[derive(Deserialize)]
struct ScheduleData {
    #[serde(default = "one")]
    by: i64,
    #[serde(default, rename = "delayMs")]
    delay_ms: u64,
}

fn one() -> i64 {
    1
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, Failure> {
    serde_json::from_str(text).map_err(|e| Failure::Permanent(format!("bad JSON: {e}")))
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn total(state: Option<&str>) -> Result<i64, Failure> {
    Ok(match state {
        Some(text) => parse::<Total>(text)?.total,
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
            total += parse::<Incremented>(&event.data)?.by;
        }
        Ok(to_json(&Total { total }))
    }

    fn handle_command(command: Message, state: Option<String>) -> Result<Outcome, Failure> {
        match command.message_type.as_str() {
            "Increment" => {
                let Increment { by } = serde_json::from_str(&command.data).map_err(|e| {
                    Failure::Permanent(format!("Increment needs an integer `by`: {e}"))
                })?;
                let total = total(state.as_deref())? + by;
                Ok(Outcome {
                    messages: vec![Outgoing {
                        stream_name: format!("counter.{}", entity_id(&command.stream_name)),
                        message_type: "Incremented".into(),
                        data: to_json(&IncrementedData { by, total }),
                        metadata: Some(format!(r#"{{"handledBy":"{HANDLED_BY}"}}"#)),
                        not_before_ms: None,
                    }],
                    views: vec![],
                })
            }
            "Schedule" => {
                let ScheduleData { by, delay_ms } = parse(&command.data)?;
                Ok(Outcome {
                    messages: vec![Outgoing {
                        stream_name: command.stream_name.clone(),
                        message_type: "Increment".into(),
                        data: to_json(&Increment { by }),
                        metadata: None,
                        not_before_ms: Some(command.time_ms + delay_ms),
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
                value: to_json(&Total {
                    total: total(state.as_deref())?,
                }),
            })],
        })
    }
}

export!(Counter);
