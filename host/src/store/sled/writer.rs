//! The writer thread: the only writer of the log and the tree. It takes the requests waiting in its
//! queue as one group, checks each commit against the store and the group's earlier commits,
//! appends the group's messages to the log and syncs it, writes the rest as one atomic batch with
//! one flush, and only then publishes the messages, answers and wakes the consumers.

use super::*;

pub(super) enum WriteRequest {
    Commit {
        commit: Box<Commit>,
        reply: oneshot::Sender<Result<Committed, StoreError>>,
    },
    RebuildViews {
        tables: Vec<String>,
        consumers: Vec<ConsumerId>,
        reply: oneshot::Sender<Result<Committed, StoreError>>,
    },
    Replay {
        chosen: Vec<ParkedMessage>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    JoinGroup {
        consumer: ConsumerId,
        spec: GroupSpec,
        reply: oneshot::Sender<Result<Group, StoreError>>,
    },
}

/// What the writer did for one request.
pub(super) enum Applied {
    Committed(Committed),
    Moved(usize),
    Joined(Group),
}

impl WriteRequest {
    fn reply(self, result: Result<Applied, StoreError>) {
        match self {
            Self::Commit { reply, .. } | Self::RebuildViews { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Committed(committed) => committed,
                    Applied::Moved(_) | Applied::Joined(_) => Committed::default(),
                }));
            }
            Self::Replay { reply, .. } => {
                let _ = reply.send(result.map(|applied| match applied {
                    Applied::Moved(moved) => moved,
                    Applied::Committed(_) | Applied::Joined(_) => 0,
                }));
            }
            Self::JoinGroup {
                reply, consumer, ..
            } => {
                let _ = reply.send(result.and_then(|applied| match applied {
                    Applied::Joined(group) => Ok(group),
                    _ => Err(StoreError::NotFound(format!("consumer group {consumer}"))),
                }));
            }
        }
    }
}

/// The writes of the group being built, by key (`None`: removed). A commit reads through them
/// before the tree, so it sees what the group's earlier commits wrote though none of it is in
/// sled yet.
pub(super) type Staged = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// One commit's reads and writes: its own writes first, then the group's, then the tree. Dropped
/// without a trace when the commit fails.
pub(super) struct Staging<'a> {
    tree: &'a Tree,
    group: &'a Staged,
    own: Staged,
}

impl Staging<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.own.get(key).or_else(|| self.group.get(key)) {
            Some(staged) => Ok(staged.clone()),
            None => Ok(self.tree.get(key).map_err(backend)?.map(|v| v.to_vec())),
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.own.insert(key, Some(value));
    }

    /// Removes `key`; whether it was there.
    fn remove(&mut self, key: Vec<u8>) -> Result<bool, StoreError> {
        let existed = self.get(&key)?.is_some();
        self.own.insert(key, None);
        Ok(existed)
    }
}

/// The writer thread's state: it is the only writer, so the head and stream versions it keeps
/// are the truth, and reads it makes cannot race another write.
pub(super) struct Writer {
    pub(super) db: sled::Db,
    pub(super) tree: Tree,
    pub(super) log: Arc<MessageLog>,
    pub(super) log_writer: LogWriter,
    pub(super) head: u64,
    /// Messages of the group not yet in the log, in global order.
    pub(super) messages: Vec<Message>,
    /// Ids of the group's messages with their streams: the log's index learns them only when
    /// the group is durable.
    pub(super) ids: HashMap<String, String>,
    /// Versions of streams written lately (every stream the current group wrote is here).
    pub(super) versions: HashMap<String, u64>,
    /// How many streams `versions` may hold before it starts over.
    pub(super) cached_versions: usize,
    /// The last global position on disk, moved after each flush.
    pub(super) durable: Arc<AtomicU64>,
    pub(super) watchers: Watchers,
    /// The data folder, whose filesystem's free space is checked before each group.
    pub(super) path: std::path::PathBuf,
    /// Why writes are refused now (the disk is full); cleared by the next group written.
    pub(super) degraded: Arc<Mutex<Option<String>>>,
}

/// Free space the store keeps in reserve: a group is refused below it, before anything is
/// written, so that sled's own log, the index's runs and merges never meet a full disk halfway.
pub(super) const DISK_RESERVE: u64 = 32 << 20;

