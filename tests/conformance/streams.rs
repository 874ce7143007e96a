//! Streams: appends with positions and expected versions, ids stored once, atomic commits over
//! several streams, and one global order under concurrent and racing commits.

use super::*;

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

/// An id names one message of one stream: again on that stream it is a duplicate, on another
/// (stored, or earlier in the same commit) the whole commit is refused, naming nothing of it.
pub async fn refuses_an_id_used_by_another_stream(store: Store) {
    append(&store, "ids.a", vec![msg("taken", "X", json!({}))]).await;
    let error = store
        .commit(Commit::append(
            stream("ids.b"),
            None,
            vec![msg("fresh", "X", json!({})), msg("taken", "X", json!({}))],
        ))
        .await
        .expect_err("another stream's id");
    assert!(
        matches!(&error, StoreError::IdInUse { id } if id == "taken"),
        "{error:?}"
    );
    assert!(!error.to_string().contains("ids.a"), "{error}");
    assert!(
        store.message("fresh").await.expect("lookup").is_none(),
        "nothing of the refused commit is stored"
    );
    let again = store
        .commit(Commit::append(
            stream("ids.a"),
            None,
            vec![msg("taken", "X", json!({}))],
        ))
        .await
        .expect("the same stream again");
    assert_eq!(again.duplicates, ["taken"]);
    // Twice in one commit, on two streams.
    let error = store
        .commit(Commit {
            appends: vec![
                StreamAppend {
                    stream: stream("ids.c"),
                    expected_version: None,
                    messages: vec![msg("twice", "X", json!({}))],
                },
                StreamAppend {
                    stream: stream("ids.d"),
                    expected_version: None,
                    messages: vec![msg("twice", "X", json!({}))],
                },
            ],
            ..Commit::default()
        })
        .await
        .expect_err("one id on two streams of one commit");
    assert!(matches!(error, StoreError::IdInUse { .. }), "{error:?}");
    assert!(store.message("twice").await.expect("lookup").is_none());
}

/// Ids, types, data, metadata and view keys past their bounds are refused whole, naming the
/// limit, the same on every store.
pub async fn refuses_messages_past_the_bounds(store: Store) {
    let long_id = "i".repeat(ferry::store::MAX_ID_BYTES + 1);
    let big = json!({ "blob": "b".repeat(ferry::store::MAX_DATA_BYTES) });
    let cases = [
        msg(&long_id, "X", json!({})),
        msg("spaced id", "X", json!({})),
        msg(
            "ok-id",
            &"T".repeat(ferry::store::MAX_TYPE_BYTES + 1),
            json!({}),
        ),
        msg("ok-id", "X", big),
    ];
    for message in cases {
        let error = store
            .commit(Commit::append(stream("bounds.1"), None, vec![message]))
            .await
            .expect_err("past a bound");
        assert!(
            matches!(&error, StoreError::InvalidMessage { .. }) && error.is_permanent(),
            "{error:?}"
        );
        assert!(
            error.to_string().len() < 400,
            "the error does not echo: {error}"
        );
    }
    let error = store
        .commit(Commit {
            views: vec![ViewWrite {
                table: "rows".into(),
                key: "k".repeat(ferry::store::MAX_VIEW_KEY_BYTES + 1),
                value: Some(json!({})),
                seq: 1,
            }],
            ..Commit::default()
        })
        .await
        .expect_err("a key past its bound");
    assert!(error.to_string().contains("limit of 512"), "{error}");
    let long_key = "k".repeat(5000);
    assert_eq!(store.view_get("rows", &long_key).await.expect("read"), None);
    assert_eq!(store.message(&long_id).await.expect("read"), None);
    assert_eq!(
        store.stream_version(&stream("bounds.1")).await.expect("v"),
        0
    );
}

/// Commits that race (sent at once, so a backend may take them together) still see each other:
/// one wins an expected version, one writes a message id (the others, on other streams, are
/// refused it), one moves a consumer from a position.
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
    let (mut versioned, mut written, mut refused, mut settled) = (0, 0, 0, 0);
    for task in tasks {
        let (won_version, same_id, won_settle) = task.await.expect("join");
        versioned += usize::from(won_version);
        match same_id {
            Ok(count) => written += count,
            Err(StoreError::IdInUse { .. }) => refused += 1,
            Err(e) => panic!("an id taken by another stream is refused as such: {e}"),
        }
        settled += usize::from(won_settle);
    }
    assert_eq!(versioned, 1, "one commit wins expected version 1");
    assert_eq!(written, 1, "one message with the id is stored");
    assert_eq!(refused, 15, "the id is refused on every other stream");
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

/// A decision on a stream it only read holds only while the stream is as read: a commit whose
/// read stream grew since is refused whole, at any version, an empty stream included; one
/// decided again on the stream as it stands lands.
pub async fn refuses_a_commit_whose_read_stream_changed_since_it_was_read(store: Store) {
    let read = |name: &str, version| StreamRead {
        stream: stream(name),
        version,
    };
    let decided = |id: &str, reads: Vec<StreamRead>| Commit {
        appends: vec![StreamAppend {
            stream: stream(&format!("decision.{id}")),
            expected_version: None,
            messages: vec![msg(id, "Decided", json!({}))],
        }],
        stream_reads: reads,
        ..Commit::default()
    };
    append(
        &store,
        "user.1",
        vec![msg("u1", "UserRegistered", json!({}))],
    )
    .await;
    store
        .commit(decided("a", vec![read("user.1", 1), read("user.2", 0)]))
        .await
        .expect("reads that hold");
    append(&store, "user.1", vec![msg("u2", "NameChanged", json!({}))]).await;
    append(
        &store,
        "user.2",
        vec![msg("u3", "UserRegistered", json!({}))],
    )
    .await;
    for (id, reads) in [
        ("b", vec![read("user.1", 1)]),
        ("c", vec![read("user.2", 0)]),
        ("d", vec![read("user.1", 2), read("user.2", 0)]),
    ] {
        match store.commit(decided(id, reads)).await {
            Err(StoreError::Conflict { stream, .. }) => {
                assert!(stream.starts_with("user."), "{stream}")
            }
            other => panic!("{id}: expected a conflict, got {other:?}"),
        }
        assert!(
            store.message(id).await.expect("read").is_none(),
            "nothing of the refused commit {id} is written"
        );
    }
    store
        .commit(decided("e", vec![read("user.1", 2), read("user.2", 1)]))
        .await
        .expect("decided again on the streams as they stand");
    // A park rests on what it read likewise.
    let consumer = ConsumerId::new(category("user:command"), "c");
    join(&store, &consumer).await;
    let parked = Commit {
        park: vec![ParkedMessage {
            consumer: consumer.clone(),
            message: store.message("u1").await.expect("read").expect("u1"),
            reason: "not registered".into(),
            attempts: 1,
            parked_at_ms: 0,
        }],
        stream_reads: vec![read("user.2", 0)],
        ..Commit::default()
    };
    assert!(matches!(
        store.commit(parked).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(store.parked(None).await.expect("parked").is_empty());
}
