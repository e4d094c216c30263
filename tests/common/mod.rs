//! What the live-service tests share: a nats-server of their own (on a free
//! port, with a temporary store, so that they can kill and restart it), the
//! service as a child process, a minimal HTTP client, the demo's workload
//! split into requests, and the ledger and orders `afflio replay` gives.

#![allow(dead_code)] // each test binary uses part of it

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn nats_binary() -> String {
    for p in std::env::var("PATH").unwrap_or_default().split(':') {
        let c = Path::new(p).join("nats-server");
        if c.is_file() {
            return c.display().to_string();
        }
    }
    "/usr/sbin/nats-server".to_string()
}

pub struct Nats {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Nats {
    pub fn start(dir: &Path) -> Nats {
        Nats::start_at(dir, free_port())
    }

    pub fn start_at(dir: &Path, port: u16) -> Nats {
        let mut n = Nats { port, dir: dir.to_path_buf(), child: None };
        n.restart();
        n
    }

    pub fn restart(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let conf = self.dir.join("nats.conf");
        std::fs::write(&conf, nats_config(self.port, &self.dir)).unwrap();
        let child = Command::new(nats_binary())
            .args(["-c", conf.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (PATH or /usr/sbin/nats-server)");
        self.child = Some(child);
        let port = self.port;
        wait_for("nats-server", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// The broker's users, as the README sets them up: only the ingest user may
/// publish events, only the engine user may consume them.
pub const INGEST_USER: (&str, &str) = ("afflio-ingest", "ingest-secret-0123456789");
pub const ENGINE_USER: (&str, &str) = ("afflio-engine", "engine-secret-0123456789");

/// A nats-server configuration with JetStream and those two users.
pub fn nats_config(port: u16, dir: &Path) -> String {
    format!(
        r#"listen: "127.0.0.1:{port}"
jetstream {{ store_dir: "{store}" }}
authorization {{
  users = [
    {{ user: "{iu}", password: "{ip}",
       permissions: {{ publish: {{ allow: ["afflio.events.>"] }}, subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    {{ user: "{eu}", password: "{ep}",
       permissions: {{ publish: {{ allow: ["$JS.API.>", "$JS.ACK.AFFLIO_EVENTS.>", "afflio.webhooks.>", "$JS.ACK.AFFLIO_WEBHOOKS.>", "afflio.webhook-endpoints.>"] }}, subscribe: {{ allow: ["_INBOX.>"] }} }} }}
  ]
}}
"#,
        store = dir.join("store").display(),
        iu = INGEST_USER.0,
        ip = INGEST_USER.1,
        eu = ENGINE_USER.0,
        ep = ENGINE_USER.1,
    )
}

/// The service's broker credentials (environment).
pub fn nats_env() -> Vec<(String, String)> {
    vec![
        ("AFFLIO_NATS_INGEST_USER".into(), INGEST_USER.0.into()),
        ("AFFLIO_NATS_INGEST_PASSWORD".into(), INGEST_USER.1.into()),
        ("AFFLIO_NATS_ENGINE_USER".into(), ENGINE_USER.0.into()),
        ("AFFLIO_NATS_ENGINE_PASSWORD".into(), ENGINE_USER.1.into()),
    ]
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Service {
    pub child: Option<Child>,
    pub port: u16,
    pub args: Vec<String>,
    /// Environment of the next start (e.g. FAILPOINTS), cleared after it.
    pub env: Vec<(String, String)>,
}

impl Service {
    pub fn start(rules: &Path, nats: &str, data: &Path, state: &Path) -> Service {
        let port = free_port();
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            rules.display().to_string(),
            "--nats".into(),
            nats.to_string(),
            "--http".into(),
            format!("127.0.0.1:{port}"),
            "--data".into(),
            data.display().to_string(),
            "--state".into(),
            state.display().to_string(),
            "--epoch-ms".into(),
            "100".into(),
            "--max-epoch-events".into(),
            "300".into(),
            "--stream-max-gib".into(),
            "1".into(),
        ];
        let mut s = Service { child: None, port, args, env: Vec::new() };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        let log = std::env::var_os("AFFLIO_TEST_SERVE_LOG").is_some();
        let child = Command::new(env!("CARGO_BIN_EXE_afflio"))
            .args(&self.args)
            .envs(nats_env())
            .envs(std::mem::take(&mut self.env))
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap();
        self.child = Some(child);
        let port = self.port;
        wait_for("afflio serve", Duration::from_secs(30), || http(port, "GET", "/healthz", None, "").0 == 200);
    }

    /// Starts with FAILPOINTS set: the service dies (as under kill -9) at the
    /// fault point; returns once it has, or after `timeout` (still running).
    pub fn start_until_fault(&mut self, failpoints: &str, timeout: Duration) -> bool {
        self.env = vec![("FAILPOINTS".into(), failpoints.into())];
        self.restart();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    self.child = None;
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the process has exited (a fault point fired).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_some(),
            None => true,
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn term(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st.code();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = http(self.port, "GET", "/metrics", None, "");
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 client: (status, body). Status 0 when the connection failed.
pub fn http(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return (0, String::new());
    }
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// [`http`] with a JSON answer (`Null` for an empty body).
pub fn call(port: u16, method: &str, path: &str, key: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let (s, b) = http(port, method, path, key, body);
    let v = if b.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b}"))
    };
    (s, v)
}

pub const KEYS: [(&str, &str); 2] = [("acme", "acme-test-key-0123456789"), ("bharat", "bharat-test-key-0123456789")];

/// The demo's traffic (seeded), with an API key per program.
pub fn workload(dir: &Path, seed: u64, events: u64) -> (PathBuf, PathBuf, Vec<String>) {
    let mut rules = Vec::new();
    let mut lines = Vec::new();
    afflio::demo::generate(seed, events, &mut rules, &mut lines).unwrap();
    let mut rules = String::from_utf8(rules).unwrap();
    for (p, k) in KEYS {
        rules.push_str(&format!("\n[[api_keys]]\nprogram_id = \"{p}\"\nkey = \"{k}\"\n"));
    }
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, rules).unwrap();
    let events_path = dir.join("events.jsonl");
    std::fs::write(&events_path, &lines).unwrap();
    let lines = String::from_utf8(lines).unwrap().lines().map(str::to_string).collect();
    (rules_path, events_path, lines)
}

/// Requests of consecutive lines of one program, in order.
pub fn batches(lines: &[String]) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    for l in lines {
        let key =
            KEYS.iter().find(|(p, _)| l.contains(&format!("\"program_id\":\"{p}\""))).map_or(KEYS[0].1, |(_, k)| *k);
        match out.last_mut() {
            Some((k, body)) if *k == key && body.lines().count() < 200 => {
                body.push_str(l);
                body.push('\n');
            }
            _ => out.push((key, format!("{l}\n"))),
        }
    }
    out
}

/// Posts until the broker took the batch (retrying on 503); returns the events it stored.
pub fn post(port: u16, key: &str, body: &str) -> u64 {
    for _ in 0..200 {
        let (status, resp) = http(port, "POST", "/v1/events", Some(key), body);
        if status == 503 || status == 0 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        assert!(matches!(status, 202 | 400 | 422), "{status}: {resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
        return v["accepted"].as_u64().unwrap_or_else(|| u64::from(v["status"] == "accepted"));
    }
    panic!("the service never took the batch");
}

pub fn replay_ledger(dir: &Path, rules: &Path, events: &Path) -> (String, String) {
    let out = dir.join("replay");
    let o = Command::new(env!("CARGO_BIN_EXE_afflio"))
        .args([
            "replay",
            "--config",
            rules.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    (ledger(&out), orders(&out))
}

pub fn sql(data: &Path, q: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_afflio"))
        .args(["sql", "--data", data.to_str().unwrap(), q, "--format", "csv"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

pub fn ledger(data: &Path) -> String {
    sql(data, "SELECT entry_id, event_id, order_id, partner_id, tier, kind, basis, amount, attribution, source FROM ledger ORDER BY entry_id")
}

pub fn orders(data: &Path) -> String {
    sql(data, "SELECT program_id, order_id, partner_id, captured, refunded, chargeback FROM orders ORDER BY program_id, order_id")
}

pub fn assert_same(live: (String, String), replay: &(String, String)) {
    assert!(live.0.lines().count() > 100, "the workload must produce a real ledger");
    if live.0 != replay.0 {
        let l: Vec<&str> = live.0.lines().collect();
        let r: Vec<&str> = replay.0.lines().collect();
        let first = l.iter().zip(&r).position(|(a, b)| a != b);
        panic!("ledgers differ: live {} rows, replay {} rows, first difference at row {first:?}", l.len(), r.len());
    }
    assert_eq!(live.1, replay.1, "orders differ");
}

/// An HTTP/1.1 request with extra headers: (status, response headers, body).
pub fn http_full(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new(), String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new(), String::new());
    }
    let mut resp = String::new();
    if s.read_to_string(&mut resp).is_err() {
        return (0, String::new(), String::new());
    }
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = resp.split_once("\r\n\r\n").map(|(h, b)| (h.to_string(), b.to_string())).unwrap_or_default();
    (status, head, body)
}

/// The value of a cookie a response sets.
pub fn set_cookie(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let v = l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: "))?;
        let (k, rest) = v.split_once('=')?;
        (k == name).then(|| rest.split(';').next().unwrap_or("").to_string())
    })
}

/// Every event the broker's stream holds, in stream order, as JSON Lines
/// (envelopes opened): what a replay of the live service's input reads.
pub fn stream_events(nats_url: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = async_nats::ConnectOptions::with_user_and_password(ENGINE_USER.0.into(), ENGINE_USER.1.into())
            .connect(nats_url)
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("AFFLIO_EVENTS").await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let Ok(m) = stream.get_raw_message(seq).await else { continue };
            let payload: &[u8] = m.payload.as_ref();
            if afflio_ingest::envelope::is_envelope(payload) {
                out.extend(afflio_ingest::envelope::decode(payload).unwrap().into_iter().map(str::to_string));
            } else {
                out.push(String::from_utf8(payload.to_vec()).unwrap());
            }
        }
        out
    })
}
