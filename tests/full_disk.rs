//! A full disk: the data folder on a small loop-mounted ext4 image, a real `ferry run --http`
//! with the `counter` guest, and the disk filled by a file beside the data folder. Writes are
//! refused with a clear error (507 over HTTP, `ferry send` says so) while reads are served and
//! `/health` says degraded; once the file is removed, writes go through again without a
//! restart, everything acknowledged is handled, and nothing is left behind in the store.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::http::{free_port, request, wait_for_listener};
use support::{Setup, wait_until};

const TOKEN: &str = "full-disk-operator-token-of-32-bytes";

/// An ext4 image mounted on a folder; unmounted when dropped.
struct LoopMount {
    mountpoint: PathBuf,
}

impl LoopMount {
    fn new(dir: &Path, mib: u64) -> Self {
        let image = dir.join("disk.img");
        let mountpoint = dir.join("disk");
        std::fs::create_dir_all(&mountpoint).expect("mount point");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .expect("image");
        // No blocks reserved for root: the test (root) fills what the store sees as free.
        run(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", &image.to_string_lossy()],
        );
        run(
            "mount",
            &[
                "-o",
                "loop",
                &image.to_string_lossy(),
                &mountpoint.to_string_lossy(),
            ],
        );
        Self { mountpoint }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn post(port: u16, id: &str) -> (u16, serde_json::Value) {
    request(
        port,
        "POST",
        "/streams/counter:command.e",
        Some(TOKEN),
        Some(&json!({ "type": "Increment", "id": id, "data": { "by": 1 } })),
    )
}

#[test]
fn a_full_disk_refuses_writes_serves_reads_and_recovers_by_itself() {
    let setup = Setup::new(&["counter"]);
    let disk = LoopMount::new(setup.dir.path(), 128);
    let data = disk.mountpoint.join("data");
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let host = setup.start_in(&data, &["--http", &address, "--http-token", TOKEN]);
    wait_for_listener(port);
    let (status, answer) = post(port, "before");
    assert_eq!(status, 202, "{answer}");

    // Fill the disk, beside the data folder, until less than the store's reserve is free.
    let filler_path = disk.mountpoint.join("filler");
    let mut filler = std::fs::File::create(&filler_path).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    while fs2::available_space(&disk.mountpoint).expect("statvfs") > 8 << 20 {
        if filler.write_all(&chunk).is_err() {
            break;
        }
    }
    filler.sync_all().expect("filler synced");
    drop(filler);

    let (status, answer) = post(port, "during");
    assert_eq!(status, 507, "{answer}");
    let text = answer["error"].as_str().unwrap_or_default();
    assert!(text.contains("disk is full"), "{answer}");
    assert!(
        !text.contains(&*data.to_string_lossy()),
        "names no path: {answer}"
    );
    let sent = setup
        .command_in(&data)
        .args(["send", "counter:command.e", "Increment", r#"{"by":1}"#])
        .output()
        .expect("ferry send");
    assert!(!sent.status.success());
    let stderr = String::from_utf8_lossy(&sent.stderr);
    assert!(stderr.contains("the disk is full"), "{stderr}");
    let (status, read) = request(port, "GET", "/streams/counter:command.e", Some(TOKEN), None);
    assert_eq!(status, 200, "reads are served: {read}");
    assert_eq!(read["messages"][0]["id"], "before");
    let (_, health) = request(port, "GET", "/health", None, None);
    assert_eq!(health["status"], "degraded", "{health}");

    // Space comes back: writes go through again, without a restart.
    std::fs::remove_file(&filler_path).expect("free the space");
    let mut answer = json!(null);
    wait_until(Duration::from_secs(10), "writes are taken again", || {
        let (status, body) = post(port, "after");
        answer = body;
        status == 202
    });
    let (_, health) = request(port, "GET", "/health", None, None);
    assert_eq!(health["status"], "ok", "{health}");
    let mut events = Vec::new();
    wait_until(Duration::from_secs(30), "both commands are handled", || {
        events = setup
            .command_in(&data)
            .args(["--json", "read", "counter.e"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["messages"].as_array().cloned())
            .unwrap_or_default();
        events.len() >= 2
    });
    assert_eq!(
        events.len(),
        2,
        "each acknowledged command once: {events:?}"
    );
    host.stop();

    // Nothing half-written is left in the store.
    let mut leftovers = Vec::new();
    for folder in ["store/log/index", "store/log/segments", "store"] {
        for entry in std::fs::read_dir(data.join(folder))
            .expect("folder")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".next") || name.ends_with(".partial") {
                leftovers.push(name);
            }
        }
    }
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!data.join("store/log/cut").exists(), "nothing was cut off");
}
