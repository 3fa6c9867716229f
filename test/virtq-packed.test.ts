/**
 * Packed virtqueue (VIRTIO 1.2 §2.8): driver and device over one GuestMemory.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";

import { gpa, mmapOffset, uaddr, type Gpa } from "../src/memory/address.js";
import { DirtyLog, LOG_PAGE_SIZE } from "../src/memory/dirty-log.js";
import { createRegion, GuestMemory, type Region } from "../src/memory/guest-memory.js";
import { mapRegion, unmapRegion } from "../src/memory/mapping.js";
import { native } from "../src/native.js";
import { packedRingSizes } from "../src/virtq/layout.js";
import {
  PACKED_DESC_F_AVAIL,
  PACKED_DESC_F_INDIRECT,
  PACKED_DESC_F_NEXT,
  PACKED_DESC_F_USED,
  PACKED_DESC_F_WRITE,
  PackedDeviceQueue,
  PackedDriverQueue,
  RING_EVENT_FLAGS_DESC,
  RING_EVENT_FLAGS_DISABLE,
  RING_EVENT_FLAGS_ENABLE,
  packedBaseFromNum,
  packedBaseToNum,
  type PackedBase,
} from "../src/virtq/packed.js";
import { VirtqueueError, type DescChain, type Segment } from "../src/virtq/types.js";

// Guest memory used by most tests: region A [0, 1 MiB) holds the rings, region B
// [1 MiB, 4 MiB) (a separate buffer, adjacent in GPA space) holds the buffers.
const REGION_A = 0x10_0000;
const REGION_B = 0x30_0000;
const DESC = 0x1000;
const BUF_BASE = REGION_A;
const SLOT = 1024; // per in-flight buffer: 4 segments of up to 128 bytes + an indirect table
const TABLE_OFF = 768;

/** Deterministic PRNG (xorshift32); local state only. */
function rng(seed: number): (n: number) => number {
  let x = seed | 0 || 1;
  return (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

function twoRegionMemory(): GuestMemory {
  const a = createRegion(
    { gpa: gpa(0), size: REGION_A, uaddr: uaddr(0x7f00_0000_0000), mmapOffset: mmapOffset(0) },
    new ArrayBuffer(REGION_A),
  );
  const b = createRegion(
    {
      gpa: gpa(REGION_A),
      size: REGION_B,
      uaddr: uaddr(0x7f10_0000_0000),
      mmapOffset: mmapOffset(0),
    },
    new ArrayBuffer(REGION_B),
  );
  return new GuestMemory([a, b]);
}

interface Layout {
  size: number;
  desc: Gpa;
  driverEvent: Gpa;
  deviceEvent: Gpa;
}

function layout(size: number): Layout {
  const s = packedRingSizes(size);
  const driverEvent = DESC + Math.ceil(s.desc / 16) * 16;
  return {
    size,
    desc: gpa(DESC),
    driverEvent: gpa(driverEvent),
    deviceEvent: gpa(driverEvent + s.driverEvent),
  };
}

interface Env {
  mem: GuestMemory;
  /** memory the device side reads and writes payloads through (default: mem) */
  devMem?: GuestMemory;
  ring: Layout;
  drv: PackedDriverQueue;
  dev: PackedDeviceQueue;
}

function setup(
  size: number,
  opts: { eventIdx?: boolean; indirect?: boolean; mem?: GuestMemory } = {},
): Env {
  const mem = opts.mem ?? twoRegionMemory();
  const ring = layout(size);
  const common = { ...ring, eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? false };
  const drv = new PackedDriverQueue(mem, common);
  const dev = new PackedDeviceQueue(mem, { ...common, index: 3 });
  return { mem, ring, drv, dev };
}

interface RawDesc {
  addr: number;
  len: number;
  id: number;
  flags: number;
}

function writeRaw(mem: GuestMemory, at: number, d: RawDesc): void {
  const v = mem.gpaToView(gpa(at), 16);
  const dv = new DataView(v.buffer, v.byteOffset, 16);
  dv.setUint32(0, d.addr % 2 ** 32, true);
  dv.setUint32(4, Math.floor(d.addr / 2 ** 32), true);
  dv.setUint32(8, d.len, true);
  dv.setUint16(12, d.id, true);
  dv.setUint16(14, d.flags, true);
}

function readRaw(mem: GuestMemory, at: number): RawDesc {
  const v = mem.gpaToView(gpa(at), 16);
  const dv = new DataView(v.buffer, v.byteOffset, 16);
  return {
    addr: dv.getUint32(0, true) + dv.getUint32(4, true) * 2 ** 32,
    len: dv.getUint32(8, true),
    id: dv.getUint16(12, true),
    flags: dv.getUint16(14, true),
  };
}

/** flags making a descriptor available for driver wrap counter `wrap` */
function availFlags(wrap: boolean): number {
  return wrap ? PACKED_DESC_F_AVAIL : PACKED_DESC_F_USED;
}

function assertVqError(fn: () => unknown, field: string, value?: number): VirtqueueError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof VirtqueueError, `expected VirtqueueError, got ${String(caught)}`);
  assert.equal(caught.code, "ERR_VHOST_VIRTQUEUE");
  assert.equal(caught.field, field, caught.message);
  if (value !== undefined) assert.equal(caught.value, value, caught.message);
  return caught;
}

function pattern(seq: number, seg: number, i: number): number {
  return (seq * 31 + seg * 7 + i * 13) & 0xff;
}

function concat(mem: GuestMemory, segs: Segment[]): Uint8Array {
  const total = segs.reduce((n, s) => n + s.len, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const s of segs) {
    mem.read(s.gpa, out.subarray(at, at + s.len));
    at += s.len;
  }
  return out;
}

function response(readable: Uint8Array, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    out[i] = readable.length > 0 ? (readable[i % readable.length] as number) ^ 0x5a : i & 0xff;
  }
  return out;
}

function writeInto(mem: GuestMemory, segs: Segment[], data: Uint8Array): void {
  let at = 0;
  for (const s of segs) {
    if (at >= data.length) break;
    const n = Math.min(s.len, data.length - at);
    mem.write(s.gpa, data.subarray(at, at + n));
    at += n;
  }
}

interface Sent {
  seq: number;
  slot: number;
  readable: Segment[];
  writable: Segment[];
  payload: Uint8Array;
}

/**
 * Drive thousands of buffers through driver -> device -> driver with random batch sizes,
 * chains of 1..4 descriptors, optional indirect buffers and out-of-order completion; check
 * every payload, every written response and that each buffer comes back exactly once.
 */
