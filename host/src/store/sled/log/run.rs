//! One immutable run of the index: entries sorted by (key, seq, location), written once and
//! never changed, then merged into larger runs (see `index`). The file is the sorted entries
//! (24 bytes each), a Bloom filter over their keys, the first entry of every block (its fences),
//! the CRC-32 of every block, and a footer whose checksum covers all but the entries. The
//! fences and checksums are read into memory when the run is opened, and so is the filter of a
//! small run; a large run's filter is read from the file, 64 bytes per lookup, so that memory
//! does not grow with the history. A lookup is a probe of the filter and one read of a block,
//! checked against its checksum: a damaged block is an error ([`Run::is_damaged`]), never a
//! wrong answer.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::segment::Location;
use crate::store::StoreError;

/// Entries per block: one read of 4 KB fetches a block.
const BLOCK: usize = 170;
const ENTRY: usize = 24;
/// `FERRYIX1` runs had no block checksums: the index is rebuilt from the log when it meets one.
const MAGIC: &[u8; 8] = b"FERRYIX2";
/// A block's checksum: a CRC-32.
const BLOCK_CRC: usize = 4;
const FOOTER: usize = 8 * 8;
/// Bloom filter bits per key and probes: about 1% false positives.
const BITS_PER_KEY: u64 = 10;
const PROBES: u64 = 7;
/// A filter block: one key's probes all fall in one block of this many 64-bit words (64 bytes,
/// one read from the file).
const FILTER_BLOCK_WORDS: usize = 8;
/// Filters up to this size stay in memory (runs of up to ~200 000 distinct keys: the two smallest
/// levels of the merge, so a bounded number of them); larger ones are read from the file.
const FILTER_IN_MEMORY_BYTES: usize = 256 << 10;

/// One index entry: a hashed name (`key`), an order within it (`seq`: the stream position, the
/// global position for a category, 0 for an id) and where the message is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Entry {
    pub key: u64,
    pub seq: u64,
    pub at: Location,
}

impl Entry {
    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.key.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.at.to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Self {
        let word = |n: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[n * 8..n * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Self {
            key: word(0),
            seq: word(1),
            at: word(2),
        }
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("message index {}: {what}: {e}", path.display()))
}

/// A blocked Bloom filter over keys that are already uniform hashes: the key picks a block of
/// [`FILTER_BLOCK_WORDS`] words and its probes, derived from the key itself (double hashing),
/// fall in that block. So it needs no hasher of its own, its bits are stable on disk, and a
/// filter left on disk answers with one read.
#[derive(Debug)]
struct Bloom {
    words: Vec<u64>,
}

impl Bloom {
    fn with_keys(keys: u64) -> Self {
        let block_bits = (FILTER_BLOCK_WORDS * 64) as u64;
        let blocks = (keys.max(1) * BITS_PER_KEY).div_ceil(block_bits);
        Self {
            words: vec![0; blocks as usize * FILTER_BLOCK_WORDS],
        }
    }

    /// The block of `key` in a filter of `blocks` blocks.
    fn block_of(key: u64, blocks: u64) -> u64 {
        ((u128::from(key) * u128::from(blocks)) >> 64) as u64
    }

