//! Damaged files of the embedded store: a byte flipped at random in a log segment, an index
//! run, the index's manifest or one of sled's files, case after case, each on a fresh copy of
//! one reference store. Each damaged copy either opens and answers every read exactly as the
//! reference does, or refuses (to open, or that read) with an error: never a wrong answer, never
//! a panic. A duplicate id is still found and an expected version still holds. `SledStore::check`
//! (`ferry store check`) finds the damage whenever it matters: in the log, the index and the
//! manifest every byte is covered by a checksum, so every case; in sled's files whenever the
//! copy answers otherwise than the reference.
//!
//! A copy whose sled files sled cannot read is repaired (`ferry store repair`: sled's files set
//! aside, the head taken from the log) and then holds every message again.
//!
//! `FERRY_DAMAGE_CASES` sets the cases per kind of file (default 40; the 200 with
//! `FERRY_DAMAGE_CASES=200`), `FERRY_DAMAGE_SEED` replays a run.

mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ferry::store::{
    Category, CategoryFilter, Commit, ConsumerId, GroupSpec, MessageStore, NewMessage,
    PartitionKey, SledStore, Snapshot, StoreError, StreamAppend, StreamName, ViewWrite,
};
use serde_json::{Map, json};
use support::Rng;

/// Streams per category; messages enough for the index to write a run (131 072 entries, three
/// per message) and keep more in memory.
const STREAMS: u64 = 40;
const MESSAGES: u64 = 45_000;
const PER_COMMIT: u64 = 500;

fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("stream name")
}

fn stream_of(n: u64) -> String {
    let category = if n.is_multiple_of(2) {
        "account"
    } else {
        "account:command"
    };
    format!("{category}.{}", n % STREAMS)
}

fn consumer() -> ConsumerId {
    ConsumerId {
        category: Category::parse("account:command").expect("category"),
        name: "account".into(),
    }
}

/// The reference store, written once for every case: messages in commits of many streams,
/// view rows, a consumer group and snapshots.
fn reference() -> &'static Path {
    static REFERENCE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = REFERENCE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let store = SledStore::open(&path).expect("open");
            for first in (1..=MESSAGES).step_by(PER_COMMIT as usize) {
                let mut appends: Vec<StreamAppend> = Vec::new();
                for n in first..first + PER_COMMIT {
                    let name = stream_of(n);
                    let message = NewMessage {
                        id: format!("m-{n}"),
                        message_type: "Counted".into(),
                        data: json!({ "n": n }),
                        metadata: Map::new(),
                        not_before_ms: None,
                    };
                    match appends.iter_mut().find(|a| a.stream.as_str() == name) {
                        Some(append) => append.messages.push(message),
                        None => appends.push(StreamAppend {
                            stream: stream(&name),
                            expected_version: None,
                            messages: vec![message],
                        }),
                    }
                }
                let views = (0..5)
                    .map(|row| ViewWrite {
                        table: "totals".into(),
                        key: format!("row-{row}"),
                        value: Some(json!({ "upTo": first })),
                        seq: first,
                    })
                    .collect();
                let snapshots = vec![Snapshot {
                    stream: stream(&stream_of(first)),
                    component: "c0ffee".into(),
                    version: 1,
                    state: format!("{{\"first\":{first}}}"),
                }];
                store
                    .commit(Commit {
                        appends,
                        views,
                        snapshots,
                        ..Commit::default()
                    })
                    .await
                    .expect("commit");
            }
            store
                .join_group(&consumer(), GroupSpec::new(PartitionKey::Entity))
                .await
                .expect("group");
        });
        let clean = SledStore::check(&path).expect("check");
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        assert_eq!(clean.log.messages, MESSAGES);
        assert!(clean.log.runs >= 1, "the index wrote a run");
        (dir, path)
    });
    path
}

/// Each answer as text, or the error it gave.
type Answers = Vec<Result<String, String>>;

