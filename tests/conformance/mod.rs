//! The store conformance suite: the behaviour every `MessageStore` backend must show, written
//! against the trait only. A backend's test file calls `conformance_suite!` with a function that
//! opens a fresh, empty store (and a guard that keeps its resources alive).

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ferry::store::{
    Category, CategoryFilter, Commit, ConsumerId, GroupSpec, MessageStore, NewMessage,
    ParkedMessage, PartitionFrom, PartitionKey, PartitionPosition, SealKey, Settle, Snapshot,
    StoreError, StreamAppend, StreamName, ViewWrite,
};
use serde_json::{Map, Value, json};

pub type Store = Arc<dyn MessageStore>;

pub fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("test stream names are valid")
}

pub fn category(name: &str) -> Category {
    Category::parse(name).expect("test categories are valid")
}

pub fn msg(id: &str, message_type: &str, data: Value) -> NewMessage {
    NewMessage {
        id: id.into(),
        message_type: message_type.into(),
        data,
        metadata: Map::new(),
        not_before_ms: None,
    }
}

pub fn with_origin(mut message: NewMessage, origin: &str) -> NewMessage {
    message
        .metadata
        .insert("originEntity".into(), Value::String(origin.into()));
    message
}

pub async fn append(store: &Store, name: &str, messages: Vec<NewMessage>) {
    store
        .commit(Commit::append(stream(name), None, messages))
        .await
        .expect("append");
}

/// Creates a consumer's group (every partition at 0) and returns its partition count.
pub async fn join(store: &Store, consumer: &ConsumerId) -> u32 {
    store
        .join_group(consumer, GroupSpec::new(PartitionKey::Entity))
        .await
        .expect("join group")
        .spec
        .partitions
}

/// The settle that moves every partition of a joined group from `from` (epoch 0) to `to`.
pub fn advance(consumer: &ConsumerId, from: u64, to: u64) -> Settle {
    Settle::Advance {
        consumer: consumer.clone(),
        partitions: (0..ferry::store::DEFAULT_PARTITIONS)
            .map(|partition| PartitionFrom {
                partition,
                from: PartitionPosition {
                    position: from,
                    epoch: 0,
                },
            })
            .collect(),
        to,
    }
}

pub async fn appends_and_reads_a_stream_with_positions(store: Store) {
    append(
        &store,
        "account.123",
        vec![msg("a", "Deposited", json!({"amount": 50}))],
    )
    .await;
    append(
        &store,
        "account.9",
        vec![msg("b", "Deposited", json!({"amount": 10}))],
    )
    .await;
    append(
        &store,
        "account.123",
        vec![msg("c", "Deposited", json!({"amount": 200}))],
    )
    .await;
    let read = store
        .read_stream(&stream("account.123"), 0, 100)
        .await
        .expect("read");
    let ids: Vec<_> = read.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["a", "c"]);
    assert_eq!(read[0].position, 0);
    assert_eq!(read[1].position, 1);
    assert!(read[0].global_position >= 1);
    assert!(read[1].global_position > read[0].global_position);
    assert_eq!(read[1].data["amount"], 200);
    assert_eq!(
        store
            .stream_version(&stream("account.123"))
            .await
            .expect("version"),
        2
    );
    assert_eq!(
        store
            .stream_version(&stream("account.404"))
            .await
            .expect("version"),
        0
    );
    let from_one = store
        .read_stream(&stream("account.123"), 1, 100)
        .await
        .expect("read");
    assert_eq!(from_one.len(), 1);
    assert_eq!(from_one[0].id, "c");
    assert_eq!(store.head().await.expect("head"), read[1].global_position);
}

pub async fn reads_a_stream_from_every_position(store: Store) {
    append(
        &store,
        "tail.1",
        vec![
            msg("t0", "A", json!({})),
            msg("t1", "A", json!({})),
            msg("t2", "A", json!({})),
        ],
    )
    .await;
    append(&store, "other.1", vec![msg("o0", "A", json!({}))]).await;
    append(&store, "tail.1", vec![msg("t3", "A", json!({}))]).await;
    // Two appends to the stream in one commit.
    store
        .commit(Commit {
            appends: vec![
                StreamAppend {
                    stream: stream("tail.1"),
                    expected_version: Some(4),
                    messages: vec![msg("t4", "A", json!({}))],
                },
                StreamAppend {
                    stream: stream("other.1"),
                    expected_version: None,
                    messages: vec![msg("o1", "A", json!({}))],
                },
                StreamAppend {
                    stream: stream("tail.1"),
                    expected_version: Some(5),
                    messages: vec![msg("t5", "A", json!({})), msg("t6", "A", json!({}))],
                },
            ],
            ..Commit::default()
        })
        .await
        .expect("commit");
    let all = ["t0", "t1", "t2", "t3", "t4", "t5", "t6"];
    for from in 0..=8u64 {
        let read = store
            .read_stream(&stream("tail.1"), from, 100)
            .await
            .expect("read");
        let ids: Vec<_> = read.iter().map(|m| m.id.as_str()).collect();
        let expected: Vec<_> = all.iter().skip(from as usize).copied().collect();
        assert_eq!(ids, expected, "from {from}");
        let positions: Vec<_> = read.iter().map(|m| m.position).collect();
        assert_eq!(positions, (from..7).collect::<Vec<_>>());
    }
    let limited = store
        .read_stream(&stream("tail.1"), 5, 1)
        .await
        .expect("read");
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0].id, "t5");
}

