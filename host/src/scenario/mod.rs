//! `ferry test`: given / when / then scenarios for one component, run through the host's real
//! path without a running host.
//!
//! A scenario file (TOML, documented in guests/README.md) holds `[[scenario]]`s: events and view
//! rows already stored (`given`, `given_view`), the one message handled (`when`), and what its
//! handling must write (`then` messages, `then_view` rows) or how it must fail (`then_failure`),
//! optionally with `nothing_else`. Each scenario gets a throwaway sled store: the givens are
//! stored, the service's consumers are placed after them, the `when` message is appended, and the
//! service's own consumers handle it exactly as `ferry run` would (limits, projection, the call,
//! outcome checks, derived ids, metadata, the commit), with one delivery so that a transient
//! failure shows at once. What the handling committed is recorded by a wrapper around the store
//! ([`recording`]) and compared with the expectations ([`compare`]): the messages caused by
//! `when` (their `causationId`) and the view rows written at its position, so that what the
//! service then does with its own new events (another scenario's `when`) is not counted.

mod compare;
mod recording;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::Instrument as _;

pub use self::compare::Difference;
use self::recording::RecordingStore;
pub use self::report::print;
use crate::mail::{Maildir, Transport};
use crate::service::{
    Capabilities, LoadedService, RunnerConfig, Running, consumer_name, subscriptions_of,
};
use crate::store::{
    Category, Commit, ConsumerId, GroupSpec, Message, MessageStore, NewMessage, PartitionKey,
    Settle, SledStore, StreamName, ViewWrite,
};
use crate::wasm::ServiceComponent;

