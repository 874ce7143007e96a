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
                vec![conformance::msg(
                    "u1",
                    "UserRegistered",
                    json!({"name": "Ann"}),
                )],
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
    let data = dir.path().join("data");
    let mut host = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--data")
        .arg(&data)
        .arg("--services")
        .arg(dir.path().join("services"))
        .arg("run")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ferry run");
    let socket = data.join("ferry.sock");
    for _ in 0..600 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let result = SledStore::open(data.join("store"));
    let _ = host.kill();
    let _ = host.wait();
    let error = result.expect_err("the running host holds the folder");
    assert!(matches!(error, StoreError::Locked { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("in use by another Ferry process")
    );
}

#[tokio::test]
async fn refuses_a_folder_of_an_unknown_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    {
        let db = sled::open(&path).expect("sled");
        db.open_tree("meta")
            .expect("tree")
            .insert("format", "ferry-sled/99")
            .expect("insert");
        db.flush().expect("flush");
    }
    // sled's own background flusher may hold the folder for a moment after the drop above.
    let mut error = SledStore::open(&path).expect_err("unknown format");
    for _ in 0..100 {
        if !matches!(error, StoreError::Locked { .. }) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        error = SledStore::open(&path).expect_err("unknown format");
    }
    assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("ferry-sled/99"), "{error}");
}

#[tokio::test]
async fn refuses_a_damaged_folder_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    {
        let store = SledStore::open(&path).expect("create");
        store
            .commit(Commit::append(
                conformance::stream("user.1"),
                None,
                vec![conformance::msg("u1", "UserRegistered", json!({}))],
            ))
            .await
            .expect("append");
    }
    // Damage every data file sled wrote.
    for entry in std::fs::read_dir(&path).expect("folder") {
        let file = entry.expect("entry").path();
        if file.is_file() && file.file_name().is_some_and(|n| n != "db") {
            std::fs::write(&file, b"this is not what sled wrote").expect("damage");
        }
    }
    std::fs::write(path.join("db"), vec![0xA5u8; 4096]).expect("damage");
    let opened = std::panic::catch_unwind(|| SledStore::open(&path));
    let error = opened
        .expect("opening a damaged folder does not panic")
        .expect_err("damaged");
    assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
}
