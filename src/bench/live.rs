//! The live pipeline under load: a local nats-server (JetStream, file
//! storage), `afflio serve` as a child process, and a load generator posting
//! a streaming load ([`super::load`]) as NDJSON batches at a fixed offered
//! rate, for as long as asked (a 10-minute run is `--seconds 600`). Each
//! rate runs against a fresh broker and service, so its figures are its own.
//!
//! Every 5 seconds the service's metrics are read; per window (a minute by
//! default) the report gives the events the engine applied per second, the
//! decision latency (broker storage to the event applied by the engine) and
//! the freshness (broker storage to the event's rows in a committed store
//! version) quantiles of that window alone (from the difference of two
//! histogram readings), the tracked sessions, open orders and remembered
//! ids, the checkpoint's size and duration, and the service's resident memory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::load::{LoadGen, KEY};
use super::Quantiles;

/// What to run.
#[derive(Clone, Debug)]
pub struct LiveOptions {
    /// Offered rates, events/s, one run each.
    pub rates: Vec<u64>,
    pub seconds: u64,
    /// Events per HTTP request.
    pub batch: usize,
    /// Requests in flight at most.
    pub clients: usize,
    pub seed: u64,
    /// Extra arguments for `afflio serve`.
    pub serve_args: Vec<String>,
    /// Seconds per reported window.
    pub window: u64,
}

/// One window of a run.
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub end_secs: f64,
    pub applied_per_sec: f64,
    /// Microseconds: p50, p99, p99.9.
    pub decision_us: (f64, f64, f64),
    pub freshness_us: (f64, f64, f64),
    pub sessions: u64,
    pub orders: u64,
    pub dedupe_ids: u64,
    pub state_mb: f64,
    pub checkpoint_kb: f64,
    pub checkpoint_ms: u64,
    pub rss_mb: f64,
}

/// One rate's result.
#[derive(Clone, Debug)]
pub struct LiveResult {
    pub offered: u64,
    pub events: u64,
    pub sustained: f64,
    pub http_ms: Quantiles,
    /// Over the whole run, microseconds (p50, p99, p99.9 from the service).
    pub decision_us: (f64, f64, f64),
    pub freshness_us: (f64, f64, f64),
    pub rejected_http: u64,
    pub windows: Vec<Window>,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn nats_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|p| p.join("nats-server"))
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|p| p.exists())
        .context("nats-server not found (PATH or /usr/sbin/nats-server)")
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listens on 127.0.0.1:{port} after 5s")
}

pub(crate) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// The cumulative bucket counts of a histogram metric, by upper bound (seconds).
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// Quantile `q` of the values recorded between two readings of a histogram
/// (linear within the bucket it falls in), microseconds.
fn window_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let diff: Vec<(f64, f64)> =
        after.iter().map(|(le, c)| (*le, c - before.iter().find(|(b, _)| b == le).map_or(0.0, |(_, n)| *n))).collect();
    let total = diff.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return 0.0;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in &diff {
        if cum >= want {
            if le.is_infinite() {
                return prev.0 * 1e6;
            }
            let share = if cum > prev.1 { (want - prev.1) / (cum - prev.1) } else { 1.0 };
            return (prev.0 + (le - prev.0) * share) * 1e6;
        }
        prev = (le, cum);
    }
    prev.0 * 1e6
}

/// Resident memory of a process, MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The service's latency histograms (cumulative buckets).
const DECISION_HIST: &str = "afflio_decision_latency_histogram_seconds";
const FRESHNESS_HIST: &str = "afflio_freshness_histogram_seconds";

/// A reading of the service's metrics.
struct Reading {
    at: Instant,
    text: String,
    rss_mb: f64,
}