pub async fn appends_to_several_streams_atomically(store: Store) {
    append(
        &store,
        "order.1",
        vec![msg("existing", "Placed", json!({}))],
    )
    .await;
    let commit = Commit {
        appends: vec![
            StreamAppend {
                stream: stream("order.2"),
                expected_version: Some(0),
                messages: vec![msg("x1", "Placed", json!({}))],
            },
            StreamAppend {
                stream: stream("order.1"),
                // Wrong on purpose: the stream holds one message.
                expected_version: Some(0),
                messages: vec![msg("x2", "Shipped", json!({}))],
            },
        ],
        ..Commit::default()
    };
    let error = store
        .commit(commit)
        .await
        .expect_err("the second append conflicts");
    assert!(
        matches!(
            error,
            StoreError::Conflict {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{error}"
    );
    // Nothing of the failed commit was written, not even the part that was fine.
    assert!(
        store
            .read_stream(&stream("order.2"), 0, 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(store.message("x1").await.expect("lookup").is_none());

    let commit = Commit {
        appends: vec![
            StreamAppend {
                stream: stream("order.2"),
                expected_version: Some(0),
                messages: vec![msg("y1", "Placed", json!({}))],
            },
            StreamAppend {
                stream: stream("order:command.1"),
                expected_version: None,
                messages: vec![msg("y2", "Ship", json!({})), msg("y3", "Bill", json!({}))],
            },
        ],
        ..Commit::default()
    };
    let committed = store.commit(commit).await.expect("commit");
    assert_eq!(committed.written.len(), 3);
    assert_eq!(
        store.stream_version(&stream("order.2")).await.expect("v"),
        1
    );
    assert_eq!(
        store
            .stream_version(&stream("order:command.1"))
            .await
            .expect("v"),
        2
    );
}

pub async fn refuses_a_stale_expected_version(store: Store) {
    let s = stream("account.7");
    store
        .commit(Commit::append(
            s.clone(),
            Some(0),
            vec![msg("1", "Opened", json!({}))],
        ))
        .await
        .expect("first write on an empty stream");
    let error = store
        .commit(Commit::append(
            s.clone(),
            Some(0),
            vec![msg("2", "Opened", json!({}))],
        ))
        .await
        .expect_err("stale");
    assert!(matches!(error, StoreError::Conflict { .. }));
    store
        .commit(Commit::append(
            s.clone(),
            Some(1),
            vec![msg("3", "Closed", json!({}))],
        ))
        .await
        .expect("current version");
    assert_eq!(store.stream_version(&s).await.expect("v"), 2);
}

pub async fn skips_a_message_whose_id_is_stored(store: Store) {
    append(
        &store,
        "email.1",
        vec![msg("same", "EmailSent", json!({"n": 1}))],
    )
    .await;
    let committed = store
        .commit(Commit::append(
            stream("email.1"),
            None,
            vec![
                msg("same", "EmailSent", json!({"n": 2})),
                msg("other", "EmailOpened", json!({})),
            ],
        ))
        .await
        .expect("commit");
    assert_eq!(committed.duplicates, ["same"]);
    assert_eq!(committed.written.len(), 1);
    let read = store
        .read_stream(&stream("email.1"), 0, 10)
        .await
        .expect("read");
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].data["n"], 1, "the first write wins");
    // A retried append whose messages are all stored is a no-op, even with a now stale version.
    let committed = store
        .commit(Commit::append(
            stream("email.1"),
            Some(0),
            vec![msg("same", "EmailSent", json!({}))],
        ))
        .await
        .expect("duplicate only");
    assert!(committed.written.is_empty());
    assert_eq!(
        store.stream_version(&stream("email.1")).await.expect("v"),
        2
    );
}

pub async fn refuses_a_commit_with_a_stored_id_when_asked(store: Store) {
    append(
        &store,
        "email.1",
        vec![msg("same", "EmailSent", json!({"n": 1}))],
    )
    .await;
    let refusing = |messages| Commit {
        refuse_duplicates: true,
        ..Commit::append(stream("email.1"), None, messages)
    };
    let error = store
        .commit(refusing(vec![
            msg("other", "EmailOpened", json!({})),
            msg("same", "EmailSent", json!({"n": 2})),
        ]))
        .await
        .expect_err("a stored id");
    assert!(
        matches!(&error, StoreError::Duplicate { id } if id == "same"),
        "{error}"
    );
    let error = store
        .commit(refusing(vec![
            msg("twice", "EmailOpened", json!({})),
            msg("twice", "EmailOpened", json!({})),
        ]))
        .await
        .expect_err("an id twice in the commit");
    assert!(
        matches!(&error, StoreError::Duplicate { id } if id == "twice"),
        "{error}"
    );
    assert!(store.message("other").await.expect("lookup").is_none());
    assert!(store.message("twice").await.expect("lookup").is_none());
    assert_eq!(
        store.stream_version(&stream("email.1")).await.expect("v"),
        1,
        "nothing of the refused commits was written"
    );
}

pub async fn refuses_data_that_is_not_an_object(store: Store) {
    let error = store
        .commit(Commit::append(
            stream("email.1"),
            None,
            vec![msg("n", "X", json!([1, 2]))],
        ))
        .await
        .expect_err("array data");
    assert!(matches!(error, StoreError::InvalidMessage { .. }));
    assert_eq!(store.head().await.expect("head"), 0);
}

pub async fn reads_a_category_from_a_position_with_an_origin_filter(store: Store) {
    append(
        &store,
        "email.1",
        vec![with_origin(
            msg("e1", "EmailSent", json!({})),
            "subscription.john",
        )],
    )
    .await;
    append(&store, "other.1", vec![msg("o1", "Noise", json!({}))]).await;
    append(
        &store,
        "email.2",
        vec![with_origin(msg("e2", "EmailSent", json!({})), "user.42")],
    )
    .await;
    append(
        &store,
        "email.1",
        vec![with_origin(
            msg("e3", "EmailOpened", json!({})),
            "subscription.john",
        )],
    )
    .await;
    append(
        &store,
        "email:command.9",
        vec![msg("c1", "SendEmail", json!({}))],
    )
    .await;

    let all = store
        .read_category(&category("email"), 0, &CategoryFilter::default(), 100)
        .await
        .expect("read");
    let ids: Vec<_> = all.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        ["e1", "e2", "e3"],
        "commands and other categories stay out"
    );

    let filtered = store
        .read_category(
            &category("email"),
            0,
            &CategoryFilter::origin("subscription."),
            100,
        )
        .await
        .expect("read");
    let ids: Vec<_> = filtered.messages.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["e1", "e3"]);
    assert_eq!(filtered.scanned_to, all.messages[2].global_position);

    let after_first = store
        .read_category(
            &category("email"),
            all.messages[0].global_position,
            &CategoryFilter::default(),
            100,
        )
        .await
        .expect("read");
    assert_eq!(after_first.messages.len(), 2);
    let limited = store
        .read_category(&category("email"), 0, &CategoryFilter::default(), 1)
        .await
        .expect("read");
    assert_eq!(limited.messages.len(), 1);
    assert_eq!(limited.scanned_to, all.messages[0].global_position);

    let commands = store
        .read_category(
            &category("email:command"),
            0,
            &CategoryFilter::default(),
            100,
        )
        .await
        .expect("read");
    assert_eq!(commands.messages.len(), 1);
}

