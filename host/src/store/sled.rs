//! The embedded store on sled 0.34: one data folder, one process.
//!
//! One writer thread owns every write. It takes all requests waiting in its queue (a group),
//! checks each commit against what the store and the group's earlier commits hold (so a conflict
//! fails only that commit), writes the whole group as one atomic sled batch, makes it durable with
//! one `flush`, and only then answers the callers, moves the durable head and wakes the consumers.
//! Readers go to the tree directly; a category read stops at the durable head, so no consumer is
//! handed a message that is written but not yet on disk.
//!
//! Everything lives in one tree, `ferry`, because a sled batch is atomic on one tree only (a
//! transaction over several trees cost twice as much per message). Keys start with a tag byte;
//! `\0` separates parts; numbers are big-endian u64:
//! - `=format` → format tag, `=head` → last global position
//! - `m` category `\0` global → message JSON: a category read is one range scan
//! - `s` stream `\0` position → global (the category comes from the stream's name); a stream's
//!   version is its last position + 1
//! - `i` message id → the message's `m` key
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
//! A folder of the first layout (`ferry-sled/1`, one tree per kind of record) is copied into
//! this one when it is opened; see [`migrate_v1`].

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
    DeferredMessage, Group, GroupSpec, Message, MessageStore, NewMessage, ParkedMessage,
    PartitionInfo, PartitionKey, PartitionPosition, Settle, Snapshot, StoreError, StreamName,
    ViewRow, now_ms, validate_commit,
};

const FORMAT: &[u8] = b"ferry-sled/2";
const FORMAT_V1: &[u8] = b"ferry-sled/1";
const FORMAT_KEY: &[u8] = b"=format";
const HEAD_KEY: &[u8] = b"=head";
const MESSAGE: u8 = b'm';
const STREAM: u8 = b's';
const ID: u8 = b'i';
const CONSUMER: u8 = b'c';
const VIEW: u8 = b'v';
const PARKED: u8 = b'p';
const DEFERRED: u8 = b'd';
const SEAL_KEY: u8 = b'k';
const SNAPSHOT: u8 = b'n';
/// Upper bound of category entries one `read_category` call scans when a filter drops messages.
const MAX_SCAN: usize = 10_000;
/// sled's page cache unless told otherwise. sled counts it by the pages' serialised size and holds
/// them larger in memory; filling a store with 5M messages, 64 MiB kept the process at 681 MiB
/// against 1194 MiB with 256, at the same throughput (RELIABILITY.md).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Upper bound of requests written as one group.
const MAX_GROUP: usize = 512;
/// The writer remembers stream versions up to this many streams, then starts over.
const MAX_CACHED_VERSIONS: usize = 100_000;

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
    JoinGroup {
        consumer: ConsumerId,
        spec: GroupSpec,
        reply: oneshot::Sender<Result<Group, StoreError>>,
    },
}

/// What the writer did for one request.
enum Applied {
    Committed(Committed),
    Moved(usize),
    Joined(Group),
}

impl WriteRequest {
    fn reply(self, result: Result<Applied, StoreError>) {
        match self {
            Self::Commit { reply, .. } | Self::RebuildViews { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Committed(committed) => committed,
                    Applied::Moved(_) | Applied::Joined(_) => Committed::default(),
                }));
            }
            Self::Replay { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Moved(moved) => moved,
                    Applied::Committed(_) | Applied::Joined(_) => 0,
                }));
            }
            Self::JoinGroup {
                reply, consumer, ..
            } => {
                let _ = reply.send(result.and_then(|applied| match applied {
                    Applied::Joined(group) => Ok(group),
                    _ => Err(StoreError::NotFound(format!("consumer group {consumer}"))),
                }));
            }
        }
    }
}

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
    writer: Option<mpsc::UnboundedSender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    /// The last global position on disk: category reads stop there (see `read_category`).
    durable: Arc<AtomicU64>,
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

/// `tag`, then the parts separated by `\0`.
fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    key.push(tag);
    for (n, part) in parts.iter().enumerate() {
        if n > 0 {
            key.push(0);
        }
        key.extend_from_slice(part);
    }
    key
}