function roundTrip(env: Env, total: number, seed: number, useIndirect: boolean): void {
  const { mem, drv, dev, ring } = env;
  const devMem = env.devMem ?? mem;
  const r = rng(seed);
  const freeSlots: number[] = [];
  for (let i = ring.size - 1; i >= 0; i--) freeSlots.push(i);
  const byId = new Map<number, Sent>();
  const inflight: DescChain[] = [];
  let seq = 0;
  let returned = 0;
  const seen = new Set<number>();
  let rounds = 0;
  while (returned < total) {
    assert.ok(++rounds < total * 20, "no progress");
    // driver: add a batch
    const adds = 1 + r(8);
    for (let k = 0; k < adds && seq < total; k++) {
      const maxSegs = Math.min(4, ring.size);
      const nseg = 1 + r(maxSegs);
      const nread = r(nseg + 1);
      const slot = freeSlots.pop();
      if (slot === undefined) break;
      const base = BUF_BASE + slot * SLOT;
      const segs: Segment[] = [];
      for (let i = 0; i < nseg; i++) {
        segs.push({ gpa: gpa(base + i * 128), len: 1 + r(128), writable: i >= nread });
      }
      const readable = segs.filter((s) => !s.writable);
      const writable = segs.filter((s) => s.writable);
      const payload = new Uint8Array(readable.reduce((n, s) => n + s.len, 0));
      for (let i = 0; i < payload.length; i++) payload[i] = pattern(seq, 0, i);
      writeInto(mem, readable, payload);
      for (const s of writable) mem.write(s.gpa, new Uint8Array(s.len)); // clear
      const indirect = useIndirect && r(3) === 0;
      const sent: Sent = { seq, slot, readable, writable, payload };
      const id = indirect
        ? drv.addIndirect(segs, gpa(base + TABLE_OFF), sent)
        : drv.add(segs, sent);
      if (id === null) {
        freeSlots.push(slot);
        break;
      }
      assert.ok(id >= 0 && id < ring.size);
      assert.equal(byId.has(id), false, `id ${id} handed out twice`);
      byId.set(id, sent);
      seq++;
    }
    drv.kick();
    // device: pop some, complete some in random order, publish
    const pops = r(10);
    for (let k = 0; k < pops; k++) {
      const c = dev.pop();
      if (c === null) break;
      const sent = byId.get(c.head);
      assert.ok(sent, `device popped unknown buffer id ${c.head}`);
      assert.deepEqual(
        c.readable.map((s) => [s.gpa, s.len]),
        sent.readable.map((s) => [s.gpa, s.len]),
      );
      assert.deepEqual(
        c.writable.map((s) => [s.gpa, s.len]),
        sent.writable.map((s) => [s.gpa, s.len]),
      );
      assert.equal(c.readableLength, sent.payload.length);
      inflight.push(c);
    }
    const completes = r(inflight.length + 1);
    for (let k = 0; k < completes; k++) {
      const c = inflight.splice(r(inflight.length), 1)[0] as DescChain;
      const readable = concat(devMem, c.readable);
      const n = Math.min(c.writableLength, readable.length + 7);
      writeInto(devMem, c.writable, response(readable, n));
      dev.pushUsed(c, n);
    }
    dev.publish();
    // driver: reap
    for (;;) {
      const u = drv.getUsed();
      if (u === null) break;
      const sent = u.token as Sent;
      assert.equal(byId.get(u.id), sent, `used id ${u.id} does not match its token`);
      byId.delete(u.id);
      assert.equal(seen.has(sent.seq), false, `buffer ${sent.seq} returned twice`);
      seen.add(sent.seq);
      const wl = sent.writable.reduce((n, s) => n + s.len, 0);
      const expectLen = Math.min(wl, sent.payload.length + 7);
      assert.equal(u.len, expectLen);
      const got = concat(mem, sent.writable).subarray(0, expectLen);
      assert.deepEqual(got, response(sent.payload, expectLen));
      freeSlots.push(sent.slot);
      returned++;
    }
  }
  assert.equal(seen.size, total);
  assert.equal(drv.freeCount, ring.size);
  assert.equal(dev.inFlight, 0);
  assert.equal(dev.pop(), null);
  assert.equal(drv.getUsed(), null);
}

test("round trip: 5000 buffers over size 256, chains, out-of-order completion", () => {
  roundTrip(setup(256), 5000, 1, false);
});

test("round trip: 5000 buffers over size 100 (not a power of two), with indirect", () => {
  roundTrip(setup(100, { indirect: true }), 5000, 2, true);
});

test("round trip: size 1 and size 3", () => {
  roundTrip(setup(1), 300, 3, false);
  roundTrip(setup(3, { indirect: true }), 1000, 4, true);
});

test("round trip over two memfd mappings (driver and device see the same pages)", () => {
  const fd = native.memfdCreate("vhostkit-packed-test");
  const regions: Region[] = [];
  try {
    native.ftruncate(fd, REGION_A + REGION_B);
    const info = {
      gpa: gpa(0),
      size: REGION_A + REGION_B,
      uaddr: uaddr(0x7f00_0000_0000),
      mmapOffset: mmapOffset(0),
    };
    const a = mapRegion(fd, info);
    regions.push(a);
    const b = mapRegion(fd, info);
    regions.push(b);
    const drvMem = new GuestMemory([a]);
    const devMem = new GuestMemory([b]);
    const ring = layout(128);
    const common = { ...ring, eventIdx: true, indirect: true };
    const drv = new PackedDriverQueue(drvMem, common);
    const dev = new PackedDeviceQueue(devMem, common);
    // The device reads and writes rings and payloads through its own mapping; the driver
    // writes and checks them through the other one.
    const env: Env = { mem: drvMem, devMem, ring, drv, dev };
    writeRaw(drvMem, 0x2_0000, { addr: 1, len: 2, id: 3, flags: 4 });
    assert.deepEqual(readRaw(devMem, 0x2_0000), { addr: 1, len: 2, id: 3, flags: 4 });
    roundTrip(env, 3000, 5, true);
  } finally {
    for (const r of regions) unmapRegion(r);
    native.close(fd);
  }
});

test("a chain that wraps around the end of the ring", () => {
  const { mem, drv, dev, ring } = setup(8);
  // move both sides to position 6
  for (let i = 0; i < 6; i++) {
    assert.notEqual(drv.add([{ gpa: gpa(BUF_BASE), len: 8, writable: false }]), null);
  }
  drv.kick();
  for (let i = 0; i < 6; i++) dev.pushUsed(dev.pop() as DescChain, 0);
  dev.publish();
  for (let i = 0; i < 6; i++) assert.notEqual(drv.getUsed(), null);
  const segs: Segment[] = [
    { gpa: gpa(BUF_BASE), len: 10, writable: false },
    { gpa: gpa(BUF_BASE + 100), len: 20, writable: false },
    { gpa: gpa(BUF_BASE + 200), len: 30, writable: true },
    { gpa: gpa(BUF_BASE + 300), len: 40, writable: true },
  ];
  const id = drv.add(segs, "wrapped");
  assert.notEqual(id, null);
  // before the kick, the head is not available
  assert.equal(dev.hasAvailable(), false);
  assert.equal(drv.kick(), true);
  // positions 6, 7 carry the first lap's wrap flags, 0, 1 the next lap's
  assert.equal(
    readRaw(mem, DESC + 6 * 16).flags & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED),
    0x80,
  );
  assert.equal(
    readRaw(mem, DESC + 0 * 16).flags & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED),
    0x8000,
  );
  const c = dev.pop() as DescChain;
  assert.equal(c.head, id);
  assert.equal(c.descCount, 4);
  assert.deepEqual(
    [...c.readable, ...c.writable].map((s) => [s.gpa, s.len, s.writable]),
    segs.map((s) => [s.gpa, s.len, s.writable]),
  );
  assert.equal(c.readableLength, 30);
  assert.equal(c.writableLength, 70);
  assert.deepEqual(dev.getBase(), { availIdx: 2, availWrap: false, usedIdx: 6, usedWrap: true });
  dev.pushUsed(c, 70);
  dev.publish();
  // the used descriptor overwrites the first descriptor of the chain
  const used = readRaw(mem, DESC + 6 * 16);
  assert.equal(used.id, id);
  assert.equal(used.len, 70);
  assert.equal(used.flags, PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED | PACKED_DESC_F_WRITE);
  assert.deepEqual(drv.getUsed(), { id, len: 70, token: "wrapped" });
  assert.equal(drv.freeCount, ring.size);
  assert.deepEqual(dev.getBase(), { availIdx: 2, availWrap: false, usedIdx: 2, usedWrap: false });
});

