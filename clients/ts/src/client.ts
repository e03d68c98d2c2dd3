// A small, streaming wrapper over the generated dfs.v1 stubs, using Connect's
// gRPC transport for Node.

import { createReadStream, createWriteStream, readFileSync } from "node:fs";
import type {
  ClientHttp2Stream,
  ClientSessionRequestOptions,
  OutgoingHttpHeaders,
  SecureClientSessionOptions,
} from "node:http2";
import { unlink } from "node:fs/promises";
import { Readable, type Writable } from "node:stream";
import { pipeline } from "node:stream/promises";

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";

import { Cluster, type StatusResponse } from "../gen/dfs/v1/cluster_pb.js";
import {
  DownloadRequestSchema,
  Storage,
  UploadRequestSchema,
  type ObjectInfo as ObjectInfoMessage,
  type UploadRequest,
} from "../gen/dfs/v1/storage_pb.js";

/** Size of the data messages an upload sends. The node accepts at most 1 MiB. */
export const DEFAULT_CHUNK_SIZE = 256 * 1024;
export const MAX_CHUNK_SIZE = 1024 * 1024;

/** Orders writes of one key: the larger hybrid logical clock wins. */
export interface Version {
  hlc: bigint;
  nodeId: string;
}

/** HTTP/2 receive window for each stream and for the whole connection. */
const RECEIVE_WINDOW = 8 * 1024 * 1024;

/**
 * Node's HTTP/2 receive windows default to 64 KiB, which caps a download at a
 * window per round trip (about 2 MB/s on loopback). This session manager
 * raises the per-stream window through the SETTINGS frame and the
 * connection's window the first time each session carries a request.
 */
class WideWindowSessionManager extends Http2SessionManager {
  private readonly widened = new WeakSet<object>();

  constructor(baseUrl: string, tls: SecureClientSessionOptions = {}) {
    super(baseUrl, undefined, { ...tls, settings: { initialWindowSize: RECEIVE_WINDOW } });
  }

  override async request(
    method: string,
    path: string,
    headers: OutgoingHttpHeaders,
    options: Omit<ClientSessionRequestOptions, "signal">,
  ): Promise<ClientHttp2Stream> {
    const stream = await super.request(method, path, headers, options);
    const session = stream.session;
    if (session && !this.widened.has(session)) {
      this.widened.add(session);
      session.setLocalWindowSize(RECEIVE_WINDOW);
    }
    return stream;
  }
}

/** Describes a stored object. */
export interface ObjectInfo {
  key: string;
  /** Size of the whole file in bytes. */
  size: number;
  /** Lowercase hex SHA-1 of the whole file. */
  sha1: string;
  chunkCount: number;
  chunkSize: number;
  contentType: string;
  metadata: Record<string, string>;
  created: Date;
  version: Version;
}

function toInfo(m: ObjectInfoMessage): ObjectInfo {
  return {
    key: m.key,
    size: Number(m.size),
    sha1: m.sha1,
    chunkCount: m.chunkCount,
    chunkSize: m.chunkSize,
    contentType: m.contentType,
    metadata: { ...m.metadata },
    created: new Date(Number(m.createdUnixMs)),
    version: { hlc: m.version?.hlc ?? 0n, nodeId: m.version?.nodeId ?? "" },
  };
}

export interface ClientOptions {
  /** Bearer token sent as `authorization: Bearer <token>` with every call. */
  token?: string;
  /** File holding the bearer token (surrounding whitespace is ignored). */
  tokenFile?: string;
  /** Deadline for every call, in milliseconds. */
  timeoutMs?: number;
  /** Size of upload data messages (1..MAX_CHUNK_SIZE). */
  chunkSize?: number;
  /** Extra interceptors for the transport. */
  interceptors?: Interceptor[];
  /**
   * TLS: the CA certificates (PEM file) that signed the node's certificate.
   * Any TLS option (or an https:// address) turns TLS on; without caFile the
   * system's roots are trusted.
   */
  caFile?: string;
  /** Client certificate (PEM file) for a node that requires one (mutual TLS); needs keyFile. */
  certFile?: string;
  /** Private key (PEM file) of certFile. */
  keyFile?: string;
  /** The name the node's certificate must hold, when not the host in the address. */
  serverName?: string;
}

/** The http2/TLS options of `options`, read from their files now so a missing file fails here. */
function tlsOptions(options: ClientOptions): SecureClientSessionOptions | undefined {
  const { caFile, certFile, keyFile, serverName } = options;
  if (caFile === undefined && certFile === undefined && keyFile === undefined && serverName === undefined) {
    return undefined;
  }
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new TypeError("certFile and keyFile go together");
  }
  return {
    ...(caFile !== undefined && { ca: readFileSync(caFile) }),
    ...(certFile !== undefined && { cert: readFileSync(certFile) }),
    ...(keyFile !== undefined && { key: readFileSync(keyFile) }),
    ...(serverName !== undefined && { servername: serverName }),
  };
}

