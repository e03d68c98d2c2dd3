"""Python client for the dfs gRPC API.

    from dfs_client import Client, NotFoundError

    with Client("127.0.0.1:7070") as c:
        info = c.upload("photos/cat.jpg", "cat.jpg")
        c.download("photos/cat.jpg", "copy.jpg")

    # TLS, with a client certificate for a node that requires one:
    Client("dfs.example:50051", token_file="token", ca_file="ca.pem",
           cert_file="client.pem", key_file="client.key")

The generated stubs are in ``dfs_client.v1`` (storage_pb2, storage_pb2_grpc,
cluster_pb2, cluster_pb2_grpc).
"""

from .client import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    Client,
    DataLossError,
    DfsError,
    Download,
    InvalidArgumentError,
    NotFoundError,
    ObjectInfo,
    OutOfRangeError,
    PermissionDeniedError,
    UnauthenticatedError,
    Version,
    tls_credentials,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "Client",
    "DataLossError",
    "DfsError",
    "Download",
    "InvalidArgumentError",
    "NotFoundError",
    "ObjectInfo",
    "OutOfRangeError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "Version",
    "tls_credentials",
]
