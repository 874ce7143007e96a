//! The message log of the embedded store: every message, once, in global order, in append-only
//! segment files, with an index of its own (stream → positions, category → globals, id →
//! message) kept as a log-structured merge of sorted runs. sled keeps only the records that
//! change (positions, view rows, parked and deferred messages, seal keys, snapshots) and the
//! store's head, which is the commit point: the writer makes the log durable first, then the
//! sled batch that moves the head, so a message past the head on disk was never acknowledged and
//! opening cuts it off.
//!
//! Why not sled for the messages too: its cost follows the number of writes (each a delta linked
//! into an in-memory page and its log), so memory, disk and restart time grew with the history
//! (RELIABILITY.md, "A lifetime of history").

mod check;
mod index;
mod record;
mod run;
mod segment;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

pub use self::check::LogCheck;
pub(super) use self::check::check_log;

use self::index::{Index, MEMTABLE_ENTRIES};
use self::run::Entry;
use self::segment::{Appender, Location, Scan, Segments};
use crate::store::{Message, StoreError};

const STREAM: u8 = b's';
const CATEGORY: u8 = b'c';
const ID: u8 = b'i';
/// Entries asked of the index at once while a read filters them.
const SCAN_BATCH: usize = 256;

/// A name's 64 bits in the index: the head of its SHA-256, so no one can choose names that
/// crowd one key. Two names may still share a key; every reader checks the message it finds.
fn hashed(kind: u8, name: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update([kind])
        .chain_update(name.as_bytes())
        .finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(head)
}

fn entries_of(message: &Message, at: Location) -> [Entry; 3] {
    [
        Entry {
            key: hashed(STREAM, message.stream.as_str()),
            seq: message.position,
            at,
        },
        Entry {
            key: hashed(CATEGORY, message.stream.category_str()),
            seq: message.global_position,
            at,
        },
        Entry {
            key: hashed(ID, &message.id),
            seq: 0,
            at,
        },
    ]
}

/// What the log holds, for [`super::SledStore::account`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogAccount {
    pub segments: usize,
    pub segment_bytes: u64,
    pub runs: usize,
    pub run_entries: u64,
    pub run_bytes: u64,
    pub entries_in_memory: usize,
}