pub async fn keeps_consumer_positions_per_category(store: Store) {
    append(
        &store,
        "email.1",
        vec![
            msg("e1", "EmailSent", json!({})),
            msg("e2", "EmailOpened", json!({})),
        ],
    )
    .await;
    let consumer = ConsumerId::new(category("email"), "microservice:subscription");
    join(&store, &consumer).await;
    assert_eq!(store.settled(&consumer).await.expect("settled"), 0);
    let first = store
        .read_stream(&stream("email.1"), 0, 1)
        .await
        .expect("read")[0]
        .global_position;
    store
        .commit(Commit {
            settle: Some(advance(&consumer, 0, first)),
            ..Commit::default()
        })
        .await
        .expect("advance");
    assert_eq!(store.settled(&consumer).await.expect("settled"), first);
    let other = ConsumerId::new(category("user"), "microservice:subscription");
    assert_eq!(
        store.settled(&other).await.expect("settled"),
        0,
        "positions are per category"
    );

    let listed = store
        .consumers(Some(&category("email")))
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].consumer, consumer);
    assert_eq!(listed[0].lag, 1);
    assert!(
        store
            .consumers(Some(&category("user")))
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(store.consumers(None).await.expect("list").len(), 1);
}

pub async fn keeps_a_position_per_partition(store: Store) {
    append(&store, "email.1", vec![msg("e1", "EmailSent", json!({}))]).await;
    let consumer = ConsumerId::new(category("email"), "microservice:subscription");
    let partitions = join(&store, &consumer).await;
    assert_eq!(partitions, ferry::store::DEFAULT_PARTITIONS);
    let from = PartitionPosition::default();
    let moved = |partitions: &[u32], to| Commit {
        settle: Some(Settle::Advance {
            consumer: consumer.clone(),
            partitions: partitions
                .iter()
                .map(|&partition| PartitionFrom { partition, from })
                .collect(),
            to,
        }),
        ..Commit::default()
    };
    store.commit(moved(&[3, 5], 7)).await.expect("advance two");
    let group = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined");
    let positions: Vec<u64> = group.positions.iter().map(|p| p.position).collect();
    assert_eq!((positions[3], positions[5], positions[4]), (7, 7, 0));
    assert_eq!(
        store.settled(&consumer).await.expect("settled"),
        0,
        "the lowest"
    );
    let again = store.commit(moved(&[4, 5], 9)).await;
    assert!(
        matches!(again, Err(StoreError::ConsumerMoved { .. })),
        "partition 5 is no longer at 0: {again:?}"
    );
    let group = store
        .group(&consumer)
        .await
        .expect("group")
        .expect("joined");
    assert_eq!(
        group.positions[4].position, 0,
        "the refused commit moved nothing"
    );
    // Joining again keeps the group as it is.
    let rejoined = store
        .join_group(&consumer, GroupSpec::new(PartitionKey::OriginEntity))
        .await
        .expect("join");
    assert_eq!(rejoined, group);
}

