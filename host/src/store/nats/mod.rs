//! The NATS JetStream backend: the same [`MessageStore`] as sled, shared by any number of Ferry
//! processes on one JetStream.
//!
//! Everything lives in one JetStream stream (named after the namespace, `ferry` by default), so
//! that a [`Commit`] is one atomic batch publish: all of it is stored or none. Subjects:
//!
//! | subject | holds |
//! |---|---|
//! | `NS.m.<category>.<id>` | the messages of stream `<category>.<id>`; the stream sequence is the global position |
//! | `NS.id.<message id>` | an id claim, stored just before its message (so the message is at claim + 1) |
//! | `NS.group.<category>.<consumer>` | a consumer group's spec: partitions and partition key |
//! | `NS.pos.<category>.<consumer>.<partition>` | a partition's position and epoch (rolled up: only the last is kept); `NS.pos.<category>.<consumer>` is a position of the format before groups |
//! | `NS.lease.<category>.<consumer>.<partition>` | who holds a partition, and its epoch (rolled up) |
//! | `NS.member.<category>.<consumer>.<instance>` | an instance's heartbeat (rolled up; empty once it left) |
//! | `NS.v.<table>.<key>` | a view row with its `lastUpdateSeq` (rolled up) |
//! | `NS.park.<category>.<consumer>.<global>` | a parked message, empty once replayed (rolled up) |
//! | `NS.defer.<category>.<consumer>.<global>` | a deferred message, empty once handled (rolled up) |
//! | `NS.key.<message id>` | the key of a message's sealed fields, written with its message; shredded by an empty marker (not rolled up, with `Ferry-Erases: <key's sequence>`) in the batch that settles the message, then the key's message is erased by sequence (below) |
//! | `NS.snap.<component hash>.<category>.<id>` | a stream's latest snapshot, `[version, state]` JSON, as the component with that content hash folded it (rolled up) |
//! | `NS.meta.erased` | the sweep mark: every shredding marker up to this sequence has had its key erased (rolled up) |
//!
//! Checks ride on the batch: an expected stream version, a consumer's position and a claimed id
//! are `Nats-Expected-Last-Subject-Sequence` headers, so a commit that raced another process is
//! refused whole by the server, and is then checked again from scratch. Reads use direct gets;
//! waiting uses one durable JetStream consumer per Ferry consumer.
//!
//! Shredding a key: the settle batch adds the empty marker, so `seal_key` answers `None` from
//! that commit on (the last entry is empty). A rollup or a purge would hide the key too, but
//! nats-server's file store leaves a removed message's bytes in its block file until it compacts
//! the block, which it does only once most of the block is deleted (measured: still there after
//! 68 MB of later writes). So once the batch is acknowledged, the key's message is deleted by its
//! sequence with the server's secure erase (`$JS.API.STREAM.MSG.DELETE` with `no_erase` false),
//! which overwrites its bytes in the block; an erase cannot ride in an atomic batch. The key's
//! sequence comes from the committer's reads (the key subjects of a group's shreds are fetched
//! with its other direct gets), so a commit without shreds costs nothing more. A failed erase
//! does not fail the commit; the key is left to the sweep, which each process runs when it
//! connects and every 15 minutes: it pages through `NS.key.*` past the sweep mark and erases
//! each key a marker names that is still stored (a process that stopped between a commit and its
//! erase). One sweep reads what was sealed since the last, not the whole history.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use futures_util::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use self::connect::{connect_client, open_stream, parse_url};

use super::{
    Category, CategoryFilter, CategoryPage, Commit, Committed, ConsumerId, ConsumerInfo,
    DeferredMessage, Group, GroupSpec, Leases, Message, MessageStore, ParkedMessage,
    PartitionPosition, Settle, Snapshot, StoreError, StreamName, ViewRow, now_ms, validate_commit,
    validate_table_name,
};

mod connect;
mod group;

/// JetStream refuses an atomic batch of more messages than this.
const MAX_BATCH: usize = 1000;
/// Messages asked for per direct-get request.
const PAGE: usize = 256;
/// Most category messages one `read_category` call looks at (as in the sled store).
const MAX_SCAN: usize = 10_000;
/// Times a commit is checked and sent again after racing another process.
const RACE_RETRIES: usize = 20;
const FORMAT: &str = "ferry-nats/1";
/// How long a batch's commit may take before it is checked again.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(3);
/// Atomic batches one process sends at once (the server allows 50 per stream by default).
const MAX_BATCHES_IN_FLIGHT: usize = 16;
/// Most commits checked together for one batch.
const MAX_GROUP: usize = 256;
/// Commits waiting for the group committer before `commit` waits to queue.
const QUEUE: usize = 1024;
/// Direct gets a group's checks send at once.
const LOOKUPS_IN_FLIGHT: usize = 64;
/// Bytes a batch message's headers (batch id and sequence, expectations) may take.
const HEADROOM: usize = 512;
/// A wake-up consumer nobody pulled from for this long (its process is gone) is removed.
const WATCHER_INACTIVE: Duration = Duration::from_secs(300);
/// The header of a shredding marker that names the sequence of the key message it shreds.
const ERASES: &str = "Ferry-Erases";
/// Shredded keys waiting for this process's eraser; past this, they are left to the sweep.
const ERASE_QUEUE: usize = 4096;
/// How often a process sweeps for shredded keys whose erase never happened (it also sweeps once
/// when it connects).
const SWEEP_EVERY: Duration = Duration::from_secs(15 * 60);

/// A message as stored in its subject's payload; the stream and global position come from the
/// subject and the sequence.
#[derive(Serialize, Deserialize)]
struct Stored {
    id: String,
    #[serde(rename = "type")]
    message_type: String,
    data: Value,
    #[serde(default)]
    metadata: Map<String, Value>,
    position: u64,
    time_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before_ms: Option<u64>,
    /// Where the stream's previous message is, so that reading a stream's tail walks back from
    /// its last message instead of scanning it from the start: its sequence, or (written in the
    /// same batch) how many sequences before this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prev_back: Option<u64>,
}

impl Stored {
    fn into_message(self, stream: StreamName, global_position: u64) -> Message {
        Message {
            id: self.id,
            stream,
            message_type: self.message_type,
            data: self.data,
            metadata: self.metadata,
            position: self.position,
            global_position,
            time_ms: self.time_ms,
            not_before_ms: self.not_before_ms,
        }
    }
}

/// Longest tail of a stream read by walking back from its last message.
const WALK_BACK: u64 = 32;

/// One stored JetStream message, as a direct get answers it.
#[derive(Clone)]
struct Entry {
    seq: u64,
    subject: String,
    payload: bytes::Bytes,
    /// A shredding marker's `Ferry-Erases` header: the sequence of the key it shreds.
    erases: Option<u64>,
}

/// One message to publish in an atomic batch.
struct Outgoing {
    subject: String,
    payload: Vec<u8>,
    /// `Nats-Expected-Last-Subject-Sequence`: the subject's last sequence must be this (0: empty).
    expect: Option<u64>,
    /// `Nats-Rollup: sub`: the subject keeps only this message.
    rollup: bool,
    /// `Ferry-Erases`: a shredding marker names the sequence of the key message it shreds, so
    /// that the sweep finds a key whose erase never happened.
    erases: Option<u64>,
}

/// Why a batch was not stored.
enum BatchRefused {
    /// An expected last sequence did not hold: someone else wrote meanwhile.
    Raced,
    Other(StoreError),
}

