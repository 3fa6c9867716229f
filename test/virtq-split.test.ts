import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import type { Gpa } from "../src/memory/address.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import type { Region } from "../src/memory/guest-memory.js";
import {
  VIRTQ_DESC_F_INDIRECT as INDIRECT,
  VIRTQ_DESC_F_NEXT as NEXT,
  VIRTQ_DESC_F_WRITE as WRITE,
  splitRingPlacement,
  splitRingSizes,
  vringNeedEvent,
} from "../src/virtq/layout.js";
import { SplitDeviceQueue, SplitDriverQueue } from "../src/virtq/split.js";
import type { SplitDeviceQueueOptions } from "../src/virtq/split.js";
import { VirtqueueError } from "../src/virtq/types.js";
import type { DescChain, Segment } from "../src/virtq/types.js";
import { MockGuest } from "../src/testing/mock-driver.js";

const MEM_SIZE = 1 << 20;

function makeRegion(g: number, size: number): Region {
  return createRegion(
    { gpa: gpa(g), size, uaddr: uaddr(0x10000000 + g), mmapOffset: mmapOffset(0) },
    new ArrayBuffer(size),
  );
}

function makeMem(size = MEM_SIZE): GuestMemory {
  return new GuestMemory([makeRegion(0, size)]);
}

interface Ring {
  size: number;
  desc: Gpa;
  avail: Gpa;
  used: Gpa;
  eventIdx: boolean;
}

function ringAt(base: number, size: number, eventIdx: boolean): Ring {
  const p = splitRingPlacement(base, size);
  return { size, desc: gpa(p.desc), avail: gpa(p.avail), used: gpa(p.used), eventIdx };
}

/** Raw access to ring memory, for building malformed rings. */
class Raw {
  constructor(
    readonly mem: GuestMemory,
    readonly ring: Ring,
  ) {}
  view(g: number, len: number): DataView {
    const v = this.mem.gpaToView(gpa(g), len);
    return new DataView(v.buffer, v.byteOffset, v.byteLength);
  }
  desc(i: number, addr: number, len: number, flags: number, next: number, table?: number): void {
    const v = this.view((table ?? this.ring.desc) + 16 * i, 16);
    v.setUint32(0, addr % 2 ** 32, true);
    v.setUint32(4, Math.floor(addr / 2 ** 32), true);
    v.setUint32(8, len, true);
    v.setUint16(12, flags, true);
    v.setUint16(14, next, true);
  }
  /** publish heads starting at the current avail.idx */
  publish(...heads: number[]): void {
    const v = this.view(this.ring.avail, 4 + 2 * this.ring.size);
    let idx = v.getUint16(2, true);
    for (const h of heads) {
      v.setUint16(4 + 2 * (idx % this.ring.size), h, true);
      idx = (idx + 1) & 0xffff;
    }
    v.setUint16(2, idx, true);
  }
  setAvailIdx(idx: number): void {
    this.view(this.ring.avail, 4).setUint16(2, idx, true);
  }
  availFlags(): number {
    return this.view(this.ring.avail, 2).getUint16(0, true);
  }
  usedFlags(): number {
    return this.view(this.ring.used, 2).getUint16(0, true);
  }
  usedIdx(): number {
    return this.view(this.ring.used, 4).getUint16(2, true);
  }
  /** used_event, in the avail ring */
  setUsedEvent(v: number): void {
    this.view(this.ring.avail + 4 + 2 * this.ring.size, 2).setUint16(0, v, true);
  }
  usedEvent(): number {
    return this.view(this.ring.avail + 4 + 2 * this.ring.size, 2).getUint16(0, true);
  }
  /** avail_event, in the used ring */
  setAvailEvent(v: number): void {
    this.view(this.ring.used + 4 + 8 * this.ring.size, 2).setUint16(0, v, true);
  }
  availEvent(): number {
    return this.view(this.ring.used + 4 + 8 * this.ring.size, 2).getUint16(0, true);
  }
}

function expectVqError(fn: () => unknown, field: string, value?: number): VirtqueueError {
  let caught: unknown = null;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof VirtqueueError, `expected VirtqueueError, got ${String(caught)}`);
  assert.equal(caught.code, "ERR_VHOST_VIRTQUEUE");
  assert.equal(caught.field, field, caught.message);
  if (value !== undefined) assert.equal(caught.value, value, caught.message);
  return caught;
}

/** A deterministic pseudo-random generator (xorshift32), so failures reproduce. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

function payload(n: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed * 7) & 0xff);
}

/**
 * Driver sends buffers of random shapes (readable request segments + writable response
 * segments); the device checks each request's bytes, writes a response derived from it and
 * returns the chain; the driver checks the length and the response.
 */