pub async fn commits_an_outcome_with_the_consumer_position(store: Store) {
    append(
        &store,
        "email:command.1",
        vec![msg("cmd", "SendEmail", json!({}))],
    )
    .await;
    let consumer = ConsumerId::new(category("email:command"), "microservice:email");
    join(&store, &consumer).await;
    let command = store
        .read_stream(&stream("email:command.1"), 0, 1)
        .await
        .expect("read")[0]
        .clone();
    // An outcome that conflicts moves nothing: neither the events nor the position.
    append(
        &store,
        "email.1",
        vec![msg("sneaky", "EmailSent", json!({}))],
    )
    .await;
    let outcome = |expected| Commit {
        appends: vec![StreamAppend {
            stream: stream("email.1"),
            expected_version: Some(expected),
            messages: vec![msg("evt", "EmailSent", json!({}))],
        }],
        settle: Some(advance(&consumer, 0, command.global_position)),
        ..Commit::default()
    };
    assert!(store.commit(outcome(0)).await.is_err());
    assert_eq!(store.settled(&consumer).await.expect("settled"), 0);
    store.commit(outcome(1)).await.expect("commit");
    assert_eq!(
        store.settled(&consumer).await.expect("settled"),
        command.global_position
    );
    assert!(store.message("evt").await.expect("lookup").is_some());
}

pub async fn ignores_a_view_change_from_an_older_position(store: Store) {
    let write = |value: Option<Value>, seq| ViewWrite {
        table: "users".into(),
        key: "42".into(),
        value,
        seq,
    };
    let commit = |w| Commit {
        views: vec![w],
        ..Commit::default()
    };
    store
        .commit(commit(write(Some(json!({"name": "Ann"})), 5)))
        .await
        .expect("write");
    let row = store
        .view_get("users", "42")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(row.value["name"], "Ann");
    assert_eq!(row.last_update_seq, 5);
    // Replays of the same or an older event change nothing.
    store
        .commit(commit(write(Some(json!({"name": "Old"})), 5)))
        .await
        .expect("write");
    store
        .commit(commit(write(Some(json!({"name": "Older"})), 3)))
        .await
        .expect("write");
    assert_eq!(
        store
            .view_get("users", "42")
            .await
            .expect("get")
            .expect("row")
            .value["name"],
        "Ann"
    );
    // Two changes to one row in one commit: the last one stands.
    store
        .commit(Commit {
            views: vec![write(None, 6), write(Some(json!({"name": "Bob"})), 6)],
            ..Commit::default()
        })
        .await
        .expect("write");
    assert_eq!(
        store
            .view_get("users", "42")
            .await
            .expect("get")
            .expect("row")
            .value["name"],
        "Bob"
    );
    store
        .commit(commit(write(Some(json!({"name": "Bob"})), 6)))
        .await
        .expect("write");
    assert_eq!(
        store
            .view_get("users", "42")
            .await
            .expect("get")
            .expect("row")
            .value["name"],
        "Bob"
    );
    // A delete is remembered too: an older upsert replayed later does not bring the row back.
    store.commit(commit(write(None, 8))).await.expect("delete");
    assert!(store.view_get("users", "42").await.expect("get").is_none());
    store
        .commit(commit(write(Some(json!({"name": "Ghost"})), 7)))
        .await
        .expect("write");
    assert!(store.view_get("users", "42").await.expect("get").is_none());

    store
        .commit(commit(ViewWrite {
            table: "users".into(),
            key: "a".into(),
            value: Some(json!(1)),
            seq: 9,
        }))
        .await
        .expect("write");
    store
        .commit(commit(ViewWrite {
            table: "users".into(),
            key: "b".into(),
            value: Some(json!(2)),
            seq: 10,
        }))
        .await
        .expect("write");
    let rows = store.view_rows("users", None, 10).await.expect("rows");
    let keys: Vec<_> = rows.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let rows = store.view_rows("users", Some("a"), 10).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert!(
        store
            .view_rows("other", None, 10)
            .await
            .expect("rows")
            .is_empty()
    );
}

