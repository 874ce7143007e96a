//! `/metrics`: Prometheus text of what this process handled and of every consumer's lag.

use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ApiError, Gateway};
use crate::service;

/// Prometheus text: per service, messages handled, parked, handling time and events projected in
/// this process;
/// per consumer, position and lag, and parked messages waiting.
pub(super) async fn text(gateway: &Gateway) -> Result<Response, ApiError> {
    let mut text = String::new();
    text.push_str("# TYPE ferry_messages_handled_total counter\n");
    let all = service::metrics();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for name in &names {
        text.push_str(&format!(
            "ferry_messages_handled_total{{service=\"{name}\"}} {}\n",
            all[*name].handled
        ));
    }
    text.push_str("# TYPE ferry_messages_failed_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_messages_failed_total{{service=\"{name}\"}} {}\n",
            all[*name].parked
        ));
    }
    text.push_str("# TYPE ferry_handling_seconds_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_handling_seconds_total{{service=\"{name}\"}} {:.6}\n",
            all[*name].handling_seconds
        ));
    }
    text.push_str("# TYPE ferry_projected_events_total counter\n");
    for name in &names {
        text.push_str(&format!(
            "ferry_projected_events_total{{service=\"{name}\"}} {}\n",
            all[*name].projected_events
        ));
    }
    let store = &gateway.context.store;
    let consumers = store.consumers(None).await.map_err(anyhow::Error::new)?;
    text.push_str("# TYPE ferry_consumer_lag gauge\n");
    for info in &consumers {
        text.push_str(&format!(
            "ferry_consumer_lag{{consumer=\"{}\",category=\"{}\"}} {}\n",
            info.consumer.name, info.consumer.category, info.lag
        ));
    }
    text.push_str("# TYPE ferry_consumer_position gauge\n");
    for info in &consumers {
        text.push_str(&format!(
            "ferry_consumer_position{{consumer=\"{}\",category=\"{}\"}} {}\n",
            info.consumer.name, info.consumer.category, info.position
        ));
    }
    let parked = store.parked(None).await.map_err(anyhow::Error::new)?;
    text.push_str("# TYPE ferry_parked_messages gauge\n");
    let mut per_consumer: std::collections::BTreeMap<String, u64> = Default::default();
    for message in &parked {
        *per_consumer
            .entry(message.consumer.to_string())
            .or_default() += 1;
    }
    for (consumer, count) in per_consumer {
        text.push_str(&format!(
            "ferry_parked_messages{{consumer=\"{consumer}\"}} {count}\n"
        ));
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}
