# syntax=docker/dockerfile:1
#
# The dfs node image: one static binary, the CA certificates (for clients
# that trust the system's roots), nothing else. Runs as uid 65532.
#
#   docker build -t dfs:0.1.0 .
#   docker run -p 50051:50051 -v dfs-data:/var/lib/dfs dfs:0.1.0
#
# The HEALTHCHECK runs `dfs health` against the node in the container. With
# TLS on the API port, give the container DFS_CA_FILE (and, for mutual TLS,
# DFS_CERT_FILE and DFS_KEY_FILE; DFS_TLS_SERVER_NAME if the certificate
# does not name 127.0.0.1): the health command reads the same variables as
# every client command. See docs/OPERATIONS.md.

ARG RUST_VERSION=1.90

# --- build: a static (musl) binary --------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
    && rm -rf /var/lib/apt/lists/*
# The machine's own architecture: x86_64 or aarch64 (buildx runs each
# platform's build stage natively or under emulation).
RUN rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# The registry and target caches survive between builds; the binary is
# copied out of the cache mount in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dfs --target "$(uname -m)-unknown-linux-musl" \
    && mkdir -p /out/data \
    && cp "target/$(uname -m)-unknown-linux-musl/release/dfs" /out/dfs

# --- run ------------------------------------------------------------------------
FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/dfs /usr/local/bin/dfs
# The data directory, owned by the user the node runs as (a volume mounted
# here replaces it).
COPY --from=build --chown=65532:65532 /out/data /var/lib/dfs
USER 65532:65532
ENV PATH=/usr/local/bin \
    DFS_DATA=/var/lib/dfs \
    DFS_GRPC_ADDR=0.0.0.0:50051 \
    DFS_P2P_ADDR=0.0.0.0:4040
VOLUME ["/var/lib/dfs"]
EXPOSE 50051 4040
HEALTHCHECK --interval=10s --timeout=7s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/dfs", "health", "--service", "liveness", "--timeout", "5s"]
ENTRYPOINT ["/usr/local/bin/dfs"]
CMD ["node"]
