//! Sealed command fields, end to end with the real `ferry` binary and the article's services: a
//! password sent sealed is stored encrypted, shown as `{"sealed": true}` by every read, handed
//! to the user service in clear, and once the registration is handled its key is gone and no
//! file the host or the JetStream server wrote holds the password's bytes. On sled and on
//! JetStream, through the CLI and through the HTTP gateway.

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry::store::{MessageStore, NatsStore, SledStore};
use serde_json::{Value, json};
use sha2::Sha256;
use support::http::free_port;
use support::nats::NatsServer;
use support::{Host, Setup, types, wait_until};

const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "sealed-test-operator-token-of-32-bytes";

/// Where the test's store lives: the data folder's sled, or a real nats-server.
enum Backend {
    Sled,
    JetStream(NatsServer),
}

impl Backend {
    fn jetstream() -> Self {
        Self::JetStream(NatsServer::start())
    }

    fn setup(&self, guests: &[&str]) -> Setup {
        match self {
            Self::Sled => Setup::new(guests),
            Self::JetStream(server) => Setup::with_store(guests, &server.url()),
        }
    }

    /// Opens the store (the host must be stopped on sled) and runs `read` against it.
    fn with_store<T>(
        &self,
        setup: &Setup,
        read: impl AsyncFnOnce(Arc<dyn MessageStore>) -> T,
    ) -> T {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            let store: Arc<dyn MessageStore> = match self {
                Self::Sled => Arc::new(SledStore::open(setup.data().join("store")).expect("open")),
                Self::JetStream(server) => {
                    Arc::new(NatsStore::connect(&server.url()).await.expect("connect"))
                }
            };
            read(store).await
        })
    }

    fn seal_key(&self, setup: &Setup, message_id: &str) -> Option<Vec<u8>> {
        self.with_store(setup, async |store| {
            store.seal_key(message_id).await.expect("seal key")
        })
    }

    /// Every folder whose files must not hold a secret: the test's folder (data folder, the
    /// host's log, the services) and the JetStream server's (storage, log).
    fn folders(&self, setup: &Setup) -> Vec<PathBuf> {
        let mut folders = vec![setup.dir.path().to_path_buf()];
        if let Self::JetStream(server) = self {
            folders.push(server.folder().to_path_buf());
        }
        folders
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn registration(username: &str, password: &str) -> Value {
    json!({
        "username": username, "email": format!("{username}@example.com"),
        "password": password, "firstName": "Ann", "lastName": "Lee",
    })
}

/// Every file under the folders, with how many bytes were read, and those that hold `needle`.
fn files_holding(folders: &[PathBuf], needle: &[u8]) -> (u64, Vec<PathBuf>) {
    fn walk(dir: &Path, needle: &[u8], read: &mut u64, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(&path, needle, read, found);
            } else if kind.is_file() {
                // A file that vanished meanwhile (a lock, a socket) holds nothing.
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                *read += bytes.len() as u64;
                if holds(&bytes, needle) {
                    found.push(path);
                }
            }
        }
    }
    let mut read = 0;
    let mut found = Vec::new();
    for folder in folders {
        walk(folder, needle, &mut read, &mut found);
    }
    (read, found)
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that no file holds `secret`, and (so that the search is known to see stored data)
/// that some file holds `stored`, a value of the same message that was not sealed.
fn assert_nowhere(folders: &[PathBuf], secret: &str, stored: &str) {
    let (read, found) = files_holding(folders, secret.as_bytes());
    assert!(
        found.is_empty(),
        "the sealed value is in clear in {found:?} ({read} bytes searched)"
    );
    let (_, control) = files_holding(folders, stored.as_bytes());
    assert!(
        !control.is_empty(),
        "the search finds the message's other fields ({read} bytes searched)"
    );
}

/// Whether a `pbkdf2-sha256$ROUNDS$SALT$HEX` hash (the user service's) is of `password`: proof
/// that the handler was given the password in clear, not its sealed form.
fn hash_is_of(hash: &str, password: &str) -> bool {
    let parts: Vec<&str> = hash.split('$').collect();
    let [_, rounds, salt, hex] = parts[..] else {
        return false;
    };
    let Ok(rounds) = rounds.parse::<u32>() else {
        return false;
    };
    // PBKDF2-HMAC-SHA256 from RustCrypto: an oracle independent of the guest's own code.
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt.as_bytes(), rounds, &mut key);
    let computed: String = key.iter().map(|b| format!("{b:02x}")).collect();
    computed == hex
}

