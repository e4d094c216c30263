//! Criterion benchmarks of the hot path: decoding, applying each event type,
//! commission arithmetic, the Parquet flush and a DataFusion query.
//!
//! `cargo bench -p afflio-benches -- --save-baseline main` saves a baseline;
//! `cargo bench -p afflio-benches -- --baseline main` compares against it
//! (BENCHMARKS.md).

use std::sync::Arc;

use afflio_benches::{capture_line, click_line, mixed_lines, refund_line, rules};
use afflio_engine::{round_money, Arrival, Engine};
use afflio_ingest::decode_event;
use afflio_sinks::ParquetStore;
use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rust_decimal::Decimal;

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bench")
    }
}

fn decode(c: &mut Criterion) {
    let click = click_line(1, 1, 100);
    let capture = capture_line(2, 1, 1, 200);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("click", |b| b.iter(|| decode_event(std::hint::black_box(&click)).unwrap()));
    g.bench_function("capture", |b| b.iter(|| decode_event(std::hint::black_box(&capture)).unwrap()));
    g.finish();
}

/// Applies `lines` (decoded beforehand) to a fresh engine prepared by `setup`.
fn apply_lines(c: &mut Criterion, name: &str, setup_lines: Vec<String>, lines: Vec<String>) {
    let rules = Arc::new(rules());
    let now = Utc::now();
    let setup: Vec<_> = setup_lines.iter().map(|l| decode_event(l).unwrap()).collect();
    let events: Vec<_> = lines.iter().map(|l| decode_event(l).unwrap()).collect();
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function(name, |b| {
        b.iter_batched(
            || {
                let mut e = Engine::new(rules.clone());
                for (ev, raw) in setup.iter().zip(&setup_lines) {
                    e.apply(ev, raw, Arrival { ts: now, origin: &Origin });
                }
                e.take_output();
                e
            },
            |mut e| {
                for (ev, raw) in events.iter().zip(&lines) {
                    e.apply(ev, raw, Arrival { ts: now, origin: &Origin });
                }
                e.take_output()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn apply(c: &mut Criterion) {
    let n = 10_000u64;
    let clicks: Vec<String> = (0..n).map(|i| click_line(i, i, i * 8)).collect();
    let captures: Vec<String> = (0..n).map(|i| capture_line(n + i, i, i, i * 8 + 4)).collect();
    let refunds: Vec<String> = (0..n).map(|i| refund_line(2 * n + i, i, 80_000 + i / 2)).collect();
    apply_lines(c, "click_10k", Vec::new(), clicks.clone());
    apply_lines(c, "capture_after_click_10k", clicks.clone(), captures.clone());
    let mut before = clicks;
    before.extend(captures);
    apply_lines(c, "refund_10k", before, refunds);
    apply_lines(c, "mixed_10k", Vec::new(), mixed_lines(n));

    let lines = mixed_lines(n);
    let rules = Arc::new(rules());
    let now = Utc::now();
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(n));
    g.bench_function("decode_and_apply_mixed_10k", |b| {
        b.iter_batched(
            || Engine::new(rules.clone()),
            |mut e| {
                for raw in &lines {
                    let ev = decode_event(raw).unwrap();
                    e.apply(&ev, raw, Arrival { ts: now, origin: &Origin });
                }
                e.take_output()
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn commission(c: &mut Criterion) {
    let rates: Vec<Decimal> = ["0.10", "0.125", "0.02", "0.015"].iter().map(|r| r.parse().unwrap()).collect();
    let amounts: Vec<Decimal> = (0..1000).map(|i| Decimal::new(1999 + i * 37, 2)).collect();
    let usd = afflio_engine::rules::Currency::from_code("USD").unwrap();
    let mut g = c.benchmark_group("commission");
    g.throughput(Throughput::Elements((amounts.len() * rates.len()) as u64));
    g.bench_function("multiply_and_round_half_even_4k", |b| {
        b.iter(|| {
            let mut total = Decimal::ZERO;
            for a in &amounts {
                for r in &rates {
                    total += round_money(std::hint::black_box(*a) * r, usd);
                }
            }
            total
        })
    });
    g.finish();
}

/// The output of the demo-like mix, for the sink benchmarks.
fn mixed_output(n: u64) -> afflio_engine::Output {
    let mut e = Engine::new(Arc::new(rules()));
    let now = Utc::now();
    for raw in mixed_lines(n) {
        let ev = decode_event(&raw).unwrap();
        e.apply(&ev, &raw, Arrival { ts: now, origin: &Origin });
    }
    e.take_output()
}

fn parquet(c: &mut Criterion) {
    let out = mixed_output(50_000);
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("sink");
    g.throughput(Throughput::Elements(out.len() as u64));
    g.sample_size(10);
    let mut run = 0u64;
    g.bench_function("parquet_flush_50k_events", |b| {
        b.iter(|| {
            run += 1;
            let mut store = ParquetStore::create(&dir.path().join(format!("s{run}")), &format!("r{run}")).unwrap();
            store.append(&out).unwrap();
            store
        })
    });
    g.finish();
}

fn query(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let out = mixed_output(200_000);
    let mut store = ParquetStore::create(dir.path(), "q").unwrap();
    store.append(&out).unwrap();
    let engine = Engine::new(Arc::new(rules()));
    store.finish(&engine, Utc::now()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sql =
        "SELECT partner_id, count(*) AS entries, sum(amount) AS net FROM ledger GROUP BY partner_id ORDER BY net DESC";
    let mut g = c.benchmark_group("sql");
    g.sample_size(10);
    g.bench_function("ledger_by_partner_200k_events", |b| {
        b.iter(|| rt.block_on(afflio_sinks::query(dir.path(), sql, afflio_sinks::OutputFormat::Csv)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, decode, apply, commission, parquet, query);
criterion_main!(benches);
