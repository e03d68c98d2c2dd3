"""A small, streaming wrapper over the generated dfs.v1 gRPC stubs."""

from __future__ import annotations

import datetime as _dt
import io
import os
import threading
from dataclasses import dataclass, field
from typing import IO, BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import grpc

from .v1 import cluster_pb2, cluster_pb2_grpc, storage_pb2, storage_pb2_grpc

#: Size of the data messages an upload sends. The node accepts at most 1 MiB.
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1024 * 1024

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO, IO[bytes]]


# --------------------------------------------------------------------------
# Errors


class DfsError(Exception):
    """A failed call. ``code`` is the gRPC status code (a grpc.StatusCode)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details


class NotFoundError(DfsError):
    """NOT_FOUND: no object under that key (or hash)."""


class InvalidArgumentError(DfsError):
    """INVALID_ARGUMENT: a malformed request, such as an empty key."""


class DataLossError(DfsError):
    """DATA_LOSS: stored data failed verification, or expected_sha1 did not match."""


class OutOfRangeError(DfsError):
    """OUT_OF_RANGE: a download range that starts beyond the end of the object."""


class UnauthenticatedError(DfsError):
    """UNAUTHENTICATED: a missing or wrong bearer token."""


class PermissionDeniedError(DfsError):
    """PERMISSION_DENIED: the token's role does not allow the call (a read
    token uploading, say); the message names the role needed."""


_ERRORS = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def _error(e: grpc.RpcError) -> DfsError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    err = _ERRORS.get(code, DfsError)(code, details or "")
    err.__cause__ = e
    return err


# --------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Version:
    """Orders writes of one key: the larger hybrid logical clock wins."""

    hlc: int = 0
    node_id: str = ""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha1: str  #: lowercase hex SHA-1 of the whole file
    chunk_count: int = 0
    chunk_size: int = 0
    content_type: str = ""
    metadata: Dict[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    version: Version = Version()

    @property
    def created(self) -> _dt.datetime:
        return _dt.datetime.fromtimestamp(self.created_unix_ms / 1000, tz=_dt.timezone.utc)

    @classmethod
    def from_proto(cls, p: storage_pb2.ObjectInfo) -> "ObjectInfo":
        return cls(
            key=p.key,
            size=p.size,
            sha1=p.sha1,
            chunk_count=p.chunk_count,
            chunk_size=p.chunk_size,
            content_type=p.content_type,
            metadata=dict(p.metadata),
            created_unix_ms=p.created_unix_ms,
            version=Version(hlc=p.version.hlc, node_id=p.version.node_id),
        )


class Download:
    """An open download: ``info`` describes the object, iterating yields the
    requested bytes in chunks as they arrive. Close it (or use ``with``) to
    abandon the stream early."""

    def __init__(self, call, info: ObjectInfo):
        self._call = call
        self.info = info

    def __iter__(self) -> Iterator[bytes]:
        try:
            for msg in self._call:
                if msg.WhichOneof("msg") == "data":
                    yield msg.data
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> "Download":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------
# Client


def _read(path: Optional[Union[str, "os.PathLike[str]"]]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def tls_credentials(
    ca_file: Optional[Union[str, "os.PathLike[str]"]] = None,
    cert_file: Optional[Union[str, "os.PathLike[str]"]] = None,
    key_file: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: the CA that signed the node's
    certificate (None: the system's roots) and, for mutual TLS, a client
    certificate and its key. A file that cannot be read raises OSError."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("give both cert_file and key_file, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )


class Client:
    """A connection to one dfs node.

    >>> with Client("127.0.0.1:7070", token="secret") as c:
    ...     info = c.upload("photos/cat.jpg", "cat.jpg")
    ...     c.download("photos/cat.jpg", "copy.jpg")

    TLS: ``ca_file`` (the CA that signed the node's certificate, PEM), and
    ``cert_file``/``key_file`` for a node that requires a client certificate;
    any of them turns TLS on (without ``ca_file`` the system's roots are
    trusted). ``server_name`` overrides the name the certificate must hold.
    ``credentials`` passes ready-made channel credentials instead.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        token_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        ca_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        cert_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        key_file: Optional[Union[str, "os.PathLike[str]"]] = None,
        server_name: Optional[str] = None,
        timeout: Optional[float] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        options: Sequence[Tuple[str, object]] = (),
    ):
        if token_file is not None:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        options = list(options)
        if ca_file is not None or cert_file is not None or key_file is not None:
            if credentials is not None:
                raise ValueError("give either credentials or ca_file/cert_file/key_file")
            credentials = tls_credentials(ca_file, cert_file, key_file)
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=list(options))
        else:
            self._channel = grpc.secure_channel(target, credentials, options=list(options))
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self._chunk_size = chunk_size
        #: The generated stubs, for calls the wrapper does not cover.
        self.storage = storage_pb2_grpc.StorageStub(self._channel)
        self.cluster = cluster_pb2_grpc.ClusterStub(self._channel)

    # -- lifecycle --------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _kw(self) -> dict:
        return {"metadata": self._metadata, "timeout": self._timeout}

    # -- calls ------------------------------------------------------------

    def upload(
        self,
        key: str,
        src: PathOrFile,
        *,
        content_type: str = "",
        expected_sha1: str = "",
        metadata: Optional[Dict[str, str]] = None,
    ) -> ObjectInfo:
        """Stores a file (a path or a binary file object) under ``key``.

        The data is read and sent a chunk at a time. The object exists only if
        this returns; if reading ``src`` fails the call is cancelled, the node
        stores nothing, and the read error is raised.
        """
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                return self.upload(
                    key, f, content_type=content_type, expected_sha1=expected_sha1, metadata=metadata
                )
        header = storage_pb2.UploadHeader(
            key=key, content_type=content_type, expected_sha1=expected_sha1, metadata=metadata or {}
        )
        failure: List[BaseException] = []
        call_box: List[grpc.Future] = []
        ready = threading.Event()
        chunk_size = self._chunk_size

        def requests() -> Iterator[storage_pb2.UploadRequest]:
            yield storage_pb2.UploadRequest(header=header)
            try:
                while True:
                    chunk = src.read(chunk_size)
                    if not chunk:
                        return
                    if not isinstance(chunk, (bytes, bytearray, memoryview)):
                        raise TypeError("upload source must be opened in binary mode")
                    yield storage_pb2.UploadRequest(data=bytes(chunk))
            except Exception as e:  # abort the upload rather than commit a partial file
                failure.append(e)
                ready.wait()
                call_box[0].cancel()

        call = self.storage.Upload.future(requests(), **self._kw())
        call_box.append(call)
        ready.set()
        try:
            resp = call.result()
        except (grpc.RpcError, grpc.FutureCancelledError) as e:
            if failure:
                raise failure[0]
            if isinstance(e, grpc.RpcError):
                raise _error(e) from None
            raise DfsError(grpc.StatusCode.CANCELLED, "upload cancelled") from None
        if failure:
            raise failure[0]
        return ObjectInfo.from_proto(resp.object)

    def open_download(
        self, key: Optional[str] = None, offset: int = 0, length: int = 0, *, sha1: Optional[str] = None
    ) -> Download:
        """Starts a download of ``key`` (or of the object with content hash
        ``sha1``) and returns once the node has sent the object's info."""
        if (key is None) == (sha1 is None):
            raise ValueError("give exactly one of key and sha1")
        if key is not None:
            req = storage_pb2.DownloadRequest(key=key, offset=offset, length=length)
        else:
            req = storage_pb2.DownloadRequest(sha1=sha1, offset=offset, length=length)
        call = self.storage.Download(req, **self._kw())
        try:
            first = next(call)
        except grpc.RpcError as e:
            raise _error(e) from None
        except StopIteration:
            raise DfsError(grpc.StatusCode.INTERNAL, "download stream ended without info") from None
        if first.WhichOneof("msg") != "info":
            call.cancel()
            raise DfsError(grpc.StatusCode.INTERNAL, "download stream did not start with info")
        return Download(call, ObjectInfo.from_proto(first.info))

    def download(
        self,
        key: Optional[str],
        dst: PathOrFile,
        offset: int = 0,
        length: int = 0,
        *,
        sha1: Optional[str] = None,
    ) -> ObjectInfo:
        """Writes the object (or ``length`` bytes of it from ``offset``;
        ``length=0`` means to the end) to a path or a binary file object, a
        chunk at a time. A path that was being written is removed on failure.
        """
        if isinstance(dst, (str, os.PathLike)):
            try:
                with open(dst, "wb") as f:
                    return self.download(key, f, offset, length, sha1=sha1)
            except BaseException:
                try:
                    os.unlink(dst)
                except OSError:
                    pass
                raise
        with self.open_download(key, offset, length, sha1=sha1) as d:
            for chunk in d:
                dst.write(chunk)
            return d.info

    def read(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        """Returns the object's bytes (or a range of them) in memory. Meant
        for small objects; use download() for large ones."""
        buf = io.BytesIO()
        self.download(key, buf, offset, length)
        return buf.getvalue()

    def stat(self, key: Optional[str] = None, *, sha1: Optional[str] = None) -> ObjectInfo:
        if (key is None) == (sha1 is None):
            raise ValueError("give exactly one of key and sha1")
        req = storage_pb2.StatRequest(key=key) if key is not None else storage_pb2.StatRequest(sha1=sha1)
        try:
            return ObjectInfo.from_proto(self.storage.Stat(req, **self._kw()))
        except grpc.RpcError as e:
            raise _error(e) from None

    def list_page(
        self, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> Tuple[List[ObjectInfo], str]:
        """One page of objects under ``prefix`` and the next page's token
        ("" on the last page)."""
        req = storage_pb2.ListRequest(prefix=prefix, page_size=page_size, page_token=page_token)
        try:
            resp = self.storage.List(req, **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None
        return [ObjectInfo.from_proto(o) for o in resp.objects], resp.next_page_token

    def iter_list(self, prefix: str = "", page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` in key order, fetched a page at a time."""
        token = ""
        while True:
            objects, token = self.list_page(prefix, page_size, token)
            yield from objects
            if not token:
                return

    def list(self, prefix: str = "") -> List[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""
        return list(self.iter_list(prefix))

    def delete(self, key: str) -> Version:
        """Deletes the object under ``key``; returns the tombstone's version."""
        try:
            resp = self.storage.Delete(storage_pb2.DeleteRequest(key=key), **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None
        return Version(hlc=resp.version.hlc, node_id=resp.version.node_id)

    def status(self) -> cluster_pb2.StatusResponse:
        """The node's view of itself and the cluster (the raw message)."""
        try:
            return self.cluster.Status(cluster_pb2.StatusRequest(), **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None

    def forget_member(self, node_id: str) -> None:
        """Removes a dead member from the cluster for good (an admin call:
        needs a token with role admin on a node that checks tokens)."""
        try:
            self.cluster.ForgetMember(cluster_pb2.ForgetMemberRequest(node_id=node_id), **self._kw())
        except grpc.RpcError as e:
            raise _error(e) from None
