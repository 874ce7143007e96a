//! One message handled to the end (`handle`): deferred when not yet due, unsealed, decided,
//! committed with its settle; a transient failure retried with backoff, a conflict decided
//! again, anything that cannot succeed parked with its reason.

use super::*;

impl Consumer {
    pub(super) fn settle(&self, message: &Message, source: Source) -> Settle {
        match source {
            Source::Category => {
                self.advance([self.spec.partition_of(message)], message.global_position)
            }
            Source::Deferred => {
                let partition = self.spec.partition_of(message);
                Settle::ClearDeferred {
                    consumer: self.id.clone(),
                    global_position: message.global_position,
                    partition,
                    epoch: self
                        .positions
                        .get(partition as usize)
                        .map_or(0, |p| p.epoch),
                }
            }
        }
    }

    pub(super) async fn settle_only(&self, settle: Settle) -> Result<(), Interrupted> {
        self.store
            .commit(Commit {
                settle: Some(settle),
                ..Commit::default()
            })
            .await?;
        Ok(())
    }

    /// Handles one message to the end: its outcome committed, or it deferred or parked.
    pub(super) async fn handle(
        &mut self,
        message: Message,
        source: Source,
    ) -> Result<(), Interrupted> {
        let settle = self.settle(&message, source);
        if source == Source::Category
            && let Some(due_ms) = message.not_before_ms
            && due_ms > now_ms()
        {
            tracing::debug!(consumer = %self.id, id = %message.id, due_ms, "deferred");
            self.store
                .commit(Commit {
                    settle: Some(settle),
                    defer: vec![DeferredMessage {
                        consumer: self.id.clone(),
                        message,
                        due_ms,
                    }],
                    ..Commit::default()
                })
                .await?;
            return Ok(());
        }

        // A sealed command: the handler gets its fields in clear, everything stored (park and
        // defer records, the outcome's ids) keeps `message` as it is stored, sealed. Its key is
        // read once; it stays until the commit that settles the command, which shreds it.
        let sealed = message.stream.is_command() && seal::is_sealed(&message);
        let mut clear = None;
        let mut unopenable = None;
        let mut redactor = None;
        if sealed {
            let key = self.store.seal_key(&message.id).await?;
            match seal::unseal(&message, key.as_deref()) {
                Ok(opened) => {
                    redactor = seal::Redactor::of(&message, &opened).map(Arc::new);
                    clear = Some(opened);
                }
                // Not for the handler to decide on a placeholder: parked, with the reason.
                Err(e) => unopenable = Some(e.to_string()),
            }
        }
        // Whatever the handling says about itself leaves it without the clear values.
        let redacted = |text: String| match &redactor {
            Some(redactor) => redactor.redact(&text),
            None => text,
        };
        let mut deliveries = 0;
        let mut conflicts = 0;
        let started = std::time::Instant::now();
        loop {
            deliveries += 1;
            if let Some(reason) = unopenable.take() {
                self.park(message, settle, reason, deliveries, started, None)
                    .await?;
                return Ok(());
            }
            let decided = decide(
                self.component.clone(),
                self.projections.clone(),
                self.store.clone(),
                self.mail,
                clear.clone().unwrap_or_else(|| message.clone()),
                redactor.clone(),
            )
            .await;
            // What a refusal rested on: its park is checked against it.
            let mut refused_on = None;
            let decided = decided.map_err(|decline| match decline {
                Decline::Handler(error, read) => {
                    refused_on = read;
                    Decline::Guest(error)
                }
                other => other,
            });
            let failure = match decided {
                Ok(decision) => match self.outcome_commit(&message, decision, settle.clone()) {
                    Ok(mut commit) => {
                        if sealed {
                            commit.shred.push(message.id.clone());
                        }
                        commit.snapshots = self.projections.take_due_snapshots();
                        match self.store.commit(commit).await {
                            Ok(committed) => {
                                tracing::debug!(
                                    consumer = %self.id, id = %message.id,
                                    written = committed.written.len(),
                                    duplicates = committed.duplicates.len(),
                                    "handled"
                                );
                                record(self.service(), 1, 0, started.elapsed());
                                return Ok(());
                            }
                            Err(StoreError::Conflict { .. } | StoreError::ViewChanged { .. })
                                if started.elapsed() < CONFLICT_PATIENCE =>
                            {
                                // Someone wrote to the entity (or a view row the handler read)
                                // meanwhile: decide again on fresh state, at once the first
                                // time (a race), then with a pause that grows (a read that
                                // lags the leader).
                                self.sleep(conflict_pause(conflicts)).await?;
                                conflicts += 1;
                                deliveries -= 1;
                                continue;
                            }
                            Err(
                                e @ (StoreError::Conflict { .. } | StoreError::ViewChanged { .. }),
                            ) => {
                                format!("the entity kept changing while handling: {e}")
                            }
                            Err(e @ StoreError::IdInUse { .. }) => {
                                format!("its outcome conflicts with a stored message: {e}")
                            }
                            Err(e) if e.is_permanent() => {
                                format!("invalid outcome: {e}")
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(reason) => format!("invalid outcome: {reason}"),
                },
                Err(Decline::Store(e)) => return Err(e.into()),
                Err(Decline::Guest(GuestError::Transient(reason)))
                    if deliveries < self.config.max_deliveries =>
                {
                    let delay = self.retry_delay(deliveries);
                    tracing::warn!(
                        consumer = %self.id, id = %message.id, deliveries,
                        "transient failure, retrying in {delay:?}: {}", redacted(reason)
                    );
                    self.sleep(delay).await?;
                    continue;
                }
                Err(Decline::Guest(e @ GuestError::Transient(_))) => {
                    format!("{e} (gave up after {deliveries} deliveries)")
                }
                Err(Decline::Guest(e) | Decline::Handler(e, _)) => e.to_string(),
            };
            let checked = refused_on.filter(|_| started.elapsed() < CONFLICT_PATIENCE);
            let checking = checked.is_some();
            let parked = self
                .park(
                    message.clone(),
                    settle.clone(),
                    redacted(failure),
                    deliveries,
                    started,
                    checked,
                )
                .await;
            match parked {
                Err(Interrupted::Store(StoreError::Conflict { .. })) if checking => {
                    // The refusal rested on a stale state (a replica that lags): decided again.
                    self.sleep(conflict_pause(conflicts)).await?;
                    conflicts += 1;
                    deliveries -= 1;
                    continue;
                }
                parked => return parked,
            }
        }
    }

    /// Parks a message with the reason, settling it. A sealed command keeps its key (and its
    /// fields sealed in the record), so that a replay can still open them.
    pub(super) async fn park(
        &self,
        message: Message,
        settle: Settle,
        failure: String,
        deliveries: u32,
        started: std::time::Instant,
        rested_on: Option<StreamRead>,
    ) -> Result<(), Interrupted> {
        let failure = bounded_reason(failure);
        let id = message.id.clone();
        self.store
            .commit(Commit {
                settle: Some(settle),
                park: vec![ParkedMessage {
                    consumer: self.id.clone(),
                    message,
                    reason: failure.clone(),
                    attempts: deliveries,
                    parked_at_ms: now_ms(),
                }],
                stream_reads: rested_on.into_iter().collect(),
                ..Commit::default()
            })
            .await?;
        tracing::warn!(consumer = %self.id, id = %id, "parked: {failure}");
        record(self.service(), 0, 1, started.elapsed());
        Ok(())
    }

    fn retry_delay(&self, deliveries: u32) -> Duration {
        let factor = 2u32.saturating_pow(deliveries.saturating_sub(1).min(16));
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    /// Checks a guest's outcome and turns it into the commit that settles the message.
    fn outcome_commit(
        &self,
        handled: &Message,
        decision: Decision,
        settle: Settle,
    ) -> Result<Commit, String> {
        let Decision {
            outcome,
            entity,
            version,
            read_versions,
            read_rows,
            emails,
        } = decision;
        let checked = check_outcome(
            self.component.manifest(),
            self.store.secret(),
            handled,
            outcome,
            emails,
        )?;
        let mut read = read_versions;
        if let Some(entity) = entity {
            read.insert(entity, version);
        }
        let appends = group_appends(checked.messages, |stream| read.get(stream).copied());
        Ok(Commit {
            stream_reads: stream_reads(&appends, read),
            appends,
            views: checked.views,
            settle: Some(settle),
            view_reads: view_reads(read_rows),
            ..Commit::default()
        })
    }
}

/// The streams a decision read (its entity, and those read through the host) that its commit
/// does not append to: each checked at the version read. A no-op decided on a stale state, or a
/// message parked for what a replica that lags did not yet show, is then decided again.
pub(super) fn stream_reads(
    appends: &[StreamAppend],
    read: HashMap<StreamName, u64>,
) -> Vec<StreamRead> {
    read.into_iter()
        .filter(|(stream, _)| !appends.iter().any(|a| a.stream == *stream))
        .map(|(stream, version)| StreamRead { stream, version })
        .collect()
}

/// The view rows a decision read from the store, as its commit checks them.
pub(super) fn view_reads(
    rows: HashMap<(String, String), Option<serde_json::Value>>,
) -> Vec<ViewRead> {
    rows.into_iter()
        .map(|((table, key), value)| ViewRead { table, key, value })
        .collect()
}
