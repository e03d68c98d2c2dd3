#!/usr/bin/env bash
# Starts dfs nodes on free loopback ports, runs the client test suites
# against them, and stops the nodes again, also when a suite fails or the
# script is interrupted. Every suite runs three times:
#
#   plain  an open node and one requiring bearer tokens (one per role), plaintext
#   tls    the same pair serving TLS (certificates made here, at test time)
#   mtls   the same pair requiring client certificates as well
#
# Each pass also has a node whose chunk files the suites damage (it has no
# peers, so a chunk that fails verification ends a download with DATA_LOSS
# after data has started). In every pass the suites also get the TLS and
# mTLS nodes and the test PKI (DFS_TEST_TLS_ADDR, DFS_TEST_MTLS_ADDR,
# DFS_TEST_PKI) for their TLS cases.
#
#   clients/run-tests.sh                 # all suites: go python ts grpcurl
#   clients/run-tests.sh go grpcurl      # some of them
#   PASSES=plain clients/run-tests.sh    # some passes (default: plain tls mtls)
#
# Expects the tools from `make clients-deps` (clients/.tools, clients/ts/node_modules)
# and a built node (DFS_BIN, default target/release/dfs; `make clients-test`
# builds it), and openssl on PATH. Exits non-zero if any suite failed.
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

# --- test PKI and tokens ------------------------------------------------------
pki="$work/pki"
bash "$clients/make-test-pki.sh" "$pki" || { echo "run-tests: cannot make test certificates" >&2; exit 1; }

random_token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
for role in read write admin; do random_token >"$work/token-$role"; done
{
  echo "# one token per role, as \`dfs node --auth-token-file\` reads them"
  for role in read write admin; do echo "$role $(cat "$work/token-$role")"; done
} >"$work/tokens"

# --- nodes ---------------------------------------------------------------------
tls_flags=(--tls-cert-file "$pki/server.pem" --tls-key-file "$pki/server.key")
mtls_flags=("${tls_flags[@]}" --tls-client-ca-file "$pki/client-ca.pem")
declare -A addr
for pass in plain tls mtls; do
  case "$pass" in
    plain) flags=() ;;
    tls) flags=("${tls_flags[@]}") ;;
    mtls) flags=("${mtls_flags[@]}") ;;
  esac
  start_node "$pass-open" ${flags[@]+"${flags[@]}"} || exit 1
  addr[$pass-open]="$NODE_ADDR"
  start_node "$pass-auth" --auth-token-file "$work/tokens" ${flags[@]+"${flags[@]}"} || exit 1
  addr[$pass-auth]="$NODE_ADDR"
  start_node "$pass-damage" ${flags[@]+"${flags[@]}"} || exit 1
  addr[$pass-damage]="$NODE_ADDR"
  echo "run-tests: $pass: node without auth at ${addr[$pass-open]}, node with auth at ${addr[$pass-auth]}, node to damage at ${addr[$pass-damage]}"
done

export DFS_TEST_TOKEN="$work/token-admin"
export DFS_TEST_WRITE_TOKEN="$work/token-write"
export DFS_TEST_READ_TOKEN="$work/token-read"
export DFS_TEST_PKI="$pki"
export DFS_TEST_TLS_ADDR="${addr[tls-open]}"
export DFS_TEST_MTLS_ADDR="${addr[mtls-open]}"

# use_pass PASS: points the suites at that pass's nodes and transport.
use_pass() {
  export DFS_TEST_ADDR="${addr[$1-open]}"
  export DFS_TEST_AUTH_ADDR="${addr[$1-auth]}"
  export DFS_TEST_DAMAGE_ADDR="${addr[$1-damage]}"
  export DFS_TEST_DAMAGE_DATA="$work/$1-damage/data"
  unset DFS_TEST_CA_FILE DFS_TEST_CERT_FILE DFS_TEST_KEY_FILE
  case "$1" in
    tls) export DFS_TEST_CA_FILE="$pki/ca.pem" ;;
    mtls)
      export DFS_TEST_CA_FILE="$pki/ca.pem"
      export DFS_TEST_CERT_FILE="$pki/client.pem"
      export DFS_TEST_KEY_FILE="$pki/client.key"
      ;;
  esac
}

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

read -r -a passes <<<"${PASSES:-plain tls mtls}"
results=()
failed=0
runs=0
for pass in "${passes[@]}"; do
  use_pass "$pass"
  for suite in "${suites[@]}"; do
    echo
    echo "=== $suite ($pass) ==="
    runs=$((runs + 1))
    if run_suite "$suite"; then
      results+=("ok   $suite ($pass)")
    else
      results+=("FAIL $suite ($pass)")
      failed=$((failed + 1))
    fi
  done
done

echo
echo "=== summary ==="
printf '%s\n' "${results[@]}"
echo "client suites: $((runs - failed)) passed, $failed failed"
[[ $failed -eq 0 ]]