export interface UploadOptions {
  contentType?: string;
  /** Lowercase hex SHA-1; the node rejects the upload with DATA_LOSS on a mismatch. */
  expectedSha1?: string;
  metadata?: Record<string, string>;
  signal?: AbortSignal;
}

export interface RangeOptions {
  /** First byte to send. */
  offset?: number | bigint;
  /** Number of bytes; 0 (the default) means to the end. */
  length?: number | bigint;
  signal?: AbortSignal;
}

/** Where to download from: a key, or the content hash of the whole file. */
export type Target = string | { sha1: string };

/** Anything an upload can read: a file path, a Node stream or an async iterable of bytes. */
export type UploadSource = string | Readable | AsyncIterable<Uint8Array>;

/** An open download: `info` describes the object, iterating yields its bytes. */
export interface OpenDownload extends AsyncIterable<Uint8Array> {
  info: ObjectInfo;
  /** Abandons the stream. */
  cancel(): void;
}

/**
 * A connection to one dfs node. Failed calls reject with a ConnectError whose
 * `code` is the gRPC status code (`Code.NotFound`, `Code.Unauthenticated`, ...).
 */
export class DfsClient {
  /** The generated Storage client, for calls the wrapper does not cover. */
  readonly storage: Client<typeof Storage>;
  /** The generated Cluster client. */
  readonly cluster: Client<typeof Cluster>;
  private readonly sessions: Http2SessionManager;
  private readonly chunkSize: number;

