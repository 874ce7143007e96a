//! Categories and consumers: reading a category with filters, positions per consumer and per
//! partition, outcomes committed with the position, parking and replay, waking a waiting
//! consumer, and refusing a position that moved.

use super::*;

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
                partition: GroupSpec::new(PartitionKey::Entity).partition_of(&message),
                epoch: 0,
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
                partition: GroupSpec::new(PartitionKey::Entity).partition_of(&message),
                epoch: 0,
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
