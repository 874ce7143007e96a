//! `ferry store check` and `ferry store repair`: the embedded store of a stopped host, read
//! whole and held against itself, or rebuilt from its message log where that can be done.

use std::path::Path;

use serde_json::json;

use super::args::{StoreAction, StoreChoice};
use super::store_dir;
use crate::store::{SledStore, StoreCheck, StoreError};

pub(super) fn run(
    data: &Path,
    store: &StoreChoice,
    action: StoreAction,
    json: bool,
) -> anyhow::Result<()> {
    if let StoreChoice::Nats(_) = store {
        anyhow::bail!(
            "`ferry store` checks the embedded store; JetStream checks its own files (each \
             message block carries a checksum) and copies a lost replica from the others"
        );
    }
    let path = store_dir(data);
    let stopped = |e: StoreError| match e {
        StoreError::Locked { .. } => anyhow::anyhow!(
            "{}: a host is running on this data folder; stop it first",
            path.display()
        ),
        other => anyhow::Error::new(other),
    };
    if let StoreAction::Repair = action {
        let done = SledStore::repair(&path).map_err(stopped)?;
        if json {
            println!("{}", json!({ "repaired": done }));
        } else if done.is_empty() {
            println!("nothing to rebuild");
        } else {
            for line in &done {
                println!("repaired: {line}");
            }
        }
    }
    let check = SledStore::check(&path).map_err(stopped)?;
    print(&path, &check, json);
    anyhow::ensure!(
        check.problems.is_empty(),
        "{} problem(s) found in {}",
        check.problems.len(),
        path.display()
    );
    Ok(())
}

fn print(path: &Path, check: &StoreCheck, json: bool) {
    if json {
        let answer = json!({
            "head": check.head,
            "messages": check.log.messages,
            "pastHead": check.log.past_head,
            "tornBytes": check.log.torn_bytes,
            "indexRuns": check.log.runs,
            "indexEntries": check.log.run_entries,
            "records": check.records,
            "problems": check.problems,
        });
        println!("{answer}");
        return;
    }
    println!(
        "checked {}: {} messages (head {}), {} index runs with {} entries, {} records of sled",
        path.display(),
        check.log.messages,
        check.head,
        check.log.runs,
        check.log.run_entries,
        check.records
    );
    if check.log.past_head > 0 {
        println!(
            "{} records past the head, never acknowledged: opening sets them aside in log/cut/",
            check.log.past_head
        );
    }
    if check.log.torn_bytes > 0 {
        println!(
            "{} bytes after the last whole record (a torn write): opening sets them aside too",
            check.log.torn_bytes
        );
    }
    if check.problems.is_empty() {
        println!("no damage found");
    }
    for problem in &check.problems {
        println!("problem: {problem}");
    }
}
