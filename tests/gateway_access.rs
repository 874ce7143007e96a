//! Who may do what over HTTP: every endpoint against every kind of credential, the WebSocket's
//! follows and a token expiring while connected, and arbitrary tokens and policy files. The
//! gateway runs over a real sled store holding the article's data (a registration with its
//! password, the users views), under `examples/web/policy.toml`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use ferry::control::Context;
use ferry::gateway::{self, Access, GatewayConfig, Policy, TokenVerifier};
use ferry::service::{LoadedService, ServiceTable};
use ferry::store::{Commit, MessageStore, NewMessage, SledStore, StreamName, ViewWrite};
use ferry::wasm::{Limits, Runtime};
use futures_util::{SinkExt as _, StreamExt as _};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tower::ServiceExt as _;

const OPERATOR: &str = "operator-token-for-tests";
const SECRET: &[u8] = b"a shared secret of at least 32 bytes, for tests";
/// What must never appear in a refusal.
const SECRETS: &[&str] = &[
    "hunter2",
    "ann@example.com",
    "pbkdf2",
    "passwordHash",
    "Lee",
];

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn MessageStore>,
    context: Arc<Context>,
}

fn message(id: &str, message_type: &str, data: Value) -> NewMessage {
    NewMessage {
        id: id.into(),
        message_type: message_type.into(),
        data,
        metadata: Default::default(),
        not_before_ms: None,
    }
}

async fn append(store: &dyn MessageStore, stream: &str, new: NewMessage) {
    let stream = StreamName::parse(stream).expect("stream name");
    store
        .commit(Commit::append(stream, None, vec![new]))
        .await
        .expect("seeded");
}

impl Fixture {
    /// The article's data for users `ann` and `bob`, as the services would have written it.
    async fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn MessageStore> =
            Arc::new(SledStore::open(dir.path().join("store")).expect("store"));
        let runtime = Runtime::new(None).expect("runtime");
        let loaded: Vec<LoadedService> = ["user", "user_aggregator"]
            .into_iter()
            .map(|name| {
                let path = support::guest(name);
                let component = runtime.load_file(&path, Limits::default()).expect("load");
                LoadedService { path, component }
            })
            .collect();
        for user in ["ann", "bob"] {
            let email = format!("{user}@example.com");
            append(
                store.as_ref(),
                &format!("user:command.{user}"),
                message(
                    &format!("register-{user}"),
                    "RegisterUser",
                    json!({"username": user, "email": email, "password": "hunter2",
                           "firstName": user, "lastName": "Lee"}),
                ),
            )
            .await;
            append(
                store.as_ref(),
                &format!("user.{user}"),
                message(
                    &format!("registered-{user}"),
                    "UserRegistered",
                    json!({"username": user, "email": email,
                           "passwordHash": "pbkdf2-sha256$1$salt$00", "firstName": user, "lastName": "Lee"}),
                ),
            )
            .await;
            append(
                store.as_ref(),
                &format!("socket-notification:command.{user}"),
                message(
                    &format!("notify-{user}"),
                    "NotifyUser",
                    json!({"text": format!("hello {user} Lee")}),
                ),
            )
            .await;
            let seq = store.head().await.expect("head");
            let row = json!({"userId": user, "username": user, "email": email, "lastName": "Lee"});
            store
                .commit(Commit {
                    views: vec![
                        ViewWrite {
                            table: "users".into(),
                            key: user.into(),
                            value: Some(row),
                            seq,
                        },
                        ViewWrite {
                            table: "users-by-username".into(),
                            key: user.into(),
                            value: Some(json!({"userId": user})),
                            seq,
                        },
                    ],
                    ..Commit::default()
                })
                .await
                .expect("views");
        }
        let context = Arc::new(Context {
            store: store.clone(),
            services: ServiceTable::of(&loaded),
        });
        Self {
            _dir: dir,
            store,
            context,
        }
    }

    /// A request under the example policy's configuration.
    async fn ask(
        &self,
        method: &str,
        uri: &str,
        body: Option<&Value>,
        credential: Credential,
    ) -> (StatusCode, String) {
        self.call(config(), request(method, uri, body, credential))
            .await
    }

    async fn call(&self, config: GatewayConfig, request: Request<Body>) -> (StatusCode, String) {
        let response = gateway::router(self.context.clone(), config)
            .oneshot(request)
            .await
            .expect("an answer");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn article_policy() -> Policy {
    let path = support::repo_root().join("examples/web/policy.toml");
    Policy::load(&path).expect("the example policy parses")
}

fn config() -> GatewayConfig {
    let verifier = TokenVerifier::hs256(SECRET)
        .expect("verifier")
        .with_leeway(Duration::ZERO);
    GatewayConfig {
        access: Access::operator(OPERATOR)
            .with_policy(article_policy())
            .with_verifier(verifier),
        ..GatewayConfig::default()
    }
}

fn token(subject: &str, ttl: Duration) -> String {
    gateway::issue_token(SECRET, subject, ttl).expect("token")
}

/// A token that expired two minutes ago, signed with the right secret.
fn expired_token(subject: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": subject, "exp": now - 120}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET).expect("key"),
    )
    .expect("encode")
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Credential {
    None,
    Wrong,
    Expired,
    /// Bob's token, on Ann's things.
    AnotherUser,
    Ann,
    Operator,
}

fn request(method: &str, uri: &str, body: Option<&Value>, credential: Credential) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    let bearer = match credential {
        Credential::None => None,
        Credential::Wrong => Some("not-a-token".to_owned()),
        Credential::Expired => Some(expired_token("ann")),
        Credential::AnotherUser => Some(token("bob", Duration::from_secs(600))),
        Credential::Ann => Some(token("ann", Duration::from_secs(600))),
        Credential::Operator => Some(OPERATOR.to_owned()),
    };
    if let Some(bearer) = bearer {
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
    }
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string())),
        None => builder.body(Body::empty()),
    }
    .expect("request")
}

