//! The embedded store on sled 0.34: one data folder, one process.
//!
//! One writer thread owns every write. It takes all commits waiting in its queue, applies each as
//! its own sled transaction (so a conflict fails only that commit), makes them durable with one
//! `flush` (group commit), and only then answers the callers and wakes the consumers. Readers go to
//! the trees directly.
//!
//! Trees and keys (`\0` separates parts; numbers are big-endian u64):
//! - `meta`: `format` → format tag, `head` → last global position
//! - `messages`: global → message JSON
//! - `streams`: `stream\0position` → global; `versions`: stream → message count
//! - `categories`: `category\0global` → empty
//! - `ids`: message id → global
//! - `consumers`: `category\0name` → position
//! - `views`: `table\0key` → row JSON (a deleted row stays as a tombstone with its `lastUpdateSeq`)
//! - `parked`, `deferred`: `category\0name\0global` → record JSON

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Category, CategoryPage, Commit, Committed, ConsumerId, ConsumerInfo, DeferredMessage, Message,
    MessageStore, ParkedMessage, Settle, StoreError, StreamName, ViewRow, now_ms, validate_commit,
};

const FORMAT: &[u8] = b"ferry-sled/1";
/// Upper bound of category entries one `read_category` call scans when a filter drops messages.
const MAX_SCAN: usize = 10_000;
/// sled's page cache unless told otherwise.
pub const DEFAULT_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// Upper bound of commits applied before one flush.
const MAX_GROUP: usize = 512;

#[derive(Clone)]
struct Trees {
    meta: Tree,
    messages: Tree,
    streams: Tree,
    versions: Tree,
    categories: Tree,
    ids: Tree,
    consumers: Tree,
    views: Tree,
    parked: Tree,
    deferred: Tree,
}

enum WriteRequest {
    Commit {
        commit: Box<Commit>,
        reply: oneshot::Sender<Result<Committed, StoreError>>,
    },
    RebuildViews {
        tables: Vec<String>,
        consumers: Vec<ConsumerId>,
        reply: oneshot::Sender<Result<Committed, StoreError>>,
    },
    Replay {
        chosen: Vec<ParkedMessage>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// What the writer did for one request.
enum Applied {
    Committed(Committed),
    Moved(usize),
}

impl WriteRequest {
    fn reply(self, result: Result<Applied, StoreError>) {
        match self {
            Self::Commit { reply, .. } | Self::RebuildViews { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Committed(committed) => committed,
                    Applied::Moved(_) => Committed::default(),
                }));
            }
            Self::Replay { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Moved(moved) => moved,
                    Applied::Committed(_) => 0,
                }));
            }
        }
    }
}

type Watchers = Arc<Mutex<HashMap<String, watch::Sender<u64>>>>;

struct Inner {
    path: PathBuf,
    trees: Trees,
    writer: Option<mpsc::UnboundedSender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    watchers: Watchers,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it holds; joining it releases its handle
        // on the database, so the folder's lock is free once the store is dropped.
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
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

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn u64_be(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(buf)
}

fn key2(a: &str, b: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + 1 + b.len());
    key.extend_from_slice(a.as_bytes());
    key.push(0);
    key.extend_from_slice(b);
    key
}

fn consumer_key(consumer: &ConsumerId) -> Vec<u8> {
    key2(consumer.category.as_str(), consumer.name.as_bytes())
}

