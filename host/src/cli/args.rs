//! The command line's arguments: the global options, the store choice and every subcommand.

use super::*;

/// Ferry: event-driven services as sandboxed Wasm components.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// Data folder: the embedded store, the precompiled-code cache and the control socket.
    #[arg(long, global = true, default_value = "./data", env = "FERRY_DATA")]
    pub data: PathBuf,
    /// Services folder: one `.wasm` component per service.
    #[arg(
        long,
        global = true,
        default_value = "./services",
        env = "FERRY_SERVICES"
    )]
    pub services: PathBuf,
    /// The store: `sled` (embedded, in the data folder) or
    /// `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]` (a JetStream namespace that
    /// several Ferry processes share, kept by N servers of a cluster).
    #[arg(
        long,
        global = true,
        default_value = "sled",
        env = "FERRY_STORE",
        value_parser = parse_store
    )]
    pub store: StoreChoice,
    /// Print answers as JSON, for scripts.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the messages live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded sled store in `DATA/store`, one process at a time.
    Sled,
    /// A JetStream namespace: `nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]`.
    Nats(String),
}

pub(super) fn parse_store(text: &str) -> Result<StoreChoice, String> {
    if text == "sled" {
        Ok(StoreChoice::Sled)
    } else if text.starts_with("nats://") {
        Ok(StoreChoice::Nats(text.to_owned()))
    } else {
        Err(format!(
            "{text:?}: expected sled or nats://HOST:PORT[,HOST:PORT...][/NAMESPACE][?replicas=N]"
        ))
    }
}

