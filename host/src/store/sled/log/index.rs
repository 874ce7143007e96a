//! The log's index: which messages belong to a stream, a category, or carry an id, as entries of
//! a hashed name, an order and a location (see [`Entry`]). New entries go to a sorted table in
//! memory; when it holds [`MEMTABLE_ENTRIES`] it is written out as an immutable run, and a
//! background thread merges runs of one size, [`MERGE_WIDTH`] at a time, into one four times
//! larger: a size-tiered log-structured merge, the shape EventStoreDB gives its stream index.
//! Memory is the table being filled plus each run's filter and fences, not the history.
//!
//! The `manifest` file names the runs and the last message they cover, with the log location
//! after it; it is replaced atomically (written beside, synced, renamed). Entries in memory are
//! not saved: opening replays the log from that location. A file the manifest does not name (a
//! merge cut short) is removed when the index opens.
//!
//! The index is never believed over the log: a run that fails its checks when opened, a block
//! that fails its checksum when read, or an entry that disagrees with the message it points to
//! (see `MessageLog::verified`) has the whole index rebuilt from the log, logged.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::run::{Entry, Run};
use super::segment::{Location, sync_dir};
use crate::store::StoreError;

/// Entries held in memory before they are written out as a run (3 per message, 24 bytes each).
pub(super) const MEMTABLE_ENTRIES: usize = 1 << 17;
/// Runs merged at once; a merged run is about this many times larger than each of its inputs.
const MERGE_WIDTH: usize = 4;
const MANIFEST: &str = "manifest";

fn poisoned() -> StoreError {
    StoreError::Backend("message index: a thread panicked while holding it".into())
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("message index: {what}: {e}"))
}

/// The manifest as written: its fields and the CRC-32 of their JSON text, so that a damaged
/// manifest is rebuilt from the log rather than believed (one written before it had a checksum
/// is read as it is).
#[derive(Serialize, Deserialize)]
struct Checked {
    manifest: Manifest,
    crc32: u32,
}