test("device takes the buffer id from the last descriptor of a chain (§2.8.6)", () => {
  const { mem, dev } = setup(8);
  writeRaw(mem, DESC, {
    addr: BUF_BASE,
    len: 4,
    id: 111,
    flags: availFlags(true) | PACKED_DESC_F_NEXT,
  });
  writeRaw(mem, DESC + 16, { addr: BUF_BASE + 8, len: 4, id: 7, flags: availFlags(true) });
  const c = dev.pop() as DescChain;
  assert.equal(c.head, 7);
  assert.equal(c.descCount, 2);
});

test("a segment spanning two adjacent regions is accepted; one past the end is not", () => {
  const { mem, dev } = setup(4);
  writeRaw(mem, DESC, { addr: REGION_A - 8, len: 16, id: 0, flags: availFlags(true) });
  const c = dev.pop() as DescChain;
  assert.deepEqual(c.readable, [{ gpa: REGION_A - 8, len: 16, writable: false }]);
  writeRaw(mem, DESC + 16, {
    addr: REGION_A + REGION_B - 8,
    len: 16,
    id: 1,
    flags: availFlags(true),
  });
  assertVqError(() => dev.pop(), "desc.addr", REGION_A + REGION_B - 8);
});

test("indirect buffers: table read, id from the ring descriptor, one ring slot", () => {
  const { mem, drv, dev } = setup(4, { indirect: true });
  const segs: Segment[] = [];
  for (let i = 0; i < 6; i++) {
    segs.push({ gpa: gpa(BUF_BASE + i * 64), len: 10 + i, writable: i >= 2 });
  }
  const table = gpa(BUF_BASE + 0x1_0000);
  const id = drv.addIndirect(segs, table, "ind") as number;
  assert.equal(drv.freeCount, 3);
  const direct = drv.add([{ gpa: gpa(BUF_BASE + 0x2000), len: 5, writable: false }], "dir");
  drv.kick();
  // the table's ids are reserved: the device ignores them
  const t2 = readRaw(mem, table + 16);
  writeRaw(mem, table + 16, { ...t2, id: 0xbeef });
  const c = dev.pop() as DescChain;
  assert.equal(c.head, id);
  assert.equal(c.descCount, 1);
  assert.deepEqual(
    [...c.readable, ...c.writable].map((s) => [s.gpa, s.len, s.writable]),
    segs.map((s) => [s.gpa, s.len, s.writable]),
  );
  const d = dev.pop() as DescChain;
  assert.equal(d.head, direct);
  dev.pushUsed(d, 0);
  dev.pushUsed(c, 3);
  dev.publish();
  assert.deepEqual(drv.getUsed(), { id: direct, len: 0, token: "dir" });
  assert.deepEqual(drv.getUsed(), { id, len: 3, token: "ind" });
  assert.equal(drv.freeCount, 4);
});

test("malformed indirect descriptors raise VirtqueueError naming the field", () => {
  const size = 4;
  const a = availFlags(true);
  const table = BUF_BASE + 0x1_0000;
  const cases: {
    name: string;
    prep: (mem: GuestMemory) => void;
    indirect: boolean;
    field: string;
    value?: number;
  }[] = [
    {
      name: "indirect not negotiated",
      indirect: false,
      field: "desc.flags",
      prep: (mem) =>
        writeRaw(mem, DESC, { addr: table, len: 16, id: 0, flags: a | PACKED_DESC_F_INDIRECT }),
    },
    {
      name: "length not a multiple of 16",
      indirect: true,
      field: "indirect.len",
      value: 24,
      prep: (mem) =>
        writeRaw(mem, DESC, { addr: table, len: 24, id: 0, flags: a | PACKED_DESC_F_INDIRECT }),
    },
    {
      name: "zero length",
      indirect: true,
      field: "indirect.len",
      value: 0,
      prep: (mem) =>
        writeRaw(mem, DESC, { addr: table, len: 0, id: 0, flags: a | PACKED_DESC_F_INDIRECT }),
    },
    {
      name: "more than 32768 entries",
      indirect: true,
      field: "chain length",
      value: 32769,
      prep: (mem) =>
        writeRaw(mem, DESC, {
          addr: table,
          len: 32769 * 16,
          id: 0,
          flags: a | PACKED_DESC_F_INDIRECT,
        }),
    },
    {
      name: "table outside guest memory",
      indirect: true,
      field: "desc.addr",
      value: 0x1000_0000,
      prep: (mem) =>
        writeRaw(mem, DESC, {
          addr: 0x1000_0000,
          len: 32,
          id: 0,
          flags: a | PACKED_DESC_F_INDIRECT,
        }),
    },
    {
      name: "nested indirect",
      indirect: true,
      field: "desc.flags",
      prep: (mem) => {
        writeRaw(mem, DESC, { addr: table, len: 32, id: 0, flags: a | PACKED_DESC_F_INDIRECT });
        writeRaw(mem, table, { addr: BUF_BASE, len: 8, id: 0, flags: 0 });
        writeRaw(mem, table + 16, { addr: table, len: 16, id: 0, flags: PACKED_DESC_F_INDIRECT });
      },
    },
    {
      name: "indirect inside a NEXT chain",
      indirect: true,
      field: "desc.flags",
      prep: (mem) => {
        writeRaw(mem, DESC, { addr: BUF_BASE, len: 8, id: 0, flags: a | PACKED_DESC_F_NEXT });
        writeRaw(mem, DESC + 16, {
          addr: table,
          len: 16,
          id: 0,
          flags: a | PACKED_DESC_F_INDIRECT,
        });
      },
    },
    {
      name: "indirect with NEXT",
      indirect: true,
      field: "desc.flags",
      prep: (mem) =>
        writeRaw(mem, DESC, {
          addr: table,
          len: 16,
          id: 0,
          flags: a | PACKED_DESC_F_INDIRECT | PACKED_DESC_F_NEXT,
        }),
    },
    {
      name: "table entry outside guest memory",
      indirect: true,
      field: "desc.addr",
      value: REGION_A + REGION_B,
      prep: (mem) => {
        writeRaw(mem, DESC, { addr: table, len: 16, id: 0, flags: a | PACKED_DESC_F_INDIRECT });
        writeRaw(mem, table, { addr: REGION_A + REGION_B, len: 1, id: 0, flags: 0 });
      },
    },
  ];
  for (const c of cases) {
    const { mem, dev } = setup(size, { indirect: c.indirect });
    c.prep(mem);
    const err = assertVqError(() => dev.pop(), c.field, c.value);
    assert.equal(err.queue, 3, c.name);
    // the position did not move: the same error again
    assertVqError(() => dev.pop(), c.field, c.value);
    assert.equal(dev.inFlight, 0, c.name);
  }
});

