//! Unit tests of deciding a page: the split by entity, lanes meeting, and a page decided on top
//! of what the page in flight writes.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::*;
use crate::service::decide::stored_as_carried;
use crate::store::{Commit, Committed, Message, MessageStore, NewMessage, StreamName};
use crate::wasm::{GuestError, GuestHost, Outcome, ServiceComponent};

fn command(entity: &str, n: u64) -> Message {
    Message {
        id: format!("{entity}-{n}"),
        stream: StreamName::parse(&format!("counter:command.{entity}")).expect("stream"),
        message_type: "Increment".into(),
        data: Value::Null,
        metadata: Map::new(),
        position: n,
        global_position: n,
        time_ms: 0,
        not_before_ms: None,
    }
}

fn streams(names: &[&str]) -> Vec<StreamName> {
    names
        .iter()
        .map(|s| StreamName::parse(s).expect("stream"))
        .collect()
}

fn totals_rows(keys: &[&str]) -> HashSet<(String, String)> {
    keys.iter()
        .map(|key| ("totals".to_owned(), (*key).to_owned()))
        .collect()
}

/// A lane that projected `projected`, wrote to the streams `wrote` and the `totals` rows `rows`,
/// and read through the host the streams `read` and the `totals` rows `read_rows`.
fn lane(
    projected: &[&str],
    wrote: &[&str],
    rows: &[&str],
    (read, read_rows): (&[&str], &[&str]),
) -> LaneDecision {
    let mut decision = BatchDecision::default();
    for stream in streams(wrote) {
        decision.writes.pending.insert(stream, (0, Vec::new()));
    }
    LaneDecision {
        streams: streams(projected)
            .into_iter()
            .chain(streams(wrote))
            .collect(),
        views: totals_rows(rows),
        host_reads: HostReads {
            streams: streams(read).into_iter().collect(),
            views: totals_rows(read_rows),
        },
        decision,
    }
}

#[test]
fn splits_a_page_by_entity_keeping_each_entitys_order() {
    let page: Vec<Message> = (0..60)
        .map(|n| command(&format!("e{}", n % 6), n))
        .collect();
    let lanes: Vec<Vec<&Message>> = split_by_entity("counter", &page, 2)
        .into_iter()
        .map(|lane| lane.into_iter().map(|i| &page[i]).collect())
        .collect();
    assert_eq!(lanes.len(), 2, "six entities spread over two lanes");
    assert_eq!(lanes.iter().map(Vec::len).sum::<usize>(), 60);
    for (i, lane) in lanes.iter().enumerate() {
        assert!(
            lane.windows(2)
                .all(|pair| pair[0].global_position < pair[1].global_position),
            "page order within a lane"
        );
        for other in &lanes[i + 1..] {
            assert!(
                lane.iter()
                    .all(|m| other.iter().all(|o| o.stream != m.stream)),
                "an entity lives in one lane"
            );
        }
    }
}

#[test]
fn one_entity_or_one_lane_is_not_split() {
    let page: Vec<Message> = (0..10).map(|n| command("only", n)).collect();
    assert!(split_by_entity("counter", &page, 4).is_empty());
    let page: Vec<Message> = (0..10).map(|n| command(&format!("e{n}"), n)).collect();
    assert!(split_by_entity("counter", &page, 1).is_empty());
}

const NO_READS: (&[&str], &[&str]) = (&[], &[]);

#[test]
fn lanes_meet_on_shared_streams_or_shared_view_rows() {
    let apart = [
        lane(&["counter.a"], &[], &["a"], NO_READS),
        lane(&["counter.b"], &[], &["b"], NO_READS),
    ];
    assert!(lanes_apart(&apart));
    let stream = [
        lane(&["counter.a", "counter.shared"], &[], &[], NO_READS),
        lane(&["counter.b", "counter.shared"], &[], &[], NO_READS),
    ];
    assert!(!lanes_apart(&stream), "two lanes touched one stream");
    let view = [
        lane(&["counter.a"], &[], &["x"], NO_READS),
        lane(&["counter.b"], &[], &["x"], NO_READS),
    ];
    assert!(!lanes_apart(&view), "two lanes wrote one view row");
}

