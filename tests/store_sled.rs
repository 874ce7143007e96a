//! The embedded sled store: the conformance suite, plus what only a local folder can show.

mod conformance;

use std::sync::Arc;

use ferry::store::{
    Commit, ConsumerId, GroupSpec, Message, MessageStore, PartitionKey, SledStore, StoreError,
};
use serde_json::json;

async fn open_sled() -> (Arc<dyn MessageStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SledStore::open(dir.path().join("store")).expect("open");
    (Arc::new(store), dir)
}

conformance_suite!(open_sled);

/// The same suite with the store's memory bounds at their smallest: a page cache of 256 KiB and
/// no stream version remembered past the group that wrote it, so every check reads the tree
/// again. A bound must cost only time, never serve a stale version.
mod tiny_bounds {
    use super::*;

    async fn open_tiny() -> (Arc<dyn MessageStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store =
            SledStore::open_with_bounds(dir.path().join("store"), 256 * 1024, 0).expect("open");
        (Arc::new(store), dir)
    }

    conformance_suite!(open_tiny);
}

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
    let store = open_when_free(&path).expect("reopen");
    let read = store
        .read_stream(&conformance::stream("user.1"), 0, 10)
        .await
        .expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].data["name"], "Ann");
    assert_eq!(store.head().await.expect("head"), 1);
}

/// Opens `path`, waiting while something else holds its lock for a moment: sled's background
/// flusher of a database just dropped, or a child process of another test, forked while the
/// folder was open and not yet past its `exec` (sled's lock is a `flock`, which the child shares).
fn open_when_free(path: &std::path::Path) -> Result<SledStore, StoreError> {
    let mut opened = SledStore::open(path);
    for _ in 0..100 {
        if !matches!(opened, Err(StoreError::Locked { .. })) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        opened = SledStore::open(path);
    }
    opened
}

/// Writes a folder the way the first format (`ferry-sled/1`, one tree per kind) did: three
/// messages in two user streams, a consumer position and a view row.
fn write_first_format(path: &std::path::Path) {
    let db = sled::open(path).expect("sled");
    let tree = |name: &str| db.open_tree(name).expect("tree");
    let key = |a: &str, b: &[u8]| [a.as_bytes(), &[0], b].concat();
    for (global, (stream, position)) in [("user.1", 0u64), ("user.2", 0), ("user.1", 1)]
        .into_iter()
        .enumerate()
    {
        let global = global as u64 + 1;
        let message = Message {
            id: format!("m{global}"),
            stream: conformance::stream(stream),
            message_type: "UserRegistered".into(),
            data: json!({"n": global}),
            metadata: serde_json::Map::new(),
            position,
            global_position: global,
            time_ms: 1,
            not_before_ms: None,
        };
        let json = serde_json::to_vec(&message).expect("json");
        tree("messages")
            .insert(global.to_be_bytes(), json)
            .expect("insert");
        tree("streams")
            .insert(key(stream, &position.to_be_bytes()), &global.to_be_bytes())
            .expect("insert");
        tree("versions")
            .insert(stream, &(position + 1).to_be_bytes())
            .expect("insert");
        tree("categories")
            .insert(key("user", &global.to_be_bytes()), &[])
            .expect("insert");
        tree("ids")
            .insert(message.id.as_bytes(), &global.to_be_bytes())
            .expect("insert");
    }
    tree("consumers")
        .insert(key("user", b"microservice:users"), &2u64.to_be_bytes())
        .expect("insert");
    tree("views")
        .insert(
            key("users", b"1"),
            &br#"{"value":{"name":"Ann"},"lastUpdateSeq":1}"#[..],
        )
        .expect("insert");
    tree("meta")
        .insert("head", &3u64.to_be_bytes())
        .expect("insert");
    tree("meta")
        .insert("format", "ferry-sled/1")
        .expect("insert");
    db.flush().expect("flush");
}

#[tokio::test]
async fn copies_a_folder_of_the_first_format_without_losing_anything() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    write_first_format(&path);
    {
        let store = open_when_free(&path).expect("opens and copies the first format");
        let user_1 = store
            .read_stream(&conformance::stream("user.1"), 0, 10)
            .await
            .expect("read");
        let globals: Vec<_> = user_1.iter().map(|m| m.global_position).collect();
        assert_eq!(globals, [1, 3]);
        let page = store
            .read_category(
                &conformance::category("user"),
                0,
                &ferry::store::CategoryFilter::default(),
                10,
            )
            .await
            .expect("category");
        assert_eq!(page.messages.len(), 3);
        assert_eq!(store.head().await.expect("head"), 3);
        assert_eq!(
            store
                .message("m2")
                .await
                .expect("by id")
                .expect("m2")
                .stream
                .as_str(),
            "user.2"
        );
        let consumer = ConsumerId::new(conformance::category("user"), "microservice:users");
        // The position of the format before groups is where every partition starts.
        let group = store
            .join_group(&consumer, GroupSpec::new(PartitionKey::Entity))
            .await
            .expect("join");
        assert!(group.positions.iter().all(|p| p.position == 2));
        let row = store
            .view_get("users", "1")
            .await
            .expect("row")
            .expect("row");
        assert_eq!(row.value["name"], "Ann");
        // Versions and ids carry on from the copied messages.
        let next = store
            .commit(Commit::append(
                conformance::stream("user.1"),
                Some(2),
                vec![
                    conformance::msg("m1", "UserRegistered", json!({})),
                    conformance::msg("m4", "UserRegistered", json!({})),
                ],
            ))
            .await
            .expect("append after the copy");
        assert_eq!(next.duplicates, ["m1"]);
        assert_eq!(next.written[0].global_position, 4);
        assert_eq!(next.written[0].position, 2);
    }
    let reopened = open_when_free(&path).expect("reopens in the new format");
    assert_eq!(reopened.head().await.expect("head"), 4);
}