fn message_key(category: &str, global: u64) -> Vec<u8> {
    key(MESSAGE, &[category.as_bytes(), &global.to_be_bytes()])
}

fn category_prefix(category: &str) -> Vec<u8> {
    key(MESSAGE, &[category.as_bytes(), &[]])
}

fn stream_key(stream: &str, position: u64) -> Vec<u8> {
    key(STREAM, &[stream.as_bytes(), &position.to_be_bytes()])
}

fn stream_prefix(stream: &str) -> Vec<u8> {
    key(STREAM, &[stream.as_bytes(), &[]])
}

fn id_key(id: &str) -> Vec<u8> {
    key(ID, &[id.as_bytes()])
}

fn seal_key_key(message_id: &str) -> Vec<u8> {
    key(SEAL_KEY, &[message_id.as_bytes()])
}

fn snapshot_key(stream: &str, component: &str) -> Vec<u8> {
    key(SNAPSHOT, &[stream.as_bytes(), component.as_bytes()])
}

fn consumer_key(consumer: &ConsumerId) -> Vec<u8> {
    key(
        CONSUMER,
        &[
            consumer.category.as_str().as_bytes(),
            consumer.name.as_bytes(),
        ],
    )
}

/// A consumer's stored group record; `None` for a position of the layout before groups (8
/// bytes).
fn decode_group(bytes: &[u8]) -> Result<Option<Group>, StoreError> {
    let damaged = || StoreError::Backend("a consumer group record is damaged".into());
    if bytes.len() == 8 {
        return Ok(None);
    }
    let (&[b'G', p0, p1, p2, p3, key], rest) =
        bytes.split_first_chunk::<6>().ok_or_else(damaged)?
    else {
        return Err(damaged());
    };
    let partitions = u32::from_be_bytes([p0, p1, p2, p3]);
    let key = match key {
        0 => PartitionKey::Entity,
        1 => PartitionKey::OriginEntity,
        _ => return Err(damaged()),
    };
    if rest.len() != partitions as usize * 16 {
        return Err(damaged());
    }
    let positions = rest
        .chunks_exact(16)
        .map(|pair| PartitionPosition {
            position: u64_be(&pair[..8]),
            epoch: u64_be(&pair[8..]),
        })
        .collect();
    Ok(Some(Group {
        spec: GroupSpec { partitions, key },
        positions,
    }))
}

fn encode_group(group: &Group) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(6 + group.positions.len() * 16);
    bytes.push(b'G');
    bytes.extend_from_slice(&group.spec.partitions.to_be_bytes());
    bytes.push(match group.spec.key {
        PartitionKey::Entity => 0,
        PartitionKey::OriginEntity => 1,
    });
    for position in &group.positions {
        bytes.extend_from_slice(&position.position.to_be_bytes());
        bytes.extend_from_slice(&position.epoch.to_be_bytes());
    }
    bytes
}

/// The prefix of a consumer's parked (`PARKED`) or deferred (`DEFERRED`) records.
fn set_aside_prefix(tag: u8, consumer: &ConsumerId) -> Vec<u8> {
    key(
        tag,
        &[
            consumer.category.as_str().as_bytes(),
            consumer.name.as_bytes(),
            &[],
        ],
    )
}

fn set_aside_key(tag: u8, consumer: &ConsumerId, global: u64) -> Vec<u8> {
    let mut key = set_aside_prefix(tag, consumer);
    key.extend_from_slice(&global.to_be_bytes());
    key
}

