//! Snapshots against the plain fold: whatever the events, a fold that starts from a snapshot ends
//! where a fold of every event from the first does.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::*;
use crate::store::{Commit, NewMessage, SledStore};
use crate::wasm::{GuestError, GuestHost, Manifest, NativeService, Outcome, ServiceComponent};

/// A projection that depends on every event and on their order: a count and a rolling hash.
struct Ordered;

impl NativeService for Ordered {
    fn manifest(&self) -> Manifest {
        Manifest {
            name: "ordered".into(),
            handles_commands: true,
            subscriptions: Vec::new(),
            views: Vec::new(),
        }
    }

    fn project(
        &self,
        _: &mut dyn GuestHost,
        state: Option<&str>,
        event: &Message,
    ) -> Result<String, GuestError> {
        let state: Value = state
            .and_then(|text| serde_json::from_str(text).ok())
            .unwrap_or(Value::Null);
        let count = state["n"].as_i64().unwrap_or(0);
        let hash = state["h"].as_i64().unwrap_or(0);
        let by = event.data["by"].as_i64().unwrap_or(0);
        let hash = (hash * 31 + by + 7).rem_euclid(1_000_000_007);
        Ok(serde_json::json!({ "n": count + 1, "h": hash }).to_string())
    }

    fn handle_command(
        &self,
        _: &mut dyn GuestHost,
        _: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        Ok(Outcome::default())
    }

    fn handle_event(
        &self,
        _: &mut dyn GuestHost,
        _: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        Ok(Outcome::default())
    }
}

/// Folds the stored stream from its first event, with `cache` for snapshots or without.
fn fold_stored(
    store: &Arc<dyn MessageStore>,
    component: &ServiceComponent,
    cache: Option<&ProjectionCache>,
    stream: &StreamName,
) -> Folded {
    let runtime = Handle::current();
    let host = StoreHost::for_projection(runtime.clone(), store.clone(), "ordered".into());
    let mut instance = component.instantiate(Box::new(host)).expect("instance");
    let folded = fold(
        &runtime,
        Some(store.as_ref()),
        None,
        cache,
        &mut instance,
        stream,
        (None, 0),
        None,
    );
    match folded {
        Ok(folded) => folded,
        Err(Decline::Guest(e) | Decline::Handler(e, _)) => panic!("the guest failed: {e}"),
        Err(Decline::Store(e)) => panic!("the store failed: {e}"),
    }
}

async fn append(store: &Arc<dyn MessageStore>, stream: &StreamName, first: usize, by: &[i64]) {
    for (chunk_start, chunk) in (first..).step_by(500).zip(by.chunks(500)) {
        let messages = chunk
            .iter()
            .enumerate()
            .map(|(n, by)| NewMessage {
                id: format!("e{}", chunk_start + n),
                message_type: "Changed".into(),
                data: serde_json::json!({ "by": by }),
                metadata: Map::new(),
                not_before_ms: None,
            })
            .collect();
        store
            .commit(Commit::append(stream.clone(), None, messages))
            .await
            .expect("append");
    }
}

/// Appends the events in parts (cut at `cuts`); after each part folds the stream cold, as after a
/// restart, storing the snapshots the fold took, and compares with the plain fold.
async fn same_state_with_and_without_snapshots(by: Vec<i64>, mut cuts: Vec<usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn MessageStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
    let component = Arc::new(ServiceComponent::native(Arc::new(Ordered)));
    let stream = StreamName::parse("ordered.one").expect("stream");
    cuts.push(by.len());
    cuts.sort_unstable();
    let mut stored = 0;
    for cut in cuts.into_iter().map(|cut| cut.min(by.len())) {
        append(&store, &stream, stored, &by[stored..cut]).await;
        stored = cut;
        let (store_, component_, stream_) = (store.clone(), component.clone(), stream.clone());
        let (with, without, due) = tokio::task::spawn_blocking(move || {
            // A fresh cache: nothing folded in memory, as after a restart.
            let cache = ProjectionCache::new(component_.hash());
            let with = fold_stored(&store_, &component_, Some(&cache), &stream_);
            let without = fold_stored(&store_, &component_, None, &stream_);
            (with, without, cache.take_due_snapshots())
        })
        .await
        .expect("fold thread");
        assert_eq!(with, without, "after {stored} events");
        store
            .commit(Commit {
                snapshots: due,
                ..Commit::default()
            })
            .await
            .expect("snapshots stored");
        let projected = project(component.clone(), store.clone(), stream.clone())
            .await
            .expect("project");
        assert_eq!(
            (projected.state, projected.version),
            without,
            "ferry project after {stored} events"
        );
        if stored as u64 >= SNAPSHOT_EVERY {
            assert!(
                projected.snapshot.is_some(),
                "a stream of {stored} events has a snapshot"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn a_snapshot_never_changes_the_projected_state(
        by in prop::collection::vec(-3i64..3, 0..2700),
        cuts in prop::collection::vec(0usize..2700, 0..4),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(same_state_with_and_without_snapshots(by, cuts));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_component_version_is_never_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn MessageStore> = Arc::new(SledStore::open(dir.path()).expect("store"));
    let component = Arc::new(ServiceComponent::native(Arc::new(Ordered)));
    let stream = StreamName::parse("ordered.one").expect("stream");
    append(&store, &stream, 0, &[1; 1500]).await;
    // A snapshot that no fold could produce, stored for another version's hash.
    store
        .commit(Commit {
            snapshots: vec![Snapshot {
                stream: stream.clone(),
                component: "0ther".into(),
                version: 1400,
                state: r#"{"n":-1,"h":-1}"#.into(),
            }],
            ..Commit::default()
        })
        .await
        .expect("snapshot stored");
    let projected = project(component, store, stream).await.expect("project");
    assert_eq!(projected.snapshot, None);
    let state: Value = serde_json::from_str(&projected.state.expect("state")).expect("json");
    assert_eq!(state["n"], 1500, "folded from the first event");
}
