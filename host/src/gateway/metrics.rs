//! `/metrics`: Prometheus text of what this process handled and of every consumer's lag.

use std::collections::BTreeMap;
use std::fmt::Display;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Gateway};
use crate::service;

/// Appends one metric family: its type line, then one sample per (labels, value).
fn family<L: Display, V: Display>(
    text: &mut String,
    name: &str,
    kind: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) {
    text.push_str(&format!("# TYPE {name} {kind}\n"));
    for (labels, value) in samples {
        text.push_str(&format!("{name}{{{labels}}} {value}\n"));
    }
}

/// Prometheus text: per service, messages handled, parked, handling time and events projected in
/// this process; per consumer, position and lag, and parked messages waiting; per instance of
/// a group on a shared store, its partitions, their lag and its heartbeat's age.
pub(super) async fn text(gateway: &Gateway) -> Result<Response, ApiError> {
    let all: BTreeMap<String, service::ServiceMetrics> = service::metrics().into_iter().collect();
    let per_service = |value: fn(&service::ServiceMetrics) -> String| {
        all.iter()
            .map(move |(name, metrics)| (format!("service=\"{name}\""), value(metrics)))
    };
    let mut text = String::new();
    family(
        &mut text,
        "ferry_messages_handled_total",
        "counter",
        per_service(|m| m.handled.to_string()),
    );
    family(
        &mut text,
        "ferry_messages_failed_total",
        "counter",
        per_service(|m| m.parked.to_string()),
    );
    family(
        &mut text,
        "ferry_handling_seconds_total",
        "counter",
        per_service(|m| format!("{:.6}", m.handling_seconds)),
    );
    family(
        &mut text,
        "ferry_projected_events_total",
        "counter",
        per_service(|m| m.projected_events.to_string()),
    );

    let store = &gateway.context.store;
    let consumers = store.consumers(None).await.map_err(anyhow::Error::new)?;
    let per_consumer = |value: fn(&crate::store::ConsumerInfo) -> u64| {
        consumers.iter().map(move |info| {
            let labels = format!(
                "consumer=\"{}\",category=\"{}\"",
                info.consumer.name, info.consumer.category
            );
            (labels, value(info))
        })
    };
    family(
        &mut text,
        "ferry_consumer_lag",
        "gauge",
        per_consumer(|i| i.lag),
    );
    family(
        &mut text,
        "ferry_consumer_position",
        "gauge",
        per_consumer(|i| i.position),
    );
    // Per instance of a shared group: the partitions it holds, their lag, and how long since
    // it renewed (by its clock against this one's).
    let now = crate::store::now_ms();
    let per_instance =
        |value: &dyn Fn(&crate::store::ConsumerInfo, &crate::store::InstanceInfo) -> String| {
            consumers
                .iter()
                .flat_map(|info| info.instances.iter().map(move |instance| (info, instance)))
                .map(|(info, instance)| {
                    let labels = format!(
                        "consumer=\"{}\",category=\"{}\",instance=\"{}\"",
                        info.consumer.name, info.consumer.category, instance.instance
                    );
                    (labels, value(info, instance))
                })
                .collect::<Vec<_>>()
        };
    family(
        &mut text,
        "ferry_instance_partitions",
        "gauge",
        per_instance(&|_, instance| instance.partitions.len().to_string()),
    );
    family(
        &mut text,
        "ferry_instance_lag",
        "gauge",
        per_instance(&|info, instance| {
            let lag: u64 = info
                .partitions
                .iter()
                .filter(|p| instance.partitions.contains(&p.partition))
                .map(|p| p.lag)
                .sum();
            lag.to_string()
        }),
    );
    family(
        &mut text,
        "ferry_instance_heartbeat_age_seconds",
        "gauge",
        per_instance(&|_, instance| {
            format!(
                "{:.3}",
                now.saturating_sub(instance.heartbeat_ms) as f64 / 1000.0
            )
        }),
    );

    let mut parked: BTreeMap<String, u64> = BTreeMap::new();
    for message in store.parked(None).await.map_err(anyhow::Error::new)? {
        *parked.entry(message.consumer.to_string()).or_default() += 1;
    }
    family(
        &mut text,
        "ferry_parked_messages",
        "gauge",
        parked
            .into_iter()
            .map(|(consumer, count)| (format!("consumer=\"{consumer}\""), count)),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
