//! Commits: each is planned into one atomic batch whose expected-sequence headers carry its
//! checks, grouped with the commits waiting beside it, published, and on a race or a lost
//! answer checked again from scratch.

use std::collections::BTreeSet;

use super::*;

impl NatsStore {
    /// Sends one atomic batch; returns the sequence of its first message. A single message
    /// goes as a plain publish, atomic on its own and with the same checks: the server stages
    /// each batch of a one-server stream in a store of its own, files created and synced (~7 ms
    /// of its CPU here), which every heartbeat paid.
    pub(super) async fn publish(&self, batch: Vec<Outgoing>) -> Result<u64, BatchRefused> {
        if batch.len() > MAX_BATCH {
            return Err(BatchRefused::Other(StoreError::TooLarge {
                entries: batch.len(),
                limit: MAX_BATCH,
            }));
        }
        let _permit = self
            .inner
            .batches
            .acquire()
            .await
            .map_err(|_| BatchRefused::Other(StoreError::Closed))?;
        let count = batch.len();
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let client = &self.inner.client;
        let mut first_seq = 0;
        let single = count == 1;
        for (index, outgoing) in batch.into_iter().enumerate() {
            let mut headers = HeaderMap::new();
            if !single {
                headers.insert("Nats-Batch-Id", batch_id.as_str());
                headers.insert("Nats-Batch-Sequence", (index + 1).to_string().as_str());
            }
            if let Some(seq) = outgoing.expect {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    seq.to_string().as_str(),
                );
            }
            if let Some(subject) = &outgoing.expect_subject {
                headers.insert(
                    "Nats-Expected-Last-Subject-Sequence-Subject",
                    subject.as_str(),
                );
            }
            if outgoing.rollup {
                headers.insert("Nats-Rollup", "sub");
            }
            if let Some(seq) = outgoing.erases {
                headers.insert(ERASES, seq.to_string().as_str());
            }
            let last = index + 1 == count;
            if last && !single {
                headers.insert("Nats-Batch-Commit", "1");
            }
            let payload = outgoing.payload.into();
            if !last {
                client
                    .publish_with_headers(outgoing.subject, headers, payload)
                    .await
                    .map_err(|e| {
                        BatchRefused::Other(match e.kind() {
                            // The client refuses these before sending: nothing it could
                            // ever send.
                            async_nats::PublishErrorKind::MaxPayloadExceeded
                            | async_nats::PublishErrorKind::InvalidSubject => {
                                StoreError::Refused(format!("publish: {e}"))
                            }
                            _ => backend("publish", e),
                        })
                    })?;
                continue;
            }
            // Only the commit is answered. An answer that does not come in time may still have
            // been stored: checking again from scratch is safe, since the claims, positions and
            // row sequences it wrote would now refuse or skip a second copy.
            let reply = match tokio::time::timeout(
                COMMIT_TIMEOUT,
                client.request_with_headers(outgoing.subject, headers, payload),
            )
            .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                    return Err(BatchRefused::Raced);
                }
                Ok(Err(e))
                    if matches!(
                        e.kind(),
                        async_nats::RequestErrorKind::MaxPayloadExceeded
                            | async_nats::RequestErrorKind::InvalidSubject
                    ) =>
                {
                    return Err(BatchRefused::Other(StoreError::Refused(format!(
                        "publish: {e}"
                    ))));
                }
                Ok(Err(e)) => return Err(BatchRefused::Other(backend("publish", e))),
                Err(_) => return Err(BatchRefused::Raced),
            };
            let ack: BatchAck = serde_json::from_slice(&reply.payload)
                .map_err(|e| BatchRefused::Other(backend("publish", e)))?;
            if let Some(error) = ack.error {
                // A wrong last sequence: another writer came first. Too many batches in flight
                // on the server: other processes are busy. Both: check and try again.
                let again = matches!(error.err_code, 10071 | 10164)
                    || error.description.contains("too many inflight");
                // A message larger than the stream takes (10054) is refused whatever happens.
                let refused = error.err_code == 10054;
                return Err(if again {
                    BatchRefused::Raced
                } else if refused {
                    BatchRefused::Other(StoreError::Refused(error.description))
                } else {
                    BatchRefused::Other(backend("publish", error.description))
                });
            }
            // A plain publish's answer has no count: stored means one.
            let stored = if single { 1 } else { ack.count };
            if stored != count as u64 {
                return Err(BatchRefused::Other(backend(
                    "publish",
                    format!("stored {stored} of {count} messages"),
                )));
            }
            first_seq = ack.seq + 1 - count as u64;
        }
        Ok(first_seq)
    }

    /// Checks a group of commits against the stored state, in order, and publishes the ones that
    /// fit as one atomic batch: each commit sees the ones before it, as if committed one by one,
    /// and one that fails its checks fails alone. Returns the outcomes of the first commits of
    /// the group (at least one); `Ok(None)`: another writer changed a subject the group read
    /// (nothing was stored); check again.
    pub(super) async fn try_commits(
        &self,
        commits: &[&Commit],
    ) -> Result<Option<Vec<Result<Committed, StoreError>>>, StoreError> {
        // Everything the checks read, fetched at once: one request, not one per subject.
        let mut subjects = Vec::new();
        for commit in commits {
            for append in &commit.appends {
                subjects.push(self.message_subject(&append.stream));
                for message in &append.messages {
                    subjects.push(self.claim_subject(&message.id));
                }
            }
            if let Some(settle) = &commit.settle {
                subjects.extend(self.settle_subjects(settle));
            }
            for write in &commit.views {
                if validate_table_name(&write.table).is_ok() {
                    subjects.push(self.view_subject(&write.table, &write.key));
                }
            }
            for read in &commit.view_reads {
                if validate_table_name(&read.table).is_ok() && view_key_fits(&read.key) {
                    subjects.push(self.view_subject(&read.table, &read.key));
                }
            }
            for read in &commit.stream_reads {
                subjects.push(self.message_subject(&read.stream));
            }
            // The sequence of each key shredded, to erase it by once the batch is stored.
            subjects.extend(commit.shred.iter().map(|id| self.seal_key_subject(id)));
        }
        let fetched = self.lasts(subjects).await?;
        let claim_streams = self.claim_streams(&fetched).await?;
        let mut staged = Staged {
            fetched,
            claim_streams,
            ..Staged::default()
        };
        let mut outcomes = Vec::new();
        let mut written = Vec::new();
        for commit in commits {
            let planned = match self.plan_commit(&staged, commit) {
                Ok(planned) => planned,
                Err(e) => {
                    outcomes.push(Err(e));
                    written.push(Vec::new());
                    continue;
                }
            };
            let entries = planned.entries(&staged.plan);
            if staged.plan.outgoing.len() + entries > MAX_BATCH {
                if !staged.plan.outgoing.is_empty() {
                    break;
                }
                outcomes.push(Err(StoreError::TooLarge {
                    entries,
                    limit: MAX_BATCH,
                }));
                written.push(Vec::new());
                continue;
            }
            written.push(staged.apply(planned.ops));
            outcomes.push(Ok(Committed {
                written: Vec::new(),
                duplicates: planned.duplicates,
            }));
        }
        if staged.plan.outgoing.is_empty() {
            return Ok(Some(outcomes));
        }
        let erases: Vec<u64> = staged
            .plan
            .outgoing
            .iter()
            .filter_map(|outgoing| outgoing.erases)
            .collect();
        let first = match self.publish(staged.plan.outgoing).await {
            Ok(first) => {
                // The commit stands whether or not the erase does: a key not erased now (full
                // queue, failed request, process gone) is left to the sweep.
                for seq in erases {
                    if self.inner.erase.try_send(seq).is_err() {
                        tracing::warn!(seq, "shredded key left for the sweep to erase");
                    }
                }
                first
            }
            Err(BatchRefused::Raced) => return Ok(None),
            Err(BatchRefused::Other(e)) => {
                // The commits in the batch fail with it; those refused by their checks keep
                // their own error, and those that did not fit still wait. A refusal of a batch
                // of several commits may be one commit's fault: the others are not to be
                // parked for it, so for them it is an error that may pass.
                let batched = outcomes.iter().filter(|o| o.is_ok()).count();
                let e = match e {
                    StoreError::Refused(reason) if batched > 1 => StoreError::Backend(format!(
                        "a batch of {batched} commits was refused: {reason}"
                    )),
                    e => e,
                };
                for outcome in &mut outcomes {
                    if outcome.is_ok() {
                        *outcome = Err(e.clone());
                    }
                }
                return Ok(Some(outcomes));
            }
        };
        for (outcome, written) in outcomes.iter_mut().zip(written) {
            if let Ok(committed) = outcome {
                committed.written = written
                    .into_iter()
                    .map(|(index, stream, stored)| {
                        stored.into_message(stream, first + index as u64)
                    })
                    .collect();
            }
        }
        Ok(Some(outcomes))
    }

    /// The stream that holds the id of each stored claim among `fetched`: a claim names it in
    /// its payload; one written before claims did (empty) is followed by its message, which is
    /// read for it (only an id sent again meets such a claim).
    async fn claim_streams(
        &self,
        fetched: &HashMap<String, Option<Entry>>,
    ) -> Result<HashMap<String, String>, StoreError> {
        let claims = self.subject("id.");
        let mut streams = HashMap::new();
        for (subject, entry) in fetched {
            let Some(entry) = entry else { continue };
            if !subject.starts_with(&claims) {
                continue;
            }
            let stream = match std::str::from_utf8(&entry.payload) {
                Ok(stream) if !stream.is_empty() => stream.to_owned(),
                _ => {
                    let id = subject.strip_prefix(&claims).and_then(untoken);
                    match self.direct_get(json!({ "seq": entry.seq + 1 })).await? {
                        Some(next) => match self.decode_message(&next) {
                            Ok(message) if Some(&message.id) == id.as_ref() => {
                                message.stream.as_str().to_owned()
                            }
                            // Not its message (a namespace changed by hand): the id stays
                            // taken, by no stream any message could name.
                            _ => String::new(),
                        },
                        None => String::new(),
                    }
                }
            };
            streams.insert(subject.clone(), stream);
        }
        Ok(streams)
    }

    /// What one commit adds to a group's batch, checked against what the group sees; nothing of
    /// it is staged yet, so a commit that fails here leaves the group as it was.
    pub(super) fn plan_commit(
        &self,
        staged: &Staged,
        commit: &Commit,
    ) -> Result<PlannedCommit, StoreError> {
        let mut planned = PlannedCommit::default();
        let first_index = staged.plan.outgoing.len();
        let mut seen: HashMap<&str, &str> = HashMap::new();
        let time_ms = now_ms();
        // The streams it read without writing, as they stand before this commit: one the batch
        // already wrote is as staged (its append carries the check), another is checked by the
        // server through a carrier.
        for read in &commit.stream_reads {
            let subject = self.message_subject(&read.stream);
            let (actual, stored) = match staged.streams.get(&subject) {
                Some(&(version, _)) => (version, None),
                None => {
                    let last = staged.fetched.get(&subject).and_then(Option::as_ref);
                    let version = match last {
                        Some(entry) => self.decode_message(entry)?.position + 1,
                        None => 0,
                    };
                    (version, Some(last.map_or(0, |e| e.seq)))
                }
            };
            if actual != read.version {
                return Err(StoreError::Conflict {
                    stream: read.stream.as_str().to_owned(),
                    expected: read.version,
                    actual,
                });
            }
            let appended = commit.appends.iter().any(|a| a.stream == read.stream);
            if let Some(seq) = stored.filter(|_| !appended) {
                planned.check(self.check_subject(&subject), subject, seq);
            }
        }
        // Next version and batch index of the latest message of each stream this commit appends
        // to, continuing from the group's.
        let mut streams: HashMap<&str, (u64, Option<usize>)> = HashMap::new();
        for append in &commit.appends {
            let mut fresh = Vec::new();
            for message in &append.messages {
                let claim = self.claim_subject(&message.id);
                let holder = match seen.get(message.id.as_str()) {
                    Some(holder) => Some(*holder),
                    None => staged.claim_holder(&claim),
                };
                match holder {
                    // An id names one message of one stream: the same stream again is a
                    // duplicate, another stream is refused.
                    Some(holder) if holder != append.stream.as_str() => {
                        return Err(StoreError::IdInUse {
                            id: shown(&message.id),
                        });
                    }
                    Some(_) if commit.refuse_duplicates => {
                        return Err(StoreError::Duplicate {
                            id: message.id.clone(),
                        });
                    }
                    Some(_) => planned.duplicates.push(message.id.clone()),
                    None => {
                        seen.insert(message.id.as_str(), append.stream.as_str());
                        fresh.push((message, claim));
                    }
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let subject = self.message_subject(&append.stream);
            // The first message of a stream in the batch expects the stream's stored last
            // sequence and points back at it; later ones point back into the batch.
            let mut expect = None;
            let (version, mut latest) = match streams.get(append.stream.as_str()) {
                Some(&known) => known,
                None => match staged.streams.get(&subject) {
                    Some(&(version, index)) => (version, Some(index)),
                    None => {
                        let last = staged.fetched.get(&subject).and_then(Option::as_ref);
                        expect = Some(last.map_or(0, |e| e.seq));
                        let version = match last {
                            Some(entry) => self.decode_message(entry)?.position + 1,
                            None => 0,
                        };
                        (version, None)
                    }
                },
            };
            if let Some(expected) = append.expected_version
                && expected != version
            {
                return Err(StoreError::Conflict {
                    stream: append.stream.as_str().to_owned(),
                    expected,
                    actual: version,
                });
            }
            let count = fresh.len() as u64;
            for (offset, (message, claim)) in fresh.into_iter().enumerate() {
                // The claim goes first, the message right after it.
                let index = first_index + planned.ops.len() + 1;
                let (prev_seq, prev_back) = match latest {
                    Some(earlier) => (None, Some((index - earlier) as u64)),
                    None => (expect.filter(|&seq| seq > 0), None),
                };
                let stored = Stored {
                    id: message.id.clone(),
                    message_type: message.message_type.clone(),
                    data: message.data.clone(),
                    metadata: message.metadata.clone(),
                    position: version + offset as u64,
                    time_ms,
                    not_before_ms: message.not_before_ms,
                    prev_seq,
                    prev_back,
                };
                planned.ops.push(Op::Claim {
                    subject: claim,
                    stream: append.stream.as_str().to_owned(),
                });
                planned.ops.push(Op::Message {
                    subject: subject.clone(),
                    payload: to_json(&stored)?,
                    expect: expect.take(),
                    stream: append.stream.clone(),
                    stored,
                });
                latest = Some(index);
            }
            streams.insert(append.stream.as_str(), (version + count, latest));
        }

        match &commit.settle {
            None => {}
            Some(Settle::Advance {
                consumer,
                partitions,
                to,
            }) => {
                // Each partition's record must be as the consumer read it, epoch included: a
                // take-over rewrote it with a new epoch, so a commit decided under the old lease
                // fails here, or at the server if the take-over lands after this read.
                for moved in partitions {
                    let subject = self.partition_subject(consumer, moved.partition);
                    let current = staged.current(&subject);
                    let actual = match &current {
                        Some(entry) => decode_position(entry)?,
                        None => PartitionPosition::default(),
                    };
                    if actual != moved.from {
                        return Err(StoreError::ConsumerMoved {
                            consumer: format!("{consumer} (partition {})", moved.partition),
                            expected: moved.from.position,
                            actual: actual.position,
                        });
                    }
                    let next = PartitionPosition {
                        position: *to,
                        epoch: actual.epoch,
                    };
                    planned.put(subject, to_json(&next)?, Some(current.map_or(0, |e| e.seq)));
                }
            }
            Some(Settle::ClearDeferred {
                consumer,
                global_position,
                partition,
                epoch,
            }) => {
                // The partition's record at the epoch the message was decided under, put back
                // as it is with the sequence read: a take-over that lands first fails the batch
                // at the server.
                let fence = self.partition_subject(consumer, *partition);
                let current = staged.current(&fence);
                let actual = match &current {
                    Some(entry) => decode_position(entry)?,
                    None => PartitionPosition::default(),
                };
                if actual.epoch != *epoch {
                    return Err(StoreError::ConsumerMoved {
                        consumer: format!("{consumer} (partition {partition})"),
                        expected: *epoch,
                        actual: actual.epoch,
                    });
                }
                planned.put(fence, to_json(&actual)?, Some(current.map_or(0, |e| e.seq)));
                let subject = self.deferred_subject(consumer, *global_position);
                match staged.current(&subject) {
                    Some(entry) if !entry.payload.is_empty() => {
                        planned.put(subject, Vec::new(), Some(entry.seq));
                    }
                    _ => {
                        return Err(StoreError::ConsumerMoved {
                            consumer: consumer.to_string(),
                            expected: *global_position,
                            actual: 0,
                        });
                    }
                }
            }
        }

        // The view rows the decision read, as they stand before this commit. A row also written
        // below is checked again by the server (its put expects the sequence read here); a row
        // only read is checked here, a round trip before the batch lands.
        let mut read_rows = BTreeSet::new();
        for read in &commit.view_reads {
            validate_table_name(&read.table)?;
            if !view_key_fits(&read.key) {
                // A key past the bound names no row, now or ever: nothing to check at the
                // server (and no subject could hold it).
                if read.value.is_some() {
                    return Err(StoreError::ViewChanged {
                        table: read.table.clone(),
                        key: shown(&read.key),
                    });
                }
                continue;
            }
            let current = staged.current(&self.view_subject(&read.table, &read.key));
            let row = current.as_ref().map(decode_row).transpose()?;
            if !read.holds(row.as_ref()) {
                return Err(StoreError::ViewChanged {
                    table: read.table.clone(),
                    key: read.key.clone(),
                });
            }
            read_rows.insert((read.table.clone(), read.key.clone()));
        }
        // A row only read, not written by the batch before it nor by this commit, is checked by
        // the server through a carrier; one written has its put's expected sequence.
        for (table, key) in &read_rows {
            let subject = self.view_subject(table, key);
            let written = staged.values.contains_key(&subject)
                || commit
                    .views
                    .iter()
                    .any(|w| w.table == *table && w.key == *key);
            if !written {
                let seq = staged
                    .fetched
                    .get(&subject)
                    .and_then(Option::as_ref)
                    .map_or(0, |e| e.seq);
                planned.check(self.check_subject(&subject), subject, seq);
            }
        }
        // View rows: a change applies when it is past the row's `lastUpdateSeq` before this
        // commit, or when the decision read the row (checked above); of the changes to one row
        // in this commit, the last that applies stands.
        let mut rows: BTreeMap<(String, String), RowChange> = BTreeMap::new();
        for write in &commit.views {
            validate_table_name(&write.table)?;
            let key = (write.table.clone(), write.key.clone());
            if !rows.contains_key(&key) {
                let current = staged.current(&self.view_subject(&write.table, &write.key));
                let seq = current.as_ref().map_or(0, |e| e.seq);
                let stored = current.as_ref().map(decode_row).transpose()?;
                rows.insert(
                    key.clone(),
                    RowChange {
                        seq,
                        stored,
                        change: None,
                    },
                );
            }
            let read = read_rows.contains(&key);
            if let Some(row) = rows.get_mut(&key)
                && (read
                    || row
                        .stored
                        .as_ref()
                        .is_none_or(|stored| write.seq > stored.last_update_seq))
            {
                let stored = row.stored.as_ref();
                row.change = Some(ViewRow {
                    value: write.value.clone().unwrap_or(Value::Null),
                    last_update_seq: stored
                        .map_or(write.seq, |stored| stored.last_update_seq.max(write.seq)),
                });
            }
        }
        for ((table, key), row) in rows {
            if let Some(change) = row.change {
                planned.put(
                    self.view_subject(&table, &key),
                    to_json(&change)?,
                    Some(row.seq),
                );
            }
        }

        for parked in &commit.park {
            let subject = self.parked_subject(&parked.consumer, parked.message.global_position);
            planned.put(subject, to_json(parked)?, None);
        }
        for deferred in &commit.defer {
            let subject =
                self.deferred_subject(&deferred.consumer, deferred.message.global_position);
            planned.put(subject, to_json(deferred)?, None);
        }
        // A key goes in only with its message, in the same batch: the key of a duplicate
        // skipped above would replace the key of the message stored first.
        for seal in &commit.seal_keys {
            let written = planned
                .ops
                .iter()
                .any(|op| matches!(op, Op::Message { stored, .. } if stored.id == seal.message_id));
            if written {
                planned.put(
                    self.seal_key_subject(&seal.message_id),
                    seal.key.clone(),
                    None,
                );
            }
        }
        // Shredding is an empty message on the key's subject, in the same atomic batch, so
        // `seal_key` answers `None` from the commit on. It is not a rollup: the server's rollup
        // (like its purge) drops the key from the index but leaves its bytes in the block file.
        // The key's message is erased by sequence once the batch is stored (see `erase`), which
        // overwrites it in the file. A key already shredded, or never stored, needs no marker.
        for message_id in &commit.shred {
            let subject = self.seal_key_subject(message_id);
            if staged
                .current(&subject)
                .is_some_and(|entry| !entry.payload.is_empty())
            {
                let stored = staged
                    .fetched
                    .get(&subject)
                    .and_then(Option::as_ref)
                    .filter(|entry| !entry.payload.is_empty())
                    .map(|entry| entry.seq);
                planned.shred(subject, stored);
            }
        }
        for snapshot in &commit.snapshots {
            planned.put(
                self.snapshot_subject(&snapshot.stream, &snapshot.component),
                to_json(&(snapshot.version, &snapshot.state))?,
                None,
            );
        }
        // The server refuses a message past its max_payload; found here, it fails this commit
        // alone instead of the batch it would share.
        let max_payload = self.inner.client.server_info().max_payload;
        if max_payload > 0
            && let Some((name, size)) = planned.largest()
            && size + HEADROOM > max_payload
        {
            return Err(StoreError::InvalidMessage {
                id: name.to_owned(),
                reason: format!(
                    "{size} bytes stored is more than the server takes in one message ({max_payload})"
                ),
            });
        }
        Ok(planned)
    }

    /// Commits the first of `waiting` and as many after it as fit into the same batch, and
    /// answers each; the rest wait for the next group.
    pub(super) async fn commit_group(&self, waiting: &mut Vec<Queued>) {
        let commits: Vec<&Commit> = waiting.iter().map(|queued| &queued.commit).collect();
        let outcomes = match self.try_commits(&commits).await {
            Ok(Some(outcomes)) => outcomes,
            // Another process changed a subject the group read: the first commit checks again
            // on its own, so it cannot be starved by groups that keep racing.
            Ok(None) => vec![self.commit_alone(commits[0]).await],
            // The server did not answer the checks' reads: every commit of the group fails alike.
            Err(e) => commits.iter().map(|_| Err(e.clone())).collect(),
        };
        for (queued, outcome) in waiting.drain(..outcomes.len()).zip(outcomes) {
            // A caller that stopped waiting learns nothing; the commit stands or not as decided.
            let _ = queued.reply.send(outcome);
        }
    }

    pub(super) async fn commit_alone(&self, commit: &Commit) -> Result<Committed, StoreError> {
        for attempt in 0..RACE_RETRIES {
            if let Some(outcomes) = self.try_commits(&[commit]).await? {
                return outcomes
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| Err(backend("commit", "no outcome")));
            }
            tokio::time::sleep(Duration::from_millis(attempt as u64 * 2)).await;
        }
        Err(backend(
            "commit",
            format!("other writers kept changing the same subjects ({RACE_RETRIES} tries)"),
        ))
    }
}

/// A view row a commit changes: its subject's last sequence, the stored row, and the new row.
pub(super) struct RowChange {
    pub(super) seq: u64,
    pub(super) stored: Option<ViewRow>,
    pub(super) change: Option<ViewRow>,
}

/// A commit waiting for the group committer, and who waits for its outcome.
pub(super) struct Queued {
    pub(super) commit: Commit,
    pub(super) reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// Commits what waits in the queue in groups, one atomic batch per group. The server stores a
/// stream's atomic batches one at a time (~1.4 ms each on this machine, whatever their size),
/// so a batch per commit capped a process at ~650 commits/s however many were sent at once.
pub(super) async fn commit_queued(
    store: std::sync::Weak<Inner>,
    mut queue: mpsc::Receiver<Queued>,
) {
    let mut waiting: Vec<Queued> = Vec::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(queued) => waiting.push(queued),
                None => return,
            }
        }
        while waiting.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(queued) => waiting.push(queued),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else { return };
        NatsStore { inner }.commit_group(&mut waiting).await;
    }
}
