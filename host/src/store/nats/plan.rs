//! What a group's batch holds while it is planned: the entries it will publish (`Plan`), the
//! group's view of the server as its commits are staged (`Staged`), one commit's part
//! (`PlannedCommit`, `Op`), and the server's answer to a batch.

use super::*;

/// What a batch will publish.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) outgoing: Vec<Outgoing>,
    /// Key-value subjects already in the batch: a later change replaces the earlier one.
    pub(super) keyed: HashMap<String, usize>,
}

/// A group's view of the server: the last entry of each subject its commits read, changed by
/// the commits planned into its batch so far.
#[derive(Default)]
pub(super) struct Staged {
    pub(super) fetched: HashMap<String, Option<Entry>>,
    /// The stream holding each stored claim among `fetched`.
    pub(super) claim_streams: HashMap<String, String>,
    /// Claims the batch makes, with their streams.
    pub(super) claimed: HashMap<String, String>,
    /// Next version and batch index of the latest planned message, per message subject.
    pub(super) streams: HashMap<String, (u64, usize)>,
    /// Key-value subjects set by the batch: positions, deferred entries, view rows.
    pub(super) values: HashMap<String, Vec<u8>>,
    pub(super) plan: Plan,
}

impl Staged {
    /// The stream that holds a claimed id, in the batch or stored; `None` while it is free.
    pub(super) fn claim_holder(&self, claim: &str) -> Option<&str> {
        match self.claimed.get(claim) {
            Some(stream) => Some(stream),
            None => self.claim_streams.get(claim).map(String::as_str),
        }
    }

    /// A key-value subject's current entry: the batch's value (with the stored sequence, which
    /// only the batch's first change of it expects), or the stored one.
    pub(super) fn current(&self, subject: &str) -> Option<Entry> {
        let stored = self.fetched.get(subject).and_then(Option::as_ref);
        match self.values.get(subject) {
            Some(payload) => Some(Entry {
                seq: stored.map_or(0, |e| e.seq),
                subject: subject.to_owned(),
                payload: payload.clone().into(),
                erases: None,
            }),
            None => stored.cloned(),
        }
    }

    /// Adds a planned commit to the batch; returns the batch index, stream and content of each
    /// message it writes.
    pub(super) fn apply(&mut self, ops: Vec<Op>) -> Vec<(usize, StreamName, Stored)> {
        let mut written = Vec::new();
        for op in ops {
            match op {
                Op::Claim { subject, stream } => {
                    self.plan.claim(subject.clone(), stream.as_bytes().to_vec());
                    self.claimed.insert(subject, stream);
                }
                Op::Message {
                    subject,
                    payload,
                    expect,
                    stream,
                    stored,
                } => {
                    let index = self.plan.append(&subject, payload, expect);
                    self.streams.insert(subject, (stored.position + 1, index));
                    written.push((index, stream, stored));
                }
                Op::Put {
                    subject,
                    payload,
                    expect,
                    rollup,
                    erases,
                } => {
                    self.plan
                        .set(&subject, payload.clone(), expect, rollup, erases);
                    self.values.insert(subject, payload);
                }
                Op::Check {
                    carrier,
                    subject,
                    expect,
                } => self.plan.check(carrier, subject, expect),
            }
        }
        written
    }
}

/// One commit's part of a batch, in batch order, and the ids it skips.
#[derive(Default)]
pub(super) struct PlannedCommit {
    pub(super) ops: Vec<Op>,
    pub(super) duplicates: Vec<String>,
}

impl PlannedCommit {
    /// Entries it adds to a batch: a change to a key-value subject the batch already sets
    /// replaces that entry.
    pub(super) fn entries(&self, plan: &Plan) -> usize {
        let mut puts = HashSet::new();
        self.ops
            .iter()
            .filter(|op| match op {
                Op::Put { subject, .. } => {
                    !plan.keyed.contains_key(subject) && puts.insert(subject.as_str())
                }
                _ => true,
            })
            .count()
    }

