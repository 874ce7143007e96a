//! The store conformance suite: the behaviour every `MessageStore` backend must show, written
//! against the trait only. A backend's test file calls `conformance_suite!` with a function that
//! opens a fresh, empty store (and a guard that keeps its resources alive).
//!
//! One file per area: `streams`, `consumers` (categories, positions, parking), `views`, `seals`,
//! `snapshots`; this one holds the helpers they share and the macro.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ferry::store::{
    Category, CategoryFilter, Commit, ConsumerId, GroupSpec, MessageStore, NewMessage,
    ParkedMessage, PartitionFrom, PartitionKey, PartitionPosition, SealKey, Settle, Snapshot,
    StoreError, StreamAppend, StreamName, StreamRead, ViewRead, ViewWrite,
};
use serde_json::{Map, Value, json};

pub type Store = Arc<dyn MessageStore>;

mod consumers;
mod seals;
mod snapshots;
mod streams;
mod views;

pub use consumers::*;
pub use seals::*;
pub use snapshots::*;
pub use streams::*;
pub use views::*;

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
            refuses_a_commit_whose_read_stream_changed_since_it_was_read,
            skips_a_message_whose_id_is_stored,
            refuses_an_id_used_by_another_stream,
            refuses_messages_past_the_bounds,
            refuses_data_that_is_not_an_object,
            reads_a_category_from_a_position_with_an_origin_filter,
            keeps_consumer_positions_per_category,
            refuses_to_advance_a_consumer_that_moved,
            refuses_a_commit_with_a_stored_id_when_asked,
            rebuilds_views_from_the_start,
            commits_an_outcome_with_the_consumer_position,
            ignores_a_view_change_from_an_older_position,
            refuses_a_commit_whose_view_row_changed_since_it_was_read,
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
