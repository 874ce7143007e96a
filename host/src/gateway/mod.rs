//! The HTTP gateway (`ferry run --http ADDR`): the only part of Ferry that knows HTTP.
//!
//! It turns requests into the same operator [`Request`]s the CLI sends, run by
//! [`control::execute`], so validation and answers are the CLI's. Its own work: who may do what
//! (`access`, `policy`), limits against abuse (`limits`), the guards every request passes
//! (`guards`: an open gateway's own machine, failed authentications, anonymous bodies), the
//! mapping of errors to status codes,
//! `/metrics` (`metrics`) and the WebSocket followers (`follow`).
//!
//! Every handler asks [`Gateway::allow`] for its right before it reads or writes anything, so a
//! refused request has no effect and its answer says nothing about what exists.

mod access;
mod follow;
mod guards;
mod limits;
mod metrics;
mod policy;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequestParts, Path, Query, Request as HttpRequest, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};

pub use self::access::{
    Access, Caller, DEFAULT_LEEWAY, Denied, TokenVerifier, issue_token, parse_ttl, read_secret,
};
pub use self::limits::LimitSettings;
use self::limits::{Limiter, SlowDown};
pub use self::policy::{BeforeBody, Policy, PolicyError, Right};
use crate::control::{self, Context, Refused, Request};
use crate::seal;
use crate::store::{Category, NameError, StoreError, StreamName};

/// Largest request body (a command is small; this bounds a bad client).
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// Gateway settings. [`Default`] is an open gateway (no access configuration): for a loopback
/// address only.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// Who may do what.
    pub access: Access,
    /// An HTML page served at `/` (the registration example).
    pub page: Option<String>,
    pub limits: LimitSettings,
    /// Host names an open gateway answers besides loopback ones (`--http-allowed-host`).
    pub allowed_hosts: Vec<String>,
}

struct Gateway {
    context: Arc<Context>,
    config: GatewayConfig,
    limiter: Arc<Limiter>,
}

type Shared = State<Arc<Gateway>>;

/// The router; `axum::serve` it (with connect info, for per-client limits), or call it
/// in-process. It is built from [`route_table`] alone.
pub fn router(context: Arc<Context>, config: GatewayConfig) -> Router {
    let limiter = Arc::new(Limiter::new(config.limits));
    let gateway = Arc::new(Gateway {
        context,
        config,
        limiter,
    });
    let (mut timed, mut lasting) = (Router::new(), Router::new());
    for route in route_table() {
        match route.timed {
            true => timed = timed.route(route.path, route.handler),
            false => lasting = lasting.route(route.path, route.handler),
        }
    }
    Router::new()
        .merge(timed.layer(middleware::from_fn_with_state(gateway.clone(), time_limit)))
        .merge(lasting)
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            guards::guessing,
        ))
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            guards::anonymous_body,
        ))
        .layer(middleware::from_fn_with_state(
            gateway.clone(),
            guards::same_machine,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

/// The HTTP API described in OpenAPI 3.1, served at `GET /openapi.json`; a test checks that it
/// documents exactly [`routes`].
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Every route the gateway serves, by method and path (`{name}` marks a path parameter, as in
/// OpenAPI).
pub fn routes() -> Vec<(Method, &'static str)> {
    route_table()
        .into_iter()
        .map(|route| (route.method, route.path))
        .collect()
}

/// One route: a method on a path, and its handler for that method alone.
struct Route {
    method: Method,
    path: &'static str,
    handler: MethodRouter<Arc<Gateway>>,
    /// Under the request time limit: all but the WebSocket, which lives as long as its right.
    timed: bool,
}

/// The one list the router is built from, so that what is served and what is documented can be
/// compared.
fn route_table() -> Vec<Route> {
    let route = |method: Method, path, handler| Route {
        method,
        path,
        handler,
        timed: true,
    };
    vec![
        route(Method::GET, "/", get(page)),
        route(Method::GET, "/health", get(health)),
        route(Method::GET, "/openapi.json", get(openapi)),
        route(Method::GET, "/metrics", get(metrics)),
        route(Method::POST, "/streams/{stream}", post(send)),
        route(Method::GET, "/streams/{stream}", get(read_stream)),
        route(Method::GET, "/categories/{category}", get(read_category)),
        route(Method::GET, "/consumers", get(consumers)),
        route(Method::GET, "/views/{table}", get(view_table)),
        route(Method::GET, "/views/{table}/{key}", get(view_row)),
        route(
            Method::GET,
            "/views/{table}/{key}/exists",
            get(view_row_exists),
        ),
        route(Method::GET, "/parked", get(parked)),
        route(Method::POST, "/parked/{id}/replay", post(replay)),
        route(Method::POST, "/webhooks/email-opened", post(email_opened)),
        // A WebSocket lives as long as it is allowed to; its upgrade is quick.
        Route {
            timed: false,
            ..route(Method::GET, "/ws", get(follow::upgrade))
        },
    ]
}

/// `GET /openapi.json`: what the API is, for anyone (it names no data).
async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
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
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP gateway stopped: {e}");
        }
    }))
}

