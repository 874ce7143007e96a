//! The embedded store: one data folder, one process. Messages go to an append-only log of our
//! own (`log/`, see [`log`]); everything that changes (positions, view rows, parked and deferred
//! messages, seal keys, snapshots) and the store's head go to sled 0.34.
//!
//! One writer thread owns every write. It takes all requests waiting in its queue (a group),
//! checks each commit against what the store and the group's earlier commits hold (so a conflict
//! fails only that commit), appends the group's messages to the log and makes them durable, then
//! writes the rest and the new head as one atomic sled batch with one `flush`. The head is the
//! commit point: a message in the log past the head was never acknowledged, and opening cuts it
//! off. Only after the flush does the writer publish the messages to readers, answer the callers,
//! move the durable head and wake the consumers, so no consumer is handed a message a crash could
//! still take back.
//!
//! Everything in sled lives in one tree, `ferry`, because a sled batch is atomic on one tree only.
//! Keys start with a tag byte; `\0` separates parts; numbers are big-endian u64:
//! - `=format` → format tag, `=head` → last global position, `=secret` → set once the folder's
//!   namespace secret (the file `secret`, see `store::secret`) exists
//! - `c` category `\0` name → the consumer's group: `G`, partitions (u32), partition key (u8:
//!   0 entity, 1 origin entity), then each partition's position and epoch (u64 each). Written
//!   whole by every commit that advances the consumer: one process owns a sled store, so no two
//!   instances contend for it. An 8-byte value is a position of the layout before groups.
//! - `v` table `\0` key → view row JSON (a deleted row stays as a tombstone with its `lastUpdateSeq`)
//! - `p`, `d` category `\0` name `\0` global → parked, deferred record JSON
//! - `k` message id → the key of the message's sealed fields (32 bytes), written in the batch
//!   that writes the message, removed in the batch that settles it (see `seal`)
//! - `n` stream `\0` component hash → the stream's latest snapshot JSON `[version, state]`
//!
//! Folders of earlier layouts are converted when opened (see [`migrate`]): `ferry-sled/1` kept
//! one tree per kind of record; `ferry-sled/2` kept the messages in sled too (`m`, `s`, `i`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sled::Tree;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Category, CategoryFilter, CategoryPage, Commit, Committed, ConsumerId, ConsumerInfo,
    DeferredMessage, Group, GroupSpec, Message, MessageStore, NamespaceSecret, NewMessage,
    ParkedMessage, PartitionInfo, PartitionKey, PartitionPosition, Settle, Snapshot, StoreError,
    StreamName, ViewRow, now_ms, shown, validate_commit,
};

mod check;
mod keys;
mod log;
mod migrate;
mod writer;

pub use self::check::StoreCheck;
use self::keys::*;
pub use self::log::{LogAccount, LogCheck};
use self::log::{LogWriter, MessageLog};
use self::writer::{WriteRequest, Writer};

const FORMAT: &[u8] = b"ferry-sled/3";
const FORMAT_KEY: &[u8] = b"=format";
const HEAD_KEY: &[u8] = b"=head";
/// Set once the store has a namespace secret: a secret lost later is then refused, not replaced.
const SECRET_KEY: &[u8] = b"=secret";
/// The message log's folder inside the store's.
const LOG_DIR: &str = "log";
const CONSUMER: u8 = b'c';
const VIEW: u8 = b'v';
const PARKED: u8 = b'p';
const DEFERRED: u8 = b'd';
const SEAL_KEY: u8 = b'k';
const SNAPSHOT: u8 = b'n';
/// Upper bound of category entries one `read_category` call looks at when a filter drops messages.
const MAX_SCAN: usize = 10_000;
/// sled's page cache unless told otherwise. sled counts it by the pages' serialised size and holds
/// them larger in memory; sled now holds only what changes, so a small cache serves it.
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Upper bound of requests written as one group.
const MAX_GROUP: usize = 512;
/// The writer remembers stream versions up to this many streams, then starts over (the log is
/// the truth behind them).
pub const DEFAULT_CACHED_VERSIONS: usize = 100_000;

/// Records of one kind in the tree, as [`SledStore::account`] counts them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyAccount {
    /// The tag byte its keys start with (see the layout above).
    pub tag: char,
    pub records: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

type Watchers = Arc<Mutex<HashMap<String, watch::Sender<u64>>>>;

