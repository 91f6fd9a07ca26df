"""Writes a generated block trace of many short streams (models/README.md item 33).

Half the reads come from one long stream (object 0) with Zipf-like popularity over 20 000
64 KiB blocks (its hot blocks fit a 5% cache), half from 4 000 short streams (objects 1..4000, 8
reads each, 4 open at a time) at random 8 KiB offsets in 256 MiB objects; about 64 000 reads,
100-900 us apart. Usage: python gen_short_streams.py OUT.csv.gz
"""
import bisect
import gzip
import random
import sys
rng = random.Random(7)
N = 20000
w = [1.0 / (i + 1) for i in range(N)]; cum = []; s = 0.0
for x in w: s += x; cum.append(s)
perm = list(range(N)); rng.shuffle(perm)
left = {o: 8 for o in range(1, 4001)}; active = []; nxt = 1; t = 0
out = ['timestamp_us,op,offset_bytes,size_bytes,volume_or_object_id']
while nxt <= 4000 or active:
    t += rng.randint(100, 900)
    if rng.random() < 0.5:
        b = perm[bisect.bisect_left(cum, rng.random() * s)]
        out.append(f"{t},R,{b * 65536 + rng.randrange(8) * 8192},8192,0")
        continue
    while len(active) < 4 and nxt <= 4000:
        active.append(nxt); nxt += 1
    o = rng.choice(active)
    out.append(f"{t},R,{rng.randrange(32768) * 8192},8192,{o}")
    left[o] -= 1
    if left[o] == 0: active.remove(o)
with gzip.open(sys.argv[1], 'wt') as g: g.write('\n'.join(out) + '\n')
