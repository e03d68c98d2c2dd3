#!/usr/bin/env bash
# Makes the certificates the client suites test TLS with, into DIR, using
# the machine's openssl. Everything is made fresh on every run and lives
# only in the test's temp directory: no key is ever committed.
#
#   clients/make-test-pki.sh DIR
#
#   ca.pem                     the CA that signs the nodes' certificate
#   server.pem, server.key     the nodes' certificate: 127.0.0.1 and localhost
#   client-ca.pem              the CA an mTLS node trusts for clients
#   client.pem, client.key     a client certificate from client-ca
#   other-ca.pem               a CA nobody here trusts
#   stranger.pem, stranger.key a client certificate from other-ca
set -euo pipefail

dir="${1:?usage: make-test-pki.sh DIR}"
mkdir -p "$dir"
cd "$dir"
days=2

# new_ca NAME CN: a self-signed CA certificate NAME.pem and its key NAME.key.
new_ca() {
  openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$1.key" -out "$1.pem" -days "$days" -subj "/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

# new_leaf NAME CA EXTENSIONS: NAME.pem (signed by CA) and NAME.key.
new_leaf() {
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=dfs test $1" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
    -days "$days" -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

new_ca ca "dfs test CA"
new_ca client-ca "dfs test client CA"
new_ca other-ca "some other CA"
new_leaf server ca $'extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost'
new_leaf client client-ca "extendedKeyUsage=clientAuth"
new_leaf stranger other-ca "extendedKeyUsage=clientAuth"
chmod 600 ./*.key