    /// The probes of `key` within its block: (word in the block, bit mask).
    fn probes(key: u64) -> impl Iterator<Item = (usize, u64)> {
        let first = key.rotate_left(21);
        let step = key.rotate_left(42) | 1;
        (0..PROBES).map(move |i| {
            let bit = first.wrapping_add(i.wrapping_mul(step)) % (FILTER_BLOCK_WORDS as u64 * 64);
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn blocks(&self) -> u64 {
        (self.words.len() / FILTER_BLOCK_WORDS) as u64
    }

    fn insert(&mut self, key: u64) {
        let start = Self::block_of(key, self.blocks()) as usize * FILTER_BLOCK_WORDS;
        for (word, mask) in Self::probes(key) {
            self.words[start + word] |= mask;
        }
    }

    fn block_may_hold(block: &[u64], key: u64) -> bool {
        Self::probes(key).all(|(word, mask)| block[word] & mask != 0)
    }

    fn may_hold(&self, key: u64) -> bool {
        let start = Self::block_of(key, self.blocks()) as usize * FILTER_BLOCK_WORDS;
        Self::block_may_hold(&self.words[start..start + FILTER_BLOCK_WORDS], key)
    }
}

/// Where a run's filter is: in memory, or in its file at `offset` with `blocks` blocks.
#[derive(Debug)]
enum Filter {
    InMemory(Bloom),
    InFile { offset: u64, blocks: u64 },
}

impl Filter {
    fn keep(bloom: Bloom, offset: u64) -> Self {
        if bloom.words.len() * 8 <= FILTER_IN_MEMORY_BYTES {
            Self::InMemory(bloom)
        } else {
            Self::InFile {
                offset,
                blocks: bloom.blocks(),
            }
        }
    }

    fn words(&self) -> u64 {
        match self {
            Self::InMemory(bloom) => bloom.words.len() as u64,
            Self::InFile { blocks, .. } => blocks * FILTER_BLOCK_WORDS as u64,
        }
    }
}

/// An open run.
#[derive(Debug)]
pub(super) struct Run {
    path: PathBuf,
    file: File,
    entries: u64,
    /// Distinct keys, an upper bound once runs are merged (it sizes the merged run's filter).
    keys: u64,
    filter: Filter,
    fences: Vec<Entry>,
    /// The CRC-32 of each block's bytes, checked at every read of the block.
    block_crcs: Vec<u32>,
    /// Set once a block failed its checksum.
    damaged: AtomicBool,
    /// The largest global position of a message the run indexes.
    pub last_global: u64,
}

impl Run {
    pub(super) fn entries(&self) -> u64 {
        self.entries
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn bytes(&self) -> u64 {
        self.entries * ENTRY as u64
            + self.filter.words() * 8
            + self.fences.len() as u64 * (ENTRY + BLOCK_CRC) as u64
            + FOOTER as u64
    }

    /// Writes `entries` (sorted, at most `keys` distinct keys) as a run at `path`, durably.
    pub(super) fn write(
        path: &Path,
        entries: impl Iterator<Item = Result<Entry, StoreError>>,
        keys: u64,
        last_global: u64,
    ) -> Result<Self, StoreError> {
        // Read and write: the run is searched through this handle once written.
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("creating", path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut bloom = Bloom::with_keys(keys);
        let mut fences = Vec::new();
        let mut block_crcs = Vec::new();
        let mut block_crc = crc32fast::Hasher::new();
        let mut count = 0u64;
        let mut previous: Option<Entry> = None;
        let mut distinct = 0u64;
        let mut bytes = [0u8; ENTRY];
        for entry in entries {
            let entry = entry?;
            if previous.is_some_and(|p| p >= entry) {
                return Err(StoreError::Backend(format!(
                    "message index {}: entries out of order",
                    path.display()
                )));
            }
            if previous.is_none_or(|p| p.key != entry.key) {
                bloom.insert(entry.key);
                distinct += 1;
            }
            if count.is_multiple_of(BLOCK as u64) {
                if count > 0 {
                    block_crcs.push(std::mem::take(&mut block_crc).finalize());
                }
                fences.push(entry);
            }
            entry.encode(&mut bytes);
            block_crc.update(&bytes);
            out.write_all(&bytes).map_err(|e| io("writing", path, e))?;
            count += 1;
            previous = Some(entry);
        }
        if count > 0 {
            block_crcs.push(block_crc.finalize());
        }
        let mut tail =
            Vec::with_capacity(bloom.words.len() * 8 + fences.len() * (ENTRY + BLOCK_CRC) + FOOTER);
        for word in &bloom.words {
            tail.extend_from_slice(&word.to_le_bytes());
        }
        for fence in &fences {
            let at = tail.len();
            tail.resize(at + ENTRY, 0);
            fence.encode(&mut tail[at..]);
        }
        for crc in &block_crcs {
            tail.extend_from_slice(&crc.to_le_bytes());
        }
        let footer_at = tail.len();
        tail.extend_from_slice(MAGIC);
        for word in [
            count,
            bloom.words.len() as u64,
            fences.len() as u64,
            distinct,
            last_global,
            // Reserved.
            0,
        ] {
            tail.extend_from_slice(&word.to_le_bytes());
        }
        let crc = crc32fast::hash(&tail);
        tail.extend_from_slice(&u64::from(crc).to_le_bytes());
        debug_assert_eq!(tail.len() - footer_at, FOOTER);
        out.write_all(&tail).map_err(|e| io("writing", path, e))?;
        let file = out
            .into_inner()
            .map_err(|e| io("writing", path, e.into_error()))?;
        file.sync_all().map_err(|e| io("syncing", path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries: count,
            keys: distinct,
            filter: Filter::keep(bloom, count * ENTRY as u64),
            fences,
            block_crcs,
            damaged: AtomicBool::new(false),
            last_global,
        })
    }

    /// Opens a run written by [`Run::write`]; its filter, fences, block checksums and footer are
    /// checked (the blocks themselves at each read).
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let damaged = |why: &str| {
            StoreError::Backend(format!(
                "message index {} is damaged: {why}",
                path.display()
            ))
        };
        let file = File::open(path).map_err(|e| io("opening", path, e))?;
        let len = file.metadata().map_err(|e| io("opening", path, e))?.len();
        if len < FOOTER as u64 {
            return Err(damaged("it is shorter than its footer"));
        }
        let mut footer = [0u8; FOOTER];
        file.read_exact_at(&mut footer, len - FOOTER as u64)
            .map_err(|e| io("reading", path, e))?;
        if &footer[..8] == b"FERRYIX1" {
            return Err(damaged(
                "it was written before index blocks had checksums (it is rebuilt once)",
            ));
        }
        if &footer[..8] != MAGIC {
            return Err(damaged("it does not start its footer with the run's mark"));
        }
        let word = |n: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&footer[8 + n * 8..16 + n * 8]);
            u64::from_le_bytes(w)
        };
        let (entries, words, fence_count, keys, last_global, crc) =
            (word(0), word(1), word(2), word(3), word(4), word(6));
        let tail_len = words
            .saturating_mul(8)
            .saturating_add(fence_count.saturating_mul((ENTRY + BLOCK_CRC) as u64));
        if entries.saturating_mul(ENTRY as u64) + tail_len + FOOTER as u64 != len
            || fence_count != entries.div_ceil(BLOCK as u64)
        {
            return Err(damaged("its length does not match its footer"));
        }
        let mut tail = vec![0u8; tail_len as usize];
        file.read_exact_at(&mut tail, entries * ENTRY as u64)
            .map_err(|e| io("reading", path, e))?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&tail);
        hasher.update(&footer[..FOOTER - 8]);
        if u64::from(hasher.finalize()) != crc {
            return Err(damaged("its checksum does not match"));
        }
        let (bloom_bytes, fence_bytes) = tail.split_at(words as usize * 8);
        let bloom = Bloom {
            words: bloom_bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
                .collect(),
        };
        if bloom.words.is_empty() || !bloom.words.len().is_multiple_of(FILTER_BLOCK_WORDS) {
            return Err(damaged("its filter is not whole blocks"));
        }
        let (fence_bytes, crc_bytes) = fence_bytes.split_at(fence_count as usize * ENTRY);
        let fences = fence_bytes.chunks_exact(ENTRY).map(Entry::decode).collect();
        let block_crcs = crc_bytes
            .chunks_exact(BLOCK_CRC)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
            keys,
            filter: Filter::keep(bloom, entries * ENTRY as u64),
            fences,
            block_crcs,
            damaged: AtomicBool::new(false),
            last_global,
        })
    }