fn view_key(table: &str, row: &str) -> Vec<u8> {
    key(VIEW, &[table.as_bytes(), row.as_bytes()])
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| backend(format!("undecodable {what} record: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain data types cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The version of `stream` as the tree holds it: its last position + 1.
fn stored_version(tree: &Tree, stream: &str) -> Result<u64, StoreError> {
    let prefix = stream_prefix(stream);
    Ok(tree
        .scan_prefix(&prefix)
        .keys()
        .next_back()
        .transpose()
        .map_err(backend)?
        .map(|k| u64_be(&k[prefix.len()..]) + 1)
        .unwrap_or(0))
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
                    unusable(text)
                }
            })?;
        let tree = db.open_tree("ferry").map_err(backend)?;
        match tree.get(FORMAT_KEY).map_err(backend)? {
            Some(tag) if tag.as_ref() == FORMAT => {}
            Some(tag) => return Err(other_format(&tag)),
            None => match legacy_format(&db)? {
                Some(tag) if tag == FORMAT_V1 => migrate_v1(&db, &tree)?,
                Some(tag) => return Err(other_format(&tag)),
                None if tree.is_empty() => {
                    tree.insert(FORMAT_KEY, FORMAT).map_err(backend)?;
                    db.flush().map_err(backend)?;
                }
                None => return Err(unusable("it holds data without a format tag".into())),
            },
        }

        let watchers: Watchers = Arc::default();
        let (writer, queue) = mpsc::unbounded_channel();
        let head = tree
            .get(HEAD_KEY)
            .map_err(backend)?
            .map(|v| u64_be(&v))
            .unwrap_or(0);
        let durable = Arc::new(AtomicU64::new(head));
        let state = Writer {
            db,
            tree: tree.clone(),
            head,
            versions: HashMap::new(),
            durable: durable.clone(),
            watchers: watchers.clone(),
        };
        let writer_thread = std::thread::Builder::new()
            .name("ferry-sled-writer".into())
            .spawn(move || state.run(queue))
            .map_err(backend)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                tree,
                writer: Some(writer),
                writer_thread: Some(writer_thread),
                durable,
                watchers,
            }),
        })
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

    fn category_head(&self, category: &str) -> Result<u64, StoreError> {
        let prefix = category_prefix(category);
        Ok(self
            .tree()
            .scan_prefix(&prefix)
            .keys()
            .next_back()
            .transpose()
            .map_err(backend)?
            .map(|k| u64_be(&k[prefix.len()..]))
            .unwrap_or(0))
    }

    fn message_at(&self, key: &[u8]) -> Result<Message, StoreError> {
        let bytes = self.tree().get(key).map_err(backend)?.ok_or_else(|| {
            backend(format!(
                "index points at missing message {}",
                String::from_utf8_lossy(key)
            ))
        })?;
        decode("message", &bytes)
    }
}

/// The format tag of the first layout, which kept it in a `meta` tree.
fn legacy_format(db: &sled::Db) -> Result<Option<Vec<u8>>, StoreError> {
    if !db.tree_names().iter().any(|name| name.as_ref() == b"meta") {
        return Ok(None);
    }
    let meta = db.open_tree("meta").map_err(backend)?;
    Ok(meta.get("format").map_err(backend)?.map(|tag| tag.to_vec()))
}

/// Copies a folder of the first layout into the `ferry` tree, then drops the old trees. The
/// format tag is written last, in the same flush as the final records: a crash before it leaves
/// the old trees whole, and the next open starts the copy again from an emptied tree.
fn migrate_v1(db: &sled::Db, tree: &Tree) -> Result<(), StoreError> {
    tracing::info!("copying the store from format ferry-sled/1 to ferry-sled/2");
    tree.clear().map_err(backend)?;
    let old = |name: &str| db.open_tree(name).map_err(backend);
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    let flush_batch = |batch: &mut sled::Batch, pending: &mut usize, force: bool| {
        if force || *pending >= 10_000 {
            *pending = 0;
            tree.apply_batch(std::mem::take(batch)).map_err(backend)
        } else {
            Ok(())
        }
    };
    for entry in old("messages")?.iter() {
        let (global, json) = entry.map_err(backend)?;
        let global = u64_be(&global);
        let message: Message = decode("message", &json)?;
        let at = message_key(message.stream.category_str(), global);
        batch.insert(
            stream_key(message.stream.as_str(), message.position),
            &global.to_be_bytes(),
        );
        batch.insert(id_key(&message.id), at.as_slice());
        batch.insert(at, json);
        pending += 3;
        flush_batch(&mut batch, &mut pending, false)?;
    }
    for (name, tag) in [
        ("consumers", CONSUMER),
        ("views", VIEW),
        ("parked", PARKED),
        ("deferred", DEFERRED),
    ] {
        for entry in old(name)?.iter() {
            let (old_key, value) = entry.map_err(backend)?;
            let mut new_key = vec![tag];
            new_key.extend_from_slice(&old_key);
            batch.insert(new_key, value);
            pending += 1;
            flush_batch(&mut batch, &mut pending, false)?;
        }
    }
    if let Some(head) = old("meta")?.get("head").map_err(backend)? {
        batch.insert(HEAD_KEY, head);
    }
    batch.insert(FORMAT_KEY, FORMAT);
    flush_batch(&mut batch, &mut pending, true)?;
    db.flush().map_err(backend)?;
    for name in [
        "meta",
        "messages",
        "streams",
        "versions",
        "categories",
        "ids",
        "consumers",
        "views",
        "parked",
        "deferred",
    ] {
        db.drop_tree(name).map_err(backend)?;
    }
    db.flush().map_err(backend)?;
    Ok(())
}

