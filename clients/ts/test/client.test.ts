// Tests against a live node, started by clients/run-tests.sh. Environment:
// DFS_TEST_ADDR (node without auth), DFS_TEST_AUTH_ADDR (node that requires a
// bearer token) and DFS_TEST_TOKEN (file holding that token). With
// DFS_TEST_CA_FILE (and DFS_TEST_CERT_FILE, DFS_TEST_KEY_FILE) both nodes
// speak TLS (mutual TLS), and every client here connects that way (TRANSPORT).

import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, createWriteStream, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { readFile, readdir, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Readable, Writable } from "node:stream";
import { after, before, describe, test } from "node:test";

import { Code, ConnectError, DfsClient, errorCode } from "../src/index.js";

const FILE_SIZE = 10 * 1024 * 1024;
const PREFIX = `ts-test/${process.hrtime.bigint()}/`;
const ADDR = process.env.DFS_TEST_ADDR;
const AUTH_ADDR = process.env.DFS_TEST_AUTH_ADDR;
const TOKEN_FILE = process.env.DFS_TEST_TOKEN;
/** How this run reaches its nodes: TLS when clients/run-tests.sh says so. */
const TRANSPORT = {
  ...(process.env.DFS_TEST_CA_FILE && { caFile: process.env.DFS_TEST_CA_FILE }),
  ...(process.env.DFS_TEST_CERT_FILE && { certFile: process.env.DFS_TEST_CERT_FILE }),
  ...(process.env.DFS_TEST_KEY_FILE && { keyFile: process.env.DFS_TEST_KEY_FILE }),
};

function sha1Hex(data: Uint8Array): string {
  return createHash("sha1").update(data).digest("hex");
}

async function sha1OfFile(path: string): Promise<string> {
  const h = createHash("sha1");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** Writes `size` random bytes to `path` a MiB at a time; returns their SHA-1. */
async function writeRandomFile(path: string, size: number): Promise<string> {
  const h = createHash("sha1");
  const out = createWriteStream(path);
  for (let left = size; left > 0; left -= 1 << 20) {
    const block = randomBytes(Math.min(left, 1 << 20));
    h.update(block);
    if (!out.write(block)) await new Promise<void>((r) => out.once("drain", () => r()));
  }
  await new Promise<void>((resolve, reject) => out.end((err?: Error | null) => (err ? reject(err) : resolve())));
  return h.digest("hex");
}

/** Asserts that `p` rejects with a ConnectError carrying `code`. */
async function rejectsWith(p: Promise<unknown>, code: Code): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof ConnectError, `expected ConnectError, got ${err}`);
    assert.equal(err.code, code, `expected ${Code[code]}, got ${Code[err.code]}: ${err.message}`);
    return true;
  });
}

