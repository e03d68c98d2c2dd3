#!/usr/bin/env bash
# Exercises a live dfs node with grpcurl, using server reflection only (no
# .proto files at hand).
#
#   DFS_TEST_ADDR=127.0.0.1:50051 clients/grpcurl/test.sh
#
# Optional: DFS_TEST_AUTH_ADDR and DFS_TEST_TOKEN (a token file) to check
# bearer-token auth, with DFS_TEST_READ_TOKEN and DFS_TEST_WRITE_TOKEN for
# the roles; DFS_TEST_CA_FILE (and DFS_TEST_CERT_FILE, DFS_TEST_KEY_FILE) to
# reach both nodes over TLS (mutual TLS); DFS_TEST_TLS_ADDR,
# DFS_TEST_MTLS_ADDR and DFS_TEST_PKI (see clients/make-test-pki.sh) for the
# TLS cases; GRPCURL to pick the binary (default: grpcurl on PATH, or
# clients/.tools/bin/grpcurl). Needs bash, coreutils and python3 (to read the
# JSON that grpcurl prints).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
addr="${DFS_TEST_ADDR:?set DFS_TEST_ADDR to the gRPC address of a node}"
if [[ -z "${GRPCURL:-}" ]]; then
  if [[ -x "$here/../.tools/bin/grpcurl" ]]; then GRPCURL="$here/../.tools/bin/grpcurl"; else GRPCURL=grpcurl; fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
prefix="grpcurl-test/$(date +%s%N)/"
passed=0
failed=0

# How this run reaches its nodes: TLS when DFS_TEST_CA_FILE says so.
transport=(-plaintext)
if [[ -n "${DFS_TEST_CA_FILE:-}" ]]; then
  transport=(-cacert "$DFS_TEST_CA_FILE")
  if [[ -n "${DFS_TEST_CERT_FILE:-}" ]]; then
    transport+=(-cert "$DFS_TEST_CERT_FILE" -key "$DFS_TEST_KEY_FILE")
  fi
fi
g() { "$GRPCURL" "${transport[@]}" -max-time 60 "$@"; }
# gt FLAGS... -- ARGS...: grpcurl with its own transport flags, for the TLS cases.
gt() { "$GRPCURL" -max-time 20 "$@"; }

ok() { echo "ok   - $1"; passed=$((passed + 1)); }
bad() {
  echo "FAIL - $1"
  [[ -n "${2:-}" ]] && sed 's/^/       /' <<<"$2" | head -20
  failed=$((failed + 1))
}
# check NAME COMMAND...: passes when COMMAND exits 0.
check() {
  local name="$1"; shift
  local out
  if out="$("$@" 2>&1)"; then ok "$name"; else bad "$name" "$out"; fi
}

# json_field FILE PATH: prints a field of the first JSON object in FILE
# (PATH like info.sha1). grpcurl prints one pretty-printed object per message.
json_field() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
obj, _ = json.JSONDecoder().raw_decode(text.lstrip())
for part in sys.argv[2].split("."):
    obj = obj.get(part, "") if isinstance(obj, dict) else ""
print(obj)
EOF
}

# decode_download FILE OUT: writes the bytes of every data message in the
# stream of JSON objects in FILE to OUT.
decode_download() {
  python3 - "$1" "$2" <<'EOF'
import base64, json, sys
text, dec, pos = open(sys.argv[1]).read(), json.JSONDecoder(), 0
with open(sys.argv[2], "wb") as out:
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        msg, pos = dec.raw_decode(text, pos)
        if "data" in msg:
            out.write(base64.b64decode(msg["data"]))
EOF
}

# --- reflection ------------------------------------------------------------
if g "$addr" list >"$tmp/list" 2>&1 &&
  grep -qx 'dfs.v1.Storage' "$tmp/list" && grep -qx 'dfs.v1.Cluster' "$tmp/list" &&
  grep -qx 'grpc.health.v1.Health' "$tmp/list"; then
  ok "list shows dfs.v1.Storage, dfs.v1.Cluster and grpc.health.v1.Health"
else
  bad "list" "$(cat "$tmp/list")"
fi

