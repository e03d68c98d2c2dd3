#!/usr/bin/env bash
# Starts three dfs nodes on free loopback ports (one open, one requiring a
# bearer token, one whose chunk files the suites damage), runs the client
# test suites against them, and stops the nodes again, also when a suite
# fails or the script is interrupted.
#
#   clients/run-tests.sh                 # all suites: go python ts grpcurl
#   clients/run-tests.sh go grpcurl      # some of them
#
# Expects the tools from `make clients-deps` (clients/.tools, clients/ts/node_modules)
# and a built node (DFS_BIN, default target/release/dfs; `make clients-test`
# builds it). Exits non-zero if any suite failed.
set -uo pipefail

clients="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$clients/.." && pwd)"
bin="${DFS_BIN:-$root/target/release/dfs}"
tools="$clients/.tools"
suites=("$@")
[[ ${#suites[@]} -eq 0 ]] && suites=(go python ts grpcurl)

if [[ ! -x "$bin" ]]; then
  echo "run-tests: no node binary at $bin (run: cargo build --release)" >&2
  exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/dfs-clients-test.XXXXXX")"
pids=()

stop_nodes() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # Give each node its drain time, then insist.
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "run-tests: node $pid did not exit after SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null
    local rc=$?
    if [[ $rc -ne 0 && $rc -ne 143 ]]; then
      echo "run-tests: node $pid exited with status $rc" >&2
    fi
  done
  pids=()
}
cleanup() {
  stop_nodes
  if [[ "${KEEP_TEST_DIR:-}" != 1 ]]; then rm -rf "$work"; else echo "run-tests: kept $work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_node NAME [ARGS...]: starts a node and prints its gRPC address.
start_node() {
  local name="$1"; shift
  local dir="$work/$name"
  mkdir -p "$dir"
  "$bin" node --data "$dir/data" --grpc-addr 127.0.0.1:0 --p2p-addr 127.0.0.1:0 --addr-file "$dir/addr" \
    --chunk-size 1MiB "$@" >"$dir/log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 1 600); do
    if [[ -s "$dir/addr" ]]; then
      NODE_ADDR="$(head -n1 "$dir/addr" | tr -d '[:space:]')"
      [[ -n "$NODE_ADDR" ]] && return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run-tests: node $name exited before serving; its log:" >&2
      cat "$dir/log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "run-tests: node $name did not write its address within 60s; its log:" >&2
  cat "$dir/log" >&2
  return 1
}

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
start_node open || exit 1
open_addr="$NODE_ADDR"
start_node auth --auth-token-file "$work/token" || exit 1
auth_addr="$NODE_ADDR"
# A node whose chunk files the suites damage (it has no peers, so a chunk
# that fails verification ends a download with DATA_LOSS mid-stream).
start_node damage || exit 1
damage_addr="$NODE_ADDR"
echo "run-tests: node without auth at $open_addr, node with auth at $auth_addr, node to damage at $damage_addr"

export DFS_TEST_ADDR="$open_addr"
export DFS_TEST_AUTH_ADDR="$auth_addr"
export DFS_TEST_TOKEN="$work/token"
export DFS_TEST_DAMAGE_ADDR="$damage_addr"
export DFS_TEST_DAMAGE_DATA="$work/damage/data"

python="$tools/venv/bin/python"
[[ -x "$python" ]] || python=python3

run_suite() {
  case "$1" in
    go) (cd "$clients/go" && go test -count=1 -v ./...) ;;
    python) (cd "$work" && "$python" -m pytest -v -p no:cacheprovider "$clients/python/tests") ;;
    ts) (cd "$clients/ts" && npm test --silent) ;;
    grpcurl) GRPCURL="${GRPCURL:-$tools/bin/grpcurl}" bash "$clients/grpcurl/test.sh" ;;
    *) echo "run-tests: unknown suite $1" >&2; return 2 ;;
  esac
}

results=()
failed=0
for suite in "${suites[@]}"; do
  echo
  echo "=== $suite ==="
  if run_suite "$suite"; then
    results+=("ok   $suite")
  else
    results+=("FAIL $suite")
    failed=$((failed + 1))
  fi
done

echo
echo "=== summary ==="
printf '%s\n' "${results[@]}"
echo "client suites: $((${#suites[@]} - failed)) passed, $failed failed"
[[ $failed -eq 0 ]]
