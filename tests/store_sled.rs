//! The embedded sled store: the conformance suite, plus what only a local folder can show.

mod conformance;

use std::sync::Arc;

use ferry::store::{Commit, MessageStore, SledStore, StoreError};
use serde_json::json;

async fn open_sled() -> (Arc<dyn MessageStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path().join("store")).expect("open");
    (Arc::new(store), dir)
}

conformance_suite!(open_sled);

#[tokio::test]
async fn keeps_committed_messages_across_a_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    {
        let store = SledStore::open(&path).expect("open");
        store
            .commit(Commit::append(
                conformance::stream("user.1"),
                None,
                vec![conformance::msg("u1", "UserRegistered", json!({"name": "Ann"}))],
            ))
            .await
            .expect("append");
    }
    let store = SledStore::open(&path).expect("reopen");
    let read = store
        .read_stream(&conformance::stream("user.1"), 0, 10)
        .await
        .expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].data["name"], "Ann");
    assert_eq!(store.head().await.expect("head"), 1);
}

#[tokio::test]
async fn refuses_a_folder_locked_by_another_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    drop(SledStore::open(&path).expect("create"));
    // flock is per open file description, so a second process is needed to see the lock.
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'r+'); fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
        ])
        .arg(path.join("db"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "locked");
    let error = SledStore::open(&path).expect_err("locked");
    let _ = holder.kill();
    assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    assert!(error.to_string().contains("in use by another Ferry process"));
}

#[tokio::test]
async fn refuses_a_folder_of_an_unknown_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    {
        let db = sled::open(&path).expect("sled");
        db.open_tree("meta").expect("tree").insert("format", "ferry-sled/99").expect("insert");
        db.flush().expect("flush");
    }
    let error = SledStore::open(&path).expect_err("unknown format");
    assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("ferry-sled/99"), "{error}");
}
