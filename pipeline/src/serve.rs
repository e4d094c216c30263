//! `afflio serve`: HTTP ingest -> NATS JetStream -> engine -> store, in one
//! process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use std::sync::atomic::AtomicBool;

use afflio_engine::rules::Rules;
use afflio_ingest::http::{router_with, HttpConfig, Ingest, LinkDirectory, SharedRules};
use afflio_ingest::metrics::Metrics;
use afflio_ingest::nats::{self, JetStreamPublisher, Role, StreamLimits};
use afflio_ingest::server::{self, ServerLimits};
use afflio_sinks::{Maintenance, Store};
use tokio::sync::{mpsc, watch};

use crate::committer::{Committer, Upkeep};
use crate::consumer::{self, Consumer, Cutting};
use crate::error::PipelineError;
use crate::state::{FileBackend, StateBackend};

/// What `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub nats: String,
    pub http: SocketAddr,
    pub data: PathBuf,
    pub state: PathBuf,
    /// Cut an epoch (commit to the store, checkpoint) this often...
    pub epoch_interval: Duration,
    /// ...or when it holds this many events.
    pub max_epoch_events: usize,
    /// The HTTP ingest's limits, and the server's.
    pub http_config: HttpConfig,
    pub server: ServerLimits,
    /// How the broker's stream keeps events.
    pub stream: StreamLimits,
    /// Store maintenance: how often a step runs, how often VACUUM runs, and how.
    pub maintenance_every: Duration,
    pub vacuum_every: Duration,
    pub maintenance: Maintenance,
    /// How the payout providers are called (time limits, 429 backoff).
    pub payouts_http: afflio_payouts::HttpSettings,
    /// Webhook delivery: timeouts, retries, lanes.
    pub webhooks: crate::webhooks::DeliverySettings,
}

