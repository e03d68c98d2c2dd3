"""Tests against a live node, started by clients/run-tests.sh.

Environment: DFS_TEST_ADDR (node without auth), DFS_TEST_AUTH_ADDR (node that
requires a bearer token), DFS_TEST_TOKEN (file holding that token) and
DFS_TEST_DAMAGE_ADDR/DFS_TEST_DAMAGE_DATA (a node whose chunk files a test
damages, and its data directory). With DFS_TEST_CA_FILE (and
DFS_TEST_CERT_FILE, DFS_TEST_KEY_FILE) the nodes speak TLS (mutual TLS), and
every client here connects that way (``**TRANSPORT``).
"""

import hashlib
import io
import os
import time

import grpc
import pytest

import dfs_client
from dfs_client import Client, DfsError, NotFoundError, OutOfRangeError, UnauthenticatedError

FILE_SIZE = 10 * 1024 * 1024
PREFIX = f"py-test/{time.time_ns()}/"

ADDR = os.environ.get("DFS_TEST_ADDR")
AUTH_ADDR = os.environ.get("DFS_TEST_AUTH_ADDR")
TOKEN_FILE = os.environ.get("DFS_TEST_TOKEN")

#: How this run reaches its nodes: TLS when clients/run-tests.sh says so.
TRANSPORT = {
    name: os.environ[env]
    for name, env in (("ca_file", "DFS_TEST_CA_FILE"), ("cert_file", "DFS_TEST_CERT_FILE"), ("key_file", "DFS_TEST_KEY_FILE"))
    if os.environ.get(env)
}

needs_node = pytest.mark.skipif(not ADDR, reason="DFS_TEST_ADDR not set; run clients/run-tests.sh")


@pytest.fixture
def client():
    with Client(ADDR, timeout=120, **TRANSPORT) as c:
        yield c


