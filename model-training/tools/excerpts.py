"""Cuts traces into excerpts: windows of 4 000 / 12 000 / 40 000 requests from the start, the
middle and the end of each trace, timestamps rebased to 0 (models/README.md items 27 and 36).

    python excerpts.py OUT_DIR TRACE.csv.gz...

A window is cut only from a trace longer than it. The excerpts stand in for unseen traces of
other sizes when a change is judged (`augur trace eval OUT_DIR/*.csv.gz --tail-frac 0.3
--predictors model`); they are not for tuning.
"""
import gzip
import os
import sys

WINDOWS = (4000, 12000, 40000)
PLACES = ('start', 'middle', 'end')


def read(path):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        lines = f.read().splitlines()
    return lines[0], [line for line in lines[1:] if line]


def cut(rows, start, size):
    window = rows[start:start + size]
    t0 = float(window[0].split(',', 1)[0])
    out = []
    for row in window:
        t, rest = row.split(',', 1)
        rebased = round(float(t) - t0, 3)
        out.append(f'{int(rebased) if rebased.is_integer() else rebased},{rest}')
    return out


def main(out_dir, traces):
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in traces:
        header, rows = read(path)
        name = os.path.basename(path).split('.')[0]
        for size in WINDOWS:
            if len(rows) <= size:
                continue
            starts = {'start': 0, 'middle': (len(rows) - size) // 2, 'end': len(rows) - size}
            for place in PLACES:
                dest = os.path.join(out_dir, f'{name}_{size}_{place}.csv.gz')
                with gzip.open(dest, 'wt') as f:
                    f.write('\n'.join([header] + cut(rows, starts[place], size)) + '\n')
                written += 1
    print(f'{written} excerpts in {out_dir}')


if __name__ == '__main__':
    if len(sys.argv) < 3 or any(a.startswith('-') for a in sys.argv[1:]):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
