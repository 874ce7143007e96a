//! Operator requests (send, read, consumers, parked, replay, project, services) and where they
//! run.
//!
//! sled lets one process open a data folder. So a running `ferry run` listens on a Unix socket in
//! its data folder, and the CLI sends its request there; with no host running, the CLI opens the
//! store itself. Either way the same [`execute`] runs the request against a [`MessageStore`], so
//! the checks and answers are the same. Requests and answers are JSON, one per line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::seal;
use crate::service::{self, ServiceTable};
use crate::store::{
    Category, Commit, Message, MessageStore, NameError, NewMessage, StoreError, StreamName,
    validate_table_name,
};
use crate::wasm::ServiceComponent;

/// Most bytes one control connection may send (requests are small; this bounds a bad client).
const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// An operator request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Append one message (normally a command) to a stream.
    Send {
        stream: String,
        message_type: String,
        data: String,
        metadata: Option<String>,
        id: Option<String>,
        expected_version: Option<u64>,
        /// Top-level data fields to store sealed (encrypted under a key of the message's own,
        /// destroyed when the command is handled); the handler sees them in clear.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sealed: Vec<String>,
    },
    /// Read a stream (`user.42`) from a position, or a category (`user`) past a global position.
    Read {
        target: String,
        from: u64,
        limit: usize,
    },
    /// List consumers with their positions and lag.
    Consumers { category: Option<String> },
    /// Read a view row, or a page of a view table.
    View {
        table: String,
        key: Option<String>,
        after: Option<String>,
        limit: usize,
    },
    /// List parked messages.
    Parked,
    /// Hand parked messages back to their consumers.
    Replay {
        id: Option<String>,
        consumer: Option<String>,
        category: Option<String>,
    },
    /// Fold a stream through the `project` of the service owning its category.
    Project { stream: String },
    /// Empty the views of the service that writes `table` and replay its event subscriptions.
    Rebuild { table: String },
    /// The services, with the version (content hash) running and since when.
    Services,
}

/// What a request needs besides the store.
pub struct Context {
    pub store: Arc<dyn MessageStore>,
    /// The services (for `project`, `rebuild`, `services`); a reload changes it.
    pub services: ServiceTable,
}

/// A refused request: the message says why; nothing was written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse(text: impl Into<String>) -> anyhow::Error {
    Refused(text.into()).into()
}

fn parse_object(text: &str, what: &str) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(refuse(format!("{what} must be a JSON object"))),
        Err(e) => Err(refuse(format!("{what} is not valid JSON: {e}"))),
    }
}

