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
        self.node_with(name, ip, &[])
    }

    /// `node` with extra `augur node serve` flags (kept across restarts).
    pub fn node_with(&self, name: &str, ip: &str, extra: &[&str]) -> NodeProc {
        let tls = self.tls(Role::Node, name);
        let data = self.path().join("data").join(name);
        NodeProc::spawn(&format!("{ip}:0"), &data, &tls, extra)
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
        interrupt(&mut self.child, nix::sys::signal::Signal::SIGTERM)
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

/// A running `augur meta serve` process on a fixed address; killed when dropped.
pub struct MetaProc {
    pub child: Child,
    pub id: u64,
    pub addr: SocketAddr,
    pub data: PathBuf,
    args: Vec<String>,
}

impl MetaProc {
    /// Starts member `id` listening on `addr` with `peers` (`ID=ADDR,...`) and `extra` flags.
    pub fn spawn(cluster: &Cluster, id: u64, addr: SocketAddr, peers: &str, extra: &[&str]) -> Self {
        let tls = cluster.tls(Role::Meta, &format!("meta-{id}"));
        let data = cluster.path().join("data").join(format!("meta-{id}-{}", addr.ip()));
        let mut args: Vec<String> = ["meta", "serve", "--id", &id.to_string(), "--listen", &addr.to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--peers".into(), peers.into(), "--data-dir".into(), data.display().to_string()]);
        args.extend(["--tls".into(), tls.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start(id, addr, data, args)
    }

    fn start(id: u64, addr: SocketAddr, data: PathBuf, args: Vec<String>) -> Self {
        std::fs::create_dir_all(data.parent().unwrap()).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(data.with_extension("log")).unwrap();
        let mut child = Command::new(AUGUR)
            .args(&args)
            .env("RUST_LOG", std::env::var("AUGUR_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn augur meta serve");
        let bound = wait_for_ready(&mut child, " serving on ");
        assert_eq!(bound, addr);
        Self { child, id, addr, data, args }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        interrupt(&mut self.child, nix::sys::signal::Signal::SIGTERM)
    }

    /// Starts the member again with the same flags plus `extra` (e.g. `--join` after a wipe).
    pub fn restart(&mut self, extra: &[&str]) {
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let next = Self::start(self.id, self.addr, self.data.clone(), args);
        drop(std::mem::replace(self, next));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for MetaProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `n` meta members on `{net}.1:7000`, `{net}.2:7000`, ... Returns them and the
/// comma-separated address list.
pub fn meta_group(cluster: &Cluster, net: &str, n: u64, extra: &[&str]) -> (Vec<MetaProc>, String) {
    let addr = |i: u64| -> SocketAddr { format!("{net}.{i}:7000").parse().unwrap() };
    let peers: Vec<String> = (1..=n).map(|i| format!("{i}={}", addr(i))).collect();
    let peers = peers.join(",");
    let members: Vec<MetaProc> =
        (1..=n).map(|i| MetaProc::spawn(cluster, i, addr(i), &peers, extra)).collect();
    let addrs: Vec<String> = members.iter().map(|m| m.addr.to_string()).collect();
    (members, addrs.join(","))
}

/// An in-process meta client with the given role.
pub fn meta_client(cluster: &Cluster, role: Role, addrs: &str) -> std::sync::Arc<augur_meta::MetaClient> {
    let rpc = std::sync::Arc::new(cluster.client(role, &format!("{role}-test")));
    std::sync::Arc::new(augur_meta::MetaClient::new(rpc, augur_meta::parse_addrs(addrs).unwrap()))
}

/// A member's own view of the group.
pub async fn meta_status(rpc: &RpcClient, addr: SocketAddr) -> Option<augur_proto::meta::MetaStatus> {
    match rpc
        .call_with_deadline(addr, augur_proto::msg::RequestBody::MetaStatus, Duration::from_secs(2))
        .await
    {
        Ok(augur_proto::msg::ResponseBody::MetaStatus(s)) => Some(*s),
        _ => None,
    }
}

/// Flips the last byte of the stored value of each block `pick` chooses (given its rank in key
/// order and its key) in a stopped node's RocksDB, leaving RocksDB's own structures intact: the
/// block's own CRC is what catches it. Returns how many values it damaged.
pub fn damage_values(data: &Path, pick: impl Fn(usize, &[u8]) -> bool) -> usize {
    use augur_storage_node::store::{ALL_CFS, BLOCKS_CF};
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), data, ALL_CFS).unwrap();
    let cf = db.cf_handle(BLOCKS_CF).unwrap();
    let mut damaged = Vec::new();
    for (rank, item) in db.iterator_cf(cf, rocksdb::IteratorMode::Start).enumerate() {
        let (key, value) = item.unwrap();
        if pick(rank, &key) {
            let mut value = value.into_vec();
            *value.last_mut().unwrap() ^= 0x01;
            damaged.push((key, value));
        }
    }
    for (key, value) in &damaged {
        db.put_cf(cf, key, value).unwrap();
    }
    db.flush_cf(cf).unwrap();
    damaged.len()
}

/// Flips a byte every 64 KiB through the RocksDB blob files in a stopped node's data directory
/// (what a bad disk does); returns how many bytes it flipped.
pub fn damage_blob_files(data: &Path) -> usize {
    let mut flipped = 0;
    for entry in std::fs::read_dir(data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "blob") {
            let mut bytes = std::fs::read(&path).unwrap();
            let mut pos = 4096;
            while pos < bytes.len().saturating_sub(4096) {
                bytes[pos] ^= 0xFF;
                pos += 64 * 1024;
                flipped += 1;
            }
            std::fs::write(&path, bytes).unwrap();
        }
    }
    assert!(flipped > 0, "no blob file found to damage in {}", data.display());
    flipped
}

/// Polls until `cond` holds, failing the test with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the child's stdout until a line containing `marker`; keeps draining afterwards.
pub fn wait_for_line(child: &mut Child, marker: &str) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            seen.push(line.clone());
            if line.contains(&marker) {
                let _ = tx.send(Ok(line));
                break;
            }
        }
        let _ = tx.send(Err(seen));
        for _ in lines {}
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(line)) => line,
        Ok(Err(seen)) => panic!("process exited before its ready line: {seen:?} ({:?})", child.try_wait()),
        Err(_) => panic!("no ready line within {READY_TIMEOUT:?}"),
    }
}

