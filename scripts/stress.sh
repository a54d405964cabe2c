#!/usr/bin/env bash
# The tests where threads race (checkpoints cut under load, periodic compaction beside export
# readers, group commit, concurrent consumers, request ids, reservations, leases), run over and
# over for a while with every core kept busy
# by a spinning process, so their threads are preempted at moments a quiet machine never shows.
# A race that a plain run hits once in a hundred turns up here within a minute: that is how the
# open-reservation count a checkpoint cut in the middle of a close left behind was found
# (3bd9c8a). Exits non-zero if any run failed, with each failure's output kept.
#
#   bash scripts/stress.sh [SECONDS]      # default 120; TALLY_STRESS_SECONDS works too
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${TALLY_STRESS_SECONDS:-120}}"
# Test binaries (tests/*.rs), for each the tests to run (a name filter, or `-` for all of them)
# and how many times a round runs them: the quick ones whose races are rare run more often.
runs=(
  "log checkpoints_cut_under_concurrent_load 10"
  "log every_kind_of_change_racing_checkpoints 1"
  "log reading_events_while_compaction 2"
  "log export_readers_polling_back_to_back 2"
  "log a_request_crossing_a_periodic_checkpoint 2"
  "concurrency - 2"
  "faults - 1"
  "leases racing 4"
  "admission concurrent 2"
  "admission for_a_moment 4"
  "submission - 2"
  "adjustments racing 4"
  "adjustments still_in_a_batch 4"
  "idempotency - 1"
)

out="$(mktemp -d "${TMPDIR:-/tmp}/tally-stress.XXXXXX")"
cargo test --tests --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        message = json.loads(line)
    except ValueError:
        continue
    if message.get("reason") == "compiler-artifact" and message.get("executable") \
            and message["profile"]["test"] and "test" in message["target"]["kind"]:
        print(message["target"]["name"], message["executable"])
' >"$out/binaries"

binary() { awk -v name="$1" '$1 == name { print $2; exit }' "$out/binaries"; }
for run in "${runs[@]}"; do
  set -- $run
  if [ -z "$(binary "$1")" ]; then
    echo "stress: no test binary named $1" >&2
    exit 1
  fi
done

hogs=()
cores="$(nproc)"
for _ in $(seq 1 "$cores"); do
  bash -c 'while :; do :; done' &
  hogs+=("$!")
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT

deadline=$(($(date +%s) + seconds))
rounds=0
runs_made=0
failures=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  rounds=$((rounds + 1))
  for run in "${runs[@]}"; do
    set -- $run
    name="$1"
    filter="$2"
    [ "$filter" = "-" ] && filter=""
    for repeat in $(seq 1 "$3"); do
      runs_made=$((runs_made + 1))
      log="$out/$name-$rounds-$repeat.log"
      if "$(binary "$name")" -q $filter >"$log" 2>&1; then
        rm -f "$log"
      else
        failures=$((failures + 1))
        echo "stress: round $rounds: $name ${filter:-(all)} FAILED; its output: $log" >&2
        grep -m 5 -A 3 "panicked" "$log" >&2 || tail -n 20 "$log" >&2
      fi
    done
  done
done
echo "stress: $runs_made runs in $rounds rounds, ${seconds} s beside $cores spinning processes; $failures failed"
[ "$failures" -eq 0 ]
