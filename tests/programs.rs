//! Real programs on an `augur dev` mount: sqlite3 (a database over 50 MB, queries, integrity
//! check), tar (a source tree extracted and compared), git (init, commit, log, fsck), cp -a of
//! a tree with large files (compared by checksum, modes and times kept), and a C compiler.

mod common;

use std::path::Path;

use common::{DevProc, ci, sh_ok};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn real_programs_run_on_the_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let local = tmp.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let dev = DevProc::start(&tmp.path().join("state"), &mnt, "127.0.7.1");

    // sqlite3: 50 000 rows of 1100 random bytes (> 50 MB), an index, queries, integrity check.
    let sql = "PRAGMA page_size=4096; PRAGMA journal_mode=DELETE; \
        CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v BLOB); \
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<50000) \
        INSERT INTO t SELECT x, hex(randomblob(8)), randomblob(1100) FROM c; \
        CREATE INDEX t_k ON t(k); \
        UPDATE t SET v = zeroblob(1100) WHERE id % 7 = 0; \
        DELETE FROM t WHERE id % 11 = 0;";
    sh_ok(&mnt, &format!("sqlite3 big.db \"{sql}\""));
    let size = std::fs::metadata(mnt.join("big.db")).unwrap().len();
    assert!(size >= 50 << 20, "database is {size} bytes");
    let out = sh_ok(
        &mnt,
        "sqlite3 big.db 'SELECT count(*) FROM t; SELECT count(*) FROM t WHERE id % 7 = 0; PRAGMA integrity_check;'",
    );
    let lines: Vec<&str> = out.lines().collect();
    let expected_rows = (1..=50000).filter(|x| x % 11 != 0).count();
    let expected_zeroed = (1..=50000).filter(|x| x % 7 == 0 && x % 11 != 0).count();
    assert_eq!(lines, [expected_rows.to_string(), expected_zeroed.to_string(), "ok".to_string()], "{out}");
    let out = sh_ok(
        &mnt,
        "sqlite3 big.db 'SELECT k FROM t ORDER BY k LIMIT 1;' && sqlite3 big.db 'SELECT sum(length(v)) FROM t WHERE k > \"8\";'",
    );
    assert_eq!(out.lines().count(), 2, "{out}");

    // tar: this repository's sources, extracted on the mount and compared with a local copy.
    sh_ok(
        workspace(),
        &format!(
            "tar cf {}/src.tar --exclude=target --exclude=.git Cargo.toml proto meta storage-node fs-client prefetch src tests",
            local.display()
        ),
    );
    sh_ok(&local, "mkdir tree && tar xf src.tar -C tree");
    sh_ok(&mnt, &format!("mkdir tree && tar xf {}/src.tar -C tree", local.display()));
    sh_ok(&mnt, &format!("diff -r {}/tree tree", local.display()));
    // ...and packed again from the mount: the same bytes.
    sh_ok(
        &mnt,
        &format!(
            "cd tree && tar cf {}/again.tar --sort=name --mtime=@0 --owner=0 --group=0 . && cd {}/tree && tar cf ../again-local.tar --sort=name --mtime=@0 --owner=0 --group=0 .",
            local.display(),
            local.display()
        ),
    );
    sh_ok(&local, "cmp again.tar again-local.tar");

    // git: init, add, commit twice, log, fsck.
    let git = "git -c user.name=augur -c user.email=augur@example.com -c init.defaultBranch=main";
    sh_ok(&mnt.join("tree"), &format!("{git} init -q && {git} add -A && {git} commit -qm first"));
    sh_ok(&mnt.join("tree"), &format!("echo change >> Cargo.toml && {git} commit -qam second"));
    let log = sh_ok(&mnt.join("tree"), &format!("{git} log --oneline"));
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("second") && log.contains("first"), "{log}");
    sh_ok(
        &mnt.join("tree"),
        &format!("{git} fsck --strict && {git} status --porcelain | wc -l | grep -qx 0"),
    );

    // A compiler: build and run a C program on the mount.
    std::fs::write(
        mnt.join("hello.c"),
        "#include <stdio.h>\nint main(void){puts(\"hello from augur\");return 0;}\n",
    )
    .unwrap();
    sh_ok(&mnt, "cc -O1 -o hello hello.c");
    assert_eq!(sh_ok(&mnt, "./hello").trim(), "hello from augur");

    // cp -a: a tree of large and small files, a symlink, odd modes and old times.
    let big_mb = if ci() { 100 } else { 200 };
    let src = local.join("cp-src");
    sh_ok(
        &local,
        &format!(
            "mkdir -p cp-src/sub/deeper && \
         for i in 1 2 3; do head -c {big_mb}M /dev/urandom > cp-src/big$i; done && \
         for i in $(seq 1 50); do head -c $((i * 997)) /dev/urandom > cp-src/sub/small$i; done && \
         echo text > cp-src/sub/deeper/t && ln -s ../big1 cp-src/sub/link && \
         chmod 0751 cp-src/sub && chmod 0600 cp-src/big2 && touch -d '2001-02-03 04:05:06' cp-src/big3"
        ),
    );
    sh_ok(&mnt, &format!("cp -a {} copy", src.display()));
    let sums = "find . -type f -print0 | sort -z | xargs -0 sha256sum";
    let want = sh_ok(&src, sums);
    let got = sh_ok(&mnt.join("copy"), sums);
    assert_eq!(want, got, "checksums differ after cp -a");
    // Directory sizes are file-system specific (ext4 says 4096, Augur 0): sizes of the rest.
    let meta = "find . -printf '%p %y %m %T@ %l\\n' | sort && find . -type f -printf '%p %s\\n' | sort";
    assert_eq!(sh_ok(&src, meta), sh_ok(&mnt.join("copy"), meta), "cp -a kept modes, sizes, times and links");
    drop(dev);
}
