//! The power-cut test file system itself (`support::lazyfs`), with real files through a real FUSE
//! mount: unsynced writes are seen by readers before a cut and gone after it; synced ones stay,
//! whichever handle synced them and whatever name the file has since.

mod support;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use support::lazyfs::{Cut, LazyFs};

/// A backing folder mounted at a mount point, both in one temporary folder. Fields drop in order:
/// the file system is unmounted before the folder is removed.
struct Mounted {
    fs: LazyFs,
    dir: tempfile::TempDir,
}

impl Mounted {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::create_dir(dir.path().join("backing")).expect("backing folder");
        fs::create_dir(dir.path().join("mnt")).expect("mount point");
        let fs = LazyFs::mount(&dir.path().join("backing"), &dir.path().join("mnt"));
        Mounted { fs, dir }
    }

    /// A path through the mount.
    fn path(&self, name: &str) -> PathBuf {
        self.fs.mountpoint().join(name)
    }

    /// The same path in the backing folder: what is durable.
    fn backing(&self, name: &str) -> PathBuf {
        self.dir.path().join("backing").join(name)
    }
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Reads up to `len` bytes at `offset` through an open handle.
fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .expect("read_at");
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    buf
}

fn is_mounted(mountpoint: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let wanted = mountpoint.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(&*wanted))
}

#[test]
fn unsynced_writes_are_lost_at_a_cut_and_synced_ones_kept() {
    let m = Mounted::new();
    let path = m.path("log");
    let mut file = File::create(&path).expect("create");
    file.write_all(b"durable|").expect("write");
    file.sync_data().expect("fdatasync");
    file.write_all(b"volatile").expect("write");
    let never_synced = m.path("new");
    fs::write(&never_synced, b"lost").expect("write");

    assert_eq!(
        read(&path),
        b"durable|volatile",
        "readers see unsynced writes"
    );
    assert_eq!(fs::metadata(&path).expect("stat").len(), 16);
    assert_eq!(
        read(&m.backing("log")),
        b"durable|",
        "only synced data is durable"
    );
    assert_eq!(
        m.fs.cut(),
        Cut {
            files: 2,
            writes: 2,
            bytes: 12
        }
    );
    drop(file);

    assert_eq!(read(&path), b"durable|");
    assert_eq!(fs::metadata(&path).expect("stat").len(), 8);
    assert_eq!(
        read(&never_synced),
        b"",
        "a created file stays (directory operations are durable at once), without its data"
    );
    assert_eq!(m.fs.cut(), Cut::default(), "nothing is left to drop");
}

#[test]
fn reads_see_unsynced_writes_before_a_cut() {
    let m = Mounted::new();
    fs::write(m.backing("f"), b"0123456789").expect("durable content");
    let path = m.path("f");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    let check = |expected: &[u8], what: &str| {
        assert_eq!(read(&path), expected, "{what}: the whole file");
        assert_eq!(
            fs::metadata(&path).expect("stat").len(),
            expected.len() as u64,
            "{what}: its size"
        );
        for offset in [0, 2, 5, 7, 12, 16, 30] {
            let start = offset.min(expected.len());
            let end = (offset + 4).min(expected.len());
            assert_eq!(
                read_at(&file, offset as u64, 4),
                &expected[start..end],
                "{what}: 4 bytes at {offset}"
            );
        }
    };
    check(b"0123456789", "durable");

    file.write_all_at(b"abc", 3).expect("overwrite");
    check(b"012abc6789", "overwritten in the middle");
    file.write_all_at(b"XY", 15).expect("write past the end");
    check(b"012abc6789\0\0\0\0\0XY", "extended past the end");
    file.set_len(5).expect("shrink");
    check(b"012ab", "shrunk");
    file.set_len(8).expect("extend");
    check(
        b"012ab\0\0\0",
        "extended again: the cut bytes read as zeros",
    );
    file.write_all_at(b"Z", 6).expect("write in the extension");
    check(b"012ab\0Z\0", "written in the extension");
    assert_eq!(
        read(&m.backing("f")),
        b"0123456789",
        "nothing is durable yet"
    );

    file.sync_all().expect("fsync");
    assert_eq!(read(&m.backing("f")), b"012ab\0Z\0", "all of it is durable");
    assert_eq!(m.fs.cut(), Cut::default());
    check(b"012ab\0Z\0", "after the cut");
}

