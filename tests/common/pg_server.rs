//! A throwaway PostgreSQL 15 server for one test: `initdb` into a temp dir (as the `postgres`
//! user when the tests run as root), a free port on 127.0.0.1, a unix socket in the temp dir.
//! Dropping the [`PgServer`] stops it (`pg_ctl stop -m immediate`) and removes the directory,
//! also when the test panics.
//!
//! ```ignore
//! let server = PgServer::builder().tls().hba(PgServer::HBA_TLS_ONLY).start();
//! let url = server.url("postgres", "sslmode=require");
//! server.psql("postgres", "SELECT 1");
//! ```

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where Debian's PostgreSQL 15 binaries are (`scripts/test` installs them when missing).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// What to change before the first start.
#[derive(Debug, Default, Clone)]
pub struct PgServerBuilder {
    settings: Vec<(String, String)>,
    hba: Option<String>,
    tls: bool,
}

impl PgServerBuilder {
    /// A `postgresql.conf` setting (`value` is written as is: quote strings yourself).
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Replaces `pg_hba.conf` with `contents`.
    pub fn hba(mut self, contents: &str) -> Self {
        self.hba = Some(contents.to_owned());
        self
    }

    /// `ssl = on` with a self-signed certificate (CN `localhost`, SAN IP 127.0.0.1) made with
    /// `openssl` in the server's temp dir.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Runs `initdb`, applies the changes and starts the server.
    pub fn start(self) -> PgServer {
        let as_root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let dir = tempfile::Builder::new()
            .prefix("dts-pg-server.")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let server = PgServer { dir, port, as_root };
        if as_root {
            let mut chown = Command::new("chown");
            chown.arg("postgres").arg(server.dir());
            server.run(chown);
        }
        let mut initdb = server.tool("initdb");
        initdb.arg("-D").arg(server.data()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        server.run(initdb);
        let mut settings = self.settings;
        if self.tls {
            let (cert, key) = server.make_certificate();
            settings.push(("ssl".into(), "on".into()));
            settings.push(("ssl_cert_file".into(), format!("'{}'", cert.display())));
            settings.push(("ssl_key_file".into(), format!("'{}'", key.display())));
        }
        if !settings.is_empty() {
            use std::io::Write;
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(server.data().join("postgresql.conf"))
                .unwrap();
            for (name, value) in &settings {
                writeln!(conf, "{name} = {value}").unwrap();
            }
        }
        if let Some(hba) = &self.hba {
            // Truncating keeps the file's owner (postgres).
            std::fs::write(server.data().join("pg_hba.conf"), hba).unwrap();
        }
        server.start();
        server
    }
}

/// A running throwaway server; see the module docs.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
    as_root: bool,
}

impl PgServer {
    /// `pg_hba.conf` that accepts the superuser on the unix socket and, on TCP, only TLS.
    pub const HBA_TLS_ONLY: &'static str = "\
        local all postgres trust\n\
        hostssl all all 127.0.0.1/32 trust\n";

    pub fn builder() -> PgServerBuilder {
        PgServerBuilder::default()
    }

    /// A default server: trust on the socket and on TCP, no TLS.
    pub fn start_new() -> Self {
        Self::builder().start()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir: the unix socket and `server.log` are here, the cluster in `data/`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// `postgres://postgres@127.0.0.1:<port>/<db>`, with `?<params>` unless empty.
    pub fn url(&self, db: &str, params: &str) -> String {
        let mut url = format!("postgres://postgres@127.0.0.1:{}/{db}", self.port);
        if !params.is_empty() {
            url.push('?');
            url.push_str(params);
        }
        url
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("server.log")).unwrap_or_default()
    }

    /// A PostgreSQL tool, run as the `postgres` user when we are root, in the temp dir.
    pub fn tool(&self, name: &str) -> Command {
        let path = format!("{PG_BIN}/{name}");
        self.as_postgres(&path)
    }

    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        cmd.current_dir(self.dir()).stdin(Stdio::null());
        cmd
    }

    /// Runs `cmd`, failing the test (with the server log) if it fails; returns its stdout.
    #[track_caller]
    pub fn run(&self, mut cmd: Command) -> String {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sql` with `psql` as the superuser over the unix socket; returns the unaligned,
    /// tuples-only output, trimmed.
    #[track_caller]
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.tool("psql");
        cmd.arg("-X")
            .arg("-h")
            .arg(self.dir())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-qAt", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        self.run(cmd).trim().to_owned()
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir().display()
        );
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir().join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        self.run(cmd);
    }

    /// `pg_ctl stop -m <mode>`, waiting until the server is down.
    pub fn stop(&self, mode: &str) {
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "-t", "60", "stop"]);
        self.run(cmd);
    }

    pub fn is_running(&self) -> bool {
        self.data().join("postmaster.pid").exists()
    }

    /// A self-signed certificate and its key (mode 0600, owned by the server's user) in
    /// `<dir>/tls`.
    fn make_certificate(&self) -> (PathBuf, PathBuf) {
        let tls = self.dir().join("tls");
        std::fs::create_dir(&tls).unwrap();
        if self.as_root {
            let mut chown = Command::new("chown");
            chown.arg("postgres").arg(&tls);
            self.run(chown);
        }
        let (cert, key) = (tls.join("server.crt"), tls.join("server.key"));
        let mut openssl = self.as_postgres("openssl");
        openssl
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert);
        self.run(openssl);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self
                .tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "immediate", "-w", "-t", "60", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // The TempDir field is dropped after this: the directory is removed.
    }
}
