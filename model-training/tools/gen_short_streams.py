"""Writes the generated block traces of many short streams (models/README.md item 33).

    python gen_short_streams.py OUT.csv.gz           the replay trace
    python gen_short_streams.py --mount OUT.csv.gz   the smaller one replayed on a mount

The replay trace: half the reads come from one long stream (object 0) with Zipf-like
popularity over 20 000 64 KiB blocks (its hot blocks fit a 5% cache), half from 4 000 short
streams (objects 1..4000, 8 reads each, 4 open at a time) at random 8 KiB offsets in 256 MiB
objects; about 64 000 reads, 100-900 us apart.

The mount trace (`augur bench prefetch --trace`): 3 000 reads 300 us apart, every other one
from a hot 16 MiB file (object 0, block 256 * u^2), the rest from 188 files of 8 reads each at
random 8 KiB offsets in 8 MiB.
"""
import bisect
import gzip
import random
import sys

HEADER = 'timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id'


def replay_trace():
    rng = random.Random(7)
    n = 20000
    cum, s = [], 0.0
    for i in range(n):
        s += 1.0 / (i + 1)
        cum.append(s)
    perm = list(range(n))
    rng.shuffle(perm)
    left = {o: 8 for o in range(1, 4001)}
    active, nxt, t, out = [], 1, 0, [HEADER]
    while nxt <= 4000 or active:
        t += rng.randint(100, 900)
        if rng.random() < 0.5:
            b = perm[bisect.bisect_left(cum, rng.random() * s)]
            out.append(f"{t},R,{b * 65536 + rng.randrange(8) * 8192},8192,0")
            continue
        while len(active) < 4 and nxt <= 4000:
            active.append(nxt)
            nxt += 1
        o = rng.choice(active)
        out.append(f"{t},R,{rng.randrange(32768) * 8192},8192,{o}")
        left[o] -= 1
        if left[o] == 0:
            active.remove(o)
    return out


def mount_trace():
    rng = random.Random(5)
    out, t, f, left = [HEADER], 0, 1, 8
    for i in range(3000):
        t += 300
        if i % 2 == 0:
            out.append(f"{t},R,{int(256 * rng.random() ** 2) * 65536},8192,0")
        else:
            out.append(f"{t},R,{rng.randrange(1024) * 8192},8192,{f}")
            left -= 1
            if left == 0:
                f, left = f + 1, 8
    return out


if __name__ == '__main__':
    args = sys.argv[1:]
    mount = args[:1] == ['--mount']
    if mount:
        args = args[1:]
    if len(args) != 1 or args[0].startswith('-'):
        sys.exit(__doc__)
    rows = mount_trace() if mount else replay_trace()
    with gzip.open(args[0], 'wt') as g:
        g.write('\n'.join(rows) + '\n')
