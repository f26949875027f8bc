//! Tests that run part of themselves in other processes: the child is the test binary itself,
//! re-executed to run one `#[ignore]`d entry-point test (`--exact <test> --ignored`) with an
//! environment variable naming its role; without that variable the entry point returns at once,
//! so a normal run (or `--ignored`) does nothing.
//!
//! A child talks to its parent with marker lines on stdout ([`say`]; libtest prints its own
//! lines too); the parent talks to the child on its stdin ([`Kid::send`], and end of file by
//! [`Kid::finish`]). A [`Kid`] still running when dropped is killed.
//!
//! ```ignore
//! const CHILDREN: Children = Children::new("child_process", "DTS_MY_CHILD");
//!
//! #[test]
//! #[ignore = "helper: the tests of this file run it in child processes"]
//! fn child_process() {
//!     match CHILDREN.role().as_deref() {
//!         None => {}
//!         Some("worker") => { say("ready"); /* ... CHILDREN.var("QUEUE") ... */ }
//!         Some(other) => panic!("unknown child role {other:?}"),
//!     }
//! }
//!
//! let mut kid = CHILDREN.spawn("worker A", "worker", &[("QUEUE", queue)]);
//! kid.expect("ready", deadline);
//! ```
//!
//! The entry point must be a test of the binary that spawns the child, named by its full path
//! in that binary (a test `child_process` of a module `m` of a binary with several modules is
//! `m::child_process`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Instant;

/// Marks the lines of stdout that are messages to the parent (libtest prints its own lines,
/// and may print `test child_process ... ` just before the first message on the same line).
pub const MARK: &str = "@@dts@@ ";

/// How the children of one test binary are started: their entry-point test and the variable
/// that gives a child its role (`<role_var>_<NAME>` carries the rest of its configuration).
#[derive(Debug, Clone, Copy)]
pub struct Children {
    test: &'static str,
    role_var: &'static str,
}

impl Children {
    pub const fn new(test: &'static str, role_var: &'static str) -> Self {
        Children { test, role_var }
    }

    /// This process's role: `Some` in a child, `None` in a normal test run.
    pub fn role(&self) -> Option<String> {
        std::env::var(self.role_var).ok()
    }

    /// The child's setting `name` (given to [`Children::spawn`] in `env`), if set.
    pub fn try_var(&self, name: &str) -> Option<String> {
        std::env::var(format!("{}_{name}", self.role_var)).ok()
    }

    /// The child's setting `name`; panics if it is not set.
    pub fn var(&self, name: &str) -> String {
        self.try_var(name)
            .unwrap_or_else(|| panic!("{}_{name} not set", self.role_var))
    }

    /// The child's setting `name`, parsed.
    pub fn var_num<T: std::str::FromStr>(&self, name: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.var(name).parse().unwrap()
    }

    /// Starts this test binary as a child with `role` and the settings `env`; `name` names it
    /// in failure messages.
    pub fn spawn(&self, name: &str, role: &str, env: &[(&str, String)]) -> Kid {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            self.test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(self.role_var, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(format!("{}_{k}", self.role_var), v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find(MARK) {
                    if tx.send(line[at + MARK.len()..].to_owned()).is_err() {
                        break;
                    }
                }
            }
            // Dropping `tx` tells the parent the child's stdout closed: it exited.
        });
        Kid {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            messages,
        }
    }
}

/// In a child: sends `message` to the parent.
pub fn say(message: impl std::fmt::Display) {
    // stdout is line-buffered: each message reaches the parent when it is printed.
    println!("{MARK}{message}");
}

/// A child process of this test binary; killed on drop if still running.
pub struct Kid {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    messages: Receiver<String>,
}

impl Kid {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next message, failing at `deadline` or if the child exits first.
    pub fn recv(&mut self, deadline: Instant) -> String {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.messages.recv_timeout(left) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => panic!("{}: no message by the deadline", self.name),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("{}: exited early: {:?}", self.name, self.child.wait())
            }
        }
    }

    /// The next message, which must start with `prefix`; returns the rest.
    pub fn expect(&mut self, prefix: &str, deadline: Instant) -> String {
        let m = self.recv(deadline);
        match m.strip_prefix(prefix) {
            Some(rest) => rest.trim().to_owned(),
            None => panic!("{}: expected {prefix:?}, got {m:?}", self.name),
        }
    }

    /// The next message starting with `prefix`, skipping others; returns the rest.
    pub fn until(&mut self, prefix: &str, deadline: Instant) -> String {
        loop {
            let m = self.recv(deadline);
            if let Some(rest) = m.strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Writes `line` to the child's stdin.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes the child's stdin (end of file), without waiting for it to exit.
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Panics if the child has exited (for polling loops that wait on something else).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{}: exited early: {status}", self.name);
        }
    }

    /// Closes stdin, collects the child's last messages until its stdout closes, and checks it
    /// exited successfully.
    pub fn finish(&mut self, deadline: Instant) -> Vec<String> {
        self.close_stdin();
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m) => rest.push(m),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("{}: did not exit in time", self.name),
            }
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{}: {status}", self.name);
        rest
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
