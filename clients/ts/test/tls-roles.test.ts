// TLS, mutual TLS and scoped tokens against live nodes started by
// clients/run-tests.sh. DFS_TEST_TLS_ADDR: a node speaking TLS;
// DFS_TEST_MTLS_ADDR: one that also requires a client certificate;
// DFS_TEST_PKI: a directory with ca.pem (signed both nodes' certificates),
// other-ca.pem (signed none of theirs), client.pem/client.key (from the CA the
// mTLS node trusts) and stranger.pem/stranger.key (from another CA).
// DFS_TEST_AUTH_ADDR with DFS_TEST_READ_TOKEN, DFS_TEST_WRITE_TOKEN and
// DFS_TEST_TOKEN (admin): files holding one token of each role.

import assert from "node:assert/strict";
import { join } from "node:path";
import { Readable } from "node:stream";
import { describe, test } from "node:test";

import { Code, ConnectError, DfsClient, type ClientOptions } from "../src/index.js";

const PKI = process.env.DFS_TEST_PKI;
const TLS_ADDR = process.env.DFS_TEST_TLS_ADDR;
const MTLS_ADDR = process.env.DFS_TEST_MTLS_ADDR;
const AUTH_ADDR = process.env.DFS_TEST_AUTH_ADDR;
const PREFIX = `ts-tls-roles/${process.hrtime.bigint()}/`;
const TRANSPORT = {
  ...(process.env.DFS_TEST_CA_FILE && { caFile: process.env.DFS_TEST_CA_FILE }),
  ...(process.env.DFS_TEST_CERT_FILE && { certFile: process.env.DFS_TEST_CERT_FILE }),
  ...(process.env.DFS_TEST_KEY_FILE && { keyFile: process.env.DFS_TEST_KEY_FILE }),
};

const pki = (name: string) => join(PKI ?? "", name);

/** Status over a fresh connection: the first call runs the whole handshake. */
async function status(address: string, options: ClientOptions): Promise<string> {
  const c = new DfsClient(address, { timeoutMs: 20_000, ...options });
  try {
    return (await c.status()).nodeId;
  } finally {
    c.close();
  }
}

async function rejectsWith(p: Promise<unknown>, code: Code): Promise<ConnectError> {
  let caught: unknown;
  await assert.rejects(p, (err: unknown) => {
    caught = err;
    assert.ok(err instanceof ConnectError, `expected ConnectError, got ${err}`);
    assert.equal(err.code, code, `expected ${Code[code]}, got ${Code[err.code]}: ${err.message}`);
    return true;
  });
  return caught as ConnectError;
}

const noPki = !(PKI && TLS_ADDR && MTLS_ADDR) && "DFS_TEST_PKI / DFS_TEST_TLS_ADDR / DFS_TEST_MTLS_ADDR not set";

describe("tls", { skip: noPki }, () => {
  test("the right CA works; another CA or plaintext does not", async () => {
    assert.ok(await status(TLS_ADDR!, { caFile: pki("ca.pem") }));
    await assert.rejects(status(TLS_ADDR!, { caFile: pki("other-ca.pem") }));
    await assert.rejects(status(TLS_ADDR!, {}));
    assert.throws(() => new DfsClient(TLS_ADDR!, { caFile: pki("no-such.pem") }));
  });

  test("mutual TLS needs a certificate from the client CA", async () => {
    const ca = pki("ca.pem");
    assert.ok(await status(MTLS_ADDR!, { caFile: ca, certFile: pki("client.pem"), keyFile: pki("client.key") }));
    await assert.rejects(status(MTLS_ADDR!, { caFile: ca }));
    await assert.rejects(status(MTLS_ADDR!, { caFile: ca, certFile: pki("stranger.pem"), keyFile: pki("stranger.key") }));
    assert.throws(() => new DfsClient(MTLS_ADDR!, { caFile: ca, certFile: pki("client.pem") }));
  });
});

const roleFiles = {
  read: process.env.DFS_TEST_READ_TOKEN,
  write: process.env.DFS_TEST_WRITE_TOKEN,
  admin: process.env.DFS_TEST_TOKEN,
};
const noRoles =
  !(AUTH_ADDR && roleFiles.read && roleFiles.write && roleFiles.admin) &&
  "DFS_TEST_AUTH_ADDR / DFS_TEST_READ_TOKEN / DFS_TEST_WRITE_TOKEN / DFS_TEST_TOKEN not set";

describe("roles", { skip: noRoles }, () => {
  test("each role reaches its calls and is refused the rest", async () => {
    const make = (tokenFile: string | undefined) =>
      new DfsClient(AUTH_ADDR!, { tokenFile, timeoutMs: 60_000, ...TRANSPORT });
    const reader = make(roleFiles.read);
    const writer = make(roleFiles.write);
    const admin = make(roleFiles.admin);
    const key = PREFIX + "by-writer.txt";
    try {
      // read: Stat, List, Status; not Upload or Delete.
      await rejectsWith(reader.stat(key), Code.NotFound);
      await reader.list(PREFIX);
      assert.ok((await reader.status()).nodeId);
      const denied = await rejectsWith(reader.upload(key, Readable.from([Buffer.from("no")])), Code.PermissionDenied);
      assert.match(denied.message, /role write/);

      // write: Upload and Delete; not membership changes.
      assert.equal((await writer.upload(key, Readable.from([Buffer.from("yes")]))).size, 3);
      await rejectsWith(reader.delete(key), Code.PermissionDenied);
      assert.equal((await reader.read(key)).toString(), "yes");
      await rejectsWith(writer.forgetMember("no-such-node"), Code.PermissionDenied);
      await writer.delete(key);

      // admin: past auth; no such member.
      await rejectsWith(admin.forgetMember("no-such-node"), Code.NotFound);
    } finally {
      reader.close();
      writer.close();
      admin.close();
    }
  });
});