/// Every read the test compares, each an answer or an error (a refusal is allowed, a different
/// answer is not).
async fn answers(store: &SledStore) -> Answers {
    fn shown<T: std::fmt::Debug>(result: Result<T, StoreError>) -> Result<String, String> {
        result.map(|v| format!("{v:?}")).map_err(|e| e.to_string())
    }
    let mut answers = vec![shown(store.head().await)];
    for n in 0..STREAMS {
        let name = stream(&stream_of(n));
        answers.push(shown(store.stream_version(&name).await));
        answers.push(shown(store.read_stream(&name, 0, 100_000).await.map(
            |messages| {
                messages
                    .iter()
                    .map(|m| (m.id.clone(), m.position, m.global_position))
                    .collect::<Vec<_>>()
            },
        )));
        answers.push(shown(store.snapshot(&name, "c0ffee").await));
    }
    for category in ["account", "account:command"] {
        let category = Category::parse(category).expect("category");
        let mut after = 0;
        let mut globals = Vec::new();
        let page = loop {
            match store
                .read_category(&category, after, &CategoryFilter::default(), 5000)
                .await
            {
                Ok(page) if page.messages.is_empty() => break Ok(globals),
                Ok(page) => {
                    after = page.scanned_to;
                    globals.extend(page.messages.iter().map(|m| m.global_position));
                }
                Err(e) => break Err(e),
            }
        };
        answers.push(shown(page));
    }
    for n in (1..=MESSAGES).step_by(997).chain([MESSAGES, MESSAGES + 1]) {
        answers.push(shown(store.message(&format!("m-{n}")).await));
    }
    for row in 0..5 {
        answers.push(shown(store.view_get("totals", &format!("row-{row}")).await));
    }
    answers.push(shown(store.group(&consumer()).await));
    answers
}

/// Writes the damaged copy must still decide as the reference would: an id it holds is a
/// duplicate, a stale expected version a conflict, a right one appends at the next position.
async fn writes(store: &SledStore) -> Answers {
    let message = |id: &str| NewMessage {
        id: id.into(),
        message_type: "Counted".into(),
        data: json!({}),
        metadata: Map::new(),
        not_before_ms: None,
    };
    let mut answers = Vec::new();
    for n in [1, MESSAGES / 2, MESSAGES] {
        let again = store
            .commit(Commit::append(
                stream(&stream_of(n)),
                None,
                vec![message(&format!("m-{n}"))],
            ))
            .await;
        answers.push(
            again
                .map(|c| format!("written {} duplicates {:?}", c.written.len(), c.duplicates))
                .map_err(|e| e.to_string()),
        );
    }
    let name = stream(&stream_of(7));
    // Stream n % STREAMS holds every STREAMS-th message.
    let version = MESSAGES / STREAMS;
    let stale = store
        .commit(Commit::append(
            name.clone(),
            Some(version - 1),
            vec![message("new-stale")],
        ))
        .await;
    answers.push(match stale {
        Err(StoreError::Conflict { .. }) => Ok("conflict".into()),
        other => Err(format!("{other:?}")),
    });
    let next = store
        .commit(Commit::append(
            name,
            Some(version),
            vec![message("new-next")],
        ))
        .await;
    answers.push(
        next.map(|c| {
            format!(
                "{:?}",
                c.written.iter().map(|m| m.position).collect::<Vec<_>>()
            )
        })
        .map_err(|e| e.to_string()),
    );
    answers
}

/// What the reference answers, read from a copy of it (writes change the store).
fn expected() -> &'static (Answers, Answers) {
    static EXPECTED: OnceLock<(Answers, Answers)> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let copy = tempfile::tempdir().expect("tempdir");
        let path = copy.path().join("store");
        copy_dir(reference(), &path);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let store = SledStore::open(&path).expect("open the copy");
            let expected = (answers(&store).await, writes(&store).await);
            assert!(
                expected.0.iter().chain(&expected.1).all(Result::is_ok),
                "the reference answers everything: {expected:?}"
            );
            expected
        })
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for entry in std::fs::read_dir(from).expect("list") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Every file of the copy in `root` of one kind.
fn files_of(root: &Path, kind: Kind) -> Vec<PathBuf> {
    let list = |dir: PathBuf| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.is_file());
        files.sort();
        files
    };
    match kind {
        Kind::Segment => list(root.join("log/segments")),
        Kind::Run => list(root.join("log/index"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "run"))
            .collect(),
        Kind::Manifest => vec![root.join("log/index/manifest")],
        Kind::Sled => {
            let mut files = list(root.to_path_buf());
            files.retain(|p| {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                name.is_some_and(|n| n == "db" || n == "conf" || n.starts_with("snap."))
            });
            files.extend(list(root.join("blobs")));
            files
        }
    }
}

