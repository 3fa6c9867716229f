/**
 * The migration stream's PAGES path: the source's PageSender reuses its two section buffers
 * only once the stream has flushed them (a slow stream still receives every page as it was),
 * and the destination's reader hands out PAGES sections without allocating one per section.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Duplex, PassThrough } from "node:stream";

import { GuestRam } from "../src/frontend/guest-ram.js";
import { gpa } from "../src/memory/address.js";
import {
  PAGE_SIZE,
  PAGES_PER_SECTION,
  PageSender,
  SectionReader,
  SectionType,
  applyPages,
} from "../src/orchestrator/index.js";
import type { PageCounters } from "../src/orchestrator/index.js";

/**
 * A stream that flushes each written chunk only after `delayMs`, taking its bytes as they are
 * then: a chunk changed between its write and its flush arrives changed.
 */
function slowStream(delayMs: number): { stream: Duplex; chunks: Buffer[] } {
  const chunks: Buffer[] = [];
  const stream = new Duplex({
    write(chunk: Buffer, _enc, cb): void {
      setTimeout(() => {
        chunks.push(Buffer.from(chunk));
        cb();
      }, delayMs);
    },
    read(): void {},
  });
  return { stream, chunks };
}

test("pages: a slow stream gets every page as it was sent (no section buffer reused before it is flushed)", async () => {
  const n = 2 * PAGES_PER_SECTION + 88;
  const src = GuestRam.create({ regions: [{ gpa: 0, size: n * PAGE_SIZE }] });
  const dst = GuestRam.create({ regions: [{ gpa: 0, size: n * PAGE_SIZE }] });
  try {
    const page = new Uint8Array(PAGE_SIZE);
    for (let p = 0; p < n; p++) {
      if (p >= PAGES_PER_SECTION && p % 7 === 3) continue; // a zero page (the first section is the largest)
      page.fill((p * 31) & 0xff || 1);
      new DataView(page.buffer).setUint32(0, p);
      src.write(gpa(p * PAGE_SIZE), page);
    }
    const { stream, chunks } = slowStream(15);
    const counters: PageCounters = { pages: 0, zeroPages: 0, bytes: 0 };
    const sender = new PageSender(stream, src.memory, counters);
    const pages = Array.from({ length: n }, (_, p) => p);
    await sender.send(4, pages);
    await sender.flushed();
    // Three sections from two buffers: the third waited until the first was flushed.
    assert.equal(chunks.length, 3);
    assert.equal(counters.pages, n);
    assert.equal(
      counters.zeroPages,
      pages.filter((p) => p >= PAGES_PER_SECTION && p % 7 === 3).length,
    );
    assert.equal(
      counters.bytes,
      chunks.reduce((a, c) => a + c.length, 0),
    );

    // The destination reads them in small pieces, so every section spans many chunks.
    const wire = Buffer.concat(chunks);
    const pipe = new PassThrough();
    const reader = new SectionReader(pipe);
    for (let off = 0; off < wire.length; off += 9999) pipe.write(wire.subarray(off, off + 9999));
    const buffers = new Set<ArrayBufferLike>();
    let applied = 0;
    for (let i = 0; i < 3; i++) {
      const s = await reader.next({ borrow: true });
      assert.equal(s.type, SectionType.PAGES);
      buffers.add(s.payload.buffer);
      const r = applyPages(dst.memory, s.payload);
      assert.equal(r.iteration, 4);
      applied += r.pages;
    }
    assert.equal(applied, n);
    assert.equal(buffers.size, 1, "the borrowed sections share one scratch buffer");
    for (let p = 0; p < n; p++) {
      assert.deepEqual(
        dst.read(gpa(p * PAGE_SIZE), PAGE_SIZE),
        src.read(gpa(p * PAGE_SIZE), PAGE_SIZE),
        `page ${p}`,
      );
    }
  } finally {
    src.close();
    dst.close();
  }
});

test("pages: a section read without borrowing stays the caller's after later reads", async () => {
  const pipe = new PassThrough();
  const reader = new SectionReader(pipe);
  const { stream, chunks } = slowStream(0);
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: 64 * PAGE_SIZE }] });
  try {
    ram.write(gpa(0), new Uint8Array(PAGE_SIZE).fill(0xaa));
    const sender = new PageSender(stream, ram.memory, { pages: 0, zeroPages: 0, bytes: 0 });
    await sender.send(1, [0]);
    await sender.flushed();
    ram.write(gpa(0), new Uint8Array(PAGE_SIZE).fill(0xbb));
    await sender.send(2, [0]);
    await sender.flushed();
    const wire = Buffer.concat(chunks);
    for (let off = 0; off < wire.length; off += 1000) pipe.write(wire.subarray(off, off + 1000));
    const kept = await reader.next();
    await reader.next({ borrow: true });
    assert.equal(Buffer.from(kept.payload).readUInt32BE(0), 1, "iteration 1 kept");
    assert.equal(kept.payload[8 + 5], 0xaa, "its page bytes kept");
  } finally {
    ram.close();
  }
});