fn consumer_message_key(consumer: &ConsumerId, global: u64) -> Vec<u8> {
    let mut key = consumer_key(consumer);
    key.push(0);
    key.extend_from_slice(&global.to_be_bytes());
    key
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| backend(format!("undecodable {what} record: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

impl SledStore {
    /// Opens (or creates) the store in `path`, with sled's default page cache for Ferry (256 MiB).
    /// A folder locked by another process, of another format, or that sled cannot read gives a
    /// clear error and is left untouched.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Opens the store with a page cache of at most `cache_bytes`: sled keeps recently used pages
    /// in memory up to this size, so the process grows with the data until it reaches it.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: u64) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("could not acquire lock") {
                    StoreError::Locked {
                        path: shown.clone(),
                    }
                } else {
                    StoreError::Unusable {
                        path: shown.clone(),
                        reason: text,
                    }
                }
            })?;
        let open = |name: &str| db.open_tree(name).map_err(backend);
        let trees = Trees {
            meta: open("meta")?,
            messages: open("messages")?,
            streams: open("streams")?,
            versions: open("versions")?,
            categories: open("categories")?,
            ids: open("ids")?,
            consumers: open("consumers")?,
            views: open("views")?,
            parked: open("parked")?,
            deferred: open("deferred")?,
        };
        match trees.meta.get("format").map_err(backend)? {
            Some(tag) if tag.as_ref() == FORMAT => {}
            Some(tag) => {
                return Err(StoreError::Unusable {
                    path: shown,
                    reason: format!(
                        "it holds format {:?}, this Ferry reads {:?}",
                        String::from_utf8_lossy(&tag),
                        String::from_utf8_lossy(FORMAT)
                    ),
                });
            }
            None if trees.messages.is_empty() && trees.consumers.is_empty() => {
                trees.meta.insert("format", FORMAT).map_err(backend)?;
                db.flush().map_err(backend)?;
            }
            None => {
                return Err(StoreError::Unusable {
                    path: shown,
                    reason: "it holds data without a format tag".into(),
                });
            }
        }

        let watchers: Watchers = Arc::default();
        let (writer, queue) = mpsc::unbounded_channel();
        let writer_thread = {
            let (db, trees, watchers) = (db.clone(), trees.clone(), watchers.clone());
            std::thread::Builder::new()
                .name("ferry-sled-writer".into())
                .spawn(move || write_loop(db, trees, watchers, queue))
                .map_err(backend)?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                trees,
                writer: Some(writer),
                writer_thread: Some(writer_thread),
                watchers,
            }),
        })
    }

    fn write(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.inner
            .writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(request)
            .map_err(|_| StoreError::Closed)
    }

    fn trees(&self) -> &Trees {
        &self.inner.trees
    }

    fn category_head(&self, category: &str) -> Result<u64, StoreError> {
        let prefix = key2(category, &[]);
        Ok(self
            .trees()
            .categories
            .scan_prefix(&prefix)
            .next_back()
            .transpose()
            .map_err(backend)?
            .map(|(k, _)| u64_be(&k[prefix.len()..]))
            .unwrap_or(0))
    }

    fn message_at(&self, global: u64) -> Result<Message, StoreError> {
        let bytes = self
            .trees()
            .messages
            .get(global.to_be_bytes())
            .map_err(backend)?
            .ok_or_else(|| backend(format!("index points at missing message {global}")))?;
        decode("message", &bytes)
    }
}

