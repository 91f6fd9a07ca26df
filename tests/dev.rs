//! `augur dev`: three meta members, three nodes, the default volume mounted; Ctrl-C unmounts
//! cleanly; a restart on the same state directory finds every file again. Also the Augur
//! extended attributes on the mount, and the prefetch engine with and without its model.

mod common;

use augur_prefetch::filetype::Group;
use common::{DevProc, sh_ok};

#[test]
fn dev_mounts_stops_cleanly_and_finds_its_files_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (state, mnt) = (tmp.path().join("state"), tmp.path().join("mnt"));
    let trace = tmp.path().join("client-trace.csv");
    let mut dev = DevProc::start_with(&state, &mnt, "127.0.0.9", &["--trace", trace.to_str().unwrap()]);
    std::fs::create_dir(mnt.join("dir")).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("dir/file"), &data).unwrap();
    std::os::unix::fs::symlink("dir/file", mnt.join("link")).unwrap();

    // Extended attributes (python's os.*xattr gives exact errno values).
    let script = r#"
import errno, os
def fails(code, f, *a):
    try:
        f(*a)
    except OSError as e:
        assert e.errno == code, (f, a, e)
        return
    raise AssertionError(("expected", errno.errorcode[code], f, a))
os.setxattr("dir", "user.augur.prefetch", b"readahead:8")
os.mkdir("dir/sub"); open("dir/sub/new", "w").close(); open("dir/new", "w").close()
for p in ["dir", "dir/sub", "dir/new", "dir/sub/new"]:
    assert os.getxattr(p, "user.augur.prefetch") == b"readahead:8", p
fails(errno.EINVAL, os.setxattr, "dir", "user.augur.prefetch", b"sometimes")
fails(errno.EINVAL, os.setxattr, "dir", "user.augur.prefetch", b"readahead:x")
fails(errno.EINVAL, os.setxattr, "dir", "user.augur.prefetch", b"readahead:0")
assert os.getxattr("dir", "user.augur.prefetch") == b"readahead:8", "a bad value changes nothing"
for v in [b"auto", b"sequential", b"random", b"off", b"readahead:64"]:
    os.setxattr("dir/new", "user.augur.prefetch", v)
shards = os.getxattr("dir/file", "user.augur.shards").decode()
assert "shard-" in shards and "replicas=" in shards and "epoch=" in shards, shards
fails(errno.EPERM, os.setxattr, "dir/file", "user.augur.shards", b"x")
os.setxattr("dir/file", "user.note", b"\x00binary\xff")
assert os.getxattr("dir/file", "user.note") == b"\x00binary\xff"
fails(errno.EEXIST, os.setxattr, "dir/file", "user.note", b"y", os.XATTR_CREATE)
fails(errno.ENODATA, os.setxattr, "dir/file", "user.other", b"y", os.XATTR_REPLACE)
assert "user.note" in os.listxattr("dir/file")
os.removexattr("dir/file", "user.note")
fails(errno.ENODATA, os.getxattr, "dir/file", "user.note")
fails(errno.EOPNOTSUPP, os.setxattr, "dir/file", "trusted.x", b"y")
with open("dir/file", "rb") as f:
    while f.read(1 << 20):
        pass