/// The JetStream store. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    stream: stream::Stream,
    ns: String,
    url: String,
    watchers: tokio::sync::Mutex<HashMap<ConsumerId, watch::Sender<u64>>>,
    /// Names this connection's wake-up consumers: every process that watches a category gets
    /// every wake-up (a JetStream consumer shared by two processes would split them).
    instance: String,
    /// The server takes a bounded number of unfinished atomic batches per stream.
    batches: tokio::sync::Semaphore,
    /// Commits for the group committer.
    queue: mpsc::Sender<Queued>,
    /// Sequences of shredded keys' messages, for the eraser once their batch is stored.
    erase: mpsc::Sender<u64>,
    tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NatsStore({}/{})", self.inner.url, self.inner.ns)
    }
}

fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("JetStream {what}: {e}"))
}

impl NatsStore {
    /// Changes how many servers keep the namespace of `url` (its `?replicas` is not needed);
    /// returns the count it had. The servers copy it to new replicas in the background.
    pub async fn set_replicas(url: &str, replicas: usize) -> Result<usize, StoreError> {
        connect::set_replicas(url, replicas).await
    }

    /// Connects to `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]` and creates the
    /// namespace's JetStream stream when it does not exist yet (see [`connect`](self::connect)).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let parsed = parse_url(url)?;
        let unusable = |reason: String| StoreError::Unusable {
            path: url.to_owned(),
            reason,
        };
        let client = connect_client(&parsed).await.map_err(unusable)?;
        let stream = open_stream(&jetstream::new(client.clone()), &parsed)
            .await
            .map_err(unusable)?;
        let server = parsed.servers_text();
        let ns = parsed.namespace;
        let (queue, queued) = mpsc::channel(QUEUE);
        let (erase, to_erase) = mpsc::channel(ERASE_QUEUE);
        let store = Self {
            inner: Arc::new(Inner {
                client,
                stream,
                ns,
                url: server,
                watchers: Default::default(),
                instance: uuid::Uuid::new_v4().simple().to_string(),
                batches: tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT),
                queue,
                erase,
                tasks: Default::default(),
            }),
        };
        let committer = tokio::spawn(commit_queued(Arc::downgrade(&store.inner), queued));
        let eraser = tokio::spawn(erase_shredded(Arc::downgrade(&store.inner), to_erase));
        let sweeper = tokio::spawn(sweep_now_and_then(Arc::downgrade(&store.inner)));
        if let Ok(mut tasks) = store.inner.tasks.lock() {
            tasks.push(committer.abort_handle());
            tasks.push(eraser.abort_handle());
            tasks.push(sweeper.abort_handle());
        }
        store.check_format().await?;
        Ok(store)
    }

    /// Marks a new namespace with the format; refuses one of another format.
    async fn check_format(&self) -> Result<(), StoreError> {
        let subject = format!("{}.meta.format", self.inner.ns);
        match self.last(&subject).await? {
            Some(entry) if entry.payload.as_ref() == FORMAT.as_bytes() => Ok(()),
            Some(entry) => Err(StoreError::Unusable {
                path: format!("{}/{}", self.inner.url, self.inner.ns),
                reason: format!(
                    "it holds format {:?}, this Ferry reads {FORMAT}",
                    String::from_utf8_lossy(&entry.payload)
                ),
            }),
            None => {
                let claim = Outgoing {
                    subject,
                    payload: FORMAT.as_bytes().to_vec(),
                    expect: Some(0),
                    rollup: false,
                    erases: None,
                };
                match self.publish(vec![claim]).await {
                    Ok(_) | Err(BatchRefused::Raced) => Ok(()),
                    Err(BatchRefused::Other(e)) => Err(e),
                }
            }
        }
    }

    fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.inner.ns)
    }

    fn message_subject(&self, stream: &StreamName) -> String {
        self.subject(&format!("m.{}", stream.as_str()))
    }

    fn category_filter(&self, category: &Category) -> String {
        self.subject(&format!("m.{}.*", category.as_str()))
    }

    fn consumer_part(consumer: &ConsumerId) -> String {
        format!("{}.{}", consumer.category.as_str(), token(&consumer.name))
    }

    /// A consumer's position in the format before groups.
    fn position_subject(&self, consumer: &ConsumerId) -> String {
        self.subject(&format!("pos.{}", Self::consumer_part(consumer)))
    }

    fn partition_subject(&self, consumer: &ConsumerId, partition: u32) -> String {
        self.subject(&format!(
            "pos.{}.{partition}",
            Self::consumer_part(consumer)
        ))
    }

    fn parked_subject(&self, consumer: &ConsumerId, global: u64) -> String {
        self.subject(&format!("park.{}.{global}", Self::consumer_part(consumer)))
    }

    fn deferred_subject(&self, consumer: &ConsumerId, global: u64) -> String {
        self.subject(&format!("defer.{}.{global}", Self::consumer_part(consumer)))
    }

    fn claim_subject(&self, id: &str) -> String {
        self.subject(&format!("id.{}", token(id)))
    }

    fn snapshot_subject(&self, stream: &StreamName, component: &str) -> String {
        self.subject(&format!("snap.{component}.{}", stream.as_str()))
    }

    fn seal_key_subject(&self, message_id: &str) -> String {
        self.subject(&format!("key.{}", token(message_id)))
    }

    /// The subjects a settle changes: the positions of the partitions it advances, or one
    /// deferred entry.
    fn settle_subjects(&self, settle: &Settle) -> Vec<String> {
        match settle {
            Settle::Advance {
                consumer,
                partitions,
                ..
            } => partitions
                .iter()
                .map(|moved| self.partition_subject(consumer, moved.partition))
                .collect(),
            Settle::ClearDeferred {
                consumer,
                global_position,
            } => vec![self.deferred_subject(consumer, *global_position)],
        }
    }

    fn view_subject(&self, table: &str, key: &str) -> String {
        self.subject(&format!("v.{table}.{}", token(key)))
    }

    /// One direct-get request; `None` when nothing matches.
    async fn direct_get(&self, request: Value) -> Result<Option<Entry>, StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.inner.ns);
        let reply = self
            .inner
            .client
            .request(api, request.to_string().into())
            .await
            .map_err(|e| backend("get", e))?;
        match reply.status.map(|s| s.as_u16()) {
            Some(404) => Ok(None),
            Some(code) if code >= 300 => Err(backend(
                "get",
                format!("status {code} {}", reply.description.unwrap_or_default()),
            )),
            _ => entry_of(reply).map(Some),
        }
    }

    /// The last message of a subject (wildcards allowed).
    async fn last(&self, subject: &str) -> Result<Option<Entry>, StoreError> {
        self.direct_get(json!({ "last_by_subj": subject })).await
    }

    /// The last message of each subject, fetched concurrently; each subject once.
    async fn lasts(
        &self,
        mut subjects: Vec<String>,
    ) -> Result<HashMap<String, Option<Entry>>, StoreError> {
        subjects.sort_unstable();
        subjects.dedup();
        futures_util::stream::iter(subjects)
            .map(|subject| async move {
                let entry = self.last(&subject).await?;
                Ok::<_, StoreError>((subject, entry))
            })
            .buffer_unordered(LOOKUPS_IN_FLIGHT)
            .try_collect()
            .await
    }

    /// Messages matching `filter` from sequence `from` on, at most `batch`, in order, with how
    /// many more match after them.
    async fn page(
        &self,
        filter: &str,
        from: u64,
        batch: usize,
    ) -> Result<(Vec<Entry>, u64), StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.inner.ns);
        let inbox = self.inner.client.new_inbox();
        let mut replies = self
            .inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| backend("subscribe", e))?;
        let request = json!({ "seq": from.max(1), "next_by_subj": filter, "batch": batch });
        self.inner
            .client
            .publish_with_reply(api, inbox, request.to_string().into())
            .await
            .map_err(|e| backend("get", e))?;
        let mut entries = Vec::new();
        let mut pending = 0;
        loop {
            let reply = tokio::time::timeout(connect::ANSWER_WITHIN, replies.next())
                .await
                .map_err(|_| backend("get", "no answer in time"))?
                .ok_or_else(|| backend("get", "the connection closed"))?;
            match reply.status.map(|s| s.as_u16()) {
                // End of batch, or nothing matched.
                Some(204) | Some(404) => break,
                Some(code) if code >= 300 => {
                    return Err(backend(
                        "get",
                        format!("status {code} {}", reply.description.unwrap_or_default()),
                    ));
                }
                _ => {
                    pending = header_u64(reply.headers.as_ref(), "Nats-Num-Pending").unwrap_or(0);
                    entries.push(entry_of(reply)?);
                    if entries.len() >= batch {
                        // The end-of-batch marker follows; unsubscribing drops it.
                        break;
                    }
                }
            }
        }
        Ok((entries, pending))
    }

    /// Every message matching `filter` (rolled-up subjects: the current value of each).
    async fn all(&self, filter: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let (entries, pending) = self.page(filter, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            out.extend(entries);
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// How many messages match `filter` past sequence `after`.
    async fn count_after(&self, filter: &str, after: u64) -> Result<u64, StoreError> {
        let (entries, pending) = self.page(filter, after + 1, 1).await?;
        Ok(if entries.is_empty() { 0 } else { pending + 1 })
    }

    fn decode_message(&self, entry: &Entry) -> Result<Message, StoreError> {
        Ok(self.decode_with_prev(entry)?.0)
    }

    /// A message and the sequence of its stream's previous message, when stored.
    fn decode_with_prev(&self, entry: &Entry) -> Result<(Message, Option<u64>), StoreError> {
        let prefix = format!("{}.m.", self.inner.ns);
        let name = entry.subject.strip_prefix(&prefix).ok_or_else(|| {
            backend(
                "read",
                format!("{} is not a message subject", entry.subject),
            )
        })?;
        let stream = StreamName::parse(name)?;
        let stored: Stored = serde_json::from_slice(&entry.payload)
            .map_err(|e| backend("read", format!("message at {} is damaged: {e}", entry.seq)))?;
        let prev = stored
            .prev_seq
            .or_else(|| stored.prev_back.map(|back| entry.seq.saturating_sub(back)));
        Ok((stored.into_message(stream, entry.seq), prev))
    }

    /// The messages of a stream from `from_position` to its end, walking back from its last
    /// message; `None` when a message does not say where its predecessor is.
    async fn walk_back(
        &self,
        last: &Entry,
        from_position: u64,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        let mut tail = Vec::new();
        let (mut message, mut prev) = self.decode_with_prev(last)?;
        while message.position > from_position {
            let Some(seq) = prev else { return Ok(None) };
            let Some(entry) = self.direct_get(json!({ "seq": seq })).await? else {
                return Ok(None);
            };
            tail.push(message);
            (message, prev) = self.decode_with_prev(&entry)?;
        }
        tail.push(message);
        tail.reverse();
        Ok(Some(tail))
    }

    /// Sends one atomic batch; returns the sequence of its first message.
    async fn publish(&self, batch: Vec<Outgoing>) -> Result<u64, BatchRefused> {
        if batch.len() > MAX_BATCH {
            return Err(BatchRefused::Other(StoreError::TooLarge {
                entries: batch.len(),
                limit: MAX_BATCH,
            }));
        }
        let _permit = self
            .inner
            .batches
            .acquire()
            .await
            .map_err(|_| BatchRefused::Other(StoreError::Closed))?;
        let count = batch.len();
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let client = &self.inner.client;
        let mut first_seq = 0;
        for (index, outgoing) in batch.into_iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
            if let Some(seq) = outgoing.expect {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    seq.to_string().as_str(),
                );
            }
            if outgoing.rollup {
                headers.insert("Nats-Rollup", "sub");
            }
            if let Some(seq) = outgoing.erases {
                headers.insert(ERASES, seq.to_string().as_str());
            }
            let last = index + 1 == count;
            if last {
                headers.insert("Nats-Batch-Commit", "1");
            }
            let payload = outgoing.payload.into();
            if !last {
                client
                    .publish_with_headers(outgoing.subject, headers, payload)
                    .await
                    .map_err(|e| BatchRefused::Other(backend("publish", e)))?;
                continue;
            }
            // Only the commit is answered. An answer that does not come in time may still have
            // been stored: checking again from scratch is safe, since the claims, positions and
            // row sequences it wrote would now refuse or skip a second copy.
            let reply = match tokio::time::timeout(
                COMMIT_TIMEOUT,
                client.request_with_headers(outgoing.subject, headers, payload),
            )
            .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    return Err(BatchRefused::Raced);
                }
                Ok(Err(e)) => return Err(BatchRefused::Other(backend("publish", e))),
                Err(_) => return Err(BatchRefused::Raced),
            };
            let ack: BatchAck = serde_json::from_slice(&reply.payload)
                .map_err(|e| BatchRefused::Other(backend("publish", e)))?;
            if let Some(error) = ack.error {
                // A wrong last sequence: another writer came first. Too many batches in flight
                // on the server: other processes are busy. Both: check and try again.
                let again = matches!(error.err_code, 10071 | 10164)
                    || error.description.contains("too many inflight");
                return Err(if again {
                    BatchRefused::Raced
                } else {
                    BatchRefused::Other(backend("publish", error.description))
                });
            }
            if ack.count != count as u64 {
                return Err(BatchRefused::Other(backend(
                    "publish",
                    format!("stored {} of {count} messages", ack.count),
                )));
            }
            first_seq = ack.seq + 1 - count as u64;
        }
        Ok(first_seq)
    }

    /// Checks a group of commits against the stored state, in order, and publishes the ones that
    /// fit as one atomic batch: each commit sees the ones before it, as if committed one by one,
    /// and one that fails its checks fails alone. Returns the outcomes of the first commits of
    /// the group (at least one); `Ok(None)`: another writer changed a subject the group read
    /// (nothing was stored); check again.
    async fn try_commits(
        &self,
        commits: &[&Commit],
    ) -> Result<Option<Vec<Result<Committed, StoreError>>>, StoreError> {
        // Everything the checks read, fetched at once: one round trip, not one per subject.
        let mut subjects = Vec::new();
        let mut positions: HashMap<ConsumerId, Vec<u32>> = HashMap::new();
        for commit in commits {
            for append in &commit.appends {
                subjects.push(self.message_subject(&append.stream));
                for message in &append.messages {
                    subjects.push(self.claim_subject(&message.id));
                }
            }
            match &commit.settle {
                // A page's commit advances most of a consumer's partitions: their records are
                // read in one request, not one direct get each.
                Some(Settle::Advance {
                    consumer,
                    partitions,
                    ..
                }) => {
                    positions
                        .entry(consumer.clone())
                        .or_default()
                        .extend(partitions.iter().map(|moved| moved.partition));
                }
                Some(settle) => subjects.extend(self.settle_subjects(settle)),
                None => {}
            }
            for write in &commit.views {
                if validate_table_name(&write.table).is_ok() {
                    subjects.push(self.view_subject(&write.table, &write.key));
                }
            }
            // The sequence of each key shredded, to erase it by once the batch is stored.
            subjects.extend(commit.shred.iter().map(|id| self.seal_key_subject(id)));
        }
        let read_positions = futures_util::future::try_join_all(positions.into_iter().map(
            |(consumer, partitions)| async move {
                let stored = self.per_partition("pos", &consumer).await?;
                Ok::<_, StoreError>((consumer, partitions, stored))
            },
        ));
        let (mut fetched, positions) =
            futures_util::future::try_join(self.lasts(subjects), read_positions).await?;
        for (consumer, partitions, stored) in positions {
            let stored: HashMap<String, Entry> = stored.into_iter().collect();
            for partition in partitions {
                let entry = stored.get(&partition.to_string()).cloned();
                fetched.insert(self.partition_subject(&consumer, partition), entry);
            }
        }
        let mut staged = Staged {
            fetched,
            ..Staged::default()
        };
        let mut outcomes = Vec::new();
        let mut written = Vec::new();
        for commit in commits {
            let planned = match self.plan_commit(&staged, commit) {
                Ok(planned) => planned,
                Err(e) => {
                    outcomes.push(Err(e));
                    written.push(Vec::new());
                    continue;
                }
            };
            let entries = planned.entries(&staged.plan);
            if staged.plan.outgoing.len() + entries > MAX_BATCH {
                if !staged.plan.outgoing.is_empty() {
                    break;
                }
                outcomes.push(Err(StoreError::TooLarge {
                    entries,
                    limit: MAX_BATCH,
                }));
                written.push(Vec::new());
                continue;
            }
            written.push(staged.apply(planned.ops));
            outcomes.push(Ok(Committed {
                written: Vec::new(),
                duplicates: planned.duplicates,
            }));
        }
        if staged.plan.outgoing.is_empty() {
            return Ok(Some(outcomes));
        }
        let erases: Vec<u64> = staged
            .plan
            .outgoing
            .iter()
            .filter_map(|outgoing| outgoing.erases)
            .collect();
        let first = match self.publish(staged.plan.outgoing).await {
            Ok(first) => {
                // The commit stands whether or not the erase does: a key not erased now (full
                // queue, failed request, process gone) is left to the sweep.
                for seq in erases {
                    if self.inner.erase.try_send(seq).is_err() {
                        tracing::warn!(seq, "shredded key left for the sweep to erase");
                    }
                }
                first
            }
            Err(BatchRefused::Raced) => return Ok(None),
            Err(BatchRefused::Other(e)) => {
                // The commits in the batch fail with it; those refused by their checks keep
                // their own error, and those that did not fit still wait.
                for outcome in &mut outcomes {
                    if outcome.is_ok() {
                        *outcome = Err(e.clone());
                    }
                }
                return Ok(Some(outcomes));
            }
        };
        for (outcome, written) in outcomes.iter_mut().zip(written) {
            if let Ok(committed) = outcome {
                committed.written = written
                    .into_iter()
                    .map(|(index, stream, stored)| {
                        stored.into_message(stream, first + index as u64)
                    })
                    .collect();
            }
        }
        Ok(Some(outcomes))
    }

    /// What one commit adds to a group's batch, checked against what the group sees; nothing of
    /// it is staged yet, so a commit that fails here leaves the group as it was.
    fn plan_commit(&self, staged: &Staged, commit: &Commit) -> Result<PlannedCommit, StoreError> {
        let mut planned = PlannedCommit::default();
        let first_index = staged.plan.outgoing.len();
        let mut seen = HashSet::new();
        let time_ms = now_ms();
        // Next version and batch index of the latest message of each stream this commit appends
        // to, continuing from the group's.
        let mut streams: HashMap<&str, (u64, Option<usize>)> = HashMap::new();
        for append in &commit.appends {
            let mut fresh = Vec::new();
            for message in &append.messages {
                let claim = self.claim_subject(&message.id);
                if staged.claimed(&claim) || !seen.insert(message.id.as_str()) {
                    if commit.refuse_duplicates {
                        return Err(StoreError::Duplicate {
                            id: message.id.clone(),
                        });
                    }
                    planned.duplicates.push(message.id.clone());
                } else {
                    fresh.push((message, claim));
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let subject = self.message_subject(&append.stream);
            // The first message of a stream in the batch expects the stream's stored last
            // sequence and points back at it; later ones point back into the batch.
            let mut expect = None;
            let (version, mut latest) = match streams.get(append.stream.as_str()) {
                Some(&known) => known,
                None => match staged.streams.get(&subject) {
                    Some(&(version, index)) => (version, Some(index)),
                    None => {
                        let last = staged.fetched.get(&subject).and_then(Option::as_ref);
                        expect = Some(last.map_or(0, |e| e.seq));
                        let version = match last {
                            Some(entry) => self.decode_message(entry)?.position + 1,
                            None => 0,
                        };
                        (version, None)
                    }
                },
            };
            if let Some(expected) = append.expected_version
                && expected != version
            {
                return Err(StoreError::Conflict {
                    stream: append.stream.as_str().to_owned(),
                    expected,
                    actual: version,
                });
            }
            let count = fresh.len() as u64;
            for (offset, (message, claim)) in fresh.into_iter().enumerate() {
                // The claim goes first, the message right after it.
                let index = first_index + planned.ops.len() + 1;
                let (prev_seq, prev_back) = match latest {
                    Some(earlier) => (None, Some((index - earlier) as u64)),
                    None => (expect.filter(|&seq| seq > 0), None),
                };
                let stored = Stored {
                    id: message.id.clone(),
                    message_type: message.message_type.clone(),
                    data: message.data.clone(),
                    metadata: message.metadata.clone(),
                    position: version + offset as u64,
                    time_ms,
                    not_before_ms: message.not_before_ms,
                    prev_seq,
                    prev_back,
                };
                planned.ops.push(Op::Claim(claim));
                planned.ops.push(Op::Message {
                    subject: subject.clone(),
                    payload: to_json(&stored)?,
                    expect: expect.take(),
                    stream: append.stream.clone(),
                    stored,
                });
                latest = Some(index);
            }
            streams.insert(append.stream.as_str(), (version + count, latest));
        }

        match &commit.settle {
            None => {}
            Some(Settle::Advance {
                consumer,
                partitions,
                to,
            }) => {
                // Each partition's record must be as the consumer read it, epoch included: a
                // take-over rewrote it with a new epoch, so a commit decided under the old lease
                // fails here, or at the server if the take-over lands after this read.
                for moved in partitions {
                    let subject = self.partition_subject(consumer, moved.partition);
                    let current = staged.current(&subject);
                    let actual = match &current {
                        Some(entry) => decode_position(entry)?,
                        None => PartitionPosition::default(),
                    };
                    if actual != moved.from {
                        return Err(StoreError::ConsumerMoved {
                            consumer: format!("{consumer} (partition {})", moved.partition),
                            expected: moved.from.position,
                            actual: actual.position,
                        });
                    }
                    let next = PartitionPosition {
                        position: *to,
                        epoch: actual.epoch,
                    };
                    planned.put(subject, to_json(&next)?, Some(current.map_or(0, |e| e.seq)));
                }
            }
            Some(
                settle @ Settle::ClearDeferred {
                    consumer,
                    global_position,
                },
            ) => {
                let subject = self.deferred_subject(consumer, *global_position);
                debug_assert_eq!(self.settle_subjects(settle), vec![subject.clone()]);
                match staged.current(&subject) {
                    Some(entry) if !entry.payload.is_empty() => {
                        planned.put(subject, Vec::new(), Some(entry.seq));
                    }
                    _ => {
                        return Err(StoreError::ConsumerMoved {
                            consumer: consumer.to_string(),
                            expected: *global_position,
                            actual: 0,
                        });
                    }
                }
            }
        }

        // View rows: a change applies when it is past the row's `lastUpdateSeq` before this
        // commit; of the changes to one row in this commit, the last that applies stands.
        let mut rows: BTreeMap<(String, String), RowChange> = BTreeMap::new();
        for write in &commit.views {
            validate_table_name(&write.table)?;
            let key = (write.table.clone(), write.key.clone());
            if !rows.contains_key(&key) {
                let current = staged.current(&self.view_subject(&write.table, &write.key));
                let seq = current.as_ref().map_or(0, |e| e.seq);
                let stored = match current {
                    Some(entry) => Some(decode_row(&entry)?.last_update_seq),
                    None => None,
                };
                rows.insert(
                    key.clone(),
                    RowChange {
                        seq,
                        stored,
                        change: None,
                    },
                );
            }
            if let Some(row) = rows.get_mut(&key)
                && row.stored.is_none_or(|stored| write.seq > stored)
            {
                row.change = Some(ViewRow {
                    value: write.value.clone().unwrap_or(Value::Null),
                    last_update_seq: write.seq,
                });
            }
        }
        for ((table, key), row) in rows {
            if let Some(change) = row.change {
                planned.put(
                    self.view_subject(&table, &key),
                    to_json(&change)?,
                    Some(row.seq),
                );
            }
        }

        for parked in &commit.park {
            let subject = self.parked_subject(&parked.consumer, parked.message.global_position);
            planned.put(subject, to_json(parked)?, None);
        }
        for deferred in &commit.defer {
            let subject =
                self.deferred_subject(&deferred.consumer, deferred.message.global_position);
            planned.put(subject, to_json(deferred)?, None);
        }
        // A key goes in only with its message, in the same batch: the key of a duplicate
        // skipped above would replace the key of the message stored first.
        for seal in &commit.seal_keys {
            let written = planned
                .ops
                .iter()
                .any(|op| matches!(op, Op::Message { stored, .. } if stored.id == seal.message_id));
            if written {
                planned.put(
                    self.seal_key_subject(&seal.message_id),
                    seal.key.clone(),
                    None,
                );
            }
        }
        // Shredding is an empty message on the key's subject, in the same atomic batch, so
        // `seal_key` answers `None` from the commit on. It is not a rollup: the server's rollup
        // (like its purge) drops the key from the index but leaves its bytes in the block file.
        // The key's message is erased by sequence once the batch is stored (see `erase`), which
        // overwrites it in the file. A key already shredded, or never stored, needs no marker.
        for message_id in &commit.shred {
            let subject = self.seal_key_subject(message_id);
            if staged
                .current(&subject)
                .is_some_and(|entry| !entry.payload.is_empty())
            {
                let stored = staged
                    .fetched
                    .get(&subject)
                    .and_then(Option::as_ref)
                    .filter(|entry| !entry.payload.is_empty())
                    .map(|entry| entry.seq);
                planned.shred(subject, stored);
            }
        }
        for snapshot in &commit.snapshots {
            planned.put(
                self.snapshot_subject(&snapshot.stream, &snapshot.component),
                to_json(&(snapshot.version, &snapshot.state))?,
                None,
            );
        }
        // The server refuses a message past its max_payload; found here, it fails this commit
        // alone instead of the batch it would share.
        let max_payload = self.inner.client.server_info().max_payload;
        if max_payload > 0
            && let Some((name, size)) = planned.largest()
            && size + HEADROOM > max_payload
        {
            return Err(StoreError::InvalidMessage {
                id: name.to_owned(),
                reason: format!(
                    "{size} bytes stored is more than the server takes in one message ({max_payload})"
                ),
            });
        }
        Ok(planned)
    }

    /// Commits the first of `waiting` and as many after it as fit into the same batch, and
    /// answers each; the rest wait for the next group.
    async fn commit_group(&self, waiting: &mut Vec<Queued>) {
        let commits: Vec<&Commit> = waiting.iter().map(|queued| &queued.commit).collect();
        let outcomes = match self.try_commits(&commits).await {
            Ok(Some(outcomes)) => outcomes,
            // Another process changed a subject the group read: the first commit checks again
            // on its own, so it cannot be starved by groups that keep racing.
            Ok(None) => vec![self.commit_alone(commits[0]).await],
            // The server did not answer the checks' reads: every commit of the group fails alike.
            Err(e) => commits.iter().map(|_| Err(e.clone())).collect(),
        };
        for (queued, outcome) in waiting.drain(..outcomes.len()).zip(outcomes) {
            // A caller that stopped waiting learns nothing; the commit stands or not as decided.
            let _ = queued.reply.send(outcome);
        }
    }

    async fn commit_alone(&self, commit: &Commit) -> Result<Committed, StoreError> {
        for attempt in 0..RACE_RETRIES {
            if let Some(outcomes) = self.try_commits(&[commit]).await? {
                return outcomes
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(backend("commit", "no outcome")));
            }
            tokio::time::sleep(Duration::from_millis(attempt as u64 * 2)).await;
        }
        Err(backend(
            "commit",
            format!("other writers kept changing the same subjects ({RACE_RETRIES} tries)"),
        ))
    }

    /// Deletes one message with the server's secure erase (`no_erase` false): the server
    /// overwrites its bytes in the block file, where a rollup, a purge or a plain delete leaves
    /// them until the block is compacted. `Ok(false)`: it was gone already.
    async fn erase(&self, seq: u64) -> Result<bool, StoreError> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            success: bool,
            #[serde(default)]
            error: Option<ApiError>,
        }
        let api = format!("$JS.API.STREAM.MSG.DELETE.{}", self.inner.ns);
        let request = json!({ "seq": seq, "no_erase": false });
        let reply = self
            .inner
            .client
            .request(api, request.to_string().into())
            .await
            .map_err(|e| backend("erase", e))?;
        let answer: Answer =
            serde_json::from_slice(&reply.payload).map_err(|e| backend("erase", e))?;
        match answer.error {
            None if answer.success => Ok(true),
            None => Err(backend("erase", format!("message {seq} was not erased"))),
            // 10037: no message found; 10043: sequence not found; 10057 wraps the first.
            Some(error)
                if matches!(error.err_code, 10037 | 10043)
                    || error.description.contains("not found")
                    || error.description.contains("no message found") =>
            {
                Ok(false)
            }
            Some(error) => Err(backend("erase", error.description)),
        }
    }

    /// Erases every key message that a shredding marker names and that is still stored: what a
    /// process left when it stopped between a commit and its erase, or when an erase failed.
    /// It reads the key subjects' messages past the sweep mark (`NS.meta.erased`: every marker
    /// up to it has had its key erased), a page of 256 per request, so one sweep costs what was
    /// sealed since the last, not the whole history; keys are erased only where one is still
    /// there. Returns how many it erased.
    async fn sweep_shredded(&self) -> Result<usize, StoreError> {
        #[derive(Serialize, Deserialize)]
        struct Mark {
            seq: u64,
        }
        let mark_subject = self.subject("meta.erased");
        let mark = match self.last(&mark_subject).await? {
            Some(entry) => decode::<Mark>("sweep mark", &entry)?.seq,
            None => 0,
        };
        let filter = self.subject("key.*");
        // Keys past the mark that were stored when the sweep read them.
        let mut present = HashSet::new();
        let mut erased = 0;
        let mut done = mark;
        let mut failed = false;
        let mut from = mark + 1;
        loop {
            let (entries, pending) = self.page(&filter, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            for entry in entries {
                if !entry.payload.is_empty() {
                    present.insert(entry.seq);
                } else if let Some(key) = entry.erases
                    && (key <= mark || present.remove(&key))
                {
                    match self.erase(key).await {
                        Ok(true) => erased += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(seq = key, "shredded key not erased: {e}");
                            failed = true;
                        }
                    }
                }
                if !failed {
                    done = entry.seq;
                }
            }
            if pending == 0 {
                break;
            }
        }
        if done > mark {
            let outgoing = Outgoing {
                subject: mark_subject,
                payload: to_json(&Mark { seq: done })?,
                expect: None,
                rollup: true,
                erases: None,
            };
            if let Err(BatchRefused::Other(e)) = self.publish(vec![outgoing]).await {
                return Err(e);
            }
        }
        Ok(erased)
    }

    /// The durable JetStream consumer that wakes a Ferry consumer: it delivers (headers only)
    /// every new message of the category and every change to the consumer's position and
    /// deferred set.
    async fn start_watcher(&self, consumer: &ConsumerId) -> Result<watch::Sender<u64>, StoreError> {
        let name = format!("{}-{}", durable_name(consumer), self.inner.instance);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("wakes Ferry consumer {consumer} in one process")),
            // The server removes it once its process is gone.
            inactive_threshold: WATCHER_INACTIVE,
            filter_subjects: vec![
                self.category_filter(&consumer.category),
                self.subject(&format!("pos.{}.*", Self::consumer_part(consumer))),
                self.subject(&format!("defer.{}.*", Self::consumer_part(consumer))),
            ],
            deliver_policy: jetstream::consumer::DeliverPolicy::New,
            ack_policy: jetstream::consumer::AckPolicy::None,
            headers_only: true,
            ..Default::default()
        };
        let durable = self
            .inner
            .stream
            .get_or_create_consumer(&name, config)
            .await
            .map_err(|e| backend("consumer", e))?;
        let (sender, _) = watch::channel(0u64);
        let wake = sender.clone();
        let label = consumer.to_string();
        let task = tokio::spawn(async move {
            loop {
                match durable.messages().await {
                    Ok(mut messages) => {
                        while let Some(next) = messages.next().await {
                            match next {
                                Ok(_) => wake.send_modify(|n| *n = n.wrapping_add(1)),
                                Err(e) => {
                                    tracing::warn!(consumer = %label, "JetStream delivery: {e}");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(consumer = %label, "JetStream delivery: {e}"),
                }
                // Whatever was missed while reconnecting: let the consumer read again.
                wake.send_modify(|n| *n = n.wrapping_add(1));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.push(task.abort_handle());
        }
        Ok(sender)
    }
}

/// A view row a commit changes: its subject's last sequence, the stored `lastUpdateSeq`, and
/// the new row.
struct RowChange {
    seq: u64,
    stored: Option<u64>,
    change: Option<ViewRow>,
}

/// A commit waiting for the group committer, and who waits for its outcome.
struct Queued {
    commit: Commit,
    reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// Commits what waits in the queue in groups, one atomic batch per group. The server stores a
/// stream's atomic batches one at a time (~1.4 ms each on this machine, whatever their size),
/// so a batch per commit capped a process at ~650 commits/s however many were sent at once.
async fn commit_queued(store: std::sync::Weak<Inner>, mut queue: mpsc::Receiver<Queued>) {
    let mut waiting: Vec<Queued> = Vec::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(queued) => waiting.push(queued),
                None => return,
            }
        }
        while waiting.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(queued) => waiting.push(queued),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else { return };
        NatsStore { inner }.commit_group(&mut waiting).await;
    }
}

/// Erases the messages of keys shredded by this process's commits, once their batch is stored.
async fn erase_shredded(store: std::sync::Weak<Inner>, mut queue: mpsc::Receiver<u64>) {
    while let Some(first) = queue.recv().await {
        let mut seqs = vec![first];
        while seqs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(seq) => seqs.push(seq),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else { return };
        let store = NatsStore { inner };
        futures_util::stream::iter(seqs)
            .for_each_concurrent(LOOKUPS_IN_FLIGHT, |seq| {
                let store = &store;
                async move {
                    if let Err(e) = store.erase(seq).await {
                        tracing::warn!(seq, "shredded key left for the sweep to erase: {e}");
                    }
                }
            })
            .await;
    }
}

/// Sweeps for shredded keys still stored when the store connects, and every [`SWEEP_EVERY`].
async fn sweep_now_and_then(store: std::sync::Weak<Inner>) {
    loop {
        {
            let Some(inner) = store.upgrade() else { return };
            match (NatsStore { inner }).sweep_shredded().await {
                Ok(0) => {}
                Ok(erased) => tracing::info!(erased, "erased shredded keys left by earlier runs"),
                Err(e) => tracing::warn!("sweeping shredded keys: {e}"),
            }
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// What a batch will publish.
#[derive(Default)]
struct Plan {
    outgoing: Vec<Outgoing>,
    /// Key-value subjects already in the batch: a later change replaces the earlier one.
    keyed: HashMap<String, usize>,
}

/// A group's view of the server: the last entry of each subject its commits read, changed by
/// the commits planned into its batch so far.
#[derive(Default)]
struct Staged {
    fetched: HashMap<String, Option<Entry>>,
    claimed: HashSet<String>,
    /// Next version and batch index of the latest planned message, per message subject.
    streams: HashMap<String, (u64, usize)>,
    /// Key-value subjects set by the batch: positions, deferred entries, view rows.
    values: HashMap<String, Vec<u8>>,
    plan: Plan,
}

impl Staged {
    fn claimed(&self, claim: &str) -> bool {
        self.claimed.contains(claim) || self.fetched.get(claim).is_some_and(Option::is_some)
    }

    /// A key-value subject's current entry: the batch's value (with the stored sequence, which
    /// only the batch's first change of it expects), or the stored one.
    fn current(&self, subject: &str) -> Option<Entry> {
        let stored = self.fetched.get(subject).and_then(Option::as_ref);
        match self.values.get(subject) {
            Some(payload) => Some(Entry {
                seq: stored.map_or(0, |e| e.seq),
                subject: subject.to_owned(),
                payload: payload.clone().into(),
                erases: None,
            }),
            None => stored.cloned(),
        }
    }

    /// Adds a planned commit to the batch; returns the batch index, stream and content of each
    /// message it writes.
    fn apply(&mut self, ops: Vec<Op>) -> Vec<(usize, StreamName, Stored)> {
        let mut written = Vec::new();
        for op in ops {
            match op {
                Op::Claim(subject) => {
                    self.plan.claim(subject.clone());
                    self.claimed.insert(subject);
                }
                Op::Message {
                    subject,
                    payload,
                    expect,
                    stream,
                    stored,
                } => {
                    let index = self.plan.append(&subject, payload, expect);
                    self.streams.insert(subject, (stored.position + 1, index));
                    written.push((index, stream, stored));
                }
                Op::Put {
                    subject,
                    payload,
                    expect,
                    rollup,
                    erases,
                } => {
                    self.plan
                        .set(&subject, payload.clone(), expect, rollup, erases);
                    self.values.insert(subject, payload);
                }
            }
        }
        written
    }
}

/// One commit's part of a batch, in batch order, and the ids it skips.
#[derive(Default)]
struct PlannedCommit {
    ops: Vec<Op>,
    duplicates: Vec<String>,
}

impl PlannedCommit {
    /// Entries it adds to a batch: a change to a key-value subject the batch already sets
    /// replaces that entry.
    fn entries(&self, plan: &Plan) -> usize {
        let mut puts = HashSet::new();
        self.ops
            .iter()
            .filter(|op| match op {
                Op::Put { subject, .. } => {
                    !plan.keyed.contains_key(subject) && puts.insert(subject.as_str())
                }
                _ => true,
            })
            .count()
    }

    /// Its largest message (the id, or the subject of a key-value change) with its size.
    fn largest(&self) -> Option<(&str, usize)> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Claim(_) => None,
                Op::Message {
                    subject,
                    payload,
                    stored,
                    ..
                } => Some((stored.id.as_str(), subject.len() + payload.len())),
                Op::Put {
                    subject, payload, ..
                } => Some((subject.as_str(), subject.len() + payload.len())),
            })
            .max_by_key(|(_, size)| *size)
    }

    fn put(&mut self, subject: String, payload: Vec<u8>, expect: Option<u64>) {
        self.ops.push(Op::Put {
            subject,
            payload,
            expect,
            rollup: true,
            erases: None,
        });
    }

    /// An empty message on a key's subject, not rolled up: `seal_key` answers `None` from the
    /// batch on, and the key's own message (`erases`, when stored) is erased once the batch is.
    fn shred(&mut self, subject: String, erases: Option<u64>) {
        self.ops.push(Op::Put {
            subject,
            payload: Vec::new(),
            expect: None,
            rollup: false,
            erases,
        });
    }
}

enum Op {
    Claim(String),
    Message {
        subject: String,
        payload: Vec<u8>,
        expect: Option<u64>,
        stream: StreamName,
        stored: Stored,
    },
    Put {
        subject: String,
        payload: Vec<u8>,
        expect: Option<u64>,
        /// Rolled up (a key-value subject), or added beside the subject's earlier messages (a
        /// shredding marker, whose key is erased by sequence once the batch is stored).
        rollup: bool,
        erases: Option<u64>,
    },
}

impl Plan {
    fn claim(&mut self, subject: String) {
        self.outgoing.push(Outgoing {
            subject,
            payload: Vec::new(),
            expect: Some(0),
            rollup: false,
            erases: None,
        });
    }

    fn append(&mut self, subject: &str, payload: Vec<u8>, expect: Option<u64>) -> usize {
        self.outgoing.push(Outgoing {
            subject: subject.to_owned(),
            payload,
            expect,
            rollup: false,
            erases: None,
        });
        self.outgoing.len() - 1
    }

    /// Sets a key-value subject (rolled up to this one message).
    fn put(&mut self, subject: &str, payload: Vec<u8>, expect: Option<u64>) {
        self.set(subject, payload, expect, true, None);
    }

    /// Sets a key-value subject (rolled up, or, for a shredding marker, beside the key it hides
    /// until the key is erased); a later change in the batch replaces the earlier one (a key
    /// shredded in the batch that wrote it is never stored).
    fn set(
        &mut self,
        subject: &str,
        payload: Vec<u8>,
        expect: Option<u64>,
        rollup: bool,
        erases: Option<u64>,
    ) {
        match self.keyed.get(subject) {
            Some(&index) => {
                let earlier = &mut self.outgoing[index];
                earlier.payload = payload;
                earlier.expect = earlier.expect.or(expect);
                earlier.erases = earlier.erases.or(erases);
            }
            None => {
                self.keyed.insert(subject.to_owned(), self.outgoing.len());
                self.outgoing.push(Outgoing {
                    subject: subject.to_owned(),
                    payload,
                    expect,
                    rollup,
                    erases,
                });
            }
        }
    }
}

#[derive(Deserialize)]
struct BatchAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    count: u64,
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| backend("encode", e))
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

fn entry_of(reply: async_nats::Message) -> Result<Entry, StoreError> {
    let headers = reply.headers.as_ref();
    let seq = header_u64(headers, "Nats-Sequence")
        .ok_or_else(|| backend("get", "an answer without Nats-Sequence"))?;
    let subject = headers
        .and_then(|h| h.get("Nats-Subject"))
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| backend("get", "an answer without Nats-Subject"))?;
    Ok(Entry {
        seq,
        subject,
        payload: reply.payload,
        erases: header_u64(headers, ERASES),
    })
}

