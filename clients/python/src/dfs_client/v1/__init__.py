"""Generated protobuf and gRPC stubs for dfs.v1 (do not edit)."""
