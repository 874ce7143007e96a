//! Property tests: arbitrary input to the stream-name parser, to message decoding, and to the
//! operator requests the CLI sends, and to the HTTP gateway. No panic, every rejection a clear
//! error, nothing written.

use std::sync::Arc;

use ferry::control::{Context, Request, execute};
use ferry::store::{Category, Message, MessageStore, SledStore, StreamName};
use proptest::prelude::*;

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9:._*> -]{0,12}",
        "[a-z]{1,8}(:command)?\\.[a-zA-Z0-9._*>-]{0,10}",
    ]
}

proptest! {
    #[test]
    fn stream_names_parse_or_are_refused_clearly(name in name_like()) {
        match StreamName::parse(&name) {
            Ok(stream) => {
                prop_assert_eq!(stream.as_str(), name.as_str());
                prop_assert_eq!(format!("{}.{}", stream.category(), stream.id()), name.clone());
                prop_assert!(!stream.id().contains(['.', '*', '>', ' ']));
                if stream.is_command() {
                    let entity = stream.entity_stream();
                    prop_assert_eq!(entity.category_str(), stream.service());
                }
            }
            Err(error) => {
                let text = error.to_string();
                prop_assert!(text.starts_with("invalid stream name"), "{}", text);
            }
        }
        match Category::parse(&name) {
            Ok(category) => prop_assert_eq!(category.as_str(), name.as_str()),
            Err(error) => prop_assert!(error.to_string().starts_with("invalid category name")),
        }
    }

    #[test]
    fn stored_messages_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Whatever bytes a damaged store holds, decoding gives a value or an error.
        let _ = serde_json::from_slice::<Message>(&bytes);
    }

    #[test]
    fn stored_messages_round_trip(
        id in "[a-z0-9-]{1,20}",
        stream in "[a-z]{1,8}(:command)?\\.[a-z0-9]{1,8}",
        message_type in "[A-Za-z]{1,12}",
        number in any::<i64>(),
        text in any::<String>(),
        position in any::<u64>(),
        global_position in any::<u64>(),
    ) {
        let message = Message {
            id,
            stream: StreamName::parse(&stream).expect("generated names are valid"),
            message_type,
            data: serde_json::json!({ "n": number, "text": text }),
            metadata: serde_json::Map::new(),
            position,
            global_position,
            time_ms: 0,
            not_before_ms: None,
        };
        let bytes = serde_json::to_vec(&message).expect("encode");
        prop_assert_eq!(serde_json::from_slice::<Message>(&bytes).expect("decode"), message);
    }

    #[test]
    fn a_stored_message_with_a_bad_stream_name_is_refused(stream in name_like()) {
        let text = serde_json::json!({
            "id": "x", "stream": stream, "type": "T", "data": {}, "metadata": {},
            "position": 0, "global_position": 1, "time_ms": 0,
        });
        let decoded = serde_json::from_value::<Message>(text);
        prop_assert_eq!(decoded.is_ok(), StreamName::parse(&stream).is_ok());
    }
}

fn send_inputs() -> impl Strategy<Value = (String, String, String, Option<String>)> {
    (
        name_like(),
        prop_oneof![Just("Increment".to_owned()), any::<String>()],
        prop_oneof![
            Just("{}".to_owned()),
            Just("{\"by\":1}".to_owned()),
            any::<String>(),
            "[\\[\\]{}\":,0-9a-z ]{0,20}",
        ],
        proptest::option::of(prop_oneof![Just("{}".to_owned()), any::<String>()]),
    )
}

