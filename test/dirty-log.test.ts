import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { gpa, mmapOffset, uaddr, GuestMemoryError } from "../src/memory/address.js";
import { DirtyLog, LOG_PAGE_SIZE } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import { mapDirtyLog, unmapDirtyLog } from "../src/memory/mapping.js";
import { native } from "../src/native.js";

/** The pages whose bits are set in a bitmap. */
function setPages(bytes: Uint8Array): number[] {
  const out: number[] = [];
  bytes.forEach((b, i) => {
    for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) out.push(i * 8 + bit);
  });
  return out;
}

function pagesOf(g: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(g / 4096); p <= Math.floor((g + len - 1) / 4096); p++) out.push(p);
  return out;
}

test("a mark sets bit (page & 7) of byte (page >> 3), for pages 0, 7, 8, 31, 32, 4095", () => {
  for (const page of [0, 7, 8, 31, 32, 33, 4095]) {
    const buf = new ArrayBuffer(512);
    const log = new DirtyLog(buf, 0, 512);
    log.mark(page * LOG_PAGE_SIZE + 123, 1);
    log.flush();
    const bytes = new Uint8Array(buf);
    assert.equal(bytes[page >> 3], 1 << (page & 7), `page ${page}`);
    assert.deepEqual(setPages(bytes), [page], `only page ${page}`);
  }
});

test("a multi-page mark sets exactly the pages it touches, whole words included", () => {
  const buf = new ArrayBuffer(64);
  const log = new DirtyLog(buf, 0, 64);
  // pages 5 .. 200: partial first word, whole words, partial last word
  log.mark(5 * 4096 + 4095, 195 * 4096 + 2);
  log.flush();
  assert.deepEqual(setPages(new Uint8Array(buf)), pagesOf(5 * 4096 + 4095, 195 * 4096 + 2));
});

test("random marks set exactly the pages written and no other (property, vs a model)", () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 0, max: 3 }), // byte offset of the log in its buffer (word or byte path)
      fc.integer({ min: 1, max: 67 }), // log size in bytes (not always a multiple of 4)
      fc.array(
        fc.tuple(
          fc.nat(),
          fc.oneof(fc.integer({ min: 0, max: 70000 }), fc.integer({ min: 0, max: 1 << 21 })),
          fc.boolean(),
        ),
        { maxLength: 60 },
      ),
      (offset, size, ops) => {
        const buf = new ArrayBuffer(offset + size + 5);
        const bytes = new Uint8Array(buf);
        bytes.fill(0);
        const log = new DirtyLog(buf, offset, size);
        const limit = size * 8 * 4096;
        const model = new Set<number>();
        for (const [raw, len, flushNow] of ops) {
          const g = raw % (limit + 8192); // sometimes beyond the log
          if (len > 0 && g + len > limit) {
            assert.throws(() => log.mark(g, len), GuestMemoryError);
            continue;
          }
          log.mark(g, len);
          if (len > 0) for (const p of pagesOf(g, len)) model.add(p);
          if (flushNow) log.flush();
        }
        log.flush();
        const got = setPages(bytes.subarray(offset, offset + size));
        assert.deepEqual(
          got,
          [...model].sort((a, b) => a - b),
        );
        // nothing outside the log's bytes
        assert.ok(bytes.subarray(0, offset).every((x) => x === 0));
        assert.ok(bytes.subarray(offset + size).every((x) => x === 0));
      },
    ),
    { numRuns: 400 },
  );
});

test("a mark beyond the log throws naming the address and size, and writes nothing", () => {
  const buf = new ArrayBuffer(4);
  const log = new DirtyLog(buf, 0, 4); // 32 pages: gpa < 0x20000
  log.mark(0x1000, 1); // pending
  assert.throws(
    () => log.mark(0x1f000, 0x1001),
    (e: unknown) => {
      assert.ok(e instanceof GuestMemoryError);
      assert.equal(e.gpa, 0x1f000);
      assert.equal(e.value, 4);
      assert.match(e.message, /0x1f000/);
      assert.match(e.message, /4 bytes/);
      return true;
    },
  );
  assert.throws(() => log.mark(-4096, 10), GuestMemoryError);
  assert.throws(() => log.mark(0, -1), GuestMemoryError);
  log.flush();
  assert.deepEqual(setPages(new Uint8Array(buf)), [1], "only the earlier valid mark");
  log.mark(0x1f000, 0x1000); // the last page is fine
  log.flush();
  assert.deepEqual(setPages(new Uint8Array(buf)), [1, 31]);
});

test("marks of the same word coalesce; a full pending set flushes itself", () => {
  const buf = new ArrayBuffer(1024);
  const log = new DirtyLog(buf, 0, 1024);
  for (let i = 0; i < 100; i++) log.mark(3 * 4096 + i, 1);
  log.mark(4 * 4096, 1); // same 32-bit word (pages 0..31)
  assert.equal(log.pendingCount, 1);
  assert.deepEqual(setPages(new Uint8Array(buf)), [], "not written before flush");
  // 40 distinct words: the set (16) fills and flushes the earlier ones
  for (let w = 1; w <= 40; w++) log.mark(w * 32 * 4096, 1);
  assert.ok(log.pendingCount <= 16);
  assert.ok(log.isDirty(3 * 4096), "earlier marks flushed when the set filled");
  log.flush();
  assert.equal(log.pendingCount, 0);
  assert.equal(setPages(new Uint8Array(buf)).length, 2 + 40);
});

test("a log replaced mid-way: marks before the swap land in the old log, after in the new", () => {
  const mem = new GuestMemory([
    createRegion(
      { gpa: gpa(0), size: 0x40000, uaddr: uaddr(0x10000000), mmapOffset: mmapOffset(0) },
      new ArrayBuffer(0x40000),
    ),
  ]);
  const bufA = new ArrayBuffer(8);
  const bufB = new ArrayBuffer(16); // the resized log
  mem.log = new DirtyLog(bufA, 0, 8);
  mem.write(gpa(0x2000), new Uint8Array(10));
  mem.write(gpa(0x2100), new Uint8Array(10));
  mem.log = new DirtyLog(bufB, 0, 16);
  mem.write(gpa(0x30000), new Uint8Array(0x2000));
  mem.log?.flush();
  assert.deepEqual(setPages(new Uint8Array(bufA)), [2]);
  assert.deepEqual(setPages(new Uint8Array(bufB)), [0x30, 0x31]);
});

test("mapDirtyLog: marks are visible through another mapping of the log fd", () => {
  const fd = native.memfdCreate("dirty-log-test");
  const page = native.pageSize();
  const logs: DirtyLog[] = [];
  try {
    native.ftruncate(fd, page);
    const writer = mapDirtyLog(fd, 0, 64);
    logs.push(writer);
    const reader = mapDirtyLog(fd, 0, 64);
    logs.push(reader);
    writer.mark(0, 1); // page 0, as QEMU's test_migrate checks log[0]
    writer.mark(100 * 4096, 1);
    assert.equal(reader.isDirty(0), false);
    writer.flush();
    assert.ok(reader.isDirty(0));
    assert.ok(reader.isDirty(100 * 4096));
    assert.ok(!reader.isDirty(4096));
    assert.throws(() => mapDirtyLog(fd, page - 8, 64), GuestMemoryError);
  } finally {
    for (const l of logs) unmapDirtyLog(l);
    native.close(fd);
  }
});
