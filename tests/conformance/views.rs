//! View data: rows written with their position, older changes ignored, rebuilt from the start.

use super::*;

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