struct Inner {
    path: PathBuf,
    tree: Tree,
    log: Arc<MessageLog>,
    writer: Option<mpsc::UnboundedSender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    /// The last global position on disk: category reads stop there (see `read_category`).
    durable: Arc<AtomicU64>,
    watchers: Watchers,
    secret: NamespaceSecret,
    /// Why writes are refused now (see the writer's `refuse_full`).
    degraded: Arc<Mutex<Option<String>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds; joining it releases its handle
        // on the database, so the folder's lock is free once the store is dropped (the log's
        // merging thread stops when the last handle on the log goes, right after).
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Bytes in the message log's segments (0 when it has none).
fn log_bytes(log_dir: &Path) -> u64 {
    std::fs::read_dir(log_dir.join("segments"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .map(|metadata| metadata.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Opens sled's files in `path` as Ferry configures them: a folder another process holds is
/// [`StoreError::Locked`], files sled cannot read are [`StoreError::Unusable`] saying what mends
/// them.
fn open_db(path: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        .flush_every_ms(None)
        .cache_capacity(cache_bytes)
        .open()
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("could not acquire lock") {
                StoreError::Locked {
                    path: path.display().to_string(),
                }
            } else {
                StoreError::Unusable {
                    path: path.display().to_string(),
                    reason: format!(
                        "sled cannot read its files ({text}). Nothing was changed; restore them \
                         (db, conf, snap.*, blobs) from a backup, or `ferry store repair` sets \
                         them aside and takes the head from the message log (consumers then \
                         start again from the first message)"
                    ),
                }
            }
        })
}

/// The sled-backed [`MessageStore`]. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SledStore {
    /// Opens (or creates) the store in `path`, with Ferry's default page cache ([`DEFAULT_CACHE_BYTES`]).
    /// A folder locked by another process, of another format, or that sled cannot read gives a
    /// clear error and is left untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store with a page cache of at most `cache_bytes`: sled keeps recently used pages
    /// in memory up to this size, so the process grows with the data until it reaches it.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_bounds(path, cache_bytes, DEFAULT_CACHED_VERSIONS)
    }

    /// Opens the store with both of its memory bounds: the page cache, and how many streams'
    /// versions the writer remembers before it starts over (tests run the conformance suite with
    /// tiny bounds, where every group reads versions from the tree again).
    pub fn open_with_bounds(
        path: impl AsRef<Path>,
        cache_bytes: u64,
        cached_versions: usize,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let unusable = |reason: String| StoreError::Unusable {
            path: shown.clone(),
            reason,
        };
        let other_format = |tag: &[u8]| {
            unusable(format!(
                "it holds format {:?}, this Ferry reads {:?}",
                String::from_utf8_lossy(tag),
                String::from_utf8_lossy(FORMAT)
            ))
        };
        let db = open_db(&path, cache_bytes)?;
        let tree = db.open_tree("ferry").map_err(backend)?;
        let log_dir = path.join(LOG_DIR);
        match migrate::format(&db, &tree)? {
            Some(tag) if tag == FORMAT => migrate::finish(&db, &tree)?,
            Some(tag) if tag == migrate::FORMAT_V2 => migrate::migrate_v2(&db, &tree, &log_dir)?,
            Some(tag) if tag == migrate::FORMAT_V1 => migrate::migrate_v1(&db, &tree, &log_dir)?,
            Some(tag) => return Err(other_format(&tag)),
            None if tree.is_empty() && log_bytes(&log_dir) > 0 => {
                // Opening would take the head for 0 and cut every message off.
                return Err(unusable(format!(
                    "its message log holds {} bytes of messages but sled holds no head: sled's \
                     files (db, conf, snap.*) were lost or replaced. Nothing was changed; restore \
                     them from the backup the log came with, or `ferry store repair` takes the \
                     head from the log (consumers then start again from the first message)",
                    log_bytes(&log_dir)
                )));
            }
            None if tree.is_empty() => {
                // A log left by a store created and never committed to is empty or cut off
                // below: a fresh store's head is 0.
                tree.insert(FORMAT_KEY, FORMAT).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
            None => return Err(unusable("it holds data without a format tag".into())),
        }

        let watchers: Watchers = Arc::default();
        let (writer, queue) = mpsc::unbounded_channel();
        let head = tree
            .get(HEAD_KEY)
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0);
        let (log, log_writer) = MessageLog::open(&log_dir, head)?;
        let log = Arc::new(log);
        let had_secret = tree.get(SECRET_KEY).map_err(backend)?.is_some();
        let secret = NamespaceSecret::load_or_create(&path, head, had_secret)?;
        if !had_secret {
            tree.insert(SECRET_KEY, &[1u8]).map_err(backend)?;
            db.flush().map_err(backend)?;
        }
        let durable = Arc::new(AtomicU64::new(head));
        let degraded = Arc::new(Mutex::new(None));
        let state = Writer {
            db,
            tree: tree.clone(),
            log: log.clone(),
            log_writer,
            head,
            messages: Vec::new(),
            ids: HashMap::new(),
            versions: HashMap::new(),
            cached_versions,
            durable: durable.clone(),
            watchers: watchers.clone(),
            path: path.clone(),
            degraded: degraded.clone(),
        };
        let writer_thread = std::thread::Builder::new()
            .name("ferry-sled-writer".into())
            .spawn(move || state.run(queue))
            .map_err(backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                tree,
                log,
                writer: Some(writer),
                writer_thread: Some(writer_thread),
                durable,
                watchers,
                secret,
                degraded,
            }),
        })
    }

    /// What the message log holds: its segments, index runs and entries in memory.
    pub fn log_account(&self) -> Result<LogAccount, StoreError> {
        self.inner.log.account()
    }

    /// What the tree holds by kind of record (the tag byte of its keys): records, key bytes and
    /// value bytes. A full scan: for measuring where a store's bytes go, not for a running host.
    pub fn account(&self) -> Result<Vec<KeyAccount>, StoreError> {
        let mut by_tag: BTreeMap<u8, KeyAccount> = BTreeMap::new();
        for entry in self.tree().iter() {
            let (key, value) = entry.map_err(backend)?;
            let tag = key.first().copied().unwrap_or(b'?');
            let account = by_tag.entry(tag).or_insert_with(|| KeyAccount {
                tag: char::from(tag),
                ..KeyAccount::default()
            });
            account.records += 1;
            account.key_bytes += key.len() as u64;
            account.value_bytes += value.len() as u64;
        }
        Ok(by_tag.into_values().collect())
    }

    fn write(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.inner
            .writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(request)
            .map_err(|_| StoreError::Closed)
    }

    fn tree(&self) -> &Tree {
        &self.inner.tree
    }

    fn log(&self) -> &MessageLog {
        &self.inner.log
    }
}

