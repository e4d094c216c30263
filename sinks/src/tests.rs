use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Body, Capture, Engine, Event};
use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use crate::{query, schema, OutputFormat, ParquetStore, StreamStore, Table};

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test")
    }
}

fn engine_with_one_order() -> Engine {
    let rules = Rules::parse(
        "t.toml",
        "[[programs]]\nid='p'\ncurrency='JPY'\nrate='7%'\n[[partners]]\nid='k'\nprogram_id='p'\n[[codes]]\ncode='K'\npartner_id='k'\n",
    )
    .unwrap();
    let mut e = Engine::new(Arc::new(rules));
    let ts = DateTime::parse_from_rfc3339("2026-11-10T10:00:00Z").unwrap().with_timezone(&Utc);
    let ev = Event {
        event_id: "c1".into(),
        ts,
        program_id: "p".into(),
        body: Body::Capture(Capture {
            order_id: "o1".into(),
            amount: "1999".parse().unwrap(),
            currency: "JPY".into(),
            visitor_id: None,
            codes: vec!["k".into()],
            customer: None,
            ip: None,
            items: None,
        }),
    };
    e.apply(&ev, "{}", Arrival { ts, origin: &Origin });
    e
}

/// The names of the files in `dir`, sorted.
fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|f| f.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn money_and_time_columns_have_the_contract_types() {
    for t in Table::ALL {
        let s = schema(t);
        for f in s.fields() {
            let money =
                ["basis", "amount", "captured", "refunded", "net_amount", "accrued", "reversed", "chargeback_amount"];
            if money.contains(&f.name().as_str()) {
                assert_eq!(f.data_type(), &DataType::Decimal128(18, 4), "{}.{}", t.name(), f.name());
            }
            if f.name() == "ts" || f.name().ends_with("_ts") || f.name() == "eligible_at" {
                assert_eq!(
                    f.data_type(),
                    &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                    "{}.{}",
                    t.name(),
                    f.name()
                );
            }
        }
    }
}

#[test]
fn an_unfinished_store_leaves_no_files_and_a_finished_one_replaces_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_with_one_order();
    {
        let mut s = ParquetStore::create(dir.path(), "run1").unwrap();
        s.append(&e.pending_output().clone()).unwrap();
        // Dropped without finish: a crash mid-run.
    }
    for t in Table::ALL {
        assert_eq!(std::fs::read_dir(dir.path().join(t.name())).unwrap().count(), 0, "{}", t.name());
    }
    let mut s = ParquetStore::create(dir.path(), "run2").unwrap();
    s.append(&e.pending_output().clone()).unwrap();
    let counts = s.finish(&e, Utc::now()).unwrap();
    assert_eq!(counts["ledger"], 1);
    assert_eq!(counts["orders"], 1);
    let s = ParquetStore::create(dir.path(), "run3").unwrap();
    s.finish(&e, Utc::now()).unwrap();
    let files: Vec<_> = std::fs::read_dir(dir.path().join("ledger")).unwrap().map(|f| f.unwrap().file_name()).collect();
    assert_eq!(files, [std::ffi::OsString::from("part-run3.parquet")]);
}

#[test]
fn queries_render_as_table_csv_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_with_one_order();
    let mut s = ParquetStore::create(dir.path(), "r").unwrap();
    s.append(&e.pending_output().clone()).unwrap();
    s.finish(&e, Utc::now()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let q = |sql: &str, f| rt.block_on(query(dir.path(), sql, f)).unwrap();
    // JPY 1999 x 7% = 139.93 -> 140.
    assert_eq!(q("SELECT entry_id, amount FROM ledger", OutputFormat::Csv), "entry_id,amount\nc1:0,140.0000\n");
    assert_eq!(q("SELECT entry_id FROM ledger", OutputFormat::Json), "[{\"entry_id\":\"c1:0\"}]\n");
    assert_eq!(q("SELECT entry_id FROM ledger WHERE false", OutputFormat::Json), "[]\n");
    assert_eq!(q("SELECT entry_id FROM ledger WHERE false", OutputFormat::Csv), "entry_id\n");
    assert!(q("SELECT order_id FROM orders", OutputFormat::Table).contains("| o1       |"));
    // CSV has no lists: nested columns are written as text.
    assert_eq!(
        q("SELECT order_id, codes, code_issues FROM orders", OutputFormat::Csv),
        "order_id,codes,code_issues\no1,[K],[]\n"
    );
    assert!(q("SELECT * FROM orders", OutputFormat::Csv).starts_with("program_id,order_id,"));
    let err = rt.block_on(query(&dir.path().join("missing"), "SELECT 1", OutputFormat::Csv)).unwrap_err();
    assert!(err.to_string().contains("no Afflio data"), "{err}");
}

