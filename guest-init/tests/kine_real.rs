//! `openshell-init phase kine` against real kine, the datastore k3s embeds (the pinned build
//! `cargo xtask peers` makes, named by `OPENSHELL_TEST_KINE`). kine writes a gateway's worth of
//! keys with history (pods, events, leases, endpoint slices, config maps, secrets, custom
//! resources, updates and deletes), compacts, and is SIGKILLed in the middle of a burst of
//! writes. The phase prunes copies of what it left, under the boot policy and with pods pruned as
//! well; kine started again on each result must come up without a complaint, serve every kept
//! key at its latest value and revisions and nothing under a pruned prefix, keep its current
//! revision, take new writes above the old maximum, compact, and serve a watch from its current
//! revision. Also: the schema fixture is the schema kine creates.
//!
//! Stand-in: none. Compared with k3s's kine only the compaction window differs (see
//! [`KINE_ARGS`]); k3s talks to kine over the same socket with the same etcd API.

#[allow(dead_code)]
#[path = "support/kine_peer.rs"]
mod kine_peer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kine_peer::{gateway_keys, object, Kine, Kv, LEADERS, NODE_LEASE, PODS};
use openshell_shared::config::Kine as Policy;
use rusqlite::Connection;

const BIN: &str = env!("CARGO_BIN_EXE_openshell-init");
/// k3s's server directory under a root; kine's database is `db/state.db` in it (KINE_DB).
const SERVER: &str = "var/lib/rancher/k3s/server";
/// kine never compacts its newest 1000 revisions by default; a window of 20 lets a few hundred
/// writes show a compaction that deletes rows. The compaction itself is kine's.
const KINE_ARGS: &[&str] = &["--compact-min-retain", "20"];

/// The phase needs root (it runs in private namespaces); say so instead of failing elsewhere.
fn kine_and_root() -> Option<PathBuf> {
    let kine = kine_peer::from_env()?;
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        let why = "needs root: the phase runs in private namespaces";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return None;
    }
    Some(kine)
}

/// What kine acknowledged: every key's latest state (`None`: deleted).
#[derive(Default)]
struct Model {
    keys: BTreeMap<String, Option<Kv>>,
    writes: usize,
}

impl Model {
    fn record(&mut self, key: &str, value: Vec<u8>, rev: i64) {
        let create = match self.keys.get(key) {
            Some(Some(kv)) => kv.create_revision,
            _ => rev,
        };
        let kv = Kv {
            key: key.to_string(),
            value,
            create_revision: create,
            mod_revision: rev,
        };
        self.keys.insert(key.to_string(), Some(kv));
        self.writes += 1;
    }

    fn put(&mut self, kine: &Kine, key: &str) {
        let value = object(key, self.writes);
        let rev = kine
            .put(key, &value)
            .unwrap_or_else(|e| panic!("put {key}: {e}\n{}", kine.log()));
        self.record(key, value, rev);
    }

    fn delete(&mut self, kine: &Kine, key: &str) {
        kine.delete(key)
            .unwrap_or_else(|e| panic!("delete {key}: {e}\n{}", kine.log()));
        self.keys.insert(key.to_string(), None);
        self.writes += 1;
    }
}

/// The objects a gateway's cluster holds, each written once.
fn objects(kine: &Kine, m: &mut Model) {
    for key in gateway_keys() {
        m.put(kine, &key);
    }
}

/// What a running cluster writes most: lease renewals, pod status, events.
fn quiet_round(kine: &Kine, m: &mut Model, i: usize) {
    m.put(kine, NODE_LEASE);
    m.put(
        kine,
        &format!("/registry/leases/{}", LEADERS[i % LEADERS.len()]),
    );
    m.put(kine, &format!("/registry/pods/{}", PODS[i % PODS.len()]));
    m.put(
        kine,
        &format!("/registry/events/openshell/openshell-0.{i:x}"),
    );
}

/// A busier round: the quiet writes plus node status, endpoint slices, configuration.
fn round(kine: &Kine, m: &mut Model, i: usize) {
    quiet_round(kine, m, i);
    if i.is_multiple_of(3) {
        // An event seen again: its count goes up.
        m.put(
            kine,
            &format!("/registry/events/openshell/openshell-0.{:x}", i / 3),
        );
    }
    if i.is_multiple_of(5) {
        m.put(kine, "/registry/masterleases/192.168.127.2");
        m.put(kine, "/registry/minions/openshell-vm");
        m.put(kine, "/registry/endpointslices/openshell/openshell-x7k2p");
    }
    if i.is_multiple_of(8) {
        m.put(kine, "/registry/configmaps/openshell/openshell-config");
        m.put(
            kine,
            "/registry/helm.cattle.io/helmcharts/kube-system/openshell",
        );
    }
}