pub async fn parks_and_replays_a_message(store: Store) {
    append(
        &store,
        "email:command.1",
        vec![msg("bad", "SendEmail", json!({}))],
    )
    .await;
    let consumer = ConsumerId::new(category("email:command"), "microservice:email");
    join(&store, &consumer).await;
    let message = store.message("bad").await.expect("lookup").expect("stored");
    store
        .commit(Commit {
            settle: Some(advance(&consumer, 0, message.global_position)),
            park: vec![ParkedMessage {
                consumer: consumer.clone(),
                message: message.clone(),
                reason: "guest trapped".into(),
                attempts: 1,
                parked_at_ms: 1,
            }],
            ..Commit::default()
        })
        .await
        .expect("park");
    let parked = store.parked(None).await.expect("list");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].reason, "guest trapped");
    assert_eq!(parked[0].message.id, "bad");
    assert_eq!(store.parked(Some(&consumer)).await.expect("list").len(), 1);
    assert!(
        store
            .deferred(&consumer)
            .await
            .expect("deferred")
            .is_empty()
    );

    assert_eq!(store.replay(Some("bad"), None).await.expect("replay"), 1);
    assert!(store.parked(None).await.expect("list").is_empty());
    let deferred = store.deferred(&consumer).await.expect("deferred");
    assert_eq!(deferred.len(), 1);
    assert_eq!(deferred[0].message.id, "bad");
    assert_eq!(
        store.replay(Some("bad"), None).await.expect("replay"),
        0,
        "replayed once"
    );

    store
        .commit(Commit {
            settle: Some(Settle::ClearDeferred {
                consumer: consumer.clone(),
                global_position: message.global_position,
            }),
            ..Commit::default()
        })
        .await
        .expect("handled");
    assert!(
        store
            .deferred(&consumer)
            .await
            .expect("deferred")
            .is_empty()
    );
    // Settling it again (an outcome that raced a rebuild) is refused.
    let again = store
        .commit(Commit {
            settle: Some(Settle::ClearDeferred {
                consumer: consumer.clone(),
                global_position: message.global_position,
            }),
            ..Commit::default()
        })
        .await;
    assert!(
        matches!(again, Err(StoreError::ConsumerMoved { .. })),
        "{again:?}"
    );
}

pub async fn wakes_a_waiting_consumer_on_a_write(store: Store) {
    let consumer = ConsumerId::new(category("email"), "microservice:watcher");
    let mut changes = store.watch(&consumer).await.expect("watch");
    // A JetStream watcher wakes its consumer once whenever its delivery restarts (whatever was
    // missed meanwhile is read again); on a cluster that can happen while the new watcher's
    // replicas settle. Let it settle, then count only wake-ups from here.
    tokio::time::sleep(Duration::from_millis(300)).await;
    changes.borrow_and_update();
    append(&store, "user.1", vec![msg("u", "Other", json!({}))]).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), changes.changed())
            .await
            .is_err(),
        "a write to another category does not wake it"
    );
    // Written before anyone waits: the change is still seen.
    append(&store, "email.1", vec![msg("e", "EmailSent", json!({}))]).await;
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("woken by the write")
        .expect("the store is open");
}

/// Concurrent commits (which sled shares flushes between, and JetStream races on) all land,
/// each once, in one global order that `head` ends.
pub async fn orders_concurrent_appends_globally(store: Store) {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .commit(Commit::append(
                    stream(&format!("load.{}", i % 10)),
                    None,
                    vec![msg(&format!("m{i}"), "X", json!({}))],
                ))
                .await
        }));
    }
    for task in tasks {
        task.await.expect("join").expect("commit");
    }
    let page = store
        .read_category(&category("load"), 0, &CategoryFilter::default(), 1000)
        .await
        .expect("read");
    assert_eq!(page.messages.len(), 200);
    let globals: Vec<_> = page.messages.iter().map(|m| m.global_position).collect();
    assert!(
        globals.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing global positions"
    );
    assert_eq!(store.head().await.expect("head"), globals[199]);
    for i in 0..10 {
        let read = store
            .read_stream(&stream(&format!("load.{i}")), 0, 100)
            .await
            .expect("read");
        let positions: Vec<_> = read.iter().map(|m| m.position).collect();
        assert_eq!(
            positions,
            (0..20).collect::<Vec<_>>(),
            "dense stream positions"
        );
    }
}

