//! The crash test: a `ferry` host handles a steady flow of commands through a real guest while a
//! driver kills it with SIGKILL at random moments and starts it again; on the embedded sled store
//! and on a real JetStream, there also with two instances of which one is killed at a time.
//!
//! `FERRY_CRASH_SEED` replays a run (the seed is printed), `FERRY_CRASH_KILLS` sets how many kills
//! (default 20).

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::{Host, Rng, Setup, SteadySender, wait_until};

const ENTITIES: usize = 5;

#[test]
fn survives_repeated_sigkill_without_loss_or_duplicates() {
    kill_repeatedly(Setup::new(&["counter"]), 1);
}

#[test]
fn survives_repeated_sigkill_on_jetstream_without_loss_or_duplicates() {
    let server = support::nats::NatsServer::start();
    kill_repeatedly(Setup::with_store(&["counter"], &server.url()), 1);
}

#[test]
fn survives_repeated_sigkill_of_one_of_two_instances_on_jetstream() {
    let server = support::nats::NatsServer::start();
    kill_repeatedly(Setup::with_store(&["counter"], &server.url()), 2);
}

/// Runs `instances` hosts (each its own process and data folder, sharing the store) under a
/// steady flow of commands, killing one at random moments and starting it again.
fn kill_repeatedly(setup: Setup, instances: usize) {
    let mut rng = Rng::seeded("CRASH");
    let seed = rng.0;
    let kills: usize = std::env::var("FERRY_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("crash test: FERRY_CRASH_SEED={seed} FERRY_CRASH_KILLS={kills}");

    let setup = Arc::new(setup);
    let sender = SteadySender::start(setup.clone(), ENTITIES);

    let folders: Vec<PathBuf> = (0..instances)
        .map(|i| match i {
            0 => setup.data(),
            _ => setup.dir.path().join(format!("instance-{i}")),
        })
        .collect();
    // A short lease, so that a killed instance's share moves on soon.
    let extra: &[&str] = match instances {
        1 => &[],
        _ => &["--lease-ttl-ms", "1000"],
    };
    let mut hosts: Vec<Option<Host>> = folders
        .iter()
        .map(|folder| Some(setup.start_in(folder, extra)))
        .collect();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(50, 600)));
        let victim = rng.between(0, instances as u64) as usize;
        hosts[victim].take().expect("a running host").kill();
        if rng.between(0, 4) == 0 {
            // Sometimes stay down a while: commands keep arriving meanwhile.
            std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
        }
        hosts[victim] = Some(setup.start_in(&folders[victim], extra));
    }
    let commands = sender.stop();
    eprintln!("crash test: {kills} kills, {commands} commands");
    assert!(
        commands >= kills,
        "a steady flow of commands ran during the kills"
    );

    // Every command was handled exactly once, in order per entity.
    support::assert_counted_once_in_order(&setup, commands, ENTITIES, &format!("seed {seed}"));

    // Every consumer has handled everything: no partition lags.
    for category in ["counter:command", "counter"] {
        wait_until(
            Duration::from_secs(60),
            &format!("the {category} consumer is at its end"),
            || setup.ferry_json(&["consumers", category])["consumers"][0]["lag"] == 0,
        );
    }

    // The view equals a rebuild from scratch.
    let rows = |setup: &Setup| -> BTreeMap<String, Value> {
        setup.ferry_json(&["view", "totals", "--limit", "1000"])["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| {
                (
                    r["key"].as_str().unwrap_or_default().to_owned(),
                    r["row"].clone(),
                )
            })
            .collect()
    };
    wait_until(Duration::from_secs(60), "the view has every entity", || {
        rows(&setup).len() == ENTITIES
    });
    let before = rows(&setup);
    for host in hosts.into_iter().flatten() {
        host.stop();
    }
    setup.ferry_json(&["rebuild", "totals"]);
    assert_eq!(
        rows(&setup),
        before,
        "the view equals a rebuild (seed {seed})"
    );
    assert!(setup.parked().is_empty(), "nothing was parked");
}
