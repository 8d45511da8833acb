#!/usr/bin/env bash
# Runs every Go fuzz target in the module for the given time each (default
# 20s), then prints each target's budget and executions. FUZZPAR targets run at
# once (default 1).
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
run() {
  local pkg=$1 target=$2 log
  log="$logs/$(echo "$pkg-$target" | tr '/.' '__').log"
  echo "== $pkg $target ($budget)"
  if ! go test -run '^$' -fuzz "^${target}\$" -fuzztime "$budget" "$pkg" >"$log" 2>&1; then
    cat "$log"
    echo "FAIL $pkg $target" >"$log.failed"
  fi
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
  execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  result=ok
  [ -f "$log.failed" ] && result=FAIL && status=1
  printf '%-40s %-26s %12s execs  %s\n' "$1" "$2" "${execs:-?}" "$result"
done
exit $status