test("malformed direct chains raise VirtqueueError naming the field", () => {
  const a = availFlags(true);
  const n = PACKED_DESC_F_NEXT;
  // chain longer than the ring: every descriptor has NEXT
  {
    const { mem, dev } = setup(5);
    for (let i = 0; i < 5; i++)
      writeRaw(mem, DESC + i * 16, { addr: BUF_BASE, len: 1, id: i, flags: a | n });
    assertVqError(() => dev.pop(), "chain length", 6);
  }
  // a chain of exactly `size` descriptors is fine
  {
    const { mem, dev } = setup(5);
    for (let i = 0; i < 5; i++) {
      writeRaw(mem, DESC + i * 16, { addr: BUF_BASE, len: 1, id: i, flags: a | (i < 4 ? n : 0) });
    }
    assert.equal((dev.pop() as DescChain).descCount, 5);
  }
  // buffer outside guest memory, and beyond 2^53
  {
    const { mem, dev } = setup(5);
    writeRaw(mem, DESC, { addr: 0x4000_0000, len: 1, id: 0, flags: a });
    assertVqError(() => dev.pop(), "desc.addr", 0x4000_0000);
  }
  {
    const { mem, dev } = setup(5);
    writeRaw(mem, DESC, { addr: 2 ** 60, len: 1, id: 0, flags: a });
    assertVqError(() => dev.pop(), "desc.addr");
  }
  // readable after writable
  {
    const { mem, dev } = setup(5);
    writeRaw(mem, DESC, { addr: BUF_BASE, len: 1, id: 0, flags: a | n | PACKED_DESC_F_WRITE });
    writeRaw(mem, DESC + 16, { addr: BUF_BASE, len: 1, id: 0, flags: a });
    assertVqError(() => dev.pop(), "desc.flags");
  }
  // a zero-length element is legal and yields no segment (as on the split ring)
  {
    const { mem, dev } = setup(5);
    writeRaw(mem, DESC, { addr: BUF_BASE, len: 0, id: 0, flags: a | n });
    writeRaw(mem, DESC + 16, { addr: BUF_BASE, len: 4, id: 0, flags: a });
    const c = dev.pop() as DescChain;
    assert.equal(c.descCount, 2);
    assert.deepEqual(
      c.readable.map((seg) => seg.len),
      [4],
    );
    dev.pushUsed(c, 0);
    // pushUsed with nothing in flight: VirtqueueError, as on the split ring
    assertVqError(() => dev.pushUsed(c, 0), "inFlight");
  }
  // total length over 2^32-1: an indirect table of 2000 entries of 3 MiB - 256 each
  {
    const { mem, dev } = setup(5, { indirect: true });
    const table = BUF_BASE + 0x1_0000;
    writeRaw(mem, DESC, { addr: table, len: 2000 * 16, id: 0, flags: a | PACKED_DESC_F_INDIRECT });
    for (let i = 0; i < 2000; i++) {
      writeRaw(mem, table + i * 16, { addr: REGION_A, len: REGION_B - 256, id: 0, flags: 0 });
    }
    assertVqError(() => dev.pop(), "desc.len");
  }
});

test("driver: getUsed with an unknown or out-of-range id is a VirtqueueError", () => {
  const { mem, drv } = setup(8);
  drv.add([{ gpa: gpa(BUF_BASE), len: 4, writable: false }]);
  drv.kick();
  writeRaw(mem, DESC, { addr: 0, len: 0, id: 8, flags: PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED });
  assertVqError(() => drv.getUsed(), "used.id", 8);
  writeRaw(mem, DESC, { addr: 0, len: 0, id: 5, flags: PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED });
  assertVqError(() => drv.getUsed(), "used.id", 5);
});

test("driver: add() returns null when the ring is full and checks its arguments", () => {
  const { drv } = setup(4);
  const seg = (w: boolean): Segment => ({ gpa: gpa(BUF_BASE), len: 4, writable: w });
  assert.notEqual(drv.add([seg(false), seg(true), seg(true)]), null);
  assert.equal(drv.freeCount, 1);
  assert.equal(drv.add([seg(false), seg(false)]), null);
  assert.notEqual(drv.add([seg(false)]), null);
  assert.equal(drv.add([seg(false)]), null);
  assert.throws(() => drv.add([]), RangeError);
  assert.throws(
    () => drv.add([seg(false), seg(false), seg(false), seg(false), seg(false)]),
    RangeError,
  );
  assert.throws(() => drv.add([seg(true), seg(false)]), RangeError);
  assert.throws(() => drv.addIndirect([seg(false)], gpa(BUF_BASE)), /INDIRECT_DESC/);
});

test("queue construction checks size, alignment and that the ring is in guest memory", () => {
  const mem = twoRegionMemory();
  const ok = layout(16);
  const make = (o: Partial<Layout>): PackedDeviceQueue =>
    new PackedDeviceQueue(mem, { ...ok, ...o, eventIdx: false });
  assertVqError(() => make({ size: 0 }), "size", 0);
  assertVqError(() => make({ size: 32769 }), "size", 32769);
  assertVqError(() => make({ desc: gpa(DESC + 8) }), "desc", DESC + 8);
  assertVqError(() => make({ driverEvent: gpa(ok.driverEvent + 2) }), "driverEvent");
  assertVqError(() => make({ deviceEvent: gpa(REGION_A + REGION_B) }), "deviceEvent");
  assertVqError(() => make({ desc: gpa(REGION_A - 16 * 8) }), "desc"); // ring spans two regions
  assert.equal(make({ size: 32768 }).size, 32768);
  assertVqError(
    () =>
      new PackedDeviceQueue(mem, {
        ...ok,
        eventIdx: false,
        base: { availIdx: 16, availWrap: true, usedIdx: 0, usedWrap: true },
      }),
    "base.availIdx",
    16,
  );
  assertVqError(
    () =>
      new PackedDeviceQueue(mem, {
        ...ok,
        eventIdx: false,
        base: { availIdx: 0, availWrap: true, usedIdx: 99, usedWrap: true },
      }),
    "base.usedIdx",
    99,
  );
});

test("device -> driver calls without EVENT_IDX: ENABLE / DISABLE", () => {
  const { drv, dev } = setup(8);
  const seg: Segment = { gpa: gpa(BUF_BASE), len: 4, writable: true };
  for (let i = 0; i < 4; i++) drv.add([seg]);
  drv.kick();
  assert.equal(dev.publish(), false, "nothing pushed: no call");
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), true, "ENABLE (initial): call");
  drv.setNotification(false);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), false, "DISABLE: no call");
  drv.setNotification(true);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), true, "ENABLE again: call");
});

test("driver -> device kicks without EVENT_IDX: ENABLE / DISABLE", () => {
  const { drv, dev } = setup(8);
  const seg: Segment = { gpa: gpa(BUF_BASE), len: 4, writable: false };
  assert.equal(drv.kick(), false, "nothing added: no kick");
  drv.add([seg]);
  assert.equal(drv.kick(), true, "ENABLE (initial)");
  dev.setNotification(false);
  drv.add([seg]);
  assert.equal(drv.kick(), false, "DISABLE");
  dev.setNotification(true);
  drv.add([seg]);
  assert.equal(drv.kick(), true, "ENABLE");
});

