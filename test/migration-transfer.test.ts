/**
 * The device-state channel's reads and writes (src/migration/transfer.ts): what a transfer
 * costs in memory before its bytes arrive, exact bytes around every buffer boundary, and the
 * zero-copy write (vmsplice) with its fallback to copying on a channel that is not a pipe.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { MigrationStreamError, readStateFromFd, writeStateToFd } from "../src/migration/index.js";
import { native } from "../src/native.js";

function pattern(length: number, seed = 0): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (i * 131 + seed + (i >> 12)) & 0xff;
  return out;
}

test("regression: a device-state read reserves no memory Node counts as its own (a 256 MiB reservation made each small transfer pay a garbage collection, 13-24 ms)", async () => {
  const [r, w] = native.pipe(true);
  const before = process.memoryUsage().arrayBuffers;
  // The front-end's default cap: 256 MiB.
  const reading = readStateFromFd(r, { maxBytes: 256 << 20 });
  await new Promise((res) => setImmediate(res));
  const during = process.memoryUsage().arrayBuffers - before;
  native.write(w, pattern(87), 0, 87);
  native.close(w);
  const got = await reading;
  assert.ok(during < 1 << 20, `a waiting read holds ${during} bytes of Node's buffers`);
  assert.equal(Buffer.compare(got, pattern(87)), 0);
});

test("device-state reads: exact bytes at every buffer boundary (first read, reservation, cap)", async () => {
  const K64 = 64 << 10;
  for (const [size, maxBytes] of [
    [0, 1000],
    [1, 1],
    [K64 - 1, K64],
    [K64, K64],
    [K64 + 1, K64 + 1],
    [(1 << 20) - 1, 8 << 20],
    [1 << 20, 1 << 20],
    [(3 << 20) + 5, 64 << 20],
  ] as const) {
    const data = pattern(size, size);
    const [r, w] = native.pipe(true);
    const [got] = await Promise.all([
      readStateFromFd(r, { maxBytes }),
      writeStateToFd(w, data, { zeroCopy: true }),
    ]);
    assert.equal(got.length, size);
    assert.equal(Buffer.compare(got, data), 0, `${size} bytes (cap ${maxBytes}) arrive unchanged`);
  }
  // One byte past the cap, on either side of the first read buffer.
  for (const maxBytes of [K64 - 1, K64, (2 << 20) + 3]) {
    const [r, w] = native.pipe(true);
    const writing = writeStateToFd(w, pattern(maxBytes + 1)).catch((e: unknown) => e);
    await assert.rejects(
      readStateFromFd(r, { maxBytes }),
      (e: unknown) => e instanceof MigrationStreamError && e.reason === "TOO_LARGE",
    );
    await writing;
  }
});

test("zero-copy write: a large state handed to a pipe arrives exact; a channel that is not a pipe gets a copy", async () => {
  const data = pattern((5 << 20) + 17, 3);
  {
    const [r, w] = native.pipe(true);
    const [got] = await Promise.all([
      readStateFromFd(r, { maxBytes: 16 << 20 }),
      writeStateToFd(w, data, { zeroCopy: true }),
    ]);
    assert.equal(Buffer.compare(got, data), 0);
  }
  {
    // vmsplice refuses a socket (EBADF/EINVAL): the writer falls back to write().
    const [a, b] = native.socketpair();
    assert.throws(
      () => native.vmsplice(a, data, 0, 4096),
      (e: unknown) => ["EBADF", "EINVAL"].includes((e as { code?: string }).code ?? ""),
    );
    const [got] = await Promise.all([
      readStateFromFd(b, { maxBytes: 16 << 20 }),
      writeStateToFd(a, data, { zeroCopy: true }),
    ]);
    assert.equal(Buffer.compare(got, data), 0);
  }
});

test("mapAnonymous: zero-filled, writable, released by munmap", () => {
  const buf = native.mapAnonymous((2 << 20) + 1, true);
  assert.equal(buf.byteLength, (2 << 20) + 1);
  const view = new Uint8Array(buf);
  assert.equal(view[0], 0);
  assert.equal(view[view.length - 1], 0);
  view[view.length - 1] = 9;
  assert.equal(view[view.length - 1], 9);
  native.munmap(buf);
  assert.equal(buf.byteLength, 0, "detached: no view reaches the unmapped pages");
});

test("a large state's mapping is counted as Node's external memory while it lives, and no longer once unmapped (bounded memory: unreferenced ones are collected)", async () => {
  const data = pattern((3 << 20) + 1, 5);
  const [r, w] = native.pipe(true);
  const before = process.memoryUsage().external;
  const [got] = await Promise.all([
    readStateFromFd(r, { maxBytes: 64 << 20 }),
    writeStateToFd(w, data, { zeroCopy: true }),
  ]);
  const held = process.memoryUsage().external - before;
  assert.equal(Buffer.compare(got, data), 0);
  assert.ok(held >= data.length, `Node counts ${held} bytes for a ${data.length}-byte state`);
  native.munmap(got.buffer as ArrayBuffer);
  const after = process.memoryUsage().external - before;
  assert.ok(after < held - data.length, `still counted after munmap: ${after} bytes`);
});
