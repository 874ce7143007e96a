//! Hostile input against a real `ferry run --http`, on sled and on JetStream, as an attacker
//! sends it: an id planted for an output to come, an id used again on another stream, and
//! arbitrary or oversized stream names, ids, types, metadata, data and view keys through HTTP,
//! through `ferry send` and through a guest's outcome (the `chaos` service's `Echo`). No answer
//! is a 5xx, each hostile message is handled or parked at once (a normal command sent after it
//! to the same entity is handled within 5 s), and no output is skipped while its command is
//! acknowledged.

mod support;

use std::time::{Duration, Instant};

use ferry::store::{MessageStore, NamespaceSecret, NatsStore};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use support::http::{free_port, request, wait_for_listener};
use support::nats::NatsServer;
use support::{Host, Setup, wait_until};

const TOKEN: &str = "hostile-test-operator-token-of-32-bytes";
/// How long a normal command sent after a hostile one may take to be handled.
const NEXT_HANDLED_WITHIN: Duration = Duration::from_secs(5);

enum Backend {
    Sled,
    JetStream(NatsServer),
}

impl Backend {
    fn setup(&self, guests: &[&str]) -> Setup {
        match self {
            Self::Sled => Setup::new(guests),
            Self::JetStream(server) => Setup::with_store(guests, &server.url()),
        }
    }