test("EVENT_IDX: DESC mode calls exactly when the used event offset is crossed", () => {
  const { mem, drv, dev, ring } = setup(8, { eventIdx: true });
  const seg: Segment = { gpa: gpa(BUF_BASE), len: 4, writable: true };
  for (let i = 0; i < 6; i++) drv.add([seg]);
  drv.kick();
  drv.setNotification(false);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), false, "DISABLE with EVENT_IDX");
  drv.setUsedEvent(2); // driver used position is 0: call when position 2 is used
  const ev = mem.gpaToView(ring.driverEvent, 4);
  assert.equal(ev[2], RING_EVENT_FLAGS_DESC);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), false, "position 1 used: not yet");
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), true, "position 2 used: call");
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), false, "event already passed");
  // a batch that crosses the event calls once
  drv.setUsedEvent(5);
  dev.pushUsed(dev.pop() as DescChain, 1);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), true, "batch [4, 6) crosses 5");
  // ENABLE written by a driver that does not use DESC: always call
  for (let i = 0; i < 6; i++) assert.notEqual(drv.getUsed(), null);
  drv.add([seg]);
  drv.kick();
  ev[2] = RING_EVENT_FLAGS_ENABLE;
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), true);
});

test("EVENT_IDX: DESC mode kicks exactly when the avail event offset is crossed", () => {
  const { mem, drv, dev, ring } = setup(8, { eventIdx: true });
  const seg: Segment = { gpa: gpa(BUF_BASE), len: 4, writable: false };
  dev.setNotification(true); // event at position 0, wrap 1
  const ev = mem.gpaToView(ring.deviceEvent, 4);
  assert.deepEqual([...ev], [0, 0x80, RING_EVENT_FLAGS_DESC, 0]);
  drv.add([seg]);
  drv.add([seg]);
  assert.equal(drv.kick(), true, "crossed position 0");
  drv.add([seg]);
  assert.equal(drv.kick(), false, "device has not re-armed");
  while (dev.pop() !== null);
  dev.setNotification(true); // event at 3
  assert.deepEqual([...ev], [3, 0x80, RING_EVENT_FLAGS_DESC, 0]);
  drv.add([seg]);
  assert.equal(drv.kick(), true);
  dev.setNotification(false);
  assert.equal(ev[2], RING_EVENT_FLAGS_DISABLE);
  drv.add([seg]);
  assert.equal(drv.kick(), false, "DISABLE");
});

/**
 * Random traffic with EVENT_IDX on both sides; at every publish/kick the decision must equal
 * "the event's linear position lies in [old, new)", computed from linear descriptor counters
 * that never wrap. Covers wrap-counter handling across many laps.
 */
function eventIdxModel(size: number, seed: number): void {
  const { drv, dev } = setup(size, { eventIdx: true });
  const r = rng(seed);
  let availLinear = 0; // descriptors made available (driver)
  let devAvailLinear = 0; // descriptors popped (device)
  let usedLinear = 0; // descriptors published used (device)
  let drvUsedLinear = 0; // descriptors reaped (driver)
  let kickEvent = -1; // linear position the device asked a kick for
  let callEvent = -1; // linear position the driver asked a call for
  let published = 0;
  let checked = 0;
  const inflight: DescChain[] = [];
  const counts = new Map<number, number>();
  // both sides start in DESC mode at position 0 (the zeroed structures mean ENABLE)
  dev.setNotification(true);
  kickEvent = 0;
  drv.setNotification(true);
  callEvent = 0;
  for (let step = 0; step < 3000; step++) {
    // driver adds 0..3 buffers of 1..3 descriptors and kicks
    const before = availLinear;
    const adds = r(4);
    for (let k = 0; k < adds; k++) {
      const n = 1 + r(Math.min(3, size));
      const segs: Segment[] = [];
      for (let i = 0; i < n; i++)
        segs.push({ gpa: gpa(BUF_BASE + i * 16), len: 16, writable: true });
      const id = drv.add(segs);
      if (id === null) break;
      counts.set(id, n);
      availLinear += n;
    }
    const kick = drv.kick();
    // The 15-bit offset + wrap bit names a position only within one lap either side of the
    // current one; an event older than that is ambiguous by design (the peer re-arms).
    if (kickEvent >= availLinear - size) {
      const expectKick = availLinear > before && kickEvent >= before && kickEvent < availLinear;
      assert.equal(
        kick,
        expectKick,
        `kick at step ${step}: [${before}, ${availLinear}) event ${kickEvent}`,
      );
      checked++;
    }
    // device pops some, re-arms kicks sometimes
    const pops = r(4);
    for (let k = 0; k < pops; k++) {
      const c = dev.pop();
      if (c === null) break;
      devAvailLinear += c.descCount;
      inflight.push(c);
    }
    if (r(2) === 0) {
      dev.setNotification(true);
      kickEvent = devAvailLinear;
    }
    // device completes some, publishes
    const usedBefore = usedLinear;
    const completes = r(inflight.length + 1);
    for (let k = 0; k < completes; k++) {
      const c = inflight.splice(r(inflight.length), 1)[0] as DescChain;
      dev.pushUsed(c, 0);
      usedLinear += c.descCount;
    }
    const call = dev.publish();
    if (usedLinear > usedBefore) {
      if (published > 0 && callEvent >= usedLinear - size) {
        checked++;
        const expectCall = callEvent >= usedBefore && callEvent < usedLinear;
        assert.equal(
          call,
          expectCall,
          `call at step ${step}: [${usedBefore}, ${usedLinear}) event ${callEvent}`,
        );
      } else if (published === 0) {
        assert.equal(call, true, "first publish always calls");
      }
      published++;
    } else {
      assert.equal(call, false);
    }
    // driver reaps some and re-arms calls sometimes
    const reaps = r(6);
    for (let k = 0; k < reaps; k++) {
      const u = drv.getUsed();
      if (u === null) break;
      drvUsedLinear += counts.get(u.id) as number;
    }
    if (r(2) === 0) {
      const ahead = r(size);
      drv.setUsedEvent(ahead);
      callEvent = drvUsedLinear + ahead;
    }
  }
  assert.ok(usedLinear > size * 20, `only ${usedLinear} descriptors went round`);
  assert.ok(checked > 2000, `only ${checked} decisions checked`);
}

test("EVENT_IDX model check over many laps (size 8, 100, 256)", () => {
  eventIdxModel(8, 11);
  eventIdxModel(100, 12);
  eventIdxModel(256, 13);
});

