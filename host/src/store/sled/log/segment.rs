//! The log's segment files: records appended one after another, each framed as its length
//! (u32), the CRC-32 of its body (u32) and the body, little-endian. A segment is closed once it
//! passes [`SEGMENT_BYTES`] and the next one is started; files are named by their number.
//!
//! A record is addressed by its [`Location`]: the segment's number in the high 32 bits, the
//! byte offset of its frame in the low 32. Records are only ever appended, and cut off at the
//! end when the store opens after a crash (see `MessageLog::open`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::store::StoreError;

/// A segment takes records until it is this long; a record is never split over two.
pub(super) const SEGMENT_BYTES: u64 = 512 << 20;
/// The frame before each record's body: its length and its CRC-32.
const FRAME: usize = 8;
/// What one read of a record asks for first; most messages fit, a longer one takes a second read.
const FIRST_READ: usize = 512;
/// No record is longer: appending one is refused (the store refuses commits long before this,
/// see `store::limits`), so every record appended can be read back.
const MAX_RECORD: u32 = 64 << 20;

pub(super) type Location = u64;

pub(super) fn location(segment: u32, offset: u32) -> Location {
    (u64::from(segment) << 32) | u64::from(offset)
}

pub(super) fn split(at: Location) -> (u32, u32) {
    ((at >> 32) as u32, at as u32)
}

fn io(what: &str, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            StoreError::Full(format!("message log: {what}: {e}"))
        }
        _ => StoreError::Backend(format!("message log: {what}: {e}")),
    }
}

fn damaged(at: Location, why: &str) -> StoreError {
    let (segment, offset) = split(at);
    StoreError::Backend(format!(
        "message log: the record at segment {segment} offset {offset} is damaged: {why}"
    ))
}

fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("{number:08}.log"))
}

/// The segment numbers in `dir`, in order.
pub(super) fn list(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io("listing segments", e))? {
        let name = entry.map_err(|e| io("listing segments", e))?.file_name();
        let name = name.to_string_lossy();
        if let Some(number) = name.strip_suffix(".log").and_then(|n| n.parse().ok()) {
            numbers.push(number);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing a folder", e))
}

/// Read handles on every segment, shared by the readers and the appender.
#[derive(Debug)]
pub(super) struct Segments {
    dir: PathBuf,
    files: RwLock<Vec<Arc<File>>>,
}

impl Segments {
    /// Opens the segments numbered 0.. in `dir`; a gap in the numbering is damage.
    pub(super) fn open(dir: &Path) -> Result<Self, StoreError> {
        let mut files = Vec::new();
        for (expected, number) in list(dir)?.into_iter().enumerate() {
            if number as usize != expected {
                return Err(StoreError::Backend(format!(
                    "message log: segment {expected} is missing from {}",
                    dir.display()
                )));
            }
            let file = File::open(segment_path(dir, number)).map_err(|e| io("opening", e))?;
            files.push(Arc::new(file));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files: RwLock::new(files),
        })
    }

    fn file(&self, segment: u32) -> Result<Arc<File>, StoreError> {
        let files = self
            .files
            .read()
            .map_err(|_| StoreError::Backend("message log: a reader panicked".into()))?;
        files
            .get(segment as usize)
            .cloned()
            .ok_or_else(|| StoreError::Backend(format!("message log: no segment {segment}")))
    }

    pub(super) fn count(&self) -> usize {
        self.files.read().map(|f| f.len()).unwrap_or(0)
    }

    /// The body of the record at `at`, its CRC checked.
    pub(super) fn read(&self, at: Location) -> Result<Vec<u8>, StoreError> {
        let (segment, offset) = split(at);
        let file = self.file(segment)?;
        let mut buf = vec![0u8; FIRST_READ];
        let got = read_at_most(&file, &mut buf, u64::from(offset))?;
        if got < FRAME {
            return Err(damaged(at, "it is cut short"));
        }
        let (len, crc) = frame(&buf);
        // No record is empty: a frame of zeros is a file's zero-filled end, not a record.
        if len == 0 || len > MAX_RECORD {
            return Err(damaged(at, "its length is implausible"));
        }
        let end = FRAME + len as usize;
        if end > buf.len() {
            let had = buf.len();
            buf.resize(end, 0);
            if got == had {
                let more = read_at_most(&file, &mut buf[had..], u64::from(offset) + had as u64)?;
                if had + more < end {
                    return Err(damaged(at, "it is cut short"));
                }
            } else {
                return Err(damaged(at, "it is cut short"));
            }
        } else if got < end {
            return Err(damaged(at, "it is cut short"));
        }
        buf.truncate(end);
        buf.drain(..FRAME);
        if crc32fast::hash(&buf) != crc {
            return Err(damaged(at, "its checksum does not match"));
        }
        Ok(buf)
    }

    /// The bytes of the log after `end`, in its segment and every later one.
    pub(super) fn bytes_after(&self, end: Location) -> Result<u64, StoreError> {
        let (segment, offset) = split(end);
        let files = self
            .files
            .read()
            .map_err(|_| StoreError::Backend("message log: a reader panicked".into()))?;
        let mut bytes = 0;
        for (number, file) in files.iter().enumerate().skip(segment as usize) {
            let len = file.metadata().map_err(|e| io("reading", e))?.len();
            bytes += match number == segment as usize {
                true => len.saturating_sub(u64::from(offset)),
                false => len,
            };
        }
        Ok(bytes)
    }

    fn push(&self, file: File) -> Result<(), StoreError> {
        self.files
            .write()
            .map_err(|_| StoreError::Backend("message log: a reader panicked".into()))?
            .push(Arc::new(file));
        Ok(())
    }

    fn truncate_to(&self, segments: usize) -> Result<(), StoreError> {
        self.files
            .write()
            .map_err(|_| StoreError::Backend("message log: a reader panicked".into()))?
            .truncate(segments);
        Ok(())
    }
}

