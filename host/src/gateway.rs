//! The HTTP gateway (`ferry run --http ADDR`): the only part of Ferry that knows HTTP.
//!
//! It turns requests into the same operator [`Request`]s the CLI sends, run by
//! [`control::execute`], so validation and answers are the CLI's; its own work is the mapping of
//! errors to status codes, the bearer token on writes, `/metrics`, and the WebSocket that pushes
//! new messages of the streams a client follows (the article's socket notifications: a browser
//! follows `socket-notification:command.<userId>` and gets its `NotifyUser` commands).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::control::{self, Context, Refused, Request};
use crate::service;
use crate::store::{Category, ConsumerId, NameError, StoreError, StreamName};

/// Largest request body (a command is small; this bounds a bad client).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Gateway settings.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// When set, write endpoints need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// An HTML page served at `/` (the registration example).
    pub page: Option<String>,
}

struct Gateway {
    context: Arc<Context>,
    config: GatewayConfig,
}

type Shared = State<Arc<Gateway>>;

/// The router; `axum::serve` it, or call it in-process.
pub fn router(context: Arc<Context>, config: GatewayConfig) -> Router {
    let gateway = Arc::new(Gateway { context, config });
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/streams/{stream}", post(send).get(read_stream))
        .route("/categories/{category}", get(read_category))
        .route("/consumers", get(consumers))
        .route("/views/{table}", get(view_table))
        .route("/views/{table}/{key}", get(view_row))
        .route("/parked", get(parked))
        .route("/parked/{id}/replay", post(replay))
        .route("/webhooks/email-opened", post(email_opened))
        .route("/ws", get(websocket))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

/// Serves the router on a bound listener until the task is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    context: Arc<Context>,
    config: GatewayConfig,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    tracing::info!(address = %listener.local_addr()?, "HTTP gateway listening");
    let app = router(context, config);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP gateway stopped: {e}");
        }
    }))
}

/// An error answer: `{"error": "..."}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        let status = if let Some(store) = error.downcast_ref::<StoreError>() {
            match store {
                StoreError::Conflict { .. } | StoreError::Duplicate { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::Name(_) | StoreError::InvalidMessage { .. } => StatusCode::BAD_REQUEST,
                StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            }
        } else if error.downcast_ref::<NameError>().is_some()
            || error.downcast_ref::<Refused>().is_some()
        {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("gateway request failed: {error:#}");
        }
        Self(status, format!("{error:#}"))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        // Well-formed JSON of the wrong shape (an unknown field, a missing one) is bad input
        // like any other: 400, not axum's 422.
        let status = match rejection.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            status => status,
        };
        Self(status, rejection.body_text())
    }
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("{what} not found"))
}

type Answer = Result<Json<Value>, ApiError>;

impl Gateway {
    async fn run(&self, request: Request) -> Result<Value, ApiError> {
        Ok(control::execute(&self.context, request).await?)
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.config.token else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(token.as_str()) {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs Authorization: Bearer <token>".into(),
            ))
        }
    }
}

async fn page(State(gateway): Shared) -> Response {
    match &gateway.config.page {
        Some(page) => Html(page.clone()).into_response(),
        None => not_found("a page".into()).into_response(),
    }
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// A command (or any message) to append.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SendBody {
    #[serde(rename = "type")]
    message_type: String,
    data: Map<String, Value>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    expected_version: Option<u64>,
}

async fn send(
    State(gateway): Shared,
    headers: HeaderMap,
    Path(stream): Path<String>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    gateway.authorize(&headers)?;
    let Json(body) = body?;
    let answer = gateway
        .run(Request::Send {
            stream,
            message_type: body.message_type,
            data: Value::Object(body.data).to_string(),
            metadata: body.metadata.map(|m| Value::Object(m).to_string()),
            id: body.id,
            expected_version: body.expected_version,
        })
        .await?;
    let (message, duplicate) = match answer.get("written") {
        Some(written) => (written.clone(), false),
        None => (answer["duplicate"].clone(), true),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": message["id"],
            "stream": message["stream"],
            "position": message["position"],
            "globalPosition": message["global_position"],
            "duplicate": duplicate,
        })),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