test("getBase()/base: a new device queue continues without losing or repeating a buffer", () => {
  const size = 10;
  const env = setup(size);
  const { mem, drv, ring } = env;
  let dev = env.dev;
  const r = rng(21);
  const got: number[] = [];
  let next = 0;
  const total = 400;
  let carried: DescChain[] = [];
  for (let round = 0; round < 200 && got.length < total; round++) {
    while (next < total) {
      const n = 1 + r(3);
      const segs: Segment[] = [];
      for (let i = 0; i < n; i++) segs.push({ gpa: gpa(BUF_BASE), len: 8, writable: true });
      if (drv.add(segs, next) === null) break;
      next++;
    }
    drv.kick();
    const popped: DescChain[] = [...carried];
    carried = [];
    for (let k = r(6); k > 0; k--) {
      const c = dev.pop();
      if (c === null) break;
      popped.push(c);
    }
    // complete some now; the rest stay in flight across the restart
    const now = r(popped.length + 1);
    for (const c of popped.slice(0, now)) dev.pushUsed(c, 1);
    carried = popped.slice(now);
    dev.publish();
    if (round % 3 === 0) {
      // GET_VRING_BASE, through the vhost-user u32 encoding, then SET_VRING_BASE
      const base = dev.getBase();
      const num = packedBaseToNum(base);
      assert.deepEqual(packedBaseFromNum(num), base);
      dev = new PackedDeviceQueue(mem, { ...ring, eventIdx: false, base: packedBaseFromNum(num) });
    }
    for (;;) {
      const u = drv.getUsed();
      if (u === null) break;
      got.push(u.token as number);
    }
  }
  // drain
  for (const c of carried) dev.pushUsed(c, 1);
  dev.publish();
  for (;;) {
    const c = dev.pop();
    if (c === null) break;
    dev.pushUsed(c, 1);
    dev.publish();
  }
  for (;;) {
    const u = drv.getUsed();
    if (u === null) break;
    got.push(u.token as number);
  }
  assert.equal(new Set(got).size, got.length, "a buffer was returned twice");
  assert.deepEqual(
    [...got].sort((a, b) => a - b),
    Array.from({ length: next }, (_, i) => i),
  );
  assert.ok(next > 100);
});

test("getBase() reports the published used position, not pushed-but-unpublished entries", () => {
  const { drv, dev } = setup(4);
  for (let i = 0; i < 3; i++) drv.add([{ gpa: gpa(BUF_BASE), len: 1, writable: false }]);
  drv.kick();
  dev.pushUsed(dev.pop() as DescChain, 0);
  dev.publish();
  dev.pushUsed(dev.pop() as DescChain, 0);
  const base: PackedBase = dev.getBase();
  assert.deepEqual(base, { availIdx: 2, availWrap: true, usedIdx: 1, usedWrap: true });
  assert.equal(dev.inFlight, 0);
  dev.pop();
  assert.equal(dev.inFlight, 1);
});

function ringBytes(mem: GuestMemory, ring: Layout): Uint8Array {
  const out = new Uint8Array(ring.deviceEvent + 4 - ring.desc);
  mem.read(ring.desc, out);
  return out;
}

/** JSON round trip, as the migration stream carries the position. */
function viaJson<T>(v: T): T {
  return JSON.parse(JSON.stringify(v)) as T;
}

test("driver position restore: continues at the source's position, in flight processed once", () => {
  const size = 4;
  const { mem, ring, drv, dev } = setup(size);
  const seg = (len: number): Segment[] => [{ gpa: gpa(BUF_BASE), len, writable: true }];
  const a = drv.add(seg(1), "A");
  const b = drv.add(seg(2), "B");
  const c = drv.add(seg(3), "C");
  drv.kick();
  for (let k = 0; k < 2; k++) dev.pushUsed(dev.pop() as DescChain, k + 1);
  dev.publish();
  assert.equal(drv.getUsed()?.token, "A");
  // Stop: the device has used A and B; the driver collected A only; C is in flight.
  const base = dev.getBase();
  assert.deepEqual(base, { availIdx: 2, availWrap: true, usedIdx: 2, usedWrap: true });
  const pos = viaJson(drv.position());
  assert.deepEqual(
    { ...pos, inFlight: pos.inFlight.map((x) => x.id).sort() },
    {
      availIdx: 3,
      availWrap: true,
      usedIdx: 1,
      usedWrap: true,
      inFlight: [b, c].sort(),
      freeIds: pos.freeIds,
      pendingHeads: [],
      pendingDescs: 0,
    },
  );
  assert.deepEqual([...pos.freeIds, b, c].sort(), [0, 1, 2, 3]);
  assert.ok(pos.freeIds.includes(a as number), "A's id is free again");
  const before = ringBytes(mem, ring);
  const tokens = new Map<number, unknown>([
    [b as number, "B"],
    [c as number, "C"],
  ]);
  const drv2 = new PackedDriverQueue(mem, {
    ...ring,
    eventIdx: false,
    restore: { position: pos, tokens },
  });
  assert.deepEqual(ringBytes(mem, ring), before, "restoring must not touch the ring memory");
  assert.deepEqual(drv2.position(), pos);
  assert.equal(drv2.freeCount, 2);
  const dev2 = new PackedDeviceQueue(mem, {
    ...ring,
    eventIdx: false,
    base: packedBaseFromNum(packedBaseToNum(base)),
  });
  // B was used before the stop but not collected: collected now, with its id and length.
  assert.deepEqual(drv2.getUsed(), { id: b, len: 2, token: "B" });
  // D at position 3, E at position 0 of the next lap: the avail wrap counter flips.
  const d = drv2.add(seg(4), "D");
  const e = drv2.add(seg(5), "E");
  assert.ok(d !== null && e !== null);
  assert.equal(new Set([c, d, e]).size, 3, "ids in flight are distinct");
  // The free list continues in its order: B's id (freed last) first, then the snapshot's last.
  assert.equal(d, b, "free ids continue in their order");
  assert.equal(e, pos.freeIds[pos.freeIds.length - 1], "free ids continue in their order");
  assert.deepEqual(
    [drv2.position().availIdx, drv2.position().availWrap],
    [1, false],
    "avail wrap counter flips at the end of the ring",
  );
  drv2.kick();
  // E's head at position 0, second lap: available for driver wrap counter 0.
  assert.equal(
    readRaw(mem, DESC).flags & (PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED),
    availFlags(false),
  );
  const seen: number[] = [];
  for (let ch = dev2.pop(); ch !== null; ch = dev2.pop()) {
    seen.push(ch.head);
    dev2.pushUsed(ch, ch.writableLength);
  }
  assert.deepEqual(seen, [c, d, e], "C (in flight at the stop), D, E: each once, in order");
  dev2.publish();
  assert.equal(dev2.pop(), null);
  const got: { id: number; len: number; token: unknown }[] = [];
  for (let u = drv2.getUsed(); u !== null; u = drv2.getUsed()) got.push(u);
  assert.deepEqual(got, [
    { id: c, len: 3, token: "C" },
    { id: d, len: 4, token: "D" },
    { id: e, len: 5, token: "E" },
  ]);
  const end = drv2.position();
  assert.deepEqual(
    [end.usedIdx, end.usedWrap, end.inFlight, end.freeIds.length],
    [1, false, [], size],
    "used wrap counter flips at the end of the ring; every id is free again",
  );
  assert.deepEqual(dev2.getBase(), {
    availIdx: 1,
    availWrap: false,
    usedIdx: 1,
    usedWrap: false,
  });
});

