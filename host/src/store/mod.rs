//! The message store: streams, categories, consumer positions, view tables, parked and deferred
//! messages. Owns the [`MessageStore`] trait, the types that cross it, and its backends; it is the
//! only part of Ferry that touches sled or NATS.
//!
//! The unit of writing is a [`Commit`]: messages for several streams (each with an optional
//! expected version), view changes, and what happened to the message a consumer handled (its new
//! position, or it parked or deferred). A backend applies a commit atomically and durably, or not
//! at all.

mod group;
mod limits;
mod names;
mod nats;
mod secret;
mod sled;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::group::{
    CategoryFilter, DEFAULT_PARTITIONS, Group, GroupSpec, GroupState, Lease, Leases, Member,
    PartitionFilter, PartitionFrom, PartitionKey, PartitionPosition, partition_of,
};
pub use self::limits::{
    MAX_DATA_BYTES, MAX_ID_BYTES, MAX_METADATA_BYTES, MAX_REASON_BYTES, MAX_TYPE_BYTES,
    MAX_VIEW_KEY_BYTES, MAX_VIEW_ROW_BYTES, bounded_reason, check_id,
};
pub(crate) use self::limits::{check_message, check_view_write};
pub(crate) use self::limits::{shown, view_key_fits};
pub use self::names::{
    COMMAND_SUFFIX, Category, NameError, StreamName, validate_service_name, validate_table_name,
};
pub use self::nats::NatsStore;
pub use self::secret::NamespaceSecret;
pub use self::sled::{
    DEFAULT_CACHE_BYTES, DEFAULT_CACHED_VERSIONS, KeyAccount, LogCheck, SledStore, StoreCheck,
};

/// A stored message. See the WIT `message` record for the meaning of each field.
///
/// Every JSON form Ferry shows (HTTP, `--json`) names fields in camelCase, as the article's
/// metadata does; the aliases read records the embedded store wrote in snake_case before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub id: String,
    pub stream: StreamName,
    #[serde(rename = "type")]
    pub message_type: String,
    pub data: Value,
    pub metadata: Map<String, Value>,
    /// 0-based index within the stream.
    pub position: u64,
    /// Store-wide position, 1-based and increasing in commit order; dense on sled, with gaps on
    /// JetStream (where the same sequence also numbers positions and view rows).
    #[serde(alias = "global_position")]
    pub global_position: u64,
    #[serde(alias = "time_ms")]
    pub time_ms: u64,
    /// Consumers hold the message back until this time.
    #[serde(
        default,
        alias = "not_before_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before_ms: Option<u64>,
}

impl Message {
    /// The `originEntity` metadata, when it is a string.
    pub fn origin_entity(&self) -> Option<&str> {
        self.metadata.get("originEntity").and_then(Value::as_str)
    }
}

/// A message to append; the store assigns positions and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewMessage {
    pub id: String,
    #[serde(rename = "type")]
    pub message_type: String,
    pub data: Value,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    #[serde(
        default,
        alias = "not_before_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_before_ms: Option<u64>,
}

/// Messages for one stream within a commit.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream: StreamName,
    /// The number of messages the stream must hold before this append (its version); `Some(0)`
    /// means the stream must be empty, `None` means no check.
    pub expected_version: Option<u64>,
    pub messages: Vec<NewMessage>,
}

/// A change to one view row, made by the message at global position `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewWrite {
    pub table: String,
    pub key: String,
    /// The new row; `None` deletes it.
    pub value: Option<Value>,
    /// The global position of the message that caused the change (`lastUpdateSeq`). A write whose
    /// `seq` is not past the row's `lastUpdateSeq` is ignored, unless its commit read the row
    /// ([`ViewRead`]): that write was decided on the row as it stands, whatever wrote it last.
    pub seq: u64,
}

/// A view row as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewRow {
    pub value: Value,
    #[serde(rename = "lastUpdateSeq")]
    pub last_update_seq: u64,
}