function roundTrip(
  mem: GuestMemory,
  devMem: GuestMemory,
  ring: Ring,
  count: number,
  opts: {
    startIdx?: number;
    indirect?: boolean;
    indirectTable?: Gpa;
    bufBase: number;
    seed: number;
  },
): { driver: SplitDriverQueue; device: SplitDeviceQueue; maxDescCount: number } {
  const driver = new SplitDriverQueue(mem, {
    ...ring,
    startIdx: opts.startIdx ?? 0,
    indirect: opts.indirect ?? false,
    indirectTable: opts.indirectTable,
    indirectMaxSegments: 8,
  });
  const device = new SplitDeviceQueue(devMem, {
    ...ring,
    indirect: opts.indirect ?? false,
    lastAvailIdx: driver.availIdx,
  });
  assert.equal(device.usedIdx, opts.startIdx ?? 0, "device re-read used.idx");
  const rand = rng(opts.seed);
  const slot = 4096;
  const outstanding = new Map<
    number,
    { seed: number; reqLen: number; resLen: number; at: number }
  >();
  const freeSlots = Array.from({ length: ring.size }, (_, i) => i);
  let sent = 0;
  let done = 0;
  let maxDescCount = 0;
  while (done < count) {
    // driver: add a random number of buffers
    const burst = 1 + Math.floor(rand() * ring.size);
    for (let b = 0; b < burst && sent < count; b++) {
      const nr = 1 + Math.floor(rand() * 3);
      const nw = Math.floor(rand() * 3);
      const reqLen = nr * 100 + Math.floor(rand() * 100);
      const resLen = nw === 0 ? 0 : nw * 50 + Math.floor(rand() * 50);
      const s = freeSlots.pop();
      if (s === undefined) break;
      const at = opts.bufBase + s * slot;
      const seed = sent;
      mem.write(gpa(at), payload(reqLen, seed));
      const segs: Segment[] = [];
      const rstep = Math.ceil(reqLen / nr);
      for (let off = 0; off < reqLen; off += rstep) {
        segs.push({ gpa: gpa(at + off), len: Math.min(rstep, reqLen - off), writable: false });
      }
      if (nw > 0) {
        const wstep = Math.ceil(resLen / nw);
        for (let off = 0; off < resLen; off += wstep) {
          segs.push({
            gpa: gpa(at + 2048 + off),
            len: Math.min(wstep, resLen - off),
            writable: true,
          });
        }
      }
      const id = driver.add(segs, s);
      if (id === null) {
        freeSlots.push(s);
        break;
      }
      outstanding.set(s, { seed, reqLen, resLen, at });
      sent++;
    }
    driver.kick();
    // device: process everything available
    for (;;) {
      const c = device.pop();
      if (c === null) break;
      maxDescCount = Math.max(maxDescCount, c.descCount);
      const req = new Uint8Array(c.readableLength);
      let off = 0;
      for (const seg of c.readable) {
        devMem.read(seg.gpa, req.subarray(off, off + seg.len));
        off += seg.len;
      }
      // response: the request's bytes + 1, as much as fits
      let w = 0;
      for (const seg of c.writable) {
        const chunk = req.slice(w, w + seg.len).map((x) => (x + 1) & 0xff);
        devMem.write(seg.gpa, chunk);
        w += seg.len;
      }
      device.pushUsed(c, Math.min(w, req.length));
    }
    device.publish();
    // driver: collect and check
    for (;;) {
      const u = driver.getUsed();
      if (u === null) break;
      const s = u.token as number;
      const o = outstanding.get(s);
      assert.ok(o, "token maps to an outstanding buffer");
      outstanding.delete(s);
      freeSlots.push(s);
      const expectLen = Math.min(o.resLen, o.reqLen);
      assert.equal(u.len, expectLen);
      const res = new Uint8Array(expectLen);
      mem.read(gpa(o.at + 2048), res);
      const req = payload(o.reqLen, o.seed);
      for (let i = 0; i < expectLen; i++) assert.equal(res[i], ((req[i] as number) + 1) & 0xff);
      done++;
    }
  }
  assert.equal(driver.freeCount, ring.size);
  assert.equal(device.inFlight, 0);
  return { driver, device, maxDescCount };
}

test("many buffers round-trip with payload checks (one GuestMemory, ArrayBuffers)", () => {
  const mem = makeMem(4 << 20);
  for (const eventIdx of [false, true]) {
    const ring = ringAt(0, 64, eventIdx);
    const r = roundTrip(mem, mem, ring, 5000, { bufBase: 0x100000, seed: 7 });
    assert.equal(r.device.getBase().availIdx, 5000);
    assert.equal(r.device.usedIdx, 5000);
    assert.ok(r.maxDescCount > 1, "multi-descriptor chains were exercised");
  }
});

