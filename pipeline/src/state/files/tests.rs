use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Body, Click, Engine, Event};
use chrono::{DateTime, Duration, Utc};

use super::{FileBackend, FoldPolicy};
use crate::state::StateBackend;

const RULES: &str = "[[programs]]\nid='p'\ncurrency='USD'\nrate='10%'\n[[partners]]\nid='a'\nprogram_id='p'\n[[links]]\nid='l'\npartner_id='a'\n";

fn rules() -> Arc<Rules> {
    Arc::new(Rules::parse("t.toml", RULES).unwrap())
}

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test")
    }
}

fn clicks(e: &mut Engine, from: u32, n: u32) {
    let t0: DateTime<Utc> = "2026-11-01T00:00:00Z".parse().unwrap();
    for i in from..from + n {
        let ev = Event {
            event_id: format!("k{i}").into(),
            ts: t0 + Duration::seconds(i64::from(i)),
            program_id: "p".into(),
            body: Body::Click(Click {
                link_id: "l".into(),
                visitor_id: format!("v{}", i % 97).into(),
                ..Click::default()
            }),
        };
        e.apply(&ev, "{}", Arrival { ts: t0, origin: &Origin, clock: None });
    }
    let _ = e.take_output();
}

#[test]
fn a_new_directory_starts_a_chain_and_deltas_restore_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = FileBackend::open(dir.path()).unwrap();
    let r = b.restore(rules()).unwrap();
    assert_eq!(r.position, 0);
    let mut e = r.engine;
    for round in 0..5u32 {
        clicks(&mut e, round * 100, 100);
        let delta = e.checkpoint_delta().unwrap();
        b.save(u64::from(round + 1) * 10, &delta).unwrap();
    }
    let mut again = FileBackend::open(dir.path()).unwrap();
    let r = again.restore(rules()).unwrap();
    assert_eq!((r.position, r.deltas), (50, 5));
    assert_eq!(r.engine.state_fingerprint(), e.state_fingerprint());
    assert_eq!(r.engine.stats(), e.stats());
}

#[test]
fn a_fold_replaces_the_deltas_with_an_image_of_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FoldPolicy { ratio: 0.0, min_bytes: 0, max_deltas: 1000 };
    let mut b = FileBackend::with_policy(dir.path(), policy).unwrap();
    let mut e = b.restore(rules()).unwrap().engine;
    clicks(&mut e, 0, 300);
    b.save(1, &e.checkpoint_delta().unwrap()).unwrap();
    assert!(b.maintain(&rules()).unwrap().is_none(), "the fold starts on a thread");
    // Saves go on while it runs; they stay after it.
    clicks(&mut e, 300, 50);
    b.save(2, &e.checkpoint_delta().unwrap()).unwrap();
    b.finish().unwrap();
    let (_, _, deltas) = b.chain();
    assert_eq!(deltas, 1, "the delta saved during the fold is kept");
    let files: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files.iter().filter(|f| f.starts_with("image-")).count(), 1, "{files:?}");
    assert_eq!(files.iter().filter(|f| f.starts_with("delta-")).count(), 1, "{files:?}");
    let r = FileBackend::open(dir.path()).unwrap().restore(rules()).unwrap();
    assert_eq!(r.position, 2);
    assert_eq!(r.engine.state_fingerprint(), e.state_fingerprint());
}

#[test]
fn a_delta_written_without_its_manifest_is_not_part_of_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = FileBackend::open(dir.path()).unwrap();
    let mut e = b.restore(rules()).unwrap().engine;
    clicks(&mut e, 0, 10);
    b.save(1, &e.checkpoint_delta().unwrap()).unwrap();
    let at_one = e.state_fingerprint();
    // A crash between the delta file and the manifest: a stray file.
    std::fs::write(dir.path().join("delta-000000009999.ckpt"), b"partial").unwrap();
    let r = FileBackend::open(dir.path()).unwrap().restore(rules()).unwrap();
    assert_eq!((r.position, r.engine.state_fingerprint()), (1, at_one));
    assert!(!dir.path().join("delta-000000009999.ckpt").exists(), "strays are removed");
}

#[test]
fn a_damaged_chain_is_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = FileBackend::open(dir.path()).unwrap();
    let mut e = b.restore(rules()).unwrap().engine;
    clicks(&mut e, 0, 10);
    b.save(1, &e.checkpoint_delta().unwrap()).unwrap();
    let delta = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("delta-"))
        .unwrap();
    std::fs::write(&delta, b"AFFLIO").unwrap();
    let err = FileBackend::open(dir.path()).unwrap().restore(rules()).err().unwrap().to_string();
    assert!(err.contains(&*delta.file_name().unwrap().to_string_lossy()), "{err}");
    std::fs::write(dir.path().join("MANIFEST"), b"{").unwrap();
    let err = FileBackend::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("MANIFEST") && err.contains("not a manifest"), "{err}");
}
