//! A follower that lags: every route between one member of a three-server cluster and the
//! others goes through a proxy that delays it (`support::delay`, as `tc netem delay` would), so
//! that member hears of each write late while it stays connected and answers the reads sent to
//! it. Two instances of the user service connect to that member only. Each user's name is
//! changed X, then Y, then X again, in waves: a decision made on a state that still shows X
//! would do nothing and leave Y. Every final name is the last one sent, nothing is parked, and
//! the consumer catches up within 10 s of the last wave.
//!
//! (Without the commit's read checks this test passed too in every run here: a consumer's own
//! writes come back to it through the partition's position record, which its next commit
//! expects at the server, so it never decided on a state older than its own last commit. The
//! read check itself is shown by `store_nats` `a_read_stream_is_checked_by_the_server_when_the_
//! batch_lands`, which fails without it.)

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry::store::{Commit, MessageStore, NatsStore, NewMessage, StreamName};
use serde_json::{Map, Value, json};
use support::cluster::NatsCluster;
use support::{Setup, wait_until_or_explain};

const USERS: usize = 100;
const NAMESPACE: &str = "lag";
/// How late the slow member hears from the others, each way.
const LINK_DELAY: Duration = Duration::from_millis(20);

fn command(user: usize, message_type: &str, data: Value) -> Commit {
    Commit::append(
        StreamName::parse(&format!("user:command.u{user}")).expect("a stream"),
        None,
        vec![NewMessage {
            id: uuid::Uuid::new_v4().to_string(),
            message_type: message_type.into(),
            data,
            metadata: Map::new(),
            not_before_ms: None,
        }],
    )
}

/// The first names a user's stream records, in order.
fn names(runtime: &tokio::runtime::Runtime, store: &NatsStore, user: usize) -> Vec<String> {
    let stream = StreamName::parse(&format!("user.u{user}")).expect("a stream");
    runtime
        .block_on(store.read_stream(&stream, 0, 1000))
        .unwrap_or_default()
        .iter()
        .filter(|m| m.message_type == "NameChanged")
        .map(|m| m.data["firstName"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn decisions_made_through_a_lagging_follower_end_as_the_commands_were_sent() {
    let cluster = NatsCluster::start_with_delayed_member(3, 2, LINK_DELAY);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // The sender and the checks talk to a member that keeps up.
    let fast = format!(
        "nats://127.0.0.1:{}/{NAMESPACE}?replicas=3",
        cluster.servers[0].port
    );
    let store = runtime
        .block_on(NatsStore::connect(&fast))
        .expect("connect");
    cluster.wait_until_replicated(NAMESPACE);
    // The slow member must be a follower: one that leads answers from the latest state.
    let client = runtime
        .block_on(async_nats::connect(format!(
            "127.0.0.1:{}",
            cluster.servers[0].port
        )))
        .expect("a client");
    let started = Instant::now();
    while cluster.leader(NAMESPACE) == 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the lead moves"
        );
        let _ = runtime.block_on(client.request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{NAMESPACE}"),
            "".into(),
        ));
        std::thread::sleep(Duration::from_secs(1));
    }

    let slow = format!(
        "nats://127.0.0.1:{}/{NAMESPACE}?replicas=3",
        cluster.servers[2].port
    );
    let setup = Setup::with_store(&["user"], &slow);
    let data = |n: usize| -> PathBuf { setup.dir.path().join(format!("instance-{n}")) };
    let instances = [setup.start_in(&data(1), &[]), setup.start_in(&data(2), &[])];
    let explain = |what: &str| {
        format!(
            "{what}\n{}\n{}\n{}",
            instances[0].log_tail(15),
            instances[1].log_tail(15),
            cluster.logs()
        )
    };

    for user in 0..USERS {
        let register = json!({
            "username": format!("user{user}"),
            "email": format!("user{user}@example.com"),
            "password": "p",
            "firstName": "A",
            "lastName": "L",
        });
        runtime
            .block_on(store.commit(command(user, "RegisterUser", register)))
            .expect("send");
    }
    wait_until_or_explain(
        Duration::from_secs(120),
        "every user is registered",
        || {
            (0..USERS).all(|user| {
                let stream = StreamName::parse(&format!("user.u{user}")).expect("a stream");
                runtime
                    .block_on(store.stream_version(&stream))
                    .is_ok_and(|v| v > 0)
            })
        },
        || explain("registrations"),
    );
    // How far the slow member falls behind a fast one, sampled all along the waves and until
    // they are handled: the fault is there, not assumed.
    let most_behind = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let sampling = || {
        while !done.load(Ordering::Relaxed) {
            let (fast, slow) = (
                cluster.member_last_sequence(0, NAMESPACE),
                cluster.member_last_sequence(2, NAMESPACE),
            );
            if let (Some(fast), Some(slow)) = (fast, slow) {
                most_behind.fetch_max(fast.saturating_sub(slow), Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let drained = std::thread::scope(|scope| {
        scope.spawn(sampling);
        let drained = waves_handled(&runtime, &store, &explain);
        done.store(true, Ordering::Relaxed);
        drained
    });
    let most_behind = most_behind.load(Ordering::Relaxed);
    for user in 0..USERS {
        assert_eq!(
            names(&runtime, &store, user),
            ["X", "Y", "X"],
            "user u{user}"
        );
    }
    let parked = setup.parked();
    assert!(parked.is_empty(), "nothing parked: {parked:?}");
    eprintln!(
        "{USERS} users: every name as sent; the slow member up to {most_behind} sequences \
         behind; the last wave handled {:.1} s after it was sent",
        drained.as_secs_f64()
    );
    assert!(most_behind > 0, "the slow member lagged");
    assert!(
        drained < Duration::from_secs(10),
        "the consumer caught up within 10 s of the last wave: {drained:?}"
    );
}

/// Sends the three waves, 100 ms apart (the slow member still hears of one when the next
/// comes), and waits until every user's name changed three times; returns how long that took
/// after the last wave was sent.
fn waves_handled(
    runtime: &tokio::runtime::Runtime,
    store: &NatsStore,
    explain: &dyn Fn(&str) -> String,
) -> Duration {
    for name in ["X", "Y", "X"] {
        for user in 0..USERS {
            let change = json!({ "firstName": name, "lastName": "L" });
            runtime
                .block_on(store.commit(command(user, "ChangeName", change)))
                .expect("send");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent = Instant::now();
    wait_until_or_explain(
        Duration::from_secs(60),
        "every user's name changed three times",
        || (0..USERS).all(|user| names(runtime, store, user).len() >= 3),
        || {
            let wrong: Vec<(usize, Vec<String>)> = (0..USERS)
                .map(|user| (user, names(runtime, store, user)))
                .filter(|(_, names)| names.len() < 3)
                .take(5)
                .collect();
            explain(&format!("users not changed three times: {wrong:?}"))
        },
    );
    sent.elapsed()
}