test("u16 indices wrap around (start near 65535)", () => {
  const mem = makeMem(4 << 20);
  const ring = ringAt(0, 16, true);
  const r = roundTrip(mem, mem, ring, 300, { startIdx: 65530, bufBase: 0x100000, seed: 3 });
  assert.equal(r.device.getBase().availIdx, (65530 + 300) & 0xffff);
  assert.equal(r.driver.lastUsedIdx, (65530 + 300) & 0xffff);
  assert.equal(new Raw(mem, ring).usedIdx(), (65530 + 300) & 0xffff);
});

test("indirect chains round-trip; a chain's descCount is 1", () => {
  const mem = makeMem(4 << 20);
  const ring = ringAt(0, 32, false);
  const r = roundTrip(mem, mem, ring, 2000, {
    indirect: true,
    indirectTable: gpa(0x10000),
    bufBase: 0x100000,
    seed: 11,
  });
  assert.equal(r.maxDescCount, 1, "every chain took one ring descriptor");
});

test("direct descriptors followed by an indirect one form one chain", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, false);
  const raw = new Raw(mem, ring);
  const table = 0x8000;
  raw.desc(1, 0x21000, 20, NEXT, 2);
  // WRITE on the descriptor that refers to the table is ignored (VIRTIO 1.2 §2.7.5.3.2)
  raw.desc(2, table, 32, INDIRECT | WRITE, 0);
  // indirect table at `table` of 2 entries
  raw.desc(0, 0x22000, 30, NEXT, 1, table);
  raw.desc(1, 0x23000, 40, WRITE, 0, table);
  raw.publish(1);
  const dev = new SplitDeviceQueue(mem, { ...ring, indirect: true });
  const c = dev.pop() as DescChain;
  assert.equal(c.head, 1);
  assert.equal(c.descCount, 2);
  assert.deepEqual(
    c.readable.map((s) => [s.gpa, s.len]),
    [
      [0x21000, 20],
      [0x22000, 30],
    ],
  );
  assert.deepEqual(
    c.writable.map((s) => [s.gpa, s.len]),
    [[0x23000, 40]],
  );
  assert.equal(c.readableLength, 50);
  assert.equal(c.writableLength, 40);
});

test("a buffer spanning two adjacent regions yields one segment per region", () => {
  const mem = new GuestMemory([makeRegion(0, 0x10000), makeRegion(0x10000, 0x10000)]);
  const ring = ringAt(0, 4, false);
  const raw = new Raw(mem, ring);
  raw.desc(0, 0xff00, 0x200, 0, 0);
  raw.publish(0);
  const c = new SplitDeviceQueue(mem, ring).pop() as DescChain;
  assert.deepEqual(
    c.readable.map((s) => [s.gpa, s.len]),
    [
      [0xff00, 0x100],
      [0x10000, 0x100],
    ],
  );
  assert.equal(c.readableLength, 0x200);
});

test("EVENT_IDX: publish() asks for a notification exactly when vring_need_event says so", () => {
  const mem = makeMem();
  const ring = ringAt(0, 16, true);
  const raw = new Raw(mem, ring);
  const driver = new SplitDriverQueue(mem, { ...ring, startIdx: 65500 });
  const device = new SplitDeviceQueue(mem, { ...ring, lastAvailIdx: 65500 });
  const rand = rng(99);
  let checked = 0;
  let trueCount = 0;
  let falseCount = 0;
  let first = true;
  for (let round = 0; round < 400; round++) {
    const n = 1 + Math.floor(rand() * 6);
    for (let i = 0; i < n; i++) driver.add([{ gpa: gpa(0x20000), len: 64, writable: true }]);
    driver.kick();
    const old = device.usedIdx;
    for (let i = 0; i < n; i++) device.pushUsed(device.pop() as DescChain, 0);
    // the driver's used_event: anywhere around the interesting window
    const event = (old + Math.floor(rand() * 12) - 3) & 0xffff;
    raw.setUsedEvent(event);
    const need = device.publish();
    const expect = vringNeedEvent(event, device.usedIdx, old);
    if (first) {
      assert.equal(need, true, "first publish after start always notifies");
      first = false;
    } else {
      assert.equal(need, expect, `event ${event} old ${old} new ${device.usedIdx}`);
      checked++;
      if (expect) trueCount++;
      else falseCount++;
    }
    while (driver.getUsed() !== null);
    raw.setUsedEvent(event); // getUsed() may have moved it; keep the test's value
  }
  assert.ok(checked > 300 && trueCount > 50 && falseCount > 50, `${trueCount}/${falseCount}`);
  assert.equal(device.publish(), false, "nothing pushed: no notification");
});