async fn read_stream(
    State(gateway): Shared,
    Path(stream): Path<String>,
    Query(page): Query<Page>,
) -> Answer {
    let name = StreamName::parse(&stream).map_err(anyhow::Error::new)?;
    let answer = gateway
        .run(Request::Read {
            target: stream,
            from: page.from,
            limit: page.limit.min(1000),
        })
        .await?;
    if answer["messages"].as_array().is_none_or(Vec::is_empty)
        && gateway
            .context
            .store
            .stream_version(&name)
            .await
            .map_err(anyhow::Error::new)?
            == 0
    {
        return Err(not_found(format!("stream {name}")));
    }
    Ok(Json(answer))
}

async fn read_category(
    State(gateway): Shared,
    Path(category): Path<String>,
    Query(page): Query<Page>,
) -> Answer {
    let parsed = Category::parse(&category).map_err(anyhow::Error::new)?;
    let result = gateway
        .context
        .store
        .read_category(&parsed, page.from, None, page.limit.min(1000))
        .await
        .map_err(anyhow::Error::new)?;
    Ok(Json(json!({
        "messages": result.messages,
        // Read on from here for the next page.
        "next": result.scanned_to,
    })))
}

async fn consumers(State(gateway): Shared) -> Answer {
    Ok(Json(
        gateway.run(Request::Consumers { category: None }).await?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewPage {
    after: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

async fn view_table(
    State(gateway): Shared,
    Path(table): Path<String>,
    Query(page): Query<ViewPage>,
) -> Answer {
    let answer = gateway
        .run(Request::View {
            table: table.clone(),
            key: None,
            after: page.after,
            limit: page.limit.min(1000),
        })
        .await?;
    let declared = control::owner_of_view(&gateway.context, &table).is_ok();
    if !declared && answer["rows"].as_array().is_none_or(Vec::is_empty) {
        return Err(not_found(format!("view {table}")));
    }
    Ok(Json(answer))
}

async fn view_row(State(gateway): Shared, Path((table, key)): Path<(String, String)>) -> Answer {
    let answer = gateway
        .run(Request::View {
            table,
            key: Some(key),
            after: None,
            limit: 1,
        })
        .await?;
    Ok(Json(answer["rows"][0].clone()))
}

async fn parked(State(gateway): Shared) -> Answer {
    Ok(Json(gateway.run(Request::Parked).await?))
}

async fn replay(State(gateway): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    gateway.authorize(&headers)?;
    Ok(Json(
        gateway
            .run(Request::Replay {
                id: Some(id),
                consumer: None,
                category: None,
            })
            .await?,
    ))
}

/// The email provider's webhook: an opened email becomes `RecordEmailOpened`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EmailOpened {
    email_id: String,
}

async fn email_opened(
    State(gateway): Shared,
    headers: HeaderMap,
    body: Result<Json<EmailOpened>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    gateway.authorize(&headers)?;
    let Json(body) = body?;
    let stream = format!("email:command.{}", body.email_id);
    StreamName::parse(&stream).map_err(anyhow::Error::new)?;
    let answer = gateway
        .run(Request::Send {
            stream,
            message_type: "RecordEmailOpened".into(),
            data: "{}".into(),
            metadata: None,
            id: None,
            expected_version: None,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// Prometheus text: per service, messages handled, parked, handling time and events projected in
/// this process;
/// per consumer, position and lag, and parked messages waiting.
async fn metrics(State(gateway): Shared) -> Result<Response, ApiError> {
    let mut text = String::new();
    text.push_str("# TYPE ferry_messages_handled_total counter\n");
    let all = service::metrics();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for name in &names {
        text.push_str(&format!(
            "ferry_messages_handled_total{{service=\"{name}\"}} {}\n",
            all[*name].handled
        ));
    }
    text.push_str("# TYPE ferry_messages_failed_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_messages_failed_total{{service=\"{name}\"}} {}\n",
            all[*name].parked
        ));
    }
    text.push_str("# TYPE ferry_handling_seconds_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_handling_seconds_total{{service=\"{name}\"}} {:.6}\n",
            all[*name].handling_seconds
        ));
    }
    text.push_str("# TYPE ferry_projected_events_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_projected_events_total{{service=\"{name}\"}} {}\n",
            all[*name].projected_events
        ));
    }
    let store = &gateway.context.store;
    let consumers = store.consumers(None).await.map_err(anyhow::Error::new)?;
    text.push_str("# TYPE ferry_consumer_lag gauge\n");
    for info in &consumers {
        text.push_str(&format!(
            "ferry_consumer_lag{{consumer=\"{}\",category=\"{}\"}} {}\n",
            info.consumer.name, info.consumer.category, info.lag
        ));
    }
    text.push_str("# TYPE ferry_consumer_position gauge\n");
    for info in &consumers {
        text.push_str(&format!(
            "ferry_consumer_position{{consumer=\"{}\",category=\"{}\"}} {}\n",
            info.consumer.name, info.consumer.category, info.position
        ));
    }
    let parked = store.parked(None).await.map_err(anyhow::Error::new)?;
    text.push_str("# TYPE ferry_parked_messages gauge\n");
    let mut per_consumer: std::collections::BTreeMap<String, u64> = Default::default();
    for message in &parked {
        *per_consumer
            .entry(message.consumer.to_string())
            .or_default() += 1;
    }
    for (consumer, count) in per_consumer {
        text.push_str(&format!(
            "ferry_parked_messages{{consumer=\"{consumer}\"}} {count}\n"
        ));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn websocket(State(gateway): Shared, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| follow(gateway, socket))
}

/// What a WebSocket client sends: follow a stream from a position (0 for its start; after a
/// reconnect, one past the last position it got, so it misses nothing).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Follow {
    follow: String,
    #[serde(default)]
    from: u64,
}