#[async_trait]
impl MessageStore for SledStore {
    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.write(WriteRequest::Commit {
            commit: Box::new(commit),
            reply,
        })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn rebuild_views(
        &self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.write(WriteRequest::RebuildViews {
            tables: tables.to_vec(),
            consumers: consumers.to_vec(),
            reply,
        })?;
        answer.await.map_err(|_| StoreError::Closed)??;
        let categories: BTreeSet<&str> = consumers.iter().map(|c| c.category.as_str()).collect();
        let mut count = 0;
        for category in categories {
            count += self.log().category_count(category, 0)?;
        }
        Ok(count)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.log()
            .read_stream(stream.as_str(), from_position, limit)
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError> {
        self.log().stream_version(stream.as_str())
    }

    async fn read_category(
        &self,
        category: &Category,
        after: u64,
        filter: &CategoryFilter,
        limit: usize,
    ) -> Result<CategoryPage, StoreError> {
        // A message written but not yet flushed stays unseen: a consumer must not act on it (send
        // an email) while a crash could still take it back.
        let durable = self.inner.durable.load(Ordering::Acquire);
        let mut page = CategoryPage {
            messages: Vec::new(),
            scanned_to: after,
        };
        if durable <= after {
            return Ok(page);
        }
        // Entries are looked at in batches of at least `MIN_BATCH` (a filter that keeps few
        // messages would otherwise ask the index for one entry at a time); a page that fills
        // mid-batch ends at its last message, so nothing after it counts as scanned.
        const MIN_BATCH: usize = 64;
        let mut looked_at = 0;
        while page.messages.len() < limit && looked_at < MAX_SCAN {
            let most = (limit - page.messages.len())
                .max(MIN_BATCH)
                .min(MAX_SCAN - looked_at);
            let (messages, scanned_to) =
                self.log()
                    .read_category(category.as_str(), page.scanned_to, durable, most)?;
            if scanned_to == page.scanned_to {
                break;
            }
            looked_at += most;
            page.scanned_to = scanned_to;
            for message in messages.into_iter().filter(|m| filter.keeps(m)) {
                if let Some(last) = page.messages.last()
                    && page.messages.len() == limit
                {
                    page.scanned_to = last.global_position;
                    break;
                }
                page.messages.push(message);
            }
        }
        Ok(page)
    }

    async fn watch(&self, consumer: &ConsumerId) -> Result<watch::Receiver<u64>, StoreError> {
        match self.inner.watchers.lock() {
            Ok(mut watchers) => Ok(watchers
                .entry(consumer.category.as_str().to_owned())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()),
            Err(_) => Err(StoreError::Backend("the watcher table is poisoned".into())),
        }
    }

    async fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        self.log().by_id(id)
    }

