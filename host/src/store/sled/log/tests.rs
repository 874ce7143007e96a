use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Map, json};

use super::*;
use crate::store::StreamName;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Message `global` of a store where streams `account.0` .. `account.{streams-1}` and
/// `account:command.*` take turns; `streams` is odd, so every stream gets messages.
fn message(global: u64, streams: u64) -> Result<Message, StoreError> {
    let entity = global % streams;
    let category = if global.is_multiple_of(2) {
        "account"
    } else {
        "account:command"
    };
    Ok(Message {
        id: format!("id-{global}"),
        stream: StreamName::parse(&format!("{category}.{entity}"))?,
        message_type: "Counted".into(),
        data: json!({ "n": global }),
        metadata: Map::new(),
        // Each stream holds every (2 * streams)-th global, so its position follows from it.
        position: (global - 1) / (2 * streams),
        global_position: global,
        time_ms: 1_700_000_000_000 + global,
        not_before_ms: None,
    })
}

/// Appends messages `from ..= to` and publishes them.
fn fill(writer: &mut LogWriter, from: u64, to: u64, streams: u64) -> TestResult {
    for global in from..=to {
        writer.append(&message(global, streams)?)?;
    }
    writer.sync()?;
    writer.publish()?;
    Ok(())
}

fn globals(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.global_position).collect()
}

/// Checks every read of a log holding messages `1 ..= last` of `streams` entities per category.
fn check_reads(log: &MessageLog, last: u64, streams: u64) -> TestResult {
    let stream = "account.1";
    let expected: Vec<u64> = (1..=last)
        .filter(|g| g % 2 == 0 && g % streams == 1)
        .collect();
    assert_eq!(globals(&log.read_stream(stream, 0, usize::MAX)?), expected);
    assert_eq!(log.stream_version(stream)?, expected.len() as u64);
    let tail = log.read_stream(stream, 2, 3)?;
    assert_eq!(globals(&tail), expected[2..5]);
    assert_eq!(
        tail.iter().map(|m| m.position).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(log.stream_version("account.nobody")?, 0);

    let (page, scanned_to) = log.read_category("account", 10, last, 50)?;
    assert_eq!(
        globals(&page),
        (11..=last)
            .filter(|g| g % 2 == 0)
            .take(50)
            .collect::<Vec<_>>()
    );
    assert_eq!(scanned_to, page.last().map_or(10, |m| m.global_position));
    let (upto, _) = log.read_category("account", 0, 20, 1000)?;
    assert_eq!(globals(&upto), (2..=20).step_by(2).collect::<Vec<_>>());
    assert_eq!(log.category_head("account")?, last - last % 2);
    assert_eq!(log.category_head("account:command")?, last - (1 - last % 2));
    assert_eq!(log.category_head("ledger")?, 0);
    assert_eq!(log.category_count("account", 0)?, last / 2);

    let found = log.by_id(&format!("id-{}", last / 2))?;
    assert_eq!(found, Some(message(last / 2, streams)?));
    assert!(log.stream_of_id("id-1")?.is_some());
    assert!(log.stream_of_id(&format!("id-{}", last + 1))?.is_none());
    assert_eq!(log.by_id("id-0")?, None);
    Ok(())
}

#[test]
fn messages_are_read_back_by_stream_category_and_id() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
    fill(&mut writer, 1, 1000, 11)?;
    check_reads(&log, 1000, 11)?;
    Ok(())
}

#[test]
fn appended_messages_are_unseen_until_published() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
    writer.append(&message(1, 4)?)?;
    writer.sync()?;
    assert!(log.read_stream("account:command.1", 0, 10)?.is_empty());
    assert!(log.stream_of_id("id-1")?.is_none());
    writer.publish()?;
    assert_eq!(log.read_stream("account:command.1", 0, 10)?.len(), 1);
    Ok(())
}

#[test]
fn a_message_out_of_global_order_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
    assert!(writer.append(&message(2, 4)?).is_err());
    writer.append(&message(1, 4)?)?;
    assert!(writer.append(&message(1, 4)?).is_err());
    Ok(())
}

#[test]
fn reopening_cuts_off_messages_past_the_head() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, 100, 5)?;
    }
    // The store's commit point said 60: 61..=100 were never acknowledged.
    let (log, mut writer) = MessageLog::open(dir.path(), 60)?;
    check_reads(&log, 60, 5)?;
    assert!(log.stream_of_id("id-61")?.is_none());
    fill(&mut writer, 61, 80, 5)?;
    check_reads(&log, 80, 5)?;
    drop((log, writer));
    let (log, _writer) = MessageLog::open(dir.path(), 80)?;
    check_reads(&log, 80, 5)?;
    Ok(())
}