/// Pushes each new message of the followed streams as JSON, in stream order.
async fn follow(gateway: Arc<Gateway>, socket: WebSocket) {
    use futures_util::{SinkExt as _, StreamExt as _};
    let (mut sender, mut receiver) = socket.split();
    let (push, mut pushed) = tokio::sync::mpsc::channel::<String>(256);
    let mut followers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = receiver.next() => {
                let Some(Ok(message)) = incoming else { break };
                let WsMessage::Text(text) = message else { continue };
                match serde_json::from_str::<Follow>(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|f| Ok((StreamName::parse(&f.follow).map_err(|e| e.to_string())?, f.from)))
                {
                    Ok((stream, from)) => {
                        followers.spawn(follow_stream(gateway.clone(), stream, from, push.clone()));
                    }
                    Err(e) => {
                        let error = json!({ "error": format!("expected {{\"follow\": STREAM, \"from\": N}}: {e}") });
                        if sender.send(WsMessage::Text(error.to_string().into())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            Some(text) = pushed.recv() => {
                if sender.send(WsMessage::Text(text.into())).await.is_err() {
                    break;
                }
            }
        }
    }
    followers.abort_all();
}

async fn follow_stream(
    gateway: Arc<Gateway>,
    stream: StreamName,
    mut from: u64,
    push: tokio::sync::mpsc::Sender<String>,
) {
    let store = &gateway.context.store;
    let watcher = ConsumerId::new(stream.category(), "gateway");
    loop {
        let Ok(mut changes) = store.watch(&watcher).await else {
            return;
        };
        let messages = match store.read_stream(&stream, from, 100).await {
            Ok(messages) => messages,
            Err(e) => {
                tracing::warn!(%stream, "gateway follower: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        for message in &messages {
            from = message.position + 1;
            let text = json!({ "stream": stream, "message": message }).to_string();
            if push.send(text).await.is_err() {
                return;
            }
        }
        if messages.is_empty() && changes.changed().await.is_err() {
            return;
        }
    }
}
