//! `ferry store check` for the message log, changing nothing: every record is read and checked
//! (its frame's CRC-32, its decoding, global positions dense from 1 to the head), and every run
//! of the index block by block, its entries compared with the entries the log's messages give.
//! A digest of the entries (a sum of a 64-bit mix of each) keeps the comparison in constant
//! memory whatever the history's length.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::run::Entry;
use super::segment::{self, Scan, Segments};
use super::{entries_of, hashed, record};
use crate::store::StoreError;

/// What the log holds and what is wrong with it.
#[derive(Debug, Default)]
pub struct LogCheck {
    /// Messages read whole, from global 1 up to the head.
    pub messages: u64,
    /// Whole records past the head: opening sets them aside (no commit acknowledged them).
    pub past_head: u64,
    /// Bytes after the last whole record (a torn write): opening sets them aside too.
    pub torn_bytes: u64,
    /// Index runs and the entries in them.
    pub runs: usize,
    pub run_entries: u64,
    /// Damage found, each with where it is and what mends it.
    pub problems: Vec<String>,
    /// Each stream's version and the ids stored (hashed), for checking sled's records.
    pub(in crate::store::sled) versions: HashMap<String, u64>,
    pub(in crate::store::sled) ids: HashSet<u64>,
}

impl LogCheck {
    /// Whether a message with this id is stored.
    pub(in crate::store::sled) fn holds_id(&self, id: &str) -> bool {
        self.ids.contains(&hashed(super::ID, id))
    }
}

/// One entry's share of the digest: a splitmix64 of its three words, so that a changed bit
/// anywhere changes the sum.
fn mix(entry: &Entry) -> u64 {
    let mut z = entry
        .key
        .wrapping_add(entry.seq.rotate_left(21))
        .wrapping_add(entry.at.rotate_left(42))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks the log in `dir` of a store whose head is `head`.
pub(in crate::store::sled) fn check_log(dir: &Path, head: u64) -> Result<LogCheck, StoreError> {
    let mut check = LogCheck::default();
    let segment_dir = dir.join("segments");
    if !segment_dir.exists() {
        if head > 0 {
            check.problems.push(format!(
                "the message log ({}) is missing, but the store's head is {head}: restore the \
                 folder from a backup",
                segment_dir.display()
            ));
        }
        return Ok(check);
    }
    let segments = match Segments::open(&segment_dir) {
        Ok(segments) => segments,
        Err(e) => {
            check
                .problems
                .push(format!("{e}: restore the folder from a backup"));
            return Ok(check);
        }
    };
    let (indexed_to, runs) = match super::index::read_on_disk(&dir.join("index")) {
        Ok(found) => (found.0, Some(found.1)),
        Err(why) => {
            check.problems.push(format!(
                "the message index is damaged ({why}): opening rebuilds it from the log, or \
                 `ferry store repair`"
            ));
            (0, None)
        }
    };

    let (mut expected_sum, mut expected_count) = (0u64, 0u64);
    let mut end = 0;
    for item in Scan::new(&segments, 0) {
        let (at, after, body) = item?;
        let message = match record::decode(&body) {
            Ok(message) => message,
            Err(e) => {
                let (segment, offset) = segment::split(at);
                check.problems.push(format!(
                    "the record at segment {segment:08}.log offset {offset} does not decode \
                     ({e})"
                ));
                break;
            }
        };
        let global = message.global_position;
        if global > head {
            check.past_head += 1;
            end = after;
            continue;
        }
        if global != check.messages + 1 {
            let (segment, offset) = segment::split(at);
            check.problems.push(format!(
                "the record at segment {segment:08}.log offset {offset} holds message {global} \
                 where {} was expected",
                check.messages + 1
            ));
            break;
        }
        check.messages = global;
        end = after;
        if global <= indexed_to {
            for entry in entries_of(&message, at) {
                expected_sum = expected_sum.wrapping_add(mix(&entry));
                expected_count += 1;
            }
        }
        let version = check
            .versions
            .entry(message.stream.as_str().to_owned())
            .or_default();
        *version = (*version).max(message.position + 1);
        check.ids.insert(hashed(super::ID, &message.id));
    }
    check.torn_bytes = segments.bytes_after(end)?;
    if check.messages < head {
        let (segment, offset) = segment::split(end);
        check.problems.push(format!(
            "acknowledged messages {} to {head} are missing: the log is damaged or cut short \
             at segment {segment:08}.log offset {offset}. They cannot be derived from anything \
             else: restore the folder from a backup",
            check.messages + 1
        ));
    }

    if let Some(runs) = runs {
        check.runs = runs.len();
        let (mut found_sum, mut found_count) = (0u64, 0u64);
        let mut damaged = None;
        'runs: for run in &runs {
            let mut previous: Option<Entry> = None;
            for entry in run.iter() {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        damaged = Some(e.to_string());
                        break 'runs;
                    }
                };
                if previous.is_some_and(|p| p >= entry) {
                    damaged = Some(format!(
                        "{}: its entries are out of order",
                        run.path().display()
                    ));
                    break 'runs;
                }
                previous = Some(entry);
                found_sum = found_sum.wrapping_add(mix(&entry));
                found_count += 1;
            }
        }
        check.run_entries = found_count;
        if damaged.is_none() && indexed_to > check.messages {
            damaged = Some(format!(
                "it covers messages up to {indexed_to}, the log only {}",
                check.messages
            ));
        } else if damaged.is_none() && (found_sum, found_count) != (expected_sum, expected_count) {
            damaged = Some(format!(
                "its {found_count} entries are not the {expected_count} the log's messages 1 to \
                 {indexed_to} give"
            ));
        }
        if let Some(why) = damaged {
            check.problems.push(format!(
                "the message index is damaged ({why}): a read that meets it rebuilds it from the \
                 log, or `ferry store repair`"
            ));
        }
    }
    Ok(check)
}