#[test]
fn a_torn_tail_is_cut_off_on_reopening() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, 50, 5)?;
    }
    // A crash in the middle of a record: its length says more than follows.
    let segment = dir.path().join("segments").join(format!("{:08}.log", 0));
    let mut file = OpenOptions::new().append(true).open(&segment)?;
    file.write_all(&[200, 0, 0, 0, 1, 2, 3])?;
    drop(file);
    let (log, mut writer) = MessageLog::open(dir.path(), 50)?;
    check_reads(&log, 50, 5)?;
    fill(&mut writer, 51, 60, 5)?;
    drop((log, writer));
    let (log, _writer) = MessageLog::open(dir.path(), 60)?;
    check_reads(&log, 60, 5)?;
    Ok(())
}

#[test]
fn what_is_cut_off_is_set_aside_whole_first() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, 30, 5)?;
    }
    let segment = dir.path().join("segments").join(format!("{:08}.log", 0));
    let whole = std::fs::read(&segment)?;
    let (_log, _writer) = MessageLog::open(dir.path(), 20)?;
    let kept = std::fs::read(&segment)?;
    let set_aside: Vec<_> = std::fs::read_dir(dir.path().join("cut"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    assert_eq!(set_aside.len(), 1, "{set_aside:?}");
    let tail = std::fs::read(&set_aside[0])?;
    assert_eq!(
        [kept.as_slice(), tail.as_slice()].concat(),
        whole,
        "the log as it was is what was kept and what was set aside"
    );
    // Nothing past the head: nothing set aside.
    drop((_log, _writer));
    let (_log, _writer) = MessageLog::open(dir.path(), 20)?;
    assert_eq!(std::fs::read_dir(dir.path().join("cut"))?.count(), 1);
    Ok(())
}

#[test]
fn a_group_taken_back_leaves_the_log_as_it_was() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
    fill(&mut writer, 1, 50, 5)?;
    let mark = writer.mark();
    // A group the disk could not take: appended, even synced, never published.
    for global in 51..=58 {
        writer.append(&message(global, 5)?)?;
    }
    writer.sync()?;
    writer.abandon(mark)?;
    check_reads(&log, 50, 5)?;
    fill(&mut writer, 51, 60, 5)?;
    check_reads(&log, 60, 5)?;
    drop((log, writer));
    let (log, _writer) = MessageLog::open(dir.path(), 60)?;
    check_reads(&log, 60, 5)?;
    assert!(!dir.path().join("cut").exists(), "nothing past the head");
    Ok(())
}

#[test]
fn a_zero_filled_end_is_a_torn_tail() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, 50, 5)?;
    }
    // A file extended but never written (what some filesystems leave after a crash).
    let segment = dir.path().join("segments").join(format!("{:08}.log", 0));
    let mut file = OpenOptions::new().append(true).open(&segment)?;
    file.write_all(&[0u8; 4096])?;
    drop(file);
    let (log, mut writer) = MessageLog::open(dir.path(), 50)?;
    check_reads(&log, 50, 5)?;
    fill(&mut writer, 51, 60, 5)?;
    drop((log, writer));
    let (log, _writer) = MessageLog::open(dir.path(), 60)?;
    check_reads(&log, 60, 5)?;
    Ok(())
}

#[test]
fn a_damaged_manifest_is_not_believed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let last = MEMTABLE_ENTRIES as u64 / 3 + 500;
    {
        let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, last, 21)?;
        assert_eq!(log.account()?.runs, 1);
    }
    // A flipped digit that still parses: it would send opening past messages it never indexed.
    let path = dir.path().join("index").join("manifest");
    let text = std::fs::read_to_string(&path)?;
    let damaged = text.replacen("\"indexedTo\":", "\"indexedTo\":1", 1);
    assert_ne!(damaged, text);
    std::fs::write(&path, damaged)?;
    let (log, _writer) = MessageLog::open(dir.path(), last)?;
    check_reads(&log, last, 21)?;
    Ok(())
}

