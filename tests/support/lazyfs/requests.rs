//! What each file-system request does, on the state under its lock.

use super::*;

pub(super) struct Core {
    pub(super) backing: PathBuf,
    pub(super) state: Mutex<State>,
}

impl Core {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn child(
        &self,
        state: &State,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<PathBuf, Errno> {
        Ok(state.path(parent.0)?.join(name))
    }

    pub(super) fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        let meta = fs::symlink_metadata(real(&self.backing, &path))?;
        let ino = state.ino_for(path);
        Ok(attr(ino, &meta, state.pending(ino)))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn setattr(
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

    pub(super) fn mknod(
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

    pub(super) fn mkdir(
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

    pub(super) fn unlink(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        fs::remove_file(real(&self.backing, &path))?;
        if let Some(ino) = state.paths.get(&path).copied() {
            state.detach(ino);
        }
        Ok(())
    }

    pub(super) fn rmdir(&self, parent: INodeNo, name: &OsStr) -> Result<(), Errno> {
        let mut state = self.lock();
        let path = self.child(&state, parent, name)?;
        fs::remove_dir(real(&self.backing, &path))?;
        state.detach_tree(&path);
        Ok(())
    }

    pub(super) fn rename(
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

    pub(super) fn open(&self, ino: u64) -> Result<u64, Errno> {
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

    pub(super) fn create(
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

    pub(super) fn read(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, Errno> {
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

    pub(super) fn write(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, Errno> {
        let mut state = self.lock();
        state
            .pending_mut(&self.backing, ino, Some(fh))?
            .write(offset, data);
        Ok(data.len() as u32)
    }

    pub(super) fn release(&self, fh: FileHandle) {
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

    pub(super) fn fsync(&self, ino: u64, fh: FileHandle) -> Result<(), Errno> {
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

    pub(super) fn apply_by_path(
        &self,
        state: &State,
        ino: u64,
        pending: &Pending,
    ) -> Result<(), Errno> {
        let path = real(&self.backing, &state.path(ino)?);
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(pending.apply(&file)?)
    }

    pub(super) fn readdir(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
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

    pub(super) fn fallocate(
        &self,
        ino: u64,
        fh: FileHandle,
        offset: u64,
        length: u64,
    ) -> Result<(), Errno> {
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