fn interrupt(child: &mut Child, signal: nix::sys::signal::Signal) -> ExitStatus {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    child.wait().expect("wait for child")
}

/// A running `augur dev` (3 meta members, 3 nodes, the default volume mounted) in one process.
pub struct DevProc {
    pub child: Child,
    pub state: PathBuf,
    pub mnt: PathBuf,
    pub ip: String,
}

impl DevProc {
    pub fn start(state: &Path, mnt: &Path, ip: &str) -> Self {
        Self::start_with(state, mnt, ip, &[])
    }

    /// `start` with more `augur dev` arguments.
    pub fn start_with(state: &Path, mnt: &Path, ip: &str, extra: &[&str]) -> Self {
        std::fs::create_dir_all(state).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(state.join("dev.log")).unwrap();
        let mut child = Command::new(AUGUR)
            .arg("dev")
            .arg(mnt)
            .arg("--state")
            .arg(state)
            .args(["--ip", ip])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AUGUR_TEST_NODE_LOG").unwrap_or_else(|_| "info,fuser=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn augur dev");
        wait_for_line(&mut child, "Ctrl-C unmounts");
        Self { child, state: state.into(), mnt: mnt.into(), ip: ip.into() }
    }

    /// Ctrl-C: unmount, stop, exit cleanly.
    pub fn stop(&mut self) -> ExitStatus {
        interrupt(&mut self.child, nix::sys::signal::Signal::SIGINT)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("dev.log")).unwrap_or_default()
    }
}

impl Drop for DevProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        lazy_unmount(&self.mnt);
    }
}

/// A running `augur mount`; unmounted (SIGTERM) when dropped.
pub struct MountProc {
    pub child: Child,
    pub mnt: PathBuf,
}

impl MountProc {
    pub fn start(cluster: &Cluster, meta: &str, volume: &str, mnt: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(mnt).unwrap();
        let tls = cluster.tls(Role::Client, "mount");
        let log_path =
            cluster.path().join(format!("mount-{}.log", mnt.file_name().unwrap().to_string_lossy()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
        let mut child = Command::new(AUGUR)
            .arg("mount")
            .arg(volume)
            .arg(mnt)
            .args(["--meta", meta, "--tls"])
            .arg(&tls)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("AUGUR_TEST_NODE_LOG").unwrap_or_else(|_| "info,fuser=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn augur mount");
        wait_for_line(&mut child, "augur mounted");
        Self { child, mnt: mnt.into() }
    }

    pub fn stop(&mut self) -> ExitStatus {
        interrupt(&mut self.child, nix::sys::signal::Signal::SIGTERM)
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
        lazy_unmount(&self.mnt);
    }
}

/// Detaches a mount left behind by a failed test (harmless when nothing is mounted).
pub fn lazy_unmount(mnt: &Path) {
    let _ = Command::new("umount").arg("-l").arg(mnt).stderr(Stdio::null()).status();
}

/// Runs `sh -c SCRIPT` in `dir`; returns (success, stdout + stderr).
pub fn sh(dir: &Path, script: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("run sh");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `sh -c SCRIPT` in `dir`, panicking with its output unless it succeeds.
pub fn sh_ok(dir: &Path, script: &str) -> String {
    let (ok, out) = sh(dir, script);
    assert!(ok, "`{script}` failed in {}:\n{out}", dir.display());
    out
}

/// Runs `sh -c SCRIPT` as `uid:gid` (supplementary groups `groups`) via setpriv.
pub fn sh_as(dir: &Path, uid: u32, gid: u32, groups: &[u32], script: &str) -> (bool, String) {
    let groups = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups={}", groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(","))
    };
    let out = Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={gid}"), groups])
        .args(["sh", "-c", script])
        .current_dir(dir)
        .output()
        .expect("run setpriv");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// True in CI (smaller data sets where a test says so).
pub fn ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// A storage node named `node-ID` that registers with the meta group at `meta`.
pub fn registered_node(cluster: &Cluster, name: &str, ip: &str, meta: &str, extra: &[&str]) -> NodeProc {
    let tls = cluster.tls(Role::Node, name);
    let data = cluster.path().join("data").join(name);
    let mut args = vec!["--meta", meta, "--node-id"];
    let id = name.trim_start_matches("node-");
    args.push(id);
    args.extend_from_slice(extra);
    NodeProc::spawn(&format!("{ip}:0"), &data, &tls, &args)
}

/// Storage nodes the meta leader considers alive.
pub async fn alive_nodes(admin: &augur_meta::MetaClient) -> usize {
    use augur_proto::msg::{RequestBody, ResponseBody};
    match admin.call(RequestBody::ClusterStatus).await {
        Ok(ResponseBody::Cluster(c)) => c.nodes.iter().filter(|n| n.alive).count(),
        _ => 0,
    }
}

/// Waits until at least `n` storage nodes are alive.
pub async fn wait_for_nodes(admin: &augur_meta::MetaClient, n: usize) {
    wait_until("storage nodes to register", READY_TIMEOUT, || async { alive_nodes(admin).await >= n }).await;
}
