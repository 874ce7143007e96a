//! Where a namespace lives: the store URL (seed servers, namespace, replica count), the client
//! connection that fails over between the servers, and the namespace's stream with the number of
//! servers that keep it.
//!
//! `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]`: the client connects to any seed
//! that answers and, when that server goes, reconnects to another (the seeds and every server
//! the cluster announces), for as long as the process runs. `replicas` is how many servers keep
//! the namespace's stream (and with it the consumers, which inherit it): a new namespace is made
//! with it; an existing one of another count is refused, since quietly keeping fewer copies than
//! asked is what a user must never find out about from a lost disk. `NatsStore::set_replicas` (`ferry replicas N`) changes it.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::{self, stream};

use crate::store::StoreError;

/// JetStream keeps at most this many copies of a stream.
const MAX_REPLICAS: usize = 5;

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NatsUrl {
    /// `nats://HOST:PORT` of each seed server.
    pub servers: Vec<String>,
    pub namespace: String,
    /// The replica count the URL asks for; `None` takes the namespace as it is (one copy when
    /// it is new).
    pub replicas: Option<usize>,
}

impl NatsUrl {
    /// The seeds as one address list, for messages.
    pub fn servers_text(&self) -> String {
        self.servers.join(",")
    }
}

pub(super) fn parse_url(url: &str) -> Result<NatsUrl, StoreError> {
    let invalid = |reason: &str| StoreError::Unusable {
        path: url.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = url.strip_prefix("nats://").ok_or_else(|| {
        invalid("expected nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]")
    })?;
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let (addresses, namespace) = match rest.split_once('/') {
        Some((addresses, namespace)) => (addresses, namespace),
        None => (rest, "ferry"),
    };
    let servers = addresses
        .split(',')
        .map(|address| match address.trim() {
            "" => Err(invalid("a server address is empty")),
            address => Ok(format!("nats://{address}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "the namespace may hold 1 to 64 letters, digits, '_' and '-'",
        ));
    }
    let mut replicas = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        match pair.split_once('=') {
            Some(("replicas", count)) => match count.parse::<usize>() {
                Ok(count @ 1..=MAX_REPLICAS) => replicas = Some(count),
                _ => return Err(invalid("replicas is a count from 1 to 5")),
            },
            _ => {
                return Err(invalid(&format!(
                    "unknown option {pair:?}; the URL takes replicas=N"
                )));
            }
        }
    }
    Ok(NatsUrl {
        servers,
        namespace: namespace.to_owned(),
        replicas,
    })
}

/// How often the client pings its server. A server that stalls (paused, partitioned) keeps the
/// TCP connection open; the client only leaves it after three unanswered pings, so with the
/// default minute a stalled server held Ferry for minutes (measured: 89 s of nothing handled
/// after a `SIGSTOP`). A ping a second costs nothing beside the traffic.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a read waits for its answer. A request sent just before its server died, or to one
/// that stalls, is never answered; with the client's default of 10 s a killed leader held
/// every consumer that long after the new leader was elected. A read that times out is simply
/// made again.
pub(super) const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// A client on any of the seeds that answers, reconnecting to any live server for as long as
/// the process runs.
pub(super) async fn connect_client(url: &NatsUrl) -> Result<Client, String> {
    let seeds = url
        .servers
        .iter()
        .map(|server| server.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("a server address does not parse: {e}"))?;
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(PING_EVERY)
        .request_timeout(Some(ANSWER_WITHIN))
        .name("ferry")
        .connect(seeds.as_slice())
        .await
        .map_err(|e| format!("cannot connect: {e}"))
}

/// How long a JetStream API call (opening the stream, a purge) waits for a cluster that is
/// starting or electing a leader.
pub(super) const API_PATIENCE: Duration = Duration::from_secs(30);

/// JetStream error codes that pass once the cluster has settled: the cluster not available yet
/// (10008, "temporarily unavailable"), or too few servers up to place a stream's replicas
/// (10023, insufficient resources; 10005, "no suitable peers for placement, peer offline": a
/// meta leader that already sees every member current can still count one offline for a moment
/// after the cluster formed, which failed CI's benchmark run on its first replicated stream).
pub(super) fn passing_code(code: u64) -> bool {
    matches!(code, 10005 | 10008 | 10023)
}

/// Whether a failure to open the stream passes once the cluster has settled.
fn passing(error: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind as Kind;
    match error.kind() {
        Kind::TimedOut | Kind::JetStreamUnavailable => true,
        Kind::JetStream(e) => passing_code(e.error_code().0),
        _ => false,
    }
}

/// The namespace's stream as Ferry makes it: every message of the namespace under `NS.>`, atomic
/// batches, direct gets and rollups, kept by `replicas` servers.
fn stream_config(namespace: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: namespace.to_owned(),
        subjects: vec![format!("{namespace}.>")],
        storage: stream::StorageType::File,
        allow_atomic_publish: true,
        allow_direct: true,
        allow_rollup: true,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Opens the namespace's stream, making it when it does not exist, and checks that it is one
/// Ferry can use with the replica count the URL asks for.
pub(super) async fn open_stream(
    context: &jetstream::Context,
    url: &NatsUrl,
) -> Result<stream::Stream, String> {
    let ns = &url.namespace;
    let config = stream_config(ns, url.replicas.unwrap_or(1));
    // A cluster that is starting (or electing) answers late or "not available" for a
    // few seconds: wait for it rather than fail a host started beside it.
    let deadline = tokio::time::Instant::now() + API_PATIENCE;
    let mut stream = loop {
        match context.get_or_create_stream(config.clone()).await {
            Ok(stream) => break stream,
            Err(e) if passing(&e) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(
                    "JetStream is not ready for the stream {ns} yet ({e}); trying again"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("cannot open the JetStream stream {ns}: {e}")),
        }
    };
    let info = stream
        .info()
        .await
        .map_err(|e| format!("cannot read the stream {ns}: {e}"))?;
    let config = &info.config;
    if !(config.allow_atomic_publish && config.allow_direct && config.allow_rollup) {
        return Err(format!(
            "the stream {ns} exists without atomic publish, direct get and rollups"
        ));
    }
    if let Some(asked) = url.replicas
        && config.num_replicas.max(1) != asked
    {
        return Err(format!(
            "the namespace {ns} is kept by {} server(s), the URL asks for {asked}; \
             `ferry replicas {asked}` changes it",
            config.num_replicas.max(1)
        ));
    }
    Ok(stream)
}

/// Changes how many servers keep a namespace (its stream, and the consumers that inherit the
/// count); returns the count it had.
pub(super) async fn set_replicas(url: &str, replicas: usize) -> Result<usize, StoreError> {
    let parsed = parse_url(url)?;
    let unusable = |reason: String| StoreError::Unusable {
        path: url.to_owned(),
        reason,
    };
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(unusable("replicas is a count from 1 to 5".into()));
    }
    let client = connect_client(&parsed).await.map_err(unusable)?;
    let context = jetstream::new(client);
    let ns = &parsed.namespace;
    let mut stream = context
        .get_stream(ns)
        .await
        .map_err(|e| unusable(format!("no namespace {ns} to change: {e}")))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| unusable(format!("cannot read the stream {ns}: {e}")))?
        .config
        .clone();
    let before = config.num_replicas.max(1);
    config.num_replicas = replicas;
    context
        .update_stream(config)
        .await
        .map_err(|e| unusable(format!("the servers refused {replicas} replicas: {e}")))?;
    Ok(before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_out_a_cluster_that_is_forming_and_nothing_else() {
        for settling in [10005, 10008, 10023] {
            assert!(
                passing_code(settling),
                "{settling} passes once the cluster settles"
            );
        }
        // Not found, a stream name in use with another config, bad request, wrong last sequence.
        for lasting in [10059, 10058, 10003, 10071] {
            assert!(
                !passing_code(lasting),
                "{lasting} is an answer, not a pause"
            );
        }
    }

    #[test]
    fn parses_the_store_url() {
        let url = |servers: &[&str], ns: &str, replicas| NatsUrl {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            namespace: ns.into(),
            replicas,
        };
        assert_eq!(
            parse_url("nats://127.0.0.1:4222").ok(),
            Some(url(&["nats://127.0.0.1:4222"], "ferry", None))
        );
        assert_eq!(
            parse_url("nats://h:1/test_2").ok(),
            Some(url(&["nats://h:1"], "test_2", None))
        );
        assert_eq!(
            parse_url("nats://a:1,b:2,c:3/clu?replicas=3").ok(),
            Some(url(
                &["nats://a:1", "nats://b:2", "nats://c:3"],
                "clu",
                Some(3)
            ))
        );
        assert_eq!(
            parse_url("nats://a:1?replicas=1").ok(),
            Some(url(&["nats://a:1"], "ferry", Some(1)))
        );
        for bad in [
            "http://h:1",
            "nats://h:1/a.b",
            "nats:///x",
            "nats://a:1,,b:2/x",
            "nats://a:1/x?replicas=0",
            "nats://a:1/x?replicas=6",
            "nats://a:1/x?replicas=three",
            "nats://a:1/x?copies=3",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
