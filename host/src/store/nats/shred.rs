//! Erasing shredded seal keys with the server's secure erase, after their commit and in the
//! sweep (see the module's header).

use super::*;

impl NatsStore {
    /// Deletes one message with the server's secure erase (`no_erase` false): the server
    /// overwrites its bytes in the block file, where a rollup, a purge or a plain delete leaves
    /// them until the block is compacted. `Ok(false)`: it was gone already.
    pub(super) async fn erase(&self, seq: u64) -> Result<bool, StoreError> {
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            success: bool,
            #[serde(default)]
            error: Option<ApiError>,
        }
        let api = format!("$JS.API.STREAM.MSG.DELETE.{}", self.inner.ns);
        let request = json!({ "seq": seq, "no_erase": false });
        let reply = self
            .inner
            .client
            .request(api, request.to_string().into())
            .await
            .map_err(|e| backend("erase", e))?;
        let answer: Answer =
            serde_json::from_slice(&reply.payload).map_err(|e| backend("erase", e))?;
        match answer.error {
            None if answer.success => Ok(true),
            None => Err(backend("erase", format!("message {seq} was not erased"))),
            // 10037: no message found; 10043: sequence not found; 10057 wraps the first.
            Some(error)
                if matches!(error.err_code, 10037 | 10043)
                    || error.description.contains("not found")
                    || error.description.contains("no message found") =>
            {
                Ok(false)
            }
            Some(error) => Err(backend("erase", error.description)),
        }
    }

    /// Erases every key message that a shredding marker names and that is still stored: what a
    /// process left when it stopped between a commit and its erase, or when an erase failed.
    /// It reads the key subjects' messages past the sweep mark (`NS.meta.erased`: every marker
    /// up to it has had its key erased), a page of 256 per request, so one sweep costs what was
    /// sealed since the last, not the whole history; keys are erased only where one is still
    /// there. Returns how many it erased.
    pub(super) async fn sweep_shredded(&self) -> Result<usize, StoreError> {
        #[derive(Serialize, Deserialize)]
        struct Mark {
            seq: u64,
        }
        let mark_subject = self.subject("meta.erased");
        let mark = match self.last(&mark_subject).await? {
            Some(entry) => decode::<Mark>("sweep mark", &entry)?.seq,
            None => 0,
        };
        let filter = self.subject("key.*");
        // Keys past the mark that were stored when the sweep read them.
        let mut present = HashSet::new();
        let mut erased = 0;
        let mut done = mark;
        let mut failed = false;
        let mut from = mark + 1;
        loop {
            let (entries, pending) = self.page(&filter, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            for entry in entries {
                if !entry.payload.is_empty() {
                    present.insert(entry.seq);
                } else if let Some(key) = entry.erases
                    && (key <= mark || present.remove(&key))
                {
                    match self.erase(key).await {
                        Ok(true) => erased += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(seq = key, "shredded key not erased: {e}");
                            failed = true;
                        }
                    }
                }
                if !failed {
                    done = entry.seq;
                }
            }
            if pending == 0 {
                break;
            }
        }
        if done > mark {
            let outgoing = Outgoing {
                subject: mark_subject,
                payload: to_json(&Mark { seq: done })?,
                expect: None,
                expect_subject: None,
                rollup: true,
                erases: None,
            };
            if let Err(BatchRefused::Other(e)) = self.publish(vec![outgoing]).await {
                return Err(e);
            }
        }
        Ok(erased)
    }
}

/// Erases the messages of keys shredded by this process's commits, once their batch is stored.
pub(super) async fn erase_shredded(store: std::sync::Weak<Inner>, mut queue: mpsc::Receiver<u64>) {
    while let Some(first) = queue.recv().await {
        let mut seqs = vec![first];
        while seqs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(seq) => seqs.push(seq),
                Err(_) => break,
            }
        }
        let Some(inner) = store.upgrade() else { return };
        let store = NatsStore { inner };
        futures_util::stream::iter(seqs)
            .for_each_concurrent(LOOKUPS_IN_FLIGHT, |seq| {
                let store = &store;
                async move {
                    if let Err(e) = store.erase(seq).await {
                        tracing::warn!(seq, "shredded key left for the sweep to erase: {e}");
                    }
                }
            })
            .await;
    }
}

/// Sweeps for shredded keys still stored when the store connects, and every [`SWEEP_EVERY`].
pub(super) async fn sweep_now_and_then(store: std::sync::Weak<Inner>) {
    loop {
        {
            let Some(inner) = store.upgrade() else { return };
            match (NatsStore { inner }).sweep_shredded().await {
                Ok(0) => {}
                Ok(erased) => tracing::info!(erased, "erased shredded keys left by earlier runs"),
                Err(e) => tracing::warn!("sweeping shredded keys: {e}"),
            }
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}
