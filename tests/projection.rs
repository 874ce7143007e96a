//! The projection cache: a stored event passes through `project` about twice at most (once while
//! pending in the batch that writes it, once from the store in the next batch), however many
//! commands of its entity are handled afterwards. In a test binary of its own, because the
//! counters it reads are per process.

mod support;

use std::time::{Duration, Instant};

use ferry::service;
use ferry::store::{Commit, NewMessage, StreamName};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_each_event_a_bounded_number_of_times_across_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, running, consumer) = support::start_counter_commands(dir.path());
    let stream = StreamName::parse("counter:command.one").expect("stream");

    // 20 waves of 10 commands on one entity: at least 20 batches, each projecting the entity.
    let (waves, per_wave) = (20, 10);
    for wave in 0..waves {
        let commands = (0..per_wave)
            .map(|n| NewMessage {
                id: format!("c-{wave}-{n}"),
                message_type: "Increment".into(),
                data: serde_json::json!({ "by": 1 }),
                metadata: Default::default(),
                not_before_ms: None,
            })
            .collect();
        let written = store
            .commit(Commit::append(stream.clone(), None, commands))
            .await
            .expect("commands written");
        let last = written.written.last().expect("written").global_position;
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.settled(&consumer).await.expect("settled") < last {
            assert!(Instant::now() < deadline, "wave {wave} handled in time");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    running.shutdown().await;

    let events = store
        .read_stream(&StreamName::parse("counter.one").expect("stream"), 0, 1000)
        .await
        .expect("events");
    assert_eq!(events.len(), waves * per_wave);
    assert_eq!(
        events.last().expect("an event").data["total"],
        waves * per_wave,
        "the folded state is right"
    );
    // Refolding the stream from the start for every batch would cost 10 + 20 + … + 200 = 2100.
    let projected = service::metrics()["counter"].projected_events;
    assert!(
        projected <= 2 * (waves * per_wave) as u64,
        "{projected} project calls for {} events",
        waves * per_wave
    );
}
