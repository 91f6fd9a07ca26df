"""Real programs' file access on an Augur mount, for client traces (SPEC §8).

Each workload works inside a directory on the mount (`augur dev --trace FILE` records what the
kernel sends); `record.sh` runs one under a fresh `augur dev` and keeps the trace. They are
programs doing their ordinary work, not synthetic access generators:

- `sqlite`: the sqlite3 library (Python's stdlib binding) builds a 4 KiB-page database of
  orders with a secondary index, then runs point lookups, index lookups, range scans,
  aggregates and updates from fresh connections with a small page cache.
- `images`: real image files (PNG, JPEG, GIF, WebP found under `--source` directories) are
  copied in, then loaded the way a data loader does: an index pass reading each header, then
  epochs in shuffled order reading each file whole in chunks.
- `build`: a git repository is cloned onto the mount, its history and tree are read (`git log
  -p`, `git grep`), Python sources are byte-compiled and imported from it, and the tree is
  archived.

The randomness is seeded (`--seed`), so a run's requests depend only on the data and the seed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp"}
# Images copied at most, and the smallest kept (tiny icons say nothing about loading).
IMAGES_MAX = 400
IMAGE_BYTES_MIN = 8 * 1024
# How data loaders and decoders read: a header probe, then the file in chunks.
HEADER_BYTES = 1024
CHUNK_BYTES = 64 * 1024


def drop_page_cache() -> None:
    """Asks the kernel to forget cached pages, so reads reach the mount (root only; else a no-op)."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def sqlite_workload(root: Path, rng: random.Random, rows: int) -> None:
    db = root / "orders.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size = 4096")
    con.execute("PRAGMA journal_mode = DELETE")
    con.execute(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, amount REAL, note TEXT)"
    )
    batch = []
    for i in range(rows):
        note = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(20, 200)))
        batch.append((i, rng.randint(0, rows // 20), rng.random() * 1000, note))
        if len(batch) == 10_000:
            con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", batch)
            batch.clear()
    con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", batch)
    con.execute("CREATE INDEX by_customer ON orders (customer)")
    con.commit()
    con.close()

    def session():
        drop_page_cache()
        c = sqlite3.connect(db)
        c.execute("PRAGMA cache_size = -1024")  # 1 MiB: most pages come from the file
        return c

    c = session()
    for _ in range(3000):
        c.execute("SELECT * FROM orders WHERE id = ?", (rng.randrange(rows),)).fetchall()
    c.close()
    c = session()
    for _ in range(1000):
        c.execute("SELECT id, amount FROM orders WHERE customer = ?", (rng.randrange(rows // 20),)).fetchall()
    c.close()
    c = session()
    for _ in range(60):
        lo = rng.randrange(rows)
        c.execute("SELECT sum(amount) FROM orders WHERE id BETWEEN ? AND ?", (lo, lo + 2000)).fetchall()
    c.close()
    c = session()
    for _ in range(3):
        c.execute("SELECT customer, count(*), avg(amount) FROM orders GROUP BY customer").fetchall()
        c.execute("SELECT count(*) FROM orders WHERE note LIKE '%zz%'").fetchall()
    c.close()
    c = session()
    for _ in range(20):
        for _ in range(50):
            c.execute("UPDATE orders SET amount = amount + 1 WHERE id = ?", (rng.randrange(rows),))
        c.commit()
        for _ in range(100):
            c.execute("SELECT * FROM orders WHERE id = ?", (rng.randrange(rows),)).fetchall()
    c.close()


def find_images(sources: list[Path]) -> list[Path]:
    found, seen = [], set()
    for src in sources:
        for p in sorted(src.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                size = p.stat().st_size
                key = (p.name, size)
                if size >= IMAGE_BYTES_MIN and key not in seen:
                    seen.add(key)
                    found.append(p)
    return found[:IMAGES_MAX]


def images_workload(root: Path, rng: random.Random, sources: list[Path], epochs: int) -> None:
    images = find_images(sources)
    if not images:
        sys.exit(f"no images of at least {IMAGE_BYTES_MIN} bytes under {', '.join(map(str, sources))}")
    files = []
    for k, src in enumerate(images):
        dst = root / "images" / f"class{k % 8}" / f"{k:04d}{src.suffix.lower()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        files.append(dst)
    drop_page_cache()
    for p in files:  # index pass: dimensions and format from each header
        with open(p, "rb") as f:
            f.read(HEADER_BYTES)
    for _ in range(epochs):
        drop_page_cache()
        order = files[:]
        rng.shuffle(order)
        for p in order:
            with open(p, "rb") as f:
                f.read(HEADER_BYTES)
                while f.read(CHUNK_BYTES):
                    pass


def build_workload(root: Path, repo: Path) -> None:
    def run(*args: str, cwd: Path | None = None) -> None:
        subprocess.run(args, cwd=cwd, check=True, stdout=subprocess.DEVNULL)

    clone = root / "src"
    run("git", "clone", "--quiet", "--no-hardlinks", str(repo), str(clone))
    drop_page_cache()
    run("git", "log", "-p", "--stat", cwd=clone)
    run("git", "grep", "-n", "fn ", cwd=clone)
    drop_page_cache()
    py = clone / "pylib"
    shutil.copytree(Path(shutil.__file__).parent / "json", py / "json_copy")
    shutil.copytree(Path(shutil.__file__).parent / "email", py / "email_copy")
    run(sys.executable, "-m", "compileall", "-q", str(py))
    run(sys.executable, "-c", "import json_copy, email_copy.parser, email_copy.message", cwd=py)
    run("tar", "czf", str(root / "src.tar.gz"), "-C", str(root), "src")
    drop_page_cache()
    run("tar", "tzf", str(root / "src.tar.gz"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["sqlite", "images", "build"])
    ap.add_argument("dir", type=Path, help="working directory on the mount (created)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows", type=int, default=300_000, help="sqlite: rows in the orders table")
    ap.add_argument("--epochs", type=int, default=3, help="images: passes over the data set")
    ap.add_argument(
        "--source", type=Path, action="append", default=[], help="images: where to find images (repeatable)"
    )
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2], help="build: git repository")
    a = ap.parse_args(argv)
    a.dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    if a.workload == "sqlite":
        sqlite_workload(a.dir, rng, a.rows)
    elif a.workload == "images":
        images_workload(a.dir, rng, a.source or [Path(os.path.expanduser("~"))], a.epochs)
    else:
        build_workload(a.dir, a.repo)


if __name__ == "__main__":
    main()