/// One request with the operator's token; the status and the JSON body.
fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    support::http::request(port, method, path, Some(TOKEN), body)
}

/// How the sealed command is sent.
#[derive(Clone, Copy)]
enum Via {
    /// `ferry send --sealed password`, with no host running.
    Cli,
    /// `POST /streams/{s}` with `"sealed": ["password"]` to `ferry run --http`, with every
    /// service but the user service running.
    Gateway,
}

/// Sends a sealed registration while the user service is not running; checks how it is shown
/// and that its key is stored; returns the command's id.
fn send_sealed_registration(
    backend: &Backend,
    setup: &Setup,
    via: Via,
    user: &str,
    data: &Value,
) -> String {
    let stream = format!("user:command.{user}");
    let id = unique("register");
    match via {
        Via::Cli => {
            let written = setup.ferry_json(&[
                "send",
                &stream,
                "RegisterUser",
                &data.to_string(),
                "--id",
                &id,
                "--sealed",
                "password",
            ])["written"]
                .clone();
            assert_eq!(written["data"]["password"], json!({"sealed": true}));
            let read = setup.read(&stream);
            assert_eq!(read.len(), 1);
            assert_eq!(read[0]["id"], id.as_str());
            assert_eq!(read[0]["data"]["password"], json!({"sealed": true}));
            assert_eq!(read[0]["data"]["username"], data["username"]);
        }
        Via::Gateway => {
            let port = free_port();
            let address = format!("127.0.0.1:{port}");
            let host = setup.start(&[
                "--only",
                "email,user-aggregator",
                "--http",
                &address,
                "--http-token",
                TOKEN,
            ]);
            wait_until(WAIT, "the gateway listens", || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            let (status, answer) = http(
                port,
                "POST",
                &format!("/streams/{stream}"),
                Some(&json!({
                    "type": "RegisterUser", "data": data, "id": id, "sealed": ["password"],
                })),
            );
            assert_eq!(status, 202, "{answer}");
            assert_eq!(answer["id"], id.as_str());
            let (status, read) = http(port, "GET", &format!("/streams/{stream}"), None);
            assert_eq!(status, 200, "{read}");
            assert_eq!(
                read["messages"][0]["data"]["password"],
                json!({"sealed": true})
            );
            // The CLI reads through the running host's socket.
            assert_eq!(
                setup.read(&stream)[0]["data"]["password"],
                json!({"sealed": true})
            );
            host.stop();
        }
    }
    let key = backend.seal_key(setup, &id);
    assert_eq!(
        key.map(|k| k.len()),
        Some(32),
        "the key is kept until the command is handled"
    );
    id
}

/// The whole life of a sealed password on one store.
fn registers_with_a_sealed_password(backend: Backend, via: Via) {
    let setup = backend.setup(&["user", "email", "user_aggregator"]);
    let user = unique("u");
    let username = unique("ann");
    let password = unique("hunter2");
    let data = registration(&username, &password);
    let id = send_sealed_registration(&backend, &setup, via, &user, &data);

    let host: Host = setup.start(&[]);
    let events = setup.wait_for_stream(&format!("user.{user}"), 1);
    assert_eq!(types(&events), ["UserRegistered"]);
    assert_eq!(events[0]["data"]["username"], username.as_str());
    let hash = events[0]["data"]["passwordHash"].as_str().expect("a hash");
    assert!(
        hash_is_of(hash, &password),
        "the handler hashed the password in clear: {hash}"
    );
    // The command is still history, sealed.
    let command = &setup.read(&format!("user:command.{user}"))[0];
    assert_eq!(command["data"]["password"], json!({"sealed": true}));
    host.stop();

    assert_eq!(
        backend.seal_key(&setup, &id),
        None,
        "the key went with the commit that handled the registration"
    );
    let stored = backend.with_store(&setup, async |store| {
        store.message(&id).await.expect("lookup").expect("stored")
    });
    assert!(
        stored.data["password"]["box"].is_string(),
        "stored as ciphertext"
    );
    assert_nowhere(&backend.folders(&setup), &password, &username);
}

#[test]
fn a_password_sent_sealed_is_handled_in_clear_and_never_stored_in_clear_on_sled() {
    registers_with_a_sealed_password(Backend::Sled, Via::Cli);
}

#[test]
fn a_password_sent_sealed_is_handled_in_clear_and_never_stored_in_clear_on_jetstream() {
    registers_with_a_sealed_password(Backend::jetstream(), Via::Cli);
}

#[test]
fn a_password_sealed_through_the_gateway_is_never_stored_in_clear_on_sled() {
    registers_with_a_sealed_password(Backend::Sled, Via::Gateway);
}

#[test]
fn a_password_sealed_through_the_gateway_is_never_stored_in_clear_on_jetstream() {
    registers_with_a_sealed_password(Backend::jetstream(), Via::Gateway);
}

/// The email provider's webhook can race the send: `RecordEmailOpened` for an email not sent
/// yet fails transiently, and with one delivery allowed it is parked. Sealed, its parked record
/// keeps the field sealed and the key stays; once the email is sent, a replay handles it and
/// shreds the key.
fn a_parked_sealed_command_keeps_its_key_until_a_replay_handles_it(backend: Backend) {
    let setup = backend.setup(&["email"]);
    let email = unique("e");
    let provider_token = unique("provider-token");
    let run = ["--max-deliveries", "1"];
    let host = setup.start(&run);
    let opened = setup.ferry_json(&[
        "send",
        &format!("email:command.{email}"),
        "RecordEmailOpened",
        &json!({"id": email, "timestamp": "2024-05-01T10:00:00Z", "providerToken": provider_token})
            .to_string(),
        "--sealed",
        "providerToken",
    ])["written"]
        .clone();
    let id = opened["id"].as_str().expect("an id").to_owned();
    let mut parked = Vec::new();
    wait_until(WAIT, "the early webhook is parked", || {
        parked = setup.parked();
        !parked.is_empty()
    });
    assert_eq!(parked[0]["message"]["id"], id.as_str());
    assert_eq!(
        parked[0]["message"]["data"]["providerToken"],
        json!({"sealed": true})
    );
    host.stop();

    assert!(
        backend.seal_key(&setup, &id).is_some(),
        "a parked command keeps its key"
    );
    let record = backend.with_store(&setup, async |store| {
        store.parked(None).await.expect("parked").remove(0)
    });
    assert!(
        record.message.data["providerToken"]["box"].is_string(),
        "the parked record holds the field sealed: {:?}",
        record.message.data
    );

    let host = setup.start(&run);
    setup.send(
        &format!("email:command.{email}"),
        "SendEmail",
        json!({"id": email, "from": "noreply@example.com", "to": "ann@example.com",
               "subject": "Welcome", "body": "Hello"}),
    );
    setup.wait_for_stream(&format!("email.{email}"), 1);
    assert_eq!(setup.ferry_json(&["replay", &id])["replayed"], 1);
    let events = setup.wait_for_stream(&format!("email.{email}"), 2);
    assert_eq!(types(&events), ["EmailSent", "EmailOpened"]);
    assert!(setup.parked().is_empty());
    host.stop();

    assert_eq!(
        backend.seal_key(&setup, &id),
        None,
        "the replay's commit shredded the key"
    );
    assert_nowhere(&backend.folders(&setup), &provider_token, &email);
}

#[test]
fn a_parked_sealed_command_keeps_its_key_until_a_replay_handles_it_on_sled() {
    a_parked_sealed_command_keeps_its_key_until_a_replay_handles_it(Backend::Sled);
}

#[test]
fn a_parked_sealed_command_keeps_its_key_until_a_replay_handles_it_on_jetstream() {
    a_parked_sealed_command_keeps_its_key_until_a_replay_handles_it(Backend::jetstream());
}

#[test]
fn refuses_to_seal_what_it_cannot_seal_and_writes_nothing() {
    let setup = Setup::new(&[]);
    let refused = |args: &[&str], why: &str| {
        let output = setup.ferry(args);
        assert!(!output.status.success(), "{args:?} was accepted");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(why), "{args:?}: {text}");
    };
    let data = json!({"password": "p", "n": 1}).to_string();
    refused(
        &[
            "send",
            "user.1",
            "Registered",
            &data,
            "--sealed",
            "password",
        ],
        "not a command stream",
    );
    refused(
        &[
            "send",
            "user:command.1",
            "RegisterUser",
            &data,
            "--sealed",
            "pin",
        ],
        "\"pin\" is not a top-level field",
    );
    refused(
        &[
            "send",
            "user:command.1",
            "RegisterUser",
            &data,
            "--sealed",
            "password,password",
        ],
        "named twice",
    );
    refused(
        &[
            "send",
            "user:command.1",
            "RegisterUser",
            &json!({"password": {"sealed": true, "box": "x"}}).to_string(),
        ],
        "only the host writes",
    );
    assert!(setup.read("user:command.1").is_empty());
    assert!(setup.read("user.1").is_empty());
}