#[test]
fn a_truncating_open_is_undone_by_a_cut() {
    let m = Mounted::new();
    fs::write(m.backing("f"), b"durable content").expect("durable content");
    let mut file = File::create(m.path("f")).expect("open with O_TRUNC");
    file.write_all(b"x").expect("write");
    drop(file);
    assert_eq!(read(&m.path("f")), b"x");

    assert_eq!(
        m.fs.cut(),
        Cut {
            files: 1,
            writes: 2,
            bytes: 1
        }
    );
    assert_eq!(read(&m.path("f")), b"durable content");
}

#[test]
fn a_renamed_file_keeps_its_synced_content() {
    let m = Mounted::new();
    fs::write(m.backing("state"), b"old state").expect("durable content");
    // Unsynced writes to the file about to be replaced: they go with it.
    let old = OpenOptions::new()
        .write(true)
        .open(m.path("state"))
        .expect("open");
    old.write_all_at(b"OLD", 0).expect("write");
    drop(old);
    assert_eq!(read(&m.path("state")), b"OLD state");

    let mut tmp = File::create(m.path("state.tmp")).expect("create");
    tmp.write_all(b"new state").expect("write");
    tmp.sync_all().expect("fsync");
    drop(tmp);
    fs::rename(m.path("state.tmp"), m.path("state")).expect("rename over");
    assert_eq!(read(&m.path("state")), b"new state");

    assert_eq!(
        m.fs.cut(),
        Cut::default(),
        "the replaced file's writes went"
    );
    assert_eq!(read(&m.path("state")), b"new state");
    assert!(!m.path("state.tmp").exists());
}

#[test]
fn a_file_renamed_without_sync_is_empty_after_a_cut() {
    let m = Mounted::new();
    fs::write(m.backing("state"), b"old state").expect("durable content");
    fs::write(m.path("state.tmp"), b"new").expect("write without sync");
    fs::rename(m.path("state.tmp"), m.path("state")).expect("rename over");
    assert_eq!(
        read(&m.path("state")),
        b"new",
        "the unsynced writes follow the file"
    );

    assert_eq!(
        m.fs.cut(),
        Cut {
            files: 1,
            writes: 1,
            bytes: 3
        }
    );
    assert_eq!(
        read(&m.path("state")),
        b"",
        "the rename is durable, the data not"
    );
}

#[test]
fn fdatasync_from_another_handle_makes_the_file_durable() {
    let m = Mounted::new();
    let path = m.path("f");
    let mut writer = File::create(&path).expect("create");
    writer.write_all(b"acknowledged").expect("write");
    let reader = File::open(&path).expect("open read-only");
    reader.sync_data().expect("fdatasync");
    assert_eq!(read(&m.backing("f")), b"acknowledged");

    assert_eq!(m.fs.cut(), Cut::default());
    assert_eq!(read(&path), b"acknowledged");
}

#[test]
fn an_open_handle_sees_the_durable_content_after_a_cut() {
    let m = Mounted::new();
    let path = m.path("f");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("create");
    file.write_all_at(b"synced", 0).expect("write");
    file.sync_data().expect("fdatasync");
    file.write_all_at(b"+unsynced", 6).expect("write");
    assert_eq!(read_at(&file, 0, 64), b"synced+unsynced");

    m.fs.cut();
    assert_eq!(read_at(&file, 0, 64), b"synced");
    assert_eq!(file.metadata().expect("fstat").len(), 6);
    file.write_all_at(b"!", 6).expect("write");
    file.sync_data().expect("fdatasync");
    assert_eq!(read(&m.backing("f")), b"synced!");
}

