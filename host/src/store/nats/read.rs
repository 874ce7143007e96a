//! Reads: direct gets (any replica answers), pages of a subject filter, and decoding what they
//! return.

use super::*;

impl NatsStore {
    /// One direct-get request; `None` when nothing matches.
    pub(super) async fn direct_get(&self, request: Value) -> Result<Option<Entry>, StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.inner.ns);
        let reply = self
            .inner
            .client
            .request(api, request.to_string().into())
            .await
            .map_err(|e| backend("get", e))?;
        match reply.status.map(|s| s.as_u16()) {
            Some(404) => Ok(None),
            Some(code) if code >= 300 => Err(backend(
                "get",
                format!("status {code} {}", reply.description.unwrap_or_default()),
            )),
            _ => entry_of(reply).map(Some),
        }
    }

    /// The last message of a subject (wildcards allowed).
    pub(super) async fn last(&self, subject: &str) -> Result<Option<Entry>, StoreError> {
        self.direct_get(json!({ "last_by_subj": subject })).await
    }

    /// The last message of each subject, each subject once: one multi-last direct get per
    /// thousand subjects (the server answers up to 1024), where it was a request per subject;
    /// a subject with no message is absent from the answer.
    pub(super) async fn lasts(
        &self,
        mut subjects: Vec<String>,
    ) -> Result<HashMap<String, Option<Entry>>, StoreError> {
        subjects.sort_unstable();
        subjects.dedup();
        let answers = futures_util::future::try_join_all(subjects.chunks(MULTI_LAST).map(
            |chunk| async move {
                let request = json!({ "multi_last": chunk, "batch": chunk.len() });
                self.batch_get(request, chunk.len()).await
            },
        ))
        .await?;
        let mut found: HashMap<String, Option<Entry>> = subjects
            .into_iter()
            .map(|subject| (subject, None))
            .collect();
        for entry in answers.into_iter().flat_map(|(entries, _)| entries) {
            if let Some(slot) = found.get_mut(&entry.subject) {
                *slot = Some(entry);
            }
        }
        Ok(found)
    }

    /// Messages matching `filter` from sequence `from` on, at most `batch`, in order, with how
    /// many more match after them.
    pub(super) async fn page(
        &self,
        filter: &str,
        from: u64,
        batch: usize,
    ) -> Result<(Vec<Entry>, u64), StoreError> {
        let request = json!({ "seq": from.max(1), "next_by_subj": filter, "batch": batch });
        self.batch_get(request, batch).await
    }

    /// One batched direct get (answered on an inbox of its own, up to `batch` entries and an
    /// end-of-batch marker), with how many more match after the last entry.
    async fn batch_get(
        &self,
        request: Value,
        batch: usize,
    ) -> Result<(Vec<Entry>, u64), StoreError> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.inner.ns);
        let inbox = self.inner.client.new_inbox();
        let mut replies = self
            .inner
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| backend("subscribe", e))?;
        self.inner
            .client
            .publish_with_reply(api, inbox, request.to_string().into())
            .await
            .map_err(|e| backend("get", e))?;
        let mut entries = Vec::new();
        let mut pending = 0;
        loop {
            let reply = tokio::time::timeout(connect::ANSWER_WITHIN, replies.next())
                .await
                .map_err(|_| backend("get", "no answer in time"))?
                .ok_or_else(|| backend("get", "the connection closed"))?;
            match reply.status.map(|s| s.as_u16()) {
                // End of batch, or nothing matched.
                Some(204) | Some(404) => break,
                Some(code) if code >= 300 => {
                    return Err(backend(
                        "get",
                        format!("status {code} {}", reply.description.unwrap_or_default()),
                    ));
                }
                _ => {
                    pending = header_u64(reply.headers.as_ref(), "Nats-Num-Pending").unwrap_or(0);
                    entries.push(entry_of(reply)?);
                    if entries.len() >= batch {
                        // The end-of-batch marker follows; unsubscribing drops it.
                        break;
                    }
                }
            }
        }
        Ok((entries, pending))
    }

    /// Every message matching `filter` (rolled-up subjects: the current value of each).
    pub(super) async fn all(&self, filter: &str) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let (entries, pending) = self.page(filter, from, PAGE).await?;
            let Some(last) = entries.last() else { break };
            from = last.seq + 1;
            out.extend(entries);
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// How many messages match `filter` past sequence `after`.
    pub(super) async fn count_after(&self, filter: &str, after: u64) -> Result<u64, StoreError> {
        let (entries, pending) = self.page(filter, after + 1, 1).await?;
        Ok(if entries.is_empty() { 0 } else { pending + 1 })
    }

    pub(super) fn decode_message(&self, entry: &Entry) -> Result<Message, StoreError> {
        Ok(self.decode_with_prev(entry)?.0)
    }

    /// A message and the sequence of its stream's previous message, when stored.
    pub(super) fn decode_with_prev(
        &self,
        entry: &Entry,
    ) -> Result<(Message, Option<u64>), StoreError> {
        let prefix = format!("{}.m.", self.inner.ns);
        let name = entry.subject.strip_prefix(&prefix).ok_or_else(|| {
            backend(
                "read",
                format!("{} is not a message subject", entry.subject),
            )
        })?;
        let stream = StreamName::parse(name)?;
        let stored: Stored = serde_json::from_slice(&entry.payload)
            .map_err(|e| backend("read", format!("message at {} is damaged: {e}", entry.seq)))?;
        let prev = stored
            .prev_seq
            .or_else(|| stored.prev_back.map(|back| entry.seq.saturating_sub(back)));
        Ok((stored.into_message(stream, entry.seq), prev))
    }

    /// The messages of a stream from `from_position` to its end, walking back from its last
    /// message; `None` when a message does not say where its predecessor is.
    pub(super) async fn walk_back(
        &self,
        last: &Entry,
        from_position: u64,
    ) -> Result<Option<Vec<Message>>, StoreError> {
        let mut tail = Vec::new();
        let (mut message, mut prev) = self.decode_with_prev(last)?;
        while message.position > from_position {
            let Some(seq) = prev else { return Ok(None) };
            let Some(entry) = self.direct_get(json!({ "seq": seq })).await? else {
                return Ok(None);
            };
            tail.push(message);
            (message, prev) = self.decode_with_prev(&entry)?;
        }
        tail.push(message);
        tail.reverse();
        Ok(Some(tail))
    }
}

