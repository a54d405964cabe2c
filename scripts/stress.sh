#!/usr/bin/env bash
# The tests where threads race (checkpoints cut under load, periodic compaction beside export
# readers, group commit, concurrent consumers, request ids, reservations, leases, admin
# operations beside admission, undos after a failed flush in whatever order), run over and
# over for a while with every core kept busy
# by a spinning process, so their threads are preempted at moments a quiet machine never shows.
# A race that a plain run hits once in a hundred turns up here within a minute: that is how the
# open-reservation count a checkpoint cut in the middle of a close left behind was found
# (3bd9c8a). Exits non-zero if any run failed, with each failure's output kept.
#
# A run still going after TALLY_STRESS_RUN_LIMIT seconds (default 300; a run takes a few) is a
# hang: every thread's stack is printed (with gdb, when the machine has it), the run is killed and
# counted as failed, and no run follows: a deadlock is reported with where it waits instead of
# holding CI until its time runs out.
#
#   bash scripts/stress.sh [SECONDS]      # default 120; TALLY_STRESS_SECONDS works too
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${TALLY_STRESS_SECONDS:-120}}"
run_limit="${TALLY_STRESS_RUN_LIMIT:-300}"
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
  "reservation_races - 2"
  "admission concurrent 2"
  "admission for_a_moment 4"
  "submission - 2"
  "adjustments racing 4"
  "adjustments still_in_a_batch 4"
  "idempotency - 1"
  "admin_races - 1"
  "faults_undo - 1"
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

# Runs a test binary with its output in $log; a watchdog beside it prints the stacks of a run
# past the limit into it and kills it: status 124 (as timeout(1) answers), where a failed test
# binary exits 101.
run_watched() {
  "$@" >"$log" 2>&1 &
  local test_pid=$!
  (
    trap 'kill "$sleep_pid" 2>/dev/null; exit 0' TERM
    sleep "$run_limit" &
    sleep_pid=$!
    wait "$sleep_pid"
    kill -0 "$test_pid" 2>/dev/null || exit 0
    echo "stress: still running after ${run_limit} s, taken as hung; its threads:" >>"$log.hung"
    if command -v gdb >/dev/null 2>&1; then
      timeout 120 gdb -p "$test_pid" -batch -ex "thread apply all bt" >>"$log.hung" 2>&1 || true
    fi
    kill -9 "$test_pid" 2>/dev/null || true
  ) &
  local watchdog_pid=$!
  local status=0
  wait "$test_pid" || status=$?
  kill "$watchdog_pid" 2>/dev/null || true
  wait "$watchdog_pid" 2>/dev/null || true
  if [ -f "$log.hung" ]; then
    cat "$log.hung" >>"$log"
    rm -f "$log.hung"
    return 124
  fi
  return "$status"
}

deadline=$(($(date +%s) + seconds))
rounds=0
runs_made=0
failures=0
hung=0
# Rounds until the time is up (the first run always goes); a hang ends them at once (each could
# take the limit again).
while [ "$(date +%s)" -lt "$deadline" ] && [ "$hung" -eq 0 ]; do
  rounds=$((rounds + 1))
  for run in "${runs[@]}"; do
    set -- $run
    name="$1"
    filter="$2"
    [ "$filter" = "-" ] && filter=""
    for repeat in $(seq 1 "$3"); do
      # The time is up: no more runs, even in the middle of a round (on a machine with a slow
      # disk a round of some 40 runs can take many times the step's time).
      [ "$(date +%s)" -lt "$deadline" ] || break 2
      runs_made=$((runs_made + 1))
      log="$out/$name-$rounds-$repeat.log"
      status=0
      run_watched "$(binary "$name")" -q $filter || status=$?
      if [ "$status" -eq 0 ]; then
        rm -f "$log"
        continue
      fi
      failures=$((failures + 1))
      echo "stress: round $rounds: $name ${filter:-(all)} FAILED; its output: $log" >&2
      if [ "$status" -eq 124 ]; then
        cat "$log" >&2
        hung=1
        break 2
      fi
      grep -m 5 -A 3 "panicked" "$log" >&2 || tail -n 20 "$log" >&2
    done
  done
done
echo "stress: $runs_made runs in $rounds rounds, ${seconds} s beside $cores spinning processes; $failures failed"
[ "$failures" -eq 0 ]