test("EVENT_IDX: kick() follows avail_event; the device writes avail_event when it drains", () => {
  const mem = makeMem();
  const ring = ringAt(0, 16, true);
  const raw = new Raw(mem, ring);
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  const seg = [{ gpa: gpa(0x20000), len: 64, writable: false }];
  // avail_event = 0 after init: the first buffer (idx 0 -> 1) crosses it
  driver.add(seg);
  assert.equal(driver.kick(), true);
  // the device has not drained: avail_event still 0, the next kick is suppressed
  driver.add(seg);
  assert.equal(driver.kick(), false);
  assert.ok(device.pop());
  assert.ok(device.pop());
  assert.equal(raw.availEvent(), 0, "not written while buffers are available");
  assert.equal(device.pop(), null);
  assert.equal(raw.availEvent(), 2, "written when the ring is found empty");
  driver.add(seg);
  assert.equal(driver.kick(), true);
  // random avail_event values vs the formula
  const rand = rng(5);
  for (let i = 0; i < 200; i++) {
    const old = driver.availIdx;
    const n = 1 + Math.floor(rand() * 4);
    for (let c = device.pop(); c !== null; c = device.pop()) device.pushUsed(c, 0);
    device.publish();
    while (driver.getUsed() !== null);
    for (let k = 0; k < n; k++) driver.add(seg);
    const event = (old + Math.floor(rand() * 8) - 2) & 0xffff;
    raw.setAvailEvent(event);
    assert.equal(driver.kick(), vringNeedEvent(event, driver.availIdx, old));
  }
});

test("EVENT_IDX: setNotification(false) stops avail_event updates, (true) re-checks", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, true);
  const raw = new Raw(mem, ring);
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  const seg = [{ gpa: gpa(0x20000), len: 8, writable: false }];
  assert.equal(device.setNotification(false), false);
  driver.add(seg);
  driver.kick();
  assert.ok(device.pop());
  assert.equal(device.pop(), null);
  assert.equal(raw.availEvent(), 0, "disabled: avail_event not updated");
  // the race: a buffer arrives while notifications are off; enabling must report it
  driver.add(seg);
  assert.equal(driver.kick(), false, "no kick: avail_event is stale");
  assert.equal(device.setNotification(true), true, "enabling finds the pending buffer");
  assert.equal(raw.availEvent(), 1);
  assert.ok(device.pop());
  assert.equal(device.pop(), null);
  assert.equal(raw.availEvent(), 2);
  assert.equal(device.setNotification(true), false);
});

test("without EVENT_IDX: NO_INTERRUPT and NO_NOTIFY flags", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, false);
  const raw = new Raw(mem, ring);
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  const seg = [{ gpa: gpa(0x20000), len: 8, writable: true }];
  const cycle = (): boolean => {
    device.pushUsed(device.pop() as DescChain, 0);
    const need = device.publish();
    assert.ok(driver.getUsed());
    return need;
  };
  driver.add(seg);
  assert.equal(driver.kick(), true, "NO_NOTIFY clear");
  assert.equal(cycle(), true, "NO_INTERRUPT clear");
  assert.equal(driver.setNotification(false), false);
  assert.equal(raw.availFlags(), 1);
  driver.add(seg);
  driver.kick();
  assert.equal(cycle(), false, "NO_INTERRUPT set");
  assert.equal(driver.setNotification(true), false);
  assert.equal(raw.availFlags(), 0);
  assert.equal(device.setNotification(false), false);
  assert.equal(raw.usedFlags(), 1);
  driver.add(seg);
  assert.equal(driver.kick(), false, "NO_NOTIFY set");
  assert.equal(device.setNotification(true), true, "a buffer is pending");
  assert.equal(raw.usedFlags(), 0);
  assert.equal(cycle(), true);
  driver.add(seg);
  assert.equal(driver.kick(), true);
  // driver side: enabling with a used buffer already waiting reports it
  device.pushUsed(device.pop() as DescChain, 0);
  driver.setNotification(false);
  device.publish();
  assert.equal(driver.setNotification(true), true);
});