/// The readers' side of the log, shared by every reader and the writer.
#[derive(Debug)]
pub(super) struct MessageLog {
    dir: PathBuf,
    segments: Arc<Segments>,
    index: Arc<Index>,
    merger: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    /// When rebuilding the index last failed (the log itself damaged, a full disk): it is not
    /// tried again for a while, since every read would scan the whole log.
    rebuild_failed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a failed rebuild of the index is not tried again.
const REBUILD_BACKOFF: std::time::Duration = std::time::Duration::from_secs(60);

impl Drop for MessageLog {
    fn drop(&mut self) {
        // The writer may outlive this handle and holds a sender too: the thread is told to stop
        // by the index, then woken to see it.
        self.index.close();
        if let Some((wake, thread)) = self.merger.take() {
            let _ = wake.send(());
            let _ = thread.join();
        }
    }
}

/// What lies past the head when the store opens (records a crash left unacknowledged, a torn
/// record) is cut off; first it is copied aside into `cut/`, counted and logged, so that opening
/// never destroys anything without a word.
fn set_aside_past(
    segments: &Segments,
    dir: &Path,
    head: u64,
    end: Location,
) -> Result<(), StoreError> {
    let set_aside = match segments.set_aside_tail(end, &dir.join("cut")) {
        Ok(None) => return Ok(()),
        Ok(Some((path, bytes))) => Ok((path, bytes)),
        Err(e) => Err(e),
    };
    let mut records = 0u64;
    let mut positions: Option<(u64, u64)> = None;
    for item in Scan::new(segments, end) {
        let Ok((_, _, body)) = item else { break };
        let Ok(message) = record::decode(&body) else {
            break;
        };
        records += 1;
        let global = message.global_position;
        positions = Some(positions.map_or((global, global), |(first, _)| (first, global)));
    }
    let positions = positions.map_or("none whole".to_owned(), |(first, last)| {
        format!("global positions {first} to {last}")
    });
    match set_aside {
        Ok((path, bytes)) => tracing::warn!(
            head,
            records,
            bytes,
            "the message log held {records} records past the store's head {head} ({positions}), \
             which no commit acknowledged, in {bytes} bytes: set aside in {} and cut off",
            path.display()
        ),
        // Cut off all the same: no commit acknowledged them, and a store that cannot open on a
        // full disk helps nobody.
        Err(e) => tracing::error!(
            head,
            records,
            "the message log held {records} records past the store's head {head} ({positions}), \
             which no commit acknowledged; they could not be set aside ({e}) and are cut off"
        ),
    }
    Ok(())
}

impl MessageLog {
    /// Opens the log in `dir` for a store whose head is `head`: records past it are cut off,
    /// and the index learns what its runs do not hold yet. A log that ends before the head has
    /// lost acknowledged messages: the store is not opened.
    pub(super) fn open(dir: &Path, head: u64) -> Result<(Self, LogWriter), StoreError> {
        let segment_dir = dir.join("segments");
        std::fs::create_dir_all(&segment_dir)
            .map_err(|e| StoreError::Backend(format!("message log: creating its folder: {e}")))?;
        let index = Arc::new(Index::open(&dir.join("index"))?);
        if index.indexed_to()?.0 > head {
            tracing::warn!("the message index is ahead of the store's head; rebuilding it");
            index.reset()?;
        }
        let segments = Arc::new(Segments::open(&segment_dir)?);
        let (mut last, mut end) = index.indexed_to()?;
        let mut pending = Vec::new();
        for item in Scan::new(&segments, end) {
            let (at, next, body) = item?;
            let message = record::decode(&body)?;
            if message.global_position > head {
                break;
            }
            if message.global_position != last + 1 {
                return Err(StoreError::Backend(format!(
                    "message log: message {} follows {last}",
                    message.global_position
                )));
            }
            pending.extend(entries_of(&message, at));
            last = message.global_position;
            end = next;
            if pending.len() >= MEMTABLE_ENTRIES {
                index.publish(pending.drain(..), last, end)?;
                index.flush_if_full()?;
            }
        }
        if last < head {
            let (segment, offset) = segment::split(end);
            return Err(StoreError::Unusable {
                path: dir.display().to_string(),
                reason: format!(
                    "its message log ends at message {last} but the store's head is {head}: \
                     acknowledged messages are missing or damaged from segment {segment:08}.log \
                     offset {offset} on (`ferry store check` lists what it can read)"
                ),
            });
        }
        index.publish(pending, last, end)?;
        index.flush_if_full()?;
        set_aside_past(&segments, dir, head, end)?;
        let appender = Appender::open(segments.clone(), end)?;

        let (wake, woken) = mpsc::channel::<()>();
        let merging = index.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-log-merge".into())
            .spawn(move || {
                while woken.recv().is_ok() && !merging.is_closing() {
                    if let Err(e) = merging.merge_due() {
                        tracing::error!("merging the message index: {e}");
                    }
                }
            })
            .map_err(|e| StoreError::Backend(format!("message log: {e}")))?;
        // Runs left unmerged by a close are merged now.
        let _ = wake.send(());
        let writer = LogWriter {
            appender,
            index: index.clone(),
            pending: Vec::new(),
            last,
            wake: wake.clone(),
        };
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segments,
                index,
                merger: Some((wake, thread)),
                rebuild_failed_at: std::sync::Mutex::new(None),
            },
            writer,
        ))
    }

    fn read(&self, at: Location) -> Result<Message, StoreError> {
        record::decode(&self.segments.read(at)?)
    }

    /// Runs `read` on the index; when it met damage (a block failing its checksum, an entry
    /// disagreeing with its message), rebuilds the index from the log, logged, and runs it
    /// again: an answer comes from an index that agrees with the log, or is an error.
    fn verified<T>(&self, read: impl Fn() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let first = read();
        if !self.index.is_damaged()? {
            return first;
        }
        let mut failed_at = self
            .rebuild_failed_at
            .lock()
            .map_err(|_| StoreError::Backend("message log: a reader panicked".into()))?;
        if failed_at.is_some_and(|at| at.elapsed() < REBUILD_BACKOFF) {
            // Still safe to answer: whatever passed the checks is right, the rest an error.
            return first;
        }
        let why = match &first {
            Err(e) => e.to_string(),
            Ok(_) => "an entry disagreed with the log".to_owned(),
        };
        tracing::error!("{why}; rebuilding the message index from the log");
        let started = std::time::Instant::now();
        if let Err(e) = self.rebuild_index() {
            *failed_at = Some(std::time::Instant::now());
            tracing::error!(
                "rebuilding the message index failed ({e}); `ferry store check` on the stopped \
                 store says what is damaged"
            );
            return first;
        }
        *failed_at = None;
        drop(failed_at);
        tracing::warn!(
            "the message index was rebuilt from the log in {:?}",
            started.elapsed()
        );
        read()
    }

    /// Rebuilds every run of the index from the log, up to where the index reaches.
    pub(super) fn rebuild_index(&self) -> Result<(), StoreError> {
        self.index.rebuild(|end| {
            Scan::new(&self.segments, 0)
                .take_while(move |item| item.as_ref().map_or(true, |(at, _, _)| *at < end))
                .map(|item| {
                    let (at, after, body) = item?;
                    let message = record::decode(&body)?;
                    Ok((message.global_position, after, entries_of(&message, at)))
                })
        })
    }

    /// An entry found to disagree with the message it points to: the index is damaged.
    fn disagrees(&self, entry: &Entry, what: &str) -> StoreError {
        self.index.mark_damaged();
        let (segment, offset) = segment::split(entry.at);
        StoreError::Backend(format!(
            "message index entry (order {}) disagrees with the {what} of the message at segment \
             {segment:08}.log offset {offset}",
            entry.seq
        ))
    }

    /// Messages of `stream` from `position` on, at most `limit`.
    pub(super) fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.verified(|| self.read_stream_once(stream, from, limit))
    }

    fn read_stream_once(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let key = hashed(STREAM, stream);
        let mut messages = Vec::new();
        let mut next = from;
        while messages.len() < limit {
            let entries = self.index.scan(key, next, SCAN_BATCH.max(limit), 0)?;
            let Some(last) = entries.last() else {
                break;
            };
            next = last.seq.saturating_add(1);
            let full = entries.len() >= SCAN_BATCH.max(limit);
            for entry in entries {
                let message = self.read(entry.at)?;
                if message.stream.as_str() != stream {
                    continue;
                }
                if message.position != entry.seq {
                    return Err(self.disagrees(&entry, "stream position"));
                }
                if messages.len() < limit {
                    messages.push(message);
                }
            }
            if !full {
                break;
            }
        }
        Ok(messages)
    }

    /// The number of messages in `stream`.
    pub(super) fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        self.verified(|| self.stream_version_once(stream))
    }

    fn stream_version_once(&self, stream: &str) -> Result<u64, StoreError> {
        let key = hashed(STREAM, stream);
        let Some(last) = self.index.last(key)? else {
            return Ok(0);
        };
        let found = self.segments.read(last.at)?;
        let head = record::head(&found)?;
        if head.stream == stream {
            if head.position != last.seq {
                return Err(self.disagrees(&last, "stream position"));
            }
            return Ok(head.position + 1);
        }
        // Another stream shares the key: look at every entry of it.
        let mut version = 0;
        for entry in self.index.scan(key, 0, usize::MAX, 0)? {
            let body = self.segments.read(entry.at)?;
            let head = record::head(&body)?;
            if head.stream == stream {
                if head.position != entry.seq {
                    return Err(self.disagrees(&entry, "stream position"));
                }
                version = version.max(head.position + 1);
            }
        }
        Ok(version)
    }

    /// Messages of `category` with global positions in `after + 1 ..= up_to`, in order, looking
    /// at no more than `most` of its index entries; and the last global position looked at.
    pub(super) fn read_category(
        &self,
        category: &str,
        after: u64,
        up_to: u64,
        most: usize,
    ) -> Result<(Vec<Message>, u64), StoreError> {
        self.verified(|| self.read_category_once(category, after, up_to, most))
    }

    fn read_category_once(
        &self,
        category: &str,
        after: u64,
        up_to: u64,
        most: usize,
    ) -> Result<(Vec<Message>, u64), StoreError> {
        let key = hashed(CATEGORY, category);
        let mut messages = Vec::new();
        let mut scanned_to = after;
        if up_to <= after {
            return Ok((messages, scanned_to));
        }
        let entries = self.index.scan(key, after + 1, most, after + 1)?;
        for entry in entries {
            if entry.seq > up_to {
                break;
            }
            scanned_to = entry.seq;
            let message = self.read(entry.at)?;
            if message.stream.category_str() == category {
                if message.global_position != entry.seq {
                    return Err(self.disagrees(&entry, "global position"));
                }
                messages.push(message);
            }
        }
        Ok((messages, scanned_to))
    }

    /// The global position of the last message of `category`, 0 when it has none.
    pub(super) fn category_head(&self, category: &str) -> Result<u64, StoreError> {
        self.verified(|| self.category_head_once(category))
    }

    fn category_head_once(&self, category: &str) -> Result<u64, StoreError> {
        let key = hashed(CATEGORY, category);
        let Some(last) = self.index.last(key)? else {
            return Ok(0);
        };
        let of_category = |entry: &Entry| -> Result<bool, StoreError> {
            let body = self.segments.read(entry.at)?;
            let found = record::head(&body)?;
            if found.stream.split('.').next() != Some(category) {
                return Ok(false);
            }
            if found.global != entry.seq {
                return Err(self.disagrees(entry, "global position"));
            }
            Ok(true)
        };
        if of_category(&last)? {
            return Ok(last.seq);
        }
        // Another category shares the key: look at every entry of it.
        let mut head = 0;
        for entry in self.index.scan(key, 0, usize::MAX, 0)? {
            if of_category(&entry)? {
                head = entry.seq;
            }
        }
        Ok(head)
    }

    /// The number of messages of `category` after global `after` (each checked without
    /// decoding its JSON).
    pub(super) fn category_count(&self, category: &str, after: u64) -> Result<u64, StoreError> {
        self.verified(|| self.category_count_once(category, after))
    }

    fn category_count_once(&self, category: &str, after: u64) -> Result<u64, StoreError> {
        let key = hashed(CATEGORY, category);
        let mut count = 0;
        let mut from = after.saturating_add(1);
        loop {
            let entries = self.index.scan(key, from, SCAN_BATCH, from)?;
            let Some(last) = entries.last() else {
                return Ok(count);
            };
            from = last.seq.saturating_add(1);
            let full = entries.len() >= SCAN_BATCH;
            for entry in &entries {
                let body = self.segments.read(entry.at)?;
                let found = record::head(&body)?;
                if found.stream.split('.').next() == Some(category) {
                    if found.global != entry.seq {
                        return Err(self.disagrees(entry, "global position"));
                    }
                    count += 1;
                }
            }
            if !full {
                return Ok(count);
            }
        }
    }

    /// The message with this id.
    pub(super) fn by_id(&self, id: &str) -> Result<Option<Message>, StoreError> {
        self.verified(|| self.by_id_once(id))
    }

    fn by_id_once(&self, id: &str) -> Result<Option<Message>, StoreError> {
        for entry in self.index.scan(hashed(ID, id), 0, usize::MAX, 0)? {
            let message = self.read(entry.at)?;
            if message.id == id {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// The stream of the message with this id, when one is stored (read without decoding its
    /// JSON).
    pub(super) fn stream_of_id(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.verified(|| self.stream_of_id_once(id))
    }

    fn stream_of_id_once(&self, id: &str) -> Result<Option<String>, StoreError> {
        for entry in self.index.scan(hashed(ID, id), 0, usize::MAX, 0)? {
            let body = self.segments.read(entry.at)?;
            let head = record::head(&body)?;
            if head.id == id {
                return Ok(Some(head.stream.to_owned()));
            }
        }
        Ok(None)
    }

    pub(super) fn account(&self) -> Result<LogAccount, StoreError> {
        let mut segment_bytes = 0;
        for number in segment::list(&self.dir.join("segments"))? {
            let path = self.dir.join("segments").join(format!("{number:08}.log"));
            segment_bytes += std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        }
        let (runs, run_entries, run_bytes, entries_in_memory) = self.index.account()?;
        Ok(LogAccount {
            segments: self.segments.count(),
            segment_bytes,
            runs,
            run_entries,
            run_bytes,
            entries_in_memory,
        })
    }
}

/// Writes `messages` (global positions 1 ..= `head`, in order) as a new log in `dir`: first
/// beside it in `dir.new`, made durable, then renamed into place. Whatever either folder held
/// before is removed first: the caller converts a store whose old layout is still the truth.
pub(super) fn write_log(
    dir: &Path,
    messages: impl Iterator<Item = Result<Message, StoreError>>,
    head: u64,
) -> Result<(), StoreError> {
    let io = |what: &str, e: std::io::Error| {
        StoreError::Backend(format!("message log {}: {what}: {e}", dir.display()))
    };
    let building = dir.with_extension("new");
    for old in [dir, building.as_path()] {
        match std::fs::remove_dir_all(old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("removing an unfinished copy", e));
            }
            _ => {}
        }
    }
    {
        let (_log, mut writer) = MessageLog::open(&building, 0)?;
        for message in messages {
            let message = message?;
            if message.global_position > head {
                break;
            }
            writer.append(&message)?;
            if writer.pending.len() >= MEMTABLE_ENTRIES {
                writer.publish()?;
            }
        }
        if writer.last != head {
            return Err(StoreError::Backend(format!(
                "converting the store: its messages end at {} but its head is {head}",
                writer.last
            )));
        }
        writer.sync()?;
        writer.publish()?;
    }
    std::fs::rename(&building, dir).map_err(|e| io("moving into place", e))?;
    match dir.parent() {
        Some(parent) => segment::sync_dir(parent),
        None => Ok(()),
    }
}

