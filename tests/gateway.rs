//! The HTTP gateway: the router in-process for every endpoint and error, and the WebSocket on a
//! real listener, over a real sled store with the real `counter` component running.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ferry::control::Context;
use ferry::gateway::{self, GatewayConfig, MAX_BODY_BYTES};
use ferry::service::{Capabilities, LoadedService, RunnerConfig, Running, ServiceTable};
use ferry::store::{MessageStore, SledStore};
use ferry::wasm::{Limits, Runtime};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// A store with `counter` loaded (and running when asked), and its gateway router.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn MessageStore>,
    context: Arc<Context>,
    running: Option<Running>,
}

impl Fixture {
    fn new(run: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn MessageStore> =
            Arc::new(SledStore::open(dir.path().join("store")).expect("store"));
        let runtime = Runtime::new(None).expect("runtime");
        let path = support::guest("counter");
        let component = runtime.load_file(&path, Limits::default()).expect("load");
        let loaded = [LoadedService { path, component }];
        let (running, services) = if run {
            let running = Running::start(
                store.clone(),
                &loaded,
                RunnerConfig::default(),
                &Capabilities::default(),
            )
            .expect("start");
            let table = running.table();
            (Some(running), table)
        } else {
            (None, ServiceTable::of(&loaded))
        };
        let context = Arc::new(Context {
            store: store.clone(),
            services,
        });
        Self {
            _dir: dir,
            store,
            context,
            running,
        }
    }

    async fn call(&self, config: GatewayConfig, request: Request<Body>) -> (StatusCode, Value) {
        let response = gateway::router(self.context.clone(), config)
            .oneshot(request)
            .await
            .expect("an answer");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.call(GatewayConfig::default(), get(uri)).await
    }

