//! `chaos`: a service that misbehaves on request, used to prove the host survives faulty guests.
//!
//! Each command type on `chaos:command.<id>` triggers one fault; `Ok` writes `Done`. `Echo`
//! returns the outcome its data describes (`messages`: stream, type, data and metadata as JSON
//! texts; `views`: table, key, value), for tests that send hostile outcomes; `Quote` logs and
//! fails quoting its data, as a careless guest would.

wit_bindgen::generate!({ world: "service", path: "../../wit" });

use exports::ferry::service::handler::Guest;
use ferry::service::host::log;
use ferry::service::types::{
    Failure, Level, Message, Outcome, Outgoing, ServiceManifest, ViewChange, ViewKey, ViewRow,
};
use serde::Deserialize;

struct Chaos;

/// What `Echo` is told to return.
#[derive(Deserialize)]
struct Told {
    #[serde(default)]
    messages: Vec<ToldMessage>,
    #[serde(default)]
    views: Vec<ToldView>,
}

#[derive(Deserialize)]
struct ToldMessage {
    stream: String,
    #[serde(rename = "type")]
    message_type: String,
    data: String,
    #[serde(default)]
    metadata: Option<String>,
}

#[derive(Deserialize)]
struct ToldView {
    table: String,
    key: String,
    /// None deletes the row.
    #[serde(default)]
    value: Option<String>,
}

fn echo(data: &str) -> Result<Outcome, Failure> {
    let told: Told = serde_json::from_str(data)
        .map_err(|e| Failure::Permanent(format!("Echo needs messages and views: {e}")))?;
    Ok(Outcome {
        messages: told
            .messages
            .into_iter()
            .map(|m| Outgoing {
                stream_name: m.stream,
                message_type: m.message_type,
                data: m.data,
                metadata: m.metadata,
                not_before_ms: None,
            })
            .collect(),
        views: told
            .views
            .into_iter()
            .map(|v| match v.value {
                Some(value) => ViewChange::Upsert(ViewRow {
                    table: v.table,
                    key: v.key,
                    value,
                }),
                None => ViewChange::Delete(ViewKey {
                    table: v.table,
                    key: v.key,
                }),
            })
            .collect(),
    })
}

fn one(stream_name: String, message_type: &str, data: &str) -> Outcome {
    Outcome {
        messages: vec![Outgoing {
            stream_name,
            message_type: message_type.into(),
            data: data.into(),
            metadata: None,
            not_before_ms: None,
        }],
        views: vec![],
    }
}

impl Guest for Chaos {
    fn manifest() -> ServiceManifest {
        ServiceManifest {
            name: "chaos".into(),
            handles_commands: true,
            subscriptions: vec![],
            views: vec!["chaos_rows".into()],
        }
    }

    fn project(_state: Option<String>, _event: Message) -> Result<String, Failure> {
        Ok("{}".into())
    }

    fn handle_command(command: Message, _state: Option<String>) -> Result<Outcome, Failure> {
        let id = command
            .stream_name
            .split_once('.')
            .map(|(_, id)| id.to_owned())
            .unwrap_or_default();
        match command.message_type.as_str() {
            "Ok" => Ok(one(format!("chaos.{id}"), "Done", "{}")),
            "Trap" => panic!("chaos was asked to trap"),
            "Loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "Grow" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 16 * 1024 * 1024]);
                    std::hint::black_box(&hog);
                }
            }
            "Huge" => Ok(Outcome {
                messages: (0..2000)
                    .map(|n| Outgoing {
                        stream_name: format!("chaos.{id}"),
                        message_type: "Spam".into(),
                        data: format!("{{\"n\":{n}}}"),
                        metadata: None,
                        not_before_ms: None,
                    })
                    .collect(),
                views: vec![],
            }),
            "Fail" => Err(Failure::Permanent("chaos refuses".into())),
            "Flaky" => Err(Failure::Transient("chaos is not ready".into())),
            "WriteForeign" => Ok(one(format!("counter.{id}"), "Incremented", "{\"by\":1}")),
            "BadStream" => Ok(one("no stream here".into(), "Done", "{}")),
            "BadJson" => Ok(one(format!("chaos.{id}"), "Done", "{not json")),
            "Echo" => echo(&command.data),
            "Quote" => {
                log(Level::Warn, &format!("chaos was given {}", command.data));
                Err(Failure::Permanent(format!(
                    "chaos cannot use {}",
                    command.data
                )))
            }
            other => Err(Failure::Permanent(format!("unknown command {other}"))),
        }
    }

    fn handle_event(_event: Message, _state: Option<String>) -> Result<Outcome, Failure> {
        Ok(Outcome {
            messages: vec![],
            views: vec![],
        })
    }
}

export!(Chaos);
