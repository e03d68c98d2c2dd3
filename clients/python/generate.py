"""Regenerates the gRPC stubs in src/dfs_client/v1 from ../../proto.

Run with a Python that has grpcio-tools installed (see clients/clients.mk):

    python clients/python/generate.py

protoc writes `from dfs.v1 import storage_pb2`, which only works when the
proto root is on sys.path. The stubs live inside the dfs_client package, so
those imports are rewritten to relative ones (`from . import storage_pb2`).
"""

import pathlib
import re
import shutil
import sys
import tempfile

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "src" / "dfs_client" / "v1"
PROTOS = ["dfs/v1/storage.proto", "dfs/v1/cluster.proto"]
IMPORT = re.compile(r"^from dfs\.v1 import (\w+)", re.MULTILINE)


def main() -> int:
    # protoc's bundled well-known types (google/protobuf/*.proto).
    wkt = pathlib.Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{wkt}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        generated = sorted((pathlib.Path(tmp) / "dfs" / "v1").iterdir())
        for old in OUT.glob("*_pb2*.py*"):
            old.unlink()
        OUT.mkdir(parents=True, exist_ok=True)
        for src in generated:
            text = IMPORT.sub(r"from . import \1", src.read_text())
            (OUT / src.name).write_text(text)
    init = OUT / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC stubs for dfs.v1 (do not edit)."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
