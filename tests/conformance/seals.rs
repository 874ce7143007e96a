//! Sealed fields: a message's key kept with it, the first key kept, shredded by the commit that
//! settles the message, and none stored for a refused commit.

use super::*;

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