/// How long a scenario's `when` message may take to be handled.
const HANDLED_WITHIN: Duration = Duration::from_secs(30);

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default)]
    scenario: Vec<Scenario>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    given: Vec<GivenMessage>,
    #[serde(default)]
    given_view: Vec<ViewRowSpec>,
    when: GivenMessage,
    #[serde(default)]
    then: Vec<ExpectedMessage>,
    #[serde(default)]
    then_view: Vec<ExpectedRow>,
    then_failure: Option<ExpectedFailure>,
    #[serde(default)]
    nothing_else: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GivenMessage {
    stream: String,
    #[serde(rename = "type")]
    message_type: String,
    id: Option<String>,
    #[serde(default = "empty_object")]
    data: Value,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewRowSpec {
    table: String,
    key: String,
    value: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedMessage {
    stream: String,
    #[serde(rename = "type")]
    message_type: String,
    data: Option<Value>,
    metadata: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedRow {
    table: String,
    key: String,
    value: Option<Value>,
    #[serde(default)]
    deleted: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectedFailure {
    kind: FailureKind,
    matches: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FailureKind {
    Transient,
    Permanent,
    Any,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// The outcome of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub file: PathBuf,
    pub name: String,
    pub passed: bool,
    pub differences: Vec<Difference>,
    /// What the handling wrote, for reading a failure.
    pub written: Vec<String>,
    #[serde(rename = "durationMs")]
    pub duration_ms: u64,
}

/// Reads a scenario file; a clear error for a file that does not parse.
pub fn read_file(path: &Path) -> anyhow::Result<Vec<Scenario>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the scenario file {}", path.display()))?;
    let file: ScenarioFile = toml::from_str(&text)
        .with_context(|| format!("{} is not a scenario file", path.display()))?;
    anyhow::ensure!(
        !file.scenario.is_empty(),
        "{} holds no [[scenario]]",
        path.display()
    );
    Ok(file.scenario)
}

/// Runs every scenario of `files` against the component at `component_path`.
pub async fn run_files(
    component_path: &Path,
    component: &ServiceComponent,
    files: &[PathBuf],
) -> anyhow::Result<Vec<ScenarioResult>> {
    let mut results = Vec::new();
    for file in files {
        for scenario in read_file(file)? {
            let started = Instant::now();
            // Its consumers' log lines say which scenario they ran (in `ferry dev` they share
            // the host's log).
            let span = tracing::info_span!("scenario", name = %scenario.name);
            let outcome = run(component_path, component, &scenario)
                .instrument(span)
                .await
                .with_context(|| format!("scenario {:?} of {}", scenario.name, file.display()))?;
            let (differences, written) = outcome;
            results.push(ScenarioResult {
                file: file.clone(),
                name: scenario.name.clone(),
                passed: differences.is_empty(),
                differences,
                written,
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
    }
    Ok(results)
}

/// One scenario on a throwaway store: the differences found, and a line per message written.
async fn run(
    component_path: &Path,
    component: &ServiceComponent,
    scenario: &Scenario,
) -> anyhow::Result<(Vec<Difference>, Vec<String>)> {
    let folder = tempfile::tempdir().context("cannot make a throwaway folder")?;
    let sled: Arc<dyn MessageStore> = Arc::new(SledStore::open(folder.path().join("store"))?);
    let recording = Arc::new(RecordingStore::new(sled));
    let store: Arc<dyn MessageStore> = recording.clone();
    let service = component.manifest().name.clone();

    for (index, given) in scenario.given.iter().enumerate() {
        let message = new_message(given, || format!("given-{index}"))?;
        store
            .commit(Commit::append(
                parse_stream(&given.stream)?,
                None,
                vec![message],
            ))
            .await
            .with_context(|| format!("given[{index}] cannot be stored"))?;
    }
    let head = store.head().await?;
    if !scenario.given_view.is_empty() {
        let views = scenario
            .given_view
            .iter()
            .map(|row| ViewWrite {
                table: row.table.clone(),
                key: row.key.clone(),
                value: Some(row.value.clone()),
                seq: head,
            })
            .collect();
        store
            .commit(Commit {
                views,
                ..Commit::default()
            })
            .await
            .context("given_view cannot be stored")?;
    }

    // Every consumer of the service starts after the givens: only `when` is handled.
    let when_stream = parse_stream(&scenario.when.stream)?;
    let consumers = consumers_of(component)?;
    let handler = consumers
        .iter()
        .find(|(id, _)| id.category == when_stream.category())
        .map(|(id, _)| id.clone())
        .with_context(|| {
            format!(
                "{service} handles no message of {} (it reads {})",
                when_stream.category(),
                consumers
                    .iter()
                    .map(|(id, _)| id.category.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let head = store.head().await?;
    for (id, spec) in &consumers {
        let group = store.join_group(id, *spec).await?;
        store
            .commit(Commit {
                settle: Some(Settle::Advance {
                    consumer: id.clone(),
                    partitions: group.every_partition(),
                    to: head,
                }),
                ..Commit::default()
            })
            .await?;
    }

    let capabilities = Capabilities {
        mail: Some(Arc::new(Transport::Maildir(Maildir::new(
            folder.path().join("maildir"),
        )))),
        mail_grants: vec![service.clone()],
    };
    let config = RunnerConfig {
        max_deliveries: 1,
        ..RunnerConfig::default()
    };
    let loaded = LoadedService {
        path: component_path.to_path_buf(),
        component: component.clone(),
    };
    let running = Running::start(store.clone(), &[loaded], config, &capabilities)?;

    let when = new_message(&scenario.when, || "when".to_owned())?;
    let when_id = when.id.clone();
    // Recording from before the append: the handling may commit before the append returns.
    recording.start();
    let appended = store
        .commit(Commit::append(when_stream, None, vec![when]))
        .await
        .context("the when message cannot be stored")?;
    let at = appended
        .written
        .first()
        .map(|m| m.global_position)
        .context("the when message was not written (its id is a given's)")?;
    let deadline = Instant::now() + HANDLED_WITHIN;
    while store.settled(&handler).await? < at {
        if Instant::now() > deadline {
            running.shutdown().await;
            anyhow::bail!("the when message was not handled within {HANDLED_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.shutdown().await;

    // Only what handling `when` wrote: the service's consumers also run on what that wrote
    // (a service reacting to its own events), which is another scenario's `when`.
    let (mut written, mut views) = recording.taken();
    written.retain(|message| {
        message.metadata.get("causationId").and_then(Value::as_str) == Some(when_id.as_str())
    });
    views.retain(|write| write.seq == at);
    let parked = store.parked(None).await?;
    let failure = parked
        .iter()
        .find(|p| p.message.id == when_id)
        .map(|p| p.reason.clone());
    let mut differences = Vec::new();
    check_messages(scenario, &written, &mut differences);
    check_views(scenario, store.as_ref(), &views, &mut differences).await?;
    check_failure(scenario, failure.as_deref(), &mut differences);
    let lines = written.iter().map(describe).collect();
    Ok((differences, lines))
}

/// The service's consumers with the split they are made with.
fn consumers_of(component: &ServiceComponent) -> anyhow::Result<Vec<(ConsumerId, GroupSpec)>> {
    let manifest = component.manifest();
    let mut consumers: Vec<(ConsumerId, GroupSpec)> = subscriptions_of(component)?
        .into_iter()
        .map(|(id, origin)| {
            let key = match origin {
                Some(_) => PartitionKey::OriginEntity,
                None => PartitionKey::Entity,
            };
            (id, GroupSpec::new(key))
        })
        .collect();
    if manifest.handles_commands {
        consumers.push((
            ConsumerId::new(
                Category::commands_of(&manifest.name)?,
                consumer_name(&manifest.name),
            ),
            GroupSpec::new(PartitionKey::Entity),
        ));
    }
    Ok(consumers)
}

fn parse_stream(name: &str) -> anyhow::Result<StreamName> {
    StreamName::parse(name).with_context(|| format!("{name:?} is not a stream name"))
}

fn new_message(given: &GivenMessage, id: impl FnOnce() -> String) -> anyhow::Result<NewMessage> {
    anyhow::ensure!(
        given.data.is_object(),
        "the data of {} is not a table",
        given.message_type
    );
    Ok(NewMessage {
        id: given.id.clone().unwrap_or_else(id),
        message_type: given.message_type.clone(),
        data: given.data.clone(),
        metadata: given.metadata.clone(),
        not_before_ms: None,
    })
}

fn describe(message: &Message) -> String {
    format!(
        "{} → {} {} {}",
        message.message_type,
        message.stream,
        message.data,
        Value::Object(message.metadata.clone())
    )
}

/// Each expected message against the next one written to its stream with its type, in order.
fn check_messages(scenario: &Scenario, written: &[Message], out: &mut Vec<Difference>) {
    let mut next = 0;
    let mut matched = vec![false; written.len()];
    for (index, expected) in scenario.then.iter().enumerate() {
        let at = format!(
            "then[{index}] {} → {}",
            expected.message_type, expected.stream
        );
        let found = written.iter().enumerate().skip(next).find(|(_, m)| {
            m.message_type == expected.message_type && m.stream.as_str() == expected.stream
        });
        let Some((position, message)) = found else {
            let what = if written.is_empty() {
                "nothing written".to_owned()
            } else {
                written.iter().map(describe).collect::<Vec<_>>().join("; ")
            };
            out.push(Difference::new(at, "written", what));
            continue;
        };
        matched[position] = true;
        next = position + 1;
        if let Some(data) = &expected.data {
            compare::subset(&format!("{at}: data"), data, Some(&message.data), out);
        }
        if let Some(metadata) = &expected.metadata {
            let actual = Value::Object(message.metadata.clone());
            compare::subset(&format!("{at}: metadata"), metadata, Some(&actual), out);
        }
    }
    if scenario.nothing_else {
        for (message, _) in written.iter().zip(&matched).filter(|(_, m)| !**m) {
            out.push(Difference::new(
                "nothing_else",
                "nothing more written",
                describe(message),
            ));
        }
    }
}

async fn check_views(
    scenario: &Scenario,
    store: &dyn MessageStore,
    written: &[ViewWrite],
    out: &mut Vec<Difference>,
) -> anyhow::Result<()> {
    for (index, expected) in scenario.then_view.iter().enumerate() {
        let at = format!("then_view[{index}] {} {:?}", expected.table, expected.key);
        let row = store.view_get(&expected.table, &expected.key).await?;
        match (expected.deleted, &expected.value, row) {
            (true, _, None) => {}
            (true, _, Some(row)) => out.push(Difference::new(at, "deleted", row.value.to_string())),
            (false, Some(value), row) => {
                let actual = row.map(|row| row.value);
                compare::subset(&format!("{at}: value"), value, actual.as_ref(), out);
            }
            (false, None, row) => {
                if row.is_none() {
                    out.push(Difference::new(at, "a row", "(missing)"));
                }
            }
        }
    }
    if scenario.nothing_else {
        for write in written {
            let expected = scenario
                .then_view
                .iter()
                .any(|row| row.table == write.table && row.key == write.key);
            if !expected {
                out.push(Difference::new(
                    "nothing_else",
                    "no other view row changed",
                    format!(
                        "{} {:?} = {}",
                        write.table,
                        write.key,
                        write
                            .value
                            .as_ref()
                            .map_or("(deleted)".into(), Value::to_string)
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_failure(scenario: &Scenario, reason: Option<&str>, out: &mut Vec<Difference>) {
    match (&scenario.then_failure, reason) {
        (None, None) => {}
        (None, Some(reason)) => out.push(Difference::new("handling", "handled", reason)),
        (Some(expected), None) => {
            out.push(Difference::new(
                "then_failure",
                format!("{:?} failure", expected.kind).to_lowercase(),
                "handled without failing",
            ));
        }
        (Some(expected), Some(reason)) => {
            let kind_holds = match expected.kind {
                FailureKind::Transient => reason.starts_with("transient failure"),
                FailureKind::Permanent => reason.starts_with("permanent failure"),
                FailureKind::Any => true,
            };
            if !kind_holds {
                out.push(Difference::new(
                    "then_failure.kind",
                    format!("{:?}", expected.kind).to_lowercase(),
                    reason,
                ));
            }
            if let Some(pattern) = &expected.matches
                && !reason.contains(pattern.as_str())
            {
                out.push(Difference::new(
                    "then_failure.matches",
                    pattern.clone(),
                    reason,
                ));
            }
        }
    }
}
