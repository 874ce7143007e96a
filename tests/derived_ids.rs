//! The ids and secrets the host derives, with the real `ferry` binary: the user service's
//! confirmation token is unguessable and the same when its message is handled again after a
//! crash; a store written before namespaces had secrets (sled and JetStream) opens, gets a secret
//! keyed after its head, and handling again what it handled before writes the ids it wrote then
//! (and finds the id claims it made then); instances opening a new namespace together share one
//! secret.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ferry::store::{Commit, MessageStore, NatsStore, NewMessage, SledStore, StreamName};
use serde_json::{Map, Value, json};
use support::nats::NatsServer;
use support::{Setup, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// The id a Ferry before keyed ids derived (UUIDv5 of service, handled id and parts).
fn unkeyed_derived_id(parts: &[&str]) -> String {
    let namespace = uuid::Uuid::from_u128(0x6a0f_9a7e_52c4_4f0e_9c1e_2b7d_f1a3_c5e9);
    uuid::Uuid::new_v5(&namespace, parts.join("\u{1f}").as_bytes()).to_string()
}

fn message(id: &str, message_type: &str, data: Value) -> NewMessage {
    NewMessage {
        id: id.into(),
        message_type: message_type.into(),
        data,
        metadata: Map::new(),
        not_before_ms: None,
    }
}

fn stream(name: &str) -> StreamName {
    StreamName::parse(name).expect("stream")
}

/// The welcome email's command in a data folder: its id and the token of its link.
fn welcome_email(setup: &Setup, data: &std::path::Path) -> Option<(String, String)> {
    let output = setup
        .command_in(data)
        .args(["--json", "read", "email:command"])
        .output()
        .ok()?;
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    let command = answer["messages"].as_array()?.first()?.clone();
    let body = command["data"]["body"].as_str()?;
    let token = body.split("token=").nth(1)?.trim().to_owned();
    Some((command["data"]["id"].as_str()?.to_owned(), token))
}

/// A crash before the commit leaves the folder as it was before the handling: the copy taken
/// then is that folder. Handled in both, the registration gives the same email id and token.
#[test]
fn the_confirmation_token_is_unguessable_and_the_same_when_handled_again() {
    let setup = Setup::new(&["user"]);
    let registered = setup.send(
        "user.u9",
        "UserRegistered",
        json!({
            "userId": "u9", "username": "nine", "email": "nine@example.com",
            "firstName": "Nine", "lastName": "Lee", "passwordHash": "x",
        }),
    );
    let event_id = registered["id"].as_str().expect("id").to_owned();
    let copy = setup.dir.path().join("copy");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(setup.data())
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(status.success());

    let mut first = None;
    let host = setup.start(&[]);
    wait_until(WAIT, "the welcome email is sent", || {
        first = welcome_email(&setup, &setup.data());
        first.is_some()
    });
    host.stop();
    let mut again = None;
    let host = setup.start_in(&copy, &[]);
    wait_until(WAIT, "the welcome email is sent again", || {
        again = welcome_email(&setup, &copy);
        again.is_some()
    });
    host.stop();
    let (email_id, token) = first.expect("first");
    assert_eq!(
        again,
        Some((email_id.clone(), token.clone())),
        "handled again: the same email id and token"
    );

    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    // Nothing a client could compute: not an id it saw or sent, not an unkeyed derivation.
    let computable = [
        event_id.clone(),
        email_id.clone(),
        unkeyed_derived_id(&["user", &event_id, "new-id", "confirm-token"]),
        unkeyed_derived_id(&["user", &event_id, "new-id", "welcome-email"]),
        unkeyed_derived_id(&["user", &event_id, "0"]),
    ];
    for id in computable {
        let bare = id.replace('-', "");
        assert!(!bare.contains(&token) && !token.contains(&bare[..bare.len().min(18)]));
    }
}

/// A sled folder as an earlier Ferry left it: a command and the event its handling wrote, under
/// the unkeyed id, and no secret; the consumer's position lost (as after a restored backup), so
/// the command is handled again.
#[test]
fn a_sled_folder_written_before_secrets_keeps_the_ids_it_derived() {
    let setup = Setup::new(&["counter"]);
    let store_dir = setup.data().join("store");
    std::fs::create_dir_all(setup.data()).expect("data folder");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = SledStore::open(&store_dir).expect("open");
        write_handled_before(&store).await;
    });
    // As an earlier Ferry left it: no secret, and no mark that there ever was one.
    std::fs::remove_file(store_dir.join("secret")).expect("a folder without a secret");
    {
        let db = sled::open(&store_dir).expect("sled");
        let tree = db.open_tree("ferry").expect("tree");
        tree.remove("=secret").expect("unmark");
        db.flush().expect("flush");
    }

    let host = setup.start(&[]);
    // Handled again, the first command's output is the stored event (a duplicate); a new
    // command's output is keyed.
    setup.send("counter:command.a", "Increment", json!({ "by": 2 }));
    let events = setup.wait_for_stream("counter.a", 2);
    host.stop();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["id"], unkeyed_derived_id(&["counter", "c1", "0"]));
    assert_eq!(events[1]["data"]["by"], 2);
    assert_ne!(
        events[1]["id"],
        unkeyed_derived_id(&[
            "counter",
            events[1]["metadata"]["causationId"]
                .as_str()
                .unwrap_or_default(),
            "0"
        ])
    );
    let secret: Value =
        serde_json::from_slice(&std::fs::read(store_dir.join("secret")).expect("secret"))
            .expect("JSON");
    assert_eq!(
        secret["keyedAfter"], 2,
        "keyed after the head it was opened at"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(store_dir.join("secret"))
            .expect("secret")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the secret is the owner's alone: {mode:o}");
    }
}