#[test]
fn a_log_that_ends_before_the_head_is_not_opened() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, 10, 5)?;
    }
    match MessageLog::open(dir.path(), 11) {
        Err(StoreError::Unusable { reason, .. }) => assert!(reason.contains("ends at message 10")),
        other => panic!("expected an unusable store, got {other:?}"),
    }
    Ok(())
}

fn wait_for_merges(log: &MessageLog) -> Result<LogAccount, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let account = log.account()?;
        if account.runs < 4 || Instant::now() > deadline {
            return Ok(account);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_index_is_written_out_merged_and_reopened_without_replaying_the_log() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Three entries per message: this fills the table in memory five times over.
    let last = (MEMTABLE_ENTRIES as u64 / 3) * 5 + 17;
    let streams = 51;
    {
        let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
        for start in (1..=last).step_by(1000) {
            fill(&mut writer, start, (start + 999).min(last), streams)?;
        }
        let account = wait_for_merges(&log)?;
        assert_eq!(account.runs, 1, "four runs merge into one: {account:?}");
        assert_eq!(
            account.run_entries + account.entries_in_memory as u64,
            last * 3
        );
        check_reads(&log, last, streams)?;
    }
    let (log, mut writer) = MessageLog::open(dir.path(), last)?;
    let account = log.account()?;
    assert!(
        account.entries_in_memory < MEMTABLE_ENTRIES,
        "only what the runs do not hold is replayed: {account:?}"
    );
    check_reads(&log, last, streams)?;
    fill(&mut writer, last + 1, last + 100, streams)?;
    check_reads(&log, last + 100, streams)?;
    Ok(())
}

/// The file of an index run in the log in `dir`.
fn a_run(dir: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    Ok(std::fs::read_dir(dir.join("index"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "run"))
        .ok_or("no run was written")?)
}

#[test]
fn a_damaged_index_is_rebuilt_from_the_log() -> TestResult {
    let dir = tempfile::tempdir()?;
    let last = MEMTABLE_ENTRIES as u64 / 3 + 500;
    {
        let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, last, 21)?;
        assert_eq!(log.account()?.runs, 1);
    }
    let run = a_run(dir.path())?;
    let mut bytes = std::fs::read(&run)?;
    let length = bytes.len();
    bytes[length - 3] ^= 0xff;
    std::fs::write(&run, bytes)?;
    let (log, _writer) = MessageLog::open(dir.path(), last)?;
    check_reads(&log, last, 21)?;
    Ok(())
}

#[test]
fn an_index_ahead_of_the_head_is_rebuilt() -> TestResult {
    let dir = tempfile::tempdir()?;
    let last = MEMTABLE_ENTRIES as u64 / 3 + 500;
    {
        let (_log, mut writer) = MessageLog::open(dir.path(), 0)?;
        fill(&mut writer, 1, last, 21)?;
    }
    // The run covers more than the store acknowledged (its head moved back, as after a crash
    // between the log and the head): the index is built again from the log up to the head.
    let (log, _writer) = MessageLog::open(dir.path(), 1000)?;
    check_reads(&log, 1000, 21)?;
    assert!(log.stream_of_id("id-1001")?.is_none());
    Ok(())
}

#[test]
fn a_damaged_index_block_is_never_believed_and_is_rebuilt_while_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let last = MEMTABLE_ENTRIES as u64 / 3 + 500;
    let streams = 21;
    let (log, mut writer) = MessageLog::open(dir.path(), 0)?;
    fill(&mut writer, 1, last, streams)?;
    let run = a_run(dir.path())?;
    // A byte flipped in every block's entries, under the open store: each read that meets one
    // rebuilds the index, and every answer is the log's.
    let mut bytes = std::fs::read(&run)?;
    for block in 0..(MEMTABLE_ENTRIES / 170) {
        let entry = |n: usize| (block * 170 + n) * 24;
        // A fence's order, another entry's order, another's location.
        bytes[entry(0) + 9] ^= 0x40;
        bytes[entry(5) + 8] ^= 0x01;
        bytes[entry(7) + 16] ^= 0x08;
    }
    std::fs::write(&run, bytes)?;
    check_reads(&log, last, streams)?;
    assert!(!run.exists(), "the damaged run is replaced");
    fill(&mut writer, last + 1, last + 100, streams)?;
    check_reads(&log, last + 100, streams)?;
    drop((log, writer));
    let (log, _writer) = MessageLog::open(dir.path(), last + 100)?;
    check_reads(&log, last + 100, streams)?;
    Ok(())
}
