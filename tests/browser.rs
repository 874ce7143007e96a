//! The example page in a real browser: Debian's `chromium`, headless, driven by `playwright-core`
//! (`tests/browser/registration.mjs`; `scripts/test` installs both), against a gateway under the
//! example's access policy (`examples/web/policy.toml`), with an operator token and a secret for
//! end users' tokens. A user registers anonymously on the page served by `ferry run --http`
//! (the password sealed), signs in with a token for the id the page made, changes the name, and
//! sees both events and the service's notification arrive over the WebSocket, while the user
//! service is stopped and started again between the two steps. Another signed-in user may not
//! follow them. Then the store, read with the CLI's full rights, holds exactly those messages,
//! and the password only sealed.

mod support;

use std::io::Read as _;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use support::{Setup, repo_root, types};

const PASSWORD: &str = "correct horse battery staple";

/// `bytes` random bytes from the system, hex-encoded.
fn random_hex(bytes: u64) -> String {
    let mut random = Vec::new();
    std::fs::File::open("/dev/urandom")
        .and_then(|f| f.take(bytes).read_to_end(&mut random))
        .expect("random bytes");
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether any file under `dir` contains `needle`.
fn any_file_contains(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir)
        .expect("folder")
        .flatten()
        .any(|entry| {
            let path = entry.path();
            if path.is_dir() {
                any_file_contains(&path, needle)
            } else {
                std::fs::read(&path)
                    .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
            }
        })
}

#[test]
fn registers_signs_in_and_renames_in_a_browser_across_a_service_restart() {
    let setup = Setup::new(&["user", "email", "user_aggregator"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
    let page = repo_root().join("examples/web/index.html");
    let policy = repo_root().join("examples/web/policy.toml");
    let secret = setup.dir.path().join("jwt-secret");
    support::write_private(&secret, random_hex(32).as_bytes());
    let operator = random_hex(16);
    let host = setup.start(&[
        "--http",
        &address,
        "--page",
        &page.display().to_string(),
        "--http-token",
        &operator,
        "--http-policy",
        &policy.display().to_string(),
        "--http-jwt-secret-file",
        &secret.display().to_string(),
    ]);
    let output = Command::new("node")
        .arg(repo_root().join("tests/browser/registration.mjs"))
        .arg(format!("http://{address}/"))
        .arg(setup.services())
        // For the script to ask the host which services run, and to issue tokens.
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg(setup.data())
        .arg(&secret)
        .current_dir(repo_root().join("tests/browser"))
        .output()
        .expect("node runs (scripts/test installs playwright-core and chromium)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.lines().any(|l| l == "ok"),
        "the browser run failed:\n{stdout}\n{}\nhost log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        host.log_text()
    );
    let user_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("user-id: "))
        .expect("the script names the user id")
        .trim()
        .to_owned();

    // What the page showed is what the store holds, and nothing more: the other user's and the
    // taken username's attempts wrote nothing.
    let all = |target: &str| -> Vec<Value> {
        setup.ferry_json(&["read", target, "--limit", "1000"])["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let commands = all("user:command");
    assert_eq!(
        types(&commands),
        ["RegisterUser", "ChangeName"],
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .all(|c| c["stream"] == format!("user:command.{user_id}")),
        "{commands:?}"
    );
    let events = all(&format!("user.{user_id}"));
    assert_eq!(
        types(&events),
        ["UserRegistered", "NameChanged"],
        "{events:?}"
    );
    let registrations: Vec<_> = all("user")
        .into_iter()
        .filter(|m| m["type"] == "UserRegistered" || m["type"] == "NameChanged")
        .collect();
    assert_eq!(registrations.len(), 2, "{registrations:?}");
    let notifications = all("socket-notification:command");
    assert_eq!(types(&notifications), ["NotifyUser"], "{notifications:?}");
    assert_eq!(
        notifications[0]["stream"],
        format!("socket-notification:command.{user_id}")
    );
    assert_eq!(notifications[0]["data"]["firstName"], "Annie");

    // The password: sealed in the command (every read shows only that), opened for the user
    // service (which stored its hash), and nowhere in the store in clear.
    let registered = &commands[0]["data"];
    assert_eq!(
        registered["password"],
        json!({ "sealed": true }),
        "{registered}"
    );
    assert_eq!(registered["username"], "ann");
    assert!(
        events[0]["data"]["passwordHash"]
            .as_str()
            .is_some_and(|h| h.starts_with("pbkdf2-sha256$")),
        "{events:?}"
    );
    assert!(
        !any_file_contains(&setup.data(), PASSWORD.as_bytes()),
        "the password is in the data folder in clear"
    );
}