/// The writer's side: appends messages, makes them durable, and then publishes them to the
/// index, where readers find them.
#[derive(Debug)]
pub(super) struct LogWriter {
    appender: Appender,
    index: Arc<Index>,
    /// Entries of messages appended but not yet published.
    pending: Vec<Entry>,
    /// The global position of the last message appended.
    last: u64,
    wake: mpsc::Sender<()>,
}

impl LogWriter {
    /// Appends `message`, which must be the next global position.
    pub(super) fn append(&mut self, message: &Message) -> Result<(), StoreError> {
        if message.global_position != self.last + 1 {
            return Err(StoreError::Backend(format!(
                "message log: message {} appended after {}",
                message.global_position, self.last
            )));
        }
        let at = self.appender.append(&record::encode(message))?;
        self.pending.extend(entries_of(message, at));
        self.last = message.global_position;
        Ok(())
    }

    /// Makes every appended message durable.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.appender.sync()
    }

    /// Where the log ends now: what [`LogWriter::abandon`] goes back to.
    pub(super) fn mark(&self) -> (Location, u64) {
        (self.appender.end(), self.last)
    }

    /// Takes back everything appended since `mark` (none of it published): the file is cut
    /// back there, as if the group had never been appended.
    pub(super) fn abandon(&mut self, (end, last): (Location, u64)) -> Result<(), StoreError> {
        self.appender = self.appender.reopen_at(end)?;
        self.pending.clear();
        self.last = last;
        Ok(())
    }

    /// Lets readers find what was appended (call once the commit that vouches for it is
    /// durable), writing the index's table out when it is full.
    pub(super) fn publish(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.appender.write_out()?;
        self.index
            .publish(self.pending.drain(..), self.last, self.appender.end())?;
        if self.index.flush_if_full()? {
            let _ = self.wake.send(());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
