//! The JetStream store against a real `nats-server -js`: the conformance suite, plus what only
//! a shared, restartable server can show.

mod conformance;
mod support;

use std::sync::Arc;
use std::time::Duration;

use ferry::store::{Commit, ConsumerId, MessageStore, NatsStore, SealKey, StoreError};
use serde_json::json;
use support::nats::NatsServer;

async fn open_nats() -> (Arc<dyn MessageStore>, NatsServer) {
    let server = NatsServer::start();
    let store = NatsStore::connect(&server.url()).await.expect("connect");
    (Arc::new(store), server)
}

conformance_suite!(open_nats);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_namespaces_of_one_server_apart() {
    let server = NatsServer::start();
    let a = NatsStore::connect(&format!("{}/alpha", server.url()))
        .await
        .expect("alpha");
    let b = NatsStore::connect(&format!("{}/beta", server.url()))
        .await
        .expect("beta");
    let written = a
        .commit(Commit::append(
            conformance::stream("user.1"),
            None,
            vec![conformance::msg("u1", "UserRegistered", json!({}))],
        ))
        .await
        .expect("append")
        .written;
    assert_eq!(a.head().await.expect("head"), written[0].global_position);
    assert_eq!(b.head().await.expect("head"), 0);
    assert!(b.message("u1").await.expect("lookup").is_none());
}

/// 32 bytes that nothing else the tests store contains.
fn known_key(seed: u8) -> Vec<u8> {
    (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed) ^ 0x5A)
        .collect()
}

/// Whether any file under `folder` (the server's storage, read as it is on disk) holds `needle`.
fn files_hold(folder: &std::path::Path, needle: &[u8]) -> bool {
    let mut dirs = vec![folder.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the folder") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                return true;
            }
        }
    }
    false
}