/// Runs until SIGTERM or SIGINT: then drains HTTP (for a bounded time),
/// commits the last epoch, checkpoints and returns. Starts whether or not
/// the broker is up: `/readyz` says 503 until it is (with the reason), and
/// events are answered 503 meanwhile.
pub async fn run(opts: ServeOptions, rules: Rules) -> Result<(), PipelineError> {
    std::fs::create_dir_all(&opts.state).map_err(|source| PipelineError::Io {
        what: "create the state directory",
        path: opts.state.clone(),
        source,
    })?;
    let retention = rules.engine().dedupe_retention.to_std().unwrap_or_default();
    if opts.stream.max_age < retention {
        return Err(PipelineError::Config(format!(
            "the stream's max_age ({:?}) is shorter than [engine] dedupe_retention ({:?}): a redelivery after it could not be recognised",
            opts.stream.max_age, retention
        )));
    }
    let metrics = Arc::new(Metrics::default());
    metrics.rules_version.store(rules.version(), Ordering::Relaxed);
    let shared: SharedRules = Arc::new(RwLock::new(Arc::new(rules)));
    let ingest_client = nats::connect(&opts.nats, Role::Ingest).await?;
    let engine_client = nats::connect(&opts.nats, Role::Engine).await?;
    let stream_ready = Arc::new(AtomicBool::new(false));
    let publisher = Arc::new(JetStreamPublisher::new(ingest_client.clone(), stream_ready.clone()));

    let links = Arc::new(LinkDirectory::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (queries_tx, queries_rx) = mpsc::channel(64);
    let market = crate::market::Market::new(
        shared.clone(),
        queries_tx.clone(),
        publisher.clone(),
        async_nats::jetstream::new(engine_client.clone()),
        opts.data.clone(),
        &opts.http_config,
        metrics.clone(),
    );
    let finance = crate::finance::Finance::new(
        shared.clone(),
        metrics.clone(),
        queries_tx,
        publisher.clone(),
        async_nats::jetstream::new(engine_client.clone()),
        opts.payouts_http.clone(),
    );
    let hooks = market.hooks.clone();
    let pipeline = tokio::spawn(pipeline(
        engine_client.clone(),
        stream_ready,
        shared.clone(),
        metrics.clone(),
        opts.clone(),
        (queries_rx, links.clone(), hooks),
        stop_rx.clone(),
    ));
    let reloader = tokio::spawn(reload_rules(opts.config.clone(), shared.clone(), metrics.clone(), stop_rx));

    let mut extra = finance.routes();
    let market = market.routes();
    extra.keyed = extra.keyed.merge(market.keyed);
    extra.open = extra.open.merge(market.open);
    let app = router_with(Ingest { rules: shared, publisher, metrics, links }, opts.http_config.clone(), extra);
    let listener = tokio::net::TcpListener::bind(opts.http).await.map_err(|source| PipelineError::Io {
        what: "listen on",
        path: opts.http.to_string().into(),
        source,
    })?;
    let local = listener.local_addr().map_err(|source| PipelineError::Io {
        what: "listen on",
        path: opts.http.to_string().into(),
        source,
    })?;
    eprintln!("afflio: listening on http://{local} (NATS {}, data {})", opts.nats, opts.data.display());
    let mut pipeline_done = pipeline;
    let served = tokio::select! {
        r = server::serve(listener, app, opts.server, shutdown_signal()) => r,
        r = &mut pipeline_done => {
            // The pipeline stopped on its own: an error worth exiting for.
            return r.map_err(|e| PipelineError::Internal(format!("pipeline task: {e}")))?;
        }
    };
    let _ = stop_tx.send(true);
    pipeline_done.await.map_err(|e| PipelineError::Internal(format!("pipeline task: {e}")))??;
    reloader.abort();
    // Whatever the broker does, this ends.
    for c in [&ingest_client, &engine_client] {
        let _ = tokio::time::timeout(Duration::from_secs(2), c.flush()).await;
    }
    served.map_err(|source| PipelineError::Io { what: "serve HTTP on", path: local.to_string().into(), source })?;
    eprintln!("afflio: stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("afflio: shutting down: draining requests, committing, checkpointing");
}

/// Waits for the broker and its stream, restores the engine, opens the
/// store, and runs the consumer and the committer until `stop`.
async fn pipeline(
    client: async_nats::Client,
    stream_ready: Arc<AtomicBool>,
    shared: SharedRules,
    metrics: Arc<Metrics>,
    opts: ServeOptions,
    (queries, links, hooks): (
        mpsc::Receiver<crate::finance::EngineQuery>,
        Arc<LinkDirectory>,
        Arc<std::sync::OnceLock<Arc<crate::webhooks::endpoints::Endpoints>>>,
    ),
    mut stop: watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let js = async_nats::jetstream::new(client);
    let mut said = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        match nats::ensure_stream(&js, &opts.stream).await {
            Ok(()) => break,
            Err(e) => {
                if said.elapsed() >= Duration::from_secs(10) {
                    eprintln!("afflio: waiting for the broker at {}: {e}", opts.nats);
                    said = std::time::Instant::now();
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return Ok(()),
        }
    }
    stream_ready.store(true, Ordering::Relaxed);
    let rules = shared.read().map(|r| r.clone()).map_err(|_| PipelineError::Internal("rules lock poisoned".into()))?;
    let webhooks = crate::webhooks::start(&js, &rules, &opts.data, opts.webhooks.clone(), stop.clone()).await?;
    let _ = hooks.set(webhooks.endpoints.clone());
    let mut state = FileBackend::open(&opts.state)?;
    let restored = tokio::task::block_in_place(|| state.restore(rules))?;
    metrics.recovery_ms.store(restored.took.as_millis() as u64, Ordering::Relaxed);
    metrics.state_image_bytes.store(restored.image_bytes, Ordering::Relaxed);
    metrics.state_delta_bytes.store(restored.delta_bytes, Ordering::Relaxed);
    metrics.state_deltas.store(restored.deltas as u64, Ordering::Relaxed);
    let position = restored.position;
    let store = Store::open(&opts.data).await?;
    let app = crate::app_id();
    let held = store.positions(&app).await?;
    let cut_points = held.values().filter(|v| **v > position as i64).map(|v| *v as u64).collect();
    eprintln!(
        "afflio: engine restored at stream position {position} in {:?} (image {} bytes, {} deltas, {} bytes); store at {:?}",
        restored.took, restored.image_bytes, restored.deltas, restored.delta_bytes, held
    );
    metrics.engine_seq.store(position, Ordering::Relaxed);
    metrics.committed_seq.store(position, Ordering::Relaxed);
    metrics.engine_events.store(restored.engine.events_read(), Ordering::Relaxed);
    let messages = consumer::messages(&js, position + 1).await?;
    let mut consumer = Consumer::new(restored.engine, metrics.clone(), position, cut_points);
    consumer.links = links;
    let (tx, rx) = mpsc::channel(1);
    let committer = Committer {
        store,
        state: Box::new(state) as Box<dyn StateBackend>,
        metrics,
        rules: shared.clone(),
        app,
        outbox: Some(webhooks.outbox),
        upkeep: Upkeep {
            every: opts.maintenance_every,
            vacuum_every: opts.vacuum_every,
            maintenance: opts.maintenance.clone(),
        },
    };
    let committing = tokio::spawn(committer.run(rx));
    let cutting = Cutting { interval: opts.epoch_interval, max_events: opts.max_epoch_events };
    let consumed = consumer::run(consumer, messages, shared, cutting, tx, queries, stop).await;
    let committed = committing.await.map_err(|e| PipelineError::Internal(format!("committer task: {e}")))?;
    consumed?;
    committed
}

/// Reloads the rules on SIGHUP or when the file changes; an invalid file
/// keeps the rules in force and says why.
async fn reload_rules(path: PathBuf, shared: SharedRules, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(_) => return,
    };
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    // What the rules in force were read from: an unchanged file is not reloaded.
    let mut loaded: Option<Vec<u8>> = std::fs::read(&path).ok();
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                let now = modified(&path);
                if now == seen { continue; }
            }
            _ = stop.changed() => return,
        }
        seen = modified(&path);
        let text = std::fs::read(&path).ok();
        if text.is_some() && text == loaded {
            continue;
        }
        let current = shared.read().map(|r| r.version()).unwrap_or(0);
        match Rules::load(&path) {
            Ok(new) => {
                // Versions only go up, so ledger rows tell which rules made them.
                let new = new.with_version(current + 1);
                loaded = text;
                metrics.rules_version.store(new.version(), Ordering::Relaxed);
                if let Ok(mut w) = shared.write() {
                    *w = Arc::new(new);
                }
                eprintln!("afflio: rules reloaded from {} (version {})", path.display(), current + 1);
            }
            Err(e) => {
                metrics.rules_reload_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("afflio: rules reload refused, keeping version {current}: {e}");
            }
        }
    }
}
