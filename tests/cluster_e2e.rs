//! Ferry on a three-server JetStream cluster with a namespace kept by all three, while servers
//! fail under load: the stream's leader killed, a follower killed, the leader paused past its
//! leadership. The article's services (each its own process) and the counter keep going after
//! each, and nothing acknowledged is lost or doubled.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::cluster::NatsCluster;
use support::{
    Sent, Setup, SteadySender, assert_counted_once_in_order, types, wait_until,
    wait_until_or_explain,
};

const WAIT: Duration = Duration::from_secs(120);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Registrations at a steady pace, ten a second: well below what the user service hashes, since
/// a backlog would hide the gap a fault leaves.
fn registrations(setup: Arc<Setup>) -> SteadySender {
    SteadySender::sending(setup, Duration::from_millis(100), |user| Sent {
        stream: format!("user:command.u{user}"),
        message_type: "RegisterUser",
        data: json!({
            "username": format!("user{user}"),
            "email": format!("user{user}@example.com"),
            "password": "correct horse battery staple",
            "firstName": "Ann", "lastName": "Lee",
        })
        .to_string(),
        id: format!("reg-{user}"),
    })
}

/// The messages of a category; an empty list while the cluster cannot answer (a read during an
/// election fails, and the caller polls again).
fn category(setup: &Setup, name: &str) -> Vec<Value> {
    let output = setup.ferry(&["--json", "read", name, "--limit", "100000"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .ok()
        .and_then(|answer| answer["messages"].as_array().cloned())
        .unwrap_or_default()
}

/// The time from a fault to the first event stored after it, less the time from the last
/// event before it: how long the flow of handled messages stood still around the fault.
fn gap_around(times: &[u64], fault_ms: u64) -> Option<u64> {
    let before = times.iter().rev().find(|t| **t < fault_ms)?;
    let after = times.iter().find(|t| **t >= fault_ms)?;
    Some(after - before)
}

/// Waits until the flow has gone on past a fault: `more` registrations handled after `since`.
fn wait_for_progress(setup: &Setup, since: u64, more: usize, what: &str) {
    wait_until(WAIT, what, || {
        category(setup, "user")
            .iter()
            .filter(|m| m["timeMs"].as_u64().is_some_and(|t| t >= since))
            .count()
            >= more
    });
}

#[test]
fn the_article_goes_on_through_a_leader_kill_a_follower_kill_and_a_paused_leader() {
    let mut cluster = NatsCluster::start(3);
    let setup = Arc::new(Setup::with_store(
        &["user", "email", "user_aggregator"],
        &cluster.url("clu", 3),
    ));
    let data = |service: &str| setup.dir.path().join(format!("data-{service}"));
    let hosts = [
        setup.start_in(&data("user"), &["--only", "user"]),
        setup.start_in(&data("email"), &["--only", "email"]),
        setup.start_in(&data("user-aggregator"), &["--only", "user-aggregator"]),
    ];
    let registrations = registrations(setup.clone());
    wait_until(WAIT, "the flow is under way", || registrations.sent() >= 5);
    wait_for_progress(&setup, 0, 3, "users are registered before the faults");

    let mut faults = Vec::new();
    // 1. The stream's leader dies.
    let leader = cluster.leader("clu");
    let at = now_ms();
    faults.push(("SIGKILL of the stream leader", at));
    cluster.servers[leader].kill();
    wait_for_progress(&setup, at, 3, "registrations go on without the old leader");
    cluster.servers[leader].start_again();
    cluster.wait_until_replicated("clu");

    // 2. A follower dies.
    let follower = (cluster.leader("clu") + 1) % 3;
    let at = now_ms();
    faults.push(("SIGKILL of a follower", at));
    cluster.servers[follower].kill();
    wait_for_progress(&setup, at, 3, "registrations go on without a follower");
    cluster.servers[follower].start_again();
    cluster.wait_until_replicated("clu");

    // 3. The leader stalls past its leadership (a VM pause), then wakes into a new term.
    let leader = cluster.leader("clu");
    let at = now_ms();
    faults.push(("SIGSTOP of the stream leader for 8 s", at));
    cluster.servers[leader].signal("STOP");
    wait_for_progress(
        &setup,
        at,
        3,
        "registrations go on while the leader is paused",
    );
    std::thread::sleep(Duration::from_secs(8).saturating_sub(Duration::from_millis(now_ms() - at)));
    let at = now_ms();
    faults.push(("SIGCONT of the paused server", at));
    cluster.servers[leader].signal("CONT");
    cluster.wait_until_replicated("clu");
    wait_for_progress(&setup, at, 3, "registrations go on after the leader wakes");

    let users = registrations.stop();
    let emails_in = data("email");
    wait_until(WAIT, "every registration is handled", || {
        category(&setup, "user").len() >= users
    });
    wait_until_or_explain(
        WAIT,
        "every welcome email is delivered and recorded",
        || setup.emails_in(&emails_in).len() >= users && category(&setup, "email").len() >= users,
        || {
            let consumers = setup.ferry(&["consumers"]);
            let parked = setup.ferry(&["parked"]);
            format!(
                "{users} users, {} emails in the maildir, {} EmailSent\n{}\n{}\n{}",
                setup.emails_in(&emails_in).len(),
                category(&setup, "email").len(),
                String::from_utf8_lossy(&consumers.stdout),
                String::from_utf8_lossy(&parked.stdout),
                hosts
                    .iter()
                    .map(|host| host.log_tail(40))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
    wait_until(WAIT, "the users view holds every user", || {
        setup.ferry_json(&["view", "users", "--limit", "100000"])["rows"]
            .as_array()
            .is_some_and(|rows| rows.len() == users)
    });
    std::thread::sleep(Duration::from_millis(500));

    for user in 0..users {
        assert_eq!(
            types(&setup.read(&format!("user.u{user}"))),
            ["UserRegistered"],
            "user {user} registered once"
        );
    }
    let sent = category(&setup, "email");
    assert_eq!(sent.len(), users, "one EmailSent per user");
    let streams: HashSet<_> = sent.iter().map(|m| m["stream"].clone()).collect();
    assert_eq!(streams.len(), users);
    assert_eq!(setup.emails_in(&emails_in).len(), users, "one email each");

    // The views the aggregator kept through the faults are what a rebuild derives again.
    let view =
        |table: &str| setup.ferry_json(&["view", table, "--limit", "100000"])["rows"].clone();
    let kept: Vec<Value> = ["users", "users-by-username", "users-by-email"]
        .iter()
        .map(|table| view(table))
        .collect();
    for host in hosts {
        host.stop();
    }
    let output = setup.ferry(&["rebuild", "users"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (table, before) in ["users", "users-by-username", "users-by-email"]
        .iter()
        .zip(&kept)
    {
        assert_eq!(&view(table), before, "{table} equals its rebuild");
    }

    let times: Vec<u64> = category(&setup, "user")
        .iter()
        .filter_map(|m| m["timeMs"].as_u64())
        .collect();
    eprintln!("| fault | handled registrations stood still for |");
    eprintln!("|---|---|");
    for (fault, at) in &faults {
        let gap = gap_around(&times, *at).expect("events around the fault");
        eprintln!("| {fault} | {:.2} s |", gap as f64 / 1000.0);
    }
}

#[test]
fn counts_once_in_order_while_the_leader_is_killed_three_times_and_instances_die() {
    let mut cluster = NatsCluster::start(3);
    let setup = Arc::new(Setup::with_store(
        &["counter_commands"],
        &cluster.url("clu", 3),
    ));
    let data = |n: usize| setup.dir.path().join(format!("data-{n}"));
    let short_lease = ["--lease-ttl-ms", "2000"];
    let mut first = Some(setup.start_in(&data(0), &short_lease));
    let _second = setup.start_in(&data(1), &short_lease);
    let entities = 8;
    let sender = SteadySender::start(setup.clone(), entities);
    let started = Instant::now();
    for round in 0..3 {
        std::thread::sleep(Duration::from_secs(2));
        let leader = cluster.leader("clu");
        cluster.servers[leader].kill();
        if round == 1 {
            // An instance dies with the leader: its partitions move to the other.
            if let Some(host) = first.take() {
                host.kill();
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        cluster.servers[leader].start_again();
        cluster.wait_until_replicated("clu");
    }
    let _third = setup.start_in(&data(2), &short_lease);
    std::thread::sleep(Duration::from_secs(2));
    let commands = sender.stop();
    assert!(
        commands > 0,
        "commands were stored in {:?}",
        started.elapsed()
    );
    assert_counted_once_in_order(&setup, commands, entities, "leader killed three times");
}

#[test]
fn ferry_replicas_changes_how_many_servers_keep_a_namespace() {
    let cluster = NatsCluster::start(3);
    let one = Setup::with_store(&[], &cluster.url("clu", 1));
    one.send(
        "user:command.1",
        "RegisterUser",
        json!({ "username": "ann" }),
    );
    let three = Setup::with_store(&[], &cluster.url("clu", 3));
    let refused = three.ferry(&["read", "user:command.1"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains("ferry replicas 3"), "{said}");

    let answer = three.ferry_json(&["replicas", "3"]);
    assert_eq!(answer["before"], 1);
    assert_eq!(answer["replicas"], 3);
    cluster.wait_until_replicated("clu");
    assert_eq!(types(&three.read("user:command.1")), ["RegisterUser"]);

    let embedded = Setup::new(&[]);
    let refused = embedded.ferry(&["replicas", "3"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        said.contains("replicas are for a JetStream namespace"),
        "{said}"
    );
}
