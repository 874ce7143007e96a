//! The NATS JetStream backend: the same [`MessageStore`] as sled, shared by any number of Ferry
//! processes on one JetStream.
//!
//! Everything lives in one JetStream stream (named after the namespace, `ferry` by default), so
//! that a [`Commit`] is one atomic batch publish: all of it is stored or none. Subjects:
//!
//! | subject | holds |
//! |---|---|
//! | `NS.m.<category>.<id>` | the messages of stream `<category>.<id>`; the stream sequence is the global position |
//! | `NS.id.<message id>` | an id claim naming its stream, stored just before its message (so the message is at claim + 1); a claim written before claims named their stream is empty |
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
//! | `NS.meta.secret`, `NS.meta.keyed` | the namespace's secret (see `store::secret`), written once with the mark that it exists |
//! | `NS.chk.<subject after NS>` | an empty read check (rolled up): carries the expectation on a stream or view row a decision read without writing |
//!
//! Checks ride on the batch: an expected stream version, a consumer's position and a claimed id
//! are `Nats-Expected-Last-Subject-Sequence` headers, so a commit that raced another process is
//! refused whole by the server, and is then checked again from scratch. A stream or view row a
//! decision only read is checked the same way by the server, not by the direct get that read it
//! (any replica answers one, and a replica that lags would pass a stale read): an empty message
//! on `NS.chk.…` carries the expectation with `Nats-Expected-Last-Subject-Sequence-Subject`
//! naming the subject read. Reads use direct gets;
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
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use self::connect::{connect_client, open_stream, parse_url};

use super::{
    Category, CategoryFilter, CategoryPage, Commit, Committed, ConsumerId, ConsumerInfo,
    DeferredMessage, Group, GroupSpec, Leases, Message, MessageStore, NamespaceSecret,
    ParkedMessage, PartitionPosition, Settle, Snapshot, StoreError, StreamName, ViewRow, check_id,
    now_ms, shown, validate_commit, validate_table_name, view_key_fits,
};

mod commit;
mod connect;
mod group;
mod meta;
mod plan;
mod read;
mod shred;
mod subjects;

use self::commit::*;
use self::plan::*;
use self::read::*;
use self::shred::*;
use self::subjects::*;

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
/// Requests sent at once where each subject takes one (erasing shredded keys).
const LOOKUPS_IN_FLIGHT: usize = 64;
/// Most subjects one multi-last direct get names (the server's limit is 1024).
const MULTI_LAST: usize = 1000;
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
/// The same for a read from a stream's start, which a page answers without a scan.
const FIRST_WALK_BACK: u64 = 2;

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
    /// `Nats-Expected-Last-Subject-Sequence-Subject`: the subject `expect` is about, when it is
    /// not this message's own (a read check).
    expect_subject: Option<String>,
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
    /// Read or created by `connect`, before the store is handed out.
    secret: std::sync::OnceLock<NamespaceSecret>,
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

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| backend("encode", e))
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
                secret: Default::default(),
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
        let secret = store.load_secret().await?;
        let _ = store.inner.secret.set(secret);
        Ok(store)
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
        // Projections ask for what came after the version they hold: usually nothing or a
        // message or two, which the stream's last message leads to without a scan. A read from
        // the start is most often of a stream that is empty or holds a message or two (a new
        // entity, a name not claimed yet): its last message answers that in one request, where
        // a page subscribes an inbox of its own; a longer one is read by the page, which
        // starts where it must.
        let walk_back = if from_position == 0 {
            FIRST_WALK_BACK
        } else {
            WALK_BACK
        };
        let Some(last) = self.last(&subject).await? else {
            return Ok(out);
        };
        let last_position = self.decode_message(&last)?.position;
        if last_position < from_position {
            return Ok(out);
        }
        if last_position - from_position < walk_back
            && let Some(mut tail) = self.walk_back(&last, from_position).await?
        {
            tail.truncate(limit);
            return Ok(tail);
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
            // A direct get sends every entry it is asked for: fetch what the page still
            // misses, scaled by the share the filter keeps (a whole page when that is unknown).
            let want = keep
                .fetch_for(limit - page.messages.len())
                .map_or(PAGE, |want| want.min(PAGE));
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

    fn secret(&self) -> &NamespaceSecret {
        // `connect` sets it before anyone holds the store.
        self.inner
            .secret
            .get()
            .expect("the namespace secret is read when connecting")
    }

    async fn message(&self, id: &str) -> Result<Option<Message>, StoreError> {
        // An id no store could hold is not asked for (nor made into a subject).
        if check_id(id).is_err() {
            return Ok(None);
        }
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
        if check_id(message_id).is_err() {
            return Ok(None);
        }
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
        if !view_key_fits(key) {
            return Ok(None);
        }
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
