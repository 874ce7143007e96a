//! A file's unsynced changes, held in order until a sync applies them or a cut drops them.

use super::*;

/// One unsynced change to a file, applied in order.
pub(super) enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// The unsynced changes of one file.
pub(super) struct Pending {
    pub(super) ops: Vec<Op>,
    /// The effective size: the backing size with `ops` applied.
    pub(super) len: u64,
    pub(super) writes: usize,
    pub(super) bytes: u64,
}

impl Pending {
    pub(super) fn new(base_len: u64) -> Self {
        Pending {
            ops: Vec::new(),
            len: base_len,
            writes: 0,
            bytes: 0,
        }
    }

    pub(super) fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes += 1;
        self.bytes += data.len() as u64;
        self.len = self.len.max(offset + data.len() as u64);
        // Sequential writes (logs, appends) grow one operation instead of adding many.
        if let Some(Op::Write {
            offset: at,
            data: last,
        }) = self.ops.last_mut()
            && *at + last.len() as u64 == offset
        {
            last.extend_from_slice(data);
            return;
        }
        self.ops.push(Op::Write {
            offset,
            data: data.to_vec(),
        });
    }

    pub(super) fn set_len(&mut self, len: u64) {
        self.writes += 1;
        self.len = len;
        self.ops.push(Op::SetLen(len));
    }

    /// Up to `size` bytes at `offset` of `base` with the pending operations applied in order:
    /// only the operations overlapping the range are copied, and a `SetLen` zeroes the range past
    /// its size, for the backing content and the writes before it alike.
    pub(super) fn read(&self, base: &File, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let end = self.len.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return Ok(Vec::new());
        }
        // Past the backing file's end (its size when the list began) this leaves zeros.
        let mut buf = vec![0; (end - offset) as usize];
        read_at_most(base, &mut buf, offset)?;
        for op in &self.ops {
            match op {
                Op::Write { offset: at, data } => {
                    let from = offset.max(*at);
                    let to = end.min(at + data.len() as u64);
                    if from < to {
                        buf[(from - offset) as usize..(to - offset) as usize]
                            .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
                    }
                }
                Op::SetLen(len) if *len < end => {
                    buf[((*len).max(offset) - offset) as usize..].fill(0);
                }
                Op::SetLen(_) => {}
            }
        }
        Ok(buf)
    }

    pub(super) fn apply(&self, file: &File) -> io::Result<()> {
        for op in &self.ops {
            match op {
                Op::Write { offset, data } => file.write_all_at(data, *offset)?,
                Op::SetLen(len) => file.set_len(*len)?,
            }
        }
        file.sync_all()
    }
}

/// Reads into `buf` until it is full or the file ends; returns how much was read.
pub(super) fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
