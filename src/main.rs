//! `afflio`: replay, SQL, rules check and the demo.

use std::fs::File;
use std::io::{BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use afflio::bench;
use afflio::demo::{self, DemoOptions};
use afflio::fraudlab::{self, GenOptions};
use afflio::replay::replay;
use afflio::review::{ReviewRequest, ReviewResult};
use afflio_engine::rules::Rules;
use afflio_engine::Decision;
use afflio_sinks::OutputFormat;
use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "afflio", version, about = "Affiliate attribution engine: exact commissions from checkout events")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a JSON Lines event file through the engine into a Parquet store.
    Replay {
        /// The rules file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The events, one JSON object per line.
        #[arg(long)]
        events: PathBuf,
        /// The store directory (one subdirectory per table).
        #[arg(long)]
        out: PathBuf,
        /// "Now" for the lifecycle (RFC 3339); default: the newest event time.
        #[arg(long, value_parser = parse_ts)]
        as_of: Option<DateTime<Utc>>,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Runs a query over a store (tables: ledger, orders, lines, flags,
    /// rejections, clicks, decisions, payouts, balances, epochs). Queries
    /// only: nothing that writes is accepted.
    Sql {
        /// The store directory.
        #[arg(long)]
        data: PathBuf,
        /// The query.
        query: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// Read store version N (every table as that commit left it); see the
        /// `epochs` table. Default: the latest.
        #[arg(long, conflicts_with = "as_of_time")]
        version: Option<i64>,
        /// Read the latest store version committed at or before this time (RFC 3339).
        #[arg(long, value_parser = parse_ts)]
        as_of_time: Option<DateTime<Utc>>,
    },
    /// Store maintenance by hand (the live service runs it on a schedule).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The live service: HTTP ingest and tracking redirects, NATS JetStream,
    /// the engine, the Delta Lake store. Stops cleanly on SIGTERM.
    Serve(Box<ServeArgs>),
    /// Webhooks out: send an endpoint's messages again by hand.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Generates labelled traffic: normal shopping with daily seasonality and
    /// injected attacks of every fraud kind; writes rules.toml, events.jsonl
    /// and labels.csv (the attacked orders).
    Gen {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 12)]
        days: u32,
        /// Average orders per day of normal traffic.
        #[arg(long, default_value_t = 4_500)]
        orders_per_day: u32,
        #[arg(long, default_value_t = 200)]
        creators: usize,
        /// Only normal traffic (no attacks, empty labels).
        #[arg(long)]
        no_fraud: bool,
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluates the fraud rules on generated traffic: per rule precision,
    /// recall and detection delay against the labels, and the engine's
    /// throughput with every rule on and off.
    Eval {
        /// Seeds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5")]
        seeds: Vec<u64>,
        #[arg(long, default_value_t = 12)]
        days: u32,
        #[arg(long, default_value_t = 4_500)]
        orders_per_day: u32,
        #[arg(long, default_value_t = 200)]
        creators: usize,
        /// Skip the throughput runs (the detection table only).
        #[arg(long)]
        no_throughput: bool,
        /// Print up to this many false alarms per rule and missed orders per
        /// attack shape, per seed.
        #[arg(long, default_value_t = 0)]
        explain: usize,
    },
    /// The payouts queue on a replayed store: plan a batch from approved
    /// balances, send it (RazorpayX, PayPal), reconcile statuses.
    Payouts {
        #[command(subcommand)]
        command: PayoutsCommand,
    },
    /// Reviews on a replayed store: the queue of held lines, and decisions
    /// (approve, reject, clear) recorded in the `decisions` table.
    Review {
        #[command(subcommand)]
        command: ReviewCommand,
    },
    /// Reproducible measurements (see BENCHMARKS.md): replay throughput and
    /// peak memory, memory per tracked session, the live pipeline under
    /// load, and the PostgreSQL baseline side by side.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Rules file commands.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Generates realistic traffic, replays it, and shows the results. No
    /// external service needed.
    Demo {
        /// How many events to generate.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Seed of the generator: the same seed gives the same traffic.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Where to write the generated input and the store.
        #[arg(long, default_value = "afflio-demo")]
        out: PathBuf,
        /// Never show a progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The rules file (TOML); reloaded on SIGHUP or when it changes.
    #[arg(long)]
    config: PathBuf,
    /// NATS server with JetStream (credentials: AFFLIO_NATS_INGEST_* and AFFLIO_NATS_ENGINE_*).
    #[arg(long, default_value = "nats://127.0.0.1:4222", env = "AFFLIO_NATS_URL")]
    nats: String,
    /// Address for the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: std::net::SocketAddr,
    /// The store directory (one Delta table per subdirectory).
    #[arg(long)]
    data: PathBuf,
    /// Where the engine keeps its checkpoints (default: DATA/../state).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Commit an epoch to the store (and checkpoint) this often, ms...
    #[arg(long, default_value_t = 1000)]
    epoch_ms: u64,
    /// ...or when it holds this many events.
    #[arg(long, default_value_t = 200_000)]
    max_epoch_events: usize,
    /// Largest accepted request body, bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_body: usize,
    /// A request (its body included) must be answered within this, seconds (408).
    #[arg(long, default_value_t = 30)]
    request_timeout_secs: u64,
    /// A client must send its request headers within this, seconds.
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// Connections open at once, at most.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Requests handled at once; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// On SIGTERM, requests in flight may finish within this, seconds.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Requests per second per API key (429 beyond), and the burst.
    #[arg(long, default_value_t = 2_000)]
    key_rate: u64,
    #[arg(long, default_value_t = 4_000)]
    key_burst: u32,
    /// Requests per second per client address (429 beyond), and the burst.
    #[arg(long, default_value_t = 500)]
    ip_rate: u64,
    #[arg(long, default_value_t = 1_000)]
    ip_burst: u32,
    /// A proxy (address or CIDR) whose X-Forwarded-For is believed; repeatable.
    #[arg(long = "trusted-proxy", value_parser = parse_net)]
    trusted_proxies: Vec<ipnet::IpNet>,
    /// A user-agent pattern (regular expression) of bots not counted as clicks,
    /// on top of the maintained list; repeatable.
    #[arg(long = "bot-pattern")]
    bot_patterns: Vec<String>,
    /// The same visitor on the same link within this counts once, seconds.
    #[arg(long, default_value_t = 30)]
    click_dedupe_secs: u64,
    /// Set the Secure attribute of the service's cookies (visitor, partner page, console): served over HTTPS.
    #[arg(long)]
    cookie_secure: bool,
    /// The visitor cookie's Domain (default: the host only).
    #[arg(long)]
    cookie_domain: Option<String>,
    /// The stream keeps events this long (at least [engine] dedupe_retention).
    #[arg(long, default_value = "45d", value_parser = parse_duration)]
    stream_max_age: chrono::TimeDelta,
    /// The stream's size bound, GiB (oldest events deleted first; the broker
    /// must have that much storage; 0: no bound but max_age).
    #[arg(long, default_value_t = 4)]
    stream_max_gib: u64,
    /// The broker drops a repeated message id within this window, seconds.
    #[arg(long, default_value_t = 120)]
    duplicate_window_secs: u64,
    /// Store maintenance (OPTIMIZE of a table with many small files) this often, seconds.
    #[arg(long, default_value_t = 60)]
    maintenance_secs: u64,
    /// OPTIMIZE a table once it has this many files to merge.
    #[arg(long, default_value_t = 64)]
    optimize_min_files: usize,
    /// VACUUM this often, seconds.
    #[arg(long, default_value_t = 3600)]
    vacuum_secs: u64,
    /// Files older versions no longer need are deleted after this long (e.g. 7d, 1h).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    vacuum_retention: chrono::TimeDelta,
    /// A webhook request times out after this long, seconds.
    #[arg(long, default_value_t = 10)]
    webhook_timeout_secs: u64,
    /// The first webhook retry waits this long (each next one doubles, with jitter), milliseconds.
    #[arg(long, default_value_t = 5_000)]
    webhook_retry_base_ms: u64,
    /// The longest wait between webhook attempts, seconds.
    #[arg(long, default_value_t = 6 * 3600)]
    webhook_retry_max_secs: u64,
    /// A webhook message is given up this long after it was published (e.g. 3d, 10m).
    #[arg(long, default_value = "3d", value_parser = parse_duration)]
    webhook_retry_window: chrono::TimeDelta,
    /// Messages of different subjects delivered at once, per endpoint.
    #[arg(long, default_value_t = 8)]
    webhook_lanes: usize,
}

impl ServeArgs {
    fn options(self) -> afflio_pipeline::ServeOptions {
        use std::time::Duration;
        let state = self.state.unwrap_or_else(|| self.data.parent().unwrap_or(Path::new(".")).join("state"));
        afflio_pipeline::ServeOptions {
            config: self.config,
            nats: self.nats,
            http: self.http,
            data: self.data,
            state,
            epoch_interval: Duration::from_millis(self.epoch_ms.max(10)),
            max_epoch_events: self.max_epoch_events.max(1),
            http_config: afflio_ingest::http::HttpConfig {
                max_body: self.max_body,
                request_timeout: Duration::from_secs(self.request_timeout_secs.max(1)),
                max_in_flight: self.max_in_flight.max(1),
                key_rate: (self.key_rate.max(1), self.key_burst.max(1)),
                ip_rate: (self.ip_rate.max(1), self.ip_burst.max(1)),
                trusted_proxies: self.trusted_proxies,
                redirect: afflio_ingest::http::RedirectConfig {
                    bot_patterns: self.bot_patterns,
                    dedupe_interval: Duration::from_secs(self.click_dedupe_secs),
                    cookie_secure: self.cookie_secure,
                    cookie_domain: self.cookie_domain,
                    ..Default::default()
                },
            },
            server: afflio_ingest::server::ServerLimits {
                header_timeout: Duration::from_secs(self.header_timeout_secs.max(1)),
                max_connections: self.max_connections.max(1),
                drain: Duration::from_secs(self.drain_secs),
            },
            payouts_http: afflio::payouts::http_settings(),
            stream: afflio_ingest::nats::StreamLimits {
                duplicate_window: Duration::from_secs(self.duplicate_window_secs.max(1)),
                max_age: self.stream_max_age.to_std().unwrap_or(Duration::from_secs(45 * 86_400)),
                max_bytes: if self.stream_max_gib == 0 { -1 } else { (self.stream_max_gib << 30) as i64 },
            },
            maintenance_every: Duration::from_secs(self.maintenance_secs.max(1)),
            vacuum_every: Duration::from_secs(self.vacuum_secs.max(1)),
            maintenance: afflio_sinks::Maintenance {
                vacuum_retention: self.vacuum_retention,
                min_files: self.optimize_min_files.max(2),
                ..afflio_sinks::Maintenance::default()
            },
            webhooks: afflio_pipeline::webhooks::DeliverySettings {
                timeout: Duration::from_secs(self.webhook_timeout_secs.max(1)),
                retry_base: Duration::from_millis(self.webhook_retry_base_ms.max(1)),
                retry_max: Duration::from_secs(self.webhook_retry_max_secs.max(1)),
                retry_window: self.webhook_retry_window.to_std().unwrap_or(Duration::from_secs(3 * 86_400)),
                lanes: self.webhook_lanes.clamp(1, 64),
            },
        }
    }
}

#[derive(Subcommand)]
enum WebhooksCommand {
    /// Sends an endpoint's messages again from the outbox (kept 7 days), once
    /// each, whatever their earlier outcome; logged in `deliveries` as
    /// `replayed` or `replay_failed`.
    Replay {
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// The store directory (where `deliveries` is).
        #[arg(long)]
        data: PathBuf,
        /// The endpoint's id.
        #[arg(long)]
        endpoint: String,
        /// Messages published at or after this time (RFC 3339); default: all kept.
        #[arg(long, value_parser = parse_ts)]
        since: Option<DateTime<Utc>>,
        /// ... and before this time.
        #[arg(long, value_parser = parse_ts)]
        until: Option<DateTime<Utc>>,
        /// Only this message (its `webhook-id`).
        #[arg(long)]
        message_id: Option<String>,
        /// Only this event type (default: the endpoint's types).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Per request, seconds.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The demo mix (JSON Lines -> engine -> Parquet) in one process: events/s,
    /// peak RSS, sampled decode+apply latency.
    Replay {
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        #[arg(long, default_value_t = 12)]
        seed: u64,
        /// Measure this directory's rules.toml and events.jsonl (into DIR/store)
        /// in this process instead of generating them and measuring in a child.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// The engine's checkpoint (image and a delta of a fixed change) and the
    /// recovery from disk, at 1M, 4M and 16M tracked sessions (or one size).
    Checkpoint {
        /// One size only.
        #[arg(long)]
        sessions: Option<u64>,
        /// Measure in this process (the command runs each size in a child).
        #[arg(long, hide = true)]
        here: bool,
    },
    /// The marketplace registry at 10k, 100k and 1M partners (or one size):
    /// updates/s, memory per partner, checkpoint delta, against rebuilding the rules.
    Registry {
        /// One size only.
        #[arg(long)]
        partners: Option<u64>,
        /// Measure in this process (the command runs each size in a child).
        #[arg(long, hide = true)]
        here: bool,
    },
    /// Webhooks: the engine's added cost per event with every effect turned
    /// into a message, and the delivery throughput to one endpoint (a local
    /// receiver) through the broker's outbox.
    Webhooks {
        #[arg(long, default_value_t = 500_000)]
        events: u64,
        /// Messages delivered in the throughput run.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        #[arg(long, default_value_t = 8)]
        lanes: usize,
        /// The broker (AFFLIO_NATS_* credentials are used when set).
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
    },
    /// Memory per tracked visitor session: RSS growth over N one-click visitors.
    Sessions {
        #[arg(long, default_value_t = 4_000_000)]
        sessions: u64,
    },
    /// Replay at three sizes of events and of partners, sessions at three
    /// sizes: how cost grows.
    Scaling {
        #[arg(long, default_value_t = 12)]
        seed: u64,
    },
    /// The same generated workload through a PostgreSQL attribution pipeline
    /// and through Afflio; checks the ledgers agree, prints the ratios.
    Baseline {
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(long, default_value_t = 12)]
        seed: u64,
        /// PostgreSQL to use; one is started (initdb + pg_ctl) if none answers.
        #[arg(long, default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres", env = "AFFLIO_PG_URL")]
        pg: String,
        /// Events per PostgreSQL transaction.
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// The live service under load: a local nats-server, `afflio serve`, and
    /// NDJSON batches posted at fixed offered rates (a fresh service per rate).
    Live {
        /// Offered rates, events/s.
        #[arg(long, value_delimiter = ',', default_values_t = [50_000u64, 100_000, 200_000])]
        rates: Vec<u64>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        seed: u64,
        /// Extra arguments for `afflio serve` (e.g. "--epoch-ms 500").
        #[arg(long, allow_hyphen_values = true, default_value = "")]
        serve_args: String,
        /// Seconds per reported window of a long run.
        #[arg(long, default_value_t = 60)]
        window: u64,
    },
}

#[derive(Subcommand)]
enum ReviewCommand {
    /// Lines held for review, with the flags that hold them.
    Queue {
        /// The store directory.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Approves lines: one order's (optionally one partner's, one tier), or,
    /// without --order, every eligible unheld pending line of the program.
    Approve(DecisionArgs),
    /// Rejects an order's lines (they are never paid); needs --reason.
    Reject(DecisionArgs),
    /// Releases an order's held lines after review: they follow their normal
    /// lifecycle (and still wait for their eligibility).
    Clear(DecisionArgs),
}

#[derive(Subcommand)]
enum PayoutsCommand {
    /// Builds a batch from the approved balances and fixes each item's
    /// identity with its provider (nothing is sent).
    Plan {
        #[command(flatten)]
        store: PayoutStore,
        /// Balances as of this time (RFC 3339); default: the store's "now".
        #[arg(long, value_parser = parse_ts)]
        at: Option<DateTime<Utc>>,
    },
    /// Sends planned items (of one batch with --batch), each batch's request
    /// groups separately, and resolves items whose outcome is unknown.
    /// Safe to re-run at any time.
    Send {
        #[command(flatten)]
        store: PayoutStore,
        #[arg(long)]
        batch: Option<String>,
    },
    /// Asks the providers where items stand (unknown, sent, recently paid).
    Sync {
        #[command(flatten)]
        store: PayoutStore,
    },
    /// Settles an item no provider can answer for, on a person's word
    /// (what the provider's dashboard shows).
    Resolve {
        #[command(flatten)]
        store: PayoutStore,
        #[arg(long)]
        batch: String,
        #[arg(long)]
        partner: String,
        /// paid or failed.
        #[arg(long)]
        status: String,
        /// Who settles it.
        #[arg(long)]
        by: String,
        /// What they saw (kept with the record).
        #[arg(long)]
        note: String,
    },
    /// Runs local fakes of the RazorpayX and PayPal payout APIs (no accounts
    /// needed; as strict as the real ones) until Ctrl-C, then lists the
    /// payouts they made.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:9099")]
        listen: std::net::SocketAddr,
    },
    /// Verifies a provider webhook (its raw body and headers) and applies it.
    Webhook {
        #[command(flatten)]
        store: PayoutStore,
        /// razorpayx or paypal.
        #[arg(long, default_value = "razorpayx")]
        provider: String,
        /// The X-Razorpay-Signature header (RazorpayX).
        #[arg(long)]
        signature: Option<String>,
        /// A header as `Name: value` (PayPal's PAYPAL-TRANSMISSION-* and the rest); repeatable.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// The raw request body.
        #[arg(long)]
        body: PathBuf,
    },
}

#[derive(clap::Args)]
struct PayoutStore {
    /// The rules file (TOML) with [payouts] providers.
    #[arg(long)]
    config: PathBuf,
    /// The store directory (written by `afflio replay`).
    #[arg(long)]
    data: PathBuf,
    /// The program (default: the config's only program).
    #[arg(long)]
    program: Option<String>,
}

#[derive(clap::Args)]
struct DecisionArgs {
    /// The rules file (TOML) the store was replayed with.
    #[arg(long)]
    config: PathBuf,
    /// The store directory (written by `afflio replay`).
    #[arg(long)]
    data: PathBuf,
    /// The program (default: the config's only program).
    #[arg(long)]
    program: Option<String>,
    #[arg(long)]
    order: Option<String>,
    #[arg(long)]
    partner: Option<String>,
    #[arg(long)]
    tier: Option<u8>,
    /// Why (required to reject).
    #[arg(long)]
    reason: Option<String>,
    /// Who decides (kept in the decisions table).
    #[arg(long, env = "USER", default_value = "unknown")]
    by: String,
    /// The decision's time (RFC 3339); default: the store's "now".
    #[arg(long, value_parser = parse_ts)]
    at: Option<DateTime<Utc>>,
    /// The review's event id (default: derived from its content, so that the
    /// same command run twice decides once).
    #[arg(long)]
    id: Option<String>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Merges each table's small files into large ones (a new version with
    /// the same rows; readers are not disturbed).
    Optimize {
        #[arg(long)]
        data: PathBuf,
        /// Only this table.
        #[arg(long)]
        table: Option<String>,
    },
    /// Deletes files that no version younger than the retention needs.
    Vacuum {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        table: Option<String>,
        /// How long old versions stay readable (e.g. 7d, 24h).
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        retention: chrono::TimeDelta,
    },
    /// The store's versions: when each was committed, by whom, at which stream position.
    History {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 20)]
        last: usize,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validates a rules file and reports every problem with line and field.
    Check { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a CIDR network (e.g. 10.0.0.0/8)"))
}

fn parse_duration(s: &str) -> Result<chrono::TimeDelta, String> {
    afflio_engine::rules::parse_duration(s)
}

fn parse_ts(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time with offset (e.g. 2026-12-01T00:00:00Z): {e}"))
}

fn main() -> ExitCode {
    // Fault points for the crash tests (`FAILPOINTS`); inert without it.
    let _faults = fail::FailScenario::setup();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_rules(path: &Path) -> Result<Rules, ExitCode> {
    Rules::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn progress_bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn sql(data: &Path, query: &str, format: Format, at: afflio_sinks::At) -> anyhow::Result<ExitCode> {
    let format = match format {
        Format::Table => OutputFormat::Table,
        Format::Csv => OutputFormat::Csv,
        Format::Json => OutputFormat::Json,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match rt.block_on(afflio_sinks::query_at(data, query, format, at)) {
        Ok(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// `afflio review approve|reject|clear`: exit 0 when applied (or already
/// applied), 1 when the engine refused the review, with its reason.
fn decide(decision: Decision, a: DecisionArgs) -> anyhow::Result<ExitCode> {
    let rules = match load_rules(&a.config) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let req = ReviewRequest {
        decision,
        program_id: a.program,
        order_id: a.order,
        partner_id: a.partner,
        tier: a.tier,
        reason: a.reason,
        reviewer: a.by,
        at: a.at,
        event_id: a.id,
    };
    match afflio::review::review(rules, &a.data, &req)? {
        ReviewResult::Applied(rows) => {
            println!("{} line(s) decided", rows.len());
            for r in &rows {
                println!(
                    "  {} {} tier {}: {} -> {} ({} {})",
                    r.order_id,
                    r.partner_id,
                    r.tier,
                    r.previous_status.as_str(),
                    r.status.as_str(),
                    r.net_amount,
                    r.decision.as_str()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ReviewResult::Duplicate => {
            println!("already applied (same review id and content): nothing changed");
            Ok(ExitCode::SUCCESS)
        }
        ReviewResult::Rejected(r) => {
            eprintln!(
                "error: review refused ({}): {}: {}",
                r.reason.as_str(),
                r.field.as_deref().unwrap_or("-"),
                r.detail
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn print_report(r: &afflio::payouts::Report) {
    println!(
        "requests {}, sent {}, paid {}, failed {}, reversed {}, unknown {}, needs a person {}",
        r.requests,
        r.sent,
        r.paid,
        r.failed,
        r.reversed,
        r.unknown.len(),
        r.needs_person.len()
    );
    for (partner, why) in &r.unknown {
        println!("  unknown {partner}: {why} (looked up on the next send or sync)");
    }
    for (partner, why) in &r.needs_person {
        println!("  needs a person {partner}: {why}");
    }
    for (group, why) in &r.skipped {
        println!("  skipped {group}: {why}");
    }
    for n in &r.notices {
        println!("  notice: {n}");
    }
}

fn payouts_command(c: PayoutsCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if let PayoutsCommand::Sandbox { listen } = c {
        return rt.block_on(async move {
            let sandbox = afflio::payouts::sandbox::Sandbox::default();
            sandbox.razorpayx.lock().expect("not poisoned").auto_settle = true;
            sandbox.paypal.lock().expect("not poisoned").auto_settle = true;
            let addr = sandbox.start(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            use afflio_payouts::{paypal::fake as pp, razorpayx::fake as rz};
            println!("payout sandbox on http://{addr} (RazorpayX and PayPal). In the rules file:");
            println!("  [payouts.razorpayx] base_url = \"http://{addr}\", account_number = \"{}\"", rz::ACCOUNT);
            println!("  [payouts.paypal]    base_url = \"http://{addr}\", webhook_id = \"{}\"", pp::WEBHOOK_ID);
            println!(
                "and in the environment: RazorpayX key id {}, secret {}, webhook secret {}; PayPal client id {}, secret {}.",
                rz::KEY_ID,
                rz::KEY_SECRET,
                rz::WEBHOOK_SECRET,
                pp::CLIENT_ID,
                pp::CLIENT_SECRET
            );
            println!("Payouts complete when synced. Ctrl-C stops.");
            tokio::signal::ctrl_c().await?;
            for p in &sandbox.razorpayx.lock().expect("not poisoned").payouts {
                println!("razorpayx {} {} paise -> {} ({})", p.id, p.amount_paise, p.to, p.status);
            }
            for b in &sandbox.paypal.lock().expect("not poisoned").batches {
                for i in &b.items {
                    println!("paypal {} {} {} -> {} ({})", b.id, i.value, i.currency, i.receiver, i.status);
                }
            }
            Ok(ExitCode::SUCCESS)
        });
    }
    let store = match &c {
        PayoutsCommand::Plan { store, .. }
        | PayoutsCommand::Send { store, .. }
        | PayoutsCommand::Sync { store }
        | PayoutsCommand::Resolve { store, .. }
        | PayoutsCommand::Webhook { store, .. } => store,
        PayoutsCommand::Sandbox { .. } => unreachable!("handled above"),
    };
    let rules = match load_rules(&store.config) {
        Ok(r) => r,
        Err(code) => return Ok(code),
    };
    let program = afflio::review::program_or_only(&rules, store.program.clone())?;
    let data = store.data.clone();
    match c {
        PayoutsCommand::Plan { at, .. } => {
            let plan = rt.block_on(afflio::payouts::plan(rules, &data, &program, at))?;
            println!("batch {}: {} item(s)", plan.batch_id, plan.items.len());
            for i in &plan.items {
                println!(
                    "  {:<24} {:<10} {:>14}  tds {:>10}  transfer {:>14}  group {}",
                    i.partner_id,
                    i.provider,
                    i.amount,
                    i.tds,
                    i.amount - i.tds,
                    i.group
                );
            }
            for (p, why) in &plan.skipped {
                println!("  skipped {p}: {why}");
            }
        }
        PayoutsCommand::Send { batch, .. } => {
            print_report(&rt.block_on(afflio::payouts::send(rules, &data, &program, batch.as_deref()))?);
        }
        PayoutsCommand::Sync { .. } => print_report(&rt.block_on(afflio::payouts::sync(rules, &data, &program))?),
        PayoutsCommand::Resolve { batch, partner, status, by, note, .. } => {
            let status = match status.as_str() {
                "paid" => afflio_engine::PayoutStatus::Paid,
                "failed" => afflio_engine::PayoutStatus::Failed,
                other => anyhow::bail!("--status {other:?}: an item is resolved as paid or failed"),
            };
            print_report(
                &rt.block_on(afflio::payouts::resolve(rules, &data, &program, &batch, &partner, status, &by, &note))?,
            );
        }
        PayoutsCommand::Sandbox { .. } => unreachable!("handled above"),
        PayoutsCommand::Webhook { provider, signature, headers, body, .. } => {
            let bytes = std::fs::read(&body).with_context(|| format!("cannot read {}", body.display()))?;
            let mut h = http::HeaderMap::new();
            if let Some(sig) = signature {
                h.insert("x-razorpay-signature", sig.parse().context("--signature is not a header value")?);
            }
            for line in headers {
                let (k, v) = line.split_once(':').with_context(|| format!("--header {line:?} is not `Name: value`"))?;
                let name = http::HeaderName::from_bytes(k.trim().as_bytes())
                    .with_context(|| format!("--header {line:?}: bad name"))?;
                h.insert(name, v.trim().parse().with_context(|| format!("--header {line:?}: bad value"))?);
            }
            match rt.block_on(afflio::payouts::webhook(rules, &data, &provider, h, bytes)) {
                Ok(r) => print_report(&r),
                Err(e @ afflio::payouts::WebhookError::BadSignature(_)) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Replay { config, events, out, as_of, quiet } => {
            let rules = match load_rules(&config) {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let file = File::open(&events).with_context(|| format!("cannot open events file {}", events.display()))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let pb = progress_bar(len, quiet, "replay");
            let name = events.display().to_string();
            let summary =
                replay(rules, BufReader::with_capacity(1 << 20, file), &name, &out, as_of, |b| pb.set_position(b))?;
            pb.finish_and_clear();
            print!("{summary}");
            println!("store              {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sql { data, query, format, version, as_of_time } => {
            let at = match (version, as_of_time) {
                (Some(v), _) => afflio_sinks::At::Version(v),
                (None, Some(t)) => afflio_sinks::At::Time(t),
                (None, None) => afflio_sinks::At::Latest,
            };
            sql(&data, &query, format, at)
        }
        Command::Store { command } => store_command(command),
        Command::Serve(args) => {
            let rules = match load_rules(&args.config) {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(afflio_pipeline::run(args.options(), rules))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Webhooks {
            command:
                WebhooksCommand::Replay { nats, data, endpoint, since, until, message_id, event_type, timeout_secs },
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let opts = afflio_pipeline::webhooks::ReplayOptions {
                nats,
                data,
                endpoint,
                since,
                until,
                message_id,
                event_type,
                timeout: std::time::Duration::from_secs(timeout_secs.max(1)),
            };
            let s = rt.block_on(afflio_pipeline::webhooks::replay(opts))?;
            println!("matched {}, delivered {}, failed {}", s.matched, s.delivered, s.failed);
            Ok(if s.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Gen { seed, days, orders_per_day, creators, no_fraud, out } => {
            let o = GenOptions { seed, days, orders_per_day, creators, fraud: !no_fraud };
            let g = fraudlab::generate(&o);
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            std::fs::write(out.join("rules.toml"), &g.rules)?;
            let mut events = String::with_capacity(g.events.iter().map(|e| e.len() + 1).sum());
            for e in &g.events {
                events.push_str(e);
                events.push('\n');
            }
            std::fs::write(out.join("events.jsonl"), events)?;
            std::fs::write(out.join("labels.csv"), fraudlab::labels_csv(&g.labels))?;
            println!(
                "{} events, {} attacked orders -> {}/{{rules.toml,events.jsonl,labels.csv}}",
                g.events.len(),
                g.labels.len(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { seeds, days, orders_per_day, creators, no_throughput, explain } => {
            let mut evals = Vec::new();
            for seed in seeds {
                let o = GenOptions { seed, days, orders_per_day, creators, fraud: true };
                let e = fraudlab::evaluate(&o, !no_throughput)?;
                eprintln!(
                    "seed {seed}: {} events, {} orders, {:.0} events/s with every rule on, {:.0} off",
                    e.events, e.orders, e.events_per_sec_on, e.events_per_sec_off
                );
                let mut shown: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
                for f in &e.false_alarms {
                    let n = shown.entry(f.rule.as_str()).or_default();
                    if *n < explain {
                        *n += 1;
                        eprintln!("  false alarm: {} {} {} {}", f.rule.as_str(), f.order_id, f.ts, f.detail);
                    }
                }
                let mut shown: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
                for l in &e.missed {
                    let n = shown.entry(l.shape).or_default();
                    if *n < explain {
                        *n += 1;
                        eprintln!("  missed: {} {} {} (started {})", l.shape, l.attack_id, l.order_id, l.ts);
                    }
                }
                evals.push(e);
            }
            print!("{}", fraudlab::report(&evals));
            Ok(ExitCode::SUCCESS)
        }
        Command::Review { command: ReviewCommand::Queue { data, format } } => {
            let q = "SELECT l.program_id, l.order_id, l.partner_id, l.tier, l.net_amount, l.currency, l.eligible_at, \
                     f.rules FROM lines l JOIN (SELECT program_id, order_id, string_agg(DISTINCT rule, ',') AS rules \
                     FROM flags WHERE action = 'hold' GROUP BY program_id, order_id) f \
                     ON l.program_id = f.program_id AND l.order_id = f.order_id \
                     WHERE l.held ORDER BY l.program_id, l.order_id, l.tier";
            sql(&data, q, format, afflio_sinks::At::Latest)
        }
        Command::Payouts { command } => payouts_command(command),
        Command::Bench { command } => bench_command(command),
        Command::Review { command: ReviewCommand::Approve(a) } => decide(Decision::Approve, a),
        Command::Review { command: ReviewCommand::Reject(a) } => decide(Decision::Reject, a),
        Command::Review { command: ReviewCommand::Clear(a) } => decide(Decision::Clear, a),
        Command::Rules { command: RulesCommand::Check { file } } => match load_rules(&file) {
            Ok(r) => {
                println!(
                    "{}: ok ({} programs, {} partners, {} links, {} codes)",
                    file.display(),
                    r.programs().count(),
                    r.partners().count(),
                    r.links().count(),
                    r.programs().map(|p| p.codes.len()).sum::<usize>()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Demo { events, seed, out, quiet } => {
            let opts = DemoOptions { events, seed, out };
            let pb = progress_bar(0, quiet, "replay");
            demo::run(&opts, |total, done| {
                pb.set_length(total);
                pb.set_position(done);
            })?;
            pb.finish_and_clear();
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn store_command(c: StoreCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let tables = |only: &Option<String>| -> anyhow::Result<Vec<&'static str>> {
            let all: Vec<&'static str> = afflio_sinks::Store::table_names().collect();
            match only {
                None => Ok(all),
                Some(t) => match all.iter().find(|n| **n == t.as_str()) {
                    Some(n) => Ok(vec![*n]),
                    None => anyhow::bail!("--table {t:?} is not one of {}", all.join(", ")),
                },
            }
        };
        match c {
            StoreCommand::Optimize { data, table } => {
                anyhow::ensure!(afflio_sinks::is_store(&data), "no Afflio store at {}", data.display());
                let mut store = afflio_sinks::Store::open(&data).await?;
                let m = afflio_sinks::Maintenance::default();
                for t in tables(&table)? {
                    println!("{}", store.optimize(t, &m, true).await?);
                }
                store.record_maintenance().await?;
            }
            StoreCommand::Vacuum { data, table, retention } => {
                anyhow::ensure!(afflio_sinks::is_store(&data), "no Afflio store at {}", data.display());
                let mut store = afflio_sinks::Store::open(&data).await?;
                let m = afflio_sinks::Maintenance { vacuum_retention: retention, ..Default::default() };
                for t in tables(&table)? {
                    println!("{}", store.vacuum(t, &m).await?);
                }
            }
            StoreCommand::History { data, last } => {
                let q = format!(
                    "SELECT committed_at, position, writer, ledger_version, orders_version, lines_version                      FROM epochs ORDER BY committed_at DESC LIMIT {last}"
                );
                print!("{}", afflio_sinks::query(&data, &q, OutputFormat::Table).await?);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn bench_command(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Replay { input: Some(dir), .. } => {
            let r = bench::measure_replay(&dir.join("rules.toml"), &dir.join("events.jsonl"), &dir.join("store"))?;
            println!("{}", bench::replay_line(&r));
        }
        BenchCommand::Replay { events, seed, input: None } => {
            let dir = bench::scratch("replay")?;
            eprintln!("generating {events} demo events (seed {seed})");
            bench::generate_input(dir.path(), seed, events)?;
            let r = bench::replay_in_child(dir.path())?;
            println!("== replay: {events} demo events (seed {seed}), JSON Lines -> engine -> Parquet, one process");
            println!("events/s           {:>12.0}", r.events_per_sec());
            println!("MB/s               {:>12.1}", r.bytes as f64 / 1e6 / r.seconds);
            println!("seconds            {:>12.3}", r.seconds);
            println!("peak RSS           {:>9.1} MB", r.peak_rss as f64 / 1048576.0);
            println!("ledger entries     {:>12}", r.ledger_entries);
            println!("tracked visitors   {:>12}  orders in memory {}", r.visitors, r.orders);
            println!(
                "decode+apply       p50 {} ns, p99 {} ns, p99.9 {} ns (1 event in 64 timed)",
                r.apply_ns.p50, r.apply_ns.p99, r.apply_ns.p999
            );
            println!("{}", bench::replay_line(&r));
        }
        BenchCommand::Checkpoint { sessions, here: true } => {
            let r = bench::checkpoint::measure(sessions.unwrap_or(1_000_000))?;
            println!("{}", bench::checkpoint::line(&r));
        }
        BenchCommand::Checkpoint { sessions, here: false } => {
            let sizes = sessions.map_or(vec![1_000_000, 4_000_000, 16_000_000], |s| vec![s]);
            let mut results = Vec::new();
            for n in sizes {
                eprintln!("checkpoint at {n} sessions");
                results.push(bench::checkpoint::in_child(n)?);
            }
            print!("{}", bench::checkpoint::report(&results));
        }
        BenchCommand::Registry { partners, here: true } => {
            let r = bench::registry::measure(partners.unwrap_or(10_000))?;
            println!("{}", bench::registry::line(&r));
        }
        BenchCommand::Registry { partners, here: false } => {
            let sizes = partners.map_or(vec![10_000, 100_000, 1_000_000], |s| vec![s]);
            let mut results = Vec::new();
            for n in sizes {
                eprintln!("registry at {n} partners");
                results.push(bench::registry::in_child(n)?);
            }
            print!("{}", bench::registry::report(&results));
        }
        BenchCommand::Webhooks { events, messages, lanes, nats } => {
            let c = bench::webhooks::cost(events)?;
            let added_ns = 1e9 / c.with_webhooks_per_sec - 1e9 / c.plain_per_sec;
            println!(
                "== webhooks, engine: {} demo events: {:.0} events/s without, {:.0} events/s with notices and messages ({} messages): {:.0} ns added per event",
                c.events, c.plain_per_sec, c.with_webhooks_per_sec, c.messages, added_ns
            );
            let dir = bench::scratch("webhooks")?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let d = rt.block_on(afflio_pipeline::webhooks::delivery_throughput(&nats, messages, lanes, dir.path()))?;
            println!(
                "== webhooks, delivery: {} messages to one endpoint, {} lanes: published {:.0}/s, delivered {:.0}/s (signed, logged); from publishing to delivery p50 {:.0} ms, p99 {:.0} ms",
                d.messages, d.lanes, d.publish_per_sec, d.delivered_per_sec, d.p50_ms, d.p99_ms
            );
        }
        BenchCommand::Sessions { sessions } => {
            let r = bench::measure_sessions(sessions)?;
            println!(
                "== sessions: {} one-click visitors kept (30-day window): {:.1} bytes per session (RSS growth), {:.0} clicks/s",
                r.tracked, r.bytes_per_session, r.clicks_per_sec
            );
            println!("{}", bench::sessions_line(&r));
        }
        BenchCommand::Scaling { seed } => {
            println!("== scaling: replay of the demo mix (seed {seed}) at three sizes, each in its own process");
            println!(
                "  {:>10} {:>12} {:>12} {:>16} {:>14}",
                "events", "events/s", "peak RSS MB", "tracked visitors", "ledger rows"
            );
            for events in [250_000u64, 1_000_000, 4_000_000] {
                let dir = bench::scratch("scaling")?;
                bench::generate_input(dir.path(), seed, events)?;
                let r = bench::replay_in_child(dir.path())?;
                println!(
                    "  {:>10} {:>12.0} {:>12.1} {:>16} {:>14}",
                    events,
                    r.events_per_sec(),
                    r.peak_rss as f64 / 1048576.0,
                    r.visitors,
                    r.ledger_entries
                );
            }
            println!("== scaling: 1M demo events with 40, 400 and 4000 creators per program (two programs, 10 networks and agencies each)");
            println!("  {:>10} {:>12} {:>12} {:>14}", "partners", "events/s", "peak RSS MB", "ledger rows");
            for creators in [40usize, 400, 4000] {
                let dir = bench::scratch("scaling")?;
                bench::generate_input_with(dir.path(), seed, 1_000_000, creators)?;
                let r = bench::replay_in_child(dir.path())?;
                println!(
                    "  {:>10} {:>12.0} {:>12.1} {:>14}",
                    2 * (creators + 10),
                    r.events_per_sec(),
                    r.peak_rss as f64 / 1048576.0,
                    r.ledger_entries
                );
            }
            println!("== scaling: tracked sessions, each size in its own process");
            println!("  {:>10} {:>18} {:>12}", "sessions", "bytes/session", "clicks/s");
            for n in [1_000_000u64, 4_000_000, 16_000_000] {
                let r = bench::sessions_in_child(n)?;
                println!("  {:>10} {:>18.1} {:>12.0}", n, r.bytes_per_session, r.clicks_per_sec);
            }
        }
        BenchCommand::Baseline { events, seed, pg, batch } => {
            print!("{}", bench::pg::side_by_side(seed, events, &pg, batch)?);
        }
        BenchCommand::Live { rates, seconds, batch, clients, seed, serve_args, window } => {
            let opts = bench::live::LiveOptions {
                rates,
                seconds,
                batch,
                clients,
                seed,
                serve_args: serve_args.split_whitespace().map(String::from).collect(),
                window,
            };
            print!("{}", bench::live::run(&opts)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
