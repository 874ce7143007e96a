//! A FUSE file system for power-cut tests, in the style of Jepsen's LazyFS: a passthrough of a
//! backing folder that keeps every write in memory until the file is fsynced, and can drop all
//! of them at once with [`LazyFs::cut`], as a power cut drops what the page cache had not yet
//! written to the disk.
//!
//! A test runs a real process on the mount, kills it with SIGKILL, calls `cut()`, and starts the
//! process again on the same mount: whatever the process acknowledged after `fsync` or
//! `fdatasync` must still be there, and nothing it did not sync is.
//!
//! What it models:
//! - File data. `write`, `truncate`/`ftruncate` (also `O_TRUNC`) and `fallocate` (mode 0) are
//!   held per file as an ordered list of pending operations. Reads, `stat` and `lseek` see them
//!   applied on the backing content, as they would see a page cache. `fsync` or `fdatasync` on
//!   any handle of the file applies the list to the backing file (then `sync_all`) and empties
//!   it; `cut()` empties every list. A process that still has a file open after a cut sees the
//!   durable content.
//! - Reads and writes always reach this daemon: every open file is in `direct_io` mode and the
//!   kernel caches no attributes or entries (TTL zero), so the kernel's page cache never holds
//!   data the daemon has not seen, nor serves stale pages or sizes after a cut.
//!
//! What it does NOT model:
//! - Directory durability. Create, mkdir, unlink, rmdir and rename are applied to the backing
//!   folder at once and survive a cut, which is kinder than a real power cut, where they are only
//!   durable once the directory is fsynced; `fsyncdir` is therefore a no-op. A file created and
//!   never synced is still there, empty, after a cut. Unlinking a file, or replacing it by a
//!   rename, drops its pending writes (once no handle has it open).
//! - Torn or reordered writes: a cut drops whole pending operations, all of them; a sync keeps all
//!   of them. Real disks may persist any subset of unsynced pages, or half a sector.
//! - Metadata: mode, owner and times come from the backing file and change at once (chmod,
//!   chown, utimes); unsynced writes do not update the mtime until they are synced.
//! - `mmap` of files (direct_io files cannot be mapped shared), hard links, symlinks (lookup and
//!   stat only), special files, extended attributes, POSIX locks held by the daemon (the kernel
//!   keeps locks locally, which is enough on one machine), and changes made to the backing folder
//!   behind the mount's back while files have pending writes.
//! - The size the kernel last saw for a file that stays open across a cut: an `O_APPEND` write
//!   through such a handle goes where the kernel thinks the end is (until a `stat` refreshes it).
//! - Free space: `statfs` reports fixed large numbers. Inode numbers are the daemon's own, never
//!   reused or forgotten while mounted.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::ops::Deref;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, Session, TimeOrNow, WriteFlags,
};

/// Attributes and entries are never cached by the kernel: sizes change at a cut.
const TTL: Duration = Duration::ZERO;
/// Linux open(2) flags and file types (the crate does not re-export libc).
const O_EXCL: i32 = 0o200;
const O_TRUNC: i32 = 0o1000;
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;

/// What [`LazyFs::cut`] dropped (or, from [`LazyFs::unsynced`], would drop now).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cut {
    /// Files that had unsynced changes.
    pub files: usize,
    /// Unsynced write requests and size changes (truncate, `O_TRUNC`, fallocate). The kernel may
    /// split one large write(2) into several requests.
    pub writes: usize,
    /// Bytes of data in those write requests.
    pub bytes: u64,
}

