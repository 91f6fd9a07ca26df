#!/usr/bin/env bash
# Records a client trace of one real-program workload (augur_train/workloads.py) on a fresh
# `augur dev` mount: ./record.sh WORKLOAD OUT.csv.gz [workload args...]
# Needs root (FUSE), the augur binary ($AUGUR, default: the debug build under
# $CARGO_TARGET_DIR) and python3 with sqlite3. The trace is written gzip-compressed to OUT.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 sqlite|images|build OUT.csv.gz [workload args...]" >&2; exit 2; }
workload=$1 out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
augur=${AUGUR:-${CARGO_TARGET_DIR:-$HOME/.cache/augur/target}/debug/augur}
[ -x "$augur" ] || { echo "no augur binary at $augur (build it, or set AUGUR)" >&2; exit 1; }
work=$(mktemp -d /tmp/augur-record.XXXXXX)
mkdir -p "$work/mnt"
"$augur" dev "$work/mnt" --state "$work/state" --ip 127.0.0.9 --trace "$work/trace.csv" \
    > "$work/dev.out" 2> "$work/dev.log" &
dev=$!
trap 'kill -INT $dev 2>/dev/null || true; wait $dev 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q "Ctrl-C unmounts" "$work/dev.out" && break
    kill -0 $dev 2>/dev/null || { cat "$work/dev.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "Ctrl-C unmounts" "$work/dev.out" || { echo "augur dev did not come up" >&2; exit 1; }
(cd "$here" && python3 -m augur_train.workloads "$workload" "$work/mnt/$workload" "$@")
kill -INT $dev; wait $dev || true
trap - EXIT
gzip -c "$work/trace.csv" > "$out"
echo "$out: $(($(wc -l < "$work/trace.csv") - 1)) requests"
rm -rf "$work"