fn window(prev: &Reading, now: &Reading, started: Instant) -> Window {
    let m = |name: &str| metric(&now.text, name).unwrap_or(0.0);
    let applied = m("afflio_engine_events_total") - metric(&prev.text, "afflio_engine_events_total").unwrap_or(0.0);
    let (d, f) = (DECISION_HIST, FRESHNESS_HIST);
    let (db, da) = (buckets(&prev.text, d), buckets(&now.text, d));
    let (fb, fa) = (buckets(&prev.text, f), buckets(&now.text, f));
    let q3 = |b: &[(f64, f64)], a: &[(f64, f64)]| {
        (window_quantile(b, a, 0.5), window_quantile(b, a, 0.99), window_quantile(b, a, 0.999))
    };
    Window {
        end_secs: (now.at - started).as_secs_f64(),
        applied_per_sec: applied / (now.at - prev.at).as_secs_f64().max(1e-9),
        decision_us: q3(&db, &da),
        freshness_us: q3(&fb, &fa),
        sessions: m("afflio_tracked_visitors") as u64,
        orders: m("afflio_tracked_orders") as u64,
        dedupe_ids: m("afflio_tracked_dedupe_ids") as u64,
        state_mb: m("afflio_state_memory_bytes") / 1048576.0,
        checkpoint_kb: m("afflio_checkpoint_bytes") / 1024.0,
        checkpoint_ms: m("afflio_checkpoint_duration_ms") as u64,
        rss_mb: now.rss_mb,
    }
}