/// The writes of the group being built, by key (`None`: removed). A commit reads through them
/// before the tree, so it sees what the group's earlier commits wrote though none of it is in
/// sled yet.
type Staged = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// One commit's reads and writes: its own writes first, then the group's, then the tree. Dropped
/// without a trace when the commit fails.
struct Staging<'a> {
    tree: &'a Tree,
    group: &'a Staged,
    own: Staged,
}

impl Staging<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.own.get(key).or_else(|| self.group.get(key)) {
            Some(staged) => Ok(staged.clone()),
            None => Ok(self.tree.get(key).map_err(backend)?.map(|v| v.to_vec())),
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.own.insert(key, Some(value));
    }

    /// Removes `key`; whether it was there.
    fn remove(&mut self, key: Vec<u8>) -> Result<bool, StoreError> {
        let existed = self.get(&key)?.is_some();
        self.own.insert(key, None);
        Ok(existed)
    }
}

/// The writer thread's state: it is the only writer, so the head and stream versions it keeps
/// are the truth, and reads it makes cannot race another write.
struct Writer {
    db: sled::Db,
    tree: Tree,
    head: u64,
    /// Versions of streams written lately (every stream the current group wrote is here).
    versions: HashMap<String, u64>,
    /// The last global position on disk, moved after each flush.
    durable: Arc<AtomicU64>,
    watchers: Watchers,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::UnboundedReceiver<WriteRequest>) {
        while let Some(first) = queue.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            let mut staged = Staged::new();
            let mut results = Vec::with_capacity(group.len());
            let mut touched: BTreeSet<String> = BTreeSet::new();
            let mut failure = None;
            for request in &group {
                let result = match request {
                    WriteRequest::Commit { commit, .. } => self
                        .stage(&mut staged, commit)
                        .map(|(c, t)| (Applied::Committed(c), t)),
                    // These scan the tree, so what the group staged so far is written first.
                    WriteRequest::RebuildViews {
                        tables, consumers, ..
                    } => match self.write_staged(&mut staged) {
                        Ok(()) => self
                            .rebuild(tables, consumers)
                            .map(|(c, t)| (Applied::Committed(c), t)),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    },
                    WriteRequest::Replay { chosen, .. } => match self.write_staged(&mut staged) {
                        Ok(()) => self.replay(chosen).map(|(n, t)| (Applied::Moved(n), t)),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    },
                    WriteRequest::JoinGroup { consumer, spec, .. } => self
                        .join_group(&mut staged, consumer, *spec)
                        .map(|g| (Applied::Joined(g), BTreeSet::new())),
                };
                if let Ok((_, categories)) = &result {
                    touched.extend(categories.iter().cloned());
                }
                results.push(result.map(|(applied, _)| applied));
            }
            // Group commit: one batch and one fsync for every commit above.
            let written = match failure {
                Some(e) => Err(e),
                None => self
                    .write_staged(&mut staged)
                    .and_then(|()| self.db.flush().map_err(backend)),
            };
            if let Err(e) = written {
                // The group may be partly in memory and maybe not on disk: neither "failed" nor
                // "written" is true, so stop. Every caller learns the store stopped; nothing is
                // accepted after this point.
                let reason = format!("write failed, the store stopped (restart to recover): {e}");
                tracing::error!("{reason}");
                for request in group {
                    request.reply(Err(StoreError::Backend(reason.clone())));
                }
                return;
            }
            self.durable.store(self.head, Ordering::Release);
            if let Ok(watchers) = self.watchers.lock() {
                for category in &touched {
                    if let Some(sender) = watchers.get(category) {
                        sender.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            }
            for (request, result) in group.into_iter().zip(results) {
                request.reply(result);
            }
            if self.versions.len() > MAX_CACHED_VERSIONS {
                self.versions.clear();
            }
        }
    }

    /// Writes what the group staged, and the head, as one atomic batch.
    fn write_staged(&mut self, staged: &mut Staged) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, value) in std::mem::take(staged) {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch.insert(HEAD_KEY, &self.head.to_be_bytes());
        self.tree.apply_batch(batch).map_err(backend)
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        match self.versions.get(stream) {
            Some(version) => Ok(*version),
            None => stored_version(&self.tree, stream),
        }
    }

    /// Checks one commit against the store and the group so far, and stages its writes. Returns
    /// what it wrote and the categories whose consumers should wake; on an error nothing of it is
    /// staged.
    fn stage(
        &mut self,
        group: &mut Staged,
        commit: &Commit,
    ) -> Result<(Committed, BTreeSet<String>), StoreError> {
        validate_commit(commit)?;
        let time_ms = now_ms();
        let mut staging = Staging {
            tree: &self.tree,
            group,
            own: Staged::new(),
        };
        let mut committed = Committed::default();
        let mut touched = BTreeSet::new();
        let mut head = self.head;
        let mut versions: Vec<(String, u64)> = Vec::new();
        for append in &commit.appends {
            let stream = append.stream.as_str();
            let mut fresh: Vec<&NewMessage> = Vec::with_capacity(append.messages.len());
            for message in &append.messages {
                if staging.get(&id_key(&message.id))?.is_some()
                    || fresh.iter().any(|m| m.id == message.id)
                {
                    if commit.refuse_duplicates {
                        return Err(StoreError::Duplicate {
                            id: message.id.clone(),
                        });
                    }
                    committed.duplicates.push(message.id.clone());
                } else {
                    fresh.push(message);
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let mut version = match versions.iter().rev().find(|(s, _)| s == stream) {
                Some((_, version)) => *version,
                None => self.stream_version(stream)?,
            };
            if let Some(expected) = append.expected_version
                && expected != version
            {
                return Err(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: version,
                });
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
                let at = message_key(category, head);
                staging.insert(stream_key(stream, version), head.to_be_bytes().to_vec());
                staging.insert(id_key(&message.id), at.clone());
                staging.insert(at, encode(&message));
                version += 1;
                committed.written.push(message);
            }
            versions.push((stream.to_owned(), version));
            touched.insert(category.to_owned());
        }
        // A key goes in only with its message: the key of a duplicate skipped here would
        // replace the key of the message stored first, which then could not be opened.
        for seal in &commit.seal_keys {
            if committed.written.iter().any(|m| m.id == seal.message_id) {
                staging.insert(seal_key_key(&seal.message_id), seal.key.clone());
            }
        }
        for message_id in &commit.shred {
            staging.remove(seal_key_key(message_id))?;
        }
        for snapshot in &commit.snapshots {
            staging.insert(
                snapshot_key(snapshot.stream.as_str(), &snapshot.component),
                encode(&(snapshot.version, &snapshot.state)),
            );
        }

        // Rows this commit wrote: a later change to the same row in the commit replaces it, even
        // with the same `seq` (one outcome may upsert a row twice, or delete and upsert it).
        let mut written_rows: BTreeSet<Vec<u8>> = BTreeSet::new();
        for write in &commit.views {
            let key = view_key(&write.table, &write.key);
            if !written_rows.contains(&key)
                && let Some(existing) = staging.get(&key)?
            {
                let row: ViewRow = decode("view row", &existing)?;
                if write.seq <= row.last_update_seq {
                    continue;
                }
            }
            written_rows.insert(key.clone());
            let row = ViewRow {
                value: write.value.clone().unwrap_or(Value::Null),
                last_update_seq: write.seq,
            };
            staging.insert(key, encode(&row));
        }

        match &commit.settle {
            Some(Settle::Advance {
                consumer,
                partitions,
                to,
            }) => {
                let key = consumer_key(consumer);
                let mut group = match staging.get(&key)? {
                    Some(bytes) => decode_group(&bytes)?,
                    None => None,
                }
                .ok_or_else(|| StoreError::NotFound(format!("consumer group {consumer}")))?;
                for moved in partitions {
                    let stored = group
                        .positions
                        .get_mut(moved.partition as usize)
                        .ok_or_else(|| {
                            StoreError::NotFound(format!(
                                "partition {} of {consumer}",
                                moved.partition
                            ))
                        })?;
                    if *stored != moved.from {
                        return Err(StoreError::ConsumerMoved {
                            consumer: format!("{consumer} (partition {})", moved.partition),
                            expected: moved.from.position,
                            actual: stored.position,
                        });
                    }
                    stored.position = *to;
                }
                staging.insert(key, encode_group(&group));
            }
            // Gone means a rebuild cleared it meanwhile: this outcome is stale.
            Some(Settle::ClearDeferred {
                consumer,
                global_position,
            }) if !staging.remove(set_aside_key(DEFERRED, consumer, *global_position))? => {
                return Err(StoreError::ConsumerMoved {
                    consumer: consumer.to_string(),
                    expected: *global_position,
                    actual: 0,
                });
            }
            Some(Settle::ClearDeferred { .. }) | None => {}
        }
        for park in &commit.park {
            let key = set_aside_key(PARKED, &park.consumer, park.message.global_position);
            staging.insert(key, encode(park));
        }
        for defer in &commit.defer {
            let key = set_aside_key(DEFERRED, &defer.consumer, defer.message.global_position);
            staging.insert(key, encode(defer));
            touched.insert(defer.consumer.category.as_str().to_owned());
        }

        // The commit holds: its writes join the group.
        let own = std::mem::take(&mut staging.own);
        group.extend(own);
        self.head = head;
        self.versions.extend(versions);
        Ok((committed, touched))
    }

    /// Empties view tables and resets consumers in one batch. Nothing else writes while the
    /// writer thread is here, so the keys listed are still the keys removed.
    fn rebuild(
        &mut self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<(Committed, BTreeSet<String>), StoreError> {
        let mut batch = sled::Batch::default();
        for table in tables {
            for row in self
                .tree
                .scan_prefix(key(VIEW, &[table.as_bytes(), &[]]))
                .keys()
            {
                batch.remove(row.map_err(backend)?);
            }
        }
        for consumer in consumers {
            let key = consumer_key(consumer);
            let reset = match self.tree.get(&key).map_err(backend)? {
                Some(bytes) => match decode_group(&bytes)? {
                    Some(mut group) => {
                        for partition in &mut group.positions {
                            partition.position = 0;
                        }
                        encode_group(&group)
                    }
                    None => 0u64.to_be_bytes().to_vec(),
                },
                None => 0u64.to_be_bytes().to_vec(),
            };
            batch.insert(key, reset);
            for tag in [DEFERRED, PARKED] {
                for record in self
                    .tree
                    .scan_prefix(set_aside_prefix(tag, consumer))
                    .keys()
                {
                    batch.remove(record.map_err(backend)?);
                }
            }
        }
        for snapshot in self.tree.scan_prefix([SNAPSHOT]).keys() {
            batch.remove(snapshot.map_err(backend)?);
        }
        self.tree.apply_batch(batch).map_err(backend)?;
        let touched = consumers
            .iter()
            .map(|c| c.category.as_str().to_owned())
            .collect();
        Ok((Committed::default(), touched))
    }

    /// Creates a consumer's group unless it has one: every partition starts at the position of
    /// the layout before groups, if there is one.
    fn join_group(
        &mut self,
        group: &mut Staged,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        let mut staging = Staging {
            tree: &self.tree,
            group,
            own: Staged::new(),
        };
        let key = consumer_key(consumer);
        let start = match staging.get(&key)? {
            Some(bytes) => match decode_group(&bytes)? {
                Some(existing) => return Ok(existing),
                None => u64_be(&bytes),
            },
            None => 0,
        };
        let created = Group {
            spec,
            positions: vec![
                PartitionPosition {
                    position: start,
                    epoch: 0,
                };
                spec.partitions.max(1) as usize
            ],
        };
        staging.insert(key, encode_group(&created));
        let own = std::mem::take(&mut staging.own);
        group.extend(own);
        Ok(created)
    }

    /// Moves parked messages to their consumers' deferred sets, due at once. In the writer thread,
    /// like every write, so it cannot interleave with a rebuild that clears those sets.
    fn replay(
        &mut self,
        chosen: &[ParkedMessage],
    ) -> Result<(usize, BTreeSet<String>), StoreError> {
        let now = now_ms();
        let mut batch = sled::Batch::default();
        let mut moved = BTreeSet::new();
        let mut touched = BTreeSet::new();
        for park in chosen {
            let global = park.message.global_position;
            let parked = set_aside_key(PARKED, &park.consumer, global);
            if self.tree.get(&parked).map_err(backend)?.is_none() || !moved.insert(parked.clone()) {
                continue;
            }
            let defer = DeferredMessage {
                consumer: park.consumer.clone(),
                message: park.message.clone(),
                due_ms: now,
            };
            batch.remove(parked);
            batch.insert(
                set_aside_key(DEFERRED, &park.consumer, global),
                encode(&defer),
            );
            touched.insert(park.consumer.category.as_str().to_owned());
        }
        self.tree.apply_batch(batch).map_err(backend)?;
        Ok((moved.len(), touched))
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
        Ok(categories
            .into_iter()
            .map(|category| {
                self.tree()
                    .scan_prefix(category_prefix(category))
                    .keys()
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
        let start = stream_key(stream.as_str(), from_position);
        let end = stream_key(stream.as_str(), u64::MAX);
        let category = stream.category_str();
        self.tree()
            .range(start..=end)
            .values()
            .take(limit)
            .map(|global| {
                self.message_at(&message_key(category, u64_be(&global.map_err(backend)?)))
            })
            .collect()
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError> {
        stored_version(self.tree(), stream.as_str())
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
        let start = message_key(category.as_str(), after.saturating_add(1));
        let end = message_key(category.as_str(), durable);
        for entry in self.tree().range(start..=end).values().take(MAX_SCAN) {
            if page.messages.len() >= limit {
                break;
            }
            let message: Message = decode("message", &entry.map_err(backend)?)?;
            page.scanned_to = message.global_position;
            if filter.keeps(&message) {
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
        match self.tree().get(id_key(id)).map_err(backend)? {
            Some(at) => Ok(Some(self.message_at(&at)?)),
            None => Ok(None),
        }
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
            let start = message_key(category.as_str(), position.saturating_add(1));
            let end = message_key(category.as_str(), u64::MAX);
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
                    for entry in self.tree().range(start..=end).values() {
                        let message: Message = decode("message", &entry.map_err(backend)?)?;
                        let info = &mut partitions[group.spec.partition_of(&message) as usize];
                        if message.global_position > info.position {
                            info.lag += 1;
                        }
                    }
                    partitions.iter().map(|p| p.lag).sum()
                }
                None => self.tree().range(start..=end).keys().count() as u64,
            };
            let consumer = ConsumerId::new(category, name);
            let deferred = self
                .tree()
                .scan_prefix(set_aside_prefix(DEFERRED, &consumer))
                .keys()
                .count() as u64;
            listed.push(ConsumerInfo {
                category_head: self.category_head(consumer.category.as_str())?,
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