test("driver position restore: random traffic over many laps, tokens exactly once", () => {
  for (const [size, seed] of [
    [7, 1],
    [16, 2],
    [100, 3],
  ] as const) {
    const env = setup(size);
    const { mem, ring } = env;
    let drv = env.drv;
    let dev = env.dev;
    const r = rng(seed);
    const idOf = new Map<number, number>();
    const tokenOfId = new Map<number, number>();
    const got: number[] = [];
    const wraps = new Set<boolean>();
    let next = 0;
    let restores = 0;
    const total = size * 12;
    const collect = (max: number): void => {
      for (let k = 0; k < max; k++) {
        const u = drv.getUsed();
        if (u === null) return;
        const seq = u.token as number;
        assert.equal(u.id, idOf.get(seq), `buffer ${seq} came back with another id`);
        assert.equal(u.len, seq % 5);
        tokenOfId.delete(u.id);
        got.push(seq);
      }
    };
    for (let round = 0; round < 2000 && got.length < total; round++) {
      for (let k = r(4); k > 0 && next < total; k--) {
        const n = 1 + r(3);
        const segs: Segment[] = [];
        for (let i = 0; i < n; i++) segs.push({ gpa: gpa(BUF_BASE), len: 8, writable: true });
        const id = drv.add(segs, next);
        if (id === null) break;
        idOf.set(next, id);
        tokenOfId.set(id, next);
        next++;
      }
      if (r(3) !== 0) drv.kick();
      for (let k = r(5); k > 0; k--) {
        const ch = dev.pop();
        if (ch === null) break;
        dev.pushUsed(ch, (tokenOfId.get(ch.head) as number) % 5);
      }
      dev.publish();
      collect(r(4));
      wraps.add(drv.position().usedWrap);
      if (r(4) === 0) {
        // Migration: the device stopped with nothing popped and not used; the driver has
        // (possibly) used buffers not yet collected and (possibly) heads not yet published.
        const base = packedBaseFromNum(packedBaseToNum(dev.getBase()));
        const pos = viaJson(drv.position());
        drv = new PackedDriverQueue(mem, {
          ...ring,
          eventIdx: false,
          restore: { position: pos, tokens: new Map(tokenOfId) },
        });
        dev = new PackedDeviceQueue(mem, { ...ring, eventIdx: false, base });
        assert.deepEqual(drv.position(), pos);
        restores++;
      }
    }
    drv.kick();
    for (let ch = dev.pop(); ch !== null; ch = dev.pop()) {
      dev.pushUsed(ch, (tokenOfId.get(ch.head) as number) % 5);
    }
    dev.publish();
    collect(Infinity);
    assert.ok(restores > 10, `only ${restores} restores`);
    assert.deepEqual(wraps, new Set([true, false]), "the used wrap counter flipped");
    assert.equal(got.length, next, `size ${size}: ${got.length} of ${next} buffers back`);
    assert.equal(new Set(got).size, got.length, `size ${size}: a buffer came back twice`);
    assert.equal(drv.freeCount, size);
  }
});

test("driver position restore: a position that does not fit the ring is a VirtqueueError", () => {
  const { mem, ring, drv } = setup(8);
  drv.add([{ gpa: gpa(BUF_BASE), len: 4, writable: false }], 1);
  drv.add(
    [
      { gpa: gpa(BUF_BASE), len: 4, writable: false },
      { gpa: gpa(BUF_BASE), len: 4, writable: false },
    ],
    2,
  );
  drv.kick();
  const good = drv.position();
  const opts = { ...ring, eventIdx: false };
  const make = (position: typeof good) => () =>
    new PackedDriverQueue(mem, { ...opts, restore: { position } });
  assert.ok(make(good)() instanceof PackedDriverQueue);
  assertVqError(make({ ...good, availIdx: 8 }), "position.availIdx", 8);
  assertVqError(make({ ...good, usedIdx: 2 }), "position.inFlight.count", 3);
  const [first, second] = good.inFlight as [
    { id: number; count: number },
    { id: number; count: number },
  ];
  assertVqError(
    make({ ...good, inFlight: [first, { id: first.id, count: second.count }] }),
    "position.inFlight.id",
    first.id,
  );
  assertVqError(
    make({ ...good, freeIds: [...good.freeIds.slice(1), first.id] }),
    "position.freeIds",
    first.id,
  );
  assertVqError(
    make({ ...good, pendingHeads: [{ pos: 9, flags: 0 }] }),
    "position.pendingHeads.pos",
    9,
  );
});

test("packed vring base encoding: bit layout and range checks", () => {
  assert.equal(
    packedBaseToNum({ availIdx: 5, availWrap: true, usedIdx: 0x7fff, usedWrap: true }),
    0xffff_8005,
  );
  assert.deepEqual(packedBaseFromNum(0x8003_0004), {
    availIdx: 4,
    availWrap: false,
    usedIdx: 3,
    usedWrap: true,
  });
  assert.throws(
    () => packedBaseToNum({ availIdx: 0x8000, availWrap: true, usedIdx: 0, usedWrap: true }),
    RangeError,
  );
  assert.throws(() => packedBaseFromNum(2 ** 32), RangeError);
});

test("dirty log: used descriptors and device event writes are marked; log flushed before publish", () => {
  const { mem, drv, dev, ring } = setup(512, { eventIdx: true });
  const logBuf = new ArrayBuffer((REGION_A + REGION_B) / LOG_PAGE_SIZE / 8 + 64);
  const log = new DirtyLog(logBuf, 0, logBuf.byteLength);
  mem.log = log;
  // fill up to position 300 (descriptor page 0x1000 + 300*16 = 0x22c0 -> page 2)
  for (let i = 0; i < 301; i++) drv.add([{ gpa: gpa(BUF_BASE), len: 1, writable: false }]);
  drv.kick();
  for (let i = 0; i < 300; i++) dev.pushUsed(dev.pop() as DescChain, 0);
  // pushed but not published: nothing marked yet
  assert.equal(log.isDirty(DESC), false);
  dev.publish();
  assert.equal(log.pendingCount, 0, "flushed");
  assert.equal(log.isDirty(DESC), true);
  assert.equal(log.isDirty(DESC + 299 * 16), true);
  assert.equal(log.isDirty(ring.deviceEvent), false, "device event area not written");
  // with usedLog: also marked at logGuestAddr + 16 * position
  const logged = new PackedDeviceQueue(mem, {
    ...ring,
    eventIdx: true,
    base: dev.getBase(),
    usedLog: { logGuestAddr: 0x20_0000 },
  });
  logged.pushUsed(logged.pop() as DescChain, 0);
  logged.publish();
  assert.equal(log.isDirty(0x20_0000 + 300 * 16), true);
  assert.equal(log.isDirty(0x20_0000), false);
  // device event suppression write
  const evPage = 0x30_0000;
  const other = new PackedDeviceQueue(mem, {
    size: 4,
    desc: gpa(0x2f_0000),
    driverEvent: gpa(0x2f_1000),
    deviceEvent: gpa(evPage),
    eventIdx: false,
  });
  assert.equal(log.isDirty(evPage), false);
  other.setNotification(false);
  assert.equal(log.isDirty(evPage), true);
  assert.equal(log.pendingCount, 0);
});

test("EVENT_IDX: the first publish after (re)start calls even if the event is not crossed", () => {
  const { drv, dev, mem, ring } = setup(8, { eventIdx: true });
  for (let i = 0; i < 4; i++) drv.add([{ gpa: gpa(BUF_BASE), len: 4, writable: true }]);
  drv.kick();
  drv.setUsedEvent(5);
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(
    dev.publish(),
    true,
    "no previous decision to compare with (DPDK signalled_used_valid)",
  );
  dev.pushUsed(dev.pop() as DescChain, 1);
  assert.equal(dev.publish(), false, "event 5 not crossed by [1, 2)");
  // a queue rebuilt from the saved base starts over
  const again = new PackedDeviceQueue(mem, { ...ring, eventIdx: true, base: dev.getBase() });
  again.pushUsed(again.pop() as DescChain, 1);
  assert.equal(again.publish(), true);
});

