use std::sync::Arc;

use afflio_engine::rules::Rules;
use afflio_engine::{Arrival, Body, Capture, Engine, Event, Refund};
use chrono::{DateTime, Utc};
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use crate::{
    query, query_at, schema, state_changes_of, At, Maintenance, Mode, OutputFormat, Position, Store, Table, Write,
};

struct Origin;
impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("test")
    }
}

fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn engine() -> Engine {
    let rules = Rules::parse(
        "t.toml",
        "[[programs]]\nid='p'\ncurrency='JPY'\nrate='7%'\n[[partners]]\nid='k'\nprogram_id='p'\n[[codes]]\ncode='K'\npartner_id='k'\n",
    )
    .unwrap();
    Engine::new(Arc::new(rules))
}

fn capture(e: &mut Engine, id: &str, order: &str, at: &str, amount: &str) {
    let ev = Event {
        event_id: id.to_string().into(),
        ts: ts(at),
        program_id: "p".into(),
        body: Body::Capture(Capture {
            order_id: order.to_string().into(),
            amount: amount.parse().unwrap(),
            currency: "JPY".into(),
            visitor_id: None,
            codes: vec!["k".into()],
            customer: None,
            ip: None,
            items: None,
            extra: Default::default(),
        }),
    };
    e.apply(&ev, "{}", Arrival { ts: ts(at), origin: &Origin, clock: None });
}

fn refund(e: &mut Engine, id: &str, order: &str, at: &str, amount: &str) {
    let ev = Event {
        event_id: id.to_string().into(),
        ts: ts(at),
        program_id: "p".into(),
        body: Body::Refund(Refund {
            order_id: order.to_string().into(),
            amount: amount.parse().unwrap(),
            currency: "JPY".into(),
            items: None,
            chargeback: false,
        }),
    };
    e.apply(&ev, "{}", Arrival { ts: ts(at), origin: &Origin, clock: None });
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn csv(dir: &std::path::Path, sql: &str) -> String {
    rt().block_on(query(dir, sql, OutputFormat::Csv)).unwrap()
}

/// Writes what the engine produced since the last write, with its state changes.
async fn write(store: &mut Store, e: &mut Engine, mode: Mode, position: Option<i64>) -> crate::Committed {
    let out = e.take_output();
    let changes = e.take_state_changes(ts("2026-12-31T00:00:00Z"));
    let position = position.map(|seq| Position { app: "afflio:test".into(), seq });
    store
        .write(Write { output: &out, changes: Some(&changes), mode, position: position.as_ref(), writer: "test" })
        .await
        .unwrap()
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
        for k in t.key() {
            assert!(s.field_with_name(k).is_ok(), "{}: key column {k}", t.name());
        }
    }
}

#[test]
fn the_store_reads_back_with_its_types_and_upserts_state_rows_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    capture(&mut e, "c1", "o1", "2026-11-10T10:00:00Z", "1999");
    capture(&mut e, "c2", "o2", "2026-11-10T11:30:00Z", "500");
    rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        let c = write(&mut s, &mut e, Mode::Upsert, None).await;
        assert_eq!(c.rows.get("ledger"), Some(&2));
        // A refund changes o1 only: one row of orders and lines is rewritten.
        refund(&mut e, "r1", "o1", "2026-11-11T10:00:00Z", "999");
        let c = write(&mut s, &mut e, Mode::Upsert, None).await;
        assert_eq!(c.rows.get("orders"), Some(&1));
    });
    assert_eq!(
        csv(dir.path(), "SELECT order_id, captured, refunded, order_hour FROM orders ORDER BY order_id"),
        "order_id,captured,refunded,order_hour\no1,1999.0000,999.0000,2026-11-10T10\no2,500.0000,0.0000,2026-11-10T11\n"
    );
    assert_eq!(
        csv(dir.path(), "SELECT order_id, net_amount, status FROM lines ORDER BY order_id"),
        "order_id,net_amount,status\no1,70.0000,pending\no2,35.0000,pending\n"
    );
    // The ledger's sum per line equals the line's net.
    assert_eq!(
        csv(
            dir.path(),
            "SELECT count(*) AS off FROM lines l JOIN (SELECT order_id, sum(amount) AS s FROM ledger GROUP BY order_id) g \
             ON l.order_id = g.order_id WHERE l.net_amount <> g.s"
        ),
        "off\n0\n"
    );
    let types = csv(dir.path(), "SELECT arrow_typeof(amount) AS a, arrow_typeof(ts) AS t FROM ledger LIMIT 1");
    assert_eq!(types, "a,t\n\"Decimal128(18, 4)\",\"Timestamp(µs, \"\"UTC\"\")\"\n");
}

