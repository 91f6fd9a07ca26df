"""Next-k prefetch policies chosen per read, on SPEC §7's replay (models/README item 31).

A plain-Python copy of `augur trace eval`'s replay (64 KiB blocks, an LRU of 5% of the
footprint, 1 ms fetches landing at the MRU end, late use, 64 prefetches in flight, the last
30% scored) with one kind of predictor: after each request, fetch the next k blocks after its
last block, k looked up per read context in a table. It starts from k = 2 everywhere (next-2)
and tries every single change of k in {0..4} per context, keeping a change only if it lowers
mean read latency at over-fetch <= 1.0. Contexts: whether the block before the request's first
was read in the last `--recent` block reads, whether the request's last block was, whether the
read hit, and in which half of its block the request ends.

    python model-training/tools/next_k_policies.py ../shared/traces/mqsim_websearch_small.csv.gz

It prints next-1 / 2 / 4 first, to check the copy against `augur trace eval` (on MQSim:
467.9 / 417.3 / 435.3 µs). An analysis tool only: nothing in the product or training uses it.
"""

import argparse
import csv
import gzip
import heapq
import itertools
from collections import OrderedDict

BLOCK = 64 << 10


def load(path):
    """(t_us, op, first block, end block, stream, byte position of the request's end)."""
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt") as f:
        reader = csv.reader(f)
        next(reader)
        for t, op, off, size, stream, *_ in reader:
            off, size = int(off), max(int(size), 1)
            end = off + size - 1
            rows.append((int(float(t)), op, off // BLOCK, end // BLOCK + 1, int(stream), end % BLOCK))
    return rows


def replay(rows, predict, tail=0.3, latency=1000, max_inflight=64):
    """Mean latency (µs) of the scored reads and over-fetch; `predict(i, stream, block, hit)`
    names blocks after each block read."""
    footprint = len({(r[4], b) for r in rows for b in range(r[2], r[3])})
    cap = max(1, round(0.05 * footprint))
    cache, inflight, landing = OrderedDict(), {}, []
    scored_from = len(rows) - round(tail * len(rows))
    waits, blocks_read, issued = [], 0, 0

    def insert(key, ready):
        if key in cache:
            cache.move_to_end(key)
            return
        if len(cache) >= cap:
            cache.popitem(last=False)
        cache[key] = ready

    for i, (t, op, first, end, stream, _) in enumerate(rows):
        scored = i >= scored_from
        while landing and landing[0][0] <= t:
            at, key = heapq.heappop(landing)
            if inflight.get(key) == at:
                del inflight[key]
                insert(key, at)
        if op == "W":
            for b in range(first, end):
                inflight.pop((stream, b), None)
                insert((stream, b), t)
            continue
        wait = 0
        for b in range(first, end):
            key = (stream, b)
            if key in cache:
                cache.move_to_end(key)
                w = max(0, cache[key] - t)
                hit = w == 0
            elif key in inflight:
                w, hit = inflight.pop(key) - t, False
                insert(key, t + w)
            else:
                w, hit = latency, False
                insert(key, t + latency)
            wait = max(wait, w)
            blocks_read += scored
            for p in predict(i, stream, b, hit):
                k = (stream, p)
                if k in cache or k in inflight or len(inflight) >= max_inflight:
                    continue
                inflight[k] = t + latency
                heapq.heappush(landing, (t + latency, k))
                issued += scored
        if scored:
            waits.append(wait)
    return sum(waits) / len(waits), issued / blocks_read


def next_n(n):
    return lambda i, stream, b, hit: range(b + 1, b + n + 1)


def by_context(rows, table, recent):
    """Next k after a request's last block, k = table[context] (2 where absent)."""
    last_read, count = {}, [0]

    def predict(i, stream, b, hit):
        _, _, first, end, _, end_pos = rows[i]
        count[0] += 1

        def lately(block):
            at = last_read.get((stream, block))
            return at is not None and count[0] - at <= recent

        context = (lately(first - 1), lately(b), hit, end_pos * 2 // BLOCK)
        last_read[(stream, b)] = count[0]
        if b != end - 1:
            return ()
        return range(b + 1, b + table.get(context, 2) + 1)

    return predict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--recent", type=int, default=766, help="block reads that count as lately")
    args = ap.parse_args()
    rows = load(args.trace)
    for n in (1, 2, 4):
        mean, over = replay(rows, next_n(n))
        print(f"next-{n}: {mean:.1f} us, over-fetch {over:.3f}")
    contexts = list(itertools.product((False, True), (False, True), (False, True), (0, 1)))
    table = {}
    best = replay(rows, by_context(rows, table, args.recent))
    print(f"k = 2 everywhere: {best[0]:.1f} us, over-fetch {best[1]:.3f}")
    for context in contexts:
        for k in range(5):
            if k == table.get(context, 2):
                continue
            trial = table | {context: k}
            mean, over = replay(rows, by_context(rows, trial, args.recent))
            if over <= 1.0 and mean < best[0]:
                table, best = trial, (mean, over)
                print(f"k = {k} for {context}: {mean:.1f} us, over-fetch {over:.3f}")
    print(f"best: {best[0]:.1f} us, over-fetch {best[1]:.3f}, changes from k = 2: {table}")


if __name__ == "__main__":
    main()
