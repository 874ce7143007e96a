//! Readable forms of the host's answers for a terminal; `--json` prints the answer as it came.

use serde_json::Value;

use crate::store::now_ms;

/// Prints an answer: JSON as it came with `--json`, else a readable form of its kind.
pub(super) fn print(json: bool, kind: &str, answer: &Value) {
    if json {
        println!("{answer}");
        return;
    }
    match kind {
        "send" => {
            if let Some(m) = answer.get("written") {
                println!(
                    "appended {} {} to {} at position {} (global {})",
                    m["type"].as_str().unwrap_or("?"),
                    m["id"].as_str().unwrap_or("?"),
                    m["stream"].as_str().unwrap_or("?"),
                    m["position"],
                    m["global_position"]
                );
            } else if let Some(m) = answer.get("duplicate") {
                println!(
                    "already stored: {} (position {}, global {}); nothing written",
                    m["id"].as_str().unwrap_or("?"),
                    m["position"],
                    m["global_position"]
                );
            }
        }
        "read" => {
            for m in answer["messages"].as_array().into_iter().flatten() {
                println!(
                    "{:>8}  {}@{}  {}  {}  {}",
                    m["global_position"].as_u64().unwrap_or(0),
                    m["stream"].as_str().unwrap_or("?"),
                    m["position"],
                    m["type"].as_str().unwrap_or("?"),
                    m["data"],
                    m["metadata"]
                );
            }
        }
        "consumers" => consumers(answer),
        "instances" => instances(answer),
        "parked" => {
            for p in answer["parked"].as_array().into_iter().flatten() {
                let m = &p["message"];
                println!(
                    "{}  {}@{}  {}  by {} on {}  after {} attempt(s): {}",
                    m["id"].as_str().unwrap_or("?"),
                    m["stream"].as_str().unwrap_or("?"),
                    m["position"],
                    m["type"].as_str().unwrap_or("?"),
                    p["consumer"]["name"].as_str().unwrap_or("?"),
                    p["consumer"]["category"].as_str().unwrap_or("?"),
                    p["attempts"],
                    p["reason"].as_str().unwrap_or("?")
                );
            }
        }
        "view" => {
            for r in answer["rows"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  (lastUpdateSeq {})",
                    r["key"].as_str().unwrap_or("?"),
                    r["row"]["value"],
                    r["row"]["lastUpdateSeq"]
                );
            }
        }
        "replay" => println!("replayed {} message(s)", answer["replayed"]),
        "replicas" => println!(
            "the namespace was kept by {} server(s), now by {}; the servers copy it to new \
             replicas in the background",
            answer["before"], answer["replicas"]
        ),
        _ => match serde_json::to_string_pretty(answer) {
            Ok(text) => println!("{text}"),
            Err(_) => println!("{answer}"),
        },
    }
}

/// Each consumer's line, then its partitions: one line for the lot when they stand level with no
/// owner (one process owns the store), else one line per partition.
fn consumers(answer: &Value) {
    println!(
        "{:<32} {:<24} {:>10} {:>10} {:>8} {:>8}",
        "CONSUMER", "CATEGORY", "POSITION", "HEAD", "LAG", "DEFERRED"
    );
    for c in answer["consumers"].as_array().into_iter().flatten() {
        println!(
            "{:<32} {:<24} {:>10} {:>10} {:>8} {:>8}",
            c["consumer"]["name"].as_str().unwrap_or("?"),
            c["consumer"]["category"].as_str().unwrap_or("?"),
            c["position"].as_u64().unwrap_or(0),
            c["category_head"].as_u64().unwrap_or(0),
            c["lag"].as_u64().unwrap_or(0),
            c["deferred"].as_u64().unwrap_or(0)
        );
        let partitions: Vec<&Value> = c["partitions"].as_array().into_iter().flatten().collect();
        let Some(first) = partitions.first() else {
            continue;
        };
        let level = partitions
            .iter()
            .all(|p| p["position"] == first["position"] && p["owner"].is_null());
        if level {
            println!(
                "  {} partitions, all at {}",
                partitions.len(),
                first["position"]
            );
            continue;
        }
        println!(
            "  {:>9} {:>10} {:>6} {:>8}  OWNER",
            "PARTITION", "POSITION", "EPOCH", "LAG"
        );
        for p in partitions {
            println!(
                "  {:>9} {:>10} {:>6} {:>8}  {}",
                p["partition"].as_u64().unwrap_or(0),
                p["position"].as_u64().unwrap_or(0),
                p["epoch"].as_u64().unwrap_or(0),
                p["lag"].as_u64().unwrap_or(0),
                p["owner"].as_str().unwrap_or("-")
            );
        }
    }
}

/// The live instances of every consumer group, with the partitions each holds.
fn instances(answer: &Value) {
    println!(
        "{:<32} {:<32} {:<20} {:>5}  {:<24} {:>9} {:>9}",
        "INSTANCE", "CONSUMER", "CATEGORY", "COUNT", "PARTITIONS", "HELD FOR", "HEARTBEAT"
    );
    let now = now_ms();
    let age = |ms: &Value| match ms.as_u64() {
        Some(ms) if ms > 0 => format!("{:.1}s", now.saturating_sub(ms) as f64 / 1000.0),
        _ => "-".to_owned(),
    };
    for c in answer["consumers"].as_array().into_iter().flatten() {
        for i in c["instances"].as_array().into_iter().flatten() {
            let partitions: Vec<u64> = i["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            println!(
                "{:<32} {:<32} {:<20} {:>5}  {:<24} {:>9} {:>9}",
                i["instance"].as_str().unwrap_or("?"),
                c["consumer"]["name"].as_str().unwrap_or("?"),
                c["consumer"]["category"].as_str().unwrap_or("?"),
                partitions.len(),
                ranges(&partitions),
                age(&i["held_since_ms"]),
                age(&i["heartbeat_ms"])
            );
        }
    }
}

/// `0-3,7,9-10` for sorted numbers.
fn ranges(numbers: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for &n in numbers {
        run = match run {
            Some((start, end)) if n == end + 1 => Some((start, n)),
            Some(done) => {
                parts.push(range(done));
                Some((n, n))
            }
            None => Some((n, n)),
        };
    }
    parts.extend(run.map(range));
    parts.join(",")
}

fn range((start, end): (u64, u64)) -> String {
    match start == end {
        true => start.to_string(),
        false => format!("{start}-{end}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ranges_are_compact() {
        assert_eq!(super::ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(super::ranges(&[]), "");
        assert_eq!(super::ranges(&[5]), "5");
    }
}
