//! What Ferry writes is its owner's alone: the process's umask (every file 0600, every folder
//! 0700, whatever the shell's umask), the data folder made or tightened to 0700, and secret
//! files (JWT secrets, tokens, SMTP credentials) refused when anyone but their owner may read
//! them.

use std::path::Path;

use anyhow::Context as _;

/// Makes every file and folder this process creates from now on private to its owner: sled's
/// files, the message log, the maildir, the control socket.
pub fn keep_private() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates `folder` (and its parents) if missing, and makes it 0700.
pub fn private_folder(folder: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(folder)
        .with_context(|| format!("cannot create the folder {}", folder.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(folder)
        .with_context(|| format!("cannot read {}", folder.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (chmod 700)", folder.display()))?;
        tracing::info!(folder = %folder.display(), "made the data folder private (was mode {:o})", mode & 0o777);
    }
    Ok(())
}

/// Reads a file that holds a secret (`what` names it in errors), refusing it when its group or
/// others may read it: a secret anyone on the machine can read mints tokens for anyone.
pub fn read_private(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt as _;
    let metadata = std::fs::metadata(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    let mode = metadata.permissions().mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "the {what} {} can be read by others (mode {:o}): `chmod 600 {}` it",
        path.display(),
        mode & 0o777,
        path.display()
    );
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// This process's effective user id: the only one its control socket answers.
pub fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn refuses_a_secret_others_can_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, "s").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let error = read_private(&path, "secret file").expect_err("refused");
        assert!(format!("{error:#}").contains("chmod 600"), "{error:#}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_private(&path, "secret file").expect("read"), b"s");
    }

    #[test]
    fn a_data_folder_is_made_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_folder(&data).expect("private");
        let mode = std::fs::metadata(&data).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
