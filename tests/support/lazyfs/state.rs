//! The daemon's table of nodes and open handles, and the helpers that map them to the backing folder.

use super::*;

pub(super) struct Node {
    /// Relative to the backing folder (root: empty); `None` once unlinked while still open.
    pub(super) path: Option<PathBuf>,
    pub(super) pending: Option<Pending>,
    /// Open handles.
    pub(super) open: usize,
}

pub(super) struct Handle {
    pub(super) ino: u64,
    pub(super) file: File,
    pub(super) writable: bool,
}

pub(super) struct State {
    pub(super) nodes: HashMap<u64, Node>,
    pub(super) paths: HashMap<PathBuf, u64>,
    pub(super) handles: HashMap<u64, Handle>,
    pub(super) next_ino: u64,
    pub(super) next_fh: u64,
}

/// A backing file borrowed from an open handle, or opened for one request.
pub(super) enum Opened<'a> {
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
    pub(super) fn new() -> Self {
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

    pub(super) fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .and_then(|n| n.path.clone())
            .ok_or(Errno::ENOENT)
    }

    pub(super) fn ino_for(&mut self, path: PathBuf) -> u64 {
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

    pub(super) fn pending(&self, ino: u64) -> Option<&Pending> {
        self.nodes.get(&ino).and_then(|n| n.pending.as_ref())
    }

    /// The handle `fh` if it is one of `ino`'s, else any handle of `ino` (`writable` ones only
    /// if asked).
    pub(super) fn handle(
        &self,
        ino: u64,
        fh: Option<FileHandle>,
        writable: bool,
    ) -> Option<&Handle> {
        let fits = |h: &&Handle| h.ino == ino && (h.writable || !writable);
        fh.and_then(|fh| self.handles.get(&fh.0))
            .filter(fits)
            .or_else(|| self.handles.values().find(fits))
    }

    /// The backing file of `ino`, from an open handle or opened by path (read-only).
    pub(super) fn file(
        &self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<Opened<'_>, Errno> {
        if let Some(handle) = self.handle(ino, fh, false) {
            return Ok(Opened::Borrowed(&handle.file));
        }
        Ok(Opened::Owned(File::open(real(backing, &self.path(ino)?))?))
    }

    pub(super) fn metadata(
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

    pub(super) fn attr(
        &self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let meta = self.metadata(backing, ino, fh)?;
        Ok(attr(ino, &meta, self.pending(ino)))
    }

    /// The size of `ino` with its pending operations applied.
    pub(super) fn len(
        &self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<u64, Errno> {
        match self.pending(ino) {
            Some(pending) => Ok(pending.len),
            None => Ok(self.metadata(backing, ino, fh)?.len()),
        }
    }

    pub(super) fn pending_mut(
        &mut self,
        backing: &Path,
        ino: u64,
        fh: Option<FileHandle>,
    ) -> Result<&mut Pending, Errno> {
        let base_len = self.len(backing, ino, fh)?;
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        Ok(node.pending.get_or_insert_with(|| Pending::new(base_len)))
    }

    pub(super) fn open_handle(&mut self, ino: u64, file: File, writable: bool) -> u64 {
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
    pub(super) fn detach(&mut self, ino: u64) {
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
    pub(super) fn detach_tree(&mut self, path: &Path) {
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
    pub(super) fn move_tree(&mut self, from: &Path, to: &Path) {
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

pub(super) fn real(backing: &Path, path: &Path) -> PathBuf {
    if path.as_os_str().is_empty() {
        backing.to_path_buf()
    } else {
        backing.join(path)
    }
}

pub(super) fn attr(ino: u64, meta: &Metadata, pending: Option<&Pending>) -> FileAttr {
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

pub(super) fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.max(0) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

pub(super) fn system_time(time: TimeOrNow) -> SystemTime {
    match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Opens a backing file for reading and, if allowed, writing.
pub(super) fn open_backing(path: &Path) -> io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok((file, true)),
        Err(_) => Ok((File::open(path)?, false)),
    }
}
