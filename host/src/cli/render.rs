//! Readable forms of the host's answers for a terminal: every listing a table with a header
//! line, other answers a sentence; `--json` prints the answer as it came.

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
                    text(&m["type"]),
                    text(&m["id"]),
                    text(&m["stream"]),
                    m["position"],
                    m["globalPosition"]
                );
            } else if let Some(m) = answer.get("duplicate") {
                println!(
                    "already stored: {} (position {}, global {}); nothing written",
                    text(&m["id"]),
                    m["position"],
                    m["globalPosition"]
                );
            }
        }
        "read" => table(
            &[
                "GLOBAL", "STREAM", "POSITION", "TYPE", "ID", "DATA", "METADATA",
            ],
            list(&answer["messages"]).map(|m| {
                vec![
                    m["globalPosition"].to_string(),
                    text(&m["stream"]),
                    m["position"].to_string(),
                    text(&m["type"]),
                    text(&m["id"]),
                    m["data"].to_string(),
                    m["metadata"].to_string(),
                ]
            }),
        ),
        "consumers" => consumers(answer),
        "instances" => instances(answer),
        "parked" => table(
            &[
                "ID", "STREAM", "POSITION", "TYPE", "CONSUMER", "CATEGORY", "ATTEMPTS", "REASON",
            ],
            list(&answer["parked"]).map(|p| {
                let m = &p["message"];
                vec![
                    text(&m["id"]),
                    text(&m["stream"]),
                    m["position"].to_string(),
                    text(&m["type"]),
                    text(&p["consumer"]["name"]),
                    text(&p["consumer"]["category"]),
                    p["attempts"].to_string(),
                    text(&p["reason"]),
                ]
            }),
        ),
        "view" => table(
            &["KEY", "LASTUPDATESEQ", "VALUE"],
            list(&answer["rows"]).map(|r| {
                vec![
                    text(&r["key"]),
                    r["row"]["lastUpdateSeq"].to_string(),
                    r["row"]["value"].to_string(),
                ]
            }),
        ),
        "services" => {
            let now = now_ms();
            table(
                &[
                    "SERVICE",
                    "VERSION",
                    "RUNNING FOR",
                    "HANDLED",
                    "INSTANCE",
                    "COMPONENT",
                ],
                list(&answer["services"]).map(|s| {
                    vec![
                        text(&s["name"]),
                        text(&s["version"]).chars().take(12).collect(),
                        age(now, &s["sinceMs"]),
                        s["handled"].to_string(),
                        s["instance"].as_str().unwrap_or("-").to_owned(),
                        text(&s["path"]),
                    ]
                }),
            );
        }
        "inspect" => {
            println!("service:          {}", text(&answer["name"]));
            println!("version:          {}", text(&answer["version"]));
            println!(
                "handles commands: {}",
                match answer["handlesCommands"].as_bool() {
                    Some(true) => "yes",
                    _ => "no",
                }
            );
            for s in list(&answer["subscriptions"]) {
                match s["originPrefix"].as_str() {
                    Some(prefix) => println!(
                        "subscribes to:    {} (originEntity starting {prefix})",
                        text(&s["category"])
                    ),
                    None => println!("subscribes to:    {}", text(&s["category"])),
                }
            }
            for view in list(&answer["views"]) {
                println!("writes view:      {}", text(view));
            }
        }
        "project" => {
            let from = match answer["snapshotVersion"].as_u64() {
                Some(version) => format!("from the snapshot at version {version}"),
                None => "from the first event".to_owned(),
            };
            println!(
                "{} at version {} (folded {from}):",
                text(&answer["stream"]),
                answer["version"]
            );
            let state = serde_json::to_string_pretty(&answer["state"]);
            println!("{}", state.unwrap_or_else(|_| answer["state"].to_string()));
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

/// A string field as it is, anything else as JSON (`?` when missing).
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "?".to_owned(),
        other => other.to_string(),
    }
}

/// The elements of a JSON array (none for anything else).
fn list(value: &Value) -> impl Iterator<Item = &Value> {
    value.as_array().into_iter().flatten()
}

/// How long ago a time in milliseconds was, as `12.3s` (`-` for none).
fn age(now: u64, ms: &Value) -> String {
    match ms.as_u64() {
        Some(ms) if ms > 0 => format!("{:.1}s", now.saturating_sub(ms) as f64 / 1000.0),
        _ => "-".to_owned(),
    }
}

/// Prints rows under a header, each column as wide as its widest cell; a column of numbers is
/// aligned right, and the last column is not padded (it may be long JSON).
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    let mut numeric = vec![true; columns];
    for row in &rows {
        for (column, cell) in row.iter().enumerate().take(columns) {
            widths[column] = widths[column].max(cell.chars().count());
            numeric[column] &= cell.parse::<f64>().is_ok();
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (column, cell) in cells.iter().enumerate().take(columns) {
            let width = widths[column];
            let last = column + 1 == columns;
            match (last, numeric[column] && !rows.is_empty()) {
                (true, false) => out.push_str(cell),
                (_, true) => out.push_str(&format!("{cell:>width$}")),
                (false, false) => out.push_str(&format!("{cell:<width$}")),
            }
            if !last {
                out.push_str("  ");
            }
        }
        println!("{}", out.trim_end());
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in &rows {
        line(row);
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
            c["categoryHead"].as_u64().unwrap_or(0),
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
    let now = now_ms();
    let rows = list(&answer["consumers"]).flat_map(|c| {
        list(&c["instances"]).map(move |i| {
            let partitions: Vec<u64> = list(&i["partitions"]).filter_map(Value::as_u64).collect();
            vec![
                text(&i["instance"]),
                text(&c["consumer"]["name"]),
                text(&c["consumer"]["category"]),
                partitions.len().to_string(),
                ranges(&partitions),
                age(now, &i["heldSinceMs"]),
                age(now, &i["heartbeatMs"]),
            ]
        })
    });
    table(
        &[
            "INSTANCE",
            "CONSUMER",
            "CATEGORY",
            "COUNT",
            "PARTITIONS",
            "HELD FOR",
            "HEARTBEAT",
        ],
        rows,
    );
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
