//! Criterion benchmarks of the hot path: decoding, applying, both.
//! `cargo bench -p afflio-benches -- --save-baseline main` saves a baseline;
//! `-- --baseline main` compares against it.

use std::sync::Arc;

use afflio_benches::{capture_line, click_line, mixed_lines, rules};
use afflio_engine::{Arrival, Engine};
use afflio_ingest::decode_event;
use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

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

fn apply(c: &mut Criterion) {
    let lines = mixed_lines(10_000);
    let events: Vec<_> = lines.iter().map(|l| decode_event(l).unwrap()).collect();
    let rules = Arc::new(rules());
    let now = Utc::now();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("apply_mixed_10k", |b| {
        b.iter_batched(
            || Engine::new(rules.clone()),
            |mut e| {
                for (ev, raw) in events.iter().zip(&lines) {
                    e.apply(ev, raw, Arrival { ts: now, origin: &Origin });
                }
                e.take_output()
            },
            BatchSize::LargeInput,
        )
    });
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

criterion_group!(benches, decode, apply);
criterion_main!(benches);