/// A mounted LazyFS; unmounted when dropped.
pub struct LazyFs {
    core: Arc<Core>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts a passthrough of the existing folder `backing` at the existing empty folder
    /// `mountpoint`, and returns once the mount is usable.
    pub fn mount(backing: &Path, mountpoint: &Path) -> LazyFs {
        let backing = backing
            .canonicalize()
            .unwrap_or_else(|e| panic!("backing folder {}: {e}", backing.display()));
        let mountpoint = mountpoint
            .canonicalize()
            .unwrap_or_else(|e| panic!("mount point {}: {e}", mountpoint.display()));
        let core = Arc::new(Core {
            backing,
            state: Mutex::new(State::new()),
        });
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("lazyfs".to_owned())];
        // `Session::new` mounts and answers the kernel's INIT before it returns.
        let session = Session::new(Daemon(core.clone()), &mountpoint, &config)
            .and_then(Session::spawn)
            .unwrap_or_else(|e| panic!("mounting lazyfs at {}: {e}", mountpoint.display()));
        LazyFs {
            core,
            mountpoint,
            session: Some(session),
        }
    }

    /// The simulated power cut: drops every unsynced write of every file.
    pub fn cut(&self) -> Cut {
        let mut state = self.core.lock();
        let mut cut = Cut::default();
        for node in state.nodes.values_mut() {
            if let Some(pending) = node.pending.take() {
                cut.add(&pending);
            }
        }
        cut
    }

    /// What a cut would drop now.
    pub fn unsynced(&self) -> Cut {
        let state = self.core.lock();
        let mut cut = Cut::default();
        for pending in state.nodes.values().filter_map(|n| n.pending.as_ref()) {
            cut.add(pending);
        }
        cut
    }

    /// Where it is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            // A plain unmount fails (EBUSY) while a file under the mount is open. Then detach it
            // (MNT_DETACH): the kernel serves the open files until they are closed, and the
            // daemon thread ends on its own after that; nothing waits for it here.
            if session.umount_and_join().is_err() {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
            }
        }
    }
}

impl Cut {
    fn add(&mut self, pending: &Pending) {
        self.files += 1;
        self.writes += pending.writes;
        self.bytes += pending.bytes;
    }
}

/// One unsynced change to a file, applied in order.
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

/// The unsynced changes of one file.
struct Pending {
    ops: Vec<Op>,
    /// The effective size: the backing size with `ops` applied.
    len: u64,
    writes: usize,
    bytes: u64,
}