/// What an earlier Ferry wrote for one handled command: the command, and its output under the
/// unkeyed id.
async fn write_handled_before(store: &dyn MessageStore) {
    store
        .commit(Commit::append(
            stream("counter:command.a"),
            None,
            vec![message("c1", "Increment", json!({ "by": 1 }))],
        ))
        .await
        .expect("command");
    store
        .commit(Commit::append(
            stream("counter.a"),
            Some(0),
            vec![message(
                &unkeyed_derived_id(&["counter", "c1", "0"]),
                "Incremented",
                json!({ "by": 1, "total": 1 }),
            )],
        ))
        .await
        .expect("its output");
}

/// A JetStream namespace as an earlier Ferry left it: id claims with empty payloads (they did
/// not name their stream), no secret.
#[test]
fn a_jetstream_namespace_written_before_secrets_keeps_its_ids_and_claims() {
    let server = NatsServer::start();
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Created by this Ferry, then made as the earlier one left it.
        let store: Arc<dyn MessageStore> =
            Arc::new(NatsStore::connect(&url).await.expect("connect"));
        drop(store);
        let client = async_nats::connect(format!("127.0.0.1:{}", server.port))
            .await
            .expect("client");
        let jetstream = async_nats::jetstream::new(client);
        let mut namespace = jetstream.get_stream("ferry").await.expect("stream");
        // A secret lost from a namespace that had one is refused, not replaced.
        namespace
            .purge()
            .filter("ferry.meta.secret")
            .await
            .expect("purge the secret");
        let refused = NatsStore::connect(&url).await.expect_err("a lost secret");
        assert!(
            refused.to_string().contains("secret is missing"),
            "{refused}"
        );
        // An earlier Ferry's namespace never had one.
        namespace
            .purge()
            .filter("ferry.meta.keyed")
            .await
            .expect("purge the mark");
        let earlier = [
            ("counter:command.a", "c1", "Increment", json!({ "by": 1 })),
            (
                "counter.a",
                &unkeyed_derived_id(&["counter", "c1", "0"]) as &str,
                "Incremented",
                json!({ "by": 1, "total": 1 }),
            ),
        ];
        for (stream, id, message_type, data) in earlier {
            jetstream
                .publish(format!("ferry.id.{id}"), Vec::new().into())
                .await
                .expect("claim")
                .await
                .expect("claim stored");
            let stored = json!({
                "id": id, "type": message_type, "data": data, "metadata": {},
                "position": 0, "time_ms": 1,
            });
            jetstream
                .publish(format!("ferry.m.{stream}"), stored.to_string().into())
                .await
                .expect("message")
                .await
                .expect("message stored");
        }
        let _ = namespace.info().await;
    });

    let setup = Setup::with_store(&["counter"], &url);
    let host = setup.start(&[]);
    setup.send("counter:command.a", "Increment", json!({ "by": 2 }));
    let events = setup.wait_for_stream("counter.a", 2);
    assert_eq!(
        events.len(),
        2,
        "the earlier output is not written twice: {events:?}"
    );
    assert_eq!(events[1]["data"]["by"], 2);
    // The earlier claims still hold their ids: for their stream a duplicate, for another a
    // refusal.
    let again = setup.ferry_json(&[
        "send",
        "counter:command.a",
        "Increment",
        "{\"by\":1}",
        "--id",
        "c1",
    ]);
    assert!(again.get("duplicate").is_some(), "{again}");
    let elsewhere = setup.ferry(&[
        "send",
        "counter:command.b",
        "Increment",
        "{\"by\":1}",
        "--id",
        "c1",
    ]);
    assert!(!elsewhere.status.success());
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        stderr.contains("already used by another stream"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("command.a"),
        "names the other stream: {stderr}"
    );
    host.stop();
    let secret = runtime.block_on(async {
        NatsStore::connect(&url)
            .await
            .expect("connect")
            .secret()
            .clone()
    });
    assert!(
        secret.keyed_after >= 4,
        "keyed after the earlier messages: {secret:?}"
    );
}

/// Processes that open a new namespace at the same moment (two instances started together)
/// all get the one secret that was created, none calls it lost.
#[test]
fn instances_opening_a_new_namespace_together_share_one_secret() {
    let server = NatsServer::start();
    let url = server.url();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for round in 0..10 {
            let namespace = format!("{url}/together{round}");
            let opened =
                futures_util::future::join_all((0..6).map(|_| NatsStore::connect(&namespace)))
                    .await;
            let secrets: Vec<_> = opened
                .into_iter()
                .map(|store| store.expect("opens").secret().clone())
                .collect();
            assert!(
                secrets.iter().all(|secret| *secret == secrets[0]),
                "one secret per namespace"
            );
        }
    });
}
