//! `ferry new` for each language: the folder it writes builds with the pinned tools, passes its
//! own scenarios with `ferry test`, and runs under `ferry run`, handling a command into an
//! event and a view row.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{Setup, polyglot, repo_root, wait_until};

/// Writes a service with `ferry new` and builds it; returns the component.
fn new_service(parent: &Path, name: &str, lang: &str) -> PathBuf {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["new", name, "--lang", lang, "--dir"])
        .arg(parent)
        .output()
        .expect("ferry runs");
    assert!(
        output.status.success(),
        "ferry new: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let folder = parent.join(name);
    let tools = repo_root().join(".tools");
    let (mut build, component) = match lang {
        "rust" => {
            // A target folder kept between runs, beside the guests': the dependencies build once.
            let target = repo_root().join("guests/target/new-services");
            let mut cargo = Command::new(env!("CARGO"));
            cargo
                .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2"])
                .env("CARGO_TARGET_DIR", &target);
            let file = format!("wasm32-wasip2/release/{}.wasm", name.replace('-', "_"));
            (cargo, target.join(file))
        }
        "js" => {
            let mut js = Command::new(tools.join("js/node_modules/.bin/componentize-js"));
            js.args([
                "app.js",
                "--wit",
                "wit",
                "-n",
                "service",
                "-o",
                "service.wasm",
            ])
            .args(["-d", "stdio", "random", "clocks", "http", "fetch-event"]);
            (js, folder.join("service.wasm"))
        }
        _ => {
            let venv = tools.join("venv/bin");
            let mut py = Command::new(venv.join("python"));
            py.arg(venv.join("componentize-py"))
                .args(["-d", "wit", "-w", "service", "componentize", "app"])
                .args(["-o", "service.wasm"]);
            (py, folder.join("service.wasm"))
        }
    };
    let status = build.current_dir(&folder).status().expect("the build runs");
    assert!(status.success(), "the {lang} service builds");
    component
}

/// The pinned tools of scripts/build-polyglot; it installs them only when it builds, so a build is
/// forced when a tool is missing while the components are up to date.
fn ensure_tools(tool: &str) {
    polyglot("email_js");
    if !repo_root().join(".tools").join(tool).exists() {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/build-polyglot"))
            .env("FORCE", "1")
            .current_dir(repo_root())
            .status()
            .expect("bash runs");
        assert!(
            status.success(),
            "scripts/build-polyglot installs the tools"
        );
    }
}

fn passes_its_scenarios_and_runs(lang: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = format!("tally-{lang}");
    let component = new_service(dir.path(), &name, lang);

    let setup = Setup::new(&[]);
    let scenarios = dir.path().join(&name).join("scenarios.toml");
    let output = setup.ferry(&[
        "test",
        &component.display().to_string(),
        &scenarios.display().to_string(),
    ]);
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{lang}: {shown}");
    assert!(shown.contains("3 passed, 0 failed"), "{shown}");

    setup.install_file(&component, &format!("{name}.wasm"));
    let _host = setup.start(&[]);
    setup.send(&format!("{name}:command.a"), "Add", json!({ "amount": 4 }));
    wait_until(Duration::from_secs(30), "the view holds the total", || {
        setup
            .view_row(&format!("{name}-totals"), "a")
            .is_some_and(|row| row["value"]["total"] == 4)
    });
    let events = setup.read(&format!("{name}.a"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["data"], json!({ "amount": 4, "total": 4 }));
}

#[test]
fn a_new_rust_service_builds_passes_its_scenarios_and_runs() {
    passes_its_scenarios_and_runs("rust");
}

#[test]
fn a_new_javascript_service_builds_passes_its_scenarios_and_runs() {
    // The pinned componentize-js, installed as the JavaScript twin is built.
    ensure_tools("js/node_modules/.bin/componentize-js");
    passes_its_scenarios_and_runs("js");
}

#[test]
fn a_new_python_service_builds_passes_its_scenarios_and_runs() {
    // The pinned componentize-py, installed as the Python twin is built.
    ensure_tools("venv/bin/componentize-py");
    passes_its_scenarios_and_runs("python");
}