describe("dfs client", { skip: !ADDR && "DFS_TEST_ADDR not set; run clients/run-tests.sh" }, () => {
  let client: DfsClient;
  let dir: string;
  let bigPath: string;
  let bigSha1: string;

  before(async () => {
    client = new DfsClient(ADDR!, { timeoutMs: 120_000, ...TRANSPORT });
    dir = mkdtempSync(join(tmpdir(), "dfs-ts-test-"));
    bigPath = join(dir, "random.bin");
    bigSha1 = await writeRandomFile(bigPath, FILE_SIZE);
  });

  after(() => {
    client?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("round trip of a 10 MiB file", async () => {
    const key = PREFIX + "roundtrip/big.bin";
    const info = await client.upload(key, bigPath, {
      contentType: "application/octet-stream",
      metadata: { lang: "ts" },
    });
    assert.equal(info.key, key);
    assert.equal(info.size, FILE_SIZE);
    assert.equal(info.sha1, bigSha1);

    // To a path.
    const copy = join(dir, "copy.bin");
    const dinfo = await client.download(key, copy);
    assert.equal(dinfo.sha1, bigSha1);
    assert.equal((await stat(copy)).size, FILE_SIZE);
    assert.equal(await sha1OfFile(copy), bigSha1);

    // To a writable stream that only hashes.
    const h = createHash("sha1");
    let n = 0;
    await client.download(
      key,
      new Writable({
        write(chunk: Buffer, _enc, cb) {
          h.update(chunk);
          n += chunk.length;
          cb();
        },
      }),
    );
    assert.equal(n, FILE_SIZE);
    assert.equal(h.digest("hex"), bigSha1);

    // Ranges: crossing chunk boundaries, and length 0 meaning to the end.
    const data = await readFile(bigPath);
    for (const [off, len] of [
      [0, 1],
      [123_457, 3 << 20],
      [FILE_SIZE - 1000, 0],
      [FILE_SIZE - 1, 1],
    ]) {
      const got = await client.read(key, { offset: off, length: len });
      const end = len === 0 ? FILE_SIZE : off + len;
      assert.ok(got.equals(data.subarray(off, end)), `range ${off}+${len} differs`);
    }
    await rejectsWith(client.read(key, { offset: FILE_SIZE + 10, length: 5 }), Code.OutOfRange);

    // By content hash.
    assert.equal(sha1Hex(await client.read({ sha1: bigSha1 })), bigSha1);

    const st = await client.stat(key);
    assert.equal(st.size, FILE_SIZE);
    assert.equal(st.sha1, bigSha1);
    assert.equal(st.contentType, "application/octet-stream");
    assert.deepEqual(st.metadata, { lang: "ts" });
    assert.ok(st.created.getFullYear() >= 2024);

    await client.delete(key);
    await rejectsWith(client.stat(key), Code.NotFound);
    const missing = join(dir, "missing.bin");
    await assert.rejects(client.download(key, missing), (err) => errorCode(err) === Code.NotFound);
  });

  test("upload from a Node stream with oversized chunks", async () => {
    const key = PREFIX + "stream.bin";
    const blob = randomBytes(3 * 1024 * 1024 + 5); // one 3 MiB chunk gets split
    const info = await client.upload(key, Readable.from([blob.subarray(0, 7), blob.subarray(7)]));
    assert.equal(info.size, blob.length);
    assert.equal(info.sha1, sha1Hex(blob));
    assert.ok((await client.read(key)).equals(blob));
    await client.delete(key);
  });

  test("list with a prefix", async () => {
    const prefix = PREFIX + "list/";
    const keys = [prefix + "a", prefix + "b/c", prefix + "d"];
    for (const [i, k] of keys.entries()) {
      await client.upload(k, Readable.from([Buffer.alloc(i + 1, "x")]));
    }
    await client.upload(PREFIX + "other", Readable.from([Buffer.from("no")]));

    const all = await client.list(prefix);
    assert.deepEqual(
      all.map((o) => o.key),
      keys,
    );
    assert.deepEqual(
      all.map((o) => o.size),
      [1, 2, 3],
    );
    const paged: string[] = [];
    for await (const o of client.iterList(prefix, 2)) paged.push(o.key);
    assert.deepEqual(paged, keys);
    const first = await client.listPage(prefix, 2);
    assert.equal(first.objects.length, 2);
    assert.notEqual(first.nextPageToken, "");

    for (const k of [...keys, PREFIX + "other"]) await client.delete(k);
    assert.deepEqual(await client.list(prefix), []);
  });

  test("errors carry gRPC codes", async () => {
    await rejectsWith(client.stat(PREFIX + "missing"), Code.NotFound);
    await rejectsWith(client.upload("", Readable.from([Buffer.from("x")])), Code.InvalidArgument);
    await rejectsWith(
      client.upload(PREFIX + "badsha", Readable.from([Buffer.from("hello")]), { expectedSha1: "0".repeat(40) }),
      Code.DataLoss,
    );
    await rejectsWith(client.stat(PREFIX + "badsha"), Code.NotFound);
  });

  test("a failing source aborts the upload", async () => {
    const key = PREFIX + "broken";
    async function* broken() {
      yield Buffer.alloc(1000, "y");
      yield Buffer.alloc(1000, "y");
      throw new Error("disk on fire");
    }
    await assert.rejects(client.upload(key, broken()), /disk on fire/);
    await rejectsWith(client.stat(key), Code.NotFound);
  });

  test("status", async () => {
    const st = await client.status();
    assert.ok(st.nodeId);
  });
});

describe("auth", { skip: !(AUTH_ADDR && TOKEN_FILE) && "DFS_TEST_AUTH_ADDR / DFS_TEST_TOKEN not set" }, () => {
  test("right token works, wrong or missing token is UNAUTHENTICATED", async () => {
    const good = new DfsClient(AUTH_ADDR!, { tokenFile: TOKEN_FILE, timeoutMs: 60_000, ...TRANSPORT });
    const wrong = new DfsClient(AUTH_ADDR!, { token: "not-the-token", timeoutMs: 60_000, ...TRANSPORT });
    const none = new DfsClient(AUTH_ADDR!, { timeoutMs: 60_000, ...TRANSPORT });
    try {
      const key = PREFIX + "auth/hello.txt";
      const info = await good.upload(key, Readable.from([Buffer.from("hello, auth")]));
      assert.equal(info.size, 11);
      assert.equal((await good.read(key)).toString(), "hello, auth");
      await rejectsWith(wrong.stat(key), Code.Unauthenticated);
      await rejectsWith(wrong.upload(key + ".2", Readable.from([Buffer.from("x")])), Code.Unauthenticated);
      await rejectsWith(none.list(PREFIX), Code.Unauthenticated);
      await good.delete(key);
    } finally {
      good.close();
      wrong.close();
      none.close();
    }
  });

  test("an error after data has started reaches the caller and leaves no file", async () => {
    const damageAddr = process.env.DFS_TEST_DAMAGE_ADDR;
    const damageData = process.env.DFS_TEST_DAMAGE_DATA;
    assert.ok(damageAddr && damageData, "DFS_TEST_DAMAGE_ADDR/DFS_TEST_DAMAGE_DATA not set");
    const chunk = 1 << 20; // the test nodes' --chunk-size
    const chunkFiles = async (): Promise<Set<string>> =>
      new Set(
        (await readdir(join(damageData, "chunks"), { recursive: true, withFileTypes: true }))
          .filter((e) => e.isFile())
          .map((e) => join(e.parentPath, e.name)),
      );
    const c = new DfsClient(damageAddr, { timeoutMs: 120_000, ...TRANSPORT });
    try {
      // Upload the first chunk alone, so the two-chunk object adds exactly
      // one chunk file: its second chunk, which is then damaged.
      const uploadNew = async (key: string, data: Buffer): Promise<string> => {
        const before = await chunkFiles();
        await c.upload(key, Readable.from([data]));
        const added = [...(await chunkFiles())].filter((f) => !before.has(f));
        assert.equal(added.length, 1, `upload of ${key} added ${added}`);
        return added[0];
      };
      const first = randomBytes(chunk);
      const key = PREFIX + "midstream";
      await uploadNew(key + "-head", first);
      const victim = await uploadNew(key, Buffer.concat([first, randomBytes(chunk)]));
      const raw = await readFile(victim);
      raw[raw.length >> 1] ^= 0x40;
      await writeFile(victim, raw);

      // Streaming: the first chunk's bytes, then the error.
      const got: Buffer[] = [];
      await rejectsWith(
        (async () => {
          for await (const piece of await c.openDownload(key)) got.push(Buffer.from(piece));
        })(),
        Code.DataLoss,
      );
      assert.ok(Buffer.concat(got).equals(first), `${Buffer.concat(got).length} bytes before the error`);
      // To a path: rejected, and no partial file left.
      const out = mkdtempSync(join(tmpdir(), "dfs-ts-midstream-"));
      try {
        await rejectsWith(c.download(key, join(out, "out.bin")), Code.DataLoss);
        assert.deepEqual(readdirSync(out), [], "a partial file was left");
      } finally {
        rmSync(out, { recursive: true, force: true });
      }
      await rejectsWith(c.read(key), Code.DataLoss);
    } finally {
      c.close();
    }
  });
});
