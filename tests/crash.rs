//! The crash test: a `ferry` host handles a steady flow of commands through a real guest while a
//! driver kills it with SIGKILL at random moments and starts it again; on the embedded sled store
//! and on a real JetStream.
//!
//! `FERRY_CRASH_SEED` replays a run (the seed is printed), `FERRY_CRASH_KILLS` sets how many kills
//! (default 20).

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::{Setup, SteadySender, wait_until};

const ENTITIES: usize = 5;

/// xorshift64*: small, seeded, good enough to pick kill moments.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

#[test]
fn survives_repeated_sigkill_without_loss_or_duplicates() {
    kill_repeatedly(Setup::new(&["counter"]));
}

#[test]
fn survives_repeated_sigkill_on_jetstream_without_loss_or_duplicates() {
    let server = support::nats::NatsServer::start();
    kill_repeatedly(Setup::with_store(&["counter"], &server.url()));
}

fn kill_repeatedly(setup: Setup) {
    let seed = std::env::var("FERRY_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        });
    let kills: usize = std::env::var("FERRY_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("crash test: FERRY_CRASH_SEED={seed} FERRY_CRASH_KILLS={kills}");
    let mut rng = Rng(seed);

    let setup = Arc::new(setup);
    let sender = SteadySender::start(setup.clone(), ENTITIES);

    let mut host = Some(setup.start(&[]));
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.between(50, 600)));
        host.take().expect("a running host").kill();
        if rng.between(0, 4) == 0 {
            // Sometimes stay down a while: commands keep arriving meanwhile.
            std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
        }
        host = Some(setup.start(&[]));
    }
    let commands = sender.stop();
    eprintln!("crash test: {kills} kills, {commands} commands");
    assert!(
        commands >= kills,
        "a steady flow of commands ran during the kills"
    );

    // Every command was handled exactly once, in order per entity.
    let mut causes = HashSet::new();
    let mut event_ids = HashSet::new();
    for entity in 0..ENTITIES {
        let expected = (0..commands).filter(|n| n % ENTITIES == entity).count();
        let events = setup.wait_for_stream(&format!("counter.e{entity}"), expected);
        assert_eq!(
            events.len(),
            expected,
            "e{entity}: one event per command (seed {seed})"
        );
        for (n, event) in events.iter().enumerate() {
            assert_eq!(
                event["data"]["total"],
                (n + 1) as u64,
                "e{entity} counts in order"
            );
            assert!(event_ids.insert(event["id"].as_str().unwrap_or_default().to_owned()));
            let cause = event["metadata"]["causationId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            assert!(
                causes.insert(cause),
                "a command was handled twice (seed {seed})"
            );
        }
    }
    assert_eq!(causes.len(), commands);

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
    host.take().expect("host").stop();
    setup.ferry_json(&["rebuild", "totals"]);
    assert_eq!(
        rows(&setup),
        before,
        "the view equals a rebuild (seed {seed})"
    );
    assert!(setup.parked().is_empty(), "nothing was parked");
}
