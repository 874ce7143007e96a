//! End to end through the `ferry` binary: real components, a real sled data folder, real
//! processes.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use support::{Setup, wait_until};

const WAIT: Duration = Duration::from_secs(60);

fn stream_of(setup: &Setup, stream: &str, count: usize) -> Vec<Value> {
    let mut events = Vec::new();
    wait_until(WAIT, &format!("{stream} holds {count} messages"), || {
        events = setup.read(stream);
        events.len() >= count
    });
    events
}

#[test]
fn handles_a_command_sent_with_the_cli() {
    let setup = Setup::new(&["counter"]);
    let _host = setup.start(&[]);
    let sent = setup.ferry_json(&[
        "send",
        "counter:command.a",
        "Increment",
        r#"{"by":2}"#,
        "--metadata",
        r#"{"originEntity":"basket.7","correlationId":"corr-1"}"#,
    ]);
    let first_command = sent["written"]["id"].as_str().expect("id").to_owned();
    let sent = setup.ferry_json(&["send", "counter:command.a", "Increment", r#"{"by":3}"#]);
    let second_command = sent["written"]["id"].as_str().expect("id").to_owned();
    let second_global = sent["written"]["globalPosition"].as_u64().expect("global");

    let events = stream_of(&setup, "counter.a", 2);
    assert_eq!(events[0]["type"], "Incremented");
    assert_eq!(events[0]["data"]["total"], 2);
    // The second decision saw the projection of the first event.
    assert_eq!(events[1]["data"]["total"], 5);
    let metadata = &events[0]["metadata"];
    assert_eq!(metadata["originEntity"], "basket.7");
    assert_eq!(metadata["correlationId"], "corr-1");
    assert_eq!(metadata["causationId"], first_command.as_str());
    assert_eq!(metadata["handledBy"], "counter", "guest metadata is merged");
    assert_eq!(
        events[1]["metadata"]["causationId"],
        second_command.as_str()
    );

    wait_until(
        WAIT,
        "the command consumer reaches the second command",
        || {
            let consumers = setup.ferry_json(&["consumers", "counter:command"]);
            consumers["consumers"][0]["position"].as_u64() == Some(second_global)
                && consumers["consumers"][0]["consumer"]["name"] == "microservice:counter"
        },
    );
    // The service's subscription to its own events keeps the totals view.
    wait_until(WAIT, "the totals view reaches 5", || {
        let out = setup.ferry(&["--json", "view", "totals", "a"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["rows"][0]["row"]["value"]["total"] == 5)
    });
    let projected = setup.ferry_json(&["project", "counter.a"]);
    assert_eq!(projected["state"]["total"], 5);
    assert_eq!(projected["version"], 2);
    assert_eq!(
        projected["snapshotVersion"],
        Value::Null,
        "a short stream is folded from its first event"
    );
}

#[test]
fn writes_events_once_when_a_command_is_redelivered() {
    let setup = Setup::new(&["counter"]);
    setup.ferry_json(&[
        "send",
        "counter:command.r",
        "Increment",
        r#"{"by":1}"#,
        "--id",
        "cmd-r",
    ]);
    let host = setup.start(&[]);
    stream_of(&setup, "counter.r", 1);
    host.stop();

    // Lose the acknowledgement: move the consumer back before the command, as a crash between
    // handling and acknowledging would on a store without atomic outcomes.
    setup.rewind_consumer("counter:command", "microservice:counter", 0);
    let host = setup.start(&[]);
    let command_global =
        setup.ferry_json(&["read", "counter:command.r"])["messages"][0]["globalPosition"]
            .as_u64()
            .expect("global");
    wait_until(WAIT, "the command is handled again", || {
        let consumers = setup.ferry_json(&["consumers", "counter:command"]);
        consumers["consumers"][0]["position"].as_u64() == Some(command_global)
    });
    host.stop();
    let events = setup.read("counter.r");
    assert_eq!(
        events.len(),
        1,
        "the redelivered command wrote nothing new: {events:?}"
    );
}

#[test]
fn a_redelivered_command_does_not_count_twice_for_the_next_one_in_its_page() {
    let setup = Setup::new(&["counter"]);
    let send = |id: &str, by: u64| {
        setup.ferry_json(&[
            "send",
            "counter:command.p",
            "Increment",
            &format!(r#"{{"by":{by}}}"#),
            "--id",
            id,
        ]);
    };
    send("cmd-p1", 1);
    let host = setup.start(&[]);
    stream_of(&setup, "counter.p", 1);
    host.stop();

    // The first command is delivered again in one page with a new one for the same entity: its
    // outcome is stored already, so the second must fold the stored event only, not a pending
    // copy of it as well.
    setup.rewind_consumer("counter:command", "microservice:counter", 0);
    send("cmd-p2", 2);
    let host = setup.start(&[]);
    let events = stream_of(&setup, "counter.p", 2);
    host.stop();
    let totals: Vec<&Value> = events.iter().map(|e| &e["data"]["total"]).collect();
    assert_eq!(
        totals,
        [1, 3],
        "each event's total counts every command once: {events:?}"
    );
}

#[test]
fn parks_faulty_guests_and_keeps_handling_others() {
    let setup = Setup::new(&["counter", "chaos"]);
    // Tight limits for chaos only; counter keeps the defaults.
    let _host = setup.start(&[
        "--service-limit",
        "chaos:timeout-ms=300",
        "--service-limit",
        "chaos:memory-mib=32",
        "--max-deliveries",
        "2",
        "--retry-base-ms",
        "10",
    ]);
    let faults = [
        ("Trap", "trapped"),
        ("Loop", "deadline of 300ms"),
        ("Grow", "past the limit of 33554432 bytes"),
        ("Fail", "permanent failure: chaos refuses"),
        ("Flaky", "gave up after 2 deliveries"),
        (
            "WriteForeign",
            "may write events only to its own category chaos",
        ),
        ("BadStream", "invalid stream name"),
        ("BadJson", "data is not valid JSON"),
        ("Huge", "2000 messages, more than the limit of 1000"),
    ];
    for (n, (fault, _)) in faults.iter().enumerate() {
        setup.ferry_json(&[
            "send",
            &format!("chaos:command.f{n}"),
            fault,
            "{}",
            "--id",
            fault,
        ]);
        // Healthy work between the faults is not held up by them.
        setup.ferry_json(&["send", "counter:command.ok", "Increment", r#"{"by":1}"#]);
    }
    setup.ferry_json(&["send", "chaos:command.fine", "Ok", "{}"]);

    stream_of(&setup, "chaos.fine", 1);
    stream_of(&setup, "counter.ok", faults.len());
    let mut parked = Vec::new();
    wait_until(WAIT, "every fault is parked", || {
        parked = setup.parked();
        parked.len() >= faults.len()
    });
    let reasons: BTreeMap<String, String> = parked
        .iter()
        .map(|p| {
            (
                p["message"]["id"].as_str().unwrap_or_default().to_owned(),
                p["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for (fault, expected) in faults {
        let reason = reasons
            .get(fault)
            .unwrap_or_else(|| panic!("{fault} parked"));
        assert!(
            reason.contains(expected),
            "{fault}: {reason:?} should mention {expected:?}"
        );
    }
    assert!(
        setup.read("counter.f5").is_empty(),
        "the foreign write was not made"
    );
    assert_eq!(parked.len(), faults.len(), "nothing healthy was parked");
}

#[test]
fn skips_a_parked_message_and_replays_it_once() {
    let setup = Setup::new(&["chaos"]);
    let host = setup.start(&[]);
    setup.ferry_json(&["send", "chaos:command.p", "Fail", "{}", "--id", "fails"]);
    // The entity's next command is not held up by the parked one (skip and record).
    setup.ferry_json(&["send", "chaos:command.p", "Ok", "{}"]);
    assert_eq!(setup.wait_for_stream("chaos.p", 1)[0]["type"], "Done");
    let mut parked = Vec::new();
    wait_until(WAIT, "the command is parked", || {
        parked = setup.parked();
        parked.len() == 1
    });
    assert_eq!(
        parked[0]["attempts"], 1,
        "a permanent failure is not retried"
    );
    let first_parked_at = parked[0]["parkedAtMs"].as_u64().expect("time");
    let replayed = setup.ferry_json(&["replay", "fails"]);
    assert_eq!(replayed["replayed"], 1);
    // The guest still refuses it, so it comes back to the parked place, handled once more.
    wait_until(WAIT, "the replayed command is parked again", || {
        parked = setup.parked();
        parked.len() == 1 && parked[0]["parkedAtMs"].as_u64() > Some(first_parked_at)
    });
    let second_parked_at = parked[0]["parkedAtMs"].as_u64();
    // Everything a consumer parked, at once.
    let replayed = setup.ferry_json(&[
        "replay",
        "--consumer",
        "microservice:chaos",
        "--category",
        "chaos:command",
    ]);
    assert_eq!(replayed["replayed"], 1);
    wait_until(WAIT, "parked again after the consumer's replay", || {
        parked = setup.parked();
        parked.len() == 1 && parked[0]["parkedAtMs"].as_u64() > second_parked_at
    });
    host.stop();
    assert_eq!(setup.read("chaos.p").len(), 1, "only the Ok command wrote");
    let refused = setup.ferry(&["replay", "no-such-id"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("a parked message that matches not found")
    );
}

#[test]
fn holds_back_a_message_until_its_not_before_time() {
    let setup = Setup::new(&["counter"]);
    let _host = setup.start(&[]);
    let sent = setup.ferry_json(&[
        "send",
        "counter:command.later",
        "Schedule",
        r#"{"by":7,"delayMs":1500}"#,
    ]);
    let sent_at = sent["written"]["timeMs"].as_u64().expect("time");
    let events = stream_of(&setup, "counter.later", 1);
    assert_eq!(events[0]["data"]["total"], 7);
    let handled_at = events[0]["timeMs"].as_u64().expect("time");
    assert!(
        handled_at >= sent_at + 1500,
        "handled {}ms after the schedule, before its time",
        handled_at - sent_at
    );
}

#[test]
fn refuses_bad_input_from_the_cli_and_writes_nothing() {
    let setup = Setup::new(&["counter"]);
    let cases: [(&[&str], &str); 5] = [
        (&["send", "not a stream", "X", "{}"], "invalid stream name"),
        (
            &["send", "counter:command.1", "Increment", "{not json"],
            "data is not valid JSON",
        ),
        (
            &["send", "counter:command.1", "Increment", "[1,2]"],
            "data must be a JSON object",
        ),
        (
            &[
                "send",
                "counter:command.1",
                "Increment",
                "{}",
                "--metadata",
                "7",
            ],
            "metadata must be a JSON object",
        ),
        (&["read", "bad category!"], "invalid"),
    ];
    for (args, expected) in cases {
        let output = setup.ferry(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(expected),
            "{args:?}: {stderr:?} should mention {expected:?}"
        );
    }
    // A running host refuses the same way.
    let host = setup.start(&[]);
    let output = setup.ferry(&["send", "counter:command.1", "Increment", "{oops"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("data is not valid JSON"));
    host.stop();
    assert!(
        setup.read("counter:command").is_empty(),
        "nothing was written"
    );

    // A file that is not a component, and a component that is not a Ferry service.
    let junk = setup.dir.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").expect("write");
    let output = setup.ferry(&["inspect", junk.to_str().expect("path")]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid Wasm component"));
    let other = support::guest("not_a_service");
    let output = setup.ferry(&["inspect", other.to_str().expect("path")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("does not implement the world ferry:service/service@0.1.0")
            && stderr.contains("ferry:service/handler@0.1.0"),
        "{stderr}"
    );
    let counter = support::guest("counter");
    let counter = counter.to_str().expect("path");
    let output = setup.ferry(&["inspect", counter]);
    assert!(output.status.success());
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("service:") && l.ends_with(" counter")),
        "{shown}"
    );
    assert_eq!(setup.ferry_json(&["inspect", counter])["name"], "counter");
}

#[test]
fn runs_the_good_components_beside_a_broken_one() {
    let setup = Setup::new(&["counter"]);
    std::fs::write(
        setup.services().join("broken.wasm"),
        b"\0asm\x0d\0\x01\0garbage",
    )
    .expect("write");
    // A second copy of a service: only one may consume counter:command.
    std::fs::copy(
        support::guest("counter"),
        setup.services().join("zz-counter-copy.wasm"),
    )
    .expect("copy");
    let host = setup.start(&[]);
    setup.ferry_json(&["send", "counter:command.b", "Increment", r#"{"by":1}"#]);
    stream_of(&setup, "counter.b", 1);
    let log = host.log_text();
    assert!(
        log.contains("broken.wasm") && log.contains("not a valid Wasm component"),
        "{log}"
    );
    assert!(
        log.contains("only one service may consume counter:command"),
        "{log}"
    );
}

#[test]
fn reuses_healthy_instances_and_drops_one_that_trapped() {
    let setup = Setup::new(&["counter", "chaos"]);
    // Sent while no host runs, so each consumer reads them as one batch.
    for _ in 0..5 {
        setup.ferry_json(&["send", "counter:command.r", "Increment", r#"{"by":1}"#]);
    }
    setup.ferry_json(&["send", "chaos:command.a", "Ok", "{}"]);
    setup.ferry_json(&["send", "chaos:command.b", "Trap", "{}"]);
    setup.ferry_json(&["send", "chaos:command.c", "Ok", "{}"]);
    let _host = setup.start(&["--reuse-instances"]);
    let totals: Vec<u64> = setup
        .wait_for_stream("counter.r", 5)
        .iter()
        .map(|e| e["data"]["total"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(totals, [1, 2, 3, 4, 5]);
    setup.wait_for_stream("chaos.a", 1);
    // The message after the trap ran in a new instance.
    setup.wait_for_stream("chaos.c", 1);
    let parked = setup.parked();
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("trapped")
    );
}

#[test]
fn refuses_zero_decide_lanes_and_keeps_each_entitys_order_on_one_lane() {
    let setup = Setup::new(&["counter"]);
    let refused = setup.ferry(&["run", "--decide-lanes", "0"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--decide-lanes"),
        "the error names the option"
    );
    // Sent while no host runs, so the consumer reads them as one page.
    for n in 0..12 {
        let stream = format!("counter:command.l{}", n % 4);
        setup.ferry_json(&["send", &stream, "Increment", r#"{"by":1}"#]);
    }
    let _host = setup.start(&["--decide-lanes", "1"]);
    for entity in 0..4 {
        let totals: Vec<u64> = setup
            .wait_for_stream(&format!("counter.l{entity}"), 3)
            .iter()
            .map(|e| e["data"]["total"].as_u64().unwrap_or_default())
            .collect();
        assert_eq!(totals, [1, 2, 3], "l{entity} counts in order");
    }
}

#[test]
fn every_listing_prints_a_table_and_json_with_the_flag() {
    let setup = Setup::new(&["counter"]);
    let _host = setup.start(&[]);
    setup.ferry_json(&["send", "counter:command.t", "Increment", r#"{"by":4}"#]);
    stream_of(&setup, "counter.t", 1);
    let listings: [(&[&str], &str, &str); 7] = [
        (&["read", "counter.t"], "GLOBAL", "Incremented"),
        (&["read", "counter"], "GLOBAL", "counter.t"),
        (&["consumers"], "CONSUMER", "counter:command"),
        (&["instances"], "INSTANCE", ""),
        (&["parked"], "ID", ""),
        (&["services"], "SERVICE", "counter"),
        (&["view", "totals"], "KEY", "\"total\":4"),
    ];
    for (args, first_column, shown) in listings {
        let output = setup.ferry(args);
        let table = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "ferry {args:?}");
        let header = table.lines().next().unwrap_or_default();
        assert!(
            header.starts_with(first_column)
                && header.chars().all(|c| c.is_ascii_uppercase() || c == ' '),
            "ferry {args:?} starts with a header line:\n{table}"
        );
        assert!(
            table.contains(shown),
            "ferry {args:?} shows {shown}:\n{table}"
        );
        assert!(setup.ferry_json(args).is_object(), "ferry --json {args:?}");
    }
}