/// Runs one offered rate against a fresh broker and service.
fn run_rate(opts: &LiveOptions, rate: u64, dir: &Path) -> anyhow::Result<LiveResult> {
    let (gen, rules) = LoadGen::new(opts.seed);
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules)?;
    let nats_port = free_port()?;
    let http_port = free_port()?;
    let _nats = Killed(
        Command::new(nats_server()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &nats_port.to_string(), "-sd"])
            .arg(dir.join("js"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nats-server")?,
    );
    wait_port(nats_port)?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let serve = Killed(
        Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(&rules_path)
            .args(["--nats", &format!("nats://127.0.0.1:{nats_port}"), "--http", &format!("127.0.0.1:{http_port}")])
            .arg("--data")
            .arg(dir.join("data"))
            .arg("--state")
            .arg(dir.join("state"))
            .args(&opts.serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start afflio serve")?,
    );
    let pid = serve.0.id();
    let base = format!("http://127.0.0.1:{http_port}");
    let n = rate * opts.seconds;
    let requests = n.div_ceil(opts.batch as u64);
    // Bodies are generated on a thread of their own, a few ahead of the sender.
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
    let batch = opts.batch;
    let generator = std::thread::spawn(move || {
        let mut gen = gen;
        let mut left = n;
        while left > 0 {
            let k = left.min(batch as u64);
            let now = chrono::Utc::now();
            let mut body = String::with_capacity(k as usize * 260);
            for _ in 0..k {
                body.push_str(&gen.next_event(now));
                body.push('\n');
            }
            left -= k;
            if tx.send(bytes::Bytes::from(body)).is_err() {
                return;
            }
        }
    });
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let result = rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(opts.clients).build()?;
        let ready = async {
            for _ in 0..600 {
                if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        anyhow::ensure!(ready.await, "afflio serve not ready: see {}", dir.join("serve.log").display());
        let metrics_url = format!("{base}/metrics");
        let read = |client: reqwest::Client| {
            let url = metrics_url.clone();
            async move {
                let text = client.get(url).send().await?.text().await?;
                anyhow::Ok(Reading { at: Instant::now(), text, rss_mb: rss_mb(pid) })
            }
        };
        let http = Arc::new(std::sync::Mutex::new(
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?,
        ));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let slots = Arc::new(tokio::sync::Semaphore::new(opts.clients));
        let interval = Duration::from_secs_f64(opts.batch as f64 / rate as f64);
        let started = Instant::now();
        let mut readings = vec![read(client.clone()).await?];
        let mut windows = Vec::new();
        let mut last_window = readings[0].at;
        let window_every = Duration::from_secs(opts.window.max(1));
        let mut next_reading = started + Duration::from_secs(5);
        let mut tasks = Vec::new();
        for i in 0..requests {
            // Open loop: request i leaves at i * interval (or as soon as a slot frees).
            let due = started + interval * i as u32;
            tokio::time::sleep_until(due.into()).await;
            if Instant::now() >= next_reading {
                let r = read(client.clone()).await?;
                if r.at - last_window >= window_every {
                    let prev = readings.iter().rev().find(|p| p.at <= last_window).unwrap_or(&readings[0]);
                    windows.push(window(prev, &r, started));
                    last_window = r.at;
                }
                readings.push(r);
                next_reading += Duration::from_secs(5);
            }
            let Some(body) = rx.lock().ok().and_then(|r| r.recv().ok()) else { break };
            let permit = slots.clone().acquire_owned().await?;
            let (client, url, http, refused) =
                (client.clone(), format!("{base}/v1/events"), http.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = client
                    .post(url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if !ok {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = http.lock().map(|mut h| h.saturating_record(t0.elapsed().as_millis().max(1) as u64));
                drop(permit);
            }));
            tasks.retain(|t| !t.is_finished());
        }
        for t in tasks {
            t.await?;
        }
        // Until the engine applied everything the broker stored.
        let deadline = Instant::now() + Duration::from_secs(300 + opts.seconds);
        loop {
            let r = read(client.clone()).await?;
            // Events, not messages: an envelope carries many.
            let stored = metric(&r.text, "afflio_events_accepted_total").unwrap_or(0.0);
            let done = metric(&r.text, "afflio_engine_events_total").unwrap_or(0.0);
            if done >= stored && stored > 0.0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the engine did not catch up in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        // The last epoch's freshness is recorded once it is committed.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let last = read(client.clone()).await?;
        let prev = readings.iter().rev().find(|p| p.at <= last_window).unwrap_or(&readings[0]);
        if last.at - last_window >= Duration::from_secs(3) {
            windows.push(window(prev, &last, started));
        }
        let q = |name: &str, p: &str| metric(&last.text, &format!("{name}{{quantile=\"{p}\"}}")).unwrap_or(0.0) * 1e6;
        let d = "afflio_decision_latency_seconds";
        let f = "afflio_freshness_seconds";
        let h = http.lock().map_err(|_| anyhow::anyhow!("internal error: histogram lock"))?;
        Ok(LiveResult {
            offered: rate,
            events: n,
            sustained: n as f64 / elapsed,
            http_ms: Quantiles::of(&h),
            decision_us: (q(d, "0.5"), q(d, "0.99"), q(d, "0.999")),
            freshness_us: (q(f, "0.5"), q(f, "0.99"), q(f, "0.999")),
            rejected_http: refused.load(std::sync::atomic::Ordering::Relaxed),
            windows,
        })
    });
    drop(rx);
    let _ = generator.join();
    result
}

/// Runs every rate and reports.
pub fn run(opts: &LiveOptions) -> anyhow::Result<String> {
    let dir = super::scratch("live")?;
    let mut results = Vec::new();
    for (i, &rate) in opts.rates.iter().enumerate() {
        eprintln!("offering {rate} events/s for {}s", opts.seconds);
        let run_dir = dir.path().join(format!("run{i}"));
        std::fs::create_dir_all(&run_dir)?;
        let r = run_rate(opts, rate, &run_dir);
        if std::env::var_os("AFFLIO_BENCH_SERVE_LOG").is_some() {
            eprint!("{}", std::fs::read_to_string(run_dir.join("serve.log")).unwrap_or_default());
        }
        results.push(r?);
    }
    Ok(report(opts, &results))
}

fn ms(t: (f64, f64, f64)) -> String {
    format!("{:.1}/{:.1}/{:.1}", t.0 / 1e3, t.1 / 1e3, t.2 / 1e3)
}

fn report(opts: &LiveOptions, results: &[LiveResult]) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "== live: HTTP (NDJSON, {} events per request, <= {} in flight) -> JetStream -> engine -> Delta; serve {}",
        opts.batch,
        opts.clients,
        opts.serve_args.join(" ")
    );
    let _ = writeln!(
        r,
        "  {:>9} {:>9} {:>11} {:>7} {:>16} {:>26} {:>26}",
        "offered/s",
        "events",
        "sustained/s",
        "refused",
        "HTTP p50/p99 ms",
        "decision p50/p99/p99.9 ms",
        "freshness p50/p99/p99.9 ms"
    );
    for x in results {
        let _ = writeln!(
            r,
            "  {:>9} {:>9} {:>11.0} {:>7} {:>16} {:>26} {:>26}",
            x.offered,
            x.events,
            x.sustained,
            x.rejected_http,
            format!("{}/{}", x.http_ms.p50, x.http_ms.p99),
            ms(x.decision_us),
            ms(x.freshness_us),
        );
    }
    for x in results.iter().filter(|x| x.windows.len() > 1) {
        let _ = writeln!(r, "-- {} events/s offered, per {}s window:", x.offered, opts.window);
        let _ = writeln!(
            r,
            "  {:>6} {:>10} {:>24} {:>24} {:>10} {:>9} {:>10} {:>8} {:>12} {:>8}",
            "end s",
            "applied/s",
            "decision p50/99/99.9 ms",
            "freshness p50/99/99.9 ms",
            "sessions",
            "orders",
            "ids",
            "state MB",
            "ckpt KB/ms",
            "RSS MB"
        );
        for w in &x.windows {
            let _ = writeln!(
                r,
                "  {:>6.0} {:>10.0} {:>24} {:>24} {:>10} {:>9} {:>10} {:>8.0} {:>12} {:>8.0}",
                w.end_secs,
                w.applied_per_sec,
                ms(w.decision_us),
                ms(w.freshness_us),
                w.sessions,
                w.orders,
                w.dedupe_ids,
                w.state_mb,
                format!("{:.0}/{}", w.checkpoint_kb, w.checkpoint_ms),
                w.rss_mb
            );
        }
    }
    let max = results
        .iter()
        .filter(|x| x.rejected_http == 0 && x.sustained >= 0.95 * x.offered as f64)
        .map(|x| x.offered)
        .max();
    match max {
        Some(m) => {
            let _ = writeln!(r, "maximum sustainable offered rate (>= 95% sustained, nothing refused): {m} events/s");
        }
        None => {
            let _ = writeln!(r, "no offered rate was sustained (>= 95%, nothing refused)");
        }
    }
    let best = results.iter().map(|x| x.sustained).fold(0.0, f64::max);
    let _ = writeln!(r, "highest sustained throughput: {best:.0} events/s");
    r
}