    /// The namespace's secret, as the host derives ids with it (read beside the running host).
    fn secret(&self, setup: &Setup) -> NamespaceSecret {
        match self {
            Self::Sled => {
                let bytes = std::fs::read(setup.data().join("store/secret")).expect("secret");
                serde_json::from_slice(&bytes).expect("a secret")
            }
            Self::JetStream(server) => {
                tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(async {
                        let store = NatsStore::connect(&server.url()).await.expect("connect");
                        store.secret().clone()
                    })
            }
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// `ferry run` with the gateway on a free port, under the operator's token.
fn start_gateway(setup: &Setup) -> (Host, u16) {
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let host = setup.start(&["--http", &address, "--http-token", TOKEN]);
    wait_for_listener(port);
    (host, port)
}

/// A POST; a body over the gateway's limit may be refused before it is read (the connection
/// closed with no answer left): that counts as the 413 it is.
fn post(port: u16, stream: &str, body: &Value) -> (u16, Value) {
    let answer = request(
        port,
        "POST",
        &format!("/streams/{}", percent_encoded(stream)),
        Some(TOKEN),
        Some(body),
    );
    if answer.0 == 0 {
        assert!(
            body.to_string().len() > ferry::gateway::MAX_BODY_BYTES,
            "the connection was closed on a body within the limit"
        );
        return (413, json!({ "error": "closed before the body was read" }));
    }
    answer
}

/// Every byte but the unreserved ones as `%XX`, so any name reaches the gateway as it is.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The id an earlier Ferry derived for output `index` of a handled message: public knowledge,
/// so anyone could compute it before the ids were keyed.
fn unkeyed_derived_id(service: &str, handled_id: &str, index: usize) -> String {
    let namespace = uuid::Uuid::from_u128(0x6a0f_9a7e_52c4_4f0e_9c1e_2b7d_f1a3_c5e9);
    let name = [service, handled_id, &index.to_string()].join("\u{1f}");
    uuid::Uuid::new_v5(&namespace, name.as_bytes()).to_string()
}

/// Waits until the stream holds `count` messages.
fn wait_for_count(setup: &Setup, stream: &str, count: usize) -> Vec<Value> {
    let mut messages = Vec::new();
    wait_until(
        Duration::from_secs(60),
        &format!("{stream} holds {count}"),
        || {
            messages = setup.read(stream);
            messages.len() >= count
        },
    );
    messages
}

fn a_planted_id_never_drops_an_output(backend: Backend) {
    // No service yet: the commands wait, as they would behind a busy consumer.
    let setup = backend.setup(&[]);
    let (host, port) = start_gateway(&setup);

    // 1. The plant of the finding: a command under the id an unkeyed host would give the
    //    output of a command sent next.
    let victim = unique("victim");
    let planted = unkeyed_derived_id("counter", &victim, 0);
    let (status, answer) = post(
        port,
        "counter:command.planted",
        &json!({ "type": "Increment", "id": planted, "data": { "by": 1 } }),
    );
    assert_eq!(status, 202, "{answer}");
    let (status, answer) = post(
        port,
        "counter:command.victim",
        &json!({ "type": "Increment", "id": victim, "data": { "by": 5 } }),
    );
    assert_eq!(status, 202, "{answer}");

    // 2. Even with the namespace's secret (which no client has), the output's id planted on
    //    another stream parks the command that would write it, naming the conflict.
    let keyed_victim = unique("keyed-victim");
    let (status, answer) = post(
        port,
        "counter:command.keyed",
        &json!({ "type": "Increment", "id": keyed_victim, "data": { "by": 7 } }),
    );
    assert_eq!(status, 202, "{answer}");
    let global = answer["globalPosition"].as_u64().expect("global position");
    let secret = backend.secret(&setup);
    let output_id = ferry::service::derived_id(&secret, "counter", (&keyed_victim, global), &["0"]);
    assert_ne!(
        output_id,
        unkeyed_derived_id("counter", &keyed_victim, 0),
        "the derived id is keyed"
    );
    let (status, answer) = post(
        port,
        "counter:command.plant-two",
        &json!({ "type": "Increment", "id": output_id, "data": { "by": 1 } }),
    );
    assert_eq!(status, 202, "{answer}");

    setup.install("counter");
    let victim_events = wait_for_count(&setup, "counter.victim", 1);
    assert_eq!(
        victim_events[0]["data"]["by"], 5,
        "the victim's output is written"
    );
    assert_ne!(victim_events[0]["id"], planted.as_str());
    wait_for_count(&setup, "counter.planted", 1);
    wait_for_count(&setup, "counter.plant-two", 1);
    let mut parked = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "the command whose output id was taken is parked",
        || {
            parked = setup.parked();
            parked
                .iter()
                .any(|p| p["message"]["id"] == keyed_victim.as_str())
        },
    );
    let reason = parked
        .iter()
        .find(|p| p["message"]["id"] == keyed_victim.as_str())
        .and_then(|p| p["reason"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        reason.contains("already used by another stream"),
        "{reason}"
    );
    assert!(
        setup.read("counter.keyed").is_empty(),
        "nothing half-written"
    );

    // 3. An id is scoped to its stream: again on the same stream it is a duplicate, on another
    //    it is refused, and the answer says nothing of the stream that holds it.
    let reused = unique("reused");
    let body = json!({ "type": "Increment", "id": reused, "data": { "by": 1 } });
    let (status, first) = post(port, "counter:command.secret-holder", &body);
    assert_eq!(status, 202, "{first}");
    let (status, again) = post(port, "counter:command.secret-holder", &body);
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["position"], first["position"]);
    let (status, refused) = post(port, "counter:command.stranger", &body);
    assert_eq!(status, 409, "{refused}");
    let text = refused.to_string();
    assert!(
        !text.contains("secret-holder"),
        "names the other stream: {text}"
    );
    assert!(text.contains("already used"), "{text}");
    drop(host);
}

#[test]
fn a_planted_id_never_drops_an_output_on_sled() {
    a_planted_id_never_drops_an_output(Backend::Sled);
}

#[test]
fn a_planted_id_never_drops_an_output_on_jetstream() {
    a_planted_id_never_drops_an_output(Backend::JetStream(NatsServer::start()));
}

/// Text an attacker would send for a name, an id, a type or a key.
fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z]{1,8}",
        "[*> .~%/\\\\\u{0}-\u{1f}]{1,12}",
        "\\PC{100,300}",
        (100usize..6000).prop_map(|n| "x".repeat(n)),
        (100usize..2000).prop_map(|n| "é".repeat(n)),
    ]
}

