//! Several instances of one service on one JetStream namespace, each a real `ferry run` process:
//! they share the partitions of its consumers, hand them over when one comes, goes, dies or
//! stalls, and every command is still handled exactly once, in order per entity, with the fence
//! holding in the leases' and positions' history.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::leases::LeaseHistory;
use support::nats::NatsServer;
use support::{Host, Setup, SteadySender, wait_until};

/// Many entities, so that a third of the partitions is about a third of the load.
const ENTITIES: usize = 90;
/// Short, so that a killed instance's share moves within a test's patience.
const LEASE_TTL_MS: u64 = 2000;
const COMMANDS: &str = "counter:command";

struct Cluster {
    setup: Arc<Setup>,
    history: LeaseHistory,
    next: usize,
    _server: NatsServer,
}

/// One `ferry run` process with its own data folder.
struct Instance {
    host: Host,
    data: PathBuf,
    name: String,
}

impl Drop for Cluster {
    /// On a failure, the end of every instance's log, to see what each was doing.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for entry in std::fs::read_dir(self.setup.dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("==== {} (last 60 lines)", path.display());
                for line in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Cluster {
    fn start() -> Self {
        let server = NatsServer::start();
        let setup = Arc::new(Setup::with_store(&["counter"], &server.url()));
        // The namespace's stream exists once a first command is stored.
        setup.send(
            "counter:command.warmup",
            "Increment",
            serde_json::json!({"by": 1}),
        );
        let history = LeaseHistory::watch(&server.url(), "ferry");
        Self {
            setup,
            history,
            next: 0,
            _server: server,
        }
    }

    fn instance(&mut self) -> Instance {
        self.instance_with_env(&[])
    }

    /// An instance started with these environment variables.
    fn instance_with_env(&mut self, env: &[(&str, &str)]) -> Instance {
        self.next += 1;
        let data = self
            .setup
            .dir
            .path()
            .join(format!("instance-{}", self.next));
        let ttl = LEASE_TTL_MS.to_string();
        let host = self
            .setup
            .start_with_env(&data, &["--lease-ttl-ms", &ttl], env);
        let mut name = None;
        wait_until(Duration::from_secs(30), "the service runs", || {
            name = self
                .services(&data)
                .first()
                .and_then(|s| s["instance"].as_str().map(str::to_owned));
            name.is_some()
        });
        let name = name.unwrap_or_default();
        Instance { host, data, name }
    }

    fn services(&self, data: &std::path::Path) -> Vec<Value> {
        let output = self
            .setup
            .command_in(data)
            .args(["--json", "services"])
            .output()
            .expect("ferry services");
        let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON");
        answer["services"].as_array().cloned().unwrap_or_default()
    }

    /// Messages this instance's process handled.
    fn handled(&self, instance: &Instance) -> u64 {
        self.services(&instance.data)[0]["handled"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The command consumer's partitions: owner of each.
    fn owners(&self) -> Vec<Option<String>> {
        let answer = self.setup.ferry_json(&["consumers", COMMANDS]);
        answer["consumers"][0]["partitions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p["owner"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until every partition is owned by one of `live` and each holds at least its fair
    /// share less one; returns how long that took.
    fn wait_balanced(&self, live: &[&Instance], what: &str) -> Duration {
        let start = Instant::now();
        wait_until(Duration::from_secs(30), what, || {
            let owners = self.owners();
            let fair = owners.len() / live.len();
            !owners.is_empty()
                && owners
                    .iter()
                    .all(|o| live.iter().any(|i| Some(&i.name) == o.as_ref()))
                && live.iter().all(|i| {
                    owners
                        .iter()
                        .filter(|o| o.as_ref() == Some(&i.name))
                        .count()
                        + 1
                        >= fair
                })
        });
        start.elapsed()
    }

    /// Stops the flow and checks that every command was handled once and in order, and that
    /// the fence held throughout.
    fn finish(&self, sender: SteadySender) -> usize {
        let commands = sender.stop();
        let start = Instant::now();
        loop {
            let consumers = self.setup.ferry_json(&["consumers", COMMANDS]);
            if consumers["consumers"][0]["lag"] == 0 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the commands consumer still lags: {consumers}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for entity in 0..ENTITIES {
            let commands = self.setup.read(&format!("counter:command.e{entity}"));
            let events = self.setup.read(&format!("counter.e{entity}"));
            if commands.len() != events.len() {
                let ids: Vec<_> = commands
                    .iter()
                    .map(|c| (c["id"].clone(), c["globalPosition"].clone()))
                    .collect();
                let causes: Vec<_> = events
                    .iter()
                    .map(|e| e["metadata"]["causationId"].clone())
                    .collect();
                let partitions = self.setup.ferry_json(&["consumers", COMMANDS]);
                panic!("e{entity}: commands {ids:?}, events caused by {causes:?}; {partitions}");
            }
        }
        support::assert_counted_once_in_order(&self.setup, commands, ENTITIES, "instances");
        assert!(self.setup.parked().is_empty(), "nothing was parked");
        commands
    }
}

#[test]
fn three_instances_share_the_commands_each_handled_once_in_order() {
    let mut cluster = Cluster::start();
    let instances = [cluster.instance(), cluster.instance(), cluster.instance()];
    cluster.wait_balanced(
        &instances.iter().collect::<Vec<_>>(),
        "three share the partitions",
    );
    let before: Vec<u64> = instances.iter().map(|i| cluster.handled(i)).collect();

    let sender = SteadySender::start(cluster.setup.clone(), ENTITIES);
    std::thread::sleep(Duration::from_secs(8));
    let commands = cluster.finish(sender);

    let shares: Vec<u64> = instances
        .iter()
        .zip(&before)
        .map(|(i, before)| cluster.handled(i) - before)
        .collect();
    let total: u64 = shares.iter().sum();
    eprintln!("{commands} commands; messages handled per instance: {shares:?}");
    for share in &shares {
        assert!(
            *share * 5 >= total,
            "each instance handles at least a fifth: {shares:?}"
        );
    }
    cluster.history.assert_fenced();
}

#[test]
fn instances_come_and_go_under_load_without_loss_or_doubling() {
    let mut cluster = Cluster::start();
    let sender = SteadySender::start(cluster.setup.clone(), ENTITIES);
    let first = cluster.instance();
    let second = cluster.instance();
    cluster.wait_balanced(&[&first, &second], "two share");

    // One joins: it takes a third.
    let third = cluster.instance();
    let joined = cluster.wait_balanced(&[&first, &second, &third], "a third joins");

    // One is killed: its share is taken once its lease runs out.
    first.host.kill();
    let killed = cluster.wait_balanced(&[&second, &third], "the killed one's share moves");
    assert!(
        killed <= Duration::from_millis(LEASE_TTL_MS + 2000),
        "taken over within the lease time: {killed:?}"
    );

    // One stalls past its lease: the other takes everything and handles on; when the stalled
    // one wakes, what it decided before is refused (the history check below) and it rejoins.
    second.host.signal("STOP");
    let stalled = cluster.wait_balanced(&[&third], "a stalled one's share moves");
    std::thread::sleep(Duration::from_secs(1));
    second.host.signal("CONT");
    cluster.wait_balanced(&[&second, &third], "the woken one rejoins");

    // One stops gracefully: it hands over at once.
    third.host.stop();
    let handed = cluster.wait_balanced(&[&second], "a stopped one hands over");
    assert!(
        handed < Duration::from_millis(LEASE_TTL_MS),
        "a graceful stop hands over without waiting out the lease: {handed:?}"
    );

    // Two more come.
    let fourth = cluster.instance();
    let fifth = cluster.instance();
    cluster.wait_balanced(&[&second, &fourth, &fifth], "two more join");
    std::thread::sleep(Duration::from_secs(2));

    let commands = cluster.finish(sender);
    let takeovers = cluster.history.assert_fenced();
    eprintln!(
        "{commands} commands, {takeovers} take-overs; join {joined:?}, kill {killed:?}, \
         stall {stalled:?}, graceful stop {handed:?} (lease {LEASE_TTL_MS} ms)"
    );
    assert!(takeovers > 0, "partitions changed hands");
}

/// Every row of the article's three user views.
fn users_views(setup: &Setup) -> Vec<Vec<Value>> {
    ["users", "users-by-username", "users-by-email"]
        .iter()
        .map(|table| {
            setup.ferry_json(&["view", table, "--limit", "100000"])["rows"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn the_users_views_are_the_same_with_three_aggregators_as_with_one() {
    const USERS: usize = 30;
    let server = NatsServer::start();
    let setup = Setup::with_store(&["user", "user_aggregator"], &server.url());
    let folder = |name: &str| setup.dir.path().join(name);
    let user = setup.start_in(&folder("user"), &["--only", "user"]);
    let ttl = LEASE_TTL_MS.to_string();
    let aggregators: Vec<Host> = (0..3)
        .map(|i| {
            setup.start_in(
                &folder(&format!("aggregator-{i}")),
                &["--only", "user-aggregator", "--lease-ttl-ms", &ttl],
            )
        })
        .collect();
    wait_until(Duration::from_secs(30), "three aggregators share", || {
        let answer = setup.ferry_json(&["consumers", "user"]);
        answer["consumers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["consumer"]["name"] == "microservice:user-aggregator")
            .flat_map(|c| c["instances"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["partitions"].as_array().is_some_and(|p| p.len() >= 10))
            .count()
            == 3
    });

    for n in 0..USERS {
        setup.send(
            &format!("user:command.u{n}"),
            "RegisterUser",
            serde_json::json!({
                "username": format!("user{n}"), "email": format!("user{n}@example.com"),
                "password": "correct horse battery staple", "firstName": "Ann", "lastName": "Lee",
            }),
        );
        if n % 4 == 0 {
            setup.send(
                &format!("user:command.u{n}"),
                "ChangeName",
                serde_json::json!({"firstName": "Renamed", "lastName": format!("{n}")}),
            );
        }
    }
    wait_until(
        Duration::from_secs(120),
        "every user is in the views",
        || {
            let views = users_views(&setup);
            views.iter().all(|rows| rows.len() == USERS)
                && setup.ferry_json(&["consumers"])["consumers"]
                    .as_array()
                    .is_some_and(|all| all.iter().all(|c| c["lag"] == 0))
        },
    );
    let three = users_views(&setup);
    for aggregator in aggregators {
        aggregator.stop();
    }
    user.stop();

    // One instance: the CLI rebuilds the views from the event history alone.
    let output = setup.ferry(&["rebuild", "users"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        users_views(&setup),
        three,
        "the same views from one instance"
    );
}

#[test]
fn a_username_is_registered_once_when_two_instances_race_for_it() {
    const PAIRS: usize = 12;
    let server = NatsServer::start();
    let setup = Setup::with_store(&["user"], &server.url());
    let ttl = LEASE_TTL_MS.to_string();
    let instances: Vec<Host> = (0..2)
        .map(|i| {
            let data = setup.dir.path().join(format!("user-{i}"));
            setup.start_in(&data, &["--only", "user", "--lease-ttl-ms", &ttl])
        })
        .collect();
    wait_until(Duration::from_secs(30), "two instances share", || {
        setup.ferry_json(&["consumers", COMMANDS])["consumers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["consumer"]["name"] == "microservice:user")
            .all(|c| c["instances"].as_array().is_some_and(|i| i.len() == 2))
    });

    // Each pair lands in one commit, so both are handled at the same moment, most often by
    // different instances, each seeing the username free.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        use ferry::store::{Commit, MessageStore, NatsStore, NewMessage, StreamAppend, StreamName};
        let store = NatsStore::connect(&server.url()).await.expect("store");
        for pair in 0..PAIRS {
            let register = |side: &str| StreamAppend {
                stream: StreamName::parse(&format!("user:command.{side}{pair}")).expect("name"),
                expected_version: None,
                messages: vec![NewMessage {
                    id: format!("register-{side}{pair}"),
                    message_type: "RegisterUser".into(),
                    data: serde_json::json!({
                        "username": format!("taken{pair}"),
                        "email": format!("{side}{pair}@example.com"),
                        "password": "pw", "firstName": "A", "lastName": "B",
                    }),
                    metadata: Default::default(),
                    not_before_ms: None,
                }],
            };
            store
                .commit(Commit {
                    appends: vec![register("a"), register("b")],
                    ..Commit::default()
                })
                .await
                .expect("both commands stored");
        }
    });
    wait_until(
        Duration::from_secs(120),
        "every registration is decided",
        || {
            (0..PAIRS).all(|pair| {
                ["a", "b"]
                    .iter()
                    .all(|side| !setup.read(&format!("user.{side}{pair}")).is_empty())
            })
        },
    );
    for pair in 0..PAIRS {
        let outcomes: Vec<String> = ["a", "b"]
            .iter()
            .map(|side| support::types(&setup.read(&format!("user.{side}{pair}"))).join(","))
            .collect();
        let registered = outcomes.iter().filter(|o| *o == "UserRegistered").count();
        assert_eq!(
            registered, 1,
            "taken{pair} is registered once: {outcomes:?}"
        );
    }
    drop(instances);
}

/// Three instances of a service that adds every command, of whichever entity, to one view row
/// it reads with `view-get`: each commit checks the row's revision as its handler read it, so
/// no instance's update is lost (without the check two instances counted 538 of 1 000).
#[test]
fn three_instances_adding_to_one_row_lose_no_update() {
    const COMMANDS: u64 = 10_000;
    let server = NatsServer::start();
    let setup = Setup::with_store(&["tally"], &server.url());
    let ttl = LEASE_TTL_MS.to_string();
    let _instances: Vec<Host> = (0..3)
        .map(|i| {
            setup.start_in(
                &setup.dir.path().join(format!("tally-{i}")),
                &["--only", "tally", "--lease-ttl-ms", &ttl],
            )
        })
        .collect();
    wait_until(Duration::from_secs(30), "three instances share", || {
        setup.ferry_json(&["consumers", "tally:command"])["consumers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["instances"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["partitions"].as_array().is_some_and(|p| p.len() >= 8))
            .count()
            == 3
    });

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        use ferry::store::{Commit, MessageStore, NatsStore, NewMessage, StreamAppend, StreamName};
        let store = NatsStore::connect(&server.url()).await.expect("connect");
        for first in (0..COMMANDS).step_by(250) {
            let appends = (first..first + 250)
                .map(|n| StreamAppend {
                    stream: StreamName::parse(&format!("tally:command.e{}", n % ENTITIES as u64))
                        .expect("stream"),
                    expected_version: None,
                    messages: vec![NewMessage {
                        id: format!("count-{n}"),
                        message_type: "Count".into(),
                        data: serde_json::json!({}),
                        metadata: serde_json::Map::new(),
                        not_before_ms: None,
                    }],
                })
                .collect();
            store
                .commit(Commit {
                    appends,
                    ..Commit::default()
                })
                .await
                .expect("commands");
        }
    });
    let started = Instant::now();
    wait_until(Duration::from_secs(600), "every command handled", || {
        setup.ferry_json(&["consumers", "tally:command"])["consumers"]
            .as_array()
            .is_some_and(|all| all.iter().all(|c| c["lag"] == 0))
    });
    println!(
        "{COMMANDS} commands counted by three instances in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let row = setup.ferry_json(&["view", "tallies", "all"]);
    assert_eq!(row["rows"][0]["row"]["value"]["count"], COMMANDS, "{row}");
    let parked = setup.ferry_json(&["parked"]);
    assert_eq!(
        parked["parked"].as_array().map(Vec::len),
        Some(0),
        "{parked}"
    );
}

/// libfaketime from Debian (scripts/test installs it): sets a process's wall clock off, its
/// monotonic clock left alone.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// An instance whose wall clock is 10 s behind the others' (libfaketime) keeps its leases: an
/// instance that joins later judges it by its heartbeats' changes on its own clock, never by the
/// time its heartbeat carries, so it takes that instance's partitions only as they are released
/// (owner, then none, then the new owner), never straight from it as from a dead one.
#[test]
fn an_instance_whose_clock_is_off_never_loses_a_lease_while_it_lives() {
    assert!(
        std::path::Path::new(FAKETIME).exists(),
        "libfaketime is installed (scripts/test installs it)"
    );
    let mut cluster = Cluster::start();
    let first = cluster.instance();
    let skewed = cluster.instance_with_env(&[
        ("LD_PRELOAD", FAKETIME),
        ("FAKETIME", "-10s"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    cluster.wait_balanced(&[&first, &skewed], "two share the partitions");
    let joining = cluster.instance();
    cluster.wait_balanced(&[&first, &skewed, &joining], "three share the partitions");
    // Rounds enough for a wrong judgement to show.
    std::thread::sleep(Duration::from_millis(3 * LEASE_TTL_MS));
    cluster.history.assert_fenced();
    let mut owners: std::collections::BTreeMap<(String, u32), Option<String>> =
        std::collections::BTreeMap::new();
    for record in cluster.history.records() {
        if record.kind != "lease" {
            continue;
        }
        let owner = record.value["owner"].as_str().map(str::to_owned);
        let key = (record.consumer.clone(), record.partition);
        if let Some(Some(last)) = owners.get(&key)
            && *last == skewed.name
            && owner.as_ref().is_some_and(|o| *o != skewed.name)
        {
            panic!(
                "a lease was taken straight from the live instance whose clock is off: {record:?}"
            );
        }
        owners.insert(key, owner);
    }
    let held = cluster
        .owners()
        .iter()
        .filter(|o| o.as_deref() == Some(skewed.name.as_str()))
        .count();
    assert!(held >= 9, "it holds its share: {held}");
}