/// A guest that quotes what it was given (in its log and its failure, as `chaos`'s `Quote`
/// does) and the SDK's own parse error (a password sent as a number): sealed values of every
/// JSON type are in no byte of the folders, the host's log or any HTTP answer.
fn sealed_values_quoted_by_a_failing_guest_are_redacted(backend: Backend) {
    let setup = backend.setup(&["chaos", "user"]);
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let host = setup.start(&["--http", &address, "--http-token", TOKEN]);
    wait_until(WAIT, "the gateway listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Each sealed value is a text no other part of the test writes.
    let text = unique("sealed-text");
    let secrets: Vec<String> = vec![
        text.clone(),
        "987654321".into(),
        "31415.92653".into(),
        "arr-item-x91q".into(),
        "5550123".into(),
        "obj-value-q2z".into(),
        "obj-key-q7w".into(),
    ];
    let visible = unique("visible");
    let (status, answer) = http(
        port,
        "POST",
        "/streams/chaos:command.quoted",
        Some(&json!({
            "type": "Quote",
            "data": {
                "text": text, "integer": 987654321, "float": 31415.92653,
                "array": ["arr-item-x91q", 5550123], "object": { "obj-key-q7w": "obj-value-q2z" },
                "flag": true, "nothing": null, "visible": visible,
            },
            "sealed": ["text", "integer", "float", "array", "object", "flag", "nothing"],
        })),
    );
    assert_eq!(status, 202, "{answer}");
    // The password of the wrong type: the SDK's error names the field, not the value.
    let (status, answer) = http(
        port,
        "POST",
        "/streams/user:command.typed",
        Some(&json!({
            "type": "RegisterUser",
            "data": {
                "username": visible, "email": "typed@example.com", "password": 8675309123u64,
                "firstName": "Ty", "lastName": "Ped",
            },
            "sealed": ["password"],
        })),
    );
    assert_eq!(status, 202, "{answer}");
    let mut parked = Value::Null;
    wait_until(WAIT, "both are parked", || {
        parked = http(port, "GET", "/parked", None).1;
        parked["parked"].as_array().is_some_and(|p| p.len() == 2)
    });
    let shown = parked.to_string();
    let user_reason = parked["parked"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|p| p["consumer"]["category"] == "user:command")
        })
        .and_then(|p| p["reason"].as_str())
        .unwrap_or_default();
    assert!(
        user_reason.contains("`password`") && user_reason.contains("expected a string"),
        "the reason names the field and the type: {user_reason}"
    );
    assert!(
        shown.contains("[sealed]"),
        "the guest's quote is redacted: {shown}"
    );
    let log = host.log_text();
    host.stop();
    for secret in secrets
        .iter()
        .chain(std::iter::once(&"8675309123".to_owned()))
    {
        assert!(
            !shown.contains(secret.as_str()),
            "{secret} in /parked: {shown}"
        );
        assert!(!log.contains(secret.as_str()), "{secret} in the host's log");
        assert_nowhere(&backend.folders(&setup), secret, &visible);
    }
}

#[test]
fn sealed_values_quoted_by_a_failing_guest_are_redacted_on_sled() {
    sealed_values_quoted_by_a_failing_guest_are_redacted(Backend::Sled);
}

#[test]
fn sealed_values_quoted_by_a_failing_guest_are_redacted_on_jetstream() {
    sealed_values_quoted_by_a_failing_guest_are_redacted(Backend::jetstream());
}
