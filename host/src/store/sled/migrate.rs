//! Opening a folder of an earlier layout. Each conversion writes the message log beside the old
//! data, then flips the format tag in one flushed batch, and only then removes what the old
//! layout kept: a crash before the flip leaves the old data whole (the next open starts the
//! conversion again), a crash after it leaves leftovers that [`finish`] removes.
//!
//! - `ferry-sled/1` kept one tree per kind of record, messages in `messages` by global position.
//! - `ferry-sled/2` kept everything in the `ferry` tree, the messages too: `m` category `\0`
//!   global → message JSON, `s` stream `\0` position → global, `i` id → the `m` key.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::log;
use super::*;

pub(super) const FORMAT_V1: &[u8] = b"ferry-sled/1";
pub(super) const FORMAT_V2: &[u8] = b"ferry-sled/2";
/// The keys of the `ferry-sled/2` message records, which `ferry-sled/3` keeps in its log.
const V2_MESSAGE: u8 = b'm';
const V2_STREAM: u8 = b's';
const V2_ID: u8 = b'i';
/// The trees of `ferry-sled/1`.
const V1_TREES: [&str; 10] = [
    "meta",
    "messages",
    "streams",
    "versions",
    "categories",
    "ids",
    "consumers",
    "views",
    "parked",
    "deferred",
];
/// Records written or removed per sled batch while converting.
const CHUNK: usize = 10_000;

/// The folder's format tag: the `ferry` tree's, or the `meta` tree's in the first layout.
pub(super) fn format(db: &sled::Db, tree: &Tree) -> Result<Option<Vec<u8>>, StoreError> {
    if let Some(tag) = tree.get(FORMAT_KEY).map_err(backend)? {
        return Ok(Some(tag.to_vec()));
    }
    if !db.tree_names().iter().any(|name| name.as_ref() == b"meta") {
        return Ok(None);
    }
    let meta = db.open_tree("meta").map_err(backend)?;
    Ok(meta.get("format").map_err(backend)?.map(|tag| tag.to_vec()))
}

fn head_of(tree: &Tree) -> Result<u64, StoreError> {
    Ok(tree
        .get(HEAD_KEY)
        .map_err(backend)?
        .map_or(0, |v| u64_be(&v)))
}

/// Writes `batch` once it holds [`CHUNK`] records, or always when `force`.
fn apply_chunk(
    tree: &Tree,
    batch: &mut sled::Batch,
    pending: &mut usize,
    force: bool,
) -> Result<(), StoreError> {
    if force || *pending >= CHUNK {
        *pending = 0;
        tree.apply_batch(std::mem::take(batch)).map_err(backend)?;
    }
    Ok(())
}

/// Converts a `ferry-sled/1` folder: its messages go to the log, its other records into the
/// `ferry` tree with the format tag in the final batch.
pub(super) fn migrate_v1(db: &sled::Db, tree: &Tree, log_dir: &Path) -> Result<(), StoreError> {
    tracing::info!("converting the store from format ferry-sled/1 to {FORMAT:?}");
    let old = |name: &str| db.open_tree(name).map_err(backend);
    let meta = old("meta")?;
    let head = meta.get("head").map_err(backend)?.map_or(0, |v| u64_be(&v));
    let messages = old("messages")?;
    log::write_log(
        log_dir,
        messages.iter().map(|entry| {
            let (_, json) = entry.map_err(backend)?;
            decode::<Message>("message", &json)
        }),
        head,
    )?;
    tree.clear().map_err(backend)?;
    let mut batch = sled::Batch::default();
    let mut pending = 0;
    for (name, tag) in [
        ("consumers", CONSUMER),
        ("views", VIEW),
        ("parked", PARKED),
        ("deferred", DEFERRED),
    ] {
        for entry in old(name)?.iter() {
            let (old_key, value) = entry.map_err(backend)?;
            let mut new_key = vec![tag];
            new_key.extend_from_slice(&old_key);
            batch.insert(new_key, value);
            pending += 1;
            apply_chunk(tree, &mut batch, &mut pending, false)?;
        }
    }
    batch.insert(HEAD_KEY, &head.to_be_bytes());
    batch.insert(FORMAT_KEY, FORMAT);
    apply_chunk(tree, &mut batch, &mut pending, true)?;
    db.flush().map_err(backend)?;
    finish(db, tree)
}

