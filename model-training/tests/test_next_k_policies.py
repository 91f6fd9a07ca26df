"""The replay copy in tools/next_k_policies.py against timings worked out by hand (SPEC §7's
replay model: 1 ms fetches landing at the MRU end, late use, over-fetch = issued / read)."""
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "next_k_policies", Path(__file__).parent.parent / "tools" / "next_k_policies.py"
)
policies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(policies)

BLOCK = 64 << 10


def sequential(tmp_path, gap_us):
    """Blocks 0..3 of one stream read in order, `gap_us` apart."""
    path = tmp_path / "seq.csv"
    lines = ["timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id"]
    lines += [f"{i * gap_us},R,{i * BLOCK},{BLOCK},0" for i in range(4)]
    path.write_text("\n".join(lines) + "\n")
    return policies.load(str(path))


def test_no_prefetch_misses_every_read(tmp_path):
    rows = sequential(tmp_path, 2000)
    assert policies.replay(rows, policies.next_n(0), tail=1.0) == (1000.0, 0.0)


def test_next_1_hides_every_read_after_the_first_when_reads_are_a_fetch_apart(tmp_path):
    rows = sequential(tmp_path, 2000)
    # Read 0 misses (1000 µs); each prefetch lands before the next read: 0 µs.
    assert policies.replay(rows, policies.next_n(1), tail=1.0) == (250.0, 1.0)


def test_a_prefetch_still_in_flight_is_waited_for(tmp_path):
    rows = sequential(tmp_path, 500)
    # Each read comes 500 µs after the prefetch of its block was issued: it waits the rest.
    assert policies.replay(rows, policies.next_n(1), tail=1.0) == ((1000 + 3 * 500) / 4, 1.0)
