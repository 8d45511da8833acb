#!/usr/bin/env bash
# Runs every Go fuzz target in the module for the given time each (default
# 20s), then prints each target's budget and executions. FUZZPAR targets run at
# once (default 1).
#
# A target fails when go test fails and either wrote a failing input to the
# package's testdata/fuzz/<target> (a crash, a failed check or a hang), or
# failed for any other reason than the fuzz coordinator's own shutdown race:
# go 1.26 can end a time-budgeted run with a bare "context deadline exceeded"
# and no input when the budget expires while a worker is mid-call
# (go.dev/issue/75804, fixed in go 1.27). Such a run is repeated once; if the
# race strikes again the target is reported "ok (75804)", its executions having
# run to the end of their budget.
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-20s}
par=${FUZZPAR:-1}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
targets=()
while read -r file; do
  pkg=./$(dirname "${file#./}")
  for target in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$file" | sed 's/^func //'); do
    targets+=("$pkg $target")
  done
done < <(grep -rl --include='*_test.go' '^func Fuzz' . | grep -v '^./test/interop/' | sort)
# inputs lists the failing inputs go test has stored for a target.
inputs() { ls "$1/testdata/fuzz/$2" 2>/dev/null | sort || true; }
# coordinator_race reports whether a failed run's log shows only the
# coordinator's deadline race: the target's FAIL line followed by nothing but
# "context deadline exceeded", no other failure and no input written.
coordinator_race() {
  local log=$1 target=$2
  grep -q "^--- FAIL: ${target} " "$log" &&
    [ "$(grep -c -- '^--- FAIL' "$log")" -eq 1 ] &&
    [ "$(sed -n "/^--- FAIL: ${target} /{n;p;}" "$log" | sed 's/^[[:space:]]*//')" = "context deadline exceeded" ] &&
    ! grep -q -e 'Failing input written' -e 'panic:' -e 'fuzzing process hung' "$log"
}
run() {
  local pkg=$1 target=$2 log before try
  log="$logs/$(echo "$pkg-$target" | tr '/.' '__').log"
  echo "== $pkg $target ($budget)"
  for try in 1 2; do
    before=$(inputs "$pkg" "$target")
    if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$budget" "$pkg" >"$log" 2>&1; then
      return 0
    fi
    if [ "$(inputs "$pkg" "$target")" = "$before" ] && coordinator_race "$log" "$target"; then
      echo "   $target: fuzz coordinator deadline race (go.dev/issue/75804), no input written (try $try)"
      [ "$try" -eq 2 ] && touch "$log.race"
      continue
    fi
    cat "$log"
    echo "FAIL $pkg $target" >"$log.failed"
    return 0
  done
}
running=0
for t in "${targets[@]}"; do
  run $t &
  running=$((running + 1))
  if [ "$running" -ge "$par" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait
status=0
echo "== fuzz summary (budget $budget each)"
for t in "${targets[@]}"; do
  set -- $t
  log="$logs/$(echo "$1-$2" | tr '/.' '__').log"
  execs=$( (grep -o "execs: [0-9]*" "$log" || true) | tail -1 | cut -d" " -f2)
  result=ok
  [ -f "$log.race" ] && result="ok (75804)"
  [ -f "$log.failed" ] && result=FAIL && status=1
  printf '%-40s %-26s %12s execs  %s\n' "$1" "$2" "${execs:-?}" "$result"
done
exit $status
