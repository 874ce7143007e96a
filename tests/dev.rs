//! `ferry dev` on a folder with one Rust service written by `ferry new`: it is built, tested and
//! run; an edit is rebuilt and reloaded; an edit that breaks a scenario is shown with its diff
//! and the running version stays.

mod support;

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{Setup, repo_root, wait_until};

const WAIT: Duration = Duration::from_secs(240);

/// The last `Added` of entity `a` after sending `Add { amount: 1 }`.
fn add_one(setup: &Setup) -> serde_json::Value {
    let before = setup.read("tally.a").len();
    setup.send("tally:command.a", "Add", json!({ "amount": 1 }));
    wait_until(WAIT, "the Add is handled", || {
        setup.read("tally.a").len() > before
    });
    setup.read("tally.a").last().cloned().unwrap_or_default()
}

#[test]
fn rebuilds_and_reloads_an_edit_and_keeps_the_running_version_when_a_scenario_fails() {
    let setup = Setup::new(&[]);
    let sources = setup.dir.path().join("sources");
    std::fs::create_dir_all(&sources).expect("sources");
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["new", "tally", "--lang", "rust", "--dir"])
        .arg(&sources)
        .output()
        .expect("ferry new");
    assert!(output.status.success());
    let code = sources.join("tally/src/lib.rs");
    let edit = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&code).expect("read");
        assert!(text.contains(from), "{from}");
        std::fs::write(&code, text.replace(from, to)).expect("write");
    };

    let out_path = setup.dir.path().join("dev.out");
    let mut dev = setup
        .command_in(&setup.data())
        .args(["dev"])
        .arg(&sources)
        // The dependencies build once, beside the guests'.
        .env(
            "CARGO_TARGET_DIR",
            repo_root().join("guests/target/new-services"),
        )
        .stdout(std::fs::File::create(&out_path).expect("out"))
        .stderr(Stdio::null())
        .spawn()
        .expect("ferry dev starts");
    let shown = || {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&out_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    };
    let lines = |what: &str| shown().lines().filter(|l| l.contains(what)).count();

    wait_until(WAIT, "the service is built, tested and running", || {
        lines("scenario(s) passed, running it") == 1
    });
    wait_until(WAIT, "the host has loaded it", || {
        setup.services().join("tally.wasm").exists()
    });
    assert_eq!(add_one(&setup)["data"]["total"], 1);

    // An edit the scenarios accept (they compare subsets): rebuilt and reloaded.
    edit(
        "metadata: None,",
        r##"metadata: Some(r#"{"edition":2}"#.into()),"##,
    );
    wait_until(WAIT, "the edit is rebuilt and reloaded", || {
        lines("scenario(s) passed, running it") == 2
    });
    // "Running it" is said only once the host runs it: the next command meets the new version.
    assert_eq!(
        add_one(&setup)["metadata"]["edition"],
        2,
        "the first command after the line is handled by the new version"
    );

    // An edit that breaks a scenario: shown with its diff, and the running version stays.
    edit(
        "state_of(state.as_deref())?.total + amount;",
        "state_of(state.as_deref())?.total + amount + 1;",
    );
    wait_until(WAIT, "the failing scenario is reported", || {
        lines("the running version stays") == 1
    });
    let text = shown();
    assert!(
        text.contains("data.total"),
        "the diff names the field: {text}"
    );
    let last = add_one(&setup);
    let total = setup.read("tally.a").len();
    assert_eq!(
        last["data"]["total"], total,
        "still counting by one: {last}"
    );
    assert_eq!(last["metadata"]["edition"], 2);
    assert!(text.contains("tally: built in"), "{text}");

    let _ = dev.kill();
    let _ = dev.wait();
}