if g "$addr" describe dfs.v1.Storage >"$tmp/describe" 2>&1 &&
  grep -q 'rpc Upload ( stream .dfs.v1.UploadRequest ) returns ( .dfs.v1.UploadResponse )' "$tmp/describe" &&
  grep -q 'rpc Download ( .dfs.v1.DownloadRequest ) returns ( stream .dfs.v1.DownloadResponse )' "$tmp/describe"; then
  ok "describe dfs.v1.Storage shows the streaming Upload and Download"
else
  bad "describe dfs.v1.Storage" "$(cat "$tmp/describe")"
fi

if g "$addr" describe dfs.v1.ObjectInfo >"$tmp/describe-info" 2>&1 && grep -q 'string sha1 = 3;' "$tmp/describe-info"; then
  ok "describe dfs.v1.ObjectInfo"
else
  bad "describe dfs.v1.ObjectInfo" "$(cat "$tmp/describe-info")"
fi

# --- health ----------------------------------------------------------------
if g "$addr" grpc.health.v1.Health/Check >"$tmp/health" 2>&1 && grep -q '"status": "SERVING"' "$tmp/health"; then
  ok "health check (server) is SERVING"
else
  bad "health check" "$(cat "$tmp/health")"
fi
if g -d '{"service":"dfs.v1.Storage"}' "$addr" grpc.health.v1.Health/Check >"$tmp/health2" 2>&1 &&
  grep -q '"status": "SERVING"' "$tmp/health2"; then
  ok "health check (dfs.v1.Storage) is SERVING"
else
  bad "health check dfs.v1.Storage" "$(cat "$tmp/health2")"
fi

# --- client-streaming upload from stdin --------------------------------------
# 3 MiB + 5 bytes of random data, sent as a header then 512 KiB data messages.
key="${prefix}blob.bin"
head -c $((3 * 1024 * 1024 + 5)) /dev/urandom >"$tmp/blob"
size=$(stat -c %s "$tmp/blob")
sha1=$(sha1sum "$tmp/blob" | cut -d' ' -f1)
mkdir "$tmp/parts"
split -b 524288 -a 3 "$tmp/blob" "$tmp/parts/p"
{
  printf '{"header": {"key": "%s", "content_type": "application/x-test", "metadata": {"via": "grpcurl"}}}\n' "$key"
  for part in "$tmp"/parts/p*; do
    printf '{"data": "%s"}\n' "$(base64 -w0 "$part")"
  done
} >"$tmp/upload.json"
if g -d @ "$addr" dfs.v1.Storage/Upload <"$tmp/upload.json" >"$tmp/upload.out" 2>&1 &&
  [[ "$(json_field "$tmp/upload.out" object.sha1)" == "$sha1" ]] &&
  [[ "$(json_field "$tmp/upload.out" object.size)" == "$size" ]]; then
  ok "Upload (client streaming, JSON on stdin) returns the right sha1 and size"
else
  bad "Upload" "$(head -c 2000 "$tmp/upload.out")"
fi

# --- stat ------------------------------------------------------------------
if g -d "{\"key\": \"$key\"}" "$addr" dfs.v1.Storage/Stat >"$tmp/stat" 2>&1 &&
  [[ "$(json_field "$tmp/stat" sha1)" == "$sha1" ]] &&
  [[ "$(json_field "$tmp/stat" size)" == "$size" ]] &&
  [[ "$(json_field "$tmp/stat" contentType)" == "application/x-test" ]] &&
  [[ "$(json_field "$tmp/stat" metadata.via)" == "grpcurl" ]]; then
  ok "Stat"
else
  bad "Stat" "$(cat "$tmp/stat")"
fi

# --- download (server streaming) --------------------------------------------
if g -d "{\"key\": \"$key\"}" "$addr" dfs.v1.Storage/Download >"$tmp/download" 2>&1 &&
  [[ "$(json_field "$tmp/download" info.sha1)" == "$sha1" ]] &&
  decode_download "$tmp/download" "$tmp/blob.down" &&
  [[ "$(sha1sum "$tmp/blob.down" | cut -d' ' -f1)" == "$sha1" ]]; then
  ok "Download returns info first, then data with the same sha1"
else
  bad "Download" "$(head -c 2000 "$tmp/download")"
fi