fn frame(buf: &[u8]) -> (u32, u32) {
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    (len, crc)
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> Result<usize, StoreError> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading", e)),
        }
    }
    Ok(got)
}

impl Segments {
    /// Copies every byte of the log past `end` into a new file in `into` (synced), and says how
    /// many: what opening is about to cut off is kept for whoever wants to look at it. `None`
    /// when nothing lies past `end`.
    pub(super) fn set_aside_tail(
        &self,
        end: Location,
        into: &Path,
    ) -> Result<Option<(PathBuf, u64)>, StoreError> {
        let (number, offset) = split(end);
        let count = self.count() as u32;
        let mut pieces = Vec::new();
        for segment in number..count {
            let file = self.file(segment)?;
            let len = file
                .metadata()
                .map_err(|e| io("reading a segment's size", e))?
                .len();
            let from = if segment == number {
                u64::from(offset)
            } else {
                0
            };
            if len > from {
                pieces.push((file, from, len));
            }
        }
        if pieces.is_empty() {
            return Ok(None);
        }
        fs::create_dir_all(into).map_err(|e| io("creating the folder for cut records", e))?;
        let path = into.join(format!(
            "{}-{number:08}-{offset}.tail",
            crate::store::now_ms()
        ));
        let copied = (|| -> std::io::Result<u64> {
            let mut out = File::create(&path)?;
            let mut total = 0;
            let mut buf = vec![0u8; 1 << 20];
            for (file, from, len) in pieces {
                let mut at = from;
                while at < len {
                    let n = ((len - at) as usize).min(buf.len());
                    file.read_exact_at(&mut buf[..n], at)?;
                    out.write_all(&buf[..n])?;
                    at += n as u64;
                    total += n as u64;
                }
            }
            out.sync_all()?;
            Ok(total)
        })();
        match copied {
            Ok(total) => {
                sync_dir(into)?;
                Ok(Some((path, total)))
            }
            Err(e) => {
                // Half a copy is no use to anyone, and takes space (a full disk, say).
                let _ = fs::remove_file(&path);
                Err(io("setting the log's end aside", e))
            }
        }
    }
}

/// The writer's end of the log: it appends to the last segment through a buffer, which
/// [`Appender::write_out`] hands to the file (readers see it from then) and [`Appender::sync`]
/// makes durable.
#[derive(Debug)]
pub(super) struct Appender {
    segments: Arc<Segments>,
    number: u32,
    file: File,
    /// Bytes of the segment, the buffer included.
    len: u64,
    buffer: Vec<u8>,
}

impl Appender {
    /// Appends after the record ending at `end` (a location one past a record), cutting off
    /// whatever follows it: a record torn by a crash, or records no commit vouches for.
    pub(super) fn open(segments: Arc<Segments>, end: Location) -> Result<Self, StoreError> {
        let (number, offset) = split(end);
        let count = segments.count();
        let path = segment_path(&segments.dir, number);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening the last segment", e))?;
        file.set_len(u64::from(offset))
            .and_then(|()| file.sync_all())
            .map_err(|e| io("cutting off the log's end", e))?;
        // Segments after the end hold nothing a commit vouches for.
        for later in (number + 1) as usize..count {
            fs::remove_file(segment_path(&segments.dir, later as u32))
                .map_err(|e| io("removing a segment past the end", e))?;
        }
        if (number as usize) < count {
            segments.truncate_to(number as usize + 1)?;
        } else {
            segments.push(File::open(&path).map_err(|e| io("opening", e))?)?;
        }
        sync_dir(&segments.dir)?;
        Ok(Self {
            segments,
            number,
            file,
            len: u64::from(offset),
            buffer: Vec::with_capacity(1 << 16),
        })
    }