test("dirty log: flushed before the batch's first flags store, re-marked after it", () => {
  const { mem, drv, dev } = setup(8);
  const logBuf = new ArrayBuffer(256);
  const headFlagsAtFlush: number[] = [];
  const flagsView = mem.gpaToView(gpa(DESC + 14), 2);
  class SpyLog extends DirtyLog {
    override flush(): void {
      headFlagsAtFlush.push((flagsView[0] as number) | ((flagsView[1] as number) << 8));
      super.flush();
    }
  }
  mem.log = new SpyLog(logBuf, 0, logBuf.byteLength);
  drv.add([{ gpa: gpa(BUF_BASE), len: 4, writable: true }]);
  drv.add([{ gpa: gpa(BUF_BASE), len: 4, writable: true }]);
  drv.kick();
  const a = dev.pop() as DescChain;
  const b = dev.pop() as DescChain;
  dev.pushUsed(b, 4);
  dev.pushUsed(a, 4);
  dev.publish();
  const usedFlags = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED | PACKED_DESC_F_WRITE;
  assert.equal(headFlagsAtFlush.length, 2);
  assert.equal(
    headFlagsAtFlush[0],
    PACKED_DESC_F_AVAIL | PACKED_DESC_F_WRITE,
    "first flush: head still the driver's",
  );
  assert.equal(headFlagsAtFlush[1], usedFlags, "second flush: after the head store");
  assert.equal(readRaw(mem, DESC).id, b.head);
  assert.equal(readRaw(mem, DESC + 16).id, a.head);
});

test("property: random descriptor rings give valid chains or VirtqueueError, never hang", () => {
  const size = 8;
  const tableAt = BUF_BASE + 0x4000;
  const mem = twoRegionMemory();
  const ring = layout(size);
  // Mostly plausible descriptors (so valid chains occur), with hostile values mixed in.
  const addrArb = fc.oneof(
    { arbitrary: fc.integer({ min: BUF_BASE, max: BUF_BASE + 0x1000 }), weight: 6 },
    {
      arbitrary: fc.constantFrom(
        0,
        REGION_A - 4,
        REGION_A + REGION_B - 1,
        REGION_A + REGION_B,
        2 ** 52,
        tableAt,
      ),
      weight: 2,
    },
    { arbitrary: fc.integer({ min: 0, max: 2 ** 32 - 1 }), weight: 1 },
  );
  const lenArb = fc.oneof(
    { arbitrary: fc.integer({ min: 1, max: 256 }), weight: 6 },
    { arbitrary: fc.constantFrom(0, 16, 24, 32, 48, 2 ** 32 - 1, 0x7fff_ffff), weight: 2 },
  );
  // `avail`: 0 = available for the wrap counter of its lap, 1 = its complement, 2 = raw bits
  const flagsArb = fc.record({
    avail: fc.oneof(
      { arbitrary: fc.constant(0), weight: 6 },
      { arbitrary: fc.constantFrom(1, 2), weight: 2 },
    ),
    raw: fc.integer({ min: 0, max: 0xffff }),
    next: fc.integer({ min: 0, max: 2 }),
    write: fc.boolean(),
    indirect: fc.integer({ min: 0, max: 3 }),
  });
  const descArb = fc.record({
    addr: addrArb,
    len: lenArb,
    id: fc.integer({ min: 0, max: 0xffff }),
    flags: flagsArb,
  });
  type GenFlags = { avail: number; raw: number; next: number; write: boolean; indirect: number };
  const toFlags = (f: GenFlags, lapWrap: boolean): number => {
    if (f.avail === 2) return f.raw;
    const wrap = f.avail === 0 ? lapWrap : !lapWrap;
    return (
      availFlags(wrap) |
      (f.next === 0 ? PACKED_DESC_F_NEXT : 0) |
      (f.write ? PACKED_DESC_F_WRITE : 0) |
      (f.indirect === 0 ? PACKED_DESC_F_INDIRECT : 0)
    );
  };
  const stats = { chains: 0, indirectChains: 0, errors: 0 };
  fc.assert(
    fc.property(
      fc.array(descArb, { minLength: size, maxLength: size }),
      fc.array(descArb, { minLength: 1, maxLength: 4 }),
      fc.record({
        availIdx: fc.integer({ min: 0, max: size - 1 }),
        availWrap: fc.boolean(),
        usedIdx: fc.integer({ min: 0, max: size - 1 }),
        usedWrap: fc.boolean(),
      }),
      fc.integer({ min: 0, max: 4 }).map((n) => n !== 0),
      (ringDescs, tableDescs, base, indirect) => {
        mem.gpaToView(gpa(DESC), size * 16).fill(0);
        mem.gpaToView(gpa(tableAt), 64).fill(0);
        ringDescs.forEach((d, i) => {
          // positions before availIdx belong to the next lap (toggled wrap counter)
          const lapWrap = i >= base.availIdx ? base.availWrap : !base.availWrap;
          const flags = toFlags(d.flags, lapWrap);
          // most indirect descriptors point at the (random) table with a plausible length
          const toTable = (flags & PACKED_DESC_F_INDIRECT) !== 0 && d.id % 4 !== 0;
          writeRaw(mem, DESC + i * 16, {
            ...d,
            flags,
            addr: toTable ? tableAt : d.addr,
            len: toTable ? 16 * (1 + (d.id % tableDescs.length)) : d.len,
          });
        });
        tableDescs.forEach((d, i) =>
          writeRaw(mem, tableAt + i * 16, {
            ...d,
            flags:
              d.flags.avail === 2
                ? d.flags.raw
                : d.flags.write && i === tableDescs.length - 1
                  ? PACKED_DESC_F_WRITE
                  : 0,
          }),
        );
        const dev = new PackedDeviceQueue(mem, { ...ring, eventIdx: false, indirect, base });
        for (let step = 0; step < 4 * size + 4; step++) {
          let c: DescChain | null;
          const headFlags = readRaw(mem, DESC + dev.getBase().availIdx * 16).flags;
          try {
            c = dev.pop();
          } catch (err) {
            assert.ok(err instanceof VirtqueueError, String(err));
            stats.errors++;
            return;
          }
          if (c === null) return;
          assert.ok(c.descCount >= 1 && c.descCount <= size);
          let rl = 0;
          for (const s of c.readable) {
            assert.equal(s.writable, false);
            assert.ok(s.len > 0 && mem.covers(s.gpa, s.len));
            rl += s.len;
          }
          let wl = 0;
          for (const s of c.writable) {
            assert.equal(s.writable, true);
            assert.ok(s.len > 0 && mem.covers(s.gpa, s.len));
            wl += s.len;
          }
          assert.equal(c.readableLength, rl);
          assert.equal(c.writableLength, wl);
          assert.ok(rl + wl < 2 ** 32);
          stats.chains++;
          if ((headFlags & PACKED_DESC_F_INDIRECT) !== 0) stats.indirectChains++;
          try {
            dev.pushUsed(c, Math.min(wl, 3));
          } catch (err) {
            // a random base may put the used position past the available one
            assert.ok(err instanceof VirtqueueError && err.field === "inFlight", String(err));
            stats.errors++;
            return;
          }
          dev.publish();
        }
      },
    ),
    { numRuns: 300, seed: 0x5eed },
  );
  // the generator reaches both outcomes
  assert.ok(
    stats.chains > 100 && stats.indirectChains > 10 && stats.errors > 50,
    JSON.stringify(stats),
  );
});