/// One endpoint: who has the right, and what it answers them.
struct Row {
    method: &'static str,
    uri: &'static str,
    body: Option<Value>,
    right: Credential,
    answer: StatusCode,
}

fn row(method: &'static str, uri: &'static str, right: Credential, answer: StatusCode) -> Row {
    Row {
        method,
        uri,
        body: None,
        right,
        answer,
    }
}

fn endpoints() -> Vec<Row> {
    use Credential::{Ann, Operator};
    let ok = StatusCode::OK;
    vec![
        Row {
            body: Some(json!({"type": "ChangeName", "data": {"firstName": "A", "lastName": "L"}})),
            ..row(
                "POST",
                "/streams/user:command.ann",
                Ann,
                StatusCode::ACCEPTED,
            )
        },
        row("GET", "/streams/user:command.ann", Operator, ok),
        row("GET", "/streams/user.ann", Operator, ok),
        row(
            "GET",
            "/streams/socket-notification:command.ann",
            Operator,
            ok,
        ),
        row("GET", "/categories/user", Operator, ok),
        row("GET", "/categories/user:command", Operator, ok),
        row("GET", "/views/users", Operator, ok),
        row("GET", "/views/users/ann", Ann, ok),
        row("GET", "/views/users-by-username/ann", Operator, ok),
        row("GET", "/consumers", Operator, ok),
        row("GET", "/parked", Operator, ok),
        row(
            "POST",
            "/parked/register-ann/replay",
            Operator,
            StatusCode::NOT_FOUND,
        ),
        row("GET", "/metrics", Operator, ok),
        Row {
            body: Some(json!({"emailId": "e-1"})),
            ..row(
                "POST",
                "/webhooks/email-opened",
                Operator,
                StatusCode::ACCEPTED,
            )
        },
    ]
}