fn write_loop(
    db: sled::Db,
    trees: Trees,
    watchers: Watchers,
    mut queue: mpsc::UnboundedReceiver<WriteRequest>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        let mut results = Vec::with_capacity(group.len());
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for request in &group {
            let result = match request {
                WriteRequest::Commit { commit, .. } => {
                    apply(&trees, commit).map(|(c, t)| (Applied::Committed(c), t))
                }
                WriteRequest::RebuildViews {
                    tables, consumers, ..
                } => rebuild(&trees, tables, consumers).map(|(c, t)| (Applied::Committed(c), t)),
                WriteRequest::Replay { chosen, .. } => {
                    replay(&trees, chosen).map(|(n, t)| (Applied::Moved(n), t))
                }
            };
            if let Ok((_, categories)) = &result {
                touched.extend(categories.iter().cloned());
            }
            results.push(result.map(|(applied, _)| applied));
        }
        // Group commit: one fsync makes every transaction above durable.
        if let Err(e) = db.flush() {
            // The group is applied in memory but maybe not on disk: neither "failed" nor
            // "written" is true, so stop. Every caller learns the store stopped; nothing is
            // accepted after this point.
            let reason = format!("flush failed, the store stopped (restart to recover): {e}");
            tracing::error!("{reason}");
            for request in group {
                request.reply(Err(StoreError::Backend(reason.clone())));
            }
            return;
        }
        if let Ok(watchers) = watchers.lock() {
            for category in &touched {
                if let Some(sender) = watchers.get(category) {
                    sender.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        }
        for (request, result) in group.into_iter().zip(results) {
            request.reply(result);
        }
    }
}

/// Empties view tables and resets consumers in one transaction. The keys to delete are listed
/// first: sled transactions cannot scan, and nothing else writes while the writer thread is here.
fn rebuild(
    trees: &Trees,
    tables: &[String],
    consumers: &[ConsumerId],
) -> Result<(Committed, BTreeSet<String>), StoreError> {
    let mut rows = Vec::new();
    for table in tables {
        for entry in trees.views.scan_prefix(key2(table, &[])) {
            rows.push(entry.map_err(backend)?.0);
        }
    }
    let mut set_aside = Vec::new();
    for consumer in consumers {
        let mut prefix = consumer_key(consumer);
        prefix.push(0);
        for entry in trees.deferred.scan_prefix(&prefix) {
            set_aside.push((true, entry.map_err(backend)?.0));
        }
        for entry in trees.parked.scan_prefix(&prefix) {
            set_aside.push((false, entry.map_err(backend)?.0));
        }
    }
    let result = (
        &trees.views,
        &trees.consumers,
        &trees.deferred,
        &trees.parked,
    )
        .transaction(|(views, positions, deferred, parked)| {
            for key in &rows {
                views.remove(key)?;
            }
            for consumer in consumers {
                positions.insert(consumer_key(consumer), &0u64.to_be_bytes())?;
            }
            for (is_deferred, key) in &set_aside {
                if *is_deferred {
                    deferred.remove(key)?;
                } else {
                    parked.remove(key)?;
                }
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        });
    result.map_err(|e| backend(format!("{e:?}")))?;
    let touched = consumers
        .iter()
        .map(|c| c.category.as_str().to_owned())
        .collect();
    Ok((Committed::default(), touched))
}

/// Moves parked messages to their consumers' deferred sets, due at once. In the writer thread,
/// like every write, so it cannot interleave with a rebuild that clears those sets.
fn replay(
    trees: &Trees,
    chosen: &[ParkedMessage],
) -> Result<(usize, BTreeSet<String>), StoreError> {
    let now = now_ms();
    let mut moved = 0;
    let mut touched = BTreeSet::new();
    for park in chosen {
        let key = consumer_message_key(&park.consumer, park.message.global_position);
        let defer = DeferredMessage {
            consumer: park.consumer.clone(),
            message: park.message.clone(),
            due_ms: now,
        };
        let result = (&trees.parked, &trees.deferred).transaction(|(parked, deferred)| {
            if parked.remove(key.as_slice())?.is_some() {
                deferred.insert(key.as_slice(), encode(&defer))?;
                Ok(true)
            } else {
                Ok::<_, ConflictableTransactionError<StoreError>>(false)
            }
        });
        if result.map_err(|e| backend(format!("{e:?}")))? {
            touched.insert(park.consumer.category.as_str().to_owned());
            moved += 1;
        }
    }
    Ok((moved, touched))
}

type Abort = ConflictableTransactionError<StoreError>;

fn abort(e: StoreError) -> Abort {
    ConflictableTransactionError::Abort(e)
}

/// Applies one commit as one sled transaction. Returns what it wrote and the categories whose
/// consumers should wake.
fn apply(trees: &Trees, commit: &Commit) -> Result<(Committed, BTreeSet<String>), StoreError> {
    validate_commit(commit)?;
    let time_ms = now_ms();
    let all = [
        &trees.meta,
        &trees.messages,
        &trees.streams,
        &trees.versions,
        &trees.categories,
        &trees.ids,
        &trees.consumers,
        &trees.views,
        &trees.parked,
        &trees.deferred,
    ];
    let result = all.as_slice().transaction(|t: &Vec<TransactionalTree>| {
        let [
            meta,
            messages,
            streams,
            versions,
            categories,
            ids,
            consumers,
            views,
            parked,
            deferred,
        ] = t.as_slice()
        else {
            return Err(abort(StoreError::Backend("tree set mismatch".into())));
        };
        let mut committed = Committed::default();
        let mut touched = BTreeSet::new();
        let mut head = meta.get("head")?.map(|v| u64_be(&v)).unwrap_or(0);
        for append in &commit.appends {
            let stream = append.stream.as_str();
            let mut fresh = Vec::with_capacity(append.messages.len());
            for message in &append.messages {
                if ids.get(message.id.as_bytes())?.is_some()
                    || fresh
                        .iter()
                        .any(|m: &&super::NewMessage| m.id == message.id)
                {
                    committed.duplicates.push(message.id.clone());
                } else {
                    fresh.push(message);
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let mut version = versions.get(stream)?.map(|v| u64_be(&v)).unwrap_or(0);
            if let Some(expected) = append.expected_version
                && expected != version
            {
                return Err(abort(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: version,
                }));
            }
            let category = append.stream.category_str();
            for new in fresh {
                head += 1;
                let message = Message {
                    id: new.id.clone(),
                    stream: append.stream.clone(),
                    message_type: new.message_type.clone(),
                    data: new.data.clone(),
                    metadata: new.metadata.clone(),
                    position: version,
                    global_position: head,
                    time_ms,
                    not_before_ms: new.not_before_ms,
                };
                messages.insert(&head.to_be_bytes(), encode(&message))?;
                streams.insert(key2(stream, &version.to_be_bytes()), &head.to_be_bytes())?;
                categories.insert(key2(category, &head.to_be_bytes()), &[])?;
                ids.insert(message.id.as_bytes(), &head.to_be_bytes())?;
                version += 1;
                committed.written.push(message);
            }
            versions.insert(stream, &version.to_be_bytes())?;
            touched.insert(category.to_owned());
        }
        meta.insert("head", &head.to_be_bytes())?;

        // Rows this commit wrote: a later change to the same row in the commit replaces it, even
        // with the same `seq` (one outcome may upsert a row twice, or delete and upsert it).
        let mut written_rows: BTreeSet<Vec<u8>> = BTreeSet::new();
        for write in &commit.views {
            let key = key2(&write.table, write.key.as_bytes());
            if !written_rows.contains(&key)
                && let Some(existing) = views.get(&key)?
            {
                let row: ViewRow = decode("view row", &existing).map_err(abort)?;
                if write.seq <= row.last_update_seq {
                    continue;
                }
            }
            written_rows.insert(key.clone());
            let row = ViewRow {
                value: write.value.clone().unwrap_or(Value::Null),
                last_update_seq: write.seq,
            };
            views.insert(key, encode(&row))?;
        }

        match &commit.settle {
            Some(Settle::Advance { consumer, from, to }) => {
                let key = consumer_key(consumer);
                let actual = consumers.get(&key)?.map(|v| u64_be(&v)).unwrap_or(0);
                if actual != *from {
                    return Err(abort(StoreError::ConsumerMoved {
                        consumer: consumer.to_string(),
                        expected: *from,
                        actual,
                    }));
                }
                consumers.insert(key, &to.to_be_bytes())?;
            }
            // Gone means a rebuild cleared it meanwhile: this outcome is stale.
            Some(Settle::ClearDeferred {
                consumer,
                global_position,
            }) if deferred
                .remove(consumer_message_key(consumer, *global_position))?
                .is_none() =>
            {
                return Err(abort(StoreError::ConsumerMoved {
                    consumer: consumer.to_string(),
                    expected: *global_position,
                    actual: 0,
                }));
            }
            Some(Settle::ClearDeferred { .. }) => {}
            None => {}
        }
        for park in &commit.park {
            let key = consumer_message_key(&park.consumer, park.message.global_position);
            parked.insert(key, encode(park))?;
        }
        for defer in &commit.defer {
            let key = consumer_message_key(&defer.consumer, defer.message.global_position);
            deferred.insert(key, encode(defer))?;
            touched.insert(defer.consumer.category.as_str().to_owned());
        }
        Ok((committed, touched))
    });
    result.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    })
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
        Ok(categories
            .into_iter()
            .map(|category| {
                self.trees()
                    .categories
                    .scan_prefix(key2(category, &[]))
                    .count() as u64
            })
            .sum())
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let start = key2(stream.as_str(), &from_position.to_be_bytes());
        let end = key2(stream.as_str(), &u64::MAX.to_be_bytes());
        self.trees()
            .streams
            .range(start..=end)
            .take(limit)
            .map(|entry| {
                let (_, global) = entry.map_err(backend)?;
                self.message_at(u64_be(&global))
            })
            .collect()
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError> {
        Ok(self
            .trees()
            .versions
            .get(stream.as_str())
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0))
    }

    async fn read_category(
        &self,
        category: &Category,
        after: u64,
        origin_prefix: Option<&str>,
        limit: usize,
    ) -> Result<CategoryPage, StoreError> {
        let start = key2(category.as_str(), &after.saturating_add(1).to_be_bytes());
        let end = key2(category.as_str(), &u64::MAX.to_be_bytes());
        let prefix_len = category.as_str().len() + 1;
        let mut page = CategoryPage {
            messages: Vec::new(),
            scanned_to: after,
        };
        for entry in self.trees().categories.range(start..=end).take(MAX_SCAN) {
            if page.messages.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(backend)?;
            let global = u64_be(&key[prefix_len..]);
            let message = self.message_at(global)?;
            page.scanned_to = global;
            let wanted = match origin_prefix {
                None => true,
                Some(prefix) => message
                    .origin_entity()
                    .is_some_and(|o| o.starts_with(prefix)),
            };
            if wanted {
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
        match self.trees().ids.get(id.as_bytes()).map_err(backend)? {
            Some(global) => Ok(Some(self.message_at(u64_be(&global))?)),
            None => Ok(None),
        }
    }

    async fn head(&self) -> Result<u64, StoreError> {
        Ok(self
            .trees()
            .meta
            .get("head")
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0))
    }

    async fn consumer_position(&self, consumer: &ConsumerId) -> Result<u64, StoreError> {
        Ok(self
            .trees()
            .consumers
            .get(consumer_key(consumer))
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0))
    }

    async fn consumers(
        &self,
        category: Option<&Category>,
    ) -> Result<Vec<ConsumerInfo>, StoreError> {
        let prefix = category.map(|c| key2(c.as_str(), &[])).unwrap_or_default();
        let mut listed = Vec::new();
        for entry in self.trees().consumers.scan_prefix(prefix) {
            let (key, value) = entry.map_err(backend)?;
            let text = String::from_utf8_lossy(&key);
            let Some((category, name)) = text.split_once('\0') else {
                continue;
            };
            let category = Category::parse(category)?;
            let position = u64_be(&value);
            let start = key2(category.as_str(), &position.saturating_add(1).to_be_bytes());
            let end = key2(category.as_str(), &u64::MAX.to_be_bytes());
            let lag = self.trees().categories.range(start..=end).count() as u64;
            let consumer = ConsumerId::new(category, name);
            let mut deferred_prefix = consumer_key(&consumer);
            deferred_prefix.push(0);
            let deferred = self.trees().deferred.scan_prefix(deferred_prefix).count() as u64;
            listed.push(ConsumerInfo {
                category_head: self.category_head(consumer.category.as_str())?,
                consumer,
                position,
                lag,
                deferred,
            });
        }
        Ok(listed)
    }

    async fn view_get(&self, table: &str, key: &str) -> Result<Option<ViewRow>, StoreError> {
        let Some(bytes) = self
            .trees()
            .views
            .get(key2(table, key.as_bytes()))
            .map_err(backend)?
        else {
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
        let prefix = key2(table, &[]);
        let mut rows = Vec::new();
        for entry in self.trees().views.scan_prefix(&prefix) {
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
        let prefix = consumer
            .map(|c| {
                let mut key = consumer_key(c);
                key.push(0);
                key
            })
            .unwrap_or_default();
        self.trees()
            .parked
            .scan_prefix(prefix)
            .map(|entry| decode("parked", &entry.map_err(backend)?.1))
            .collect()
    }

    async fn deferred(&self, consumer: &ConsumerId) -> Result<Vec<DeferredMessage>, StoreError> {
        let mut prefix = consumer_key(consumer);
        prefix.push(0);
        let mut listed: Vec<DeferredMessage> = self
            .trees()
            .deferred
            .scan_prefix(prefix)
            .map(|entry| decode("deferred", &entry.map_err(backend)?.1))
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
