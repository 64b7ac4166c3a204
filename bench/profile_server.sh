#!/usr/bin/env bash
# Where lstm-serve's time goes on the one-step path (issue 29): the bundled model under 64
# closed-loop 1-step sessions (lstm-client bench), sampled by py-spy.
#
#   bash bench/profile_server.sh [TREE] [OUT_DIR] [SECONDS]
#
# TREE: the checkout whose server runs (default this one; an older one: `git worktree add
# --detach /tmp/before COMMIT`), from its own source with this checkout's venv. OUT_DIR: default
# /tmp/profiles/<tree>-<time>. SECONDS: how long py-spy records (default 8), at 200 Hz, idle
# samples included, without pausing the server (PYSPY_BLOCKING=1 pauses it at each sample).
# Writes server.log, load.txt (the load generator's line), profile.raw (py-spy's collapsed
# stacks, one line a stack and its count, per thread), dump.txt (py-spy dump mid-run) and
# top.txt: the top 25 functions by own and by total share of the main thread's samples.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE=$(cd "${1:-$ROOT}" && pwd)
OUT=${2:-/tmp/profiles/$(basename "$TREE")-$(date +%Y%m%d-%H%M%S)}
RECORD_S=${3:-8}
BIN=$ROOT/.venv/bin
[ -x "$BIN/py-spy" ] || "$BIN/pip" install -q py-spy
NONBLOCKING=$([ "${PYSPY_BLOCKING:-0}" = 1 ] || echo --nonblocking)
mkdir -p "$OUT"

in_tree() { env -C "$TREE" PYTHONPATH="$TREE" "$@"; }
IMPORTED=$(in_tree "$BIN/python" -c 'import server.app; print(server.app.__file__)')
case $IMPORTED in "$TREE"/*) ;; *) echo "run from $TREE, Python imports $IMPORTED" >&2; exit 1 ;; esac

# exec: $! is the server itself, not a subshell around it.
(exec env -C "$TREE" PYTHONPATH="$TREE" "$BIN/python" -m server.app --host 127.0.0.1 --port 0 --metrics-port 0 \
    --max-sessions 4096) >"$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
PORT=
for _ in $(seq 1200); do
    PORT=$(grep -oP 'serving on \S+:\K\d+' "$OUT/server.log" || true)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT/server.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { echo "lstm-serve did not start: $OUT/server.log" >&2; exit 1; }

# The load outlasts the recording by a couple of seconds on each side.
(cd "$ROOT" && "$BIN/lstm-client" bench --target "127.0.0.1:$PORT" --sessions 64 --chunk 1 \
    --duration "$((RECORD_S + 2))") >"$OUT/load.txt" 2>&1 &
LOAD=$!
sleep 1.5
"$BIN/py-spy" record --pid "$SERVER" --rate 200 --duration "$RECORD_S" --idle --threads \
    $NONBLOCKING --format raw --output "$OUT/profile.raw" >"$OUT/py-spy.log" 2>&1 &
RECORD=$!
sleep "$((RECORD_S / 2))"
"$BIN/py-spy" dump --pid "$SERVER" >"$OUT/dump.txt" 2>&1 || true
wait "$RECORD" || { cat "$OUT/py-spy.log" >&2; exit 1; }
wait "$LOAD" || true

"$BIN/python" - "$OUT/profile.raw" "$TREE" "$(cat "$OUT/load.txt")" >"$OUT/top.txt" <<'EOF'
"""Own and total shares of the main thread's samples by function (line numbers dropped, and
the frames that run the event loop, every sample's, left out of the totals)."""

import collections
import re
import sys

path, tree, load = sys.argv[1:4]
own: collections.Counter[str] = collections.Counter()
total: collections.Counter[str] = collections.Counter()
threads: collections.Counter[str] = collections.Counter()
samples = 0
for line in open(path):
    stack, _, count = line.rstrip("\n").rpartition(" ")
    frames = stack.split(";")
    threads[frames[0]] += int(count)
    if not frames[0].endswith(": MainThread"):
        continue
    names = [re.sub(r":\d+\)$", ")", f).replace(tree + "/", "") for f in frames[1:]]
    loop = "BaseEventLoop.run_forever (asyncio/base_events.py)"
    names = (names[names.index(loop) + 1 :] if loop in names else names) or [loop]
    samples += int(count)
    own[names[-1]] += int(count)
    for name in set(names):
        total[name] += int(count)
print(f"tree {tree}; load: {load}")
print(f"samples by thread: {dict(threads.most_common())}; main thread: {samples}")
for title, counter in (("own", own), ("total", total)):
    print(f"\ntop 25 by {title} share of the main thread's samples")
    for name, n in counter.most_common(25):
        print(f"{100 * n / samples:6.1f}%  {name}")
EOF
cat "$OUT/top.txt"
echo "profile: $OUT"