    pub(super) fn keys(&self) -> u64 {
        self.keys
    }

    /// Whether the run may hold `key` (false: it surely does not).
    fn may_hold(&self, key: u64) -> Result<bool, StoreError> {
        match &self.filter {
            Filter::InMemory(bloom) => Ok(bloom.may_hold(key)),
            Filter::InFile { offset, blocks } => {
                let mut bytes = [0u8; FILTER_BLOCK_WORDS * 8];
                let at = offset + Bloom::block_of(key, *blocks) * bytes.len() as u64;
                self.file
                    .read_exact_at(&mut bytes, at)
                    .map_err(|e| io("reading", &self.path, e))?;
                let mut block = [0u64; FILTER_BLOCK_WORDS];
                for (word, chunk) in block.iter_mut().zip(bytes.chunks_exact(8)) {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(chunk);
                    *word = u64::from_le_bytes(w);
                }
                Ok(Bloom::block_may_hold(&block, key))
            }
        }
    }

    /// Whether a block of the run failed its checksum: the index is to be rebuilt.
    pub(super) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Acquire)
    }

    fn block(&self, number: usize) -> Result<Vec<Entry>, StoreError> {
        let first = number * BLOCK;
        let count = BLOCK.min(self.entries as usize - first);
        let mut bytes = vec![0u8; count * ENTRY];
        self.file
            .read_exact_at(&mut bytes, (first * ENTRY) as u64)
            .map_err(|e| io("reading", &self.path, e))?;
        if self.block_crcs.get(number) != Some(&crc32fast::hash(&bytes)) {
            self.damaged.store(true, Ordering::Release);
            return Err(StoreError::Backend(format!(
                "message index {} is damaged: block {number} (bytes {} to {}) does not match its \
                 checksum",
                self.path.display(),
                first * ENTRY,
                (first + count) * ENTRY
            )));
        }
        let fence = self.fences.get(number).copied();
        let entries: Vec<Entry> = bytes.chunks_exact(ENTRY).map(Entry::decode).collect();
        if entries.first().copied() != fence {
            self.damaged.store(true, Ordering::Release);
            return Err(StoreError::Backend(format!(
                "message index {} is damaged: block {number} does not start with its fence",
                self.path.display()
            )));
        }
        Ok(entries)
    }

    /// Appends to `out` the entries of `key` with `seq >= from`, in order, until `out` holds
    /// `limit`.
    pub(super) fn scan(
        &self,
        key: u64,
        from: u64,
        limit: usize,
        out: &mut Vec<Entry>,
    ) -> Result<(), StoreError> {
        if self.fences.is_empty() || !self.may_hold(key)? {
            return Ok(());
        }
        let start = Entry {
            key,
            seq: from,
            at: 0,
        };
        // The block holding the first entry at or after `start`: the last one whose first entry
        // is before it.
        let mut block = self
            .fences
            .partition_point(|f| *f < start)
            .saturating_sub(1);
        while block < self.fences.len() && out.len() < limit {
            for entry in self.block(block)? {
                if entry < start {
                    continue;
                }
                if entry.key != key || out.len() >= limit {
                    return Ok(());
                }
                out.push(entry);
            }
            block += 1;
        }
        Ok(())
    }

    /// The last entry of `key`, if the run has one.
    pub(super) fn last(&self, key: u64) -> Result<Option<Entry>, StoreError> {
        if !self.may_hold(key)? {
            return Ok(None);
        }
        let end = Entry {
            key,
            seq: u64::MAX,
            at: u64::MAX,
        };
        let Some(block) = self.fences.partition_point(|f| *f <= end).checked_sub(1) else {
            return Ok(None);
        };
        Ok(self
            .block(block)?
            .into_iter()
            .rev()
            .find(|e| *e <= end)
            .filter(|e| e.key == key))
    }

    /// Every entry, in order, read a block at a time (for merging).
    pub(super) fn iter(&self) -> impl Iterator<Item = Result<Entry, StoreError>> + '_ {
        (0..self.fences.len())
            .map(|block| self.block(block))
            .flat_map(|block| match block {
                Ok(entries) => entries.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            })
    }

    /// Removes the run's file (readers holding it open keep reading it).
    pub(super) fn remove(&self) -> Result<(), StoreError> {
        fs::remove_file(&self.path).map_err(|e| io("removing", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of `keys` keys with two entries each, written and opened again.
    fn written(dir: &Path, keys: u64) -> Result<(Run, Run), StoreError> {
        let path = dir.join(format!("{keys}.run"));
        let entries = (0..keys).flat_map(|k| {
            let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            [Entry { key, seq: 1, at: k }, Entry { key, seq: 2, at: k }]
        });
        let mut sorted: Vec<Entry> = entries.collect();
        sorted.sort_unstable();
        let run = Run::write(&path, sorted.into_iter().map(Ok), keys, 7)?;
        Ok((run, Run::open(&path)?))
    }

    #[test]
    fn every_key_is_found_and_absent_keys_are_mostly_filtered_out_in_memory_or_in_the_file()
    -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Backend(e.to_string()))?;
        for (keys, in_file) in [(10_000u64, false), (300_000, true)] {
            let (written, opened) = written(dir.path(), keys)?;
            for run in [&written, &opened] {
                assert_eq!(matches!(run.filter, Filter::InFile { .. }), in_file);
                assert_eq!((run.entries(), run.last_global), (keys * 2, 7));
                let mut passed = 0;
                for k in 0..keys {
                    let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let mut found = Vec::new();
                    run.scan(key, 2, 10, &mut found)?;
                    assert_eq!(found, [Entry { key, seq: 2, at: k }]);
                    assert_eq!(run.last(key)?, Some(Entry { key, seq: 2, at: k }));
                    // Keys that were never written.
                    if run.may_hold(key ^ 0x5555_0000_0000_0001)? {
                        passed += 1;
                    }
                }
                let rate = f64::from(passed) / keys as f64;
                assert!(rate < 0.03, "{rate} of absent keys pass the filter");
            }
        }
        Ok(())
    }
}
