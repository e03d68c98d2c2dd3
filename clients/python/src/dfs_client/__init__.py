"""Python client for the dfs gRPC API.

    from dfs_client import Client, NotFoundError

    with Client("127.0.0.1:7070") as c:
        info = c.upload("photos/cat.jpg", "cat.jpg")
        c.download("photos/cat.jpg", "copy.jpg")

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
    UnauthenticatedError,
    Version,
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
    "UnauthenticatedError",
    "Version",
]