/// Commits that race (sent at once, so a backend may take them together) still see each other:
/// one wins an expected version, one writes a message id, one moves a consumer from a position.
pub async fn lets_one_of_racing_commits_win(store: Store) {
    append(&store, "race.1", vec![msg("first", "X", json!({}))]).await;
    let consumer = ConsumerId::new(category("race"), "c");
    join(&store, &consumer).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = store.clone();
        let consumer = consumer.clone();
        tasks.push(tokio::spawn(async move {
            let versioned = store.commit(Commit::append(
                stream("race.1"),
                Some(1),
                vec![msg(&format!("v{i}"), "X", json!({}))],
            ));
            let same_id = store.commit(Commit::append(
                stream(&format!("race.other{i}")),
                None,
                vec![msg("shared", "X", json!({}))],
            ));
            let settle = store.commit(Commit {
                settle: Some(advance(&consumer, 0, i + 1)),
                ..Commit::default()
            });
            let (versioned, same_id, settle) = tokio::join!(versioned, same_id, settle);
            (
                versioned.is_ok(),
                same_id.map(|c| c.written.len()),
                settle.is_ok(),
            )
        }));
    }
    let (mut versioned, mut written, mut settled) = (0, 0, 0);
    for task in tasks {
        let (won_version, same_id, won_settle) = task.await.expect("join");
        versioned += usize::from(won_version);
        written += same_id.expect("a duplicate id is skipped, not an error");
        settled += usize::from(won_settle);
    }
    assert_eq!(versioned, 1, "one commit wins expected version 1");
    assert_eq!(written, 1, "one message with the id is stored");
    assert_eq!(settled, 1, "one commit moves the consumer from 0");
    assert_eq!(
        store
            .stream_version(&stream("race.1"))
            .await
            .expect("version"),
        2
    );
    assert_ne!(store.settled(&consumer).await.expect("settled"), 0);
}

pub async fn refuses_to_advance_a_consumer_that_moved(store: Store) {
    append(&store, "email.1", vec![msg("e1", "EmailSent", json!({}))]).await;
    let consumer = ConsumerId::new(category("email"), "microservice:subscription");
    join(&store, &consumer).await;
    let outcome = |from, to| Commit {
        appends: vec![StreamAppend {
            stream: stream("subscription.1"),
            expected_version: None,
            messages: vec![msg(&format!("out-{from}-{to}"), "Noted", json!({}))],
        }],
        settle: Some(advance(&consumer, from, to)),
        ..Commit::default()
    };
    store
        .commit(outcome(0, 1))
        .await
        .expect("advance from where it is");
    let error = store
        .commit(outcome(0, 1))
        .await
        .expect_err("it is not at 0 any more");
    assert!(
        matches!(
            error,
            StoreError::ConsumerMoved {
                expected: 0,
                actual: 1,
                ..
            }
        ),
        "{error}"
    );
    assert!(store.message("out-0-1").await.expect("lookup").is_some());
    assert_eq!(
        store
            .read_stream(&stream("subscription.1"), 0, 10)
            .await
            .expect("read")
            .len(),
        1,
        "the refused commit wrote nothing"
    );
}

pub async fn rebuilds_views_from_the_start(store: Store) {
    append(
        &store,
        "user.1",
        vec![msg("u1", "UserRegistered", json!({}))],
    )
    .await;
    let consumer = ConsumerId::new(category("user"), "microservice:user-aggregator");
    let other = ConsumerId::new(category("user"), "microservice:user");
    join(&store, &consumer).await;
    join(&store, &other).await;
    for c in [&consumer, &other] {
        store
            .commit(Commit {
                views: vec![ViewWrite {
                    table: "users".into(),
                    key: "1".into(),
                    value: Some(json!({"n": 1})),
                    seq: 1,
                }],
                settle: Some(advance(c, 0, 1)),
                ..Commit::default()
            })
            .await
            .expect("handled");
    }
    store
        .commit(Commit {
            views: vec![ViewWrite {
                table: "other".into(),
                key: "k".into(),
                value: Some(json!(1)),
                seq: 1,
            }],
            ..Commit::default()
        })
        .await
        .expect("other view");
    store
        .rebuild_views(&["users".to_owned()], std::slice::from_ref(&consumer))
        .await
        .expect("rebuild");
    assert!(
        store.view_get("users", "1").await.expect("get").is_none(),
        "rows and tombstones go"
    );
    assert_eq!(store.settled(&consumer).await.expect("settled"), 0);
    assert_eq!(
        store.settled(&other).await.expect("settled"),
        1,
        "other consumers stay"
    );
    assert!(
        store.view_get("other", "k").await.expect("get").is_some(),
        "other views stay"
    );
    // The replayed event may write the row again: its lastUpdateSeq is gone with the table.
    store
        .commit(Commit {
            views: vec![ViewWrite {
                table: "users".into(),
                key: "1".into(),
                value: Some(json!({"n": 2})),
                seq: 1,
            }],
            ..Commit::default()
        })
        .await
        .expect("replayed");
    assert_eq!(
        store
            .view_get("users", "1")
            .await
            .expect("get")
            .expect("row")
            .value["n"],
        2
    );
}

fn seal_key(message_id: &str, byte: u8) -> SealKey {
    SealKey {
        message_id: message_id.into(),
        key: vec![byte; 32],
    }
}

/// A command with sealed fields, appended with its key.
async fn append_sealed(store: &Store, name: &str, id: &str, byte: u8) -> Result<(), StoreError> {
    store
        .commit(Commit {
            seal_keys: vec![seal_key(id, byte)],
            ..Commit::append(
                stream(name),
                None,
                vec![msg(
                    id,
                    "RegisterUser",
                    json!({"password": {"sealed": true}}),
                )],
            )
        })
        .await
        .map(|_| ())
}