impl Writer {
    pub(super) fn run(mut self, mut queue: mpsc::UnboundedReceiver<WriteRequest>) {
        while let Some(first) = queue.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            if let Some(reason) = self.short_of_space() {
                self.refuse_full(group, reason);
                continue;
            }
            // Where the group starts: a group the log cannot take is taken back to here.
            let mark = (self.log_writer.mark(), self.head);
            let only_commits = group.iter().all(|r| {
                matches!(
                    r,
                    WriteRequest::Commit { .. } | WriteRequest::JoinGroup { .. }
                )
            });
            let mut staged = Staged::new();
            let mut results = Vec::with_capacity(group.len());
            let mut touched: BTreeSet<String> = BTreeSet::new();
            let mut failure = None;
            for request in &group {
                let result = match request {
                    WriteRequest::Commit { commit, .. } => self
                        .stage(&mut staged, commit)
                        .map(|(c, t)| (Applied::Committed(c), t)),
                    // These scan the tree, so what the group staged so far is written first.
                    WriteRequest::RebuildViews {
                        tables, consumers, ..
                    } => match self.write_staged(&mut staged) {
                        Ok(()) => self
                            .rebuild(tables, consumers)
                            .map(|(c, t)| (Applied::Committed(c), t)),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    },
                    WriteRequest::Replay { chosen, .. } => match self.write_staged(&mut staged) {
                        Ok(()) => self.replay(chosen).map(|(n, t)| (Applied::Moved(n), t)),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    },
                    WriteRequest::JoinGroup { consumer, spec, .. } => self
                        .join_group(&mut staged, consumer, *spec)
                        .map(|g| (Applied::Joined(g), BTreeSet::new())),
                };
                if let Ok((_, categories)) = &result {
                    touched.extend(categories.iter().cloned());
                }
                results.push(result.map(|(applied, _)| applied));
            }
            // Group commit: one append and one batch, each made durable once, for every commit
            // above; then readers may see its messages.
            let written = match failure {
                Some(e) => Err(e),
                None => self
                    .write_staged(&mut staged)
                    .and_then(|()| self.db.flush().map_err(backend))
                    .and_then(|_| self.log_writer.publish()),
            };
            if let Err(StoreError::Full(reason)) = &written
                && only_commits
            {
                // The log could not take the group, and nothing else of it was applied (a full
                // log write comes before the sled batch): take it back whole and go on.
                match self.take_back(mark) {
                    Ok(()) => {
                        self.refuse_full(group, reason.clone());
                        continue;
                    }
                    Err(e) => tracing::error!("taking back a group the disk could not take: {e}"),
                }
            }
            if let Err(e) = written {
                // The group may be partly in memory and maybe not on disk: neither "failed" nor
                // "written" is true, so stop. Every caller learns the store stopped; nothing is
                // accepted after this point.
                let reason = format!("write failed, the store stopped (restart to recover): {e}");
                tracing::error!("{reason}");
                for request in group {
                    request.reply(Err(StoreError::Backend(reason.clone())));
                }
                return;
            }
            if let Ok(mut degraded) = self.degraded.lock() {
                *degraded = None;
            }
            self.durable.store(self.head, Ordering::Release);
            if let Ok(watchers) = self.watchers.lock() {
                for category in &touched {
                    if let Some(sender) = watchers.get(category) {
                        sender.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
            }
            for (request, result) in group.into_iter().zip(results) {
                request.reply(result);
            }
            self.ids.clear();
            if self.versions.len() > self.cached_versions {
                self.versions.clear();
            }
        }
    }

    /// Why the next group cannot be written: the data folder's filesystem has less free space
    /// than the reserve.
    fn short_of_space(&self) -> Option<String> {
        let free = fs2::available_space(&self.path).ok()?;
        (free < DISK_RESERVE).then(|| {
            format!(
                "{} has {} MiB free, less than the {} MiB the store keeps in reserve",
                self.path.display(),
                free >> 20,
                DISK_RESERVE >> 20
            )
        })
    }

    /// Answers every request of a group that could not be written, and says so until a group
    /// is written again.
    fn refuse_full(&self, group: Vec<WriteRequest>, reason: String) {
        let newly = self
            .degraded
            .lock()
            .map(|mut degraded| degraded.replace(reason.clone()).is_none())
            .unwrap_or(false);
        if newly {
            tracing::error!("the disk is full, writes are refused until space is freed: {reason}");
        }
        for request in group {
            request.reply(Err(StoreError::Full(reason.clone())));
        }
    }

    /// Undoes what staging a group did to the writer's state and cuts the log back to `mark`.
    fn take_back(&mut self, (log_mark, head): ((u64, u64), u64)) -> Result<(), StoreError> {
        self.log_writer.abandon(log_mark)?;
        self.head = head;
        self.messages.clear();
        self.ids.clear();
        // A cache: it is read again from the log.
        self.versions.clear();
        Ok(())
    }

    /// Appends the group's messages to the log and makes them durable, then writes what the
    /// group staged and the head as one atomic batch. In this order: sled may write the batch
    /// out before it is flushed, and a head on disk must never vouch for a message that is not.
    fn write_staged(&mut self, staged: &mut Staged) -> Result<(), StoreError> {
        if staged.is_empty() && self.messages.is_empty() {
            return Ok(());
        }
        if !self.messages.is_empty() {
            for message in self.messages.drain(..) {
                self.log_writer.append(&message)?;
            }
            self.log_writer.sync()?;
        }
        let mut batch = sled::Batch::default();
        for (key, value) in std::mem::take(staged) {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        batch.insert(HEAD_KEY, &self.head.to_be_bytes());
        self.tree.apply_batch(batch).map_err(backend)
    }

    fn stream_version(&self, stream: &str) -> Result<u64, StoreError> {
        match self.versions.get(stream) {
            Some(version) => Ok(*version),
            None => self.log.stream_version(stream),
        }
    }

    /// Checks one commit against the store and the group so far, and stages its writes. Returns
    /// what it wrote and the categories whose consumers should wake; on an error nothing of it is
    /// staged.
    fn stage(
        &mut self,
        group: &mut Staged,
        commit: &Commit,
    ) -> Result<(Committed, BTreeSet<String>), StoreError> {
        validate_commit(commit)?;
        let time_ms = now_ms();
        let mut staging = Staging {
            tree: &self.tree,
            group,
            own: Staged::new(),
        };
        let mut committed = Committed::default();
        let mut touched = BTreeSet::new();
        let mut head = self.head;
        let mut versions: Vec<(String, u64)> = Vec::new();
        // The view rows the decision read, as they stand before this commit writes anything.
        for read in &commit.view_reads {
            let current = staging
                .get(&view_key(&read.table, &read.key))?
                .map(|bytes| decode::<ViewRow>("view row", &bytes))
                .transpose()?;
            if !read.holds(current.as_ref()) {
                return Err(StoreError::ViewChanged {
                    table: read.table.clone(),
                    key: read.key.clone(),
                });
            }
        }
        // The streams it read without writing, likewise.
        for read in &commit.stream_reads {
            let actual = self.stream_version(read.stream.as_str())?;
            if actual != read.version {
                return Err(StoreError::Conflict {
                    stream: read.stream.as_str().to_owned(),
                    expected: read.version,
                    actual,
                });
            }
        }
        // Ids this commit writes, with their streams: the group's and the log's learn them only
        // once the commit holds.
        let mut own_ids: HashMap<&str, &str> = HashMap::new();
        for append in &commit.appends {
            let stream = append.stream.as_str();
            let mut fresh: Vec<&NewMessage> = Vec::with_capacity(append.messages.len());
            for message in &append.messages {
                let holder = match own_ids.get(message.id.as_str()) {
                    Some(holder) => Some((*holder).to_owned()),
                    None => match self.ids.get(&message.id) {
                        Some(holder) => Some(holder.clone()),
                        None => self.log.stream_of_id(&message.id)?,
                    },
                };
                match holder {
                    // An id names one message of one stream: the same stream again is a
                    // duplicate, another stream is refused.
                    Some(holder) if holder != stream => {
                        return Err(StoreError::IdInUse {
                            id: shown(&message.id),
                        });
                    }
                    Some(_) if commit.refuse_duplicates => {
                        return Err(StoreError::Duplicate {
                            id: message.id.clone(),
                        });
                    }
                    Some(_) => committed.duplicates.push(message.id.clone()),
                    None => {
                        own_ids.insert(&message.id, stream);
                        fresh.push(message);
                    }
                }
            }
            if fresh.is_empty() {
                continue;
            }
            let mut version = match versions.iter().rev().find(|(s, _)| s == stream) {
                Some((_, version)) => *version,
                None => self.stream_version(stream)?,
            };
            if let Some(expected) = append.expected_version
                && expected != version
            {
                return Err(StoreError::Conflict {
                    stream: stream.to_owned(),
                    expected,
                    actual: version,
                });
            }
            for new in fresh {
                head += 1;
                let message = Message {
                    id: new.id.clone(),
                    stream: append.stream.clone(),
                    message_type: new.message_type.clone(),
                    data: new.data.clone(),
                    metadata: new.metadata.clone(),
                    position: version,
                    global_position: head,
                    time_ms,
                    not_before_ms: new.not_before_ms,
                };
                version += 1;
                committed.written.push(message);
            }
            versions.push((stream.to_owned(), version));
            touched.insert(append.stream.category_str().to_owned());
        }
        // A key goes in only with its message: the key of a duplicate skipped here would
        // replace the key of the message stored first, which then could not be opened.
        for seal in &commit.seal_keys {
            if committed.written.iter().any(|m| m.id == seal.message_id) {
                staging.insert(seal_key_key(&seal.message_id), seal.key.clone());
            }
        }
        for message_id in &commit.shred {
            staging.remove(seal_key_key(message_id))?;
        }
        for snapshot in &commit.snapshots {
            staging.insert(
                snapshot_key(snapshot.stream.as_str(), &snapshot.component),
                encode(&(snapshot.version, &snapshot.state)),
            );
        }

        // Rows this commit wrote: a later change to the same row in the commit replaces it, even
        // with the same `seq` (one outcome may upsert a row twice, or delete and upsert it). A
        // row the decision read was checked above: its change applies whatever wrote it last.
        let mut written_rows: BTreeSet<Vec<u8>> = commit
            .view_reads
            .iter()
            .map(|read| view_key(&read.table, &read.key))
            .collect();
        for write in &commit.views {
            let key = view_key(&write.table, &write.key);
            let existing = staging
                .get(&key)?
                .map(|bytes| decode::<ViewRow>("view row", &bytes))
                .transpose()?;
            if !written_rows.contains(&key)
                && existing
                    .as_ref()
                    .is_some_and(|row| write.seq <= row.last_update_seq)
            {
                continue;
            }
            written_rows.insert(key.clone());
            let row = ViewRow {
                value: write.value.clone().unwrap_or(Value::Null),
                last_update_seq: existing
                    .as_ref()
                    .map_or(write.seq, |row| row.last_update_seq.max(write.seq)),
            };
            staging.insert(key, encode(&row));
        }

        match &commit.settle {
            Some(Settle::Advance {
                consumer,
                partitions,
                to,
            }) => {
                let key = consumer_key(consumer);
                let mut group = match staging.get(&key)? {
                    Some(bytes) => decode_group(&bytes)?,
                    None => None,
                }
                .ok_or_else(|| StoreError::NotFound(format!("consumer group {consumer}")))?;
                for moved in partitions {
                    let stored = group
                        .positions
                        .get_mut(moved.partition as usize)
                        .ok_or_else(|| {
                            StoreError::NotFound(format!(
                                "partition {} of {consumer}",
                                moved.partition
                            ))
                        })?;
                    if *stored != moved.from {
                        return Err(StoreError::ConsumerMoved {
                            consumer: format!("{consumer} (partition {})", moved.partition),
                            expected: moved.from.position,
                            actual: stored.position,
                        });
                    }
                    stored.position = *to;
                }
                staging.insert(key, encode_group(&group));
            }
            // Gone means a rebuild cleared it meanwhile: this outcome is stale.
            Some(Settle::ClearDeferred {
                consumer,
                global_position,
                ..
            }) if !staging.remove(set_aside_key(DEFERRED, consumer, *global_position))? => {
                return Err(StoreError::ConsumerMoved {
                    consumer: consumer.to_string(),
                    expected: *global_position,
                    actual: 0,
                });
            }
            // One process owns a sled store: epochs never change there, nothing to fence.
            Some(Settle::ClearDeferred { .. }) | None => {}
        }
        for park in &commit.park {
            let key = set_aside_key(PARKED, &park.consumer, park.message.global_position);
            staging.insert(key, encode(park));
        }
        for defer in &commit.defer {
            let key = set_aside_key(DEFERRED, &defer.consumer, defer.message.global_position);
            staging.insert(key, encode(defer));
            touched.insert(defer.consumer.category.as_str().to_owned());
        }

        // The commit holds: its writes join the group.
        let own = std::mem::take(&mut staging.own);
        group.extend(own);
        self.head = head;
        self.versions.extend(versions);
        self.ids.extend(
            committed
                .written
                .iter()
                .map(|m| (m.id.clone(), m.stream.as_str().to_owned())),
        );
        self.messages.extend(committed.written.iter().cloned());
        Ok((committed, touched))
    }

    /// Empties view tables and resets consumers in one batch. Nothing else writes while the
    /// writer thread is here, so the keys listed are still the keys removed.
    fn rebuild(
        &mut self,
        tables: &[String],
        consumers: &[ConsumerId],
    ) -> Result<(Committed, BTreeSet<String>), StoreError> {
        let mut batch = sled::Batch::default();
        for table in tables {
            for row in self
                .tree
                .scan_prefix(key(VIEW, &[table.as_bytes(), &[]]))
                .keys()
            {
                batch.remove(row.map_err(backend)?);
            }
        }
        for consumer in consumers {
            let key = consumer_key(consumer);
            let reset = match self.tree.get(&key).map_err(backend)? {
                Some(bytes) => match decode_group(&bytes)? {
                    Some(mut group) => {
                        for partition in &mut group.positions {
                            partition.position = 0;
                        }
                        encode_group(&group)
                    }
                    None => 0u64.to_be_bytes().to_vec(),
                },
                None => 0u64.to_be_bytes().to_vec(),
            };
            batch.insert(key, reset);
            for tag in [DEFERRED, PARKED] {
                for record in self
                    .tree
                    .scan_prefix(set_aside_prefix(tag, consumer))
                    .keys()
                {
                    batch.remove(record.map_err(backend)?);
                }
            }
        }
        for snapshot in self.tree.scan_prefix([SNAPSHOT]).keys() {
            batch.remove(snapshot.map_err(backend)?);
        }
        self.tree.apply_batch(batch).map_err(backend)?;
        let touched = consumers
            .iter()
            .map(|c| c.category.as_str().to_owned())
            .collect();
        Ok((Committed::default(), touched))
    }

    /// Creates a consumer's group unless it has one: every partition starts at the position of
    /// the layout before groups, if there is one.
    fn join_group(
        &mut self,
        group: &mut Staged,
        consumer: &ConsumerId,
        spec: GroupSpec,
    ) -> Result<Group, StoreError> {
        let mut staging = Staging {
            tree: &self.tree,
            group,
            own: Staged::new(),
        };
        let key = consumer_key(consumer);
        let start = match staging.get(&key)? {
            Some(bytes) => match decode_group(&bytes)? {
                Some(existing) => return Ok(existing),
                None => u64_be(&bytes),
            },
            None => 0,
        };
        let created = Group {
            spec,
            positions: vec![
                PartitionPosition {
                    position: start,
                    epoch: 0,
                };
                spec.partitions.max(1) as usize
            ],
        };
        staging.insert(key, encode_group(&created));
        let own = std::mem::take(&mut staging.own);
        group.extend(own);
        Ok(created)
    }

    /// Moves parked messages to their consumers' deferred sets, due at once. In the writer thread,
    /// like every write, so it cannot interleave with a rebuild that clears those sets.
    fn replay(
        &mut self,
        chosen: &[ParkedMessage],
    ) -> Result<(usize, BTreeSet<String>), StoreError> {
        let now = now_ms();
        let mut batch = sled::Batch::default();
        let mut moved = BTreeSet::new();
        let mut touched = BTreeSet::new();
        for park in chosen {
            let global = park.message.global_position;
            let parked = set_aside_key(PARKED, &park.consumer, global);
            if self.tree.get(&parked).map_err(backend)?.is_none() || !moved.insert(parked.clone()) {
                continue;
            }
            let defer = DeferredMessage {
                consumer: park.consumer.clone(),
                message: park.message.clone(),
                due_ms: now,
            };
            batch.remove(parked);
            batch.insert(
                set_aside_key(DEFERRED, &park.consumer, global),
                encode(&defer),
            );
            touched.insert(park.consumer.category.as_str().to_owned());
        }
        self.tree.apply_batch(batch).map_err(backend)?;
        Ok((moved.len(), touched))
    }
}