/// A partition's position; a position of the format before groups reads with epoch 0.
fn decode_position(entry: &Entry) -> Result<PartitionPosition, StoreError> {
    #[derive(Deserialize)]
    struct Position {
        position: u64,
        #[serde(default)]
        epoch: u64,
    }
    serde_json::from_slice::<Position>(&entry.payload)
        .map(|p| PartitionPosition {
            position: p.position,
            epoch: p.epoch,
        })
        .map_err(|e| {
            backend(
                "read",
                format!("position {} is damaged: {e}", entry.subject),
            )
        })
}

fn decode_row(entry: &Entry) -> Result<ViewRow, StoreError> {
    serde_json::from_slice(&entry.payload).map_err(|e| {
        backend(
            "read",
            format!("view row {} is damaged: {e}", entry.subject),
        )
    })
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, entry: &Entry) -> Result<T, StoreError> {
    serde_json::from_slice(&entry.payload)
        .map_err(|e| backend("read", format!("{what} {} is damaged: {e}", entry.subject)))
}

/// `nats://HOST:PORT[/NAMESPACE]` into the server address and the namespace.
/// A subject token for any text: letters, digits, `-`, `_` and `:` as they are, every other
/// byte as `~XX`; the empty text as `~`.
fn token(text: &str) -> String {
    if text.is_empty() {
        return "~".into();
    }
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b':') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("~{byte:02X}"));
        }
    }
    out
}

