//! A real SMTP server for a test: `aiosmtpd` (PyPI; `scripts/test` installs it into
//! `.tools/venv`) on a loopback port, keeping what it receives in a maildir of its own, with
//! STARTTLS when given a certificate; stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SmtpServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
pub fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("a certificate");
    let (cert, key) = (dir.join("relay.pem"), dir.join("relay.key"));
    std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
    (cert, key)
}

impl SmtpServer {
    /// Listens on `port`; with `tls` (certificate, key) it offers STARTTLS and requires it.
    pub fn start(port: u16, tls: Option<(&Path, &Path)>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(super::repo_root().join(".tools/venv/bin/aiosmtpd"));
        command.args(["-n", "-l", &format!("127.0.0.1:{port}")]);
        if let Some((cert, key)) = tls {
            command.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
        }
        let log = std::fs::File::create(dir.path().join("aiosmtpd.log")).expect("log");
        let child = command
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir.path().join("received"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("aiosmtpd starts (scripts/test installs it)");
        let server = Self { child, port, dir };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "aiosmtpd did not listen: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("aiosmtpd.log")).unwrap_or_default()
    }

    /// Every email received, as its text.
    pub fn received(&self) -> Vec<String> {
        let mut texts = Vec::new();
        for folder in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.dir.path().join("received").join(folder))
            else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(entry.path()) {
                    texts.push(text);
                }
            }
        }
        texts
    }
}

/// The value of a header of an email's text (its first line only).
pub fn header(text: &str, name: &str) -> Option<String> {
    text.lines()
        .take_while(|line| !line.trim().is_empty())
        .find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