#[test]
fn a_write_at_a_position_a_table_already_holds_is_skipped_for_that_table() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    capture(&mut e, "c1", "o1", "2026-11-10T10:00:00Z", "1000");
    let out = e.take_output();
    let changes = e.take_state_changes(ts("2026-11-20T00:00:00Z"));
    rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        let p = Position { app: "afflio:test".into(), seq: 7 };
        let w = Write { output: &out, changes: Some(&changes), mode: Mode::Upsert, position: Some(&p), writer: "test" };
        let first = s.write(w).await.unwrap();
        assert!(first.skipped.is_empty());
        // The same rows again (a crash after the commit, before the checkpoint).
        let again = s.write(w).await.unwrap();
        assert!(again.rows.is_empty(), "{again:?}");
        assert!(again.skipped.contains(&"ledger") && again.skipped.contains(&"orders"), "{again:?}");
        let positions = s.positions("afflio:test").await.unwrap();
        assert_eq!(positions.get("ledger"), Some(&7));
        assert_eq!(positions.get("epochs"), Some(&7));
        // A reopened store knows the positions too.
        let reopened = Store::open(dir.path()).await.unwrap();
        assert_eq!(reopened.positions("afflio:test").await.unwrap().get("orders"), Some(&7));
    });
    assert_eq!(csv(dir.path(), "SELECT count(*) AS n FROM ledger"), "n\n1\n");
    assert_eq!(csv(dir.path(), "SELECT count(*) AS n FROM orders"), "n\n1\n");
}

#[test]
fn every_store_version_stays_readable_and_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    let v1 = rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        capture(&mut e, "c1", "o1", "2026-11-10T10:00:00Z", "1000");
        let v1 = write(&mut s, &mut e, Mode::Upsert, Some(1)).await.version;
        capture(&mut e, "c2", "o2", "2026-11-10T10:05:00Z", "2000");
        refund(&mut e, "r1", "o1", "2026-11-10T10:06:00Z", "1000");
        write(&mut s, &mut e, Mode::Upsert, Some(2)).await;
        v1
    });
    let q = "SELECT (SELECT count(*) FROM ledger) AS entries, (SELECT sum(net_amount) FROM lines) AS net";
    assert_eq!(
        rt.block_on(query_at(dir.path(), q, OutputFormat::Csv, At::Version(v1))).unwrap(),
        "entries,net\n1,70.0000\n"
    );
    assert_eq!(csv(dir.path(), q), "entries,net\n3,140.0000\n");
    let e = rt.block_on(query_at(dir.path(), "SELECT 1", OutputFormat::Csv, At::Version(99))).unwrap_err();
    assert!(e.to_string().contains("store version 99 does not exist"), "{e}");
    assert_eq!(
        csv(dir.path(), "SELECT position, writer FROM epochs ORDER BY position"),
        "position,writer\n1,test\n2,test\n"
    );
}

#[test]
fn replace_empties_tables_without_rows() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    capture(&mut e, "c1", "o1", "2026-11-10T10:00:00Z", "1000");
    rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        write(&mut s, &mut e, Mode::Replace, None).await;
        let mut fresh = engine();
        let out = fresh.take_output();
        s.write(Write { output: &out, changes: None, mode: Mode::Replace, position: None, writer: "test" })
            .await
            .unwrap();
    });
    assert_eq!(csv(dir.path(), "SELECT count(*) AS n FROM ledger"), "n\n0\n");
    assert_eq!(csv(dir.path(), "SELECT count(*) AS n FROM orders"), "n\n0\n");
}

#[test]
fn optimize_and_vacuum_keep_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        for i in 0..6 {
            capture(&mut e, &format!("c{i}"), &format!("o{i}"), "2026-11-10T10:00:00Z", "100");
            write(&mut s, &mut e, Mode::Upsert, Some(i)).await;
        }
        assert_eq!(s.files("ledger"), 6);
        let m = Maintenance { min_files: 4, vacuum_retention: chrono::Duration::zero(), ..Maintenance::default() };
        let r = s.optimize("ledger", &m, false).await.unwrap();
        assert_eq!((r.files_removed, r.files_added), (6, 1), "{r}");
        assert_eq!(s.files("ledger"), 1);
        s.record_maintenance().await.unwrap();
        let v = s.vacuum("ledger", &m).await.unwrap();
        assert_eq!(v.files_vacuumed, 6, "{v}");
    });
    assert_eq!(csv(dir.path(), "SELECT count(*) AS n, count(DISTINCT entry_id) AS d FROM ledger"), "n,d\n6,6\n");
}

#[test]
fn sql_is_read_only_and_escapes_control_characters_in_tables() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut e = engine();
    capture(&mut e, "c\u{1b}[31m1", "o1", "2026-11-10T10:00:00Z", "100");
    rt.block_on(async {
        let mut s = Store::open(dir.path()).await.unwrap();
        write(&mut s, &mut e, Mode::Upsert, None).await;
    });
    for bad in [
        "COPY (SELECT 1) TO '/tmp/afflio-should-not-exist.csv'",
        "INSERT INTO ledger SELECT * FROM ledger",
        "CREATE TABLE x AS SELECT 1",
        "DROP TABLE ledger",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let e = rt.block_on(query(dir.path(), bad, OutputFormat::Csv)).unwrap_err();
        assert!(matches!(e, crate::SqlError::NotAQuery(_)), "{bad}: {e}");
    }
    assert!(!std::path::Path::new("/tmp/afflio-should-not-exist.csv").exists());
    let table = rt.block_on(query(dir.path(), "SELECT event_id FROM ledger", OutputFormat::Table)).unwrap();
    assert!(table.contains("c\\u{1b}[31m1") && !table.contains('\u{1b}'), "{table}");
}

#[test]
fn state_rows_of_a_replay_hold_every_open_order_and_balance() {
    let mut e = engine();
    capture(&mut e, "c1", "o1", "2026-11-10T10:00:00Z", "100");
    let c = state_changes_of(&e, None, ts("2026-11-10T11:00:00Z"));
    assert_eq!(c.orders.len(), 1);
    assert_eq!(c.balances.len(), 1);
}