stats = os.getxattr("dir/file", "user.augur.prefetch_stats").decode()
assert stats.startswith("issued=") and "used=" in stats and "wasted=" in stats, stats
fails(errno.ENODATA, os.getxattr, "dir", "user.augur.prefetch_stats")
# The file type: detected from the first bytes unless overridden.
with open("img", "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(200))
with open("db", "wb") as f:
    f.write(b"SQLite format 3\x00\x10\x00" + bytes(200))
assert os.getxattr("img", "user.augur.filetype") == b"image"
assert os.getxattr("db", "user.augur.filetype") == b"database"
assert os.getxattr("dir/file", "user.augur.filetype") == b"other"
os.setxattr("img", "user.augur.filetype", b"database")
assert os.getxattr("img", "user.augur.filetype") == b"database"
fails(errno.EINVAL, os.setxattr, "img", "user.augur.filetype", b"picture")
fails(errno.ENODATA, os.getxattr, "dir", "user.augur.filetype")
# An override set and removed while the file is open here: detected again, not kept.
with open("img", "rb") as f:
    os.setxattr("img", "user.augur.filetype", b"database")
    assert f.read(4) == b"\x89PNG"
    assert os.getxattr("img", "user.augur.filetype") == b"database"
    os.removexattr("img", "user.augur.filetype")
    assert os.getxattr("img", "user.augur.filetype") == b"image", "the override is gone"
# A hint set on a file while it is open here takes effect at once.
def issued(p):
    s = os.getxattr(p, "user.augur.prefetch_stats").decode()
    return int(dict(kv.split("=") for kv in s.split())["issued"])
with open("ra", "wb") as f:
    f.write(bytes(4 << 20))
with open("ra", "rb", buffering=0) as f:
    for _ in range(8):  # the file's hint (auto) is looked up by now
        f.read(65536)
    os.setxattr("ra", "user.augur.prefetch", b"readahead:8")
    before = issued("ra")
    for _ in range(24):
        f.read(65536)
    assert issued("ra") > before, ("readahead:8 set while open", before, issued("ra"))
    os.setxattr("ra", "user.augur.prefetch", b"off")
    before = issued("ra")
    for _ in range(16):
        f.read(65536)
    assert issued("ra") == before, ("off set while open", before, issued("ra"))
# Files read whole: the trace and the engine are told their type once it is known.
with open("photo.png", "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + bytes(2 << 20))
with open("pages.db", "wb") as f:
    f.write(b"SQLite format 3\x00\x10\x00" + bytes(2 << 20))
for name in ["photo.png", "pages.db"] * 2:  # the second open knows the type from its first read
    with open(name, "rb") as f:
        while f.read(1 << 16):
            pass
print("typed", os.stat("photo.png").st_ino, os.stat("pages.db").st_ino)
print("xattrs ok", stats.strip())
"#;
    let out = sh_ok(&mnt, &format!("python3 -c '{}'", script.replace('\'', "'\\''")));
    assert!(out.contains("xattrs ok"), "{out}");

    assert!(dev.stop().success(), "augur dev exits cleanly on Ctrl-C:\n{}", dev.log());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(mnt.to_str().unwrap()), "unmounted on Ctrl-C");

    // `--trace`: the client's own trace, in the shared shape plus the file type, that the
    // trace tools read.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(augur_prefetch::trace::CLIENT_CSV_HEADER));
    let recorded = augur_prefetch::Trace::read(&trace).expect("the trace tools read it");
    let typed: Vec<u64> = out
        .lines()
        .find_map(|l| l.strip_prefix("typed "))
        .expect("inodes printed")
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    for (ino, want) in typed.iter().zip([Group::Image, Group::Database]) {
        let groups: Vec<Group> = recorded
            .accesses
            .iter()
            .filter(|a| a.stream == *ino && a.op == augur_prefetch::Op::Read)
            .map(|a| a.group)
            .collect();
        // The first read at offset 0 comes before anything is known; every later one knows,
        // also in the file's next open.
        assert!(groups.len() > 4, "{ino}: {groups:?}");
        assert!(groups[1..].iter().all(|g| *g == want), "{ino} read as {want}: {groups:?}");
        let writes =
            recorded.accesses.iter().filter(|a| a.stream == *ino && a.op == augur_prefetch::Op::Write);
        assert!(writes.skip(1).all(|a| a.group == want), "{ino}: a header write names the type");
    }
    let bytes = |op| recorded.accesses.iter().filter(|a| a.op == op).map(|a| a.size).sum::<u64>();
    let (written, read) = (bytes(augur_prefetch::Op::Write), bytes(augur_prefetch::Op::Read));
    assert!(written >= data.len() as u64, "every byte written is recorded: {written}");
    assert!(read >= data.len() as u64, "the whole-file read is recorded: {read}");
    let (ok, out, err) =
        common::augur(&["trace", "eval", trace.to_str().unwrap(), "--predictors", "model", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v[0]["scores"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["predictor"] == "model" && s["reads"].as_u64() > Some(0)),
        "{v}"
    );

    assert!(dev.log().contains("prefetch: model loaded"), "the shipped model serves `auto`:\n{}", dev.log());

    let mut again = DevProc::start(&state, &mnt, "127.0.0.9");
    assert_eq!(std::fs::read(mnt.join("link")).unwrap(), data, "found again after a restart");
    // A fresh client (empty cache) reading at a reader's pace: the engine fetches ahead and
    // the reads find its blocks.
    let stats = paced_read(&mnt, "dir/file");
    eprintln!("model, paced read: {stats}");
    assert!(stat(&stats, "used") > 0.0, "the model's prefetches are used: {stats}");
    assert!(stat(&stats, "coverage") > 0.0 && stat(&stats, "accuracy") > 0.0, "{stats}");
    assert!(stat(&stats, "demand_bytes") >= data.len() as f64, "{stats}");
    // The root's counters are the mount's; this client has read only this file (also as `link`).
    let total = sh_ok(&mnt, "getfattr --only-values -n user.augur.prefetch_stats .");
    assert_eq!(stat(&total, "demand_bytes"), stat(&stats, "demand_bytes"), "{total} / {stats}");
    assert!(stat(&total, "issued") >= stat(&stats, "issued"), "{total} / {stats}");
    // `augur prefetch`: every replica of the file's shards loads its blocks into memory.
    let tls = state.join("tls/client");
    let warm = |targets: &[&str]| {
        let meta = "127.0.0.9:7001,127.0.0.9:7002,127.0.0.9:7003";
        let tail = ["--meta", meta, "--tls", tls.to_str().unwrap(), "--json"];
        common::augur(&[&["prefetch", "default"], targets, &tail[..]].concat())
    };
    let loaded = |out: &str| -> (u64, u64) {
        let v: serde_json::Value = serde_json::from_str(out).unwrap();
        let sum = v["loaded"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
        (v["blocks"].as_u64().unwrap(), sum)
    };
    let blocks = data.len().div_ceil(64 << 10) as u64;
    let (ok, out, err) = warm(&[mnt.join("dir/file").to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(loaded(&out), (blocks, 3 * blocks), "three replicas load every block: {out}");
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(mnt.join("dir/file")).unwrap());
    let (ok, out, err) = warm(&[&format!("{ino}:0-3"), &format!("{ino}:1000")]);
    assert!(ok, "{err}");
    assert_eq!(loaded(&out), (5, 12), "a block never written loads nothing: {out}");
    let (ok, out, err) = warm(&[&ino.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(loaded(&out), (blocks, 3 * blocks), "{out}");
    let (ok, _, err) = warm(&["12:9-3"]);
    assert!(!ok && err.contains("12:9-3"), "{err}");

    // A file for the next client to read fast, with readahead far beyond its prefetch slots.
    sh_ok(
        &mnt,
        "head -c 4194304 /dev/urandom > fast && setfattr -n user.augur.prefetch -v readahead:32 fast",
    );
    let fast = std::fs::read(mnt.join("fast")).unwrap();
    assert!(again.stop().success());

    // A missing model: said in the log, and the heuristic predictor prefetches instead.
    // One prefetch slot and nodes 20 ms away: what the engine and readahead name past it
    // queues, and goes stale as the reads pass it.
    let mut heuristic = DevProc::start_with(
        &state,
        &mnt,
        "127.0.0.9",
        &["--model", "/nonexistent/prefetch.onnx", "--prefetch-in-flight", "1", "--inject-latency-ms", "20"],
    );
    let stats = paced_read(&mnt, "dir/file");
    eprintln!("heuristic, paced read: {stats}");
    assert!(stat(&stats, "used") > 0.0, "the heuristic's prefetches are used: {stats}");
    // The engine's blocks that were not fetched for it (stale in the queue, or fetched by a
    // read first) give their budget back: on an `auto` file every stale block was the engine's.
    assert!(stat(&stats, "returned") >= stat(&stats, "stale"), "{stats}");
    assert_eq!(std::fs::read(mnt.join("fast")).unwrap(), fast);
    let stats = sh_ok(&mnt, "getfattr --only-values -n user.augur.prefetch_stats fast");
    eprintln!("readahead:32 with 1 slot, fast read: {stats}");
    assert!(stat(&stats, "issued") > 0.0 && stat(&stats, "stale") > 0.0, "{stats}");
    // What the engine named at the first read, before the lookup found the hint, went back.
    assert!(stat(&stats, "returned") > 0.0, "{stats}");
    let log = heuristic.log();
    assert!(
        log.contains("/nonexistent/prefetch.json")
            && log.contains("prefetching with the heuristic predictor"),
        "{log}"
    );
    assert!(heuristic.stop().success());
}

/// Reads `file` under `mnt` in 64 KiB reads a few ms apart; returns its `prefetch_stats`.
fn paced_read(mnt: &std::path::Path, file: &str) -> String {
    let script = format!(
        r#"
import os, time
with open("{file}", "rb", buffering=0) as f:
    while f.read(65536):
        time.sleep(0.003)
print(os.getxattr("{file}", "user.augur.prefetch_stats").decode().strip())
"#
    );
    sh_ok(mnt, &format!("python3 -c '{}'", script.replace('\'', "'\\''")))
}

/// One figure of a `user.augur.prefetch_stats` value.
fn stat(stats: &str, key: &str) -> f64 {
    let prefix = format!("{key}=");
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {stats:?}"))
}