    fn secret(&self) -> &NamespaceSecret {
        &self.inner.secret
    }

    fn degraded(&self) -> Option<String> {
        let mut degraded = self.inner.degraded.lock().ok()?;
        // Space freed since the last refusal: healthy again, whether or not a write came.
        if degraded.is_some()
            && fs2::available_space(&self.inner.path).is_ok_and(|free| free >= writer::DISK_RESERVE)
        {
            *degraded = None;
        }
        degraded.clone()
    }

    async fn seal_key(&self, message_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree()
            .get(seal_key_key(message_id))
            .map_err(backend)?
            .map(|key| key.to_vec()))
    }

    async fn snapshot(
        &self,
        stream: &StreamName,
        component: &str,
    ) -> Result<Option<Snapshot>, StoreError> {
        let key = snapshot_key(stream.as_str(), component);
        let Some(bytes) = self.tree().get(key).map_err(backend)? else {
            return Ok(None);
        };
        let (version, state): (u64, String) = decode("snapshot", &bytes)?;
        Ok(Some(Snapshot {
            stream: stream.clone(),
            component: component.to_owned(),
            version,
            state,
        }))
    }

    async fn head(&self) -> Result<u64, StoreError> {
        Ok(self
            .tree()
            .get(HEAD_KEY)
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0))
    }

    async fn join_group(
        &self,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        // Every poll of a consumer joins: a group that exists is read, not written (a trip to
        // the writer would cost a flush).
        if let Some(group) = self.group(consumer).await? {
            return Ok(group);
        }
        let (reply, answer) = oneshot::channel();
        self.write(WriteRequest::JoinGroup {
            consumer: consumer.clone(),
            spec,
            reply,
        })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn group(&self, consumer: &ConsumerId) -> Result<Option<Group>, StoreError> {
        match self.tree().get(consumer_key(consumer)).map_err(backend)? {
            Some(bytes) => decode_group(&bytes),
            None => Ok(None),
        }
    }

    async fn consumers(
        &self,
        category: Option<&Category>,
    ) -> Result<Vec<ConsumerInfo>, StoreError> {
        let prefix = match category {
            Some(c) => key(CONSUMER, &[c.as_str().as_bytes(), &[]]),
            None => vec![CONSUMER],
        };
        let mut listed = Vec::new();
        for entry in self.tree().scan_prefix(prefix) {
            let (key, value) = entry.map_err(backend)?;
            let text = String::from_utf8_lossy(&key[1..]);
            let Some((category, name)) = text.split_once('\0') else {
                continue;
            };
            let category = Category::parse(category)?;
            let group = decode_group(&value)?;
            let position = match &group {
                Some(group) => group.low(),
                None => u64_be(&value),
            };
            let mut partitions: Vec<PartitionInfo> = group
                .iter()
                .flat_map(|g| g.positions.iter().enumerate())
                .map(|(partition, p)| PartitionInfo {
                    partition: partition as u32,
                    position: p.position,
                    epoch: p.epoch,
                    lag: 0,
                    owner: None,
                })
                .collect();
            let lag = match &group {
                // Counting per partition needs each message's entity.
                Some(group) => {
                    let mut after = position;
                    loop {
                        let (messages, scanned_to) = self.log().read_category(
                            category.as_str(),
                            after,
                            u64::MAX,
                            MAX_SCAN,
                        )?;
                        for message in &messages {
                            let info = &mut partitions[group.spec.partition_of(message) as usize];
                            if message.global_position > info.position {
                                info.lag += 1;
                            }
                        }
                        if scanned_to == after {
                            break;
                        }
                        after = scanned_to;
                    }
                    partitions.iter().map(|p| p.lag).sum()
                }
                None => self.log().category_count(category.as_str(), position)?,
            };
            let consumer = ConsumerId::new(category, name);
            let deferred = self
                .tree()
                .scan_prefix(set_aside_prefix(DEFERRED, &consumer))
                .keys()
                .count() as u64;
            listed.push(ConsumerInfo {
                category_head: self.log().category_head(consumer.category.as_str())?,
                consumer,
                position,
                lag,
                deferred,
                partitions,
                instances: Vec::new(),
            });
        }
        Ok(listed)
    }

    async fn view_get(&self, table: &str, key: &str) -> Result<Option<ViewRow>, StoreError> {
        let Some(bytes) = self.tree().get(view_key(table, key)).map_err(backend)? else {
            return Ok(None);
        };
        let row: ViewRow = decode("view row", &bytes)?;
        Ok((!row.value.is_null()).then_some(row))
    }

    async fn view_rows(
        &self,
        table: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ViewRow)>, StoreError> {
        let prefix = key(VIEW, &[table.as_bytes(), &[]]);
        let mut rows = Vec::new();
        for entry in self.tree().scan_prefix(&prefix) {
            let (key, value) = entry.map_err(backend)?;
            let row_key = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            if after_key.is_some_and(|after| row_key.as_str() <= after) {
                continue;
            }
            let row: ViewRow = decode("view row", &value)?;
            if row.value.is_null() {
                continue;
            }
            rows.push((row_key, row));
            if rows.len() >= limit {
                break;
            }
        }
        Ok(rows)
    }

    async fn parked(
        &self,
        consumer: Option<&ConsumerId>,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        let prefix = match consumer {
            Some(c) => set_aside_prefix(PARKED, c),
            None => vec![PARKED],
        };
        self.tree()
            .scan_prefix(prefix)
            .values()
            .map(|entry| decode("parked", &entry.map_err(backend)?))
            .collect()
    }

    async fn deferred(&self, consumer: &ConsumerId) -> Result<Vec<DeferredMessage>, StoreError> {
        let mut listed: Vec<DeferredMessage> = self
            .tree()
            .scan_prefix(set_aside_prefix(DEFERRED, consumer))
            .values()
            .map(|entry| decode("deferred", &entry.map_err(backend)?))
            .collect::<Result<_, _>>()?;
        listed.sort_by_key(|d| (d.due_ms, d.message.global_position));
        Ok(listed)
    }

    async fn replay(
        &self,
        message_id: Option<&str>,
        consumer: Option<&ConsumerId>,
    ) -> Result<usize, StoreError> {
        if message_id.is_none() && consumer.is_none() {
            return Err(StoreError::NotFound(
                "nothing to replay: name a message id or a consumer".into(),
            ));
        }
        let chosen: Vec<ParkedMessage> = self
            .parked(consumer)
            .await?
            .into_iter()
            .filter(|p| message_id.is_none_or(|id| p.message.id == id))
            .collect();
        let (reply, answer) = oneshot::channel();
        self.write(WriteRequest::Replay { chosen, reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(stream: &str, id: &str) -> Commit {
        let message = NewMessage {
            id: id.into(),
            message_type: "Registered".into(),
            data: serde_json::json!({}),
            metadata: Default::default(),
            not_before_ms: None,
        };
        Commit::append(
            StreamName::parse(stream).expect("stream"),
            None,
            vec![message],
        )
    }

    fn ids(page: &CategoryPage) -> Vec<&str> {
        page.messages.iter().map(|m| m.id.as_str()).collect()
    }

    #[tokio::test]
    async fn a_category_read_stops_at_what_is_on_disk() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(backend)?;
        let store = SledStore::open(dir.path())?;
        store.commit(append("user.1", "a")).await?;
        store.commit(append("user.2", "b")).await?;
        let user = Category::parse("user")?;
        // As if `b` were in the tree with its flush still running.
        store.inner.durable.store(1, Ordering::Release);
        let page = store
            .read_category(&user, 0, &CategoryFilter::default(), 10)
            .await?;
        assert_eq!(ids(&page), ["a"]);
        assert_eq!(
            page.scanned_to, 1,
            "nothing unflushed is skipped over either"
        );
        let page = store
            .read_category(&user, 1, &CategoryFilter::default(), 10)
            .await?;
        assert!(page.messages.is_empty());
        assert_eq!(page.scanned_to, 1);
        // The next commit's flush covers both.
        store.commit(append("user.3", "c")).await?;
        let page = store
            .read_category(&user, 1, &CategoryFilter::default(), 10)
            .await?;
        assert_eq!(ids(&page), ["b", "c"]);
        Ok(())
    }
}