// Parsed once per process: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the services of the services folder until interrupted.
    Run {
        /// Run only these services of the services folder (comma-separated names), so that the
        /// same components run as one process or as one process per service.
        #[arg(long, value_delimiter = ',', value_name = "SERVICE,...")]
        only: Vec<String>,
        #[command(flatten)]
        http: HttpArgs,
        /// Longest time one call into a guest may run, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        guest_timeout_ms: u64,
        /// Largest memory a guest may grow to, in MiB.
        #[arg(long, default_value_t = 64)]
        guest_memory_mib: usize,
        /// Deliveries of a transiently failing message before it is parked.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// First retry delay after a transient failure, in milliseconds (doubles each time).
        #[arg(long, default_value_t = 100)]
        retry_base_ms: u64,
        /// Reuse a healthy guest instance for the messages of a batch instead of a fresh one per
        /// message (faster; only for guests that keep no state between calls).
        #[arg(long)]
        reuse_instances: bool,
        /// Threads on which one consumer decides the entities of a page at the same time
        /// (default: one per core, at most 4; 1 decides every page in order on one thread).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..=64))]
        decide_lanes: Option<u8>,
        /// On JetStream: how long an instance's partitions stay its own after its last heartbeat
        /// (it renews five times in that time). A killed instance's share moves after about
        /// this long; a graceful stop hands it over at once.
        #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(500..))]
        lease_ttl_ms: u64,
        /// The embedded store's page cache, in MiB: sled keeps this much of the store's recent
        /// pages in memory, whatever the length of the history behind it.
        #[arg(long, value_name = "MIB", default_value_t = crate::store::DEFAULT_CACHE_BYTES >> 20, value_parser = clap::value_parser!(u64).range(8..))]
        store_cache_mib: u64,
        /// A limit for one service, overriding the defaults above:
        /// `SERVICE:timeout-ms=N` or `SERVICE:memory-mib=N` (repeatable).
        #[arg(long = "service-limit", value_name = "SERVICE:KEY=N", value_parser = parse_service_limit)]
        service_limits: Vec<ServiceLimit>,
        #[command(flatten)]
        mail: MailArgs,
    },
    /// Append a message (normally a command) to a stream.
    Send {
        /// Target stream, such as `user:command.42`.
        stream: String,
        /// Message type, such as `RegisterUser`.
        #[arg(value_name = "TYPE")]
        message_type: String,
        /// The data, a JSON object.
        #[arg(value_name = "JSON")]
        payload: String,
        /// Metadata, a JSON object (`originEntity`, `correlationId`, ...).
        #[arg(long)]
        metadata: Option<String>,
        /// Message id (default: a new UUID). Sending the same id twice stores it once.
        #[arg(long)]
        id: Option<String>,
        /// Refuse unless the stream holds exactly this many messages.
        #[arg(long)]
        expected_version: Option<u64>,
        /// Store these top-level data fields sealed: encrypted under a key of the command's own
        /// that is destroyed once the command is handled (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', value_name = "FIELD")]
        sealed: Vec<String>,
    },
    /// Read a stream (`user.42`, from a position) or a category (`user`, past a global position).
    Read {
        #[arg(value_name = "STREAM|CATEGORY")]
        target: String,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List consumers with their positions and lag, per partition, and who owns each.
    Consumers {
        /// Only the consumers of this category.
        category: Option<String>,
    },
    /// List the live instances sharing each consumer group (on JetStream), with the partitions
    /// each holds, how long it has held them and its last heartbeat.
    Instances {
        /// Only the consumers of this category.
        category: Option<String>,
    },
    /// Read a view table (view data), or one row of it.
    View {
        table: String,
        key: Option<String>,
        /// Start after this key.
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List parked (dead-letter) messages with the reason.
    Parked,
    /// Hand parked messages back to their consumers.
    Replay {
        /// The parked message's id.
        id: Option<String>,
        /// Replay every parked message of this consumer (with --category).
        #[arg(long, requires = "category")]
        consumer: Option<String>,
        #[arg(long, requires = "consumer")]
        category: Option<String>,
    },
    /// List the services with the version (content hash) running and since when.
    Services,
    /// Show a stream's projected state, folded by the owning service's `project`.
    Project { stream: String },
    /// Empty a view (and the other views of the service writing it) and rebuild it from the event
    /// history, showing progress. Runs in the host when one is running, otherwise here.
    Rebuild { table: String },
    /// Load a component and print its manifest, or why it cannot run.
    Inspect { component: PathBuf },
    /// Write a new service folder: the WIT, a minimal service in the language (one command, one
    /// event, a projection, a view), its scenarios for `ferry test`, and how to build it.
    New {
        /// The service's name (letters, digits, '-' and '_'), also the folder's.
        name: String,
        #[arg(long, value_enum)]
        lang: new::Lang,
        /// Where the folder goes.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Run the host on the services built from a folder of service sources (each as `ferry new`
    /// writes it): a service is rebuilt when its sources change, its scenarios run, and it is
    /// hot-reloaded if they pass; a failing build or scenario is shown and the running version
    /// stays.
    Dev {
        /// The folder of service folders.
        sources: PathBuf,
        #[command(flatten)]
        mail: MailArgs,
    },
    /// Run given / when / then scenarios (TOML, see guests/README.md) against a component
    /// through the host's real path, each on a throwaway store; no running host is needed.
    /// Exits 1 when a scenario fails, showing what differs.
    Test {
        /// The service component (`.wasm`).
        component: PathBuf,
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
    /// Set how many JetStream servers keep the namespace of `--store nats://...` (1 to 5). The
    /// servers copy it to the new replicas in the background; whoever may change the stream on
    /// the NATS account may do this.
    Replicas {
        #[arg(value_parser = clap::value_parser!(u8).range(1..=5))]
        count: u8,
    },
    /// Check or repair the embedded store of a stopped host (`--data`).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Issue a signed end-user token (HS256) for tests and demos; real deployments take tokens
    /// from their identity provider.
    Token {
        /// The token's subject: the user it stands for (`{sub}` in the policy).
        #[arg(long)]
        sub: String,
        /// The shared secret, the same file as `ferry run --http-jwt-secret-file`.
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
        /// How long the token is valid: 90s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = gateway::parse_ttl)]
        ttl: Duration,
    },
}

/// What `ferry store` does.
#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// Read every record of the message log, every entry of its index and every record of
    /// sled, and hold them against each other, changing nothing. Exits 1 when damage is found,
    /// saying where and what mends it.
    Check,
    /// Rebuild what can be derived from the message log: its index; sled's head when sled's
    /// files were lost; records past the head set aside. Then check again.
    Repair,
}

/// Who may send email, and where it goes.
#[derive(Debug, Clone, clap::Args)]
pub struct MailArgs {
    /// Services granted the mail capability.
    #[arg(long = "mail-grant", value_name = "SERVICE", default_value = "email")]
    pub mail_grants: Vec<String>,
    /// Where emails go: `maildir` (DATA/maildir), `smtp://HOST[:PORT]` (STARTTLS as
    /// --mail-tls says, port 587 by default) or `smtps://HOST[:PORT]` (TLS, port 465).
    #[arg(long = "mail", value_name = "TRANSPORT", default_value = "maildir")]
    pub transport: String,
    /// STARTTLS towards an `smtp://` relay: `required` (nothing is sent without it),
    /// `opportunistic` or `none` (a relay on this machine or a trusted network only).
    #[arg(long = "mail-tls", value_enum, default_value = "required")]
    pub tls: crate::mail::SmtpTls,
    /// A file holding `user:password` for the SMTP relay on its first line, readable by its
    /// owner only.
    #[arg(long = "mail-credentials", value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for the SMTP relay, beside the system's.
    #[arg(long = "mail-ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

impl MailArgs {
    /// The capability these settings give, delivering under `data` for a maildir.
    pub fn capabilities(
        &self,
        data: &std::path::Path,
    ) -> anyhow::Result<crate::service::Capabilities> {
        use crate::mail::{Maildir, SmtpRelay, Transport};
        let transport = match self.transport.as_str() {
            "maildir" => Transport::Maildir(Maildir::new(super::maildir(data))),
            url => Transport::Smtp(SmtpRelay::open(
                url,
                self.tls,
                self.credentials.as_deref(),
                self.ca.as_deref(),
            )?),
        };
        Ok(crate::service::Capabilities {
            mail: Some(std::sync::Arc::new(transport)),
            mail_grants: self.mail_grants.clone(),
        })
    }
}