# A range: 100000 bytes starting at 1 MiB - 7 (crosses a chunk boundary for
# chunk sizes of 1 MiB).
off=$((1024 * 1024 - 7))
len=100000
if g -d "{\"key\": \"$key\", \"offset\": $off, \"length\": $len}" "$addr" dfs.v1.Storage/Download >"$tmp/range" 2>&1 &&
  decode_download "$tmp/range" "$tmp/range.down" &&
  cmp -s "$tmp/range.down" <(tail -c +$((off + 1)) "$tmp/blob" | head -c $len); then
  ok "Download of a byte range"
else
  bad "Download range" "$(head -c 2000 "$tmp/range")"
fi

if ! g -d "{\"key\": \"$key\", \"offset\": $((size + 100)), \"length\": 1}" "$addr" dfs.v1.Storage/Download >"$tmp/oor" 2>&1 &&
  grep -q 'Code: OutOfRange' "$tmp/oor"; then
  ok "Download beyond the end is OutOfRange"
else
  bad "Download beyond the end" "$(head -c 2000 "$tmp/oor")"
fi

# --- list, delete -------------------------------------------------------------
if g -d "{\"prefix\": \"$prefix\"}" "$addr" dfs.v1.Storage/List >"$tmp/list-objs" 2>&1 &&
  grep -q "\"key\": \"$key\"" "$tmp/list-objs"; then
  ok "List with a prefix"
else
  bad "List" "$(cat "$tmp/list-objs")"
fi

check "Delete" g -d "{\"key\": \"$key\"}" "$addr" dfs.v1.Storage/Delete
if ! g -d "{\"key\": \"$key\"}" "$addr" dfs.v1.Storage/Stat >"$tmp/gone" 2>&1 && grep -q 'Code: NotFound' "$tmp/gone"; then
  ok "Stat after Delete is NotFound"
else
  bad "Stat after Delete" "$(cat "$tmp/gone")"
fi

check "Cluster/Status" g "$addr" dfs.v1.Cluster/Status

# --- auth ------------------------------------------------------------------
if [[ -n "${DFS_TEST_AUTH_ADDR:-}" && -n "${DFS_TEST_TOKEN:-}" ]]; then
  auth_addr="$DFS_TEST_AUTH_ADDR"
  token="$(tr -d '[:space:]' <"$DFS_TEST_TOKEN")"
  if g -H "authorization: Bearer $token" "$auth_addr" dfs.v1.Cluster/Status >"$tmp/auth-ok" 2>&1; then
    ok "Status with the right token"
  else
    bad "Status with the right token" "$(cat "$tmp/auth-ok")"
  fi
  if ! g -H "authorization: Bearer wrong-$token" "$auth_addr" dfs.v1.Cluster/Status >"$tmp/auth-bad" 2>&1 &&
    grep -q 'Code: Unauthenticated' "$tmp/auth-bad"; then
    ok "Status with a wrong token is Unauthenticated"
  else
    bad "Status with a wrong token" "$(cat "$tmp/auth-bad")"
  fi
  if ! g -d '{"key": "x"}' "$auth_addr" dfs.v1.Storage/Stat >"$tmp/auth-none" 2>&1 &&
    grep -q 'Code: Unauthenticated' "$tmp/auth-none"; then
    ok "Stat without a token is Unauthenticated"
  else
    bad "Stat without a token" "$(cat "$tmp/auth-none")"
  fi
  if g "$auth_addr" list >"$tmp/auth-list" 2>&1 && grep -qx 'dfs.v1.Storage' "$tmp/auth-list"; then
    ok "reflection needs no token"
  else
    bad "reflection without a token" "$(cat "$tmp/auth-list")"
  fi
else
  echo "skip - auth (DFS_TEST_AUTH_ADDR / DFS_TEST_TOKEN not set)"
fi