/// Writes a folder the way the second format (`ferry-sled/2`, messages in the one tree) did:
/// `messages` messages taking turns over `user.0..7` and `email.0..3` (so the categories
/// interleave in global order), a consumer position and a view row.
fn write_second_format(path: &std::path::Path, messages: u64) {
    let db = sled::open(path).expect("sled");
    let tree = db.open_tree("ferry").expect("tree");
    let key = |tag: u8, a: &str, b: &[u8]| [&[tag][..], a.as_bytes(), &[0], b].concat();
    let mut versions = std::collections::HashMap::new();
    let mut batch = sled::Batch::default();
    for global in 1..=messages {
        let stream = if global % 3 == 0 {
            format!("email.{}", global % 4)
        } else {
            format!("user.{}", global % 8)
        };
        let version = versions.entry(stream.clone()).or_insert(0u64);
        let message = Message {
            id: format!("m{global}"),
            stream: conformance::stream(&stream),
            message_type: "Happened".into(),
            data: json!({"n": global}),
            metadata: serde_json::Map::new(),
            position: *version,
            global_position: global,
            time_ms: 1,
            not_before_ms: None,
        };
        *version += 1;
        let at = key(b'm', message.stream.category_str(), &global.to_be_bytes());
        batch.insert(
            key(b's', &stream, &message.position.to_be_bytes()),
            &global.to_be_bytes(),
        );
        batch.insert([&b"i"[..], message.id.as_bytes()].concat(), at.as_slice());
        batch.insert(at, serde_json::to_vec(&message).expect("json"));
        if global % 10_000 == 0 {
            tree.apply_batch(std::mem::take(&mut batch)).expect("batch");
        }
    }
    batch.insert(
        key(b'v', "users", b"1"),
        &br#"{"value":{"name":"Ann"},"lastUpdateSeq":1}"#[..],
    );
    batch.insert(
        key(b'c', "user", b"microservice:users"),
        &2u64.to_be_bytes(),
    );
    batch.insert(&b"=head"[..], &messages.to_be_bytes());
    batch.insert(&b"=format"[..], &b"ferry-sled/2"[..]);
    tree.apply_batch(batch).expect("batch");
    db.flush().expect("flush");
}

/// Checks a store converted from [`write_second_format`] with `messages` messages.
async fn check_second_format(store: &SledStore, messages: u64) {
    assert_eq!(store.head().await.expect("head"), messages);
    let user_1 = store
        .read_stream(&conformance::stream("user.1"), 0, usize::MAX)
        .await
        .expect("read");
    let expected: Vec<u64> = (1..=messages)
        .filter(|g| g % 3 != 0 && g % 8 == 1)
        .collect();
    assert_eq!(
        user_1.iter().map(|m| m.global_position).collect::<Vec<_>>(),
        expected
    );
    assert!(
        user_1
            .iter()
            .enumerate()
            .all(|(n, m)| m.position == n as u64)
    );
    let page = store
        .read_category(
            &conformance::category("email"),
            0,
            &ferry::store::CategoryFilter::default(),
            100,
        )
        .await
        .expect("category");
    let emails: Vec<u64> = (3..=messages).step_by(3).take(100).collect();
    assert_eq!(
        page.messages
            .iter()
            .map(|m| m.global_position)
            .collect::<Vec<_>>(),
        emails
    );
    let last = store
        .message(&format!("m{messages}"))
        .await
        .expect("by id")
        .expect("the last message");
    assert_eq!(last.data["n"], messages);
    let row = store.view_get("users", "1").await.expect("row");
    assert_eq!(row.expect("row").value["name"], "Ann");
    let tags: Vec<char> = store
        .account()
        .expect("account")
        .iter()
        .map(|a| a.tag)
        .collect();
    assert!(
        !tags.iter().any(|t| matches!(t, 'm' | 's' | 'i')),
        "the old message records are gone: {tags:?}"
    );
}