test("malformed rings raise VirtqueueError naming the field", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, false);
  const fresh = (
    opts: Partial<SplitDeviceQueueOptions> = {},
  ): { raw: Raw; dev: SplitDeviceQueue } => {
    mem.gpaToView(gpa(0), 0x2000).fill(0);
    return { raw: new Raw(mem, ring), dev: new SplitDeviceQueue(mem, { ...ring, ...opts }) };
  };
  {
    // loop a -> b -> a
    const { raw, dev } = fresh();
    raw.desc(2, 0x20000, 8, NEXT, 5);
    raw.desc(5, 0x20000, 8, NEXT, 2);
    raw.publish(2);
    expectVqError(() => dev.pop(), "desc.next", 2);
    assert.equal(dev.getBase().availIdx, 0, "not advanced past a bad chain");
  }
  {
    // self loop
    const { raw, dev } = fresh();
    raw.desc(3, 0x20000, 8, NEXT, 3);
    raw.publish(3);
    expectVqError(() => dev.pop(), "desc.next", 3);
  }
  {
    // next index out of range
    const { raw, dev } = fresh();
    raw.desc(0, 0x20000, 8, NEXT, 8);
    raw.publish(0);
    expectVqError(() => dev.pop(), "desc.next", 8);
  }
  {
    // head out of range
    const { raw, dev } = fresh();
    raw.publish(9);
    expectVqError(() => dev.pop(), "avail.ring", 9);
  }
  {
    // a chain longer than the ring: 7 direct descriptors + an indirect table of 4 (limit 8)
    const { raw, dev } = fresh({ indirect: true, maxChainLength: 8 });
    for (let i = 0; i < 7; i++) raw.desc(i, 0x20000, 8, NEXT, i + 1);
    raw.desc(7, 0x9000, 64, INDIRECT, 0);
    for (let j = 0; j < 4; j++) raw.desc(j, 0x21000, 8, j < 3 ? NEXT : 0, j + 1, 0x9000);
    raw.publish(0);
    expectVqError(() => dev.pop(), "chain length", 9);
  }
  {
    // default limit: max(size, 1024) descriptors; an indirect table of 1100 entries
    const { raw, dev } = fresh({ indirect: true });
    const table = 0x40000;
    for (let j = 0; j < 1100; j++) raw.desc(j, 0x21000, 8, j < 1099 ? NEXT : 0, j + 1, table);
    raw.desc(0, table, 1100 * 16, INDIRECT, 0);
    raw.publish(0);
    expectVqError(() => dev.pop(), "chain length", 1025);
    // and a table over 32768 entries is refused before it is walked
    raw.desc(1, table, 32769 * 16, INDIRECT, 0);
    const dev2 = new SplitDeviceQueue(mem, { ...ring, indirect: true, lastAvailIdx: 1 });
    raw.publish(1);
    expectVqError(() => dev2.pop(), "chain length", 32769);
  }
  {
    // buffer outside guest memory; buffer straddling the end; address beyond 2^53
    const { raw, dev } = fresh();
    raw.desc(0, MEM_SIZE, 8, 0, 0);
    raw.desc(1, MEM_SIZE - 4, 8, 0, 0);
    raw.desc(2, 2 ** 60, 8, 0, 0);
    raw.publish(0);
    expectVqError(() => dev.pop(), "desc.addr", MEM_SIZE);
    const d1 = new SplitDeviceQueue(mem, { ...ring, lastAvailIdx: 1 });
    raw.publish(1);
    expectVqError(() => d1.pop(), "desc.addr", MEM_SIZE - 4);
    const d2 = new SplitDeviceQueue(mem, { ...ring, lastAvailIdx: 2 });
    raw.publish(2);
    expectVqError(() => d2.pop(), "desc.addr");
  }
  {
    // indirect table with a bad length (0, not a multiple of 16), outside memory
    for (const [len, addr, field] of [
      [0, 0x9000, "indirect.len"],
      [24, 0x9000, "indirect.len"],
      [32, MEM_SIZE - 16, "desc.addr"],
    ] as const) {
      const { raw, dev } = fresh({ indirect: true });
      raw.desc(0, addr, len, INDIRECT, 0);
      raw.publish(0);
      expectVqError(() => dev.pop(), field);
    }
  }
  {
    // nested indirect, INDIRECT without the feature, INDIRECT with NEXT
    const { raw, dev } = fresh({ indirect: true });
    raw.desc(0, 0x9000, 32, INDIRECT, 0);
    raw.desc(0, 0x20000, 8, NEXT, 1, 0x9000);
    raw.desc(1, 0xa000, 16, INDIRECT, 0, 0x9000);
    raw.publish(0);
    expectVqError(() => dev.pop(), "desc.flags", INDIRECT);
    const noFeature = new SplitDeviceQueue(mem, ring);
    expectVqError(() => noFeature.pop(), "desc.flags", INDIRECT);
    raw.desc(0, 0x9000, 32, INDIRECT | NEXT, 1);
    expectVqError(() => new SplitDeviceQueue(mem, { ...ring, indirect: true }).pop(), "desc.flags");
  }
  {
    // loop and out-of-range next inside an indirect table
    const { raw, dev } = fresh({ indirect: true });
    raw.desc(0, 0x9000, 48, INDIRECT, 0);
    raw.desc(0, 0x20000, 8, NEXT, 1, 0x9000);
    raw.desc(1, 0x20000, 8, NEXT, 0, 0x9000);
    raw.publish(0);
    expectVqError(() => dev.pop(), "indirect.next", 0);
    raw.desc(1, 0x20000, 8, NEXT, 3, 0x9000);
    expectVqError(
      () => new SplitDeviceQueue(mem, { ...ring, indirect: true }).pop(),
      "indirect.next",
      3,
    );
  }
  {
    // avail.idx more than size ahead of last_avail
    const { raw, dev } = fresh();
    raw.setAvailIdx(9);
    expectVqError(() => dev.pop(), "avail.idx", 9);
    raw.setAvailIdx(8); // exactly size ahead is fine
    raw.desc(0, 0x20000, 8, 0, 0);
    assert.ok(dev.pop());
    const wrapped = new SplitDeviceQueue(mem, { ...ring, lastAvailIdx: 65533 });
    raw.setAvailIdx(6); // 9 ahead across the wrap
    expectVqError(() => wrapped.pop(), "avail.idx", 6);
  }
  {
    // readable after writable; total length over 2^32 - 1
    const { raw, dev } = fresh();
    raw.desc(0, 0x20000, 8, WRITE | NEXT, 1);
    raw.desc(1, 0x20000, 8, 0, 0);
    raw.publish(0);
    expectVqError(() => dev.pop(), "desc.flags", 0);
    // 4097 indirect entries of 1 MiB each (all inside guest memory): over 2^32 bytes in total
    const table = 0x40000;
    for (let j = 0; j < 4097; j++) raw.desc(j, 0, MEM_SIZE, j < 4096 ? NEXT : 0, j + 1, table);
    raw.desc(2, table, 4097 * 16, INDIRECT, 0);
    raw.publish(2);
    const d2 = new SplitDeviceQueue(mem, {
      ...ring,
      indirect: true,
      maxChainLength: 5000,
      lastAvailIdx: 1,
    });
    expectVqError(() => d2.pop(), "desc.len", MEM_SIZE);
  }
});