#[test]
fn directory_operations_reach_the_backing_folder_at_once() {
    let m = Mounted::new();
    fs::create_dir(m.path("dir")).expect("mkdir");
    fs::write(m.path("dir/a"), b"a").expect("write");
    fs::write(m.path("dir/b"), b"b").expect("write");
    let mut names: Vec<String> = fs::read_dir(m.path("dir"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        read(&m.backing("dir/a")),
        b"",
        "created at once, data not synced"
    );

    fs::remove_file(m.path("dir/a")).expect("unlink");
    assert!(!m.backing("dir/a").exists());
    assert_eq!(
        m.fs.unsynced(),
        Cut {
            files: 1,
            writes: 1,
            bytes: 1
        },
        "the unlinked file's writes went with it"
    );

    fs::rename(m.path("dir"), m.path("moved")).expect("rename a folder");
    assert!(m.backing("moved/b").exists());
    assert_eq!(
        read(&m.path("moved/b")),
        b"b",
        "unsynced writes follow a file whose folder is renamed"
    );
    fs::remove_file(m.path("moved/b")).expect("unlink");
    fs::remove_dir(m.path("moved")).expect("rmdir");
    assert!(!m.backing("moved").exists());
    assert_eq!(m.fs.cut(), Cut::default());
}

#[test]
fn an_unlinked_file_still_open_keeps_working() {
    let m = Mounted::new();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.path("scratch"))
        .expect("create");
    file.write_all_at(b"scratch", 0).expect("write");
    fs::remove_file(m.path("scratch")).expect("unlink");
    assert!(!m.backing("scratch").exists());

    file.write_all_at(b"!", 7).expect("write after the unlink");
    assert_eq!(read_at(&file, 0, 64), b"scratch!");
    assert_eq!(file.metadata().expect("fstat").len(), 8);
    file.sync_data().expect("fdatasync");
    assert_eq!(read_at(&file, 0, 64), b"scratch!");
    assert_eq!(m.fs.unsynced(), Cut::default());
}

#[test]
fn random_operations_match_a_model() {
    let m = Mounted::new();
    let path = m.path("f");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("create");
    // xorshift64*, fixed seed: the same run every time.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |below: u64| {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    };
    let (mut durable, mut current): (Vec<u8>, Vec<u8>) = (Vec::new(), Vec::new());
    for step in 0..600 {
        match next(100) {
            0..50 => {
                let offset = next(3000) as usize;
                let data: Vec<u8> = (0..1 + next(300)).map(|_| next(255) as u8 + 1).collect();
                file.write_all_at(&data, offset as u64).expect("write");
                if current.len() < offset + data.len() {
                    current.resize(offset + data.len(), 0);
                }
                current[offset..offset + data.len()].copy_from_slice(&data);
            }
            50..60 => {
                let len = next(3500);
                file.set_len(len).expect("set_len");
                current.resize(len as usize, 0);
            }
            60..68 => {
                file.sync_data().expect("fdatasync");
                durable = current.clone();
            }
            68..71 => {
                m.fs.cut();
                current = durable.clone();
            }
            _ => {
                let offset = next(3500) as usize;
                let len = 1 + next(600) as usize;
                let start = offset.min(current.len());
                let end = (offset + len).min(current.len());
                assert_eq!(
                    read_at(&file, offset as u64, len),
                    &current[start..end],
                    "step {step}: {len} bytes at {offset}"
                );
            }
        }
        if step % 50 == 0 {
            assert_eq!(read(&path), current, "step {step}: the whole file");
            assert_eq!(read(&m.backing("f")), durable, "step {step}: durable");
        }
    }
    file.sync_all().expect("fsync");
    assert_eq!(read(&m.backing("f")), current);
}

#[test]
fn unmounting_with_a_file_still_open_does_not_hang() {
    let m = Mounted::new();
    let mut file = File::create(m.path("f")).expect("create");
    file.write_all(b"x").expect("write");
    let mountpoint = m.fs.mountpoint().to_path_buf();
    assert!(is_mounted(&mountpoint));

    let Mounted { fs, dir } = m;
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        drop(fs);
        let _ = done.send(());
    });
    finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the unmount returns while a file is open");
    assert!(!is_mounted(&mountpoint), "the mount is detached");
    drop(file);
    drop(dir);
}
