//! The history of a JetStream namespace's leases and partition positions, watched live while a
//! test runs (the records are rolled up, so only a watcher sees every change), and the fence's
//! invariants checked on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde_json::Value;

/// One lease or position record as the stream stored it.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    /// `lease` or `pos`.
    pub kind: String,
    /// The consumer's subject part and the partition.
    pub consumer: String,
    pub partition: u32,
    pub value: Value,
}

pub struct LeaseHistory {
    records: Arc<Mutex<Vec<Record>>>,
    /// Runs the watcher; it ends with the history.
    _runtime: tokio::runtime::Runtime,
}

impl LeaseHistory {
    /// Starts watching namespace `ns` (its stream must exist) on the server at `url`.
    pub fn watch(url: &str, ns: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let records = Arc::new(Mutex::new(Vec::new()));
        let ready = runtime.block_on(async {
            let client = async_nats::connect(url).await.expect("connect");
            let stream = async_nats::jetstream::new(client)
                .get_stream(ns)
                .await
                .expect("the namespace's stream");
            let config = async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subjects: vec![format!("{ns}.lease.>"), format!("{ns}.pos.>")],
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            };
            stream.create_consumer(config).await.expect("watcher")
        });
        let sink = records.clone();
        let prefix = format!("{ns}.");
        runtime.spawn(async move {
            let mut messages = ready.messages().await.expect("messages");
            while let Some(Ok(message)) = messages.next().await {
                let Ok(info) = message.info() else { continue };
                let seq = info.stream_sequence;
                let Some(rest) = message.subject.as_str().strip_prefix(&prefix) else {
                    continue;
                };
                let Some((kind, rest)) = rest.split_once('.') else {
                    continue;
                };
                let Some((consumer, partition)) = rest.rsplit_once('.') else {
                    continue;
                };
                let (Ok(partition), Ok(value)) = (
                    partition.parse(),
                    serde_json::from_slice::<Value>(&message.payload),
                ) else {
                    continue;
                };
                if let Ok(mut records) = sink.lock() {
                    records.push(Record {
                        seq,
                        kind: kind.to_owned(),
                        consumer: consumer.to_owned(),
                        partition,
                        value,
                    });
                }
            }
        });
        Self {
            records,
            _runtime: runtime,
        }
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The fence held: per partition, in stream order, lease epochs never go back and a lease
    /// never passes to another owner without a new epoch (so no two instances held it at once),
    /// and position records' epochs never go back (no commit decided under an old lease landed
    /// after a take-over). Returns how many take-overs (owner changes) there were.
    pub fn assert_fenced(&self) -> usize {
        // Let the watcher catch up with what was just written.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut lease: BTreeMap<(String, u32), (u64, Option<String>)> = BTreeMap::new();
        let mut position: BTreeMap<(String, u32), u64> = BTreeMap::new();
        let mut takeovers = 0;
        for record in self.records() {
            let key = (record.consumer.clone(), record.partition);
            let epoch = record.value["epoch"].as_u64().expect("an epoch");
            match record.kind.as_str() {
                "lease" => {
                    let owner = record.value["owner"].as_str().map(str::to_owned);
                    if let Some((last_epoch, last_owner)) = lease.get(&key) {
                        assert!(epoch >= *last_epoch, "lease epoch went back: {record:?}");
                        if owner.is_some() && owner != *last_owner {
                            assert!(
                                epoch > *last_epoch,
                                "partition passed to another owner under the same epoch: {record:?}"
                            );
                            takeovers += 1;
                        }
                    }
                    lease.insert(key, (epoch, owner));
                }
                _ => {
                    let last = position.entry(key).or_insert(epoch);
                    assert!(
                        epoch >= *last,
                        "a commit under an old lease landed after a take-over: {record:?}"
                    );
                    *last = epoch;
                }
            }
        }
        takeovers
    }
}