/// Runs a request against a store. Returns its answer as JSON.
pub async fn execute(context: &Context, request: Request) -> anyhow::Result<Value> {
    let store = &context.store;
    match request {
        Request::Send {
            stream,
            message_type,
            data,
            metadata,
            id,
            expected_version,
            sealed,
        } => {
            let stream = StreamName::parse(&stream)?;
            if stream.is_outbox() {
                // An entry there is an email whose decision was committed: only a commit makes one.
                return Err(refuse(format!(
                    "{stream} is an outbox, which only the host writes"
                )));
            }
            if message_type.trim().is_empty() {
                return Err(refuse("the message type is empty"));
            }
            let mut data = parse_object(&data, "data")?;
            // Only the host makes a sealed field: one sent in would be taken for sealed by every
            // read and by the consumer, which has no key for it.
            if let Some(field) = seal::sealed_looking_fields(&data).first() {
                return Err(refuse(format!(
                    "the field {field:?} is an object with \"sealed\": true, which only the host writes; name it in `sealed` to seal it"
                )));
            }
            if !sealed.is_empty() && !stream.is_command() {
                // Only a command is settled by one handler, whose commit destroys the key; an
                // event is read by any number of consumers for ever.
                return Err(refuse(format!(
                    "only commands may carry sealed fields, and {stream} is not a command stream"
                )));
            }
            let metadata = match metadata {
                Some(text) => parse_object(&text, "metadata")?,
                None => Map::new(),
            };
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let seal_keys = if sealed.is_empty() {
                Vec::new()
            } else {
                vec![
                    seal::seal_fields(&id, &mut data, &sealed)
                        .map_err(|e| refuse(e.to_string()))?,
                ]
            };
            let new = NewMessage {
                id: id.clone(),
                message_type,
                data: Value::Object(data),
                metadata,
                not_before_ms: None,
            };
            let committed = store
                .commit(Commit {
                    seal_keys,
                    ..Commit::append(stream, expected_version, vec![new])
                })
                .await?;
            match committed.written.into_iter().next() {
                Some(message) => Ok(json!({ "written": shown(message) })),
                None => Ok(json!({ "duplicate": store.message(&id).await?.map(shown) })),
            }
        }
        Request::Read {
            target,
            from,
            limit,
        } => {
            let messages = if target.contains('.') {
                store
                    .read_stream(&StreamName::parse(&target)?, from, limit)
                    .await?
            } else {
                store
                    .read_category(
                        &Category::parse(&target)?,
                        from,
                        &crate::store::CategoryFilter::default(),
                        limit,
                    )
                    .await?
                    .messages
            };
            let messages: Vec<Message> = messages.into_iter().map(shown).collect();
            Ok(json!({ "messages": messages }))
        }
        Request::Consumers { category } => {
            let category = category.as_deref().map(Category::parse).transpose()?;
            Ok(json!({ "consumers": store.consumers(category.as_ref()).await? }))
        }
        Request::View {
            table,
            key,
            after,
            limit,
        } => {
            validate_table_name(&table)?;
            match key {
                Some(key) => match store.view_get(&table, &key).await? {
                    Some(row) => Ok(json!({ "rows": [{ "key": key, "row": row }] })),
                    None => {
                        Err(StoreError::NotFound(format!("row {key:?} of view {table}")).into())
                    }
                },
                None => {
                    let rows = store.view_rows(&table, after.as_deref(), limit).await?;
                    let rows: Vec<Value> = rows
                        .into_iter()
                        .map(|(key, row)| json!({ "key": key, "row": row }))
                        .collect();
                    Ok(json!({ "rows": rows }))
                }
            }
        }
        Request::Parked => {
            let mut parked = store.parked(None).await?;
            for record in &mut parked {
                seal::redact(&mut record.message);
            }
            Ok(json!({ "parked": parked }))
        }
        Request::Replay {
            id,
            consumer,
            category,
        } => {
            let consumer = match (consumer, category) {
                (Some(name), Some(category)) => Some(crate::store::ConsumerId::new(
                    Category::parse(&category)?,
                    name,
                )),
                (None, None) => None,
                _ => return Err(refuse("a consumer is named by both its name and category")),
            };
            if id.is_none() && consumer.is_none() {
                return Err(refuse(
                    "name a parked message id, or a consumer to replay all of its parked messages",
                ));
            }
            let replayed = store.replay(id.as_deref(), consumer.as_ref()).await?;
            if replayed == 0 {
                return Err(StoreError::NotFound("a parked message that matches".into()).into());
            }
            Ok(json!({ "replayed": replayed }))
        }
        Request::Rebuild { table } => {
            let component = owner_of_view(context, &table)?;
            let manifest = component.manifest();
            let consumers: Vec<_> = service::subscriptions_of(&component)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if consumers.is_empty() {
                return Err(refuse(format!(
                    "service {} subscribes to no event category, so its views cannot be rebuilt from events",
                    manifest.name
                )));
            }
            let events = store.rebuild_views(&manifest.views, &consumers).await?;
            Ok(json!({
                "service": manifest.name,
                "views": manifest.views,
                "consumers": consumers,
                "events": events,
            }))
        }
        Request::Services => {
            let metrics = service::metrics();
            let services: Vec<Value> = context
                .services
                .list()
                .into_iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "version": s.component.hash(),
                        "path": s.path,
                        "sinceMs": s.since_ms,
                        "instance": s.instance.as_deref(),
                        // What this process handled of it since it started.
                        "handled": metrics.get(&s.name).map_or(0, |m| m.handled),
                    })
                })
                .collect();
            Ok(json!({ "services": services }))
        }
        Request::Project { stream } => {
            let stream = StreamName::parse(&stream)?;
            let owner = stream.service();
            let component = context.services.get(owner).ok_or_else(|| {
                refuse(format!(
                    "no loaded service named {owner} owns the category of {stream}"
                ))
            })?;
            // `ferry project user:command.42` shows what a handler of that command would see.
            let stream = if stream.is_command() {
                stream.entity_stream()
            } else {
                stream
            };
            let projected = service::project(component, store.clone(), stream.clone()).await?;
            let state = projected
                .state
                .map(|text| serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text)));
            Ok(json!({
                "stream": stream,
                "version": projected.version,
                "state": state,
                // Where the fold started: the snapshot's version, or null for the first event.
                "snapshotVersion": projected.snapshot,
            }))
        }
    }
}

