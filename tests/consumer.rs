//! A consumer's pipelined pages against writes it did not make: while its next page is decided
//! on top of the page in flight, someone else appends to the same entities, and every decision
//! must still stand on what is stored.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry::store::{Commit, NewMessage, StreamName};
use serde_json::json;

fn new_message(id: String, message_type: &str, by: i64) -> NewMessage {
    NewMessage {
        id,
        message_type: message_type.into(),
        data: json!({ "by": by }),
        metadata: Default::default(),
        not_before_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decides_on_what_is_stored_when_others_write_to_its_entities() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, running, consumer) = support::start_counter_commands(dir.path());
    let entity = |n: usize| StreamName::parse(&format!("counter.e{}", n % 4)).expect("stream");

    // Someone else: events of 1000 appended straight to the entities while the commands are
    // handled (no expected version: they land between the consumer's pages).
    let done = Arc::new(AtomicBool::new(false));
    let outsider = tokio::spawn({
        let (store, done) = (store.clone(), done.clone());
        async move {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && n < 2000 {
                store
                    .commit(Commit::append(
                        entity(n),
                        None,
                        vec![new_message(format!("outside-{n}"), "Incremented", 1000)],
                    ))
                    .await
                    .expect("the outsider's write");
                n += 1;
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            n
        }
    });

    // 1200 commands of 1 over four entities, in commits of 20.
    let (chunks, per_chunk) = (60, 20);
    let mut last = 0;
    for chunk in 0..chunks {
        let commands = (0..per_chunk)
            .map(|n| new_message(format!("c-{chunk}-{n}"), "Increment", 1))
            .collect();
        let command_stream =
            StreamName::parse(&format!("counter:command.e{}", chunk % 4)).expect("stream");
        let written = store
            .commit(Commit::append(command_stream, None, commands))
            .await
            .expect("commands written");
        last = written.written.last().expect("written").global_position;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.settled(&consumer).await.expect("settled") < last {
        assert!(
            Instant::now() < deadline,
            "the commands are handled in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done.store(true, Ordering::Relaxed);
    let outside = outsider.await.expect("the outsider ran");
    running.shutdown().await;
    assert!(
        outside > 0,
        "the outsider wrote while the commands were handled"
    );

    // Each event the consumer wrote carries the total it decided: the sum of every event before
    // it in the stream, the outsider's included, plus its own.
    for n in 0..4 {
        let events = store
            .read_stream(&entity(n), 0, 100_000)
            .await
            .expect("events");
        let mut total = 0;
        let mut handled = 0;
        for event in &events {
            total += event.data["by"].as_i64().expect("by");
            if !event.id.starts_with("outside-") {
                assert_eq!(
                    event.data["total"], total,
                    "event {} at {} of {} was decided on the stored stream",
                    event.id, event.position, event.stream
                );
                handled += 1;
            }
        }
        assert_eq!(handled, chunks * per_chunk / 4, "each command once on {n}");
    }
}