/// Refuses to expose an open gateway: an address that is not loopback needs an access
/// configuration, unless the operator said `insecure`.
pub async fn check_exposure(address: &str, access: &Access, insecure: bool) -> anyhow::Result<()> {
    if access.is_configured() || insecure {
        return Ok(());
    }
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot resolve {address}: {e}"))?
        .collect();
    if addresses.is_empty() || addresses.iter().any(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "{address} is reachable from other machines and the gateway has no access \
             configuration: give --http-token and/or --http-policy, or say --http-insecure"
        );
    }
    Ok(())
}

/// An error answer: `{"error": "..."}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        let status = match denied {
            Denied::Unauthenticated | Denied::Expired => StatusCode::UNAUTHORIZED,
            Denied::Forbidden => StatusCode::FORBIDDEN,
        };
        Self(status, denied.to_string())
    }
}

impl From<SlowDown> for ApiError {
    fn from(SlowDown(wait): SlowDown) -> Self {
        Self(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many writes from this client; try again in {} ms",
                wait.as_millis().max(1)
            ),
        )
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        let status = if let Some(store) = error.downcast_ref::<StoreError>() {
            match store {
                StoreError::Conflict { .. }
                | StoreError::Duplicate { .. }
                | StoreError::IdInUse { .. } => StatusCode::CONFLICT,
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::Name(_)
                | StoreError::InvalidMessage { .. }
                | StoreError::Refused(_) => StatusCode::BAD_REQUEST,
                StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                StoreError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
                // The store cannot answer now (a JetStream cluster electing a leader, a server
                // restarting): the client may send again, with the same id.
                StoreError::Backend(_) | StoreError::Closed => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            }
        } else if error.downcast_ref::<NameError>().is_some()
            || error.downcast_ref::<Refused>().is_some()
        {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        if status.is_server_error() {
            tracing::error!("gateway request failed: {error:#}");
        }
        if status == StatusCode::INSUFFICIENT_STORAGE {
            // The reason names the data folder and its free space: the operator's to read, in
            // the host's log.
            return Self(
                status,
                "the disk is full: nothing was written; send it again once space is freed".into(),
            );
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

/// The client's address, for per-client limits (unspecified when served without connect info,
/// as in-process tests do).
struct ClientAddr(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(guards::client_address(&parts.extensions)))
    }
}

/// The bearer token of `Authorization`, if the header is there; another scheme is refused.
fn bearer(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| Some(token.trim().to_owned()))
        .ok_or_else(|| Denied::Unauthenticated.into())
}

/// Answers a request that takes longer than the limit with 503, so that a slow client (or a
/// slow store) holds no handler for long.
async fn time_limit(State(gateway): Shared, request: HttpRequest, next: Next) -> Response {
    let limit = gateway.config.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the request took longer than {} ms", limit.as_millis()),
        )
        .into_response(),
    }
}

