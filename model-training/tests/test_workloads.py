"""The real-program workloads behind the client traces run end to end (on a local directory
here; `record.sh` runs them on a mount)."""

import sqlite3
import subprocess
from pathlib import Path

from augur_train import workloads


def test_sqlite_workload_builds_and_queries_a_database(tmp_path: Path):
    workloads.main(["sqlite", str(tmp_path / "w"), "--rows", "3000"])
    con = sqlite3.connect(tmp_path / "w" / "orders.db")
    assert con.execute("SELECT count(*) FROM orders").fetchone()[0] == 3000
    assert con.execute("PRAGMA page_size").fetchone()[0] == 4096


def test_images_workload_copies_and_reads_real_image_files(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20_000))
    (src / "b.JPG").write_bytes(b"\xff\xd8\xff" + bytes(30_000))
    (src / "tiny.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # below IMAGE_BYTES_MIN: skipped
    (src / "notes.txt").write_bytes(bytes(20_000))
    workloads.main(["images", str(tmp_path / "w"), "--source", str(src), "--epochs", "1"])
    copied = sorted(p.name for p in (tmp_path / "w" / "images").rglob("*") if p.is_file())
    assert copied == ["0000.png", "0001.jpg"]


def test_build_workload_clones_compiles_and_archives(tmp_path: Path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.rs").write_text("fn main() {}\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    workloads.main(["build", str(tmp_path / "w"), "--repo", str(repo)])
    assert (tmp_path / "w" / "src.tar.gz").stat().st_size > 0
    assert list((tmp_path / "w" / "src" / "pylib").rglob("*.pyc"))