@pytest.fixture
def big_file(tmp_path):
    """10 MiB of random data in a file, written and hashed a MiB at a time."""
    path = tmp_path / "random.bin"
    h = hashlib.sha1()
    with open(path, "wb") as f:
        for _ in range(FILE_SIZE // (1 << 20)):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    return path, h.hexdigest()


class HashingWriter(io.RawIOBase):
    """A file object that only hashes what is written to it."""

    def __init__(self):
        self.h = hashlib.sha1()
        self.n = 0

    def writable(self):
        return True

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return len(b)


def test_stubs_import_inside_package():
    from dfs_client.v1 import cluster_pb2_grpc, storage_pb2, storage_pb2_grpc

    assert storage_pb2_grpc.dfs_dot_v1_dot_storage__pb2 is storage_pb2
    assert storage_pb2.DESCRIPTOR.package == "dfs.v1"
    assert hasattr(cluster_pb2_grpc, "ClusterStub")
    assert hasattr(storage_pb2_grpc, "StorageStub")


@needs_node
def test_round_trip(client, big_file, tmp_path):
    path, sha1 = big_file
    key = PREFIX + "roundtrip/big.bin"

    info = client.upload(key, path, content_type="application/octet-stream", metadata={"lang": "python"})
    assert (info.key, info.size, info.sha1) == (key, FILE_SIZE, sha1)

    # Download to a path and compare hashes.
    out = tmp_path / "copy.bin"
    dinfo = client.download(key, out)
    assert dinfo.sha1 == sha1
    assert out.stat().st_size == FILE_SIZE
    h = hashlib.sha1()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    assert h.hexdigest() == sha1

    # Download to a file object that never holds the data.
    w = HashingWriter()
    client.download(key, w)
    assert (w.n, w.h.hexdigest()) == (FILE_SIZE, sha1)

    # Ranges, including length 0 (to the end) and spans crossing chunks.
    data = path.read_bytes()
    for off, n in [(0, 1), (123_457, 3 << 20), (FILE_SIZE - 1000, 0), (FILE_SIZE - 1, 1)]:
        buf = io.BytesIO()
        client.download(key, buf, offset=off, length=n)
        end = FILE_SIZE if n == 0 else off + n
        assert buf.getvalue() == data[off:end], (off, n)
    with pytest.raises(OutOfRangeError) as e:
        client.download(key, io.BytesIO(), offset=FILE_SIZE + 10, length=5)
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE

    # By content hash, as an iterator.
    with client.open_download(sha1=sha1) as d:
        assert d.info.size == FILE_SIZE
        assert hashlib.sha1(b"".join(d)).hexdigest() == sha1

    st = client.stat(key)
    assert (st.size, st.sha1, st.content_type, st.metadata) == (
        FILE_SIZE,
        sha1,
        "application/octet-stream",
        {"lang": "python"},
    )
    assert st.created.year >= 2024

    client.delete(key)
    with pytest.raises(NotFoundError) as e:
        client.stat(key)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(e.value, DfsError)
    missing = tmp_path / "missing.bin"
    with pytest.raises(NotFoundError):
        client.download(key, missing)
    assert not missing.exists(), "a failed download left a partial file"


@needs_node
def test_list_prefix(client):
    prefix = PREFIX + "list/"
    keys = [prefix + "a", prefix + "b/c", prefix + "d"]
    for i, k in enumerate(keys):
        client.upload(k, io.BytesIO(b"x" * (i + 1)))
    client.upload(PREFIX + "other", io.BytesIO(b"no"))

    assert [o.key for o in client.list(prefix)] == keys
    assert [o.size for o in client.list(prefix)] == [1, 2, 3]
    paged = list(client.iter_list(prefix, page_size=2))
    assert [o.key for o in paged] == keys
    objects, token = client.list_page(prefix, page_size=2)
    assert len(objects) == 2 and token

    for k in keys + [PREFIX + "other"]:
        client.delete(k)
    assert client.list(prefix) == []


@needs_node
def test_errors(client):
    with pytest.raises(NotFoundError):
        client.stat(PREFIX + "missing")
    with pytest.raises(DfsError) as e:
        client.upload("", io.BytesIO(b"x"))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(dfs_client.DataLossError):
        client.upload(PREFIX + "badsha", io.BytesIO(b"hello"), expected_sha1="0" * 40)
    with pytest.raises(NotFoundError):
        client.stat(PREFIX + "badsha")


@needs_node
def test_failed_read_aborts_upload(client):
    class Broken(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def readable(self):
            return True

        def read(self, n=-1):
            self.calls += 1
            if self.calls > 3:
                raise OSError("disk on fire")
            return b"y" * n

    key = PREFIX + "broken"
    with pytest.raises(OSError, match="disk on fire"):
        client.upload(key, Broken())
    with pytest.raises(NotFoundError):
        client.stat(key)


@needs_node
def test_status(client):
    assert client.status().node_id


@pytest.mark.skipif(not (AUTH_ADDR and TOKEN_FILE), reason="DFS_TEST_AUTH_ADDR / DFS_TEST_TOKEN not set")
def test_auth():
    key = PREFIX + "auth/hello.txt"
    with Client(AUTH_ADDR, token_file=TOKEN_FILE, timeout=60, **TRANSPORT) as good:
        info = good.upload(key, io.BytesIO(b"hello, auth"))
        assert info.size == 11
        assert good.read(key) == b"hello, auth"
        with Client(AUTH_ADDR, token="not-the-token", timeout=60, **TRANSPORT) as wrong:
            with pytest.raises(UnauthenticatedError) as e:
                wrong.stat(key)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(UnauthenticatedError):
                wrong.upload(key + ".2", io.BytesIO(b"x"))
        with Client(AUTH_ADDR, timeout=60, **TRANSPORT) as none:
            with pytest.raises(UnauthenticatedError):
                none.list(PREFIX)
        good.delete(key)


DAMAGE_ADDR = os.environ.get("DFS_TEST_DAMAGE_ADDR")
DAMAGE_DATA = os.environ.get("DFS_TEST_DAMAGE_DATA")
CHUNK = 1 << 20  # the test nodes' --chunk-size


def _chunk_files():
    out = set()
    for root, _, files in os.walk(os.path.join(DAMAGE_DATA, "chunks")):
        out.update(os.path.join(root, f) for f in files)
    return out


def _upload_new_chunk(c, key, data):
    """Uploads data and returns the one chunk file the upload added."""
    before = _chunk_files()
    c.upload(key, io.BytesIO(data))
    added = _chunk_files() - before
    assert len(added) == 1, f"upload of {key} added {sorted(added)}"
    return added.pop()


@pytest.fixture
def damaged_object():
    """An object of two chunks on a node with no peers whose second chunk
    fails verification: a download sends the first chunk's bytes, then ends
    with DATA_LOSS. Returns (key, first chunk)."""
    if not DAMAGE_ADDR or not DAMAGE_DATA:
        pytest.fail("DFS_TEST_DAMAGE_ADDR/DFS_TEST_DAMAGE_DATA not set; run clients/run-tests.sh")
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)
    key = PREFIX + f"midstream-{time.time_ns()}"
    with Client(DAMAGE_ADDR, timeout=120, **TRANSPORT) as c:
        _upload_new_chunk(c, key + "-head", first)
        victim = _upload_new_chunk(c, key, first + second)
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    return key, first


def test_an_error_after_data_has_started_reaches_the_caller(damaged_object, tmp_path):
    key, first = damaged_object
    with Client(DAMAGE_ADDR, timeout=120, **TRANSPORT) as c:
        # Streaming: the first chunk arrives, then the error.
        got = bytearray()
        with pytest.raises(dfs_client.DataLossError):
            with c.open_download(key) as d:
                for piece in d:
                    got += piece
        assert bytes(got) == first, f"{len(got)} bytes before the error"
        # To a path: an error, and no partial file left behind.
        target = tmp_path / "out.bin"
        with pytest.raises(dfs_client.DataLossError):
            c.download(key, target)
        assert not target.exists(), "a partial file was left"
        assert list(tmp_path.iterdir()) == []
        # Into memory.
        with pytest.raises(dfs_client.DataLossError):
            c.read(key)
