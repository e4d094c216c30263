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
use afflio_sinks::{Mode, Store, Write};
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
                    e.apply(ev, raw, Arrival { ts: now, origin: &Origin, clock: None });
                }
                e.take_output();
                e
            },
            |mut e| {
                for (ev, raw) in events.iter().zip(&lines) {
                    e.apply(ev, raw, Arrival { ts: now, origin: &Origin, clock: None });
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
                    e.apply(&ev, raw, Arrival { ts: now, origin: &Origin, clock: None });
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
        e.apply(&ev, &raw, Arrival { ts: now, origin: &Origin, clock: None });
    }
    e.take_output()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// One epoch's commit to the Delta store: append-only tables appended, the
/// state tables' changed rows merged by key.
fn store(c: &mut Criterion) {
    let rt = rt();
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    let out = mixed_output(50_000);
    g.throughput(Throughput::Elements(out.len() as u64));
    g.bench_function("delta_append_50k_events", |b| {
        let dir = tempfile::tempdir().unwrap();
        let mut store = rt.block_on(Store::open(dir.path())).unwrap();
        b.iter(|| {
            let w = Write { output: &out, changes: None, mode: Mode::Append, position: None, writer: "bench" };
            rt.block_on(store.write_rows_only(w)).unwrap()
        })
    });
    // An epoch of 2,000 captures and 200 refunds of earlier orders, merged
    // into state tables that already hold 20,000 orders.
    let mut e = Engine::new(Arc::new(rules()));
    let now = Utc::now();
    let dir = tempfile::tempdir().unwrap();
    let mut store = rt.block_on(Store::open(dir.path())).unwrap();
    let mut n = 0u64;
    let mut epoch = |e: &mut Engine, orders: u64, refunds: u64| {
        for _ in 0..orders {
            n += 1;
            let raw = format!(
                r#"{{"type":"capture","event_id":"c{n}","ts":"2026-11-10T{:02}:{:02}:00Z","program_id":"acme","order_id":"o{n}","amount":"100.00","currency":"USD","codes":["ALICE10"]}}"#,
                (n / 60) % 24,
                n % 60
            );
            let ev = decode_event(&raw).unwrap();
            e.apply(&ev, &raw, Arrival { ts: now, origin: &Origin, clock: None });
        }
        for r in 0..refunds {
            let o = 1 + (r * 97) % n.max(1);
            let raw = format!(
                r#"{{"type":"refund","event_id":"r{n}-{r}","ts":"2026-11-11T00:00:00Z","program_id":"acme","order_id":"o{o}","amount":"1.00","currency":"USD"}}"#
            );
            let ev = decode_event(&raw).unwrap();
            e.apply(&ev, &raw, Arrival { ts: now, origin: &Origin, clock: None });
        }
        (e.take_output(), e.take_state_changes(now))
    };
    let (out, changes) = epoch(&mut e, 20_000, 0);
    let w = Write { output: &out, changes: Some(&changes), mode: Mode::Upsert, position: None, writer: "bench" };
    rt.block_on(store.write(w)).unwrap();
    g.throughput(Throughput::Elements(2_200));
    g.bench_function("delta_epoch_merge_2k_orders_200_refunds", |b| {
        b.iter_batched(
            || epoch(&mut e, 2_000, 200),
            |(out, changes)| {
                let w = Write {
                    output: &out,
                    changes: Some(&changes),
                    mode: Mode::Upsert,
                    position: None,
                    writer: "bench",
                };
                rt.block_on(store.write(w)).unwrap()
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
}

/// A checkpoint delta after 10,000 events, against a state of 200,000
/// sessions: the delta's cost follows the changes.
fn checkpoint(c: &mut Criterion) {
    let mut e = Engine::new(Arc::new(rules()));
    let now = Utc::now();
    for raw in mixed_lines(200_000) {
        let ev = decode_event(&raw).unwrap();
        e.apply(&ev, &raw, Arrival { ts: now, origin: &Origin, clock: None });
    }
    let _ = e.take_output();
    let _ = e.checkpoint_delta().unwrap();
    let more = mixed_lines(210_000).split_off(200_000);
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10);
    g.bench_function("delta_after_10k_events", |b| {
        b.iter_batched(
            || {
                let mut twin = e.clone();
                for raw in &more {
                    let ev = decode_event(raw).unwrap();
                    twin.apply(&ev, raw, Arrival { ts: now, origin: &Origin, clock: None });
                }
                let _ = twin.take_output();
                twin
            },
            |mut twin| twin.checkpoint_delta().unwrap().len(),
            criterion::BatchSize::PerIteration,
        )
    });
    g.bench_function("image_of_200k_events", |b| b.iter(|| e.checkpoint().unwrap().len()));
    g.finish();
}

fn query(c: &mut Criterion) {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let out = mixed_output(200_000);
    let mut store = rt.block_on(Store::open(dir.path())).unwrap();
    rt.block_on(store.write(Write {
        output: &out,
        changes: None,
        mode: Mode::Replace,
        position: None,
        writer: "bench",
    }))
    .unwrap();
    let sql =
        "SELECT partner_id, count(*) AS entries, sum(amount) AS net FROM ledger GROUP BY partner_id ORDER BY net DESC";
    let mut g = c.benchmark_group("sql");
    g.sample_size(10);
    g.bench_function("ledger_by_partner_200k_events", |b| {
        b.iter(|| rt.block_on(afflio_sinks::query(dir.path(), sql, afflio_sinks::OutputFormat::Csv)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, decode, apply, commission, store, checkpoint, query);
criterion_main!(benches);