/// `ferry store repair` on a store whose sled files cannot be read: sled's files set aside,
/// the head taken from the log, and every message there again.
async fn repaired_from_the_log(path: &Path, what: &str) {
    let done = SledStore::repair(path).unwrap_or_else(|e| panic!("{what}: repair: {e}"));
    assert!(!done.is_empty(), "{what}: the repair did nothing");
    let check = SledStore::check(path).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(check.problems.is_empty(), "{what}: {:?}", check.problems);
    let store = SledStore::open(path).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    assert_eq!(store.head().await.ok(), Some(MESSAGES), "{what}");
    let name = stream(&stream_of(3));
    let read = store.read_stream(&name, 0, 100_000).await;
    assert_eq!(
        read.map(|m| m.len()).ok(),
        Some((MESSAGES / STREAMS) as usize)
    );
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Segment,
    Run,
    Manifest,
    Sled,
}

fn cases() -> u64 {
    std::env::var("FERRY_DAMAGE_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(40)
}

/// Flips one random bit in a random file of `kind`, `cases()` times, each on a fresh copy.
fn damage(kind: Kind) {
    let (expected_reads, expected_writes) = expected();
    let mut rng = Rng::seeded("DAMAGE");
    println!("damage {kind:?}: FERRY_DAMAGE_SEED={}", rng.0);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (mut refused, mut opened, mut found) = (0, 0, 0);
    for case in 0..cases() {
        let copy = tempfile::tempdir().expect("tempdir");
        let path = copy.path().join("store");
        copy_dir(reference(), &path);
        let files = files_of(&path, kind);
        assert!(!files.is_empty(), "no file of kind {kind:?}");
        let file = &files[rng.between(0, files.len() as u64) as usize];
        let mut bytes = std::fs::read(file).expect("read");
        if bytes.is_empty() {
            continue;
        }
        let at = rng.between(0, bytes.len() as u64) as usize;
        let bit = 1u8 << rng.between(0, 8);
        bytes[at] ^= bit;
        std::fs::write(file, &bytes).expect("write");
        let what = format!(
            "case {case}: bit {bit:#04x} of byte {at} of {}",
            file.display()
        );

        let check = SledStore::check(&path);
        let reported = match &check {
            Ok(check) => !check.problems.is_empty(),
            Err(e) => {
                assert!(!e.to_string().is_empty(), "{what}: an empty error");
                true
            }
        };
        if reported {
            found += 1;
        }
        if matches!(kind, Kind::Segment | Kind::Run | Kind::Manifest) {
            assert!(reported, "{what}: the check did not find it: {check:?}");
        }

        let differs = runtime.block_on(async {
            let store = match SledStore::open(&path) {
                Ok(store) => store,
                Err(e) => {
                    assert!(!e.to_string().is_empty(), "{what}: an empty error");
                    refused += 1;
                    if refused == 1 {
                        println!("damage {kind:?}: the first refusal to open: {e}");
                    }
                    if kind == Kind::Sled {
                        repaired_from_the_log(&path, &what).await;
                    }
                    return true;
                }
            };
            opened += 1;
            let reads = answers(&store).await;
            let written = writes(&store).await;
            let mut differs = false;
            for (index, (got, want)) in reads
                .iter()
                .zip(expected_reads)
                .chain(written.iter().zip(expected_writes))
                .enumerate()
            {
                match got {
                    Err(e) => {
                        assert!(!e.is_empty(), "{what}: an empty error");
                        differs = true;
                    }
                    Ok(_) => assert_eq!(got, want, "{what}: answer {index} is wrong"),
                }
            }
            differs
        });
        if differs {
            assert!(
                reported,
                "{what}: the copy refused, the check found nothing"
            );
        }
    }
    println!(
        "damage {kind:?}: {} cases, {refused} refused to open, {opened} opened (every answer \
         right or refused), the check found {found}",
        cases()
    );
}

#[test]
fn a_damaged_log_segment_never_gives_a_wrong_answer() {
    damage(Kind::Segment);
}

#[test]
fn a_damaged_index_run_never_gives_a_wrong_answer() {
    damage(Kind::Run);
}

#[test]
fn a_damaged_index_manifest_never_gives_a_wrong_answer() {
    damage(Kind::Manifest);
}

#[test]
fn damaged_sled_files_never_give_a_wrong_answer() {
    damage(Kind::Sled);
}
