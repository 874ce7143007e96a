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

/// A decision on a view row holds only while the row is as the handler read it: the second of
/// two commits that read the same row fails whole, and one that read the row writes it whatever
/// wrote it last (two entities adding to one total).
pub async fn refuses_a_commit_whose_view_row_changed_since_it_was_read(store: Store) {
    let add = |total: u64, seq, read: Option<u64>| Commit {
        appends: vec![StreamAppend {
            stream: stream(&format!("deposit.{seq}")),
            expected_version: None,
            messages: vec![msg(&format!("d{seq}"), "Deposited", json!({}))],
        }],
        views: vec![ViewWrite {
            table: "totals".into(),
            key: "all".into(),
            value: Some(json!({ "total": total })),
            seq,
        }],
        view_reads: vec![ViewRead {
            table: "totals".into(),
            key: "all".into(),
            value: read.map(|total| json!({ "total": total })),
        }],
        ..Commit::default()
    };
    let row = || async {
        store
            .view_get("totals", "all")
            .await
            .expect("get")
            .expect("row")
    };
    // Read as absent, written.
    store.commit(add(1, 10, None)).await.expect("first");
    let first = row().await;
    assert_eq!(
        (first.value["total"].as_u64(), first.last_update_seq),
        (Some(1), 10)
    );
    // Two decisions on that row: the first lands, the second is refused whole.
    store.commit(add(2, 12, Some(1))).await.expect("second");
    match store.commit(add(2, 11, Some(1))).await {
        Err(StoreError::ViewChanged { table, key }) => {
            assert_eq!((table.as_str(), key.as_str()), ("totals", "all"))
        }
        other => panic!("expected the row to have changed, got {other:?}"),
    }
    assert!(
        store.message("d11").await.expect("read").is_none(),
        "nothing of the refused commit is written"
    );
    // Decided again on the row as it stands: written, though an older message decided it.
    store
        .commit(add(3, 11, Some(2)))
        .await
        .expect("decided again");
    let third = row().await;
    assert_eq!(third.value["total"], 3);
    assert_eq!(third.last_update_seq, 12, "lastUpdateSeq never goes back");
    // A row read as absent that is there now.
    match store.commit(add(9, 13, None)).await {
        Err(StoreError::ViewChanged { .. }) => {}
        other => panic!("expected the row to have changed, got {other:?}"),
    }
    // A key past the bound names no row: read as absent, it holds (a handler looking up a
    // 5 000-character username), and no subject is made of it.
    let long = Commit {
        appends: vec![StreamAppend {
            stream: stream("deposit.14"),
            expected_version: None,
            messages: vec![msg("d14", "Deposited", json!({}))],
        }],
        view_reads: vec![ViewRead {
            table: "totals".into(),
            key: "k".repeat(5000),
            value: None,
        }],
        ..Commit::default()
    };
    store
        .commit(long)
        .await
        .expect("a read of a key no row can have");
}
