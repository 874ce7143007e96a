//! `chaos`: a service that misbehaves on request, used to prove the host survives faulty guests.
//!
//! Each command type on `chaos:command.<id>` triggers one fault; `Ok` writes `Done`.

wit_bindgen::generate!({ world: "service", path: "../../wit" });

use exports::ferry::service::handler::Guest;
use ferry::service::types::{Failure, Message, Outcome, Outgoing, ServiceManifest};

struct Chaos;

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
            views: vec![],
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
