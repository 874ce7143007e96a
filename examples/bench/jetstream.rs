//! Rows 1 and 2 on JetStream, for one server and for a namespace kept by three servers of a
//! cluster, and the cluster's failover gap: how long commits stand still after `SIGKILL` of the
//! stream's leader.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;

use ferry::service::RunnerConfig;
use ferry::store::{Commit, MessageStore as _, NatsStore, NewMessage, StreamName};

use super::cluster::NatsCluster;
use super::{
    Backend, Handler, Latencies, NAMESPACES, Table, end_to_end_latency, end_to_end_throughput,
    median,
};

/// Where the JetStream rows run: a server or a cluster's seeds, and the replicas of each stream.
#[derive(Clone)]
pub(super) struct JetStream {
    /// `nats://HOST:PORT[,HOST:PORT...]`
    pub servers: String,
    pub replicas: usize,
}

/// Row 1 on JetStream: durable publishes, each awaiting its acknowledgement.
async fn raw_jetstream_publishes(on: &JetStream, count: usize) -> anyhow::Result<f64> {
    let (context, subject) = raw_stream(on).await?;
    let payload = bytes::Bytes::from(vec![b'x'; 400]);
    let start = Instant::now();
    for _ in 0..count {
        context
            .publish(subject.clone(), payload.clone())
            .await?
            .await?;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Row 1 on JetStream: publish, consume and acknowledge (confirmed by the server), in a loop.
async fn raw_jetstream_loop(on: &JetStream, count: usize) -> anyhow::Result<f64> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let (context, subject) = raw_stream(on).await?;
    let stream = context.get_stream(subject.replace(".x", "")).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let payload = bytes::Bytes::from(vec![b'x'; 400]);
    let start = Instant::now();
    for _ in 0..count {
        context
            .publish(subject.clone(), payload.clone())
            .await?
            .await?;
        let message = messages.next().await.context("a delivery")??;
        message
            .double_ack()
            .await
            .map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// A fresh JetStream stream on file storage; its one subject.
async fn raw_stream(on: &JetStream) -> anyhow::Result<(async_nats::jetstream::Context, String)> {
    let name = format!("raw{}", NAMESPACES.fetch_add(1, Ordering::Relaxed));
    let seeds = on
        .servers
        .trim_start_matches("nats://")
        .split(',')
        .map(|seed| format!("nats://{seed}").parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let context = async_nats::jetstream::new(async_nats::connect(seeds.as_slice()).await?);
    context
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.x")],
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: on.replicas,
            ..Default::default()
        })
        .await?;
    Ok((context, format!("{name}.x")))
}

/// Rows 1 and 2 on one JetStream set-up: raw publishes, the publish-consume-ack loop, Ferry end
/// to end, and its latency at half that load.
pub(super) async fn jetstream_rows(
    table: &mut Table,
    on: &JetStream,
    label: &str,
    rounds: usize,
    appends: usize,
    commands: usize,
) -> anyhow::Result<()> {
    let mut publishes = Vec::new();
    let mut loops = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..rounds {
        publishes.push(raw_jetstream_publishes(on, appends).await?);
        loops.push(raw_jetstream_loop(on, appends).await?);
        rates.push(
            end_to_end_throughput(
                &Backend::Nats(on.clone()),
                commands,
                RunnerConfig::default(),
                Handler::Wasm,
            )
            .await?,
        );
    }
    let publish = median(publishes);
    table.row(
        &format!("1. {label} durable publishes/s (await each ack)"),
        format!("{publish:.0}"),
        "the store's limit; sync_interval: always".into(),
    );
    table.row(
        &format!("1. {label} publish + consume + ack loop/s"),
        format!("{:.0}", median(loops)),
        "double_ack: the ack confirmed".into(),
    );
    let rate = median(rates);
    table.row(
        &format!("2. end-to-end durable commands/s on {label} (32 writers)"),
        format!("{rate:.0}"),
        format!(
            "{:.0}% of the publish row above; a command is a publish and an atomic batch",
            rate / publish * 100.0
        ),
    );
    let mut latencies = Latencies::default();
    for _ in 0..rounds {
        latencies.add(
            end_to_end_latency(
                &Backend::Nats(on.clone()),
                RunnerConfig::default(),
                rate * 0.5,
                commands / 2,
            )
            .await?,
        );
    }
    latencies.row(
        table,
        &format!(
            "2. latency command stored → outcome stored on {label}, half load ({:.0}/s)",
            rate * 0.5
        ),
        "",
    );
    Ok(())
}

/// The failover gap: one writer commits in a loop on a 3-replica namespace while the stream's
/// leader is killed; the row is the longest time between two acknowledged commits around the
/// kill (the election, and the writer's reconnect and retries).
pub(super) async fn failover_row(
    table: &mut Table,
    cluster: &mut NatsCluster,
    on: &JetStream,
    quick: bool,
) -> anyhow::Result<()> {
    let mut gaps = Vec::new();
    for round in 0..if quick { 1 } else { 3 } {
        let namespace = format!("failover{round}");
        let url = format!("{}/{namespace}?replicas={}", on.servers, on.replicas);
        let store = NatsStore::connect(&url).await?;
        cluster.wait_until_replicated(&namespace);
        let stream = StreamName::parse("counter.failover").context("stream")?;
        let mut n = 0u64;
        let mut commit = async || -> bool {
            n += 1;
            let message = NewMessage {
                id: format!("f{round}-{n}"),
                message_type: "Incremented".into(),
                data: serde_json::json!({ "n": n }),
                metadata: Default::default(),
                not_before_ms: None,
            };
            store
                .commit(Commit::append(stream.clone(), None, vec![message]))
                .await
                .is_ok()
        };
        for _ in 0..50 {
            commit().await;
        }
        let leader = cluster.leader(&namespace);
        let killed = Instant::now();
        cluster.servers[leader].kill();
        let mut last_ok = killed;
        let mut longest = Duration::ZERO;
        let mut after = 0;
        while after < 50 && killed.elapsed() < Duration::from_secs(60) {
            if commit().await {
                longest = longest.max(last_ok.elapsed());
                last_ok = Instant::now();
                after += 1;
            }
        }
        anyhow::ensure!(after == 50, "commits did not resume within a minute");
        gaps.push(longest.as_secs_f64());
        cluster.servers[leader].start_again();
        cluster.wait_until_replicated(&namespace);
    }
    table.row(
        "2. failover on the 3-replica cluster: SIGKILL of the stream leader → the next acknowledged commit",
        format!("{:.2} s", median(gaps)),
        "3 servers, 3 replicas; the servers' election, then the writer's retry".into(),
    );
    Ok(())
}
