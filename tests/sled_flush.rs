//! What a durable commit costs in threads: sled writes each flushed buffer on a thread of its IO
//! pool, and Ferry builds sled with that pool waking one idle thread per buffer
//! (vendor/sled/PATCHED.md). Alone in its test binary, because the pool is one per process.

use std::sync::Arc;

use ferry::store::{Commit, MessageStore, NewMessage, SledStore, StreamName};
use serde_json::json;

/// Voluntary context switches of the process's sled IO threads so far: each is a time the thread
/// went to sleep, so one per wake-up.
fn io_thread_sleeps() -> u64 {
    let mut sleeps = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sled-io") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        sleeps += status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    sleeps
}

#[tokio::test]
async fn a_flush_wakes_one_io_thread_not_the_whole_pool() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn MessageStore> =
        Arc::new(SledStore::open(dir.path().join("store")).expect("open"));
    let append = |n: usize| {
        Commit::append(
            StreamName::parse(&format!("counter.e{n}")).expect("stream name"),
            None,
            vec![NewMessage {
                id: format!("m{n}"),
                message_type: "Incremented".into(),
                data: json!({"by": 1}),
                metadata: Default::default(),
                not_before_ms: None,
            }],
        )
    };
    // The pool starts its idle threads with the first buffer written.
    store.commit(append(0)).await.expect("first commit");
    let commits = 200;
    let before = io_thread_sleeps();
    for n in 1..=commits {
        // One at a time: every commit is a group of its own, so a flush of its own.
        store.commit(append(n)).await.expect("commit");
    }
    let per_flush = (io_thread_sleeps() - before) as f64 / commits as f64;
    // A flush hands the pool two or three buffers, each written by the one thread it wakes
    // (which also sleeps once waiting for the disk): ~6 sleeps per flush. With the published
    // `notify_all`, every idle thread of the seven woke for every buffer: ~12.
    assert!(
        per_flush < 9.0,
        "{per_flush:.1} IO thread wake-ups per flush"
    );
}