#[tokio::test]
async fn moves_the_messages_of_a_second_format_folder_into_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    write_second_format(&path, 5_000);
    {
        let store = open_when_free(&path).expect("opens and converts the second format");
        check_second_format(&store, 5_000).await;
        let next = store
            .commit(Commit::append(
                conformance::stream("user.1"),
                None,
                vec![
                    conformance::msg("m1", "Happened", json!({})),
                    conformance::msg("m5001", "Happened", json!({})),
                ],
            ))
            .await
            .expect("append after the conversion");
        assert_eq!(next.duplicates, ["m1"]);
        assert_eq!(next.written[0].global_position, 5_001);
    }
    let reopened = open_when_free(&path).expect("reopens");
    assert_eq!(reopened.head().await.expect("head"), 5_001);
}

/// Not a test on its own: `a_conversion_killed_midway_leaves_the_old_data_whole` runs this
/// test binary again with `FERRY_TEST_OPEN` set, to open (and so convert) a store in a process
/// it can kill.
#[test]
fn opens_the_store_named_by_the_environment() {
    if let Some(path) = std::env::var_os("FERRY_TEST_OPEN") {
        SledStore::open(path).expect("open");
    }
}

#[tokio::test]
async fn a_conversion_killed_midway_leaves_the_old_data_whole() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("store");
    let messages = 60_000;
    write_second_format(&path, messages);
    let mut killed_while_running = 0;
    let mut still_old = 0;
    for delay_ms in [5u64, 40, 120, 250, 400, 700, 1000, 1500] {
        let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "opens_the_store_named_by_the_environment",
                "--test-threads",
                "1",
            ])
            .env("FERRY_TEST_OPEN", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("child");
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().expect("child").is_none() {
            killed_while_running += 1;
        }
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        // Either the old layout, whole, or the new one with the log in place.
        // Without sled's background flusher, which would hold the folder after the drop.
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .expect("sled opens after the kill");
        let tree = db.open_tree("ferry").expect("tree");
        let tag = tree.get("=format").expect("tag").expect("a format tag");
        if tag.as_ref() == b"ferry-sled/2" {
            still_old += 1;
            assert_eq!(tree.scan_prefix("m").count() as u64, messages);
            assert_eq!(tree.scan_prefix("i").count() as u64, messages);
        } else {
            assert_eq!(tag.as_ref(), b"ferry-sled/3");
            assert!(path.join("log").is_dir());
        }
        drop((tree, db));
    }
    assert!(killed_while_running > 0, "no kill caught the conversion");
    assert!(still_old > 0, "no kill came before the format flipped");
    let store = open_when_free(&path).expect("opens after the kills");
    check_second_format(&store, messages).await;
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

/// sled's files lost beside a message log (a partial restore, a careless clean-up): opening
/// would take the head for 0 and cut every acknowledged message off. It is refused, naming the
/// cause, and the log is left as it was.
#[tokio::test]
async fn refuses_a_message_log_whose_sled_files_are_gone() {
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
    let segment = path.join("log/segments/00000000.log");
    let before = std::fs::read(&segment).expect("segment");
    assert!(!before.is_empty());
    for entry in std::fs::read_dir(&path).expect("folder") {
        let entry = entry.expect("entry").path();
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.as_deref().is_some_and(|n| n != "log" && n != "secret") {
            if entry.is_dir() {
                std::fs::remove_dir_all(&entry).expect("remove");
            } else {
                std::fs::remove_file(&entry).expect("remove");
            }
        }
    }
    let error = SledStore::open(&path).expect_err("a log without its head");
    assert!(matches!(error, StoreError::Unusable { .. }), "{error}");
    assert!(error.to_string().contains("sled holds no head"), "{error}");
    assert_eq!(
        std::fs::read(&segment).expect("segment"),
        before,
        "the log is untouched"
    );

    // The commands the error names: `ferry store check` finds it, `ferry store repair` takes
    // the head from the log, and the message is there again.
    let ferry = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("--data")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("ferry")
    };
    let checked = ferry(&["store", "check"]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success(), "{said}");
    assert!(said.contains("sled holds nothing"), "{said}");
    let repaired = ferry(&["store", "repair"]);
    let said = String::from_utf8_lossy(&repaired.stdout);
    assert!(repaired.status.success(), "{said}");
    assert!(
        said.contains("head taken from the log: 1 messages"),
        "{said}"
    );
    assert!(said.contains("no damage found"), "{said}");
    let store = SledStore::open(&path).expect("repaired");
    assert_eq!(store.head().await.expect("head"), 1);
    let found = store.message("u1").await.expect("read");
    assert_eq!(found.map(|m| m.message_type), Some("UserRegistered".into()));
    drop(store);

    // A flipped byte in the log: found, named by segment and offset, exit 1.
    let mut bytes = std::fs::read(&segment).expect("segment");
    bytes[12] ^= 0x20;
    std::fs::write(&segment, bytes).expect("damage");
    let checked = ferry(&["store", "check"]);
    let said = String::from_utf8_lossy(&checked.stdout);
    assert!(!checked.status.success(), "{said}");
    assert!(
        said.contains("segment 00000000.log offset 0"),
        "names where: {said}"
    );
}
