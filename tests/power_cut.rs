//! Power cuts: the embedded store runs on a filesystem that keeps what was not synced in memory
//! and drops it at a cut (`support::lazyfs`, as LazyFS does for Jepsen), under a steady flow of
//! commands sent with `ferry send` to a `ferry run` handling them through the `counter` guest. At
//! random moments every process is killed (the host and the client's send in flight, as a power
//! cut would), the unsynced writes are dropped, and the host is started again. After every cut
//! the store must open, and at the end every command the client saw acknowledged is stored and
//! handled exactly once, in order.
//!
//! Only the store's folder (`DATA/store`) is on the test filesystem: the control socket, the
//! compiled-component cache and the host's log stay on the real one. `FERRY_POWER_CUTS` sets the
//! number of cuts (default 20; 1 000 for a long run), `FERRY_POWER_CUT_SEED` replays a run.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use support::lazyfs::LazyFs;
use support::{Rng, Setup, wait_until};

const ENTITIES: usize = 5;

/// The client: `Increment` commands sent one after another with `ferry send`, each again with
/// the same id until it is acknowledged. Its send in flight can be killed with the host.
struct Client {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicUsize>,
    /// Held while a send is started, and by a cut: no send starts during a cut.
    gate: Arc<Mutex<()>>,
    /// The send in flight.
    in_flight: Arc<Mutex<Option<u32>>>,
    thread: JoinHandle<()>,
}

impl Client {
    fn start(setup: Arc<Setup>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Mutex::new(()));
        let in_flight = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            let (gate, in_flight) = (gate.clone(), in_flight.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = acknowledged.load(Ordering::Relaxed);
                    let child = {
                        let _gate = gate.lock().expect("gate");
                        let child = setup
                            .command_in(&setup.data())
                            .args([
                                "send",
                                &format!("counter:command.e{}", n % ENTITIES),
                                "Increment",
                                r#"{"by":1}"#,
                                "--id",
                                &format!("cmd-{n}"),
                            ])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .expect("ferry send starts");
                        *in_flight.lock().expect("in flight") = Some(child.id());
                        child
                    };
                    let output = child.wait_with_output().expect("ferry send ends");
                    *in_flight.lock().expect("in flight") = None;
                    if output.status.success() {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self {
            stop,
            acknowledged,
            gate,
            in_flight,
            thread,
        }
    }

    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("client");
        self.acknowledged.load(Ordering::Relaxed)
    }
}

fn sigkill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

#[test]
fn every_acknowledged_command_survives_power_cuts() {
    let cuts: usize = std::env::var("FERRY_POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Rng::seeded("POWER_CUT");
    let seed = rng.0;
    eprintln!("power cut test: FERRY_POWER_CUT_SEED={seed} FERRY_POWER_CUTS={cuts}");

    let setup = Arc::new(Setup::new(&["counter"]));
    let backing = setup.dir.path().join("disk");
    let store = setup.data().join("store");
    std::fs::create_dir_all(&backing).expect("backing folder");
    std::fs::create_dir_all(&store).expect("mount point");
    let disk = LazyFs::mount(&backing, &store);

    let mut host = Some(setup.start(&[]));
    let client = Client::start(setup.clone());
    let mut dropped = 0u64;
    for cut in 0..cuts {
        std::thread::sleep(Duration::from_millis(rng.between(100, 700)));
        {
            // The power goes: every process stops where it is, then what no disk holds is lost.
            let _gate = client.gate.lock().expect("gate");
            if let Some(host) = host.take() {
                host.kill();
            }
            if let Some(pid) = *client.in_flight.lock().expect("in flight") {
                sigkill(pid);
            }
            wait_until(
                Duration::from_secs(10),
                "the send in flight is gone",
                || client.in_flight.lock().expect("in flight").is_none(),
            );
            // Requests the kernel had already handed to the filesystem are answered first.
            std::thread::sleep(Duration::from_millis(20));
            dropped += disk.cut().bytes;
        }
        let restarted = setup.try_start_in(&setup.data(), &[]);
        match restarted {
            Ok(started) => host = Some(started),
            Err(why) => panic!("after cut {cut} (seed {seed}) the store did not open: {why}"),
        }
    }
    let commands = client.stop();
    eprintln!(
        "power cut test: {cuts} cuts, {commands} commands acknowledged, {dropped} unsynced bytes dropped"
    );
    assert!(
        commands >= cuts,
        "a steady flow of commands ran during the cuts"
    );
    assert!(dropped > 0, "the cuts dropped writes that were not synced");
    support::assert_counted_once_in_order(&setup, commands, ENTITIES, &format!("seed {seed}"));
    if let Some(host) = host {
        host.stop();
    }
}