impl Gateway {
    async fn run(&self, request: Request) -> Result<Value, ApiError> {
        Ok(control::execute(&self.context, request).await?)
    }

    fn access(&self) -> &Access {
        &self.config.access
    }

    /// The caller, if its credential (when it shows one) is valid.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        Ok(self.access().caller(bearer(headers)?.as_deref())?)
    }

    /// The caller, if it may do `right`.
    fn allow(&self, headers: &HeaderMap, right: Right<'_>) -> Result<Caller, ApiError> {
        let caller = self.caller(headers)?;
        self.access().check(&caller, right)?;
        Ok(caller)
    }

    /// Takes one write of the client's allowance; the operator's and an open gateway's writes
    /// are not limited.
    fn count_write(&self, caller: &Caller, client: IpAddr) -> Result<(), ApiError> {
        match caller {
            _ if !self.access().is_configured() => Ok(()),
            Caller::Operator => Ok(()),
            Caller::Anonymous => Ok(self.limiter.anonymous_write(client)?),
            _ => Ok(self.limiter.write(client)?),
        }
    }
}

async fn page(State(gateway): Shared) -> Response {
    match &gateway.config.page {
        Some(page) => Html(page.clone()).into_response(),
        None => not_found("a page".into()).into_response(),
    }
}

/// Public, so it names no path or figure: `degraded` while the store refuses writes (a full
/// disk) and still serves reads.
async fn health(State(gateway): Shared) -> Json<Value> {
    match gateway.context.store.degraded() {
        None => Json(json!({ "status": "ok" })),
        Some(_) => Json(json!({
            "status": "degraded",
            "reason": "the disk is full: writes are refused until space is freed; reads are served",
        })),
    }
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
    /// Top-level data fields to store sealed (see `control::Request::Send`).
    #[serde(default)]
    sealed: Vec<String>,
}

/// The metadata an end user may set: the rest (`originEntity`, `causationId`, ...) routes
/// messages between services, and is the operator's and the services' to set.
const USER_METADATA: &[&str] = &["correlationId"];

async fn send(
    State(gateway): Shared,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    Path(stream): Path<String>,
    body: Result<Json<SendBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // No right to send anything there: refused before the body is looked at.
    let caller = gateway.caller(&headers)?;
    gateway
        .access()
        .check_before_body(&caller, BeforeBody::Stream(&stream))?;
    let Json(body) = body?;
    gateway.access().check(
        &caller,
        Right::Send {
            stream: &stream,
            message_type: &body.message_type,
        },
    )?;
    if caller != Caller::Operator
        && gateway.access().is_configured()
        && let Some(metadata) = &body.metadata
        && let Some(key) = metadata
            .keys()
            .find(|k| !USER_METADATA.contains(&k.as_str()))
    {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("metadata {key:?} is set by services, not by end users"),
        ));
    }
    gateway.count_write(&caller, client)?;
    let answer = gateway
        .run(Request::Send {
            stream,
            message_type: body.message_type,
            data: Value::Object(body.data).to_string(),
            metadata: body.metadata.map(|m| Value::Object(m).to_string()),
            id: body.id,
            expected_version: body.expected_version,
            sealed: body.sealed,
        })
        .await?;
    Ok(accepted(&answer))
}

/// `202` with where a sent message is stored, and whether it was there already (an id sent
/// before is stored once).
fn accepted(answer: &Value) -> (StatusCode, Json<Value>) {
    let (message, duplicate) = match answer.get("written") {
        Some(written) => (written, false),
        None => (&answer["duplicate"], true),
    };
    (
        StatusCode::ACCEPTED,
        Json(json!({
            "id": message["id"],
            "stream": message["stream"],
            "position": message["position"],
            "globalPosition": message["globalPosition"],
            "duplicate": duplicate,
        })),
    )
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

fn query<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))
}