pub async fn keeps_a_seal_key_with_its_message(store: Store) {
    append_sealed(&store, "user:command.1", "reg-1", 1)
        .await
        .expect("append");
    assert_eq!(
        store.seal_key("reg-1").await.expect("key"),
        Some(vec![1u8; 32])
    );
    assert_eq!(store.seal_key("reg-2").await.expect("key"), None);
    // A key for a message the commit does not write is not kept either.
    store
        .commit(Commit {
            seal_keys: vec![seal_key("elsewhere", 9)],
            ..Commit::append(
                stream("user:command.2"),
                None,
                vec![msg("reg-2", "RegisterUser", json!({}))],
            )
        })
        .await
        .expect("append");
    assert_eq!(store.seal_key("elsewhere").await.expect("key"), None);
    assert_eq!(store.seal_key("reg-2").await.expect("key"), None);
}

pub async fn keeps_the_first_key_when_a_sealed_message_comes_again(store: Store) {
    append_sealed(&store, "user:command.1", "reg-1", 1)
        .await
        .expect("append");
    // Sent again (a client retrying): the message is a duplicate, and so is its new key.
    let again = store
        .commit(Commit {
            seal_keys: vec![seal_key("reg-1", 2)],
            ..Commit::append(
                stream("user:command.1"),
                None,
                vec![msg(
                    "reg-1",
                    "RegisterUser",
                    json!({"password": {"sealed": true}}),
                )],
            )
        })
        .await
        .expect("append");
    assert_eq!(again.duplicates, ["reg-1"]);
    assert_eq!(
        store.seal_key("reg-1").await.expect("key"),
        Some(vec![1u8; 32]),
        "the stored message's fields still open"
    );
}

pub async fn shreds_a_key_in_the_commit_that_settles_its_message(store: Store) {
    append_sealed(&store, "user:command.1", "reg-1", 1)
        .await
        .expect("append");
    let command = store
        .message("reg-1")
        .await
        .expect("lookup")
        .expect("stored");
    let consumer = ConsumerId::new(category("user:command"), "microservice:user");
    join(&store, &consumer).await;
    let outcome = |from| Commit {
        appends: vec![StreamAppend {
            stream: stream("user.1"),
            expected_version: Some(0),
            messages: vec![msg("registered-1", "UserRegistered", json!({}))],
        }],
        settle: Some(advance(&consumer, from, command.global_position)),
        shred: vec!["reg-1".into()],
        ..Commit::default()
    };
    // A settle that fails takes the shredding with it: the key stays for the next attempt.
    let moved = store.commit(outcome(7)).await;
    assert!(
        matches!(moved, Err(StoreError::ConsumerMoved { .. })),
        "{moved:?}"
    );
    assert!(store.seal_key("reg-1").await.expect("key").is_some());
    assert!(
        store
            .message("registered-1")
            .await
            .expect("lookup")
            .is_none()
    );

    store.commit(outcome(0)).await.expect("settle");
    assert_eq!(store.seal_key("reg-1").await.expect("key"), None);
    assert!(
        store
            .message("registered-1")
            .await
            .expect("lookup")
            .is_some()
    );
    assert_eq!(
        store.settled(&consumer).await.expect("settled"),
        command.global_position
    );
    // The message itself stays, sealed, in the history.
    let kept = store.message("reg-1").await.expect("lookup").expect("kept");
    assert_eq!(kept.data["password"]["sealed"], true);
    // Shredding again (a settle that is retried) is harmless.
    store
        .commit(Commit {
            shred: vec!["reg-1".into()],
            ..Commit::default()
        })
        .await
        .expect("shred again");
    assert_eq!(store.seal_key("reg-1").await.expect("key"), None);
}

pub async fn stores_no_key_for_a_refused_commit(store: Store) {
    append(
        &store,
        "user:command.1",
        vec![msg("first", "RegisterUser", json!({}))],
    )
    .await;
    let conflicting = store
        .commit(Commit {
            seal_keys: vec![seal_key("reg-2", 2)],
            ..Commit::append(
                stream("user:command.1"),
                Some(0),
                vec![msg(
                    "reg-2",
                    "RegisterUser",
                    json!({"password": {"sealed": true}}),
                )],
            )
        })
        .await;
    assert!(
        matches!(conflicting, Err(StoreError::Conflict { .. })),
        "{conflicting:?}"
    );
    assert_eq!(store.seal_key("reg-2").await.expect("key"), None);
    let empty_key = store
        .commit(Commit {
            seal_keys: vec![SealKey {
                message_id: "reg-3".into(),
                key: Vec::new(),
            }],
            ..Commit::append(
                stream("user:command.3"),
                None,
                vec![msg("reg-3", "RegisterUser", json!({}))],
            )
        })
        .await;
    assert!(
        matches!(empty_key, Err(StoreError::InvalidMessage { .. })),
        "{empty_key:?}"
    );
    assert!(store.message("reg-3").await.expect("lookup").is_none());
}

