//! Hot reload: components dropped into, over and out of the services folder of a running host.
//! `counter` and `counter-next` are two versions of one service; their events say which one
//! handled the command (`handledBy`).

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::{Setup, SteadySender, guest, wait_until};

const WAIT: Duration = Duration::from_secs(60);

fn hash_of(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("component");
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Puts bytes into the services folder the way a deploy should: written beside, then renamed.
fn drop_in(setup: &Setup, file: &str, bytes: &[u8]) {
    let staging = setup.dir.path().join(format!("{file}.part"));
    std::fs::write(&staging, bytes).expect("write");
    std::fs::rename(&staging, setup.services().join(file)).expect("rename");
}

fn drop_guest(setup: &Setup, file: &str, name: &str) -> String {
    let bytes = std::fs::read(guest(name)).expect("guest");
    drop_in(setup, file, &bytes);
    hash_of(&guest(name))
}

fn services(setup: &Setup) -> Vec<Value> {
    setup.ferry_json(&["services"])["services"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn wait_for_version(setup: &Setup, version: &str) {
    wait_until(WAIT, &format!("version {} runs", &version[..12]), || {
        services(setup)
            .iter()
            .any(|s| s["name"] == "counter" && s["version"] == version)
    });
}

fn send(setup: &Setup, id: &str, entity: usize) -> bool {
    let stream = format!("counter:command.e{entity}");
    setup
        .ferry(&["send", &stream, "Increment", r#"{"by":1}"#, "--id", id])
        .status
        .success()
}

fn handled_by(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            e["metadata"]["handledBy"]
                .as_str()
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

/// Waits until the latest counter event was written by `version` (its `handledBy`).
fn wait_for_handled_by(setup: &Setup, version: &str) {
    wait_until(WAIT, &format!("{version} handles a command"), || {
        let all = setup.ferry_json(&["read", "counter", "--limit", "100000"])["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        handled_by(&all).last().is_some_and(|last| last == version)
    });
}

#[test]
fn replaces_a_service_under_load_with_every_message_handled_once() {
    let setup = Arc::new(Setup::new(&["counter"]));
    let host = setup.start(&[]);
    let first = hash_of(&setup.services().join("counter.wasm"));
    wait_for_version(&setup, &first);

    let sender = SteadySender::start(setup.clone(), 3);
    let position = |setup: &Setup| -> u64 {
        setup.ferry_json(&["consumers", "counter:command"])["consumers"][0]["position"]
            .as_u64()
            .unwrap_or(0)
    };
    let mut positions = vec![position(&setup)];
    let mut since = Vec::new();
    // Each version must handle some commands before it is replaced, or its run is missing below.
    let mut running = "counter".to_owned();
    for version in ["counter_next", "counter", "counter_next", "counter"] {
        wait_for_handled_by(&setup, &running);
        let hash = drop_guest(&setup, "counter.wasm", version);
        wait_for_version(&setup, &hash);
        since.push(services(&setup)[0]["sinceMs"].as_u64().unwrap_or(0));
        positions.push(position(&setup));
        // What its events say in `handledBy`: `counter_next.wasm` is `counter-next`.
        running = version.replace('_', "-");
    }
    wait_for_handled_by(&setup, &running);
    let commands = sender.stop();
    positions.push(position(&setup));
    assert!(
        positions.windows(2).all(|w| w[0] <= w[1]),
        "the consumer never moves backwards: {positions:?}"
    );
    assert!(
        since.windows(2).all(|w| w[0] < w[1]),
        "each version runs since its swap"
    );

    // Every command handled once.
    let mut causes = HashSet::new();
    for entity in 0..3 {
        let expected = (0..commands).filter(|n| n % 3 == entity).count();
        let events = setup.wait_for_stream(&format!("counter.e{entity}"), expected);
        assert_eq!(events.len(), expected, "e{entity}: one event per command");
        for event in &events {
            assert!(causes.insert(event["metadata"]["causationId"].clone()));
        }
    }
    // In the order they were handled, the versions take turns: every message before a swap on
    // the old version, every message after it on the new one.
    let all = setup.ferry_json(&["read", "counter", "--limit", "100000"])["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut runs = handled_by(&all);
    runs.dedup();
    assert_eq!(
        runs,
        [
            "counter",
            "counter-next",
            "counter",
            "counter-next",
            "counter"
        ],
        "{commands} commands"
    );
    let log = host.log_text();
    assert_eq!(log.matches("service replaced by a new version").count(), 4);
}

#[test]
fn keeps_the_running_version_when_a_bad_component_is_dropped() {
    let setup = Setup::new(&["counter"]);
    let host = setup.start(&[]);
    let running = hash_of(&setup.services().join("counter.wasm"));
    wait_for_version(&setup, &running);

    // Garbage over the working component.
    drop_in(&setup, "counter.wasm", b"\0asm this is not a component");
    wait_until(WAIT, "the broken component is refused", || {
        host.log_text()
            .contains("component refused, the version running from this path keeps running")
    });
    assert!(send(&setup, "after-garbage", 0));
    let events = setup.wait_for_stream("counter.e0", 1);
    assert_eq!(handled_by(&events), ["counter"]);

    // A second component claiming the same service: refused, the first keeps running.
    drop_guest(&setup, "another-counter.wasm", "counter_next");
    wait_until(WAIT, "the clashing component is refused", || {
        host.log_text()
            .contains("service counter is already provided by")
    });
    assert!(send(&setup, "after-clash", 0));
    let events = setup.wait_for_stream("counter.e0", 2);
    assert_eq!(handled_by(&events), ["counter", "counter"]);
    let listed = services(&setup);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["version"], running);
}

#[test]
fn resumes_from_its_position_when_deleted_and_dropped_in_again() {
    let setup = Setup::new(&["counter"]);
    let _host = setup.start(&[]);
    let version = hash_of(&setup.services().join("counter.wasm"));
    wait_for_version(&setup, &version);
    for n in 0..3 {
        assert!(send(&setup, &format!("before-{n}"), 0));
    }
    setup.wait_for_stream("counter.e0", 3);

    setup.uninstall("counter");
    wait_until(WAIT, "the service stops", || services(&setup).is_empty());
    for n in 0..3 {
        assert!(send(&setup, &format!("while-away-{n}"), 0));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        setup.read("counter.e0").len(),
        3,
        "nothing runs it meanwhile"
    );

    drop_guest(&setup, "counter.wasm", "counter");
    let events = setup.wait_for_stream("counter.e0", 6);
    let totals: Vec<_> = events.iter().map(|e| e["data"]["total"].clone()).collect();
    assert_eq!(
        totals,
        [1, 2, 3, 4, 5, 6],
        "resumed where it stopped, once each"
    );
}