/// The text a [`token`] stands for.
fn untoken(token: &str) -> Option<String> {
    if token == "~" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(token.len());
    let mut rest = token.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'~' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The durable JetStream consumer's name: the Ferry consumer and its category, so that
/// `nats consumer ls` shows who depends on whom.
fn durable_name(consumer: &ConsumerId) -> String {
    format!(
        "{}@{}",
        token(&consumer.name),
        token(consumer.category.as_str())
    )
}

#[async_trait]
impl MessageStore for NatsStore {
    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError> {
        validate_commit(&commit)?;
        let (reply, outcome) = oneshot::channel();
        self.inner
            .queue
            .send(Queued { commit, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        outcome.await.map_err(|_| StoreError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let subject = self.message_subject(stream);
        let mut out = Vec::new();
        if from_position > 0 {
            // Projections ask for what came after the version they hold: usually nothing or a
            // message or two, which the stream's last message leads to without a scan.
            let Some(last) = self.last(&subject).await? else {
                return Ok(out);
            };
            let last_position = self.decode_message(&last)?.position;
            if last_position < from_position {
                return Ok(out);
            }
            if last_position - from_position < WALK_BACK
                && let Some(mut tail) = self.walk_back(&last, from_position).await?
            {
                tail.truncate(limit);
                return Ok(tail);
            }
        }
        let mut from = 1;
        while out.len() < limit {
            let (entries, pending) = self.page(&subject, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            for entry in &entries {
                let message = self.decode_message(entry)?;
                if message.position >= from_position && out.len() < limit {
                    out.push(message);
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError> {
        match self.last(&self.message_subject(stream)).await? {
            Some(entry) => Ok(self.decode_message(&entry)?.position + 1),
            None => Ok(0),
        }
    }

    async fn read_category(
        &self,
        category: &Category,
        after: u64,
        keep: &CategoryFilter,
        limit: usize,
    ) -> Result<CategoryPage, StoreError> {
        let filter = self.category_filter(category);
        let mut page = CategoryPage {
            messages: Vec::new(),
            scanned_to: after,
        };
        let mut scanned = 0;
        while page.messages.len() < limit && scanned < MAX_SCAN {
            let want = if !keep.keeps_all() {
                PAGE
            } else {
                (limit - page.messages.len()).min(PAGE)
            };
            let (entries, pending) = self.page(&filter, page.scanned_to + 1, want).await?;
            if entries.is_empty() {
                break;
            }
            for entry in &entries {
                if page.messages.len() >= limit {
                    break;
                }
                scanned += 1;
                let message = self.decode_message(entry)?;
                page.scanned_to = entry.seq;
                if keep.keeps(&message) {
                    page.messages.push(message);
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(page)
    }

    async fn watch(&self, consumer: &ConsumerId) -> Result<watch::Receiver<u64>, StoreError> {
        let mut watchers = self.inner.watchers.lock().await;
        if let Some(sender) = watchers.get(consumer) {
            return Ok(sender.subscribe());
        }
        let sender = self.start_watcher(consumer).await?;
        let receiver = sender.subscribe();
        watchers.insert(consumer.clone(), sender);
        Ok(receiver)
    }

    async fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        let Some(claim) = self.last(&self.claim_subject(id)).await? else {
            return Ok(None);
        };
        // The message follows its claim in the same atomic batch.
        let Some(entry) = self.direct_get(json!({ "seq": claim.seq + 1 })).await? else {
            return Ok(None);
        };
        let message = self.decode_message(&entry)?;
        Ok((message.id == id).then_some(message))
    }

    async fn seal_key(&self, message_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .last(&self.seal_key_subject(message_id))
            .await?
            .filter(|entry| !entry.payload.is_empty())
            .map(|entry| entry.payload.to_vec()))
    }

    async fn snapshot(
        &self,
        stream: &StreamName,
        component: &str,
    ) -> Result<Option<Snapshot>, StoreError> {
        let Some(entry) = self.last(&self.snapshot_subject(stream, component)).await? else {
            return Ok(None);
        };
        let (version, state): (u64, String) =
            serde_json::from_slice(&entry.payload).map_err(|e| {
                backend(
                    "read",
                    format!("snapshot {} is damaged: {e}", entry.subject),
                )
            })?;
        Ok(Some(Snapshot {
            stream: stream.clone(),
            component: component.to_owned(),
            version,
            state,
        }))
    }

    async fn head(&self) -> Result<u64, StoreError> {
        Ok(self.last(&self.subject("m.>")).await?.map_or(0, |e| e.seq))
    }

    async fn join_group(
        &self,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        self.join_group_now(consumer, spec).await
    }

    async fn group(&self, consumer: &ConsumerId) -> Result<Option<Group>, StoreError> {
        self.stored_group(consumer).await
    }

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
    }

    async fn consumers(
        &self,
        category: Option<&Category>,
    ) -> Result<Vec<ConsumerInfo>, StoreError> {
        self.list_consumers(category).await
    }

    async fn view_get(&self, table: &str, key: &str) -> Result<Option<ViewRow>, StoreError> {
        validate_table_name(table)?;
        match self.last(&self.view_subject(table, key)).await? {
            Some(entry) => {
                let row = decode_row(&entry)?;
                Ok((!row.value.is_null()).then_some(row))
            }
            None => Ok(None),
        }
    }

    async fn view_rows(
        &self,
        table: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ViewRow)>, StoreError> {
        validate_table_name(table)?;
        let prefix = format!("{}.v.{table}.", self.inner.ns);
        let mut rows = BTreeMap::new();
        for entry in self.all(&format!("{prefix}*")).await? {
            let Some(key) = entry.subject.strip_prefix(&prefix).and_then(untoken) else {
                continue;
            };
            if after_key.is_some_and(|after| key.as_str() <= after) {
                continue;
            }
            let row = decode_row(&entry)?;
            if !row.value.is_null() {
                rows.insert(key, row);
            }
        }
        Ok(rows.into_iter().take(limit).collect())
    }

    async fn parked(
        &self,
        consumer: Option<&ConsumerId>,
    ) -> Result<Vec<ParkedMessage>, StoreError> {
        let filter = match consumer {
            Some(consumer) => self.subject(&format!("park.{}.*", Self::consumer_part(consumer))),
            None => self.subject("park.>"),
        };
        let mut parked = Vec::new();
        for entry in self.all(&filter).await? {
            if !entry.payload.is_empty() {
                parked.push(decode::<ParkedMessage>("parked message", &entry)?);
            }
        }
        Ok(parked)
    }

    async fn deferred(&self, consumer: &ConsumerId) -> Result<Vec<DeferredMessage>, StoreError> {
        let filter = self.subject(&format!("defer.{}.*", Self::consumer_part(consumer)));
        let mut deferred = Vec::new();
        for entry in self.all(&filter).await? {
            if !entry.payload.is_empty() {
                deferred.push(decode::<DeferredMessage>("deferred message", &entry)?);
            }
        }
        deferred.sort_by_key(|d| (d.due_ms, d.message.global_position));
        Ok(deferred)
    }

    async fn rebuild_views(
        &self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<u64, StoreError> {
        for table in tables {
            validate_table_name(table)?;
        }
        // Not one atomic step on JetStream (a purge cannot ride in a batch), but ordered so an
        // interruption is repaired by running it again: rows go first, then positions move back,
        // which makes every running consumer's next commit fail and read again.
        let purge = |filter: String| async move {
            // A purge is a JetStream API call, not a publish: on a cluster that is electing a
            // leader it is refused for a few seconds as "temporarily unavailable". It is
            // idempotent, so it is made again for a while.
            let deadline = tokio::time::Instant::now() + connect::API_PATIENCE;
            loop {
                use jetstream::stream::PurgeErrorKind as Kind;
                match self.inner.stream.purge().filter(filter.clone()).await {
                    Ok(purged) => break Ok(purged),
                    Err(e)
                        if tokio::time::Instant::now() < deadline
                            && match e.kind() {
                                Kind::TimedOut => true,
                                Kind::JetStream(e) => connect::passing_code(e.error_code().0),
                                Kind::Request => false,
                            } =>
                    {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => break Err(backend("purge", e)),
                }
            }
        };
        for table in tables {
            purge(self.subject(&format!("v.{table}.>"))).await?;
        }
        purge(self.subject("snap.>")).await?;
        let mut plan = Plan::default();
        for consumer in consumers {
            purge(self.subject(&format!("defer.{}.>", Self::consumer_part(consumer)))).await?;
            purge(self.subject(&format!("park.{}.>", Self::consumer_part(consumer)))).await?;
            // Every partition back to the start, keeping its epoch: the lease holder goes on.
            for (partition, position) in self.partition_positions(consumer).await? {
                let reset = PartitionPosition {
                    position: 0,
                    epoch: position.epoch,
                };
                plan.put(
                    &self.partition_subject(consumer, partition),
                    to_json(&reset)?,
                    None,
                );
            }
        }
        if !plan.outgoing.is_empty() {
            self.publish(plan.outgoing).await.map_err(|e| match e {
                BatchRefused::Raced => backend("rebuild", "raced another writer"),
                BatchRefused::Other(e) => e,
            })?;
        }
        let categories: std::collections::BTreeSet<&Category> =
            consumers.iter().map(|c| &c.category).collect();
        let mut total = 0;
        for category in categories {
            total += self.count_after(&self.category_filter(category), 0).await?;
        }
        Ok(total)
    }

    async fn replay(
        &self,
        message_id: Option<&str>,
        consumer: Option<&ConsumerId>,
    ) -> Result<usize, StoreError> {
        for _ in 0..RACE_RETRIES {
            let filter = match consumer {
                Some(consumer) => {
                    self.subject(&format!("park.{}.*", Self::consumer_part(consumer)))
                }
                None => self.subject("park.>"),
            };
            let mut plan = Plan::default();
            let mut count = 0;
            for entry in self.all(&filter).await? {
                if entry.payload.is_empty() {
                    continue;
                }
                let parked: ParkedMessage = decode("parked message", &entry)?;
                if message_id.is_some_and(|id| id != parked.message.id) {
                    continue;
                }
                plan.put(&entry.subject, Vec::new(), Some(entry.seq));
                let deferred = DeferredMessage {
                    consumer: parked.consumer.clone(),
                    due_ms: now_ms(),
                    message: parked.message,
                };
                plan.put(
                    &self.deferred_subject(&deferred.consumer, deferred.message.global_position),
                    to_json(&deferred)?,
                    None,
                );
                count += 1;
            }
            if count == 0 {
                return Ok(0);
            }
            match self.publish(plan.outgoing).await {
                Ok(_) => return Ok(count),
                Err(BatchRefused::Raced) => continue,
                Err(BatchRefused::Other(e)) => return Err(e),
            }
        }
        Err(backend("replay", "raced other writers too often"))
    }

    fn batch_size(&self) -> usize {
        // Each handled message takes an id claim and a message per event, plus view rows:
        // keep a page's commit well inside one atomic batch.
        64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_any_text() {
        for text in ["", "a", "user:command", "a.b*c>d e", "ünï~cödé", "~", "~41"] {
            let t = token(text);
            assert!(!t.is_empty());
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
            assert_eq!(untoken(&t).as_deref(), Some(text));
        }
    }
}