# --- roles -----------------------------------------------------------------
if [[ -n "${DFS_TEST_AUTH_ADDR:-}" && -n "${DFS_TEST_READ_TOKEN:-}" && -n "${DFS_TEST_WRITE_TOKEN:-}" ]]; then
  read_h="authorization: Bearer $(tr -d '[:space:]' <"$DFS_TEST_READ_TOKEN")"
  write_h="authorization: Bearer $(tr -d '[:space:]' <"$DFS_TEST_WRITE_TOKEN")"
  rkey="${prefix}roles.txt"
  if ! g -H "$read_h" -d "{\"key\": \"$rkey\"}" "$DFS_TEST_AUTH_ADDR" dfs.v1.Storage/Stat >"$tmp/r-stat" 2>&1 &&
    grep -q 'Code: NotFound' "$tmp/r-stat"; then
    ok "a read token may Stat"
  else
    bad "Stat with a read token" "$(cat "$tmp/r-stat")"
  fi
  printf '{"header": {"key": "%s"}}\n{"data": "aGk="}\n' "$rkey" >"$tmp/r-up.json"
  if ! g -H "$read_h" -d @ "$DFS_TEST_AUTH_ADDR" dfs.v1.Storage/Upload <"$tmp/r-up.json" >"$tmp/r-up" 2>&1 &&
    grep -q 'Code: PermissionDenied' "$tmp/r-up" && grep -q 'role write' "$tmp/r-up"; then
    ok "a read token may not Upload (PermissionDenied, naming the role)"
  else
    bad "Upload with a read token" "$(cat "$tmp/r-up")"
  fi
  if g -H "$write_h" -d @ "$DFS_TEST_AUTH_ADDR" dfs.v1.Storage/Upload <"$tmp/r-up.json" >"$tmp/w-up" 2>&1 &&
    g -H "$write_h" -d "{\"key\": \"$rkey\"}" "$DFS_TEST_AUTH_ADDR" dfs.v1.Storage/Delete >>"$tmp/w-up" 2>&1; then
    ok "a write token may Upload and Delete"
  else
    bad "Upload and Delete with a write token" "$(cat "$tmp/w-up")"
  fi
  if ! g -H "$write_h" -d '{"node_id": "no-such-node"}' "$DFS_TEST_AUTH_ADDR" dfs.v1.Cluster/ForgetMember >"$tmp/w-forget" 2>&1 &&
    grep -q 'Code: PermissionDenied' "$tmp/w-forget"; then
    ok "a write token may not ForgetMember"
  else
    bad "ForgetMember with a write token" "$(cat "$tmp/w-forget")"
  fi
else
  echo "skip - roles (DFS_TEST_AUTH_ADDR / DFS_TEST_READ_TOKEN / DFS_TEST_WRITE_TOKEN not set)"
fi

# --- TLS -------------------------------------------------------------------
if [[ -n "${DFS_TEST_PKI:-}" && -n "${DFS_TEST_TLS_ADDR:-}" && -n "${DFS_TEST_MTLS_ADDR:-}" ]]; then
  pki="$DFS_TEST_PKI"
  check "TLS node, trusting its CA" gt -cacert "$pki/ca.pem" "$DFS_TEST_TLS_ADDR" grpc.health.v1.Health/Check
  if ! gt -cacert "$pki/other-ca.pem" "$DFS_TEST_TLS_ADDR" grpc.health.v1.Health/Check >"$tmp/tls-wrong" 2>&1; then
    ok "TLS node, trusting another CA: refused"
  else
    bad "TLS node with another CA succeeded" "$(cat "$tmp/tls-wrong")"
  fi
  check "mTLS node with a client certificate" gt -cacert "$pki/ca.pem" -cert "$pki/client.pem" -key "$pki/client.key" \
    "$DFS_TEST_MTLS_ADDR" grpc.health.v1.Health/Check
  if ! gt -cacert "$pki/ca.pem" "$DFS_TEST_MTLS_ADDR" grpc.health.v1.Health/Check >"$tmp/mtls-none" 2>&1; then
    ok "mTLS node without a client certificate: refused"
  else
    bad "mTLS node without a client certificate succeeded" "$(cat "$tmp/mtls-none")"
  fi
  if ! gt -cacert "$pki/ca.pem" -cert "$pki/stranger.pem" -key "$pki/stranger.key" \
    "$DFS_TEST_MTLS_ADDR" grpc.health.v1.Health/Check >"$tmp/mtls-stranger" 2>&1; then
    ok "mTLS node with a certificate from another CA: refused"
  else
    bad "mTLS node with a stranger's certificate succeeded" "$(cat "$tmp/mtls-stranger")"
  fi
else
  echo "skip - TLS (DFS_TEST_PKI / DFS_TEST_TLS_ADDR / DFS_TEST_MTLS_ADDR not set)"
fi

echo "grpcurl: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