/// A view row as a handler read it (`view-get`): its commit holds only while the row still
/// holds that value, or is still absent (`None`: no row, or a deleted one). Two instances adding
/// to one row from different entities then never lose an update: the second commit fails with
/// [`StoreError::ViewChanged`] and its message is decided again on the row as it stands. The
/// value, not a revision, is what is compared: a decision rests on what it read, and a page
/// decided on the writes of the page still being committed knows their values only.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewRead {
    pub table: String,
    pub key: String,
    pub value: Option<Value>,
}

impl ViewRead {
    /// Whether `current` (the stored row, a deleted one included) is the row this read saw.
    pub fn holds(&self, current: Option<&ViewRow>) -> bool {
        let seen = current
            .map(|row| &row.value)
            .filter(|value| !value.is_null());
        seen == self.value.as_ref()
    }
}

/// A stream as a decision read it, to its end, without writing to it: its commit holds only
/// while the stream is still at `version` (the count of its messages), or it fails whole with
/// [`StoreError::Conflict`] and the message is decided again. A stream the commit appends to is
/// checked by the append's expected version instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRead {
    pub stream: StreamName,
    pub version: u64,
}

/// A durable consumer: a name and a position in a category (`microservice:email` on
/// `email:command`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConsumerId {
    pub category: Category,
    pub name: String,
}

impl ConsumerId {
    pub fn new(category: Category, name: impl Into<String>) -> Self {
        Self {
            category,
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.name, self.category)
    }
}

/// A consumer as listed: its position and how far behind the category it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerInfo {
    pub consumer: ConsumerId,
    /// The lowest position of its partitions: every message of the category at or below it is
    /// settled (0: none yet).
    pub position: u64,
    /// Global position of the category's last message.
    pub category_head: u64,
    /// Messages of the category past the consumer's position.
    pub lag: u64,
    /// Messages set aside for later (not yet due, or replayed and not yet handled).
    pub deferred: u64,
    /// Each partition's position and lag, and who holds it on a shared store.
    pub partitions: Vec<PartitionInfo>,
    /// The live instances sharing the group (shared stores only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceInfo>,
}

/// An instance of a consumer's group as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceInfo {
    pub instance: String,
    /// When it joined and when it last renewed, by its own clock.
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    /// The partitions whose leases it holds.
    pub partitions: Vec<u32>,
    /// When it took the lease it has held longest, by its clock (0: it holds none).
    pub held_since_ms: u64,
}

/// One partition of a consumer as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub position: u64,
    pub epoch: u64,
    /// Messages of this partition past its position.
    pub lag: u64,
    /// The instance holding its lease (shared stores only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A message a consumer gave up on, with the reason. Replaying it hands it back to the consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParkedMessage {
    pub consumer: ConsumerId,
    pub message: Message,
    pub reason: String,
    pub attempts: u32,
    #[serde(alias = "parked_at_ms")]
    pub parked_at_ms: u64,
}

/// A message a consumer set aside to handle later: not yet due (`not_before_ms`), or replayed
/// from the parked place (due at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeferredMessage {
    pub consumer: ConsumerId,
    pub message: Message,
    #[serde(alias = "due_ms")]
    pub due_ms: u64,
}

/// What happens to the message a consumer handled, in the same commit as its outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// The consumer read it from its category: move each of `partitions` from where the
    /// consumer read it to `to` (keeping its epoch). If a stored position is no longer that (a
    /// rebuild reset it, another instance took the partition over), the whole commit fails with
    /// [`StoreError::ConsumerMoved`].
    Advance {
        consumer: ConsumerId,
        partitions: Vec<PartitionFrom>,
        to: u64,
    },
    /// The consumer took it from its deferred set: remove it from there. Decided under the lease
    /// of `partition` at `epoch`: once another instance took the partition over (a new epoch),
    /// the commit fails with [`StoreError::ConsumerMoved`], as an `Advance` does.
    ClearDeferred {
        consumer: ConsumerId,
        global_position: u64,
        partition: u32,
        epoch: u64,
    },
}