fn assert_leaks_nothing(body: &str, what: &str) {
    for secret in SECRETS {
        assert!(!body.contains(secret), "{what} leaked {secret:?}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_only_the_credential_that_allows_it() {
    let fixture = Fixture::new().await;
    for endpoint in endpoints() {
        for credential in [
            Credential::None,
            Credential::Wrong,
            Credential::Expired,
            Credential::AnotherUser,
            Credential::Ann,
            Credential::Operator,
        ] {
            let what = format!("{} {} with {credential:?}", endpoint.method, endpoint.uri);
            let head = fixture.store.head().await.expect("head");
            let (status, body) = fixture
                .ask(
                    endpoint.method,
                    endpoint.uri,
                    endpoint.body.as_ref(),
                    credential,
                )
                .await;
            let expected = match credential {
                _ if credential == endpoint.right || credential == Credential::Operator => {
                    endpoint.answer
                }
                Credential::None | Credential::Wrong | Credential::Expired => {
                    StatusCode::UNAUTHORIZED
                }
                Credential::AnotherUser | Credential::Ann | Credential::Operator => {
                    StatusCode::FORBIDDEN
                }
            };
            assert_eq!(status, expected, "{what}: {body}");
            if !status.is_success() {
                let error: Value = serde_json::from_str(&body).expect("a JSON error");
                assert!(error["error"].is_string(), "{what}: {body}");
                assert_leaks_nothing(&body, &what);
                assert_eq!(
                    fixture.store.head().await.expect("head"),
                    head,
                    "{what} wrote"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_may_register_and_ask_whether_a_username_is_taken_only() {
    let fixture = Fixture::new().await;
    let register = json!({"type": "RegisterUser", "data": {"username": "cy", "email": "c@x",
        "password": "pw", "firstName": "C", "lastName": "Y"}, "sealed": ["password"]});
    let (status, body) = fixture
        .ask(
            "POST",
            "/streams/user:command.cy",
            Some(&register),
            Credential::None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Another type, or a command stream of another service: refused.
    let change = json!({"type": "ChangeName", "data": {"firstName": "x", "lastName": "y"}});
    for (uri, body) in [
        ("/streams/user:command.ann", &change),
        ("/streams/email:command.x", &register),
    ] {
        let (status, _) = fixture.ask("POST", uri, Some(body), Credential::None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}");
    }
    // End users set no routing metadata.
    let spoofed = json!({"type": "ChangeName", "data": {"firstName": "x", "lastName": "y"},
        "metadata": {"originEntity": "subscription.1"}});
    let (status, _) = fixture
        .ask(
            "POST",
            "/streams/user:command.ann",
            Some(&spoofed),
            Credential::Ann,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    for (key, taken) in [("ann", true), ("nobody", false)] {
        for credential in [Credential::None, Credential::AnotherUser, Credential::Ann] {
            let uri = format!("/views/users-by-username/{key}/exists");
            let (status, body) = fixture.ask("GET", &uri, None, credential).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(
                serde_json::from_str::<Value>(&body).expect("JSON"),
                json!({"exists": taken}),
                "nothing but whether it exists"
            );
        }
    }
    for credential in [Credential::Wrong, Credential::Expired] {
        let (status, _) = fixture
            .ask(
                "GET",
                "/views/users-by-username/ann/exists",
                None,
                credential,
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "a bad credential is refused even where none is needed"
        );
    }
    // Health and the page need nothing.
    for credential in [Credential::None, Credential::Wrong] {
        let (status, _) = fixture.ask("GET", "/health", None, credential).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_show_sealed_fields_as_sealed_only() {
    let fixture = Fixture::new().await;
    let register = json!({"type": "RegisterUser", "data": {"username": "cy", "email": "c@x",
        "password": "hunter2-sealed", "firstName": "C", "lastName": "Y"}, "sealed": ["password"]});
    let (status, body) = fixture
        .ask(
            "POST",
            "/streams/user:command.cy",
            Some(&register),
            Credential::Operator,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    for uri in ["/streams/user:command.cy", "/categories/user:command"] {
        let (status, body) = fixture.ask("GET", uri, None, Credential::Operator).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.contains("hunter2-sealed"), "{uri}: {body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        let command = answer["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["stream"] == "user:command.cy"))
            .expect("the command");
        assert_eq!(
            command["data"]["password"],
            json!({"sealed": true}),
            "{uri}"
        );
        assert_eq!(command["data"]["username"], "cy");
    }
}

/// A client guessing tokens spends its write allowance on every refusal; past it, even a right
/// token is answered 429 until the client has waited, so guessing is as slow as writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_count_against_the_clients_limit() {
    let fixture = Fixture::new().await;
    let config = GatewayConfig {
        limits: gateway::LimitSettings {
            writes_per_second: 1,
            write_burst: 3,
            ..gateway::LimitSettings::default()
        },
        ..config()
    };
    let app = gateway::router(fixture.context.clone(), config);
    let ask = |credential| request("GET", "/views/users/ann", None, credential);
    for attempt in 0..4 {
        let response = app
            .clone()
            .oneshot(ask(Credential::Wrong))
            .await
            .expect("answer");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "guess {attempt}"
        );
    }
    let response = app
        .clone()
        .oneshot(ask(Credential::Ann))
        .await
        .expect("answer");
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "held off, whatever it shows now"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = app
        .clone()
        .oneshot(ask(Credential::Ann))
        .await
        .expect("answer");
    assert_ne!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "after waiting"
    );
}

/// A request without a credential carries 16 KiB at most: anonymous writes are kept for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_request_carries_a_small_body_only() {
    let fixture = Fixture::new().await;
    let app = gateway::router(fixture.context.clone(), config());
    let padding = "x".repeat(20 * 1024);
    let body = json!({"type": "RegisterUser", "data": {"username": "big", "padding": padding}});
    let response = app
        .clone()
        .oneshot(request(
            "POST",
            "/streams/user:command.big",
            Some(&body),
            Credential::None,
        ))
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let response = app
        .clone()
        .oneshot(request(
            "POST",
            "/streams/user:command.big",
            Some(&body),
            Credential::Operator,
        ))
        .await
        .expect("answer");
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "the operator's may be larger"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_client_is_slowed_down_and_the_operator_is_not() {
    let fixture = Fixture::new().await;
    let config = GatewayConfig {
        limits: gateway::LimitSettings {
            writes_per_second: 1,
            write_burst: 3,
            ..gateway::LimitSettings::default()
        },
        ..config()
    };
    let app = gateway::router(fixture.context.clone(), config);
    let register = |n: usize, credential| {
        let body = json!({"type": "RegisterUser", "data": {"username": format!("u{n}")}});
        request(
            "POST",
            &format!("/streams/user:command.u{n}"),
            Some(&body),
            credential,
        )
    };
    let mut statuses = Vec::new();
    for n in 0..5 {
        let response = app
            .clone()
            .oneshot(register(n, Credential::None))
            .await
            .expect("answer");
        statuses.push(response.status());
    }
    assert_eq!(&statuses[..3], &[StatusCode::ACCEPTED; 3]);
    assert_eq!(&statuses[3..], &[StatusCode::TOO_MANY_REQUESTS; 2]);
    for n in 5..10 {
        let response = app
            .clone()
            .oneshot(register(n, Credential::Operator))
            .await
            .expect("answer");
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
}

/// A WebSocket on a real listener: the next text frame, or `None` when the server closed.
async fn next_text<S>(socket: &mut S) -> Option<Value>
where
    S: futures_util::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s");
        match frame {
            Some(Ok(WsMessage::Text(text))) => {
                return Some(serde_json::from_str(&text).expect("JSON"));
            }
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_follows_only_their_own_streams_and_only_while_the_token_lasts() {
    let fixture = Fixture::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = gateway::serve(listener, fixture.context.clone(), config()).expect("serve");

    // No token, a wrong one: an anonymous connection follows nothing of Ann's; a bad token is
    // refused before the upgrade.
    let refused = tokio_tungstenite::connect_async(format!("ws://{address}/ws?token=nope")).await;
    assert!(refused.is_err(), "a bad token is refused at the upgrade");
    let (mut anonymous, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .expect("anonymous connects");
    anonymous
        .send(WsMessage::Text(
            json!({"follow": "socket-notification:command.ann"})
                .to_string()
                .into(),
        ))
        .await
        .expect("send");
    let answer = next_text(&mut anonymous).await.expect("an answer");
    assert!(answer["error"].is_string(), "{answer}");
    assert_leaks_nothing(&answer.to_string(), "an anonymous follow");

    // Ann, with a token that lasts three seconds, given as the first message.
    let (mut ann, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .expect("connects");
    let short = token("ann", Duration::from_secs(3));
    ann.send(WsMessage::Text(json!({"token": short}).to_string().into()))
        .await
        .expect("send");
    ann.send(WsMessage::Text(
        json!({"follow": "socket-notification:command.bob"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let refused = next_text(&mut ann).await.expect("an answer");
    assert_eq!(refused["error"], "not allowed", "{refused}");
    ann.send(WsMessage::Text(
        json!({"follow": "socket-notification:command.ann"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let pushed = next_text(&mut ann).await.expect("her notification");
    assert_eq!(pushed["message"]["type"], "NotifyUser", "{pushed}");
    assert_eq!(pushed["stream"], "socket-notification:command.ann");

    // The token expires while connected: the connection ends, and nothing more arrives.
    let started = std::time::Instant::now();
    let mut last = None;
    while let Some(frame) = next_text(&mut ann).await {
        last = Some(frame);
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed soon after the token expired"
    );
    assert_eq!(
        last.map(|l| l["error"].clone()),
        Some(json!("the token has expired"))
    );
    server.abort();
}

/// A WebSocket slot is not held for free: a message past the bound closes the connection, a
/// peer that stops answering pings is dropped, and where anonymous clients may follow nothing
/// (the example policy) a connection that presents no token is closed once its time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_slots_are_bounded_in_size_silence_and_sign_in_time() {
    let fixture = Fixture::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let config = GatewayConfig {
        limits: gateway::LimitSettings {
            websocket_idle: Duration::from_secs(3),
            websocket_sign_in: Duration::from_secs(2),
            ..gateway::LimitSettings::default()
        },
        ..config()
    };
    let server = gateway::serve(listener, fixture.context.clone(), config).expect("serve");
    let signed_in = || async {
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
            .await
            .expect("connects");
        let ann = token("ann", Duration::from_secs(600));
        socket
            .send(WsMessage::Text(json!({"token": ann}).to_string().into()))
            .await
            .expect("send");
        socket
    };

    // 32 KiB where a follow or a token is a few hundred bytes.
    let mut big = signed_in().await;
    let padding = "x".repeat(32 * 1024);
    let _ = big
        .send(WsMessage::Text(
            json!({"token": padding}).to_string().into(),
        ))
        .await;
    assert!(next_text(&mut big).await.is_none(), "closed");

    // Signed in but silent: the client's library answers pings only while it reads, and this
    // one stops reading; after the idle time the server has dropped it.
    let mut silent = signed_in().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = std::time::Instant::now();
    assert!(next_text(&mut silent).await.is_none(), "dropped");
    assert!(started.elapsed() < Duration::from_secs(2), "already gone");

    // Anonymous, never signing in: closed after its two seconds, with 4401.
    let (mut anonymous, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .expect("connects");
    let started = std::time::Instant::now();
    let answer = next_text(&mut anonymous).await.expect("told why");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("present a token")),
        "{answer}"
    );
    assert!(next_text(&mut anonymous).await.is_none(), "then closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    server.abort();
}

#[tokio::test]
async fn an_open_gateway_is_refused_on_an_address_other_machines_reach() {
    let open = Access::open();
    assert!(
        gateway::check_exposure("0.0.0.0:8080", &open, false)
            .await
            .is_err()
    );
    assert!(
        gateway::check_exposure("127.0.0.1:8080", &open, false)
            .await
            .is_ok()
    );
    assert!(
        gateway::check_exposure("0.0.0.0:8080", &open, true)
            .await
            .is_ok()
    );
    assert!(
        gateway::check_exposure("0.0.0.0:8080", &Access::operator("t"), false)
            .await
            .is_ok()
    );
}

#[test]
fn ferry_run_refuses_an_exposed_open_gateway_and_a_wrong_policy_file() {
    let setup = support::Setup::new(&[]);
    let output = setup.ferry(&["run", "--http", "0.0.0.0:0"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--http-insecure"), "{stderr}");

    let policy = setup.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[user]\nsend = [{ stream = \"user:command.{sub}\" }]\n",
    )
    .expect("write");
    let output = setup.ferry(&[
        "run",
        "--http",
        "127.0.0.1:0",
        "--http-policy",
        &policy.display().to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// Tokens bound to this deployment: with an issuer and an audience configured, a token signed
/// with the right key but naming another issuer or audience, or none, is refused; the right one
/// is taken.
#[test]
fn tokens_for_another_issuer_or_audience_are_refused() {
    let verifier = TokenVerifier::hs256(SECRET)
        .expect("verifier")
        .bound_to(Some("https://id.example"), Some("ferry-prod"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let signed = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET).expect("key"),
        )
        .expect("encode")
    };
    let exp = now + 600;
    for (what, claims) in [
        (
            "no issuer",
            json!({"sub": "ann", "exp": exp, "aud": "ferry-prod"}),
        ),
        (
            "no audience",
            json!({"sub": "ann", "exp": exp, "iss": "https://id.example"}),
        ),
        (
            "another issuer",
            json!({"sub": "ann", "exp": exp, "iss": "https://evil.example", "aud": "ferry-prod"}),
        ),
        (
            "another audience",
            json!({"sub": "ann", "exp": exp, "iss": "https://id.example", "aud": "billing"}),
        ),
    ] {
        assert!(
            verifier.verify(&signed(claims)).is_err(),
            "{what} is refused"
        );
    }
    let right = json!({"sub": "ann", "exp": exp, "iss": "https://id.example", "aud": "ferry-prod"});
    assert!(matches!(
        verifier.verify(&signed(right)),
        Ok(gateway::Caller::User { subject, .. }) if subject == "ann"
    ));
}

/// Secrets others can read, a public key without an issuer and audience to bind tokens to, and
/// an operator token too short to stand for everything are refused at start, each naming why.
#[test]
fn ferry_run_refuses_secrets_others_can_read_and_weak_or_unbound_credentials() {
    use std::os::unix::fs::PermissionsExt as _;
    let setup = support::Setup::new(&[]);
    let policy = support::repo_root().join("examples/web/policy.toml");
    let policy = policy.display().to_string();
    let secret = setup.dir.path().join("secret");
    support::write_private(&secret, SECRET);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let secret = secret.display().to_string();
    let token_file = setup.dir.path().join("token");
    support::write_private(&token_file, b"short");
    let token_file = token_file.display().to_string();
    let key = setup.dir.path().join("key.pem");
    std::fs::write(&key, "not read").expect("write");
    let key = key.display().to_string();
    for (args, expected) in [
        (
            vec!["--http-policy", &policy, "--http-jwt-secret-file", &secret],
            "chmod 600",
        ),
        (vec!["--http-token-file", &token_file], "at least 32"),
        (vec!["--http-token", "0123456789"], "at least 32"),
        (
            vec!["--http-policy", &policy, "--http-jwt-public-key", &key],
            "--http-jwt-issuer",
        ),
    ] {
        let mut command = vec!["run", "--http", "127.0.0.1:0"];
        command.extend(args.iter().copied());
        let output = setup.ferry(&command);
        assert!(!output.status.success(), "{args:?} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn ferry_token_issues_a_token_the_gateway_accepts() {
    let setup = support::Setup::new(&[]);
    let secret = setup.dir.path().join("secret");
    support::write_private(&secret, SECRET);
    let output = setup.ferry(&[
        "token",
        "--sub",
        "ann",
        "--secret-file",
        &secret.display().to_string(),
        "--ttl",
        "1h",
    ]);
    assert!(output.status.success(), "{output:?}");
    let issued = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let verifier = TokenVerifier::hs256(SECRET).expect("verifier");
    match verifier.verify(&issued) {
        Ok(gateway::Caller::User { subject, .. }) => assert_eq!(subject, "ann"),
        other => panic!("{other:?}"),
    }
}

fn arbitrary_tokens() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,200}",
        // A real token with one character changed.
        (0usize..200, any::<u8>()).prop_map(|(at, byte)| {
            let mut token = gateway::issue_token(SECRET, "ann", Duration::from_secs(600))
                .expect("token")
                .into_bytes();
            let at = at % token.len();
            let new = b'!' + byte % 90;
            token[at] = if token[at] == new {
                b'!' + (new - b'!' + 1) % 90
            } else {
                new
            };
            String::from_utf8_lossy(&token).into_owned()
        }),
        "[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{1,40}\\.[A-Za-z0-9_-]{0,40}",
    ]
}

#[test]
fn arbitrary_and_mangled_tokens_are_refused_without_a_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let fixture = runtime.block_on(Fixture::new());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&arbitrary_tokens(), |token| {
            for uri in ["/streams/user.ann", "/views/users/ann", "/metrics"] {
                let Ok(request) = Request::get(uri)
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(Body::empty())
                else {
                    continue;
                };
                let (status, body) = runtime.block_on(fixture.call(config(), request));
                prop_assert!(
                    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
                    "{uri}: {status} {body} for {token:?}"
                );
            }
            Ok(())
        })
        .expect("every token refused with 401 or 403");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_policy_files_never_panic(text in "\\PC{0,300}") {
        let _ = Policy::parse(&text);
    }

    #[test]
    fn a_mangled_policy_is_refused_with_its_line_or_parses(
        at in 0usize..1000,
        byte in 0x20u8..0x7f,
        delete in any::<bool>(),
    ) {
        let path = support::repo_root().join("examples/web/policy.toml");
        let mut text = std::fs::read_to_string(path).expect("policy").into_bytes();
        let at = at % text.len();
        if delete { text.remove(at); } else { text.insert(at, byte); }
        let text = String::from_utf8_lossy(&text).into_owned();
        if let Err(e) = Policy::parse(&text) {
            prop_assert!(e.to_string().contains("line "), "{e}");
        }
    }
}