    /// Its largest message (the id, or the subject of a key-value change) with its size.
    pub(super) fn largest(&self) -> Option<(&str, usize)> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Claim { .. } | Op::Check { .. } => None,
                Op::Message {
                    subject,
                    payload,
                    stored,
                    ..
                } => Some((stored.id.as_str(), subject.len() + payload.len())),
                Op::Put {
                    subject, payload, ..
                } => Some((subject.as_str(), subject.len() + payload.len())),
            })
            .max_by_key(|(_, size)| *size)
    }

    pub(super) fn put(&mut self, subject: String, payload: Vec<u8>, expect: Option<u64>) {
        self.ops.push(Op::Put {
            subject,
            payload,
            expect,
            rollup: true,
            erases: None,
        });
    }

    /// A read check: `subject`'s last sequence must still be `expect` when the batch lands.
    pub(super) fn check(&mut self, carrier: String, subject: String, expect: u64) {
        self.ops.push(Op::Check {
            carrier,
            subject,
            expect,
        });
    }

    /// An empty message on a key's subject, not rolled up: `seal_key` answers `None` from the
    /// batch on, and the key's own message (`erases`, when stored) is erased once the batch is.
    pub(super) fn shred(&mut self, subject: String, erases: Option<u64>) {
        self.ops.push(Op::Put {
            subject,
            payload: Vec::new(),
            expect: None,
            rollup: false,
            erases,
        });
    }
}

pub(super) enum Op {
    /// An id claimed for the message that follows it; the payload names its stream.
    Claim { subject: String, stream: String },
    Message {
        subject: String,
        payload: Vec<u8>,
        expect: Option<u64>,
        stream: StreamName,
        stored: Stored,
    },
    Put {
        subject: String,
        payload: Vec<u8>,
        expect: Option<u64>,
        /// Rolled up (a key-value subject), or added beside the subject's earlier messages (a
        /// shredding marker, whose key is erased by sequence once the batch is stored).
        rollup: bool,
        erases: Option<u64>,
    },
    /// An empty message on `carrier` (rolled up) whose expectation is about `subject`.
    Check {
        carrier: String,
        subject: String,
        expect: u64,
    },
}

impl Plan {
    pub(super) fn claim(&mut self, subject: String, payload: Vec<u8>) {
        self.outgoing.push(Outgoing {
            subject,
            payload,
            expect: Some(0),
            expect_subject: None,
            rollup: false,
            erases: None,
        });
    }

    /// A read check; one already in the batch for the same subject stands (the commits of a
    /// group read the same stored state).
    pub(super) fn check(&mut self, carrier: String, subject: String, expect: u64) {
        if self.keyed.contains_key(&carrier) {
            return;
        }
        self.keyed.insert(carrier.clone(), self.outgoing.len());
        self.outgoing.push(Outgoing {
            subject: carrier,
            payload: Vec::new(),
            expect: Some(expect),
            expect_subject: Some(subject),
            rollup: true,
            erases: None,
        });
    }

    pub(super) fn append(&mut self, subject: &str, payload: Vec<u8>, expect: Option<u64>) -> usize {
        self.outgoing.push(Outgoing {
            subject: subject.to_owned(),
            payload,
            expect,
            expect_subject: None,
            rollup: false,
            erases: None,
        });
        self.outgoing.len() - 1
    }

    /// Sets a key-value subject (rolled up to this one message).
    pub(super) fn put(&mut self, subject: &str, payload: Vec<u8>, expect: Option<u64>) {
        self.set(subject, payload, expect, true, None);
    }

    /// Sets a key-value subject (rolled up, or, for a shredding marker, beside the key it hides
    /// until the key is erased); a later change in the batch replaces the earlier one (a key
    /// shredded in the batch that wrote it is never stored).
    pub(super) fn set(
        &mut self,
        subject: &str,
        payload: Vec<u8>,
        expect: Option<u64>,
        rollup: bool,
        erases: Option<u64>,
    ) {
        match self.keyed.get(subject) {
            Some(&index) => {
                let earlier = &mut self.outgoing[index];
                earlier.payload = payload;
                earlier.expect = earlier.expect.or(expect);
                earlier.erases = earlier.erases.or(erases);
            }
            None => {
                self.keyed.insert(subject.to_owned(), self.outgoing.len());
                self.outgoing.push(Outgoing {
                    subject: subject.to_owned(),
                    payload,
                    expect,
                    expect_subject: None,
                    rollup,
                    erases,
                });
            }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct BatchAck {
    #[serde(default)]
    pub(super) seq: u64,
    #[serde(default)]
    pub(super) count: u64,
    #[serde(default)]
    pub(super) error: Option<ApiError>,
}

#[derive(Deserialize)]
pub(super) struct ApiError {
    #[serde(default)]
    pub(super) err_code: u64,
    #[serde(default)]
    pub(super) description: String,
}
