//! Shared harness for end-to-end tests: real `augur` processes on 127.0.0.x, real certificates.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use augur_proto::tls::{init_ca, issue};
use augur_proto::{Role, RpcClient, TlsIdentity};

pub const AUGUR: &str = env!("CARGO_BIN_EXE_augur");
/// How long a process may take to print its ready line (a cold RocksDB open, a slow CI box).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A temporary cluster directory: a CA and certificates issued from it on demand.
pub struct Cluster {
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(&dir.path().join("ca"), "test").expect("init ca");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Issues (once) and returns the TLS directory for `name` with `role`.
    pub fn tls(&self, role: Role, name: &str) -> PathBuf {
        let out = self.path().join("tls").join(name);
        if !out.join("cert.pem").exists() {
            issue(&self.path().join("ca"), role, name, &out).expect("issue cert");
        }
        out
    }

    pub fn client(&self, role: Role, name: &str) -> RpcClient {
        RpcClient::new(&TlsIdentity::load(&self.tls(role, name)).unwrap()).unwrap()
    }

    /// Starts a storage node on `ip` (port chosen by the OS) with its data under the cluster dir.
    pub fn node(&self, name: &str, ip: &str) -> NodeProc {
        let tls = self.tls(Role::Node, name);
        let data = self.path().join("data").join(name);
        NodeProc::spawn(&format!("{ip}:0"), &data, &tls, &[])
    }
}

/// A running `augur node serve` process; killed when dropped.
pub struct NodeProc {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub tls: PathBuf,
    extra: Vec<String>,
}

impl NodeProc {
    pub fn spawn(listen: &str, data: &Path, tls: &Path, extra: &[&str]) -> Self {
        // Node logs go to `<data>.log` (fault tests make nodes log expected errors); with
        // AUGUR_TEST_NODE_LOG set they go to the test's stderr at that filter instead.
        let stderr = match std::env::var_os("AUGUR_TEST_NODE_LOG") {
            Some(_) => Stdio::inherit(),
            None => {
                std::fs::create_dir_all(data.parent().expect("data dir has a parent"))
                    .expect("create data parent");
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.with_extension("log"))
                    .expect("open node log");
                Stdio::from(log)
            }
        };
        let mut child = Command::new(AUGUR)
            .args(["node", "serve", "--listen", listen, "--data-dir"])
            .arg(data)
            .arg("--tls")
            .arg(tls)
            .args(extra)
            // AUGUR_TEST_NODE_LOG sets the nodes' log filter when debugging a test.
            .env("RUST_LOG", std::env::var("AUGUR_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn augur node serve");
        let addr = wait_for_ready(&mut child, " serving on ");
        Self {
            child,
            addr,
            data: data.to_path_buf(),
            tls: tls.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `kill -9`: no flush, no goodbye.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
        self.child.wait().expect("wait for node")
    }

    /// Starts the node again on the same address and data directory (after `kill9` or `terminate`).
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let next = NodeProc::spawn(&self.addr.to_string(), &self.data, &self.tls, &extra);
        let old = std::mem::replace(self, next);
        drop(old); // already stopped: its Drop only reaps it
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the child's stdout until a line containing `marker`, and parses the address after it.
pub fn wait_for_ready(child: &mut Child, marker: &str) -> SocketAddr {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split(&marker).nth(1) {
                let _ = tx.send(rest.trim().to_string());
                break;
            }
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(addr) => addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?} in ready line: {e}")),
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            panic!("process did not become ready within {READY_TIMEOUT:?} (exit status: {status:?})");
        }
    }
}

/// Runs `augur ARGS` to completion and returns (success, stdout, stderr).
pub fn augur(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(AUGUR).args(args).env("RUST_LOG", "warn").output().expect("run augur");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
