//! The live pipeline under load: a local nats-server (JetStream, file
//! storage), `afflio serve` as a child process, and a load generator posting
//! the demo's traffic as NDJSON batches at a fixed offered rate. Each rate
//! runs against a fresh broker and service, so its latency figures are its
//! own: sustained events/s (posted until applied by the engine), the HTTP
//! ingest latency (request until the broker acknowledged every event) seen
//! by the generator, and the service's capture-to-ledger latency (broker
//! storage until the ledger row is durable in Parquet).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

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
}

/// One rate's result.
#[derive(Clone, Debug)]
pub struct LiveResult {
    pub offered: u64,
    pub events: u64,
    pub sustained: f64,
    pub http_ms: Quantiles,
    /// Broker storage to the event applied by the engine, microseconds
    /// (p50, p99, p99.9 from the service).
    pub decision_us: (f64, f64, f64),
    /// Broker storage to the event's rows in a committed store version.
    pub freshness_us: (f64, f64, f64),
    pub rejected_http: u64,
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

/// The demo's traffic for one program (`acme`), with an API key for it.
fn input(dir: &Path, seed: u64, events: u64) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let (rules, all) = super::generate_input(&dir.join("gen"), seed, events * 2 + 1000)?;
    let text = std::fs::read_to_string(&all)?;
    let lines: Vec<String> =
        text.lines().filter(|l| l.contains(r#""program_id":"acme""#)).take(events as usize).map(String::from).collect();
    let mut r = std::fs::read_to_string(&rules)?;
    r.push_str("\n[[api_keys]]\nprogram_id = \"acme\"\nkey = \"bench-live-key-0123456789\"\n");
    let path = dir.join("rules.toml");
    std::fs::write(&path, r)?;
    Ok((path, lines))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// Runs one offered rate against a fresh broker and service.
fn run_rate(opts: &LiveOptions, rate: u64, events: &[String], rules: &Path, dir: &Path) -> anyhow::Result<LiveResult> {
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
    let _serve = Killed(
        Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(rules)
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
    let base = format!("http://127.0.0.1:{http_port}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(opts.clients).build()?;
        let ready = async {
            for _ in 0..200 {
                if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        };
        anyhow::ensure!(ready.await, "afflio serve not ready: see {}", dir.join("serve.log").display());
        let n = ((rate * opts.seconds) as usize).min(events.len());
        let bodies: Vec<bytes::Bytes> = events[..n]
            .chunks(opts.batch)
            .map(|c| {
                let mut b = c.join("\n");
                b.push('\n');
                bytes::Bytes::from(b)
            })
            .collect();
        let http = Arc::new(std::sync::Mutex::new(
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000, 3).map_err(|e| anyhow::anyhow!("{e}"))?,
        ));
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let slots = Arc::new(tokio::sync::Semaphore::new(opts.clients));
        let interval = Duration::from_secs_f64(opts.batch as f64 / rate as f64);
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            // Open loop: request i leaves at i * interval (or as soon as a slot frees).
            let due = started + interval * i as u32;
            tokio::time::sleep_until(due.into()).await;
            let permit = slots.clone().acquire_owned().await?;
            let (client, url, http, refused) =
                (client.clone(), format!("{base}/v1/events"), http.clone(), refused.clone());
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = client
                    .post(url)
                    .bearer_auth("bench-live-key-0123456789")
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
        }
        for t in tasks {
            t.await?;
        }
        // Until the engine applied everything the broker stored.
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut text = loop {
            let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
            // Events, not messages: an envelope carries many.
            let stored = metric(&text, "afflio_events_accepted_total").unwrap_or(0.0);
            let done = metric(&text, "afflio_engine_events_total").unwrap_or(0.0);
            if done >= stored && stored > 0.0 {
                break text;
            }
            anyhow::ensure!(Instant::now() < deadline, "the engine did not catch up within 300s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let elapsed = started.elapsed().as_secs_f64();
        // The last flush's latency is recorded after it completes.
        tokio::time::sleep(Duration::from_millis(800)).await;
        text = client.get(format!("{base}/metrics")).send().await?.text().await.unwrap_or(text);
        let q = |name: &str, p: &str| metric(&text, &format!("{name}{{quantile=\"{p}\"}}")).unwrap_or(0.0) * 1e6;
        let d = "afflio_decision_latency_seconds";
        let f = "afflio_freshness_seconds";
        let h = http.lock().map_err(|_| anyhow::anyhow!("internal error: histogram lock"))?;
        Ok(LiveResult {
            offered: rate,
            events: n as u64,
            sustained: n as f64 / elapsed,
            http_ms: Quantiles::of(&h),
            decision_us: (q(d, "0.5"), q(d, "0.99"), q(d, "0.999")),
            freshness_us: (q(f, "0.5"), q(f, "0.99"), q(f, "0.999")),
            rejected_http: refused.load(std::sync::atomic::Ordering::Relaxed),
        })
    })
}

/// Runs every rate and reports.
pub fn run(opts: &LiveOptions) -> anyhow::Result<String> {
    let dir = super::scratch("live")?;
    let most = opts.rates.iter().max().copied().unwrap_or(0) * opts.seconds;
    eprintln!("generating {most} events (seed {})", opts.seed);
    let (rules, events) = input(dir.path(), opts.seed, most)?;
    let mut results = Vec::new();
    for (i, &rate) in opts.rates.iter().enumerate() {
        eprintln!("offering {rate} events/s for {}s", opts.seconds);
        let run_dir = dir.path().join(format!("run{i}"));
        std::fs::create_dir_all(&run_dir)?;
        let r = run_rate(opts, rate, &events, &rules, &run_dir);
        if std::env::var_os("AFFLIO_BENCH_SERVE_LOG").is_some() {
            eprint!("{}", std::fs::read_to_string(run_dir.join("serve.log")).unwrap_or_default());
        }
        results.push(r?);
    }
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
    for x in &results {
        let ms = |t: (f64, f64, f64)| format!("{:.1}/{:.1}/{:.1}", t.0 / 1e3, t.1 / 1e3, t.2 / 1e3);
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
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn metrics_are_read_by_name() {
        let text = "# HELP x\nafflio_engine_stream_seq 42\nafflio_freshness_seconds{quantile=\"0.99\"} 0.015\n";
        assert_eq!(metric(text, "afflio_engine_stream_seq"), Some(42.0));
        assert_eq!(metric(text, "afflio_freshness_seconds{quantile=\"0.99\"}"), Some(0.015));
        assert_eq!(metric(text, "afflio_missing"), None);
    }
}