pub(super) fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

pub(super) fn entry_of(reply: async_nats::Message) -> Result<Entry, StoreError> {
    let headers = reply.headers.as_ref();
    let seq = header_u64(headers, "Nats-Sequence")
        .ok_or_else(|| backend("get", "an answer without Nats-Sequence"))?;
    let subject = headers
        .and_then(|h| h.get("Nats-Subject"))
        .map(|v| v.as_str().to_owned())
        .ok_or_else(|| backend("get", "an answer without Nats-Subject"))?;
    Ok(Entry {
        seq,
        subject,
        payload: reply.payload,
        erases: header_u64(headers, ERASES),
    })
}

/// A partition's position; a position of the format before groups reads with epoch 0.
pub(super) fn decode_position(entry: &Entry) -> Result<PartitionPosition, StoreError> {
    #[derive(Deserialize)]
    struct Position {
        position: u64,
        #[serde(default)]
        epoch: u64,
    }
    serde_json::from_slice::<Position>(&entry.payload)
        .map(|p| PartitionPosition {
            position: p.position,
            epoch: p.epoch,
        })
        .map_err(|e| {
            backend(
                "read",
                format!("position {} is damaged: {e}", entry.subject),
            )
        })
}

pub(super) fn decode_row(entry: &Entry) -> Result<ViewRow, StoreError> {
    serde_json::from_slice(&entry.payload).map_err(|e| {
        backend(
            "read",
            format!("view row {} is damaged: {e}", entry.subject),
        )
    })
}

pub(super) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    entry: &Entry,
) -> Result<T, StoreError> {
    serde_json::from_slice(&entry.payload)
        .map_err(|e| backend("read", format!("{what} {} is damaged: {e}", entry.subject)))
}
