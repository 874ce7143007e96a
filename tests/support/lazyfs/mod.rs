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
//!
//! Files: this one mounts and cuts; `pending` holds a file's unsynced changes, `state` the nodes
//! and open handles, `requests` what each request does, `daemon` the `fuser` side.

mod daemon;
mod pending;
mod requests;
mod state;

use self::daemon::*;
use self::pending::*;
use self::requests::*;
use self::state::*;

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
