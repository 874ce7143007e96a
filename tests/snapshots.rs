//! Snapshots through the real path: the counter guest handles a long entity's commands, its
//! consumer's commits store snapshots of the entity, `project` starts from the latest, another
//! component version never does, and a rebuild removes them.

mod support;

use std::time::{Duration, Instant};

use ferry::service::{self, SNAPSHOT_EVERY};
use ferry::store::{Commit, NewMessage, StreamName};
use ferry::wasm::{Limits, Runtime};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_entity_is_snapshotted_and_another_version_starts_from_the_first_event() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, running, consumer) = support::start_counter_commands(dir.path());
    let commands = StreamName::parse("counter:command.long").expect("stream");
    let events = StreamName::parse("counter.long").expect("stream");
    let increments = |wave: usize, count: usize| {
        let batch = (0..count)
            .map(|n| NewMessage {
                id: format!("c-{wave}-{n}"),
                message_type: "Increment".into(),
                data: serde_json::json!({ "by": 1 }),
                metadata: Default::default(),
                not_before_ms: None,
            })
            .collect();
        Commit::append(commands.clone(), None, batch)
    };
    // Settled past the last command: the consumer's position need not reach the head, which
    // its own events moved.
    let (store_ref, consumer_ref) = (&store, &consumer);
    let handled = |last: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        while store_ref.settled(consumer_ref).await.expect("settled") < last {
            assert!(Instant::now() < deadline, "every command handled in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let written =
        |commit: ferry::store::Committed| commit.written.last().expect("written").global_position;
    let waves = (SNAPSHOT_EVERY as usize * 2 + 300) / 100;
    let mut last = 0;
    for wave in 0..waves {
        let commit = increments(wave, 100);
        last = written(store.commit(commit).await.expect("commands written"));
    }
    handled(last).await;
    // A pipelined page folds the events of the page before it as pending, never as stored, so
    // the stream's tail may not have passed a snapshot point yet: one more command folds all of
    // it from the store.
    let last = written(
        store
            .commit(increments(waves, 1))
            .await
            .expect("command written"),
    );
    handled(last).await;
    running.shutdown().await;
    let total = waves * 100 + 1;

    let runtime = Runtime::new(None).expect("runtime");
    let load = |name: &str| {
        std::sync::Arc::new(
            runtime
                .load_file(&support::guest(name), Limits::default())
                .expect("load"),
        )
    };
    let counter = load("counter_commands");
    let stored = store
        .snapshot(&events, counter.hash())
        .await
        .expect("read")
        .expect("the consumer's commits stored a snapshot of the long entity");
    assert!(
        stored.version >= SNAPSHOT_EVERY * 2 && stored.version <= total as u64,
        "the latest snapshot point passed: {}",
        stored.version
    );
    let projected = service::project(counter.clone(), store.clone(), events.clone())
        .await
        .expect("project");
    assert_eq!(projected.snapshot, Some(stored.version), "started from it");
    assert_eq!(projected.version, total as u64);
    let state: serde_json::Value =
        serde_json::from_str(&projected.state.expect("state")).expect("json state");
    assert_eq!(
        state["total"], total,
        "the same total as folding every event"
    );

    // Another version of the service (a hot reload would load it) folds from the first event.
    let next = load("counter_next");
    assert_ne!(next.hash(), counter.hash());
    let projected = service::project(next, store.clone(), events.clone())
        .await
        .expect("project with the next version");
    assert_eq!(projected.snapshot, None, "no other version's snapshot");
    assert_eq!(projected.version, total as u64);

    // `ferry rebuild` derives everything from the events again.
    store
        .rebuild_views(&[], &[consumer])
        .await
        .expect("rebuild");
    assert_eq!(
        store.snapshot(&events, counter.hash()).await.expect("read"),
        None
    );
}