    async fn post(&self, uri: &str, body: &str) -> (StatusCode, Value) {
        self.call(GatewayConfig::default(), post(uri, body)).await
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

fn post(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

const INCREMENT: &str =
    r#"{"type": "Increment", "data": {"by": 2}, "metadata": {"correlationId": "c-1"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_a_command_with_202_and_its_position() {
    let fixture = Fixture::new(false);
    let (status, body) = fixture.post("/streams/counter:command.a", INCREMENT).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["stream"], "counter:command.a");
    assert_eq!(body["position"], 0);
    assert_eq!(body["duplicate"], false);
    let id = body["id"].as_str().expect("id").to_owned();

    // The same id again: stored once.
    let again = json!({"type": "Increment", "data": {"by": 2}, "id": id}).to_string();
    let (status, body) = fixture.post("/streams/counter:command.a", &again).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["duplicate"], true);
    // An expected version that holds.
    let expected = r#"{"type": "Increment", "data": {"by": 1}, "expectedVersion": 1}"#;
    let (status, _) = fixture.post("/streams/counter:command.a", expected).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (status, body) = fixture.get("/streams/counter:command.a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(body["messages"][0]["metadata"]["correlationId"], "c-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_input_with_a_json_error_and_writes_nothing() {
    let fixture = Fixture::new(false);
    let cases = [
        (
            "/streams/counter:command.a",
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/streams/counter:command.a",
            r#"{"type": "Increment", "data": {}, "colour": "red"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/streams/counter:command.a",
            r#"{"type": "Increment", "data": [1]}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "/streams/counter:command.a",
            r#"{"type": "", "data": {}}"#,
            StatusCode::BAD_REQUEST,
        ),
        ("/streams/no-dot", INCREMENT, StatusCode::BAD_REQUEST),
        ("/streams/Bad Name.1", INCREMENT, StatusCode::BAD_REQUEST),
        (
            "/streams/counter:command.a",
            r#"{"type": "Increment", "data": {}, "expectedVersion": 3}"#,
            StatusCode::CONFLICT,
        ),
        (
            "/webhooks/email-opened",
            r#"{"emailId": "a.b"}"#,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (uri, body, expected) in cases {
        let uri = uri.replace(' ', "%20");
        let (status, answer) = fixture.post(&uri, body).await;
        assert_eq!(status, expected, "{uri} {body}: {answer}");
        assert!(
            answer["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{uri} {body}: a JSON error, got {answer}"
        );
    }
    let huge = json!({"type": "Increment", "data": {"blob": "x".repeat(MAX_BODY_BYTES)}});
    let (status, _) = fixture
        .post("/streams/counter:command.a", &huge.to_string())
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        fixture.store.head().await.expect("head"),
        0,
        "nothing written"
    );

    for uri in [
        "/streams/counter.nobody",
        "/views/no-such-view",
        "/views/totals/nobody",
        "/nowhere",
    ] {
        let (status, _) = fixture.get(uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
    }
    let (status, _) = fixture.post("/parked/nothing/replay", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = fixture.get("/categories/Not%20Valid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// An open gateway is the developer's own: a request naming another `Host` (DNS rebinding: a
/// name of the attacker's pointed at 127.0.0.1) or coming from another site's page (`Origin`,
/// as a WebSocket opened by any page carries) is refused; loopback names and addresses, and a
/// name the operator allowed, are answered. A configured gateway relies on credentials instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_gateway_answers_only_its_own_machine() {
    let fixture = Fixture::new(false);
    let with = |name: header::HeaderName, value: &str| {
        let mut request = get("/health");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header"));
        request
    };
    let open = GatewayConfig::default();
    for (name, value, expected) in [
        (
            header::HOST,
            "evil.example",
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (
            header::HOST,
            "evil.example:8080",
            StatusCode::MISDIRECTED_REQUEST,
        ),
        (header::HOST, "127.0.0.1:8080", StatusCode::OK),
        (header::HOST, "localhost:8080", StatusCode::OK),
        (header::HOST, "[::1]:8080", StatusCode::OK),
        (header::ORIGIN, "http://evil.example", StatusCode::FORBIDDEN),
        (header::ORIGIN, "http://localhost:8080", StatusCode::OK),
    ] {
        let (status, body) = fixture.call(open.clone(), with(name.clone(), value)).await;
        assert_eq!(status, expected, "{name}: {value}: {body}");
    }
    let mut upgrade = with(header::ORIGIN, "https://evil.example");
    *upgrade.uri_mut() = "/ws".parse().expect("uri");
    let (status, _) = fixture.call(open.clone(), upgrade).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a foreign page's WebSocket");
    let allowed = GatewayConfig {
        allowed_hosts: vec!["dev.example".into()],
        ..GatewayConfig::default()
    };
    let (status, _) = fixture
        .call(allowed, with(header::HOST, "dev.example:8080"))
        .await;
    assert_eq!(status, StatusCode::OK, "a name the operator allowed");
    let configured = GatewayConfig {
        access: gateway::Access::operator("s3cret"),
        ..GatewayConfig::default()
    };
    let (status, _) = fixture
        .call(configured, with(header::HOST, "ferry.example"))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a configured gateway serves its names"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_the_operator_token_for_reads_and_writes_when_one_is_set() {
    let fixture = Fixture::new(false);
    let config = GatewayConfig {
        access: gateway::Access::operator("s3cret"),
        ..GatewayConfig::default()
    };
    for uri in ["/streams/counter:command.a", "/webhooks/email-opened"] {
        let (status, body) = fixture.call(config.clone(), post(uri, INCREMENT)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}: {body}");
        let mut wrong = post(uri, INCREMENT);
        wrong.headers_mut().insert(
            header::AUTHORIZATION,
            "Bearer nope".parse().expect("header"),
        );
        let (status, _) = fixture.call(config.clone(), wrong).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        fixture.store.head().await.expect("head"),
        0,
        "nothing written"
    );
    let mut right = post("/streams/counter:command.a", INCREMENT);
    right.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer s3cret".parse().expect("header"),
    );
    let (status, _) = fixture.call(config.clone(), right).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for uri in ["/consumers", "/streams/counter:command.a", "/metrics"] {
        let (status, _) = fixture.call(config.clone(), get(uri)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} needs the token");
    }
    let (status, _) = fixture.call(config, get("/health")).await;
    assert_eq!(status, StatusCode::OK, "health needs no token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_categories_consumers_views_webhook_health_and_metrics() {
    let mut fixture = Fixture::new(true);
    for entity in ["a", "b", "a"] {
        let (status, _) = fixture
            .post(&format!("/streams/counter:command.{entity}"), INCREMENT)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    // All three commands handled: both rows, and `a` counted twice.
    support::wait_until(Duration::from_secs(30), "the view has all three", || {
        let fixture = &fixture;
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let rows = fixture.get("/views/totals").await.1;
                let a = fixture.get("/views/totals/a").await.1;
                rows["rows"].as_array().is_some_and(|rows| rows.len() == 2)
                    && a["row"]["value"]["total"] == 4
            })
        })
    });
    let (status, row) = fixture.get("/views/totals/a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row["row"]["value"]["total"], 4);
    let (_, page) = fixture.get("/views/totals?after=a&limit=5").await;
    assert_eq!(page["rows"][0]["key"], "b");

    let (status, first) = fixture.get("/categories/counter?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first["messages"].as_array().map(Vec::len), Some(2));
    let next = first["next"].as_u64().expect("next");
    let (_, rest) = fixture
        .get(&format!("/categories/counter?from={next}"))
        .await;
    assert_eq!(rest["messages"].as_array().map(Vec::len), Some(1));

    let (_, consumers) = fixture.get("/consumers").await;
    let names: Vec<_> = consumers["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .map(|c| c["consumer"]["category"].clone())
        .collect();
    assert!(names.contains(&json!("counter:command")), "{consumers}");
    assert!(consumers["consumers"][0].get("lag").is_some());
    let (status, parked) = fixture.get("/parked").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(parked["parked"], json!([]));

    let (status, opened) = fixture
        .post("/webhooks/email-opened", r#"{"emailId": "e-1"}"#)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{opened}");
    let (_, stored) = fixture.get("/streams/email:command.e-1").await;
    assert_eq!(stored["messages"][0]["type"], "RecordEmailOpened");

    let (status, health) = fixture.get("/health").await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));
    let (status, metrics) = fixture.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().expect("text");
    assert!(
        text.contains("ferry_messages_handled_total{service=\"counter\"}"),
        "{text}"
    );
    assert!(
        text.contains(
            "ferry_consumer_lag{consumer=\"microservice:counter\",category=\"counter:command\"} 0"
        ),
        "{text}"
    );
    if let Some(running) = fixture.running.take() {
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_followed_streams_over_a_websocket_and_resumes_without_gaps() {
    let mut fixture = Fixture::new(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server =
        gateway::serve(listener, fixture.context.clone(), GatewayConfig::default()).expect("serve");
    let url = format!("ws://{address}/ws");
    let send_command = |by: i64| {
        let client = tokio::net::TcpStream::connect(address);
        async move {
            let body = json!({"type": "Increment", "data": {"by": by}}).to_string();
            let mut stream = client.await.expect("connect");
            let request = format!(
                "POST /streams/counter:command.w HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
                .await
                .expect("write");
            let mut answer = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
                .await
                .expect("read");
            assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        }
    };

    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"follow": "counter.w", "from": 0}"#,
        ))
        .await
        .expect("follow");
    send_command(5).await;
    let event = read_event(&mut socket).await;
    assert_eq!(event["message"]["type"], "Incremented");
    assert_eq!(event["message"]["data"]["total"], 5);
    let last = event["message"]["position"].as_u64().expect("position");
    drop(socket);

    // While no one listens, another event; a reconnect from one past the last position gets it.
    send_command(1).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.expect("ws");
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            json!({"follow": "counter.w", "from": last + 1}).to_string(),
        ))
        .await
        .expect("follow");
    let event = read_event(&mut socket).await;
    assert_eq!(event["message"]["data"]["total"], 6);
    assert_eq!(
        event["message"]["position"],
        last + 1,
        "nothing missed, nothing repeated"
    );

    // A bad follow request gets an error, not a closed socket.
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(
            "{\"follow\": \"bad\"}",
        ))
        .await
        .expect("send");
    let error = read_event(&mut socket).await;
    assert!(error["error"].as_str().is_some(), "{error}");
    server.abort();
    if let Some(running) = fixture.running.take() {
        running.shutdown().await;
    }
}

async fn read_event(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .expect("an event in time")
            .expect("open")
            .expect("a frame");
        if let Ok(text) = message.to_text()
            && !text.is_empty()
        {
            return serde_json::from_str(text).expect("JSON");
        }
    }
}

/// Where a JSON pointer (`#/components/...`) leads in `doc`.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// Every `$ref` in `value`.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(reference)) => found.push(reference.clone()),
                    _ => references(inner, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, found)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_and_each_listed_route_is_served() {
    let doc: Value = serde_json::from_str(gateway::OPENAPI).expect("openapi.json is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let mut refs = Vec::new();
    references(&doc, &mut refs);
    for reference in refs {
        assert!(resolve(&doc, &reference).is_some(), "{reference} resolves");
    }

    const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];
    let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .filter(|(method, _)| METHODS.contains(&method.as_str()))
                .map(move |(method, operation)| {
                    assert!(
                        operation["responses"].is_object(),
                        "{method} {path} names its answers"
                    );
                    (method.to_uppercase(), path.clone())
                })
        })
        .collect();
    let served: std::collections::BTreeSet<(String, String)> = gateway::routes()
        .into_iter()
        .map(|(method, path)| (method.to_string(), path.to_owned()))
        .collect();
    assert_eq!(documented, served, "documented routes = served routes");

    // Each documented method and path reaches its handler: not the router's own 404 (an empty
    // body) or 405.
    let fixture = Fixture::new(false);
    for (method, path) in &documented {
        let uri = path
            .replace("{stream}", "counter:command.a")
            .replace("{category}", "counter")
            .replace("{table}", "totals")
            .replace("{key}", "a")
            .replace("{id}", "no-such-message");
        let request = Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .expect("request");
        let response = gateway::router(fixture.context.clone(), GatewayConfig::default())
            .oneshot(request)
            .await
            .expect("an answer");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        assert!(
            !(status == StatusCode::NOT_FOUND && body.is_empty()),
            "{method} {uri} is routed"
        );
    }
}