    /// An appender after the record ending at `end`, whatever this one appended since: a group
    /// the disk could not take is taken back whole.
    pub(super) fn reopen_at(&self, end: Location) -> Result<Self, StoreError> {
        Self::open(self.segments.clone(), end)
    }

    /// Where the next record will go.
    pub(super) fn end(&self) -> Location {
        location(self.number, self.len as u32)
    }

    /// Buffers one record; its location, readable once [`Appender::write_out`] has run.
    pub(super) fn append(&mut self, body: &[u8]) -> Result<Location, StoreError> {
        if body.is_empty() || body.len() > MAX_RECORD as usize {
            return Err(StoreError::Refused(format!(
                "a record of {} bytes, where the log takes 1 to {MAX_RECORD}",
                body.len()
            )));
        }
        let framed = (FRAME + body.len()) as u64;
        if self.len > 0 && self.len + framed > SEGMENT_BYTES {
            self.roll()?;
        }
        let at = self.end();
        self.buffer
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        self.buffer
            .extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        self.buffer.extend_from_slice(body);
        self.len += framed;
        Ok(at)
    }

    /// Hands the buffered records to the file: readers can read them from here on.
    pub(super) fn write_out(&mut self) -> Result<(), StoreError> {
        if !self.buffer.is_empty() {
            self.file
                .seek(SeekFrom::Start(self.len - self.buffer.len() as u64))
                .and_then(|_| self.file.write_all(&self.buffer))
                .map_err(|e| io("appending", e))?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Writes out and makes everything appended durable.
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.write_out()?;
        self.file.sync_data().map_err(|e| io("syncing", e))
    }

    fn roll(&mut self) -> Result<(), StoreError> {
        self.sync()?;
        let number = self.number + 1;
        let path = segment_path(&self.segments.dir, number);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("starting a segment", e))?;
        sync_dir(&self.segments.dir)?;
        self.segments
            .push(File::open(&path).map_err(|e| io("opening", e))?)?;
        self.number = number;
        self.file = file;
        self.len = 0;
        Ok(())
    }
}

/// Reads records in order from `from` to the end of the log, stopping quietly at the first one
/// that is cut short or damaged (the torn end of a crash): each item is the record's location,
/// the location after it, and its body.
pub(super) struct Scan<'a> {
    segments: &'a Segments,
    number: u32,
    offset: u64,
    reader: Option<BufReader<File>>,
}

impl<'a> Scan<'a> {
    pub(super) fn new(segments: &'a Segments, from: Location) -> Self {
        let (number, offset) = split(from);
        Self {
            segments,
            number,
            offset: u64::from(offset),
            reader: None,
        }
    }

    fn next_record(&mut self) -> Result<Option<(Location, Location, Vec<u8>)>, StoreError> {
        loop {
            if self.reader.is_none() {
                if self.number as usize >= self.segments.count() {
                    return Ok(None);
                }
                let mut file = File::open(segment_path(&self.segments.dir, self.number))
                    .map_err(|e| io("opening", e))?;
                file.seek(SeekFrom::Start(self.offset))
                    .map_err(|e| io("reading", e))?;
                self.reader = Some(BufReader::with_capacity(1 << 20, file));
            }
            let Some(reader) = self.reader.as_mut() else {
                return Ok(None);
            };
            let mut head = [0u8; FRAME];
            match read_full(reader, &mut head)? {
                0 if self.number as usize + 1 < self.segments.count() => {
                    // This segment ends cleanly; the next one goes on.
                    self.number += 1;
                    self.offset = 0;
                    self.reader = None;
                    continue;
                }
                FRAME => {}
                _ => return Ok(None),
            }
            let (len, crc) = frame(&head);
            // A frame of zeros (a file extended but never written, as a crash can leave it)
            // ends the log like any torn record: no record is empty.
            if len == 0 || len > MAX_RECORD {
                return Ok(None);
            }
            let mut body = vec![0u8; len as usize];
            if read_full(reader, &mut body)? < body.len() || crc32fast::hash(&body) != crc {
                return Ok(None);
            }
            let at = location(self.number, self.offset as u32);
            self.offset += (FRAME + body.len()) as u64;
            return Ok(Some((at, location(self.number, self.offset as u32), body)));
        }
    }
}

impl Iterator for Scan<'_> {
    type Item = Result<(Location, Location, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, StoreError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("reading", e)),
        }
    }
    Ok(got)
}