#[test]
fn lanes_meet_only_when_a_host_read_saw_another_lanes_write() {
    // Each registration reads and writes its own claim, and peeks at rows nobody writes.
    let own_claims = [
        lane(
            &["user.a"],
            &["claim.a"],
            &[],
            (&["claim.a", "other.z"], &["z"]),
        ),
        lane(
            &["user.b"],
            &["claim.b"],
            &[],
            (&["claim.b", "other.z"], &["z"]),
        ),
    ];
    assert!(
        lanes_apart(&own_claims),
        "reads of what no other lane wrote"
    );
    let same_claim = [
        lane(&["user.a"], &["claim.x"], &[], (&["claim.x"], &[])),
        lane(&["user.b"], &[], &[], (&["claim.x"], &[])),
    ];
    assert!(!lanes_apart(&same_claim), "a read of another lane's stream");
    let row = [
        lane(&["counter.a"], &[], &["x"], NO_READS),
        lane(&["counter.b"], &[], &[], (&[], &["x"])),
    ];
    assert!(!lanes_apart(&row), "a read of another lane's view row");
}

/// A counter whose commands may also peek at the `totals` view through the host.
struct PeekingCounter;

fn total_of(state: Option<&str>) -> i64 {
    state
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .and_then(|state| state["total"].as_i64())
        .unwrap_or(0)
}

impl crate::wasm::NativeService for PeekingCounter {
    fn manifest(&self) -> crate::wasm::Manifest {
        crate::wasm::Manifest {
            name: "counter".into(),
            handles_commands: true,
            subscriptions: Vec::new(),
            views: vec!["totals".into()],
        }
    }

    fn project(
        &self,
        _: &mut dyn GuestHost,
        state: Option<&str>,
        event: &Message,
    ) -> Result<String, GuestError> {
        let by = event.data["by"].as_i64().unwrap_or(0);
        Ok(serde_json::json!({ "total": total_of(state) + by }).to_string())
    }

    fn handle_command(
        &self,
        host: &mut dyn GuestHost,
        command: &Message,
        state: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        let entity = command.stream.id();
        // `peek: true` reads the entity's own row, `peek: "b"` another entity's.
        let peeked = match &command.data["peek"] {
            Value::Bool(true) => Some(entity),
            Value::String(other) => Some(other.as_str()),
            _ => None,
        };
        let seen = match peeked {
            Some(key) => host
                .view_get("totals", key)
                .map_err(GuestError::Transient)?,
            None => None,
        };
        let by = command.data["by"].as_i64().unwrap_or(1);
        let total = total_of(state) + by;
        Ok(Outcome {
            messages: vec![crate::wasm::Outgoing {
                stream: format!("counter.{entity}"),
                message_type: "Incremented".into(),
                data: serde_json::json!({ "by": by, "total": total, "seen": seen }).to_string(),
                metadata: None,
                not_before_ms: None,
            }],
            views: vec![crate::wasm::ViewChange {
                table: "totals".into(),
                key: entity.into(),
                value: Some(serde_json::json!({ "total": total }).to_string()),
            }],
        })
    }

    fn handle_event(
        &self,
        _: &mut dyn GuestHost,
        _: &Message,
        _: Option<&str>,
    ) -> Result<Outcome, GuestError> {
        Ok(Outcome::default())
    }
}

fn increment(entity: &str, n: u64, data: Value) -> Message {
    Message {
        data,
        ..command(entity, n)
    }
}