impl Pending {
    fn new(base_len: u64) -> Self {
        Pending {
            ops: Vec::new(),
            len: base_len,
            writes: 0,
            bytes: 0,
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
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

    fn set_len(&mut self, len: u64) {
        self.writes += 1;
        self.len = len;
        self.ops.push(Op::SetLen(len));
    }

    /// Up to `size` bytes at `offset` of `base` with the pending operations applied in order:
    /// only the operations overlapping the range are copied, and a `SetLen` zeroes the range past
    /// its size, for the backing content and the writes before it alike.
    fn read(&self, base: &File, offset: u64, size: u32) -> io::Result<Vec<u8>> {
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

    fn apply(&self, file: &File) -> io::Result<()> {
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
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
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

struct Node {
    /// Relative to the backing folder (root: empty); `None` once unlinked while still open.
    path: Option<PathBuf>,
    pending: Option<Pending>,
    /// Open handles.
    open: usize,
}

struct Handle {
    ino: u64,
    file: File,
    writable: bool,
}

struct State {
    nodes: HashMap<u64, Node>,
    paths: HashMap<PathBuf, u64>,
    handles: HashMap<u64, Handle>,
    next_ino: u64,
    next_fh: u64,
}

/// A backing file borrowed from an open handle, or opened for one request.
enum Opened<'a> {
    Borrowed(&'a File),
    Owned(File),
}

impl Deref for Opened<'_> {
    type Target = File;

    fn deref(&self) -> &File {
        match self {
            Opened::Borrowed(file) => file,
            Opened::Owned(file) => file,
        }
    }
}

impl State {
    fn new() -> Self {
        let root = Node {
            path: Some(PathBuf::new()),
            pending: None,
            open: 0,
        };
        State {
            nodes: HashMap::from([(INodeNo::ROOT.0, root)]),
            paths: HashMap::from([(PathBuf::new(), INodeNo::ROOT.0)]),
            handles: HashMap::new(),
            next_ino: INodeNo::ROOT.0 + 1,
            next_fh: 1,
        }
    }

    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    fn ino_for(&mut self, path: PathBuf) -> u64 {
        if let Some(ino) = self.paths.get(&path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(path.clone(), ino);
        let node = Node {
            path: Some(path),
            pending: None,
            open: 0,
        };
        self.nodes.insert(ino, node);
        ino
    }

    fn pending(&self, ino: u64) -> Option<&Pending> {
        self.nodes.get(&ino).and_then(|n| n.pending.as_ref())
    }

    /// The handle `fh` if it is one of `ino`'s, else any handle of `ino` (`writable` ones only
    /// if asked).
    fn handle(&self, ino: u64, fh: Option<FileHandle>, writable: bool) -> Option<&Handle> {
        let fits = |h: &&Handle| h.ino == ino && (h.writable || !writable);
        fh.and_then(|fh| self.handles.get(&fh.0))
            .filter(fits)
            .or_else(|| self.handles.values().find(fits))
    }

    /// The backing file of `ino`, from an open handle or opened by path (read-only).
    fn file(&self, backing: &Path, ino: u64, fh: Option<FileHandle>) -> Result<Opened<'_>, Errno> {
        if let Some(handle) = self.handle(ino, fh, false) {
            return Ok(Opened::Borrowed(&handle.file));
        }
        Ok(Opened::Owned(File::open(real(backing, &self.path(ino)?))?))
    }

    fn metadata(
        &self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<Metadata, Errno> {
        if let Some(handle) = self.handle(ino, fh, false) {
            return Ok(handle.file.metadata()?);
        }
        Ok(fs::symlink_metadata(real(backing, &self.path(ino)?))?)
    }

    fn attr(&self, backing: &Path, ino: u64, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let meta = self.metadata(backing, ino, fh)?;
        Ok(attr(ino, &meta, self.pending(ino)))
    }

    /// The size of `ino` with its pending operations applied.
    fn len(&self, backing: &Path, ino: u64, fh: Option<FileHandle>) -> Result<u64, Errno> {
        match self.pending(ino) {
            Some(pending) => Ok(pending.len),
            None => Ok(self.metadata(backing, ino, fh)?.len()),
        }
    }

    fn pending_mut(
        &mut self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<&mut Pending, Errno> {
        let base_len = self.len(backing, ino, fh)?;
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        Ok(node.pending.get_or_insert_with(|| Pending::new(base_len)))
    }

    fn open_handle(&mut self, ino: u64, file: File, writable: bool) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                file,
                writable,
            },
        );
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.open += 1;
        }
        fh
    }

    /// `ino` lost its name: forget it, with its pending operations, once no handle has it open.
    fn detach(&mut self, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        if let Some(path) = node.path.take() {
            self.paths.remove(&path);
        }
        if node.open == 0 {
            self.nodes.remove(&ino);
        }
    }

    /// Detaches `path` and everything under it.
    fn detach_tree(&mut self, path: &Path) {
        let inos: Vec<u64> = self
            .paths
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .map(|(_, ino)| *ino)
            .collect();
        for ino in inos {
            self.detach(ino);
        }
    }

    /// Renames `from` and everything under it to `to`.
    fn move_tree(&mut self, from: &Path, to: &Path) {
        let moving: Vec<(PathBuf, u64)> = self
            .paths
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, ino)| (p.clone(), *ino))
            .collect();
        for (old, ino) in moving {
            self.paths.remove(&old);
            let rest = old.strip_prefix(from).expect("the path is under `from`");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.path = Some(new.clone());
            }
            self.paths.insert(new, ino);
        }
    }
}

fn real(backing: &Path, path: &Path) -> PathBuf {
    if path.as_os_str().is_empty() {
        backing.to_path_buf()
    } else {
        backing.join(path)
    }
}

fn attr(ino: u64, meta: &Metadata, pending: Option<&Pending>) -> FileAttr {
    let size = pending.map_or(meta.len(), |p| p.len);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: pending.map_or(meta.blocks(), |_| size.div_ceil(512)),
        atime: time(meta.atime(), meta.atime_nsec()),
        mtime: time(meta.mtime(), meta.mtime_nsec()),
        ctime: time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile),
        perm: (meta.mode() & 0o7777) as u16,
        nlink: meta.nlink() as u32,
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: meta.rdev() as u32,
        blksize: meta.blksize() as u32,
        flags: 0,
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.max(0) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