test("ring placement is checked at construction, naming the ring part", () => {
  const mem = new GuestMemory([makeRegion(0, 0x4000), makeRegion(0x10000, 0x1000)]);
  const ok = ringAt(0, 8, true);
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, size: 12 }), "size", 12);
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, size: 65536 }), "size");
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, desc: gpa(8) }), "desc", 8);
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, avail: gpa(0x301) }), "avail", 0x301);
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, used: gpa(0x402) }), "used", 0x402);
  // the used ring runs past the end of the region
  const e = expectVqError(
    () => new SplitDeviceQueue(mem, { ...ok, used: gpa(0x4000 - 32) }),
    "used",
  );
  assert.match(e.message, /used ring/);
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, desc: gpa(0x8000) }), "desc");
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, lastAvailIdx: 70000 }), "lastAvailIdx");
  // a ring whose event field is exactly at the region's end is fine only without EVENT_IDX
  const sizes = splitRingSizes(8);
  const tight = gpa(0x11000 - (sizes.used - 2));
  assert.ok(new SplitDeviceQueue(mem, { ...ok, eventIdx: false, used: tight }));
  expectVqError(() => new SplitDeviceQueue(mem, { ...ok, used: tight }), "used");
});

test("pushUsed checks the written length and in-flight count; the driver checks used ids", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, false);
  const raw = new Raw(mem, ring);
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  expectVqError(() => device.pushUsed({ head: 0 } as DescChain, 0), "inFlight");
  driver.add([{ gpa: gpa(0x20000), len: 100, writable: true }], "tok");
  driver.kick();
  const c = device.pop() as DescChain;
  assert.equal(device.inFlight, 1);
  expectVqError(() => device.pushUsed(c, 101), "used.len", 101);
  device.pushUsed(c, 100);
  assert.equal(device.publish(), true);
  assert.deepEqual(driver.getUsed(), { id: c.head, len: 100, token: "tok" });
  // a device returning an id that is not outstanding
  const used = new DataView(mem.gpaToView(ring.used, 16).buffer, ring.used, 16);
  used.setUint32(4 + 8, 3, true);
  used.setUint16(2, 2, true);
  expectVqError(() => driver.getUsed(), "used.id", 3);
  assert.equal(raw.usedIdx(), 2);
});

test("a queue over unmapped memory throws instead of reading detached views", () => {
  const guest = MockGuest.create({ size: 1 << 16 });
  try {
    const q = guest.createSplitQueue({ size: 8 });
    const devMem = guest.mapAsDevice();
    const dev = new SplitDeviceQueue(devMem, q.deviceOptions());
    guest.close();
    expectVqError(() => dev.pop(), "memory");
  } finally {
    guest.close();
  }
});