#[cfg(test)]
mod tests {
    use super::{buckets, metric, window_quantile, DECISION_HIST, FRESHNESS_HIST};

    #[test]
    fn metrics_are_read_by_name() {
        let text = "# HELP x\nafflio_engine_stream_seq 42\nafflio_freshness_seconds{quantile=\"0.99\"} 0.015\n";
        assert_eq!(metric(text, "afflio_engine_stream_seq"), Some(42.0));
        assert_eq!(metric(text, "afflio_freshness_seconds{quantile=\"0.99\"}"), Some(0.015));
        assert_eq!(metric(text, "afflio_missing"), None);
    }

    #[test]
    fn a_window_quantile_is_read_from_the_difference_of_two_readings() {
        let before = "h_bucket{le=\"0.001\"} 100\nh_bucket{le=\"0.01\"} 100\nh_bucket{le=\"0.1\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        // 100 more values: 50 under 1 ms, 49 in (1, 10] ms, 1 in (10, 100] ms.
        let after = "h_bucket{le=\"0.001\"} 150\nh_bucket{le=\"0.01\"} 199\nh_bucket{le=\"0.1\"} 200\nh_bucket{le=\"+Inf\"} 200\n";
        let (b, a) = (buckets(before, "h"), buckets(after, "h"));
        assert_eq!(a.len(), 4);
        assert!((window_quantile(&b, &a, 0.5) - 1_000.0).abs() < 1e-6, "{}", window_quantile(&b, &a, 0.5));
        let p99 = window_quantile(&b, &a, 0.99);
        assert!((p99 - 10_000.0).abs() < 1e-6, "{p99}");
        let p999 = window_quantile(&b, &a, 0.999);
        assert!(p999 > 10_000.0 && p999 <= 100_000.0, "{p999}");
        assert_eq!(window_quantile(&a, &a, 0.5), 0.0, "an empty window");
    }

    #[test]
    fn the_service_exports_the_buckets_the_windows_are_read_from() {
        let m = afflio_ingest::metrics::Metrics::default();
        let empty = buckets(&m.render(), DECISION_HIST);
        assert!(empty.len() > 40, "{empty:?}");
        for _ in 0..998 {
            m.record_decision_us(2_000);
        }
        m.record_decision_us(450_000);
        m.record_decision_us(450_000);
        m.record_freshness_us(30_000);
        let text = m.render();
        let (d, f) = (buckets(&text, DECISION_HIST), buckets(&text, FRESHNESS_HIST));
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "cumulative, by bound: {d:?}");
        assert_eq!(d.last(), Some(&(f64::INFINITY, 1000.0)));
        let p50 = window_quantile(&empty, &d, 0.5);
        assert!((1_500.0..=2_000.0).contains(&p50), "{p50}");
        let p999 = window_quantile(&empty, &d, 0.999);
        assert!((400_000.0..=500_000.0).contains(&p999), "{p999}");
        let fp = window_quantile(&buckets("", FRESHNESS_HIST), &f, 0.5);
        assert!((25_000.0..=30_000.0).contains(&fp), "{fp}");
    }
}
