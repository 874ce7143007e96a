//! A real JetStream cluster for a test: three `nats-server -js` (the same binary as
//! [`NatsServer`]) routed to each other on free loopback ports, each with its own storage
//! folder and monitoring port, stopped when dropped. A test kills, pauses, restarts and wipes
//! members one by one, and asks the monitoring endpoint who leads a namespace's stream.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::delay::DelayProxy;
use super::nats::{NatsServer, free_port};

pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    /// Each member's monitoring port (`/jsz`, `/healthz`).
    monitors: Vec<u16>,
}

/// Members' names are `n0`, `n1`, ...: what JetStream reports as a stream's leader.
pub fn member_name(index: usize) -> String {
    format!("n{index}")
}

impl NatsCluster {
    /// Starts `size` clustered servers and waits until JetStream's meta leader sees every member.
    pub fn start(size: usize) -> Self {
        Self::start_shaped(size, None)
    }

    /// The same, with every link between member `slow` and the others delayed by `delay` each
    /// way (a [`DelayProxy`] on each route): a follower that learns of every write late, while
    /// it stays connected and answers the reads sent to it.
    pub fn start_with_delayed_member(size: usize, slow: usize, delay: Duration) -> Self {
        Self::start_shaped(size, Some((slow, delay)))
    }

    fn start_shaped(size: usize, delayed: Option<(usize, Duration)>) -> Self {
        // A free port found by binding it may be taken by a parallel test before its server
        // binds it: start again on other ports.
        let mut tries = 0;
        loop {
            match Self::try_start(size, delayed) {
                Ok(cluster) => {
                    cluster.wait_until_formed();
                    return cluster;
                }
                Err(e) if tries < 5 => {
                    tries += 1;
                    eprintln!("starting the cluster again: {e}");
                }
                Err(e) => panic!("nats-server starts (scripts/test installs it): {e}"),
            }
        }
    }

    fn try_start(size: usize, delayed: Option<(usize, Duration)>) -> Result<Self, String> {
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let monitors: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let servers = (0..size)
            .map(|index| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(other, _)| *other != index)
                    .map(|(other, port)| match delayed {
                        // Through a proxy of this pair's own, both ends dialing explicitly.
                        Some((member, delay)) if member == index || member == other => {
                            let proxy = DelayProxy::start(*port, delay);
                            format!("nats-route://127.0.0.1:{}", proxy.port)
                        }
                        _ => format!("nats-route://127.0.0.1:{port}"),
                    })
                    .collect();
                // With delayed links, no member dials what it learns from the others (their
                // listening ports, which would bypass the proxies): only the routes given.
                let advertise = match delayed {
                    Some(_) => "\n  advertise: \"127.0.0.1:1\"",
                    None => "",
                };
                let extra = format!(
                    "server_name: {}\nping_interval: \"1s\"\nhttp: 127.0.0.1:{}\ncluster {{\n  name: ferry\n  listen: 127.0.0.1:{}{advertise}\n  routes: [{}]\n}}\n",
                    member_name(index),
                    monitors[index],
                    routes[index],
                    others.join(", ")
                );
                NatsServer::start_with(free_port(), extra)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { servers, monitors })
    }

    /// Every member as a seed: `nats://HOST:PORT,HOST:PORT,...`.
    pub fn seeds(&self) -> String {
        let seeds: Vec<String> = self
            .servers
            .iter()
            .map(|server| format!("127.0.0.1:{}", server.port))
            .collect();
        format!("nats://{}", seeds.join(","))
    }

    /// The store URL naming every member as a seed.
    pub fn url(&self, namespace: &str, replicas: usize) -> String {
        format!("{}/{namespace}?replicas={replicas}", self.seeds())
    }

    /// What a live member's monitoring endpoint answers on `path`.
    fn monitor(&self, path: &str) -> Option<Value> {
        self.monitors.iter().find_map(|port| {
            http_get(*port, path).and_then(|body| serde_json::from_str(&body).ok())
        })
    }

    /// Waits until the JetStream meta leader, by its own monitoring endpoint, sees every other
    /// member current: a leader elected by two of three can still refuse a stream of three
    /// replicas ("no suitable peers for placement, peer offline") until the third has caught up.
    /// Only the leader's view counts: a follower's list of the members was seen current while
    /// the leader still counted one offline (a CI run of the benchmark).
    pub fn wait_until_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let others = self.servers.len() - 1;
        let leader_sees_everyone = |index: usize, jsz: &Value| {
            let meta = &jsz["meta_cluster"];
            let replicas = meta["replicas"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            meta["leader"].as_str() == Some(member_name(index).as_str())
                && replicas.len() >= others
                && replicas.iter().all(|replica| {
                    replica["current"].as_bool() == Some(true)
                        && replica["offline"].as_bool() != Some(true)
                })
        };
        loop {
            let ready = self.monitors.iter().enumerate().any(|(index, port)| {
                http_get(*port, "/jsz")
                    .and_then(|body| serde_json::from_str::<Value>(&body).ok())
                    .is_some_and(|jsz| leader_sees_everyone(index, &jsz))
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster elects a meta leader that sees every member current"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last sequence of the namespace's stream in one member's own storage.
    pub fn member_last_sequence(&self, index: usize, namespace: &str) -> Option<u64> {
        let body = http_get(self.monitors[index], "/jsz?accounts=true&streams=true")?;
        stream_detail(&serde_json::from_str(&body).ok()?, namespace)?["state"]["last_seq"].as_u64()
    }

    /// The stream of `namespace` as its leader sees it: `(leader index, followers current)`
    /// (only the leader knows how far its followers are).
    pub fn stream_state(&self, namespace: &str) -> Option<(Option<usize>, usize)> {
        let leader_of = |jsz: &Value| {
            let stream = stream_detail(jsz, namespace)?;
            let name = stream["cluster"]["leader"].as_str()?.to_owned();
            (0..self.servers.len()).find(|i| member_name(*i) == name)
        };
        let Some(leader) = leader_of(&self.monitor("/jsz?accounts=true&streams=true")?) else {
            return Some((None, 0));
        };
        let body = http_get(self.monitors[leader], "/jsz?accounts=true&streams=true")?;
        let stream = stream_detail(&serde_json::from_str(&body).ok()?, namespace)?;
        let current = stream["cluster"]["replicas"]
            .as_array()
            .map_or(0, |replicas| {
                replicas.iter().filter(|r| r["current"] == true).count()
            });
        Some((Some(leader), current))
    }

    /// The member leading the namespace's stream, waiting for one to be elected.
    pub fn leader(&self, namespace: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((Some(leader), _)) = self.stream_state(namespace) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "the stream {namespace} has a leader"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the stream has a leader and every other member is current with it.
    pub fn wait_until_replicated(&self, namespace: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((Some(_), current)) = self.stream_state(namespace)
                && current + 1 == self.servers.len()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "every member of the stream {namespace} is current: {:?}\n{}",
                self.stream_state(namespace),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl NatsCluster {
    /// The end of every member's log, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.servers.len())
            .map(|i| format!("--- {}:\n{}", member_name(i), self.servers[i].log_tail(20)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A stream's details in a `/jsz?accounts=true&streams=true` answer.
fn stream_detail(jsz: &Value, namespace: &str) -> Option<Value> {
    jsz["account_details"]
        .as_array()?
        .iter()
        .flat_map(|account| {
            account["stream_detail"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .find(|stream| stream["name"] == namespace)
}

/// A plain HTTP GET on loopback; `None` when the server does not answer 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}
