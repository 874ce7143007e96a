//! Snapshots: the latest per stream and component.

use super::*;

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