fn snapshot(name: &str, component: &str, version: u64, state: &str) -> Snapshot {
    Snapshot {
        stream: stream(name),
        component: component.into(),
        version,
        state: state.into(),
    }
}

pub async fn keeps_the_latest_snapshot_per_stream_and_component(store: Store) {
    append(
        &store,
        "counter.1",
        vec![
            msg("c1", "Incremented", json!({})),
            msg("c2", "Incremented", json!({})),
        ],
    )
    .await;
    assert_eq!(
        store
            .snapshot(&stream("counter.1"), "aa11")
            .await
            .expect("read"),
        None
    );
    // Stored with the events of the same commit, and on its own.
    store
        .commit(Commit {
            snapshots: vec![snapshot("counter.1", "aa11", 3, r#"{"total":3}"#)],
            ..Commit::append(
                stream("counter.1"),
                Some(2),
                vec![msg("c3", "Incremented", json!({}))],
            )
        })
        .await
        .expect("events and snapshot");
    store
        .commit(Commit {
            snapshots: vec![snapshot("counter.1", "bb22", 2, r#"{"other":2}"#)],
            ..Commit::default()
        })
        .await
        .expect("another version's snapshot");
    assert_eq!(
        store
            .snapshot(&stream("counter.1"), "aa11")
            .await
            .expect("read"),
        Some(snapshot("counter.1", "aa11", 3, r#"{"total":3}"#))
    );
    assert_eq!(
        store
            .snapshot(&stream("counter.1"), "bb22")
            .await
            .expect("read"),
        Some(snapshot("counter.1", "bb22", 2, r#"{"other":2}"#)),
        "each component version has its own"
    );
    assert_eq!(
        store
            .snapshot(&stream("counter.2"), "aa11")
            .await
            .expect("read"),
        None,
        "and each stream"
    );
    // A refused commit stores none of it.
    let refused = store
        .commit(Commit {
            snapshots: vec![snapshot("counter.1", "aa11", 9, "{}")],
            ..Commit::append(
                stream("counter.1"),
                Some(0),
                vec![msg("c4", "Incremented", json!({}))],
            )
        })
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    let bad_component = store
        .commit(Commit {
            snapshots: vec![snapshot("counter.1", "a.b>", 3, "{}")],
            ..Commit::default()
        })
        .await;
    assert!(
        matches!(bad_component, Err(StoreError::InvalidMessage { .. })),
        "{bad_component:?}"
    );
    // A later one replaces it.
    store
        .commit(Commit {
            snapshots: vec![snapshot("counter.1", "aa11", 3, r#"{"total":33}"#)],
            ..Commit::default()
        })
        .await
        .expect("replaced");
    assert_eq!(
        store
            .snapshot(&stream("counter.1"), "aa11")
            .await
            .expect("read")
            .map(|s| s.state),
        Some(r#"{"total":33}"#.to_owned())
    );
    // A rebuild derives everything from the events again: every snapshot goes.
    let consumer = ConsumerId::new(category("counter"), "microservice:counter-view");
    join(&store, &consumer).await;
    store
        .rebuild_views(&[], std::slice::from_ref(&consumer))
        .await
        .expect("rebuild");
    for component in ["aa11", "bb22"] {
        assert_eq!(
            store
                .snapshot(&stream("counter.1"), component)
                .await
                .expect("read"),
            None,
            "{component} after a rebuild"
        );
    }
}

/// Expands to one test per behaviour for a backend. `$open` is an async expression giving
/// `(Arc<dyn MessageStore>, guard)`.
#[macro_export]
macro_rules! conformance_suite {
    ($open:path) => {
        $crate::conformance_suite!(@tests $open;
            appends_and_reads_a_stream_with_positions,
            appends_to_several_streams_atomically,
            keeps_a_position_per_partition,
            reads_a_stream_from_every_position,
            refuses_a_stale_expected_version,
            skips_a_message_whose_id_is_stored,
            refuses_data_that_is_not_an_object,
            reads_a_category_from_a_position_with_an_origin_filter,
            keeps_consumer_positions_per_category,
            refuses_to_advance_a_consumer_that_moved,
            refuses_a_commit_with_a_stored_id_when_asked,
            rebuilds_views_from_the_start,
            commits_an_outcome_with_the_consumer_position,
            ignores_a_view_change_from_an_older_position,
            parks_and_replays_a_message,
            wakes_a_waiting_consumer_on_a_write,
            orders_concurrent_appends_globally,
            lets_one_of_racing_commits_win,
            keeps_a_seal_key_with_its_message,
            keeps_the_first_key_when_a_sealed_message_comes_again,
            shreds_a_key_in_the_commit_that_settles_its_message,
            stores_no_key_for_a_refused_commit,
            keeps_the_latest_snapshot_per_stream_and_component,
        );
    };
    (@tests $open:path; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let (store, _guard) = $open().await;
                conformance::$name(store).await;
            }
        )+
    };
}
