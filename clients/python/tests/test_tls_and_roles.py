"""TLS, mutual TLS and scoped tokens against live nodes started by
clients/run-tests.sh.

DFS_TEST_TLS_ADDR: a node speaking TLS; DFS_TEST_MTLS_ADDR: one that also
requires a client certificate; DFS_TEST_PKI: a directory with ca.pem (signed
both nodes' certificates), other-ca.pem (signed none of theirs),
client.pem/client.key (from the CA the mTLS node trusts) and
stranger.pem/stranger.key (from another CA). DFS_TEST_AUTH_ADDR with
DFS_TEST_READ_TOKEN, DFS_TEST_WRITE_TOKEN and DFS_TEST_TOKEN (admin): files
holding one token of each role.
"""

import io
import os
import time

import grpc
import pytest

from dfs_client import Client, DfsError, NotFoundError, PermissionDeniedError

PKI = os.environ.get("DFS_TEST_PKI")
TLS_ADDR = os.environ.get("DFS_TEST_TLS_ADDR")
MTLS_ADDR = os.environ.get("DFS_TEST_MTLS_ADDR")
AUTH_ADDR = os.environ.get("DFS_TEST_AUTH_ADDR")
PREFIX = f"py-tls-roles/{time.time_ns()}/"
TRANSPORT = {
    name: os.environ[env]
    for name, env in (("ca_file", "DFS_TEST_CA_FILE"), ("cert_file", "DFS_TEST_CERT_FILE"), ("key_file", "DFS_TEST_KEY_FILE"))
    if os.environ.get(env)
}

needs_pki = pytest.mark.skipif(not (PKI and TLS_ADDR and MTLS_ADDR), reason="DFS_TEST_PKI / DFS_TEST_TLS_ADDR / DFS_TEST_MTLS_ADDR not set")


def pki(name):
    return os.path.join(PKI, name)


def status(addr, **kw):
    """Status over a fresh connection; the first call runs the handshake.
    A short timeout: a refused handshake must fail, not hang."""
    with Client(addr, timeout=20, **kw) as c:
        return c.status()


@needs_pki
def test_tls_with_the_right_ca_only():
    assert status(TLS_ADDR, ca_file=pki("ca.pem")).node_id
    with pytest.raises(DfsError) as e:
        status(TLS_ADDR, ca_file=pki("other-ca.pem"))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(DfsError):
        status(TLS_ADDR)  # plaintext on the TLS port
    with pytest.raises(OSError):
        Client(TLS_ADDR, ca_file=pki("no-such.pem"))


@needs_pki
def test_mutual_tls_needs_a_certificate_from_the_client_ca():
    assert status(MTLS_ADDR, ca_file=pki("ca.pem"), cert_file=pki("client.pem"), key_file=pki("client.key")).node_id
    with pytest.raises(DfsError):
        status(MTLS_ADDR, ca_file=pki("ca.pem"))
    with pytest.raises(DfsError):
        status(MTLS_ADDR, ca_file=pki("ca.pem"), cert_file=pki("stranger.pem"), key_file=pki("stranger.key"))
    with pytest.raises(ValueError):
        Client(MTLS_ADDR, ca_file=pki("ca.pem"), cert_file=pki("client.pem"))


def role_client(env):
    path = os.environ.get(env)
    if not (AUTH_ADDR and path):
        pytest.skip(f"DFS_TEST_AUTH_ADDR / {env} not set")
    return Client(AUTH_ADDR, token_file=path, timeout=60, **TRANSPORT)


def test_roles():
    key = PREFIX + "by-writer.txt"
    with role_client("DFS_TEST_READ_TOKEN") as reader, role_client("DFS_TEST_WRITE_TOKEN") as writer, role_client(
        "DFS_TEST_TOKEN"
    ) as admin:
        # read: Stat, List, Status; not Upload or Delete.
        with pytest.raises(NotFoundError):
            reader.stat(key)
        reader.list(PREFIX)
        assert reader.status().node_id
        with pytest.raises(PermissionDeniedError) as e:
            reader.upload(key, io.BytesIO(b"no"))
        assert "role write" in e.value.details

        # write: Upload and Delete; not membership changes.
        assert writer.upload(key, io.BytesIO(b"yes")).size == 3
        with pytest.raises(PermissionDeniedError):
            reader.delete(key)
        assert reader.read(key) == b"yes"
        with pytest.raises(PermissionDeniedError):
            writer.forget_member("no-such-node")
        writer.delete(key)

        # admin: past auth; no such member.
        with pytest.raises(NotFoundError):
            admin.forget_member("no-such-node")