fn outcome_data(decision: &BatchDecision) -> Vec<Value> {
    decision
        .items
        .iter()
        .filter_map(|item| match item {
            BatchItem::Decided(checked) => Some(checked.messages[0].1.data.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decides_a_page_on_top_of_what_the_page_in_flight_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn MessageStore> =
        Arc::new(crate::store::SledStore::open(dir.path()).expect("store"));
    let counter_a = StreamName::parse("counter.a").expect("stream");
    // Stored: a at total 1 (version 1).
    store
        .commit(Commit::append(
            counter_a.clone(),
            Some(0),
            vec![NewMessage {
                id: "stored-1".into(),
                message_type: "Incremented".into(),
                data: serde_json::json!({ "by": 1 }),
                metadata: Map::new(),
                not_before_ms: None,
            }],
        ))
        .await
        .expect("stored event");
    // In flight, not stored yet: a second event (total 3) and its view row.
    let mut carry = Overlay::default();
    carry.pending.insert(
        counter_a.clone(),
        (
            1,
            vec![Message {
                id: "carried-2".into(),
                stream: counter_a.clone(),
                message_type: "Incremented".into(),
                data: serde_json::json!({ "by": 2 }),
                metadata: Map::new(),
                position: 1,
                global_position: 0,
                time_ms: 0,
                not_before_ms: None,
            }],
        ),
    );
    carry.views.insert(
        ("totals".into(), "a".into()),
        Some(serde_json::json!({ "total": 3 })),
    );
    let component = Arc::new(ServiceComponent::native(Arc::new(PeekingCounter)));
    let projections = Arc::new(ProjectionCache::default());
    let decider = Decider {
        component,
        projections: projections.clone(),
        store: store.clone(),
        mail: false,
        effects: false,
        reuse_instances: false,
    };
    let decide = |messages: Vec<Message>, lanes: usize| {
        decide_batch(
            decider.clone(),
            messages.into(),
            Some(Arc::new(carry.clone())),
            lanes,
        )
    };

    let peeking = increment("a", 10, serde_json::json!({ "by": 1, "peek": true }));
    let Ok(decision) = decide(vec![peeking], 1).await else {
        panic!("the page was declined");
    };
    assert_eq!(
        outcome_data(&decision),
        [serde_json::json!({ "by": 1, "total": 4, "seen": r#"{"total":3}"# })],
        "the handler saw the carried event and view row"
    );
    assert_eq!(
        decision.expected.get(&counter_a),
        Some(&2),
        "it expects the version after the page in flight"
    );
    let (base, own) = decision.writes.pending.get(&counter_a).expect("writes a");
    assert_eq!(
        (*base, own.len()),
        (2, 1),
        "it carries on only its own event"
    );
    assert_eq!(
        projections.get(&counter_a),
        (Some(r#"{"total":1}"#.to_owned()), 1),
        "only what is stored is cached"
    );
    let carried = Committed {
        written: vec![Message {
            global_position: 7,
            ..carry.pending[&counter_a].1[0].clone()
        }],
        duplicates: Vec::new(),
    };
    assert!(stored_as_carried(&carry, &carried));
    let moved = Committed {
        written: vec![Message {
            position: 2,
            ..carried.written[0].clone()
        }],
        duplicates: Vec::new(),
    };
    assert!(
        !stored_as_carried(&carry, &moved),
        "stored past where the next page expected it"
    );

    // Two entities on two lanes share the carry without meeting.
    let page = vec![
        increment("a", 10, serde_json::json!({ "by": 1 })),
        increment("b", 11, serde_json::json!({ "by": 5 })),
    ];
    assert_eq!(
        split_by_entity("counter", &page, 2).len(),
        2,
        "a and b on two lanes"
    );
    let Ok(decision) = decide(page, 2).await else {
        panic!("the page was declined");
    };
    assert!(!decision.lanes_met, "the carry is not a meeting point");
    let mut totals: Vec<i64> = outcome_data(&decision)
        .iter()
        .filter_map(|data| data["total"].as_i64())
        .collect();
    totals.sort();
    assert_eq!(totals, [4, 5], "a on top of the carry, b alone");

    // A peek at a row only its own lane writes keeps the lanes apart; a peek at the row the
    // other lane writes makes them meet, and the page is decided again on one thread.
    let own_row = vec![
        increment("a", 10, serde_json::json!({ "by": 1, "peek": true })),
        increment("b", 11, serde_json::json!({ "by": 5 })),
    ];
    let Ok(decision) = decide(own_row, 2).await else {
        panic!("the page was declined");
    };
    assert!(!decision.lanes_met, "a's read saw nothing b's lane wrote");
    let other_row = vec![
        increment("b", 10, serde_json::json!({ "by": 5 })),
        increment("a", 11, serde_json::json!({ "by": 1, "peek": "b" })),
    ];
    let Ok(decision) = decide(other_row, 2).await else {
        panic!("the page was declined");
    };
    assert!(decision.lanes_met, "a read the row b's lane wrote");
    assert_eq!(
        outcome_data(&decision)[1]["seen"],
        serde_json::json!(r#"{"total":5}"#),
        "decided in page order, a saw b's row"
    );
}