/// Writes in a loop from another thread until kine dies under them; returns the write that was
/// in flight (it may or may not have been committed).
fn burst_then_kill(kine: &Kine, model: &Mutex<Model>) -> (String, Vec<u8>) {
    let acknowledged = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 0.. {
                let key = match i % 3 {
                    0 => NODE_LEASE.to_string(),
                    1 => format!("/registry/pods/{}", PODS[i % PODS.len()]),
                    _ => format!("/registry/events/openshell/burst.{i:x}"),
                };
                let value = object(&key, 10_000 + i);
                match kine.put(&key, &value) {
                    Ok(rev) => {
                        model.lock().expect("model").record(&key, value, rev);
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => return (key, value),
                }
            }
            unreachable!()
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while acknowledged.load(Ordering::SeqCst) < 30 {
            assert!(Instant::now() < deadline, "the burst stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        kine.sigkill().expect("SIGKILL kine");
        writer.join().expect("writer")
    })
}

/// kine's files as the kill left them, copied into a new root.
fn root_with(killed: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tmp");
    let db = root.path().join(SERVER).join("db");
    std::fs::create_dir_all(&db).expect("mkdir");
    for name in ["state.db", "state.db-wal", "state.db-shm"] {
        if killed.join(name).exists() {
            std::fs::copy(killed.join(name), db.join(name)).expect("copy");
        }
    }
    root
}

/// Runs the phase on `root`: its log line, or the failure's output.
fn phase(root: &Path, config: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(BIN);
    cmd.args(["phase", "kine", "--root"]).arg(root);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.output().expect("run openshell-init");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let finished_ok = stdout.contains(r#""kind":"ok""#);
    if out.status.success() && finished_ok {
        Ok(stdout)
    } else {
        Err(format!("{}\n{stdout}{stderr}", out.status))
    }
}

/// Every key kine serves, by key; and its revision.
fn everything(kine: &Kine) -> (i64, BTreeMap<String, Kv>) {
    let range = kine.range("", None).expect("range");
    let keys = range
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    (range.revision, keys)
}

fn pruned(key: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

/// A running kine after the phase, checked against `baseline` (what kine served from the
/// unpruned copy) and the killed database's newest revision.
fn check_restart(
    kine: &Kine,
    baseline: &BTreeMap<String, Kv>,
    newest: i64,
    prefixes: &[String],
    what: &str,
) {
    assert_eq!(
        kine.complaints(),
        Vec::<String>::new(),
        "{what}: kine's start"
    );
    let (revision, served) = everything(kine);
    let expected: BTreeMap<String, Kv> = baseline
        .iter()
        .filter(|(k, _)| !pruned(k, prefixes))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let differing: Vec<&String> = expected
        .keys()
        .chain(served.keys())
        .filter(|k| expected.get(*k) != served.get(*k))
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: keys served differently after pruning: {differing:?}"
    );
    for prefix in prefixes {
        let left = kine.range(prefix, None).expect("range");
        assert!(left.kvs.is_empty(), "{what}: {prefix} lists {:?}", left.kvs);
    }
    assert_eq!(revision, newest, "{what}: the current revision moved");
    // New writes land above the old maximum.
    let key = "/registry/configmaps/openshell/after-restart";
    let rev = kine.put(key, &object(key, 1)).expect("put");
    assert!(
        rev > newest,
        "{what}: new write at {rev}, old maximum {newest}"
    );
    // Compaction (to 20 below the newest) works on the pruned history.
    kine.compact(rev).expect("compact");
    let err = kine.range("/registry/", Some(rev - 21)).unwrap_err();
    assert!(err.contains("compacted"), "{what}: {err}");
    kine.range("/registry/", Some(rev - 20))
        .expect("the compaction revision itself is readable");
    // A watch from the current revision sees the next write, and only it.
    let current = kine
        .range("/registry/namespaces/", None)
        .expect("range")
        .revision;
    let mut watch = kine.watch("/registry/", current + 1).expect("watch");
    std::thread::sleep(Duration::from_millis(300));
    let key = "/registry/pods/openshell/sandbox-after-restart";
    let value = object(key, 2);
    let rev = kine.put(key, &value).expect("put");
    let event = watch.next(Duration::from_secs(10)).expect("watch event");
    assert!(!event.delete);
    assert_eq!(
        (event.kv.key.as_str(), event.kv.mod_revision, event.kv.value),
        (key, rev, value),
        "{what}"
    );
    // Only the read this test made at a compacted revision may have been logged.
    let complaints: Vec<String> = kine
        .complaints()
        .into_iter()
        .filter(|l| !l.contains("required revision has been compacted"))
        .collect();
    assert_eq!(complaints, Vec::<String>::new(), "{what}");
}

/// What kine serves from an unpruned copy of the killed database. It must hold every write
/// kine acknowledged (the one in flight at the kill may or may not be there), at revision
/// `newest`, and start without a complaint.
fn baseline(
    bin: &Path,
    killed: &Path,
    m: &Model,
    in_flight: &(String, Vec<u8>),
    newest: i64,
) -> BTreeMap<String, Kv> {
    let base = root_with(killed);
    let kine = Kine::start(bin, &base.path().join(SERVER), KINE_ARGS).expect("kine");
    let (revision, baseline) = everything(&kine);
    assert_eq!(revision, newest);
    assert_eq!(kine.complaints(), Vec::<String>::new());
    for (key, state) in &m.keys {
        let served = baseline.get(key);
        if *key == in_flight.0 && served.map(|kv| &kv.value) == Some(&in_flight.1) {
            continue;
        }
        assert_eq!(served, state.as_ref(), "{key}");
    }
    kine.stop().expect("stop");
    baseline
}

#[test]
fn pruned_databases_are_served_by_real_kine() {
    let Some(bin) = kine_and_root() else { return };
    let first = tempfile::tempdir().expect("tmp");
    let server = first.path().join(SERVER);
    let kine = Kine::start(&bin, &server, KINE_ARGS).expect("kine");
    let mut m = Model::default();
    objects(&kine, &mut m);
    for i in 0..24 {
        round(&kine, &mut m, i);
    }
    m.delete(&kine, "/registry/pods/openshell/openshell-install-z9x8w");
    m.delete(&kine, "/registry/events/openshell/openshell-0.1");
    let auth = "/registry/configmaps/kube-system/extension-apiserver-authentication";
    m.delete(&kine, auth);
    m.put(&kine, auth);
    for i in 24..48 {
        round(&kine, &mut m, i);
    }
    // Then the cluster is quiet: what it writes is all stale after a restart, the compaction's
    // revision among it. With pods pruned too, every row since then goes.
    for i in 48..56 {
        quiet_round(&kine, &mut m, i);
    }
    let current = kine
        .range("/registry/minions/", None)
        .expect("range")
        .revision;
    kine.compact(current).expect("compact");
    let err = kine.range("/registry/", Some(current - 21)).unwrap_err();
    assert!(err.contains("compacted"), "{err}");
    for i in 56..60 {
        quiet_round(&kine, &mut m, i);
    }
    let model = Mutex::new(m);
    let in_flight = burst_then_kill(&kine, &model);
    kine.kill().expect("reap kine");
    let m = model.into_inner().expect("model");
    let killed = server.join("db");
    let newest: i64 = Connection::open(root_with(&killed).path().join(SERVER).join("db/state.db"))
        .and_then(|c| c.query_row("SELECT max(id) FROM kine", [], |r| r.get(0)))
        .expect("newest revision");

    let baseline = baseline(&bin, &killed, &m, &in_flight, newest);

    let boot = Policy::default();
    let build = boot.pruning_pods();
    assert!(baseline.keys().any(|k| pruned(k, &[Policy::PODS.into()])));
    let config = tempfile::NamedTempFile::new().expect("tmp");
    let prefixes: String = build
        .prune_prefixes
        .iter()
        .map(|p| format!("    - {p}\n"))
        .collect();
    std::fs::write(
        config.path(),
        format!("kine:\n  prune_prefixes:\n{prefixes}"),
    )
    .expect("write");
    for (what, policy, config) in [
        ("boot policy", &boot, None),
        ("pods pruned too", &build, Some(config.path())),
    ] {
        let root = root_with(&killed);
        let log = phase(root.path(), config).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(log.contains("pruned /registry/"), "{what}: {log}");
        assert!(
            log.contains("/registry/pods/") == (what == "pods pruned too"),
            "{what}: {log}"
        );
        let kine = Kine::start(&bin, &root.path().join(SERVER), KINE_ARGS).expect("kine");
        check_restart(&kine, &baseline, newest, &policy.prune_prefixes, what);
        kine.stop().expect("stop");
    }

    // A configuration that does not load is an error, and the database is left as it was.
    let root = root_with(&killed);
    std::fs::write(config.path(), "kine:\n  prune_prefixes: [/]\n").expect("write");
    let db = root.path().join(SERVER).join("db/state.db");
    let before = std::fs::read(&db).expect("read");
    let err = phase(root.path(), Some(config.path())).unwrap_err();
    assert!(err.contains("kine.prune_prefixes[0]"), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), before);
}

/// The tables and indexes of a database, each with its SQL, whitespace dropped.
fn schema(db: &Path) -> Vec<(String, String, String)> {
    let conn = Connection::open(db).expect("open");
    let mut stmt = conn
        .prepare(
            "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name",
        )
        .expect("prepare");
    stmt.query_map([], |r| {
        let sql: String = r.get(2)?;
        Ok((r.get(0)?, r.get(1)?, sql.split_whitespace().collect()))
    })
    .expect("query")
    .map(|r| r.expect("row"))
    .collect()
}

#[test]
fn the_schema_fixture_is_what_kine_creates() {
    let Some(bin) = kine_peer::from_env() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tmp");
    let kine = Kine::start(&bin, dir.path(), &[]).expect("kine");
    let db = kine.db();
    kine.stop().expect("stop");
    let fixture = dir.path().join("fixture.db");
    Connection::open(&fixture)
        .and_then(|c| c.execute_batch(include_str!("fixtures/kine-schema.sql")))
        .expect("fixture schema");
    let real = schema(&db);
    assert!(
        real.iter()
            .any(|(t, n, _)| t == "index" && n == "kine_name_index"),
        "{real:?}"
    );
    assert_eq!(
        schema(&fixture),
        real,
        "fixtures/kine-schema.sql differs from kine's"
    );
}