#[test]
fn stream_files_after_the_committed_position_are_removed_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine_with_one_order();
    let out = e.take_output();
    let s = StreamStore::open(dir.path()).unwrap();
    s.append(1, 10, &out).unwrap();
    s.snapshot(&e, Utc::now(), 10).unwrap();
    s.append(11, 20, &out).unwrap();
    s.snapshot(&e, Utc::now(), 20).unwrap();
    std::fs::write(dir.path().join("ledger/.part-x.parquet.tmp"), b"partial").unwrap();
    let names = |t: &str| file_names(&dir.path().join(t));
    assert_eq!(names("ledger").len(), 3);
    assert_eq!(names("orders"), ["snap-00000000000000000020.parquet"]);
    // The checkpoint says 10: the second flush never happened.
    // ledger part 11-20, the temporary file, the orders, lines and balances snapshots.
    assert_eq!(s.recover(10).unwrap(), 5);
    assert_eq!(names("ledger"), ["part-00000000000000000001-00000000000000000010.parquet"]);
    assert!(names("orders").is_empty(), "a snapshot newer than the checkpoint is removed");
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let csv = rt.block_on(query(dir.path(), "SELECT count(*) AS n FROM ledger", OutputFormat::Csv)).unwrap();
    assert_eq!(csv, "n\n1\n");
}

#[test]
fn compaction_merges_small_files_without_counting_a_row_twice() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine_with_one_order();
    let out = e.take_output();
    let s = StreamStore::open(dir.path()).unwrap();
    for i in 0..5u64 {
        s.append(i * 10 + 1, i * 10 + 10, &out).unwrap();
    }
    let count = || {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(query(dir.path(), "SELECT count(*) AS n FROM ledger", OutputFormat::Csv)).unwrap()
    };
    assert_eq!(count(), "n\n5\n");
    assert_eq!(s.compact(40, 3).unwrap(), 4, "only what a checkpoint holds is merged");
    assert_eq!(
        file_names(&dir.path().join("ledger")),
        [
            "part-00000000000000000001-00000000000000000040.parquet",
            "part-00000000000000000041-00000000000000000050.parquet"
        ]
    );
    assert_eq!(count(), "n\n5\n");
    // A crash after the merged file was written but before the small ones
    // were removed: recovery finishes the job.
    for i in 5..9u64 {
        s.append(i * 10 + 1, i * 10 + 10, &out).unwrap();
    }
    let merged = dir.path().join("ledger/.part-00000000000000000051-00000000000000000070.parquet.compacted");
    std::fs::copy(dir.path().join("ledger/part-00000000000000000051-00000000000000000060.parquet"), &merged).unwrap();
    // (A stand-in holding one of the two merged files' rows is enough to see the files swap.)
    s.recover(90).unwrap();
    assert_eq!(
        file_names(&dir.path().join("ledger")),
        [
            "part-00000000000000000001-00000000000000000040.parquet",
            "part-00000000000000000041-00000000000000000050.parquet",
            "part-00000000000000000051-00000000000000000070.parquet",
            "part-00000000000000000071-00000000000000000080.parquet",
            "part-00000000000000000081-00000000000000000090.parquet",
        ]
    );
}
