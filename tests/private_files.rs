//! What Ferry writes is its owner's alone, whatever the umask it was started under, and its
//! control socket answers nobody else, even once someone loosened the folder's modes.

mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{Setup, wait_until};

/// Every folder and file under `root`, with its mode.
fn modes(root: &Path) -> Vec<(String, u32, bool)> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let is_dir = metadata.is_dir();
        found.push((
            path.display().to_string(),
            metadata.permissions().mode() & 0o777,
            is_dir,
        ));
        if is_dir {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                pending.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn every_file_ferry_writes_is_its_owners_alone_under_umask_000() {
    // The loosest umask a shell can have: what Ferry creates must not inherit it.
    rustix::process::umask(rustix::fs::Mode::empty());
    let setup = Setup::new(&["email"]);
    let host = setup.start(&[]);
    setup.send(
        "email:command.e1",
        "SendEmail",
        json!({"id": "e1", "from": "a@example.com", "to": "b@example.com",
               "subject": "hi", "body": "a confirmation link"}),
    );
    wait_until(Duration::from_secs(60), "the email is delivered", || {
        setup.emails().len() == 1
    });
    let data = setup.data();
    let found = modes(&data);
    assert!(
        found.iter().any(|(path, _, _)| path.ends_with(".eml")),
        "the maildir is among what was checked"
    );
    assert!(
        found
            .iter()
            .any(|(path, _, _)| path.ends_with("ferry.sock"))
    );
    let open: Vec<&(String, u32, bool)> = found
        .iter()
        .filter(|(_, mode, _)| mode & 0o077 != 0)
        .collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
    let data_mode = std::fs::metadata(&data).expect("stat").permissions().mode() & 0o777;
    assert_eq!(data_mode, 0o700, "the data folder");
    drop(host);
}

#[test]
fn the_control_socket_answers_only_its_owner() {
    let setup = Setup::new(&["email"]);
    let _host = setup.start(&[]);
    let data = setup.data();
    // Someone loosens every mode on the way: the socket itself still refuses another user.
    for (path, mode) in [
        (setup.dir.path().to_path_buf(), 0o755),
        (data.clone(), 0o755),
        (data.join("ferry.sock"), 0o666),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let ferry = env!("CARGO_BIN_EXE_ferry");
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", ferry])
        .arg("--data")
        .arg(&data)
        .arg("services")
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "another user is refused: {stderr}"
    );
    assert!(stderr.contains("answers only user"), "{stderr}");
    // Its owner still gets answers.
    let output = setup.ferry(&["services"]);
    assert!(output.status.success(), "{output:?}");
}