/// Converts a `ferry-sled/2` folder: its messages, read in global order across categories, go
/// to the log; then the tag flips and the old message records are removed.
pub(super) fn migrate_v2(db: &sled::Db, tree: &Tree, log_dir: &Path) -> Result<(), StoreError> {
    tracing::info!("converting the store from format ferry-sled/2 to {FORMAT:?}");
    let head = head_of(tree)?;
    log::write_log(log_dir, V2Messages::new(tree)?, head)?;
    tree.insert(FORMAT_KEY, FORMAT).map_err(backend)?;
    db.flush().map_err(backend)?;
    finish(db, tree)
}

/// Removes what an earlier layout left once the folder is of this one: the first layout's trees
/// and the second's message records. Cheap when there are none.
pub(super) fn finish(db: &sled::Db, tree: &Tree) -> Result<(), StoreError> {
    let mut removed = 0u64;
    for tag in [V2_MESSAGE, V2_STREAM, V2_ID] {
        loop {
            let keys: Vec<sled::IVec> = tree
                .scan_prefix([tag])
                .keys()
                .take(CHUNK)
                .collect::<Result<_, _>>()
                .map_err(backend)?;
            if keys.is_empty() {
                break;
            }
            removed += keys.len() as u64;
            let mut batch = sled::Batch::default();
            for key in keys {
                batch.remove(key);
            }
            tree.apply_batch(batch).map_err(backend)?;
        }
    }
    let names = db.tree_names();
    for name in V1_TREES {
        if names.iter().any(|n| n.as_ref() == name.as_bytes()) {
            db.drop_tree(name).map_err(backend)?;
            removed += 1;
        }
    }
    if removed > 0 {
        db.flush().map_err(backend)?;
        tracing::info!("removed {removed} records of the earlier layout");
    }
    Ok(())
}

/// The `m` records of a `ferry-sled/2` tree in global order: a merge of one ordered range per
/// category.
struct V2Messages {
    categories: Vec<sled::Iter>,
    heads: BinaryHeap<Reverse<(u64, usize)>>,
    /// The message at the head of each category, decoded.
    current: Vec<Option<Message>>,
}

impl V2Messages {
    fn new(tree: &Tree) -> Result<Self, StoreError> {
        let mut merged = Self {
            categories: Vec::new(),
            heads: BinaryHeap::new(),
            current: Vec::new(),
        };
        // Keys are `m` category `\0` global: the first key at or after `m` category `\1` starts
        // the next category (names hold no `\0` or `\1`).
        let mut from = vec![V2_MESSAGE];
        while let Some(found) = tree.range(from.clone()..).keys().next() {
            let found = found.map_err(backend)?;
            if found.first() != Some(&V2_MESSAGE) {
                break;
            }
            let end = found.iter().position(|b| *b == 0).unwrap_or(found.len());
            let mut prefix = found[..end].to_vec();
            prefix.push(0);
            let source = merged.categories.len();
            merged.categories.push(tree.scan_prefix(&prefix));
            merged.current.push(None);
            merged.pull(source)?;
            prefix.pop();
            prefix.push(1);
            from = prefix;
        }
        Ok(merged)
    }

    fn pull(&mut self, source: usize) -> Result<(), StoreError> {
        if let Some(entry) = self.categories[source].next() {
            let (_, json) = entry.map_err(backend)?;
            let message: Message = decode("message", &json)?;
            self.heads.push(Reverse((message.global_position, source)));
            self.current[source] = Some(message);
        }
        Ok(())
    }

    fn next_message(&mut self) -> Result<Option<Message>, StoreError> {
        let Some(Reverse((_, source))) = self.heads.pop() else {
            return Ok(None);
        };
        let message = self.current[source].take();
        self.pull(source)?;
        Ok(message)
    }
}

impl Iterator for V2Messages {
    type Item = Result<Message, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_message().transpose()
    }
}
