//! The JetStream store on a real three-server cluster with a namespace kept by all three: the
//! conformance suite, the replica count asked for by the URL, and a member whose storage was
//! lost healing from the others.

mod conformance;
mod support;

use std::sync::Arc;
use std::time::Duration;

use ferry::store::{CategoryFilter, Commit, MessageStore, NatsStore, StoreError};
use serde_json::json;
use support::cluster::NatsCluster;

async fn open_cluster() -> (Arc<dyn MessageStore>, NatsCluster) {
    let cluster = NatsCluster::start(3);
    let store = NatsStore::connect(&cluster.url("ferry", 3))
        .await
        .expect("connect");
    (Arc::new(store), cluster)
}

conformance_suite!(open_cluster);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_namespace_kept_by_another_count_of_servers_until_it_is_changed() {
    let cluster = NatsCluster::start(3);
    let one = cluster.url("clu", 1);
    let three = cluster.url("clu", 3);
    drop(
        NatsStore::connect(&one)
            .await
            .expect("made with one replica"),
    );
    assert_eq!(
        cluster.stream_state("clu").map(|(_, current)| current),
        Some(0)
    );

    match NatsStore::connect(&three).await {
        Err(StoreError::Unusable { reason, .. }) => {
            assert!(
                reason.contains("kept by 1 server(s)") && reason.contains("ferry replicas 3"),
                "{reason}"
            );
        }
        other => panic!("a namespace of one replica taken for three: {other:?}"),
    }
    // Without `?replicas` the namespace is taken as it is.
    let without = three.replace("?replicas=3", "");
    drop(NatsStore::connect(&without).await.expect("taken as it is"));

    assert_eq!(
        NatsStore::set_replicas(&without, 3).await.expect("scaled"),
        1
    );
    cluster.wait_until_replicated("clu");
    let store = NatsStore::connect(&three)
        .await
        .expect("three replicas now");
    store
        .commit(Commit::append(
            conformance::stream("user.1"),
            None,
            vec![conformance::msg("u1", "UserRegistered", json!({}))],
        ))
        .await
        .expect("written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_storage_was_lost_heals_from_the_others() {
    let mut cluster = NatsCluster::start(3);
    let store = NatsStore::connect(&cluster.url("ferry", 3))
        .await
        .expect("connect");
    let messages = 200;
    for n in 0..messages {
        store
            .commit(Commit::append(
                conformance::stream(&format!("user.{}", n % 10)),
                None,
                vec![conformance::msg(
                    &format!("m{n}"),
                    "UserRegistered",
                    json!({ "n": n }),
                )],
            ))
            .await
            .expect("written");
    }
    cluster.wait_until_replicated("ferry");
    let leader = cluster.leader("ferry");
    let lost = (leader + 1) % 3;
    cluster.servers[lost].kill();
    cluster.servers[lost].wipe_storage();
    // Written while it is down: it has none of the history when it comes back.
    store
        .commit(Commit::append(
            conformance::stream("user.late"),
            None,
            vec![conformance::msg("late", "UserRegistered", json!({}))],
        ))
        .await
        .expect("written with one member down");
    cluster.servers[lost].start_again();
    cluster.wait_until_replicated("ferry");
    let head = store.head().await.expect("head");
    assert_eq!(
        cluster.member_last_sequence(lost, "ferry"),
        Some(head),
        "the wiped member holds the whole stream again"
    );

    // With the old leader gone, the healed member is one of the two that make the quorum.
    cluster.servers[leader].kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read = loop {
        let all = CategoryFilter::default();
        match store
            .read_category(&conformance::category("user"), 0, &all, 1000)
            .await
        {
            Ok(read) => break read.messages,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "reads resume: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(read.len(), messages + 1, "nothing is missing");
}