async fn read_stream(
    State(gateway): Shared,
    headers: HeaderMap,
    Path(stream): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    gateway.allow(&headers, Right::Read(&stream))?;
    let page = query(page)?;
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
    headers: HeaderMap,
    Path(category): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    gateway.allow(&headers, Right::Read(&category))?;
    let page = query(page)?;
    let parsed = Category::parse(&category).map_err(anyhow::Error::new)?;
    let mut result = gateway
        .context
        .store
        .read_category(
            &parsed,
            page.from,
            &crate::store::CategoryFilter::default(),
            page.limit.min(1000),
        )
        .await
        .map_err(anyhow::Error::new)?;
    result.messages.iter_mut().for_each(seal::redact);
    Ok(Json(json!({
        "messages": result.messages,
        // Read on from here for the next page.
        "next": result.scanned_to,
    })))
}

async fn consumers(State(gateway): Shared, headers: HeaderMap) -> Answer {
    gateway.allow(&headers, Right::Operate)?;
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
    headers: HeaderMap,
    Path(table): Path<String>,
    page: Result<Query<ViewPage>, axum::extract::rejection::QueryRejection>,
) -> Answer {
    gateway.allow(&headers, Right::View(&table))?;
    let page = query(page)?;
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

async fn view_row(
    State(gateway): Shared,
    headers: HeaderMap,
    Path((table, key)): Path<(String, String)>,
) -> Answer {
    gateway.allow(&headers, Right::View(&format!("{table}/{key}")))?;
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

/// Whether a view row exists, and nothing else (whether a username is taken, without its owner).
async fn view_row_exists(
    State(gateway): Shared,
    headers: HeaderMap,
    Path((table, key)): Path<(String, String)>,
) -> Answer {
    gateway.allow(&headers, Right::Exists(&format!("{table}/{key}")))?;
    crate::store::validate_table_name(&table).map_err(anyhow::Error::new)?;
    let row = gateway
        .context
        .store
        .view_get(&table, &key)
        .await
        .map_err(anyhow::Error::new)?;
    // A deleted row is kept as a null tombstone: it does not exist.
    let exists = row.is_some_and(|row| !row.value.is_null());
    Ok(Json(json!({ "exists": exists })))
}

async fn parked(State(gateway): Shared, headers: HeaderMap) -> Answer {
    gateway.allow(&headers, Right::Operate)?;
    Ok(Json(gateway.run(Request::Parked).await?))
}

async fn replay(State(gateway): Shared, headers: HeaderMap, Path(id): Path<String>) -> Answer {
    gateway.allow(&headers, Right::Operate)?;
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

/// The email provider's webhook: an opened email becomes `RecordEmailOpened`, sent with the
/// same right as any `RecordEmailOpened` to that email's command stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EmailOpened {
    email_id: String,
}

const OPENED: &str = "RecordEmailOpened";

async fn email_opened(
    State(gateway): Shared,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    body: Result<Json<EmailOpened>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = gateway.caller(&headers)?;
    gateway
        .access()
        .check_before_body(&caller, BeforeBody::Type(OPENED))?;
    let Json(body) = body?;
    let stream = format!("email:command.{}", body.email_id);
    gateway.access().check(
        &caller,
        Right::Send {
            stream: &stream,
            message_type: OPENED,
        },
    )?;
    StreamName::parse(&stream).map_err(anyhow::Error::new)?;
    gateway.count_write(&caller, client)?;
    let answer = gateway
        .run(Request::Send {
            stream,
            message_type: OPENED.into(),
            data: "{}".into(),
            metadata: None,
            id: None,
            expected_version: None,
            sealed: Vec::new(),
        })
        .await?;
    Ok(accepted(&answer))
}

async fn metrics(State(gateway): Shared, headers: HeaderMap) -> Result<Response, ApiError> {
    gateway.allow(&headers, Right::Operate)?;
    metrics::text(&gateway).await
}
