//! Counters and latency histograms, rendered as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use afflio_engine::Reason;
use hdrhistogram::Histogram;

/// Service metrics, shared by the HTTP ingest and the engine consumer.
pub struct Metrics {
    /// Provider webhooks verified and applied (or acknowledged).
    pub payout_webhooks: AtomicU64,
    /// Provider webhooks refused (bad signature, malformed).
    pub payout_webhooks_refused: AtomicU64,
    /// Provider notices received (RazorpayX downtime).
    pub payout_notices: AtomicU64,
    pub events_received: AtomicU64,
    pub events_accepted: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub publish_failures: AtomicU64,
    pub redirects: AtomicU64,
    pub clicks_lost: AtomicU64,
    /// Redirects not counted as clicks: known bots, a visitor again on the same link.
    pub clicks_bots: AtomicU64,
    pub clicks_repeated: AtomicU64,
    /// Clicks kept with a parameter cut to its limit.
    pub params_truncated: AtomicU64,
    /// Requests answered 429, 503 (overloaded) and 500 (a handler panicked).
    pub rate_limited: AtomicU64,
    pub overloaded: AtomicU64,
    pub http_panics: AtomicU64,
    rejected: [AtomicU64; Reason::ALL.len()],
    pub engine_applied: AtomicU64,
    pub engine_duplicates: AtomicU64,
    pub engine_rejected: AtomicU64,
    pub stream_last_seq: AtomicU64,
    pub engine_seq: AtomicU64,
    /// Events the engine has read in all (applied, duplicate or refused), kept across restarts.
    pub engine_events: AtomicU64,
    pub tracked_visitors: AtomicU64,
    pub tracked_orders: AtomicU64,
    pub tracked_dedupe_ids: AtomicU64,
    pub tracked_velocity_keys: AtomicU64,
    /// An estimate of the engine state's memory, bytes.
    pub state_memory_bytes: AtomicU64,
    pub rules_version: AtomicU64,
    pub rules_reload_failures: AtomicU64,
    /// Stream position of the last durable checkpoint (all tables committed).
    pub committed_seq: AtomicU64,
    pub store_commits: AtomicU64,
    pub store_commit_failures: AtomicU64,
    /// The last checkpoint: bytes written and milliseconds taken.
    pub checkpoint_bytes: AtomicU64,
    pub checkpoint_ms: AtomicU64,
    /// The checkpoint chain on disk: image bytes, delta bytes, deltas.
    pub state_image_bytes: AtomicU64,
    pub state_delta_bytes: AtomicU64,
    pub state_deltas: AtomicU64,
    pub state_folds: AtomicU64,
    /// Webhook messages published to the outbox.
    pub webhook_messages: AtomicU64,
    /// How long the last start took to restore the engine, milliseconds.
    pub recovery_ms: AtomicU64,
    pub maintenance_runs: AtomicU64,
    pub maintenance_failures: AtomicU64,
    /// Events in the last epoch committed.
    pub epoch_events: AtomicU64,
    /// From broker storage to the event applied by the engine (its ledger
    /// entries exist in the engine), microseconds.
    decision_us: Mutex<Histogram<u64>>,
    /// From broker storage to the event's rows readable in a committed
    /// store version, microseconds.
    freshness_us: Mutex<Histogram<u64>>,
    /// One epoch's commit to the store (every table), microseconds.
    commit_us: Mutex<Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let h = || Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds"));
        Metrics {
            payout_webhooks: AtomicU64::new(0),
            payout_webhooks_refused: AtomicU64::new(0),
            payout_notices: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
            events_accepted: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            publish_failures: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            clicks_lost: AtomicU64::new(0),
            clicks_bots: AtomicU64::new(0),
            clicks_repeated: AtomicU64::new(0),
            params_truncated: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            http_panics: AtomicU64::new(0),
            rejected: std::array::from_fn(|_| AtomicU64::new(0)),
            engine_applied: AtomicU64::new(0),
            engine_duplicates: AtomicU64::new(0),
            engine_rejected: AtomicU64::new(0),
            stream_last_seq: AtomicU64::new(0),
            engine_seq: AtomicU64::new(0),
            engine_events: AtomicU64::new(0),
            tracked_visitors: AtomicU64::new(0),
            tracked_orders: AtomicU64::new(0),
            tracked_dedupe_ids: AtomicU64::new(0),
            tracked_velocity_keys: AtomicU64::new(0),
            state_memory_bytes: AtomicU64::new(0),
            rules_version: AtomicU64::new(0),
            rules_reload_failures: AtomicU64::new(0),
            committed_seq: AtomicU64::new(0),
            store_commits: AtomicU64::new(0),
            store_commit_failures: AtomicU64::new(0),
            checkpoint_bytes: AtomicU64::new(0),
            checkpoint_ms: AtomicU64::new(0),
            state_image_bytes: AtomicU64::new(0),
            state_delta_bytes: AtomicU64::new(0),
            state_deltas: AtomicU64::new(0),
            state_folds: AtomicU64::new(0),
            webhook_messages: AtomicU64::new(0),
            recovery_ms: AtomicU64::new(0),
            maintenance_runs: AtomicU64::new(0),
            maintenance_failures: AtomicU64::new(0),
            epoch_events: AtomicU64::new(0),
            decision_us: h(),
            freshness_us: h(),
            commit_us: h(),
        }
    }
}