test("random descriptor tables yield valid chains or VirtqueueError, never anything else", () => {
  const regionA = makeRegion(0, 0x10000);
  const regionB = makeRegion(0x10000, 0x8000); // adjacent to A
  const regionC = makeRegion(0x40000, 0x1000); // after a gap
  const mem = new GuestMemory([regionA, regionB, regionC]);
  const size = 8;
  const ring = ringAt(0, size, false);
  const raw = new Raw(mem, ring);
  const tableAddr = 0x2000; // indirect tables live here (16 entries max)
  const addrs = [
    0x3000,
    0xfff0,
    0x17ff8,
    0x18000,
    0x20000,
    0x40000,
    0x40ff0,
    2 ** 40,
    2 ** 53 - 8,
    2 ** 63,
    tableAddr,
  ];
  const outcomes = { runs: 0, chains: 0, multi: 0, errors: new Set<string>() };
  const descArb = fc.record({
    addr: fc.oneof(fc.constantFrom(...addrs), fc.integer({ min: 0, max: 0x50000 })),
    len: fc.oneof(
      fc.constantFrom(0, 1, 16, 32, 48, 24, 0x100, 0x8000, 0xffffffff),
      fc.integer({ min: 0, max: 0x20000 }),
    ),
    flags: fc.integer({ min: 0, max: 7 }),
    next: fc.integer({ min: 0, max: 18 }),
  });
  fc.assert(
    fc.property(
      fc.array(descArb, { minLength: size, maxLength: size }),
      fc.array(descArb, { minLength: 16, maxLength: 16 }),
      fc.array(fc.integer({ min: 0, max: 9 }), { minLength: 1, maxLength: 4 }),
      fc.integer({ min: 0, max: 12 }),
      (table, indirect, heads, maxChainLength) => {
        mem.gpaToView(gpa(0), 0x3000).fill(0);
        table.forEach((d, i) => raw.desc(i, d.addr, d.len, d.flags, d.next));
        indirect.forEach((d, i) => raw.desc(i, d.addr, d.len, d.flags, d.next, tableAddr));
        raw.publish(...heads);
        outcomes.runs++;
        const dev = new SplitDeviceQueue(mem, {
          ...ring,
          indirect: true,
          maxChainLength: maxChainLength === 0 ? undefined : maxChainLength,
        });
        for (let k = 0; k < heads.length; k++) {
          let c: DescChain | null;
          try {
            c = dev.pop();
          } catch (e) {
            assert.ok(e instanceof VirtqueueError, `unexpected ${String(e)}`);
            assert.equal(typeof e.field, "string");
            assert.equal(dev.getBase().availIdx, k, "not advanced on error");
            outcomes.errors.add(e.field);
            return;
          }
          assert.ok(c !== null);
          assert.equal(c.head, heads[k]);
          assert.ok(c.descCount >= 1 && c.descCount <= size);
          let rl = 0;
          let wl = 0;
          for (const s of c.readable) {
            assert.equal(s.writable, false);
            rl += s.len;
          }
          for (const s of c.writable) {
            assert.equal(s.writable, true);
            wl += s.len;
          }
          for (const s of [...c.readable, ...c.writable]) {
            assert.ok(s.len > 0);
            assert.ok(mem.tryRegionFor(s.gpa, s.len) !== null, `segment ${s.gpa}+${s.len} inside`);
          }
          assert.equal(c.readableLength, rl);
          assert.equal(c.writableLength, wl);
          assert.ok(rl + wl <= 0xffffffff);
          outcomes.chains++;
          if (c.readable.length + c.writable.length > 1) outcomes.multi++;
        }
      },
    ),
    { numRuns: 3000 },
  );
  // the generator reaches both outcomes and most error kinds
  assert.ok(outcomes.chains > 100 && outcomes.multi > 10, `${outcomes.chains} ${outcomes.multi}`);
  for (const f of ["desc.next", "desc.addr", "desc.flags", "indirect.len", "chain length"]) {
    assert.ok(outcomes.errors.has(f), `error ${f} reached: ${[...outcomes.errors].join()}`);
  }
});