fn system_time(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Opens a backing file for reading and, if allowed, writing.
fn open_backing(path: &Path) -> io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(_) => Ok((File::open(path)?, false)),
    }
}

struct Core {
    backing: PathBuf,
    state: Mutex<State>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn child(&self, state: &State, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(state.path(parent.0)?.join(name))
    }

    fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        let meta = fs::symlink_metadata(real(&self.backing, &path))?;
        let ino = state.ino_for(path);
        Ok(attr(ino, &meta, state.pending(ino)))
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let mut state = self.lock();
        if mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
            let file = state.file(&self.backing, ino, fh)?;
            if let Some(mode) = mode {
                file.set_permissions(Permissions::from_mode(mode & 0o7777))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::fchown(&*file, uid, gid)?;
            }
            let mut times = FileTimes::new();
            if let Some(atime) = atime {
                times = times.set_accessed(system_time(atime));
            }
            if let Some(mtime) = mtime {
                times = times.set_modified(system_time(mtime));
            }
            if atime.is_some() || mtime.is_some() {
                file.set_times(times)?;
            }
        }
        if let Some(size) = size {
            if state.metadata(&self.backing, ino, fh)?.is_dir() {
                return Err(Errno::EISDIR);
            }
            if state.len(&self.backing, ino, fh)? != size {
                state.pending_mut(&self.backing, ino, fh)?.set_len(size);
            }
        }
        state.attr(&self.backing, ino, fh)
    }

    fn mknod(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        if mode & S_IFMT != S_IFREG {
            return Err(Errno::EPERM);
        }
        let state = self.lock();
        let path = self.child(&state, parent, name)?;
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & !umask & 0o7777)
            .open(real(&self.backing, &path))?;
        drop(state);
        self.lookup(parent, name)
    }

    fn mkdir(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<FileAttr, Errno> {
        let state = self.lock();
        let path = self.child(&state, parent, name)?;
        fs::DirBuilder::new()
            .mode(mode & !umask & 0o7777)
            .create(real(&self.backing, &path))?;
        drop(state);
        self.lookup(parent, name)
    }

    fn unlink(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        fs::remove_file(real(&self.backing, &path))?;
        if let Some(ino) = state.paths.get(&path).copied() {
            state.detach(ino);
        }
        Ok(())
    }

    fn rmdir(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        fs::remove_dir(real(&self.backing, &path))?;
        state.detach_tree(&path);
        Ok(())
    }

    fn rename(
        &self,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let mut state = self.lock();
        let from = self.child(&state, parent, name)?;
        let to = self.child(&state, newparent, newname)?;
        let (real_from, real_to) = (real(&self.backing, &from), real(&self.backing, &to));
        if flags.contains(RenameFlags::RENAME_NOREPLACE) && fs::symlink_metadata(&real_to).is_ok() {
            return Err(Errno::EEXIST);
        }
        fs::rename(&real_from, &real_to)?;
        if from != to {
            // A replaced target loses its name, and its pending writes with it.
            state.detach_tree(&to);
            state.move_tree(&from, &to);
        }
        Ok(())
    }

    fn open(&self, ino: u64) -> Result<u64, Errno> {
        let mut state = self.lock();
        let (file, writable) = match state.path(ino) {
            Ok(path) => open_backing(&real(&self.backing, &path))?,
            // Unlinked but still open (reopened through /proc/self/fd): share its file.
            Err(e) => {
                let handle = state.handle(ino, None, false).ok_or(e)?;
                (handle.file.try_clone()?, handle.writable)
            }
        };
        Ok(state.open_handle(ino, file, writable))
    }

    fn create(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        let mut options = OpenOptions::new();
        options.read(true).write(true).mode(mode & !umask & 0o7777);
        if flags & O_EXCL != 0 {
            options.create_new(true);
        } else {
            options.create(true);
        }
        let file = options.open(real(&self.backing, &path))?;
        let ino = state.ino_for(path);
        let fh = state.open_handle(ino, file, true);
        let handle = Some(FileHandle(fh));
        if flags & O_TRUNC != 0 && state.len(&self.backing, ino, handle)? != 0 {
            state.pending_mut(&self.backing, ino, handle)?.set_len(0);
        }
        Ok((state.attr(&self.backing, ino, handle)?, fh))
    }

    fn read(&self, ino: u64, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let state = self.lock();
        let file = state.file(&self.backing, ino, Some(fh))?;
        match state.pending(ino) {
            Some(pending) => Ok(pending.read(&file, offset, size)?),
            None => {
                let mut buf = vec![0; size as usize];
                let n = read_at_most(&file, &mut buf, offset)?;
                buf.truncate(n);
                Ok(buf)
            }
        }
    }

    fn write(&self, ino: u64, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let mut state = self.lock();
        state
            .pending_mut(&self.backing, ino, Some(fh))?
            .write(offset, data);
        Ok(data.len() as u32)
    }

    fn release(&self, fh: FileHandle) {
        let mut state = self.lock();
        let Some(handle) = state.handles.remove(&fh.0) else {
            return;
        };
        if let Some(node) = state.nodes.get_mut(&handle.ino) {
            node.open = node.open.saturating_sub(1);
            if node.open == 0 && node.path.is_none() {
                state.nodes.remove(&handle.ino);
            }
        }
    }

    fn fsync(&self, ino: u64, fh: FileHandle) -> Result<(), Errno> {
        let mut state = self.lock();
        let Some(pending) = state.nodes.get_mut(&ino).and_then(|n| n.pending.take()) else {
            return Ok(());
        };
        let applied = match state.handle(ino, Some(fh), true) {
            Some(handle) => pending.apply(&handle.file).map_err(Errno::from),
            None => self.apply_by_path(&state, ino, &pending),
        };
        if let Err(e) = applied {
            // Applying the list again from its start later gives the same result.
            if let Some(node) = state.nodes.get_mut(&ino) {
                node.pending = Some(pending);
            }
            return Err(e);
        }
        Ok(())
    }

    fn apply_by_path(&self, state: &State, ino: u64, pending: &Pending) -> Result<(), Errno> {
        let path = real(&self.backing, &state.path(ino)?);
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(pending.apply(&file)?)
    }

    fn readdir(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let mut state = self.lock();
        let path = state.path(ino)?;
        let mut children: Vec<(OsString, FileType)> = fs::read_dir(real(&self.backing, &path))?
            .filter_map(Result::ok)
            .map(|entry| {
                let kind = entry.file_type().ok().and_then(FileType::from_std);
                (entry.file_name(), kind.unwrap_or(FileType::RegularFile))
            })
            .collect();
        children.sort_by(|a, b| a.0.cmp(&b.0));
        let parent = match path.parent() {
            Some(parent) => state.ino_for(parent.to_path_buf()),
            None => INodeNo::ROOT.0,
        };
        let mut entries = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (parent, FileType::Directory, OsString::from("..")),
        ];
        for (name, kind) in children {
            entries.push((state.ino_for(path.join(&name)), kind, name));
        }
        Ok(entries)
    }

    fn fallocate(&self, ino: u64, fh: FileHandle, offset: u64, length: u64) -> Result<(), Errno> {
        let mut state = self.lock();
        let end = offset.saturating_add(length);
        if end > state.len(&self.backing, ino, Some(fh))? {
            state
                .pending_mut(&self.backing, ino, Some(fh))?
                .set_len(end);
        }
        Ok(())
    }
}

/// The `fuser` side: each request is answered from `Core`.
struct Daemon(Arc<Core>);

impl Filesystem for Daemon {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.lock().attr(&self.0.backing, ino.0, fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self
            .0
            .setattr(ino.0, mode, uid, gid, size, atime, mtime, fh)
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.0.mknod(parent, name, mode, umask) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.0.mkdir(parent, name, mode, umask) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.unlink(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.rmdir(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.0.rename(parent, name, newparent, newname, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.open(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(ino.0, fh, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.write(ino.0, fh, offset, data) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.release(fh);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.fsync(ino.0, fh) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.lock().path(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.0.readdir(ino.0) {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// Directory operations are durable at once (see the module's header).
    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 30, 1 << 30, 1 << 30, 1 << 24, 1 << 24, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.0.create(parent, name, mode, umask, flags) {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.0.fallocate(ino.0, fh, offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