  /** @param address "host:port", or a base URL such as "http://host:port" or "https://host:port". */
  constructor(address: string, options: ClientOptions = {}) {
    const tls = tlsOptions(options);
    if (tls && address.startsWith("http://")) {
      throw new TypeError(`address ${address} says http:// (plaintext) but TLS options are set`);
    }
    const baseUrl = /^https?:\/\//.test(address) ? address : `${tls ? "https" : "http"}://${address}`;
    const token =
      options.tokenFile !== undefined ? readFileSync(options.tokenFile, "utf8").trim() : options.token;
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!(chunkSize > 0 && chunkSize <= MAX_CHUNK_SIZE)) {
      throw new RangeError(`chunkSize must be in 1..${MAX_CHUNK_SIZE}`);
    }
    this.chunkSize = chunkSize;
    const interceptors: Interceptor[] = [...(options.interceptors ?? [])];
    if (token) {
      const header = `Bearer ${token}`;
      interceptors.unshift((next) => (req) => {
        req.header.set("authorization", header);
        return next(req);
      });
    }
    this.sessions = new WideWindowSessionManager(baseUrl, tls);
    const transport = createGrpcTransport({
      baseUrl,
      interceptors,
      sessionManager: this.sessions,
      defaultTimeoutMs: options.timeoutMs,
    });
    this.storage = createClient(Storage, transport);
    this.cluster = createClient(Cluster, transport);
  }

  /** Closes the HTTP/2 connection; calls in flight fail. */
  close(): void {
    this.sessions.abort();
  }

  /**
   * Stores a file under `key`, streaming it in chunks. The object exists only
   * if the promise resolves; if reading `source` fails the call is cancelled,
   * the node stores nothing, and the read error is thrown.
   */
  async upload(key: string, source: UploadSource, options: UploadOptions = {}): Promise<ObjectInfo> {
    const input: AsyncIterable<Uint8Array> =
      typeof source === "string" ? createReadStream(source, { highWaterMark: this.chunkSize }) : source;
    const chunkSize = this.chunkSize;
    const abort = new AbortController();
    const onAbort = () => abort.abort(options.signal?.reason);
    options.signal?.addEventListener("abort", onAbort, { once: true });
    let readError: { error: unknown } | undefined;

    async function* requests(): AsyncGenerator<UploadRequest> {
      yield create(UploadRequestSchema, {
        msg: {
          case: "header",
          value: {
            key,
            contentType: options.contentType ?? "",
            expectedSha1: options.expectedSha1 ?? "",
            metadata: options.metadata ?? {},
          },
        },
      });
      try {
        for await (const chunk of input) {
          if (typeof chunk === "string") {
            throw new TypeError("upload source yielded a string; use a binary stream");
          }
          // Split large chunks so no data message exceeds chunkSize.
          for (let off = 0; off < chunk.byteLength; off += chunkSize) {
            const data = chunk.subarray(off, Math.min(off + chunkSize, chunk.byteLength));
            yield create(UploadRequestSchema, { msg: { case: "data", value: data } });
          }
        }
      } catch (error) {
        // The call must fail, not finish: a half-sent file must never become
        // an object. Aborting alone is not enough, because Node's http2
        // closes a stream by sending END_STREAM right before RST_STREAM, and
        // the node could commit what it got in between. So first send a
        // second header, a protocol violation ("every later message data")
        // that makes the node reject the upload, then reset the stream.
        readError = { error };
        yield create(UploadRequestSchema, { msg: { case: "header", value: { key } } });
        abort.abort(new ConnectError("upload source failed", Code.Canceled));
        throw error;
      }
    }

    try {
      const resp = await this.storage.upload(requests(), { signal: abort.signal });
      if (!resp.object) throw new ConnectError("upload response without object", Code.Internal);
      return toInfo(resp.object);
    } catch (err) {
      if (readError) throw readError.error;
      throw err;
    } finally {
      options.signal?.removeEventListener("abort", onAbort);
      if (typeof source === "string") (input as Readable).destroy();
    }
  }

  /**
   * Starts a download and resolves once the node has sent the object's info.
   * Iterate the result for the bytes.
   */
  async openDownload(target: Target, options: RangeOptions = {}): Promise<OpenDownload> {
    const abort = new AbortController();
    const onAbort = () => abort.abort(options.signal?.reason);
    options.signal?.addEventListener("abort", onAbort, { once: true });
    const req: MessageInitShape<typeof DownloadRequestSchema> = {
      target: typeof target === "string" ? { case: "key", value: target } : { case: "sha1", value: target.sha1 },
      offset: BigInt(options.offset ?? 0),
      length: BigInt(options.length ?? 0),
    };
    const stream = this.storage.download(req, { signal: abort.signal })[Symbol.asyncIterator]();
    const cleanup = () => options.signal?.removeEventListener("abort", onAbort);
    let first: IteratorResult<{ msg: { case: string | undefined; value?: unknown } }>;
    try {
      first = await stream.next();
    } catch (err) {
      cleanup();
      throw err;
    }
    if (first.done || first.value.msg.case !== "info") {
      abort.abort();
      cleanup();
      throw new ConnectError("download stream did not start with info", Code.Internal);
    }
    const info = toInfo(first.value.msg.value as ObjectInfoMessage);
    return {
      info,
      cancel: () => {
        abort.abort();
        cleanup();
      },
      async *[Symbol.asyncIterator]() {
        try {
          for (;;) {
            const r = await stream.next();
            if (r.done) return;
            if (r.value.msg.case === "data") yield r.value.msg.value as Uint8Array;
          }
        } finally {
          // Reached on completion, on error and when the consumer stops early.
          abort.abort();
          cleanup();
        }
      },
    };
  }

  /**
   * Writes the object (or a byte range of it) to a file path or a writable
   * stream, with backpressure. A file being written is removed on failure. A
   * stream passed in is ended when the download completes.
   */
  async download(target: Target, dest: string | Writable, options: RangeOptions = {}): Promise<ObjectInfo> {
    const d = await this.openDownload(target, options);
    const sink = typeof dest === "string" ? createWriteStream(dest) : dest;
    try {
      await pipeline(Readable.from(d, { objectMode: false }), sink);
    } catch (err) {
      d.cancel();
      if (typeof dest === "string") await unlink(dest).catch(() => undefined);
      throw err;
    }
    return d.info;
  }

  /** The object's bytes (or a range of them) in memory; for small objects. */
  async read(target: Target, options: RangeOptions = {}): Promise<Buffer> {
    const parts: Uint8Array[] = [];
    for await (const chunk of await this.openDownload(target, options)) parts.push(chunk);
    return Buffer.concat(parts);
  }

  async stat(target: Target): Promise<ObjectInfo> {
    const t = typeof target === "string" ? { case: "key" as const, value: target } : { case: "sha1" as const, value: target.sha1 };
    return toInfo(await this.storage.stat({ target: t }));
  }

  /** One page of objects under `prefix`, and the next page's token ("" on the last page). */
  async listPage(prefix = "", pageSize = 0, pageToken = ""): Promise<{ objects: ObjectInfo[]; nextPageToken: string }> {
    const resp = await this.storage.list({ prefix, pageSize, pageToken });
    return { objects: resp.objects.map(toInfo), nextPageToken: resp.nextPageToken };
  }

  /** Every object under `prefix` in key order, fetched a page at a time. */
  async *iterList(prefix = "", pageSize = 1000): AsyncGenerator<ObjectInfo> {
    let token = "";
    do {
      const page = await this.listPage(prefix, pageSize, token);
      yield* page.objects;
      token = page.nextPageToken;
    } while (token);
  }

  /** Every object whose key starts with `prefix`, in key order. */
  async list(prefix = ""): Promise<ObjectInfo[]> {
    const all: ObjectInfo[] = [];
    for await (const o of this.iterList(prefix)) all.push(o);
    return all;
  }

  /** Deletes the object under `key`; resolves to the tombstone's version. */
  async delete(key: string): Promise<Version> {
    const resp = await this.storage.delete({ key });
    return { hlc: resp.version?.hlc ?? 0n, nodeId: resp.version?.nodeId ?? "" };
  }

  /** The node's view of itself and the cluster (the raw message). */
  async status(): Promise<StatusResponse> {
    return this.cluster.status({});
  }

  /**
   * Removes a dead member from the cluster for good. An admin call: on a node
   * that checks tokens it needs a token with role admin.
   */
  async forgetMember(nodeId: string): Promise<void> {
    await this.cluster.forgetMember({ nodeId });
  }
}

/** The gRPC status code of an error, or undefined if it is not from a call. */
export function errorCode(err: unknown): Code | undefined {
  return err instanceof ConnectError ? err.code : undefined;
}