/// A JSON value of any shape, small or up to 600 KB.
fn hostile_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        hostile_text().prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        Just(json!(null)),
        Just(json!([1, 2, [3, { "deep": true }]])),
        (200_000usize..600_000).prop_map(|n| json!({ "blob": "y".repeat(n) })),
        (8_000usize..40_000).prop_map(|n| json!({ "meta": "m".repeat(n) })),
    ]
}

fn sample<T: std::fmt::Debug>(runner: &mut TestRunner, strategy: &impl Strategy<Value = T>) -> T {
    strategy.new_tree(runner).expect("a sample").current()
}

/// Sends a normal command to `entity` and waits until it is handled: proof that the category
/// is not stuck behind whatever was sent to the entity before.
fn next_command_is_handled(setup: &Setup, port: u16, entity: &str, after: &str) {
    let id = unique("normal");
    let (status, answer) = post(
        port,
        &format!("chaos:command.{entity}"),
        &json!({ "type": "Ok", "id": id, "data": {} }),
    );
    assert_eq!(status, 202, "after {after}: {answer}");
    let started = Instant::now();
    loop {
        let handled = setup
            .read(&format!("chaos.{entity}"))
            .iter()
            .any(|m| m["metadata"]["causationId"] == id.as_str());
        if handled {
            return;
        }
        assert!(
            started.elapsed() < NEXT_HANDLED_WITHIN,
            "a normal command was not handled within {NEXT_HANDLED_WITHIN:?} after {after}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hostile_input_is_refused_or_parked_and_never_stops_the_namespace(backend: Backend) {
    let setup = backend.setup(&["chaos", "user", "user_aggregator"]);
    let (host, port) = start_gateway(&setup);
    let mut runner = TestRunner::deterministic();

    // Through HTTP: any stream, id, type, metadata and data.
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..30 {
        let stream = match case % 3 {
            0 => format!("chaos:command.{}", sample(&mut runner, &hostile_text())),
            1 => sample(&mut runner, &hostile_text()),
            _ => "chaos:command.http".to_owned(),
        };
        let mut body = json!({
            "type": if case % 4 == 0 { "Ok".to_owned() } else { sample(&mut runner, &hostile_text()) },
            "data": match sample(&mut runner, &hostile_json()) {
                Value::Object(map) => Value::Object(map),
                other => json!({ "value": other }),
            },
        });
        if case % 2 == 0 {
            body["id"] = Value::String(sample(&mut runner, &hostile_text()));
        }
        if case % 5 == 0 {
            body["metadata"] = json!({ "correlationId": sample(&mut runner, &hostile_json()) });
        }
        let (status, answer) = post(port, &stream, &body);
        let shown: String = answer.to_string().chars().take(200).collect();
        assert!(status < 500, "HTTP case {case}: {status} {shown}");
        match status {
            202 => accepted += 1,
            _ => refused += 1,
        }
        if status >= 400 {
            assert!(
                answer["error"].as_str().is_some_and(|e| !e.is_empty()),
                "HTTP case {case}: a refusal says why: {shown}"
            );
        }
        next_command_is_handled(&setup, port, "http", &format!("HTTP case {case}"));
    }

    assert!(
        accepted > 0 && refused > 0,
        "the cases reach both sides: {accepted} accepted, {refused} refused"
    );

    // Through `ferry send`, which talks to the running host.
    for case in 0..12 {
        let text = |runner: &mut TestRunner| {
            sample(runner, &hostile_text())
                .chars()
                .filter(|c| *c != '\0')
                .collect::<String>()
        };
        let stream = format!("chaos:command.{}", text(&mut runner));
        let message_type = text(&mut runner);
        let id = text(&mut runner);
        let data = json!({ "value": sample(&mut runner, &hostile_json()) }).to_string();
        let output = setup.ferry(&["send", &stream, &message_type, &data, "--id", &id]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "CLI case {case}: {stderr}");
        if !output.status.success() {
            assert!(stderr.contains("error:"), "CLI case {case}: {stderr}");
        }
        next_command_is_handled(&setup, port, "http", &format!("CLI case {case}"));
    }

    // Through a guest's outcome: whatever `Echo` is told to write.
    for case in 0..16 {
        let entity = format!("echo{case}");
        let key = match case % 4 {
            0 => "k".repeat(5000),
            _ => sample(&mut runner, &hostile_text()),
        };
        let told = json!({
            "messages": [{
                "stream": match case % 3 {
                    0 => format!("chaos.{entity}"),
                    1 => sample(&mut runner, &hostile_text()),
                    _ => format!("chaos:command.{}", sample(&mut runner, &hostile_text())),
                },
                "type": sample(&mut runner, &hostile_text()),
                "data": match case % 2 {
                    0 => sample(&mut runner, &hostile_json()).to_string(),
                    _ => json!({ "value": sample(&mut runner, &hostile_json()) }).to_string(),
                },
                "metadata": (case % 3 == 0)
                    .then(|| json!({ "x": sample(&mut runner, &hostile_json()) }).to_string()),
            }],
            "views": [{
                "table": if case % 5 == 0 { "undeclared".to_owned() } else { "chaos_rows".to_owned() },
                "key": key,
                "value": sample(&mut runner, &hostile_json()).to_string(),
            }],
        });
        let (status, answer) = post(
            port,
            &format!("chaos:command.{entity}"),
            &json!({ "type": "Echo", "data": told }),
        );
        assert!(status < 500, "outcome case {case}: {status} {answer}");
        next_command_is_handled(&setup, port, &entity, &format!("outcome case {case}"));
    }

    let parked = setup.parked();
    let outcomes_parked = parked
        .iter()
        .filter(|p| {
            p["reason"]
                .as_str()
                .is_some_and(|r| r.contains("invalid outcome"))
        })
        .count();
    assert!(
        outcomes_parked > 0,
        "hostile outcomes are parked: {parked:?}"
    );

    // The finding on JetStream: a registration with a 5 000-character username, whose view
    // row key no subject could hold, then a normal one, which reaches its view at once.
    let long = "n".repeat(5000);
    let (status, answer) = post(
        port,
        "user:command.long-name",
        &json!({ "type": "RegisterUser", "data": {
            "username": long, "email": "long@example.com", "password": "pw-long-1",
            "firstName": "Long", "lastName": "Name",
        }}),
    );
    assert!(status < 500, "{answer}");
    let (status, answer) = post(
        port,
        "user:command.after-long",
        &json!({ "type": "RegisterUser", "data": {
            "username": "afterlong", "email": "afterlong@example.com", "password": "pw-2",
            "firstName": "After", "lastName": "Long",
        }}),
    );
    assert_eq!(status, 202, "{answer}");
    wait_until(
        Duration::from_secs(20),
        "the normal registration reaches its view",
        || setup.view_row("users-by-username", "afterlong").is_some(),
    );
    let parked = setup.parked();
    let long_row = parked
        .iter()
        .find(|p| {
            p["consumer"]["category"] == "user" && p["message"]["data"]["username"] == long.as_str()
        })
        .unwrap_or_else(|| panic!("the aggregator parks the long username's event: {parked:?}"));
    let reason = long_row["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("limit of 512"), "{reason}");

    // Nothing was lost on the way, and the gateway still answers at once.
    let started = Instant::now();
    let (status, _) = request(port, "GET", "/health", None, None);
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    let log = host.log_text();
    assert!(!log.contains("panicked"), "{}", host.log_tail(40));
    let retries = log.matches("retrying in 1s").count();
    assert!(retries == 0, "store errors retried: {}", host.log_tail(40));
}

#[test]
fn hostile_input_is_refused_or_parked_and_never_stops_the_namespace_on_sled() {
    hostile_input_is_refused_or_parked_and_never_stops_the_namespace(Backend::Sled);
}

#[test]
fn hostile_input_is_refused_or_parked_and_never_stops_the_namespace_on_jetstream() {
    hostile_input_is_refused_or_parked_and_never_stops_the_namespace(Backend::JetStream(
        NatsServer::start(),
    ));
}