impl Manifest {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let text = serde_json::to_vec(self).map_err(|e| io("encoding", e.into()))?;
        let crc32 = crc32fast::hash(&text);
        serde_json::to_vec(&Checked {
            manifest: self.clone(),
            crc32,
        })
        .map_err(|e| io("encoding", e.into()))
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        match serde_json::from_slice::<Checked>(bytes) {
            Ok(checked) => {
                let text = serde_json::to_vec(&checked.manifest).map_err(|e| e.to_string())?;
                match crc32fast::hash(&text) == checked.crc32 {
                    true => Ok(checked.manifest),
                    false => Err("its checksum does not match".into()),
                }
            }
            // Written before manifests had a checksum.
            Err(_) => serde_json::from_slice::<Manifest>(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// The index's files as `ferry store check` reads them, changing nothing: the last message the
/// runs cover and the runs, or why they cannot be believed (opening rebuilds them then).
pub(super) fn read_on_disk(dir: &Path) -> Result<(u64, Vec<Run>), String> {
    let manifest = match fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => Manifest::decode(&bytes).map_err(|e| format!("its manifest: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
        Err(e) => return Err(format!("its manifest cannot be read: {e}")),
    };
    let runs = manifest
        .runs
        .iter()
        .map(|name| Run::open(&dir.join(name)).map_err(|e| e.to_string()))
        .collect::<Result<Vec<Run>, String>>()?;
    Ok((manifest.indexed_to, runs))
}

/// What the index has written out, as on disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    runs: Vec<String>,
    /// The global position of the last message the runs index.
    indexed_to: u64,
    /// The log location just after that message: where opening replays from.
    log_end: Location,
    /// The number the next run's file takes.
    next_run: u64,
}

#[derive(Debug, Default)]
struct Tables {
    /// Entries not yet in a run, and the last message and log location they cover.
    active: BTreeSet<Entry>,
    active_to: (u64, Location),
    /// A full table being written out as a run; readers still search it.
    frozen: Option<Arc<BTreeSet<Entry>>>,
    /// Oldest first; each covers later messages than the one before.
    runs: Vec<Arc<Run>>,
}

#[derive(Debug)]
pub(super) struct Index {
    dir: PathBuf,
    tables: RwLock<Tables>,
    /// The manifest as on disk; held while it is rewritten and the runs it names are swapped.
    manifest: Mutex<Manifest>,
    /// Set when the store closes: a merge in progress stops.
    closing: AtomicBool,
    /// When writing an index file last failed: none is written for a while after.
    failed_at: Mutex<Option<std::time::Instant>>,
    /// Set when a reader found an entry that disagrees with the log.
    disagrees: AtomicBool,
}

/// How long index files are not written after a write failed.
const WRITE_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

impl Index {
    /// Opens the index in `dir`. A run that cannot be read drops the whole index: it is rebuilt
    /// from the log, which is the truth.
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io("creating its folder", e))?;
        let manifest: Manifest = match fs::read(dir.join(MANIFEST)) {
            Ok(bytes) => Manifest::decode(&bytes).unwrap_or_else(|e| {
                tracing::warn!("message index manifest unreadable ({e}); rebuilding the index");
                Manifest::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(e) => return Err(io("reading the manifest", e)),
        };
        let opened: Result<Vec<Arc<Run>>, StoreError> = manifest
            .runs
            .iter()
            .map(|name| Run::open(&dir.join(name)).map(Arc::new))
            .collect();
        let (manifest, runs) = match opened {
            Ok(runs) => (manifest, runs),
            Err(e) => {
                tracing::warn!("{e}; rebuilding the message index from the log");
                (
                    Manifest {
                        next_run: manifest.next_run,
                        ..Manifest::default()
                    },
                    Vec::new(),
                )
            }
        };
        let index = Self {
            dir: dir.to_path_buf(),
            tables: RwLock::new(Tables {
                active_to: (manifest.indexed_to, manifest.log_end),
                runs,
                ..Tables::default()
            }),
            manifest: Mutex::new(manifest),
            closing: AtomicBool::new(false),
            failed_at: Mutex::new(None),
            disagrees: AtomicBool::new(false),
        };
        index.remove_strays()?;
        Ok(index)
    }

    /// Removes files the manifest does not name.
    fn remove_strays(&self) -> Result<(), StoreError> {
        let manifest = self.manifest.lock().map_err(|_| poisoned())?;
        for entry in fs::read_dir(&self.dir).map_err(|e| io("listing", e))? {
            let name = entry.map_err(|e| io("listing", e))?.file_name();
            let name = name.to_string_lossy();
            if name != MANIFEST && !manifest.runs.iter().any(|r| *r == name) {
                fs::remove_file(self.dir.join(&*name)).map_err(|e| io("removing a stray", e))?;
            }
        }
        Ok(())
    }

    /// Forgets every run: the log is replayed from its start.
    pub(super) fn reset(&self) -> Result<(), StoreError> {
        let mut manifest = self.manifest.lock().map_err(|_| poisoned())?;
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        *manifest = Manifest {
            next_run: manifest.next_run,
            ..Manifest::default()
        };
        self.write_manifest(&manifest)?;
        for run in tables.runs.drain(..) {
            run.remove()?;
        }
        *tables = Tables::default();
        Ok(())
    }

    /// The last message written out, and the log location after it.
    pub(super) fn indexed_to(&self) -> Result<(u64, Location), StoreError> {
        let manifest = self.manifest.lock().map_err(|_| poisoned())?;
        Ok((manifest.indexed_to, manifest.log_end))
    }

    /// Adds entries of messages up to `last_global`, which end the log at `log_end`.
    pub(super) fn publish(
        &self,
        entries: impl IntoIterator<Item = Entry>,
        last_global: u64,
        log_end: Location,
    ) -> Result<(), StoreError> {
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        tables.active.extend(entries);
        tables.active_to = (last_global, log_end);
        Ok(())
    }

    /// Writes the table in memory out as a run once it is full; whether it did (a merge may be
    /// due then).
    pub(super) fn flush_if_full(&self) -> Result<bool, StoreError> {
        if self.backing_off()? {
            return Ok(false);
        }
        match self.write_table() {
            Ok(wrote) => Ok(wrote),
            Err(e) => {
                // The table stays in memory (the log is the truth, and opening replays it past
                // the last run), so the commits it indexes stand; it is written out again
                // later.
                tracing::warn!(
                    "writing the message index out failed, trying again in {WRITE_BACKOFF:?}: {e}"
                );
                self.back_off()?;
                Ok(false)
            }
        }
    }

    /// Whether index files are not written now, after a write failed (a full disk) a moment ago.
    fn backing_off(&self) -> Result<bool, StoreError> {
        let failed = self.failed_at.lock().map_err(|_| poisoned())?;
        Ok(failed.is_some_and(|at| at.elapsed() < WRITE_BACKOFF))
    }

    fn back_off(&self) -> Result<(), StoreError> {
        *self.failed_at.lock().map_err(|_| poisoned())? = Some(std::time::Instant::now());
        Ok(())
    }

    fn write_table(&self) -> Result<bool, StoreError> {
        let (frozen, (last_global, log_end)) = {
            let mut tables = self.tables.write().map_err(|_| poisoned())?;
            if tables.active.len() < MEMTABLE_ENTRIES {
                return Ok(false);
            }
            let frozen = Arc::new(std::mem::take(&mut tables.active));
            tables.frozen = Some(frozen.clone());
            (frozen, tables.active_to)
        };
        let mut manifest = self.manifest.lock().map_err(|_| poisoned())?;
        let replaced = {
            let tables = self.tables.read().map_err(|_| poisoned())?;
            !tables
                .frozen
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(f, &frozen))
        };
        if replaced {
            // A rebuild took the table over while this waited for the manifest.
            return Ok(false);
        }
        let name = format!("{:08}.run", manifest.next_run);
        let keys = count_keys(&frozen);
        let mut next = manifest.clone();
        next.runs.push(name.clone());
        next.next_run += 1;
        next.indexed_to = last_global;
        next.log_end = log_end;
        let written = Run::write(
            &self.dir.join(&name),
            frozen.iter().map(|e| Ok(*e)),
            keys,
            last_global,
        )
        .and_then(|run| self.write_manifest(&next).map(|()| run));
        let run = match written {
            Ok(run) => run,
            Err(e) => {
                // Nothing of it is left behind, and its entries go back into the table.
                let _ = fs::remove_file(self.dir.join(&name));
                let mut tables = self.tables.write().map_err(|_| poisoned())?;
                tables.active.extend(frozen.iter().copied());
                tables.frozen = None;
                return Err(e);
            }
        };
        *manifest = next;
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        tables.runs.push(Arc::new(run));
        tables.frozen = None;
        Ok(true)
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let path = self.dir.join(MANIFEST);
        let next = self.dir.join("manifest.next");
        let bytes = manifest.encode()?;
        let mut file = fs::File::create(&next).map_err(|e| io("writing the manifest", e))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io("writing the manifest", e))?;
        fs::rename(&next, &path).map_err(|e| io("replacing the manifest", e))?;
        sync_dir(&self.dir)
    }

    /// The entries of `key` with `seq >= from`, in order, at most `limit`. Runs whose messages
    /// all come before global `min_global` are skipped (a category's `seq` is the global
    /// position, so its reads pass `from` here).
    pub(super) fn scan(
        &self,
        key: u64,
        from: u64,
        limit: usize,
        min_global: u64,
    ) -> Result<Vec<Entry>, StoreError> {
        let start = Entry {
            key,
            seq: from,
            at: 0,
        };
        let end = Entry {
            key,
            seq: u64::MAX,
            at: u64::MAX,
        };
        let (mut found, frozen, runs) = {
            let tables = self.tables.read().map_err(|_| poisoned())?;
            let found: Vec<Entry> = tables
                .active
                .range(start..=end)
                .take(limit)
                .copied()
                .collect();
            (found, tables.frozen.clone(), tables.runs.clone())
        };
        if let Some(frozen) = frozen {
            found.extend(frozen.range(start..=end).take(limit));
        }
        for run in runs.iter().filter(|r| r.last_global >= min_global) {
            let mut from_run = Vec::new();
            run.scan(key, from, limit, &mut from_run)?;
            found.extend(from_run);
        }
        found.sort_unstable();
        found.dedup();
        found.truncate(limit);
        Ok(found)
    }

    /// The last entry of `key`: the newest place holding the key holds its last entry, since
    /// `seq` grows with the global position for streams and categories alike.
    pub(super) fn last(&self, key: u64) -> Result<Option<Entry>, StoreError> {
        let range = Entry { key, seq: 0, at: 0 }..=Entry {
            key,
            seq: u64::MAX,
            at: u64::MAX,
        };
        let (frozen, runs) = {
            let tables = self.tables.read().map_err(|_| poisoned())?;
            if let Some(entry) = tables.active.range(range.clone()).next_back() {
                return Ok(Some(*entry));
            }
            (tables.frozen.clone(), tables.runs.clone())
        };
        if let Some(entry) = frozen.and_then(|f| f.range(range).next_back().copied()) {
            return Ok(Some(entry));
        }
        for run in runs.iter().rev() {
            if let Some(entry) = run.last(key)? {
                return Ok(Some(entry));
            }
        }
        Ok(None)
    }

    /// Merges runs of one size while there are [`MERGE_WIDTH`] of them side by side. Runs on the
    /// merging thread; reads and the writer go on meanwhile.
    pub(super) fn merge_due(&self) -> Result<(), StoreError> {
        if self.backing_off()? {
            return Ok(());
        }
        while let Some(inputs) = self.due()? {
            match self.merge(&inputs) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => {
                    self.back_off()?;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn due(&self) -> Result<Option<Vec<Arc<Run>>>, StoreError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        let levels: Vec<u32> = tables.runs.iter().map(|r| level(r.entries())).collect();
        Ok(levels
            .windows(MERGE_WIDTH)
            .position(|w| w.iter().all(|l| *l == w[0]))
            .map(|start| tables.runs[start..start + MERGE_WIDTH].to_vec()))
    }

    /// Merges `inputs` (side by side in the list) into one run; false when the store closed
    /// first.
    fn merge(&self, inputs: &[Arc<Run>]) -> Result<bool, StoreError> {
        let name = {
            let mut manifest = self.manifest.lock().map_err(|_| poisoned())?;
            manifest.next_run += 1;
            format!("{:08}.run", manifest.next_run - 1)
        };
        let path = self.dir.join(&name);
        let keys = inputs.iter().map(|r| r.keys()).sum();
        let last_global = inputs.iter().map(|r| r.last_global).max().unwrap_or(0);
        let merged = Run::write(
            &path,
            MergedEntries::new(inputs, &self.closing),
            keys,
            last_global,
        );
        if self.closing.load(Ordering::Acquire) {
            let _ = fs::remove_file(&path);
            return Ok(false);
        }
        let merged = match merged {
            Ok(merged) => Arc::new(merged),
            Err(e) => {
                // A merge that failed (a full disk) leaves nothing behind.
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        let mut manifest = self.manifest.lock().map_err(|_| poisoned())?;
        let mut next = manifest.clone();
        let names: Vec<String> = inputs
            .iter()
            .filter_map(|r| r.path().file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let Some(start) = next.runs.iter().position(|r| *r == names[0]) else {
            // A rebuild replaced the inputs meanwhile: the merge is of no use.
            let _ = fs::remove_file(&path);
            return Ok(true);
        };
        next.runs.splice(start..start + inputs.len(), [name]);
        if let Err(e) = self.write_manifest(&next) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        *manifest = next;
        {
            let mut tables = self.tables.write().map_err(|_| poisoned())?;
            tables.runs.splice(start..start + inputs.len(), [merged]);
        }
        for run in inputs {
            run.remove()?;
        }
        Ok(true)
    }

    /// Notes that an entry disagreed with the message it points to.
    pub(super) fn mark_damaged(&self) {
        self.disagrees.store(true, Ordering::Release);
    }

    /// Whether a run failed a check or an entry disagreed with the log since the last rebuild.
    pub(super) fn is_damaged(&self) -> Result<bool, StoreError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        Ok(self.disagrees.load(Ordering::Acquire) || tables.runs.iter().any(|r| r.is_damaged()))
    }

    /// Replaces every run and the table with entries rebuilt from the log, up to where the index
    /// reaches now: `read_log(end)` gives, for each message before the log location `end` in
    /// order, its global position, the location after it and its entries. Readers and the writer
    /// wait meanwhile. On failure (a full disk) the index is left as it was; when no damage is
    /// left (another reader rebuilt it first), nothing is done.
    pub(super) fn rebuild<I>(&self, read_log: impl FnOnce(Location) -> I) -> Result<(), StoreError>
    where
        I: Iterator<Item = Result<(u64, Location, [Entry; 3]), StoreError>>,
    {
        let mut manifest = self.manifest.lock().map_err(|_| poisoned())?;
        let mut tables = self.tables.write().map_err(|_| poisoned())?;
        let damaged =
            self.disagrees.load(Ordering::Acquire) || tables.runs.iter().any(|r| r.is_damaged());
        if !damaged {
            // Another reader that met the damage rebuilt it first.
            return Ok(());
        }
        let (last_global, log_end) = tables.active_to;
        let mut next = Manifest {
            next_run: manifest.next_run,
            ..Manifest::default()
        };
        let mut table = BTreeSet::new();
        let mut runs = Vec::new();
        let built = || -> Result<(), StoreError> {
            let mut last = 0;
            for item in read_log(log_end) {
                let (global, after, entries) = item?;
                table.extend(entries);
                last = global;
                if table.len() >= MEMTABLE_ENTRIES {
                    let name = format!("{:08}.run", next.next_run);
                    next.next_run += 1;
                    let run = Run::write(
                        &self.dir.join(&name),
                        table.iter().map(|e| Ok(*e)),
                        count_keys(&table),
                        global,
                    )?;
                    runs.push(Arc::new(run));
                    next.runs.push(name);
                    next.indexed_to = global;
                    next.log_end = after;
                    table.clear();
                }
            }
            if last != last_global {
                return Err(StoreError::Backend(format!(
                    "message index: rebuilding it read the log to message {last}, not \
                     {last_global}"
                )));
            }
            self.write_manifest(&next)
        };
        if let Err(e) = built() {
            for name in &next.runs {
                let _ = fs::remove_file(self.dir.join(name));
            }
            return Err(e);
        }
        for run in &tables.runs {
            let _ = run.remove();
        }
        *manifest = next;
        *tables = Tables {
            active: table,
            active_to: (last_global, log_end),
            frozen: None,
            runs,
        };
        self.disagrees.store(false, Ordering::Release);
        Ok(())
    }

    /// Stops a merge in progress (the store is closing).
    pub(super) fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Runs, entries in them, their bytes, and entries in memory.
    pub(super) fn account(&self) -> Result<(usize, u64, u64, usize), StoreError> {
        let tables = self.tables.read().map_err(|_| poisoned())?;
        Ok((
            tables.runs.len(),
            tables.runs.iter().map(|r| r.entries()).sum(),
            tables.runs.iter().map(|r| r.bytes()).sum(),
            tables.active.len() + tables.frozen.as_ref().map_or(0, |f| f.len()),
        ))
    }
}

/// A run's size class: runs of one level are merged together.
fn level(entries: u64) -> u32 {
    let mut level = 0;
    let mut bound = (MEMTABLE_ENTRIES * 2) as u64;
    while entries > bound {
        level += 1;
        bound = bound.saturating_mul(MERGE_WIDTH as u64);
    }
    level
}

fn count_keys(entries: &BTreeSet<Entry>) -> u64 {
    let mut keys = 0;
    let mut previous = None;
    for entry in entries {
        if previous != Some(entry.key) {
            keys += 1;
            previous = Some(entry.key);
        }
    }
    keys
}

/// The entries of several runs in order: a k-way merge, stopping with an error when the store
/// closes.
struct MergedEntries<'a> {
    sources: Vec<Box<dyn Iterator<Item = Result<Entry, StoreError>> + 'a>>,
    heads: Vec<Option<Entry>>,
    closing: &'a AtomicBool,
    failed: Option<StoreError>,
}

impl<'a> MergedEntries<'a> {
    fn new(runs: &'a [Arc<Run>], closing: &'a AtomicBool) -> Self {
        let mut merged = Self {
            sources: runs
                .iter()
                .map(|r| Box::new(r.iter()) as Box<dyn Iterator<Item = _>>)
                .collect(),
            heads: Vec::new(),
            closing,
            failed: None,
        };
        for n in 0..merged.sources.len() {
            let head = merged.pull(n);
            merged.heads.push(head);
        }
        merged
    }

    fn pull(&mut self, source: usize) -> Option<Entry> {
        match self.sources[source].next() {
            Some(Ok(entry)) => Some(entry),
            Some(Err(e)) => {
                self.failed = Some(e);
                None
            }
            None => None,
        }
    }
}

impl Iterator for MergedEntries<'_> {
    type Item = Result<Entry, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        if self.closing.load(Ordering::Relaxed) {
            return Some(Err(StoreError::Closed));
        }
        let (source, entry) = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(n, head)| head.map(|e| (n, e)))
            .min_by_key(|(_, e)| *e)?;
        self.heads[source] = self.pull(source);
        Some(Ok(entry))
    }
}