/// A message as every answer shows it: sealed fields as `{"sealed": true}`, without their box.
/// The gateway's own reads call [`seal::redact`] likewise.
pub fn shown(mut message: Message) -> Message {
    seal::redact(&mut message);
    message
}

/// The loaded service that declares a view table.
pub fn owner_of_view(context: &Context, table: &str) -> anyhow::Result<Arc<ServiceComponent>> {
    validate_table_name(table)?;
    context
        .services
        .list()
        .into_iter()
        .map(|service| service.component)
        .find(|component| component.manifest().views.iter().any(|v| v == table))
        .ok_or_else(|| refuse(format!("no loaded service writes the view {table}")))
}

/// The control socket's path in a data folder.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("ferry.sock")
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Answer {
    Ok(Value),
    Refused(String),
    Error(String),
}

/// Serves requests on the data folder's socket until the task is dropped.
pub async fn serve(
    data: &Path,
    context: Arc<Context>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let path = socket_path(data);
    // A socket file left by a killed host: nobody listens on it any more (we hold the store lock).
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let connection = match listener.accept().await {
                Ok((connection, _)) => connection,
                Err(e) => {
                    // Out of file descriptors, say: wait instead of spinning.
                    tracing::warn!("control socket: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let context = context.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_connection(connection, &context).await {
                    tracing::debug!("control connection ended: {e:#}");
                }
            });
        }
    }))
}

async fn serve_connection(connection: UnixStream, context: &Context) -> anyhow::Result<()> {
    // Whoever connects is the operator: only the user the host runs as may (the socket is 0600
    // in a 0700 folder; this holds even if someone loosens those).
    let peer = connection.peer_cred().context("the peer's credentials")?;
    if peer.uid() != crate::files::own_uid() {
        tracing::warn!(
            uid = peer.uid(),
            "control socket: refused a connection from another user"
        );
        let (reader, mut writer) = connection.into_split();
        // Its request is read (and dropped) first: closing on an unread request would fail the
        // client's write (a broken pipe) before it reads why.
        let mut lines = BufReader::new(reader.take(MAX_REQUEST_BYTES as u64)).lines();
        let _ = lines.next_line().await;
        let refusal = Answer::Refused(format!(
            "the control socket answers only user {}, not {}",
            crate::files::own_uid(),
            peer.uid()
        ));
        let mut text = serde_json::to_string(&refusal)?;
        text.push('\n');
        writer.write_all(text.as_bytes()).await?;
        return Ok(());
    }
    let (reader, mut writer) = connection.into_split();
    let mut lines = BufReader::new(reader.take(MAX_REQUEST_BYTES as u64)).lines();
    while let Some(line) = lines.next_line().await? {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer_of(execute(context, request).await),
            Err(e) => Answer::Refused(format!("malformed request: {e}")),
        };
        let mut text = serde_json::to_string(&answer)?;
        text.push('\n');
        writer.write_all(text.as_bytes()).await?;
    }
    Ok(())
}

fn answer_of(result: anyhow::Result<Value>) -> Answer {
    match result {
        Ok(value) => Answer::Ok(value),
        Err(e) if is_refusal(&e) => Answer::Refused(format!("{e:#}")),
        Err(e) => Answer::Error(format!("{e:#}")),
    }
}

/// Whether an error is the request's fault (bad input, conflict) rather than the host's.
pub fn is_refusal(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Refused>().is_some()
        || error.downcast_ref::<NameError>().is_some()
        || matches!(
            error.downcast_ref::<StoreError>(),
            Some(
                StoreError::Name(_)
                    | StoreError::Conflict { .. }
                    | StoreError::InvalidMessage { .. }
                    | StoreError::IdInUse { .. }
                    | StoreError::TooLarge { .. }
                    | StoreError::Refused(_)
                    | StoreError::NotFound(_)
            )
        )
}

/// Sends a request to a running host, if one listens in this data folder.
pub async fn try_remote(data: &Path, request: &Request) -> anyhow::Result<Option<Value>> {
    let Ok(connection) = UnixStream::connect(socket_path(data)).await else {
        return Ok(None);
    };
    let (reader, mut writer) = connection.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    writer.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(reader).lines();
    let line = lines
        .next_line()
        .await?
        .context("the running host closed the connection without answering")?;
    match serde_json::from_str::<Answer>(&line)
        .context("unreadable answer from the running host")?
    {
        Answer::Ok(value) => Ok(Some(value)),
        Answer::Refused(reason) => Err(refuse(reason)),
        Answer::Error(reason) => Err(anyhow::anyhow!(reason)),
    }
}