/// One atomic, durable unit of writing.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    pub appends: Vec<StreamAppend>,
    pub views: Vec<ViewWrite>,
    pub settle: Option<Settle>,
    /// Messages the consumer gave up on.
    pub park: Vec<ParkedMessage>,
    /// Messages the consumer set aside until they are due.
    pub defer: Vec<DeferredMessage>,
    /// Fail the whole commit with [`StoreError::Duplicate`] when a message's id is already
    /// stored (or twice in the commit), instead of skipping that message: a consumer's page was
    /// decided as if each message it adds were new, so it lands as decided or not at all.
    pub refuse_duplicates: bool,
    /// Keys of sealed fields (see `seal`), each stored only if its message is written by this
    /// commit: a duplicate skipped keeps the key of the message stored first.
    pub seal_keys: Vec<SealKey>,
    /// Message ids whose keys this commit removes: the commit that settles a sealed command
    /// destroys its key with everything else it writes, or not at all.
    pub shred: Vec<String>,
    /// States folded from stored events, kept so that a later fold starts from them (see
    /// [`Snapshot`]). Each replaces the stored snapshot of its stream and component.
    pub snapshots: Vec<Snapshot>,
    /// View rows the decision read: each must still be as read, or the commit fails whole.
    pub view_reads: Vec<ViewRead>,
    /// Streams the decision read and does not append to: each must still be at the version
    /// read, or the commit fails whole.
    pub stream_reads: Vec<StreamRead>,
}

/// A stream's state as one version of a component's `project` folded its first `version` events.
/// A stream's events never change, so a snapshot stays true for as long as that component
/// version runs; it is keyed by the component's content hash so that another version never
/// starts from it. Derived data: losing one costs a longer fold, nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub stream: StreamName,
    /// The content hash of the component that folded it.
    pub component: String,
    /// How many of the stream's events it has folded: the version it stands at.
    pub version: u64,
    pub state: String,
}

/// The key of one message's sealed fields, kept until the message is settled.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey {
    pub message_id: String,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for SealKey {
    // A key in a log line or a panic message would outlive its shredding.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("message_id", &self.message_id)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .finish()
    }
}

impl Commit {
    /// A commit that only appends messages to one stream.
    pub fn append(
        stream: StreamName,
        expected_version: Option<u64>,
        messages: Vec<NewMessage>,
    ) -> Self {
        Self {
            appends: vec![StreamAppend {
                stream,
                expected_version,
                messages,
            }],
            ..Self::default()
        }
    }
}

/// What a commit wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    /// The messages appended, with their positions, in commit order.
    pub written: Vec<Message>,
    /// Ids of messages skipped because a message with that id was already stored.
    pub duplicates: Vec<String>,
}

/// A page of a category read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CategoryPage {
    /// Messages past the requested position that passed the filter, in global order.
    pub messages: Vec<Message>,
    /// The global position up to which the category was scanned (filtered-out messages included);
    /// read again from here.
    pub scanned_to: u64,
}

/// Errors callers branch on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("stream {stream} is at version {actual}, not the expected {expected}")]
    Conflict {
        stream: String,
        expected: u64,
        actual: u64,
    },
    #[error("consumer {consumer} is at {actual}, not at {expected} where it read from")]
    ConsumerMoved {
        consumer: String,
        expected: u64,
        actual: u64,
    },
    #[error("a message with id {id:?} is already stored")]
    Duplicate { id: String },
    /// A message id names one message of one stream: sent to another stream, it is refused
    /// (saying nothing of the stream that holds it).
    #[error("the message id {id:?} is already used by another stream")]
    IdInUse { id: String },
    /// A view row a decision read was written since (see [`ViewRead`]): decide again.
    #[error("view row {table}/{key} changed since the handler read it")]
    ViewChanged { table: String, key: String },
    #[error("invalid message {id:?}: {reason}")]
    InvalidMessage { id: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("the data folder {path} is in use by another Ferry process")]
    Locked { path: String },
    #[error("the data folder {path} cannot be used: {reason}")]
    Unusable { path: String, reason: String },
    #[error("the commit holds {entries} entries, more than the store takes at once ({limit})")]
    TooLarge { entries: usize, limit: usize },
    #[error("the store is closed")]
    Closed,
    /// The backend refused the write for what it is (its size, a subject, a permission):
    /// sending it again can never succeed.
    #[error("refused by the store: {0}")]
    Refused(String),
    /// The disk is full (or below the space the store keeps in reserve): nothing of the commit
    /// was written; reads go on, and writes succeed again once space is freed.
    #[error("the disk is full: {0}; nothing of this commit was written")]
    Full(String),
    /// The backend could not answer (a timeout, no responders, a lost connection): the same
    /// write may succeed later.
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether the commit that met this error can never succeed as it is, however often it is
    /// sent: a consumer parks the message whose outcome it is, and goes on with the others.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Name(_)
                | Self::InvalidMessage { .. }
                | Self::TooLarge { .. }
                | Self::IdInUse { .. }
                | Self::Refused(_)
        )
    }
}