/// Waits until the stream no longer holds the message at `seq` (the erase runs once the commit
/// that shredded it is stored).
async fn until_gone(stream: &async_nats::jetstream::stream::Stream, seq: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match stream.direct_get(seq).await {
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                return;
            }
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the key's message is still stored: {:?}",
                    other.map(|m| m.payload)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn raw_stream(server: &NatsServer) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(server.url()).await.expect("client");
    async_nats::jetstream::new(client)
        .get_stream("ferry")
        .await
        .expect("stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_keys_bytes_are_erased_from_the_servers_files() {
    let server = NatsServer::start();
    let store = NatsStore::connect(&server.url()).await.expect("connect");
    let key = known_key(1);
    store
        .commit(Commit {
            seal_keys: vec![SealKey {
                message_id: "reg-1".into(),
                key: key.clone(),
            }],
            ..Commit::append(
                conformance::stream("user:command.1"),
                None,
                vec![conformance::msg(
                    "reg-1",
                    "RegisterUser",
                    json!({"password": {"sealed": true}}),
                )],
            )
        })
        .await
        .expect("append");
    let stream = raw_stream(&server).await;
    let stored = stream
        .direct_get_last_for_subject("ferry.key.reg-1")
        .await
        .expect("the key's entry");
    assert_eq!(stored.payload.as_ref(), key.as_slice());
    // The search sees what the server stores (it syncs every write: `sync_interval: always`).
    assert!(
        files_hold(server.folder(), &key),
        "the stored key is in the server's files"
    );

    store
        .commit(Commit {
            shred: vec!["reg-1".into()],
            ..Commit::default()
        })
        .await
        .expect("shred");
    // From the commit on, the key is shredded for every reader.
    assert_eq!(store.seal_key("reg-1").await.expect("key"), None);
    let last = stream
        .direct_get_last_for_subject("ferry.key.reg-1")
        .await
        .expect("the emptied entry");
    assert!(last.payload.is_empty());
    // The marker names the key's message, for the sweep should the erase below not happen.
    let named = stored.sequence.to_string();
    assert_eq!(
        last.headers.get("Ferry-Erases").map(|v| v.as_str()),
        Some(named.as_str())
    );
    // Not only hidden behind a newer entry: the key's own message goes, and its bytes with it.
    until_gone(&stream, stored.sequence).await;
    assert!(
        !files_hold(server.folder(), &key),
        "the shredded key's bytes are still in the server's files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shredded_key_left_unerased_is_erased_by_the_next_process_that_connects() {
    let server = NatsServer::start();
    let first = NatsStore::connect(&server.url()).await.expect("connect");
    let stream = raw_stream(&server).await;
    // What a process leaves when it stops between a commit that shreds a key and the erase: the
    // key's message, and after it the commit's empty marker naming it.
    let context = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("c"));
    let key = known_key(2);
    let seq = context
        .publish("ferry.key.reg-2", key.clone().into())
        .await
        .expect("publish")
        .await
        .expect("key stored")
        .sequence;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Ferry-Erases", seq.to_string().as_str());
    context
        .publish_with_headers("ferry.key.reg-2", headers, bytes::Bytes::new())
        .await
        .expect("publish")
        .await
        .expect("marker stored");
    assert_eq!(first.seal_key("reg-2").await.expect("key"), None);
    assert!(files_hold(server.folder(), &key), "the key is left on disk");

    let _next = NatsStore::connect(&server.url()).await.expect("connect");
    until_gone(&stream, seq).await;
    assert!(
        !files_hold(server.folder(), &key),
        "the key's bytes are still in the server's files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_an_unreachable_server_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let error = NatsStore::connect(&format!("nats://127.0.0.1:{port}"))
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("cannot connect"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goes_on_after_the_server_restarts() {
    let mut server = NatsServer::start();
    let store = NatsStore::connect(&server.url()).await.expect("connect");
    let append = |id: &str| {
        Commit::append(
            conformance::stream("user.1"),
            None,
            vec![conformance::msg(id, "Noted", json!({}))],
        )
    };
    store.commit(append("before")).await.expect("append");
    server.restart(Duration::from_millis(200));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match store.commit(append("after")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "still failing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let read = store
        .read_stream(&conformance::stream("user.1"), 0, 10)
        .await
        .expect("read");
    let ids: Vec<_> = read.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["before", "after"], "kept across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakes_every_process_that_watches_a_category() {
    let server = NatsServer::start();
    // Two connections stand for two processes (two gateways, or two hosts running one service).
    let first = NatsStore::connect(&server.url()).await.expect("first");
    let second = NatsStore::connect(&server.url()).await.expect("second");
    let watcher = ConsumerId::new(conformance::category("user"), "gateway");
    let mut first_changes = first.watch(&watcher).await.expect("first watch");
    let mut second_changes = second.watch(&watcher).await.expect("second watch");
    for n in 0..3 {
        first_changes.borrow_and_update();
        second_changes.borrow_and_update();
        first
            .commit(Commit::append(
                conformance::stream("user.1"),
                None,
                vec![conformance::msg(
                    &format!("u{n}"),
                    "UserRegistered",
                    json!({}),
                )],
            ))
            .await
            .expect("append");
        for (name, changes) in [
            ("first", &mut first_changes),
            ("second", &mut second_changes),
        ] {
            tokio::time::timeout(Duration::from_secs(10), changes.changed())
                .await
                .unwrap_or_else(|_| panic!("the {name} process is woken by write {n}"))
                .expect("open");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_message_past_the_servers_limit_alone_among_commits_sent_together() {
    let (store, _server) = open_nats().await;
    // Sent at once, the commits are checked and published together; the one the server could
    // not take must fail on its own, clearly, and the others must be stored.
    let huge = "x".repeat(2 * 1024 * 1024);
    let mut commits = Vec::new();
    for i in 0..8 {
        let data = if i == 3 {
            json!({ "blob": huge })
        } else {
            json!({ "n": i })
        };
        let store = store.clone();
        commits.push(tokio::spawn(async move {
            store
                .commit(Commit::append(
                    conformance::stream(&format!("big.{i}")),
                    None,
                    vec![conformance::msg(&format!("m{i}"), "Sent", data)],
                ))
                .await
        }));
    }
    for (i, commit) in commits.into_iter().enumerate() {
        let outcome = commit.await.expect("join");
        if i == 3 {
            let error = outcome.expect_err("larger than the server takes");
            assert!(
                matches!(&error, StoreError::InvalidMessage { id, .. } if id == "m3"),
                "{error}"
            );
        } else {
            assert_eq!(outcome.expect("stored").written.len(), 1, "commit {i}");
        }
    }
    assert!(store.message("m3").await.expect("lookup").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_fences_commits_decided_under_the_old_lease() {
    use ferry::store::{GroupSpec, PartitionFrom, PartitionKey, Settle};
    let (store, _server) = open_nats().await;
    let leases = store.leases().expect("JetStream has leases");
    let consumer = ConsumerId::new(conformance::category("email"), "microservice:subscription");
    store
        .join_group(&consumer, GroupSpec::new(PartitionKey::Entity))
        .await
        .expect("join");
    let spec = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined")
        .spec;
    let free = leases
        .group_state(&consumer, &spec)
        .await
        .expect("state")
        .leases[0]
        .clone();
    let first = leases
        .take(&consumer, "first", std::slice::from_ref(&free))
        .await
        .expect("take")
        .remove(0);
    let read = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined")
        .positions[0];
    assert_eq!(
        read.epoch, first.epoch,
        "the position carries the lease's epoch"
    );

    // Taking a lease someone else took since fails.
    assert!(matches!(
        leases
            .take(&consumer, "late", std::slice::from_ref(&free))
            .await,
        Err(StoreError::ConsumerMoved { .. })
    ));
    // Another instance takes the partition over (the first stalled past its lease).
    let taken = leases
        .group_state(&consumer, &spec)
        .await
        .expect("state")
        .leases[0]
        .clone();
    let second = leases
        .take(&consumer, "second", std::slice::from_ref(&taken))
        .await
        .expect("take over")
        .remove(0);
    assert!(second.epoch > first.epoch);

    // A deferred message of the partition, settled under the old lease: refused, still
    // deferred; under the new one: taken.
    let mut n = 0;
    let deferred = loop {
        let written = store
            .commit(Commit::append(
                conformance::stream(&format!("email:command.d{n}")),
                None,
                vec![conformance::msg(
                    &format!("deferred-{n}"),
                    "SendEmail",
                    json!({}),
                )],
            ))
            .await
            .expect("command")
            .written
            .remove(0);
        if spec.partition_of(&written) == 0 {
            break written;
        }
        n += 1;
    };
    store
        .commit(Commit {
            defer: vec![ferry::store::DeferredMessage {
                consumer: consumer.clone(),
                message: deferred.clone(),
                due_ms: 0,
            }],
            ..Commit::default()
        })
        .await
        .expect("deferred");
    let clear = |epoch| Commit {
        settle: Some(Settle::ClearDeferred {
            consumer: consumer.clone(),
            global_position: deferred.global_position,
            partition: 0,
            epoch,
        }),
        ..Commit::default()
    };
    let stale = store.commit(clear(first.epoch)).await;
    assert!(
        matches!(stale, Err(StoreError::ConsumerMoved { .. })),
        "{stale:?}"
    );
    assert_eq!(store.deferred(&consumer).await.expect("deferred").len(), 1);
    store
        .commit(clear(second.epoch))
        .await
        .expect("the new holder settles it");
    assert!(
        store
            .deferred(&consumer)
            .await
            .expect("deferred")
            .is_empty()
    );

    // What the first decided under its lease is refused whole.
    let advance = |from| Commit {
        appends: vec![ferry::store::StreamAppend {
            stream: conformance::stream("subscription.1"),
            expected_version: None,
            messages: vec![conformance::msg("late-outcome", "Noted", json!({}))],
        }],
        settle: Some(Settle::Advance {
            consumer: consumer.clone(),
            partitions: vec![PartitionFrom { partition: 0, from }],
            to: 5,
        }),
        ..Commit::default()
    };
    let fenced = store.commit(advance(read)).await;
    assert!(
        matches!(fenced, Err(StoreError::ConsumerMoved { .. })),
        "{fenced:?}"
    );
    assert!(
        store
            .message("late-outcome")
            .await
            .expect("lookup")
            .is_none()
    );
    let now = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined")
        .positions[0];
    store
        .commit(advance(now))
        .await
        .expect("the new holder commits");

    // A release frees it for the next taker, the epoch kept.
    let held = leases
        .group_state(&consumer, &spec)
        .await
        .expect("state")
        .leases[0]
        .clone();
    leases.release(&consumer, &held).await.expect("release");
    let released = leases
        .group_state(&consumer, &spec)
        .await
        .expect("state")
        .leases[0]
        .clone();
    assert_eq!((released.owner, released.epoch), (None, second.epoch));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_are_taken_in_one_write_or_not_at_all() {
    use ferry::store::{GroupSpec, PartitionKey};
    let (store, _server) = open_nats().await;
    let leases = store.leases().expect("JetStream has leases");
    let consumer = ConsumerId::new(conformance::category("email"), "microservice:subscription");
    store
        .join_group(&consumer, GroupSpec::new(PartitionKey::Entity))
        .await
        .expect("join");
    let spec = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined")
        .spec;
    let free = leases
        .group_state(&consumer, &spec)
        .await
        .expect("state")
        .leases;

    // Someone takes partition 2 after the state was read: a take of 0..4 takes none of them.
    leases
        .take(&consumer, "first", &free[2..3])
        .await
        .expect("take one");
    let refused = leases.take(&consumer, "second", &free[0..4]).await;
    assert!(
        matches!(refused, Err(StoreError::ConsumerMoved { .. })),
        "{refused:?}"
    );
    let state = leases.group_state(&consumer, &spec).await.expect("state");
    let owners: Vec<Option<&str>> = state.leases[0..4]
        .iter()
        .map(|lease| lease.owner.as_deref())
        .collect();
    assert_eq!(owners, [None, None, Some("first"), None]);

    // Every other partition in one take: each lease and position carries its new epoch, and
    // the revisions returned are the leases' own (a release by them succeeds).
    let rest: Vec<_> = state
        .leases
        .iter()
        .filter(|lease| lease.owner.is_none())
        .cloned()
        .collect();
    let taken = leases
        .take(&consumer, "second", &rest)
        .await
        .expect("take the rest");
    assert_eq!(taken.len(), spec.partitions as usize - 1);
    let group = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined");
    let state = leases.group_state(&consumer, &spec).await.expect("state");
    for lease in &taken {
        let stored = &state.leases[lease.partition as usize];
        assert_eq!(stored.owner.as_deref(), Some("second"));
        assert_eq!(
            stored.revision, lease.revision,
            "partition {}",
            lease.partition
        );
        assert_eq!(group.positions[lease.partition as usize].epoch, lease.epoch);
    }
    for lease in &taken {
        leases.release(&consumer, lease).await.expect("release");
    }
}

/// A stream a commit only read is checked by the server as the batch lands, not by the read the
/// commit was planned on (a direct get any replica answers; here another process's append lands
/// between that read and the batch): two processes racing, a commit that rested on a stream's
/// version never lands after the other appended to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_stream_is_checked_by_the_server_when_the_batch_lands() {
    let server = NatsServer::start();
    let reader = NatsStore::connect(&server.url()).await.expect("reader");
    let writer = NatsStore::connect(&server.url()).await.expect("writer");
    let (mut landed, mut refused) = (0, 0);
    for round in 0..300 {
        let read = conformance::stream(&format!("user.{round}"));
        let decided = Commit {
            appends: vec![ferry::store::StreamAppend {
                stream: conformance::stream(&format!("decision.{round}")),
                expected_version: None,
                messages: vec![conformance::msg(&format!("r{round}"), "Decided", json!({}))],
            }],
            stream_reads: vec![ferry::store::StreamRead {
                stream: read.clone(),
                version: 0,
            }],
            ..Commit::default()
        };
        let appended = Commit::append(
            read,
            Some(0),
            vec![conformance::msg(
                &format!("w{round}"),
                "UserRegistered",
                json!({}),
            )],
        );
        let (decided, appended) = tokio::join!(reader.commit(decided), writer.commit(appended));
        let appended = appended.expect("the append expects what is stored");
        match decided {
            Ok(decided) => {
                landed += 1;
                assert!(
                    decided.written[0].global_position < appended.written[0].global_position,
                    "round {round}: a decision on an empty user.{round} landed after its append"
                );
            }
            Err(StoreError::Conflict { .. }) => refused += 1,
            Err(e) => panic!("round {round}: {e}"),
        }
    }
    eprintln!("{landed} decisions landed before the append, {refused} refused after it");
    assert!(refused > 0 && landed > 0, "the race went both ways");
}
