"""tools/excerpts.py: windows from the start, middle and end of each trace longer than them,
timestamps rebased to 0, other columns kept."""
import gzip
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "excerpts", Path(__file__).parent.parent / "tools" / "excerpts.py"
)
excerpts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(excerpts)

HEADER = "timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id,file_type"


def test_windows_are_cut_from_three_places_with_rebased_timestamps(tmp_path, monkeypatch):
    monkeypatch.setattr(excerpts, "WINDOWS", (4, 10))
    trace = tmp_path / "t.csv.gz"
    rows = [f"{100 + 10 * i}.5,R,{i * 8192},8192,{i % 3},image" for i in range(8)]
    with gzip.open(trace, "wt") as f:
        f.write("\n".join([HEADER] + rows) + "\n")

    out = tmp_path / "out"
    excerpts.main(str(out), [str(trace)])

    # The 10-request window is longer than the trace: only the 4-request one is cut.
    assert sorted(p.name for p in out.iterdir()) == [
        "t_4_end.csv.gz",
        "t_4_middle.csv.gz",
        "t_4_start.csv.gz",
    ]
    with gzip.open(out / "t_4_middle.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER
    assert lines[1:] == [f"{10 * k},R,{(2 + k) * 8192},8192,{(2 + k) % 3},image" for k in range(4)]
    with gzip.open(out / "t_4_end.csv.gz", "rt") as f:
        assert f.read().splitlines()[1] == "0,R,32768,8192,1,image"
