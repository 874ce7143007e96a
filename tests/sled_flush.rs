//! What a durable commit costs in threads: sled writes each flushed buffer on a thread of its IO
//! pool, and Ferry builds sled with that pool waking one idle thread per buffer
//! (vendor/sled/PATCHED.md). Alone in its test binary, because the pool is one per process.
//! Linux only: it reads the threads' context switches from `/proc`.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::sync::Arc;

use ferry::store::{Commit, MessageStore, NewMessage, SledStore, StreamName};
use serde_json::json;

/// Voluntary context switches of each of the process's sled IO threads so far: each is a time
/// the thread went to sleep, so one per wake-up.
fn io_thread_sleeps() -> HashMap<String, u64> {
    let mut sleeps = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("sled-io") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let count = status
            .lines()
            .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
        sleeps.insert(task.file_name().to_string_lossy().into_owned(), count);
    }
    sleeps
}

/// The sleeps once they have stopped changing for a few milliseconds (at most half a second).
async fn settled_io_thread_sleeps() -> HashMap<String, u64> {
    let mut last = io_thread_sleeps();
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let now = io_thread_sleeps();
        if now == last {
            break;
        }
        last = now;
    }
    last
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
    let mut before = settled_io_thread_sleeps().await;
    assert_eq!(before.len(), 7, "sled's idle IO threads: {before:?}");
    let commits = 100;
    let mut woken = 0;
    for n in 1..=commits {
        // One at a time: every commit is a group of its own, so a flush of its own.
        store.commit(append(n)).await.expect("commit");
        // The thread that wrote the buffer may still be on its way back to sleep.
        let after = settled_io_thread_sleeps().await;
        woken += after
            .iter()
            .filter(|(thread, sleeps)| before.get(*thread).is_none_or(|b| b < *sleeps))
            .count();
        before = after;
    }
    let per_flush = woken as f64 / commits as f64;
    // A flush hands the pool two or three buffers, each written by the one idle thread it wakes.
    // With the published `notify_all`, all seven idle threads woke for every buffer.
    assert!(
        (1.0..5.0).contains(&per_flush),
        "{per_flush:.1} of sled's IO threads woke per flush"
    );
}