test("used-ring writes are logged at logGuestAddr + offset with usedLog, else at the used ring", () => {
  for (const withUsedLog of [true, false]) {
    const mem = makeMem();
    // 64 KiB of log bytes covers 2 GiB: logGuestAddr may lie outside guest memory
    const logBuf = new ArrayBuffer(1 << 16);
    const size = 256;
    // place the used ring so that its elements cross a page boundary
    const usedAt = 0x7f00;
    const ring: Ring = {
      size,
      desc: gpa(0x1000),
      avail: gpa(0x6000),
      used: gpa(usedAt),
      eventIdx: true,
    };
    const logGuestAddr = 0x40000f00;
    const driver = new SplitDriverQueue(mem, ring);
    const device = new SplitDeviceQueue(mem, {
      ...ring,
      usedLog: withUsedLog ? { logGuestAddr } : null,
    });
    mem.log = new DirtyLog(logBuf, 0, logBuf.byteLength);
    for (let i = 0; i < 40; i++) {
      driver.add([{ gpa: gpa(0x30000 + i * 0x1000), len: 16, writable: true }]);
    }
    driver.kick();
    const written = new Set<number>();
    for (let i = 0; i < 40; i++) {
      const c = device.pop() as DescChain;
      const seg = c.writable[0] as Segment;
      mem.write(seg.gpa, new Uint8Array(8)); // device writes the buffer through GuestMemory
      written.add(Math.floor(seg.gpa / 4096));
      device.pushUsed(c, 8);
      if (i % 7 === 6) device.publish();
    }
    device.publish();
    // publish() flushed: every mark is already in the shared log
    const base = withUsedLog ? logGuestAddr : usedAt;
    const expected = new Set<number>(written);
    expected.add(Math.floor((base + 2) / 4096)); // used.idx
    for (let slot = 0; slot < 40; slot++) {
      expected.add(Math.floor((base + 4 + 8 * slot) / 4096));
      expected.add(Math.floor((base + 4 + 8 * slot + 7) / 4096));
    }
    const logged = (): number[] => {
      const got: number[] = [];
      new Uint8Array(logBuf).forEach((b, i) => {
        for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) got.push(i * 8 + bit);
      });
      return got;
    };
    const sorted = (set: Set<number>): number[] => [...set].sort((a, b) => a - b);
    assert.deepEqual(logged(), sorted(expected));
    // avail_event write when the device finds the ring empty
    assert.equal(device.pop(), null);
    expected.add(Math.floor((base + 4 + 8 * size) / 4096));
    assert.deepEqual(logged(), sorted(expected));
    assert.equal(expected.has(Math.floor(usedAt / 4096)), !withUsedLog);
  }
});

test("over real memfd mappings: driver and device in two mappings of the same fd", () => {
  const guest = MockGuest.create({ size: 4 << 20, gpa: 0x100000 });
  try {
    for (const [eventIdx, indirect] of [
      [false, false],
      [true, true],
    ] as const) {
      const q = guest.createSplitQueue({ size: 128, eventIdx, indirect, startIdx: 65500 });
      const devMem = guest.mapAsDevice();
      assert.notEqual(devMem.regions[0]?.buffer, guest.mem.regions[0]?.buffer);
      const device = new SplitDeviceQueue(devMem, q.deviceOptions());
      let received = 0;
      for (let round = 0; round < 20; round++) {
        // TX: driver sends payloads the device echoes into RX buffers of the same queue
        for (let i = 0; i < 16; i++) {
          const data = payload(100 + i, round * 16 + i);
          assert.notEqual(q.send(data, 1 + (i % 3)), null);
          assert.notEqual(q.receive(512, 1 + (i % 2)), null);
        }
        q.kick();
        const pending: Uint8Array[] = [];
        for (;;) {
          const c = device.pop();
          if (c === null) break;
          if (c.readableLength > 0) {
            const buf = new Uint8Array(c.readableLength);
            let off = 0;
            for (const s of c.readable) {
              devMem.read(s.gpa, buf.subarray(off, off + s.len));
              off += s.len;
            }
            pending.push(buf);
            device.pushUsed(c, 0);
          } else {
            const data = pending.shift() as Uint8Array;
            let off = 0;
            for (const s of c.writable) {
              const n = Math.min(s.len, data.length - off);
              if (n <= 0) break;
              devMem.write(s.gpa, data.subarray(off, off + n));
              off += n;
            }
            device.pushUsed(c, data.length);
          }
        }
        device.publish();
        for (const u of q.collect()) {
          if (u.data !== null) {
            const k = round * 16 + received;
            assert.deepEqual(u.data, payload(100 + received, k));
            received++;
          }
        }
        received = 0;
      }
      assert.equal(device.inFlight, 0);
      assert.equal(q.driver.freeCount, 128);
    }
  } finally {
    guest.close();
  }
});

test("publish() flushes the dirty log before it stores used.idx (ORDERING)", () => {
  const mem = makeMem();
  const ring = ringAt(0, 8, false);
  const raw = new Raw(mem, ring);
  const events: { usedIdx: number; pending: number }[] = [];
  class SpyLog extends DirtyLog {
    override flush(): void {
      events.push({ usedIdx: raw.usedIdx(), pending: this.pendingCount });
      super.flush();
    }
  }
  mem.log = new SpyLog(new ArrayBuffer(64), 0, 64);
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  for (let i = 0; i < 3; i++) driver.add([{ gpa: gpa(0x20000), len: 8, writable: true }]);
  driver.kick();
  for (let i = 0; i < 3; i++) device.pushUsed(device.pop() as DescChain, 1);
  events.length = 0;
  device.publish();
  assert.equal(raw.usedIdx(), 3);
  // first flush: the elements' marks, while used.idx is still 0; then the idx mark after it
  assert.deepEqual(events[0], { usedIdx: 0, pending: 1 });
  assert.deepEqual(events[1], { usedIdx: 3, pending: 1 });
  assert.ok(mem.log?.isDirty(ring.used));
});