/// The message store. Every backend passes the conformance suite in `tests/store_conformance.rs`.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Applies a commit atomically; returns after it is durable. A conflict on any expected
    /// version fails the whole commit with [`StoreError::Conflict`]; messages whose id is already
    /// stored are skipped (and reported), the rest of the commit still applies (unless it
    /// refuses duplicates).
    async fn commit(&self, commit: Commit) -> Result<Committed, StoreError>;

    /// Messages of a stream from a 0-based position, at most `limit`.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from_position: u64,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError>;

    /// The number of messages in a stream.
    async fn stream_version(&self, stream: &StreamName) -> Result<u64, StoreError>;

    /// Messages of a category with a global position past `after` that `filter` keeps, at most
    /// `limit`.
    async fn read_category(
        &self,
        category: &Category,
        after: u64,
        filter: &CategoryFilter,
        limit: usize,
    ) -> Result<CategoryPage, StoreError>;

    /// A receiver that changes after every durable write to the consumer's category, and
    /// whenever a replay or rebuild changes its deferred set or position. Take it before
    /// reading, then await `changed()`: nothing that happens after it was taken is missed. It
    /// may also change when nothing relevant did; callers read again.
    async fn watch(
        &self,
        consumer: &ConsumerId,
    ) -> Result<tokio::sync::watch::Receiver<u64>, StoreError>;

    /// How many category messages a consumer should handle per commit.
    fn batch_size(&self) -> usize {
        256
    }

    /// The message with this id.
    async fn message(&self, id: &str) -> Result<Option<Message>, StoreError>;

    /// The namespace's secret, created with the store: it keys the ids the host derives and the
    /// secrets it gives guests.
    fn secret(&self) -> &NamespaceSecret;

    /// Why the store cannot take writes now (a full disk), while it still serves reads; `None`
    /// when it is healthy.
    fn degraded(&self) -> Option<String> {
        None
    }

    /// The key of the sealed fields of the message with this id; `None` once a commit shredded
    /// it (or when the message has none).
    async fn seal_key(&self, message_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The latest snapshot of a stream folded by the component with this content hash.
    async fn snapshot(
        &self,
        stream: &StreamName,
        component: &str,
    ) -> Result<Option<Snapshot>, StoreError>;

    /// The global position of the last message written (0 when empty).
    async fn head(&self) -> Result<u64, StoreError>;

    /// A consumer's group, created with `spec` when it has none: every partition then starts
    /// where the consumer's position of a version before groups stood (0 when none). A group
    /// that exists keeps its own spec, whatever `spec` says.
    async fn join_group(&self, consumer: &ConsumerId, spec: GroupSpec)
    -> Result<Group, StoreError>;

    /// A consumer's group as stored; `None` when it was never created.
    async fn group(&self, consumer: &ConsumerId) -> Result<Option<Group>, StoreError>;

    /// Where a consumer has settled its category up to: the lowest position of its partitions
    /// (0 before it has a group). Every message at or below it is handled.
    async fn settled(&self, consumer: &ConsumerId) -> Result<u64, StoreError> {
        Ok(self.group(consumer).await?.map_or(0, |group| group.low()))
    }

    /// Membership and leases, on a store that several processes share; `None` when one process
    /// owns the store and so every partition.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }

    /// The consumers with a stored position, of one category or of all.
    async fn consumers(&self, category: Option<&Category>)
    -> Result<Vec<ConsumerInfo>, StoreError>;

    /// A view row.
    async fn view_get(&self, table: &str, key: &str) -> Result<Option<ViewRow>, StoreError>;

    /// Rows of a view table in key order, starting after `after_key`.
    async fn view_rows(
        &self,
        table: &str,
        after_key: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, ViewRow)>, StoreError>;

    /// Parked messages, of one consumer or all.
    async fn parked(&self, consumer: Option<&ConsumerId>)
    -> Result<Vec<ParkedMessage>, StoreError>;

    /// A consumer's deferred messages in order of due time.
    async fn deferred(&self, consumer: &ConsumerId) -> Result<Vec<DeferredMessage>, StoreError>;

    /// Empties view tables and sends consumers (every partition) back to the start of their
    /// categories (clearing their deferred and parked messages), in one step, so the consumers
    /// rebuild the views from the event history. Every snapshot goes too: a rebuild derives
    /// everything again from the events alone. Returns how many messages the consumers' categories hold: the history
    /// they will replay.
    async fn rebuild_views(
        &self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<u64, StoreError>;

    /// Moves parked messages back to their consumers, due at once: every parked copy of the
    /// message with `message_id` when given, otherwise all of `consumer`'s. Returns how many.
    async fn replay(
        &self,
        message_id: Option<&str>,
        consumer: Option<&ConsumerId>,
    ) -> Result<usize, StoreError>;
}

/// Refuses a commit holding a message or view change no backend may store (see `limits`).
pub(crate) fn validate_commit(commit: &Commit) -> Result<(), StoreError> {
    for message in commit.appends.iter().flat_map(|a| &a.messages) {
        limits::check_message(message)?;
    }
    for write in &commit.views {
        limits::check_view_write(write)?;
    }
    for snapshot in &commit.snapshots {
        // A content hash: it becomes part of a key and of a subject.
        if snapshot.component.is_empty()
            || !snapshot
                .component
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(StoreError::InvalidMessage {
                id: snapshot.stream.to_string(),
                reason: format!(
                    "a snapshot's component must be a content hash, not {:?}",
                    snapshot.component
                ),
            });
        }
    }
    for key in &commit.seal_keys {
        // An empty key would read back as no key at all.
        if key.key.is_empty() {
            return Err(StoreError::InvalidMessage {
                id: key.message_id.clone(),
                reason: "the key of its sealed fields is empty".into(),
            });
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_shown_in_camel_case_and_read_back_from_either_style() {
        let message = Message {
            id: "m-1".into(),
            stream: StreamName::parse("user.42").expect("name"),
            message_type: "UserRegistered".into(),
            data: serde_json::json!({}),
            metadata: Map::new(),
            position: 0,
            global_position: 7,
            time_ms: 1000,
            not_before_ms: Some(2000),
        };
        let shown = serde_json::to_value(&message).expect("encode");
        assert_eq!(shown["globalPosition"], 7);
        assert_eq!(shown["timeMs"], 1000);
        assert_eq!(shown["notBeforeMs"], 2000);
        assert!(shown.get("global_position").is_none());
        assert_eq!(
            serde_json::from_value::<Message>(shown).expect("camelCase"),
            message
        );
        // A record the embedded store wrote before the names were camelCase.
        let stored = serde_json::json!({
            "id": "m-1", "stream": "user.42", "type": "UserRegistered", "data": {},
            "metadata": {}, "position": 0, "global_position": 7, "time_ms": 1000,
            "not_before_ms": 2000,
        });
        assert_eq!(
            serde_json::from_value::<Message>(stored).expect("snake_case"),
            message
        );
    }
}
