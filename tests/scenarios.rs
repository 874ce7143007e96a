//! `ferry test` through the binary: the counter's scenarios pass, a wrong expectation fails with a
//! diff naming the field, and the article's services pass theirs, the Rust ones and their
//! JavaScript and Python twins with the same files.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use support::{Setup, guest, polyglot, repo_root};

fn ferry_test(component: &Path, files: &[PathBuf], json: bool) -> Output {
    let setup = Setup::new(&[]);
    let mut args = vec!["test".to_owned(), component.display().to_string()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    if json {
        args.insert(0, "--json".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    setup.ferry(&args)
}

fn scenarios(path: &str) -> PathBuf {
    repo_root().join(path)
}

fn assert_passes(component: &Path, file: &str) {
    let output = ferry_test(component, &[scenarios(file)], false);
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} against {file}:\n{shown}\n{}",
        component.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(shown.contains(" 0 failed"), "{shown}");
}

#[test]
fn the_counter_passes_its_scenarios() {
    assert_passes(&guest("counter"), "tests/scenarios/counter.toml");
}

#[test]
fn a_wrong_expectation_fails_with_a_diff_that_names_the_field() {
    let wrong = [scenarios("tests/scenarios/counter-wrong.toml")];
    let output = ferry_test(&guest("counter"), &wrong, false);
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "a wrong expectation passed: {shown}"
    );
    assert!(shown.contains("FAIL"), "{shown}");
    assert!(shown.contains("data.total"), "the field is named: {shown}");
    assert!(
        shown.contains("expected: 6") && shown.contains("actual:   5"),
        "{shown}"
    );
    assert!(
        !shown.contains("\x1b["),
        "no colours when not on a terminal: {shown}"
    );

    let output = ferry_test(&guest("counter"), &wrong, true);
    assert!(!output.status.success());
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(answer["failed"], 1);
    let difference = &answer["scenarios"][0]["differences"][0];
    assert!(
        difference["at"]
            .as_str()
            .is_some_and(|at| at.ends_with("data.total")),
        "{answer}"
    );
    assert_eq!(difference["expected"], "6");
    assert_eq!(difference["actual"], "5");
}

#[test]
fn a_scenario_file_that_does_not_parse_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[scenario]]\nname = \"x\"\n[scenario.wen]\n").expect("write");
    let output = ferry_test(&guest("counter"), &[bad], false);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(said.contains("is not a scenario file"), "{said}");
}

#[test]
fn the_article_services_pass_their_scenarios() {
    for (component, folder) in [
        ("user", "user"),
        ("email", "email"),
        ("subscription", "subscription"),
        ("user_aggregator", "user-aggregator"),
    ] {
        assert_passes(
            &guest(component),
            &format!("guests/{folder}/scenarios.toml"),
        );
    }
}

#[test]
fn the_javascript_and_python_twins_pass_the_same_scenarios() {
    assert_passes(&polyglot("email_js"), "guests/email/scenarios.toml");
    assert_passes(
        &polyglot("user_aggregator_py"),
        "guests/user-aggregator/scenarios.toml",
    );
}
