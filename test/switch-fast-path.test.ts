/**
 * What the switch's fast data path keeps equal to the plain one: the MAC lookup cache never
 * answers with a MAC the table forgot, the clock read once per port batch is read again for
 * the next batch, pooled split-ring chains are reused per head but never while in flight, the
 * one-pass header + frame write marks every page it writes, and the dirty log's "page already
 * pending" shortcut ends with each flush.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import type { Gpa } from "../src/memory/address.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import { parseMac } from "../src/net/frame.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, PortHost, SwitchPort } from "../src/net/port.js";
import { Switch } from "../src/net/switch.js";
import { writeChainFrame } from "../src/virtq/chain-io.js";
import { splitRingPlacement } from "../src/virtq/layout.js";
import { SplitDeviceQueue, SplitDriverQueue } from "../src/virtq/split.js";

class Port implements SwitchPort {
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  host: PortHost | null = null;
  got = 0;
  constructor(readonly name: string) {}
  deliver(_frame: Frame): boolean {
    this.got++;
    return true;
  }
  attachHost(host: PortHost): void {
    this.host = host;
  }
  send(dst: string, src: string): void {
    const d = new Uint8Array(64);
    d.set(parseMac(dst), 0);
    d.set(parseMac(src), 6);
    (this.host as PortHost).receive(this, { data: d, meta: {} });
  }
}

const A = "02:00:00:00:00:0a";
const B = "02:00:00:00:00:0b";

function threePorts(clock: () => number): { sw: Switch; a: Port; b: Port; c: Port } {
  const sw = new Switch({ clock, sweepIntervalMs: 0 });
  const [a, b, c] = ["a", "b", "c"].map((n) => new Port(n)) as [Port, Port, Port];
  for (const p of [a, b, c]) sw.addPort(p);
  return { sw, a, b, c };
}

test("MAC cache: a MAC forgotten, flushed or moved is never answered from the cache", () => {
  const { sw, a, b, c } = threePorts(() => 1000);
  b.send(A, B); // learns B on b (A unknown: flooded)
  a.send(B, A); // to b only, and B is now in the lookup cache
  a.send(B, A);
  assert.deepEqual([b.got, c.got], [2, 1]);
  assert.equal(sw.forgetMac(B), true);
  a.send(B, A); // unknown again: flooded to b and c
  assert.deepEqual([b.got, c.got], [3, 2]);
  b.send(A, B); // learned again on b
  a.send(B, A);
  assert.deepEqual([b.got, c.got], [4, 2]);
  sw.flushMacs(b);
  a.send(B, A);
  assert.deepEqual([b.got, c.got], [5, 3]);
  c.send(A, B); // B moves to c
  a.send(B, A);
  assert.deepEqual([b.got, c.got], [5, 4], "the cached slot follows the move");
  sw.close();
});

test("batch clock: read once per port batch, and again after the batch's flush", () => {
  let now = 1000;
  let reads = 0;
  const { sw, a, b, c } = threePorts(() => {
    reads++;
    return now;
  });
  b.send(A, B);
  const before = reads;
  sw.beginBatch();
  for (let i = 0; i < 5; i++) a.send(B, A);
  assert.equal(reads - before, 1, "one clock read for the batch");
  sw.flush();
  now += 400_000; // past the 300 s ageing: B must age out in the next batch
  sw.beginBatch();
  a.send(B, A);
  sw.flush();
  assert.equal(c.got, 2, "the aged MAC was flooded: the new batch saw the new time");
  sw.close();
});

function ring(size = 8): {
  mem: GuestMemory;
  driver: SplitDriverQueue;
  device: SplitDeviceQueue;
  availU16: Uint16Array;
} {
  const memSize = 1 << 20;
  const buffer = new ArrayBuffer(memSize);
  const mem = new GuestMemory([
    createRegion(
      { gpa: gpa(0), size: memSize, uaddr: uaddr(0x10000), mmapOffset: mmapOffset(0) },
      buffer,
    ),
  ]);
  const p = splitRingPlacement(0, size);
  const spec = { size, desc: gpa(p.desc), avail: gpa(p.avail), used: gpa(p.used), eventIdx: false };
  const driver = new SplitDriverQueue(mem, spec);
  const device = new SplitDeviceQueue(mem, spec);
  return { mem, driver, device, availU16: new Uint16Array(buffer, p.avail, 2 + size) };
}

test("pooled chains: reused per head after pushUsed, a fresh object for a head still in flight", () => {
  const { driver, device, availU16 } = ring();
  const seg = (at: number, len: number) => [{ gpa: gpa(0x8000 + at) as Gpa, len, writable: true }];
  const h = driver.add(seg(0, 100)) as number;
  driver.kick();
  const c1 = device.pop();
  assert.ok(c1 !== null);
  assert.equal(c1.writableLength, 100);
  device.pushUsed(c1, 0);
  device.publish();
  assert.notEqual(driver.getUsed(), null);
  assert.equal(driver.add(seg(0x100, 300)), h, "the driver reuses the head");
  driver.kick();
  const c2 = device.pop();
  assert.equal(c2, c1, "the same object, refilled");
  assert.equal(c2?.writableLength, 300);
  assert.equal(c2?.writable[0]?.gpa, 0x8100);
  // A driver that makes the same head available twice while it is in flight: the second pop
  // must not overwrite the first chain.
  const at = device.lastAvailIdx;
  availU16[2 + (at % 8)] = h;
  Atomics.store(availU16, 1, at + 1);
  const c3 = device.pop();
  assert.ok(c3 !== null && c3 !== c2, "a second object for the head in flight");
  assert.equal(c2?.writableLength, 300, "the chain in flight is unchanged");
  device.pushUsed(c2 as NonNullable<typeof c2>, 0);
  device.pushUsed(c3, 0);
  assert.equal(device.inFlight, 0);
});

test("writeChainFrame: header and frame in one pass mark every page written; split buffers fall back", () => {
  const { mem, driver, device } = ring();
  const log = new DirtyLog(new ArrayBuffer(32), 0, 32);
  mem.log = log;
  const hdr = Uint8Array.from({ length: 12 }, (_, i) => i + 1);
  const frame = new Uint8Array(100).fill(0xee);
  // One segment straddling the page boundary at 0x9000; then a header split over two segments.
  driver.add([{ gpa: gpa(0x9000 - 50) as Gpa, len: 200, writable: true }]);
  driver.add([
    { gpa: gpa(0xc000) as Gpa, len: 4, writable: true },
    { gpa: gpa(0xd000) as Gpa, len: 200, writable: true },
  ]);
  driver.kick();
  const one = device.pop();
  const two = device.pop();
  assert.ok(one !== null && two !== null);
  assert.equal(writeChainFrame(mem, one, hdr, 12, frame), 112);
  assert.equal(writeChainFrame(mem, two, hdr, 10, frame), 110);
  log.flush();
  const bytes = mem.regions[0]!.bytes;
  assert.deepEqual([...bytes.subarray(0x9000 - 50, 0x9000 - 38)], [...hdr]);
  assert.equal(bytes[0x9000 - 38], 0xee);
  assert.deepEqual([...bytes.subarray(0xc000, 0xc004)], [1, 2, 3, 4]);
  assert.deepEqual([...bytes.subarray(0xd000, 0xd006)], [5, 6, 7, 8, 9, 10]);
  assert.equal(bytes[0xd006], 0xee);
  for (const page of [8, 9, 0xc, 0xd]) assert.ok(log.isDirty(page * 4096), `page ${page}`);
  assert.ok(!log.isDirty(0xa000));
});

test("dirty log: a page marked again after a flush reaches the log again", () => {
  const buf = new ArrayBuffer(8);
  const log = new DirtyLog(buf, 0, 8);
  log.mark(0x3000, 10);
  log.mark(0x3100, 10); // pending already
  log.flush();
  assert.ok(log.isDirty(0x3000));
  new Uint8Array(buf).fill(0); // the front-end's sync fetched and cleared it
  log.mark(0x3200, 10);
  log.flush();
  assert.ok(log.isDirty(0x3000), "marked again after the flush");
});
