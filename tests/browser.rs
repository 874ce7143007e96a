//! The example page in a real browser: Debian's `chromium`, headless, driven by `playwright-core`
//! (`tests/browser/registration.mjs`; `scripts/test` installs both). A user registers on the page
//! served by `ferry run --http`, changes the name, and sees both events arrive over the WebSocket,
//! while the user service is stopped and started again between the two steps.

mod support;

use std::process::Command;

use support::{Setup, repo_root};

#[test]
fn registers_and_renames_in_a_browser_across_a_service_restart() {
    let setup = Setup::new(&["user", "email", "user_aggregator"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
    let page = repo_root().join("examples/web/index.html");
    let host = setup.start(&["--http", &address, "--page", &page.display().to_string()]);
    let output = Command::new("node")
        .arg(repo_root().join("tests/browser/registration.mjs"))
        .arg(format!("http://{address}/"))
        .arg(setup.services())
        // For the script to ask the host which services run.
        .arg(env!("CARGO_BIN_EXE_ferry"))
        .arg(setup.data())
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
    // What the page showed is what the store holds.
    let user_streams: Vec<_> = setup.ferry_json(&["read", "user", "--limit", "1000"])["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["type"] == "UserRegistered" || m["type"] == "NameChanged")
        .collect();
    assert_eq!(user_streams.len(), 2, "{user_streams:?}");
}