#[test]
fn send_requests_write_exactly_what_they_accept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store: Arc<dyn MessageStore> =
        Arc::new(SledStore::open(dir.path().join("store")).expect("open"));
    let context = Context {
        store: store.clone(),
        services: Default::default(),
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    runner
        .run(&send_inputs(), |(stream, message_type, data, metadata)| {
            runtime.block_on(async {
                let head = store.head().await.expect("head");
                let request = Request::Send {
                    stream: stream.clone(),
                    message_type: message_type.clone(),
                    data: data.clone(),
                    metadata,
                    id: None,
                    expected_version: None,
                    sealed: Vec::new(),
                };
                match execute(&context, request).await {
                    Ok(answer) => {
                        let written = &answer["written"];
                        prop_assert_eq!(written["stream"].as_str(), Some(stream.as_str()));
                        prop_assert_eq!(store.head().await.expect("head"), head + 1);
                        let id = written["id"].as_str().unwrap_or_default().to_owned();
                        let stored = store.message(&id).await.expect("lookup").expect("stored");
                        prop_assert_eq!(
                            stored.data,
                            serde_json::from_str::<serde_json::Value>(&data)
                                .expect("accepted JSON")
                        );
                    }
                    Err(error) => {
                        let text = format!("{error:#}");
                        prop_assert!(ferry::control::is_refusal(&error), "{}", text);
                        prop_assert!(!text.is_empty());
                        prop_assert_eq!(store.head().await.expect("head"), head, "nothing written");
                    }
                }
                Ok(())
            })
        })
        .expect("every input is accepted exactly or refused without a write");
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (name_like(), any::<u64>(), 0usize..50).prop_map(|(target, from, limit)| Request::Read {
            target,
            from,
            limit
        }),
        proptest::option::of(name_like()).prop_map(|category| Request::Consumers { category }),
        (
            name_like(),
            proptest::option::of(any::<String>()),
            proptest::option::of(any::<String>()),
            0usize..50
        )
            .prop_map(|(table, key, after, limit)| Request::View {
                table,
                key,
                after,
                limit
            }),
        (
            proptest::option::of(any::<String>()),
            proptest::option::of(name_like()),
            proptest::option::of(name_like())
        )
            .prop_map(|(id, consumer, category)| Request::Replay {
                id,
                consumer,
                category
            }),
        name_like().prop_map(|stream| Request::Project { stream }),
        name_like().prop_map(|table| Request::Rebuild { table }),
    ]
}

#[test]
fn every_other_request_is_answered_or_refused_without_a_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store: Arc<dyn MessageStore> =
        Arc::new(SledStore::open(dir.path().join("store")).expect("open"));
    let context = Context {
        store: store.clone(),
        services: Default::default(),
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&any_request(), |request| {
            runtime.block_on(async {
                let head = store.head().await.expect("head");
                if let Err(error) = execute(&context, request).await {
                    let text = format!("{error:#}");
                    prop_assert!(ferry::control::is_refusal(&error), "{}", text);
                }
                prop_assert_eq!(store.head().await.expect("head"), head, "nothing written");
                Ok(())
            })
        })
        .expect("every request is answered or refused");
}

/// Arbitrary HTTP bodies and paths for the gateway's write endpoints.
fn http_inputs() -> impl Strategy<Value = (String, String)> {
    let path = prop_oneof![
        name_like().prop_map(|name| format!("/streams/{}", urlencode(&name))),
        Just("/streams/counter:command.a".to_owned()),
        Just("/webhooks/email-opened".to_owned()),
        any::<String>().prop_map(|id| format!("/parked/{}/replay", urlencode(&id))),
    ];
    let body = prop_oneof![
        any::<String>(),
        "\\{\"type\": \"[A-Za-z]{0,5}\", \"data\": (\\{\\}|\\[\\]|1|null|\"x\")(, \"[a-zA-Z]{1,16}\": (1|\"a\"|null))?\\}",
        "\\{\"emailId\": \"[a-z0-9.* -]{0,8}\"\\}",
    ];
    (path, body)
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.:~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn http_writes_are_accepted_or_refused_with_a_json_error_and_nothing_written() {
    use axum::body::Body;
    use axum::http::{Request as HttpRequest, StatusCode, header};
    use tower::ServiceExt as _;

    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let store: Arc<dyn MessageStore> =
        Arc::new(SledStore::open(dir.path().join("store")).expect("open"));
    let context = Arc::new(Context {
        store: store.clone(),
        services: Default::default(),
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    runner
        .run(&http_inputs(), |(path, body)| {
            runtime.block_on(async {
                let head = store.head().await.expect("head");
                let Ok(request) = HttpRequest::post(path.as_str())
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.clone()))
                else {
                    // Not even a valid URI: no HTTP client could send it.
                    return Ok(());
                };
                let response = ferry::gateway::router(context.clone(), Default::default())
                    .oneshot(request)
                    .await
                    .expect("an answer");
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .expect("body");
                prop_assert!(!status.is_server_error(), "{} {}: {}", path, body, status);
                if status == StatusCode::ACCEPTED {
                    prop_assert_eq!(store.head().await.expect("head"), head + 1);
                } else if status != StatusCode::OK {
                    let answer: serde_json::Value =
                        serde_json::from_slice(&bytes).unwrap_or_default();
                    prop_assert!(
                        answer["error"].as_str().is_some_and(|e| !e.is_empty())
                            || status == StatusCode::NOT_FOUND,
                        "{} {}: {} {:?}",
                        path,
                        body,
                        status,
                        answer
                    );
                    prop_assert_eq!(store.head().await.expect("head"), head, "nothing written");
                }
                Ok(())
            })
        })
        .expect("every HTTP input is answered without a server error");
}