fn record(h: &Mutex<Histogram<u64>>, us: u64) {
    if let Ok(mut h) = h.lock() {
        let _ = h.record(us.clamp(1, 3_600_000_000));
    }
}

/// Histogram bucket bounds, microseconds: 0.25 ms to 60 s, about 20% apart
/// where the targets lie (1 ms to 100 ms).
pub const BUCKETS_US: [u64; 44] = [
    250, 500, 750, 1_000, 1_250, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000, 6_000, 7_000, 8_000, 10_000, 12_000, 14_000,
    16_000, 18_000, 20_000, 25_000, 30_000, 35_000, 40_000, 50_000, 60_000, 80_000, 100_000, 150_000, 200_000, 300_000,
    400_000, 500_000, 750_000, 1_000_000, 1_250_000, 1_500_000, 2_000_000, 3_000_000, 5_000_000, 10_000_000,
    20_000_000, 30_000_000, 60_000_000,
];

fn quantiles(h: &Mutex<Histogram<u64>>) -> (u64, u64, u64, u64, u64) {
    let h = h.lock().expect("metrics lock");
    (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.value_at_quantile(0.999), h.max(), h.len())
}

impl Metrics {
    pub fn rejected(&self, reason: Reason) {
        let i = Reason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_decision_us(&self, us: u64) {
        record(&self.decision_us, us);
    }

    /// Records `n` events of one message decided `us` after storage.
    pub fn record_decision_us_n(&self, us: u64, n: u64) {
        if let Ok(mut h) = self.decision_us.lock() {
            let _ = h.record_n(us.clamp(1, 3_600_000_000), n);
        }
    }

    pub fn record_freshness_us(&self, us: u64) {
        record(&self.freshness_us, us);
    }

    pub fn record_commit_us(&self, us: u64) {
        record(&self.commit_us, us);
    }

    /// (p50, p99, p99.9, max, count) of decision latency in microseconds.
    pub fn decision_quantiles(&self) -> (u64, u64, u64, u64, u64) {
        quantiles(&self.decision_us)
    }

    /// (p50, p99, p99.9, max, count) of freshness in microseconds.
    pub fn freshness_quantiles(&self) -> (u64, u64, u64, u64, u64) {
        quantiles(&self.freshness_us)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let c = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let g = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        c(&mut s, "afflio_events_received_total", "Events received over HTTP.", get(&self.events_received));
        c(&mut s, "afflio_events_accepted_total", "Events stored by the broker.", get(&self.events_accepted));
        c(&mut s, "afflio_events_duplicate_total", "Events the broker already had.", get(&self.events_duplicate));
        c(
            &mut s,
            "afflio_publish_failures_total",
            "Events not stored: broker unavailable.",
            get(&self.publish_failures),
        );
        c(&mut s, "afflio_redirects_total", "Tracking link redirects served.", get(&self.redirects));
        c(&mut s, "afflio_payout_webhooks_total", "Provider webhooks verified and taken.", get(&self.payout_webhooks));
        c(
            &mut s,
            "afflio_payout_webhooks_refused_total",
            "Provider webhooks refused (signature, body).",
            get(&self.payout_webhooks_refused),
        );
        c(&mut s, "afflio_payout_notices_total", "Provider notices (RazorpayX downtime).", get(&self.payout_notices));
        c(&mut s, "afflio_clicks_lost_total", "Redirect clicks the broker did not store.", get(&self.clicks_lost));
        c(
            &mut s,
            "afflio_redirect_bots_total",
            "Redirects of known bots (not counted as clicks).",
            get(&self.clicks_bots),
        );
        c(
            &mut s,
            "afflio_redirect_repeats_total",
            "Redirects of a visitor again on a link within the interval (not counted).",
            get(&self.clicks_repeated),
        );
        c(
            &mut s,
            "afflio_redirect_params_truncated_total",
            "Clicks kept with a parameter cut to its limit.",
            get(&self.params_truncated),
        );
        c(&mut s, "afflio_http_rate_limited_total", "Requests answered 429.", get(&self.rate_limited));
        c(
            &mut s,
            "afflio_http_overloaded_total",
            "Requests shed (503) beyond the bound in flight.",
            get(&self.overloaded),
        );
        c(
            &mut s,
            "afflio_http_panics_total",
            "Requests whose handler panicked (answered 500).",
            get(&self.http_panics),
        );
        let _ = writeln!(s, "# HELP afflio_events_rejected_total Events refused at ingest, by reason.\n# TYPE afflio_events_rejected_total counter");
        for (i, r) in Reason::ALL.iter().enumerate() {
            let _ = writeln!(s, "afflio_events_rejected_total{{reason=\"{}\"}} {}", r.as_str(), get(&self.rejected[i]));
        }
        c(&mut s, "afflio_engine_applied_total", "Events applied by the engine.", get(&self.engine_applied));
        c(&mut s, "afflio_engine_duplicates_total", "Duplicates seen by the engine.", get(&self.engine_duplicates));
        c(&mut s, "afflio_engine_rejected_total", "Events the engine refused.", get(&self.engine_rejected));
        let last = get(&self.stream_last_seq);
        let at = get(&self.engine_seq);
        g(&mut s, "afflio_consumer_lag", "Stream messages not yet applied.", last.saturating_sub(at));
        g(&mut s, "afflio_engine_stream_seq", "Last stream position applied.", at);
        g(
            &mut s,
            "afflio_engine_events_total",
            "Events read by the engine (a message may carry many), across restarts.",
            get(&self.engine_events),
        );
        g(&mut s, "afflio_tracked_visitors", "Visitor sessions with clicks in memory.", get(&self.tracked_visitors));
        g(&mut s, "afflio_tracked_orders", "Open orders in memory.", get(&self.tracked_orders));
        g(&mut s, "afflio_tracked_dedupe_ids", "Event ids remembered for idempotency.", get(&self.tracked_dedupe_ids));
        g(&mut s, "afflio_tracked_velocity_keys", "Velocity keys tracked.", get(&self.tracked_velocity_keys));
        g(&mut s, "afflio_state_memory_bytes", "Estimated memory of the engine state.", get(&self.state_memory_bytes));
        g(&mut s, "afflio_rules_version", "Version of the rules in force.", get(&self.rules_version));
        c(&mut s, "afflio_rules_reload_failures_total", "Rules reloads refused.", get(&self.rules_reload_failures));
        g(
            &mut s,
            "afflio_committed_stream_seq",
            "Stream position of the last durable checkpoint.",
            get(&self.committed_seq),
        );
        c(&mut s, "afflio_store_commits_total", "Epochs committed to the store.", get(&self.store_commits));
        c(
            &mut s,
            "afflio_store_commit_failures_total",
            "Store commits that failed (retried).",
            get(&self.store_commit_failures),
        );
        g(&mut s, "afflio_checkpoint_bytes", "Bytes of the last checkpoint (a delta).", get(&self.checkpoint_bytes));
        g(
            &mut s,
            "afflio_checkpoint_duration_ms",
            "Duration of the last checkpoint, milliseconds.",
            get(&self.checkpoint_ms),
        );
        g(&mut s, "afflio_state_image_bytes", "Bytes of the checkpoint image on disk.", get(&self.state_image_bytes));
        g(
            &mut s,
            "afflio_state_delta_bytes",
            "Bytes of the checkpoint deltas after the image.",
            get(&self.state_delta_bytes),
        );
        g(&mut s, "afflio_state_deltas", "Checkpoint deltas after the image.", get(&self.state_deltas));
        c(&mut s, "afflio_state_folds_total", "Deltas folded into a new image.", get(&self.state_folds));
        c(
            &mut s,
            "afflio_webhook_messages_total",
            "Webhook messages published to the outbox.",
            get(&self.webhook_messages),
        );
        g(
            &mut s,
            "afflio_recovery_duration_ms",
            "Time the last start took to restore the engine.",
            get(&self.recovery_ms),
        );
        c(
            &mut s,
            "afflio_maintenance_runs_total",
            "Store maintenance steps (OPTIMIZE, VACUUM).",
            get(&self.maintenance_runs),
        );
        c(
            &mut s,
            "afflio_maintenance_failures_total",
            "Store maintenance steps that failed.",
            get(&self.maintenance_failures),
        );
        g(&mut s, "afflio_epoch_events", "Events in the last epoch committed.", get(&self.epoch_events));
        // Each latency as a summary; the engine's two also as cumulative
        // buckets (`<name minus _seconds>_histogram_seconds`), so that a reader
        // can take quantiles of any interval from the difference of two readings.
        for (name, help, h, buckets) in [
            ("afflio_decision_latency", "Broker storage to the event applied by the engine.", &self.decision_us, true),
            (
                "afflio_freshness",
                "Broker storage to the event's rows in a committed store version.",
                &self.freshness_us,
                true,
            ),
            ("afflio_store_commit", "One epoch's commit to the store.", &self.commit_us, false),
        ] {
            let h = h.lock().expect("metrics lock");
            let sum_count = format!("_sum {}\n", h.mean() * h.len() as f64 / 1e6);
            let _ = writeln!(s, "# HELP {name}_seconds {help}\n# TYPE {name}_seconds summary");
            for q in [0.5, 0.9, 0.99, 0.999] {
                let _ = writeln!(s, "{name}_seconds{{quantile=\"{q}\"}} {}", h.value_at_quantile(q) as f64 / 1e6);
            }
            let _ = writeln!(s, "{name}_seconds{sum_count}{name}_seconds_count {}", h.len());
            if buckets {
                let hist = format!("{name}_histogram_seconds");
                let _ = writeln!(s, "# HELP {hist} {help} (buckets)\n# TYPE {hist} histogram");
                for le in BUCKETS_US {
                    let _ = writeln!(s, "{hist}_bucket{{le=\"{}\"}} {}", le as f64 / 1e6, h.count_between(0, le));
                }
                let _ = writeln!(s, "{hist}_bucket{{le=\"+Inf\"}} {}", h.len());
                let _ = writeln!(s, "{hist}{sum_count}{hist}_count {}", h.len());
            }
        }
        s
    }
}
