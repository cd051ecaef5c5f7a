//! PostgreSQL for the store tests: a fresh database per test, on the server named by
//! `TOONBOT_TEST_POSTGRES_URL` (a URL whose user may create databases), else on a throwaway
//! cluster started here from the PostgreSQL binaries (`initdb`, `postgres`, `pg_ctl`: on the
//! PATH, else Debian's `/usr/lib/postgresql/<version>/bin`), shared by the tests of one test
//! binary that run at the same time and stopped when the last of them ends. As root, the
//! cluster runs as the `postgres` user (else `nobody`): PostgreSQL refuses to run as root.
//! Without either, [`database`] prints a `SKIPPED` line and returns `None`.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

/// The variable naming an outside server.
pub const URL_VAR: &str = "TOONBOT_TEST_POSTGRES_URL";

/// A new, empty database for one test. On an outside server it is dropped at the end.
pub struct TestDatabase {
    url: String,
    name: String,
    /// The outside server's URL (for the drop), or the local cluster kept alive.
    owner: Owner,
}

enum Owner {
    Outside(String),
    Local(#[allow(dead_code)] Arc<LocalPostgres>),
}

impl TestDatabase {
    /// `postgres://.../<database>`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Owner::Outside(server) = &self.owner else {
            return; // the cluster goes with its last user
        };
        let (server, name) = (server.clone(), self.name.clone());
        // Drop runs inside the test's runtime: the drop gets a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&server).await.ok()?;
                let force = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                if conn.execute(sqlx::AssertSqlSafe(force)).await.is_err() {
                    // Before PostgreSQL 13.
                    let plain = format!("DROP DATABASE IF EXISTS \"{name}\"");
                    conn.execute(sqlx::AssertSqlSafe(plain)).await.ok()?;
                }
                conn.close().await.ok()
            })
        })
        .join();
    }
}

/// A new database for `test`, or `None` (with a `SKIPPED` line) where there is no PostgreSQL.
/// Panics when a server is there but does not work.
pub async fn database(test: &str) -> Option<TestDatabase> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let (server_url, owner) = match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => (url.clone(), Owner::Outside(url)),
        _ => match local_server() {
            Some(server) => (server.url("postgres"), Owner::Local(server)),
            None => {
                eprintln!("SKIPPED {test}: no PostgreSQL (set {URL_VAR} or install postgresql)");
                return None;
            }
        },
    };
    let name = format!(
        "toonbot_test_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    // A cluster just started may still refuse connections for a moment.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match PgConnection::connect(&server_url).await {
            Ok(conn) => break conn,
            Err(e) if Instant::now() > deadline => {
                panic!("{test}: connecting to PostgreSQL at {server_url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .await
        .unwrap_or_else(|e| panic!("{test}: creating database {name}: {e}"));
    conn.close().await.ok();
    Some(TestDatabase {
        url: with_database(&server_url, &name),
        name,
        owner,
    })
}

/// `url` with its path (the database) replaced by `/name`, its query kept.
pub fn with_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let query = rest[authority_end..]
        .find('?')
        .map_or("", |i| &rest[authority_end + i..]);
    format!("{scheme}://{}/{name}{query}", &rest[..authority_end])
}

/// The running local cluster, or a new one; `None` without the PostgreSQL binaries.
fn local_server() -> Option<Arc<LocalPostgres>> {
    static SERVER: Mutex<Weak<LocalPostgres>> = Mutex::new(Weak::new());
    let bin = binaries()?;
    let mut shared = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(server) = shared.upgrade() {
        return Some(server);
    }
    let server =
        Arc::new(LocalPostgres::start(&bin).unwrap_or_else(|e| panic!("starting PostgreSQL: {e}")));
    *shared = Arc::downgrade(&server);
    Some(server)
}

/// The folder holding `initdb`, `postgres` and `pg_ctl`.
fn binaries() -> Option<PathBuf> {
    let has_all = |dir: &Path| {
        ["initdb", "postgres", "pg_ctl"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .find(|dir| has_all(dir));
    on_path.or_else(|| {
        // Debian's packages keep them off the PATH; the newest version wins.
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| {
                let e = e.ok()?;
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, dir)| has_all(dir))
            .collect();
        versions.sort();
        versions.pop().map(|(_, dir)| dir)
    })
}

/// A throwaway cluster on a free loopback port, trusting every local connection.
struct LocalPostgres {
    child: Child,
    bin: PathBuf,
    port: u16,
    /// `(uid, gid)` it runs as, when this process is root.
    user: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl LocalPostgres {
    fn start(bin: &Path) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("toonbot-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let user = if std::fs::metadata("/proc/self")
            .map_err(|e| e.to_string())?
            .uid()
            == 0
        {
            let ids = passwd_ids("postgres").or_else(|| passwd_ids("nobody"));
            let ids = ids.ok_or("running as root, with neither a postgres nor a nobody user")?;
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .map_err(|e| e.to_string())?;
            Some(ids)
        } else {
            None
        };
        let data = dir.path().join("data");
        let log = dir.path().join("log");
        let out = as_user(Command::new(bin.join("initdb")), user, dir.path())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .args(["--locale=C", "-D"])
            .arg(&data)
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
            let mut child = as_user(Command::new(bin.join("postgres")), user, dir.path())
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(dir.path())
                .args(["-p", &port.to_string()])
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=200",
                ])
                .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"])
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .map_err(|e| format!("starting postgres: {e}"))?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Self {
                        child,
                        bin: bin.to_path_buf(),
                        port,
                        user,
                        dir,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_error = std::fs::read_to_string(&log).unwrap_or_default();
        }
        Err(format!("postgres did not start: {last_error}"))
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // An immediate shutdown: the cluster is thrown away.
        let stopped = as_user(
            Command::new(self.bin.join("pg_ctl")),
            self.user,
            self.dir.path(),
        )
        .args(["stop", "-m", "immediate", "-w", "-D"])
        .arg(self.dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `command` run as `user` (when set), in `dir`.
fn as_user(mut command: Command, user: Option<(u32, u32)>, dir: &Path) -> Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command.current_dir(dir);
    command
}

/// A local user's `(uid, gid)`, from `/etc/passwd`.
fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}
