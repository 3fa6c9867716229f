/**
 * Front-end unit tests: GuestRam (allocation, uaddr translation, two regions, leaks) and the
 * request sequence of VhostUserFrontend against a small fake back-end built on a Channel in the
 * back-end role over a socketpair.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readlinkSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import diagnostics_channel from "node:diagnostics_channel";

import { native } from "../src/native.js";
import { Channel, MESSAGE_DIAGNOSTICS_CHANNEL } from "../src/channel.js";
import type { FrontendMessage, MessageDiagnostic } from "../src/channel.js";
import {
  BackendRequest,
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureSet,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { GuestMemoryError, gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import type { Gpa } from "../src/memory/address.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import type { Region } from "../src/memory/guest-memory.js";
import { mapRegion, unmapRegion } from "../src/memory/mapping.js";
import { SplitDeviceQueue } from "../src/virtq/split.js";
import { PackedDeviceQueue } from "../src/virtq/packed.js";
import { splitRingSizes, packedRingSizes } from "../src/virtq/layout.js";
import { GuestRam, DEFAULT_UADDR_BASE, DEFAULT_HIGH_GPA } from "../src/frontend/guest-ram.js";
import {
  VhostUserFrontend,
  FRONTEND_PROTOCOL_FEATURES,
  DeviceStatus,
} from "../src/frontend/frontend.js";
import { VIRTIO_NET_HDR_SIZE } from "../src/frontend/queue.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { openFds, until } from "./helpers.js";

// --- helpers ---------------------------------------------------------------------------

function memfdMappings(): number {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => l.includes("/memfd:")).length;
}

/** Let pending I/O run (socket watchers fire on the next loop turns). */
function tick(ms = 5): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

const FDS_AT_START = openFds();
const MAPS_AT_START = memfdMappings();

// --- GuestRam --------------------------------------------------------------------------

test("GuestRam: default layout is two regions with a hole and uaddr distinct from gpa", () => {
  const ram = GuestRam.create({ size: 4 << 20 });
  try {
    assert.equal(ram.regions.length, 2);
    const [a, b] = ram.regions.map((r) => r.info);
    assert.ok(a && b);
    assert.equal(a.gpa, 0);
    assert.equal(a.size, 2 << 20);
    assert.equal(b.gpa, DEFAULT_HIGH_GPA);
    assert.ok(b.gpa > a.gpa + a.size, "hole between the regions");
    assert.equal(a.uaddr, DEFAULT_UADDR_BASE);
    assert.notEqual(b.uaddr - b.gpa, a.uaddr - a.gpa, "per-region uaddr deltas differ");
    // translation both ways, in both regions
    for (const g of [0x10, (2 << 20) - 1, DEFAULT_HIGH_GPA + 0x1234]) {
      const ua = ram.gpaToUaddr(g as Gpa);
      assert.notEqual(ua, g);
      assert.equal(ram.memory.uaddrToGpa(ua, 1), g);
    }
    // the hole is not memory
    assert.throws(() => ram.gpaToUaddr((2 << 20) as Gpa), GuestMemoryError);
    assert.throws(() => ram.write((2 << 20) as Gpa, new Uint8Array(1)), GuestMemoryError);
    // wire memory table carries the uaddrs
    const table = ram.memoryTable();
    assert.deepEqual(
      table.map((r) => [r.guestPhysAddr, r.memorySize, r.userspaceAddr, r.mmapOffset]),
      [
        [0n, BigInt(2 << 20), BigInt(a.uaddr), 0n],
        [BigInt(b.gpa), BigInt(2 << 20), BigInt(b.uaddr), 0n],
      ],
    );
    assert.equal(ram.regionFds.length, 2);
    assert.notEqual(ram.regionFds[0], ram.regionFds[1]);
  } finally {
    ram.close();
  }
});

test("GuestRam: allocator aligns, fills region 0 then region 1, and refuses when full", () => {
  const ram = GuestRam.create({ size: 1 << 20 });
  try {
    const half = 512 << 10;
    const x = ram.alloc(100, 16);
    assert.equal(x, 0);
    const y = ram.alloc(10, 4096);
    assert.equal(y, 4096);
    const z = ram.alloc(half - 8192, 4096); // the rest of region 0
    assert.equal(z, 8192);
    const w = ram.alloc(64, 64); // region 0 is full: region 1
    assert.equal(w, DEFAULT_HIGH_GPA);
    const only1 = ram.alloc(32, 16, 1);
    assert.ok(only1 > DEFAULT_HIGH_GPA);
    assert.throws(() => ram.alloc(64, 16, 0), RangeError);
    assert.throws(() => ram.alloc(half, 16), /no room for/);
    assert.throws(() => ram.alloc(10, 3), /power of 2/);
    assert.throws(() => ram.alloc(0), /positive/);
    ram.reset();
    assert.equal(ram.alloc(8), 0);
    // data written through one region's mapping reads back
    ram.write(only1, Uint8Array.of(1, 2, 3));
    assert.deepEqual([...ram.read(only1, 3)], [1, 2, 3]);
  } finally {
    ram.close();
  }
});

test("GuestRam: shared-fd layout uses mmap offsets; a second mapping sees the same bytes", () => {
  const ram = GuestRam.create({ size: 1 << 20, layout: "shared-fd" });
  const mapped: Region[] = [];
  try {
    assert.equal(ram.regionFds[0], ram.regionFds[1]);
    const [a, b] = ram.regions;
    assert.ok(a && b);
    assert.equal(a.info.mmapOffset, 0);
    assert.equal(b.info.mmapOffset, a.info.size);
    // map as a back-end would: region by region from the fd
    for (const r of ram.regions) mapped.push(mapRegion(r.fd, r.info));
    const dev = new GuestMemory(mapped);
    const g = (b.info.gpa + 100) as Gpa;
    ram.write(g, Uint8Array.of(9, 8, 7));
    const out = new Uint8Array(3);
    dev.read(g, out);
    assert.deepEqual([...out], [9, 8, 7]);
  } finally {
    for (const r of mapped) unmapRegion(r);
    ram.close();
  }
});

test("GuestRam: duplicate copies layout, contents and allocator; close releases fds and mappings", () => {
  const fds0 = openFds();
  const maps0 = memfdMappings();
  const ram = GuestRam.create({ size: 1 << 20 });
  assert.equal(memfdMappings(), maps0 + 2);
  const g = ram.alloc(4);
  ram.write(g, Uint8Array.of(0xde, 0xad, 0xbe, 0xef));
  const copy = ram.duplicate();
  assert.equal(memfdMappings(), maps0 + 4);
  assert.deepEqual(
    copy.regions.map((r) => r.info),
    ram.regions.map((r) => r.info),
  );
  assert.notDeepEqual(copy.regionFds, ram.regionFds);
  assert.deepEqual([...copy.read(g, 4)], [0xde, 0xad, 0xbe, 0xef]);
  assert.equal(copy.alloc(4), 16, "allocator state copied");
  ram.write(g, Uint8Array.of(0));
  assert.equal(copy.read(g, 1)[0], 0xde, "copies are independent");
  ram.close();
  ram.close(); // idempotent
  copy.close();
  assert.equal(memfdMappings(), maps0);
  assert.deepEqual(openFds(), fds0);
  assert.throws(() => ram.alloc(1), /after close/);
});

test("GuestRam: bad region specs throw GuestMemoryError and leak nothing", () => {
  const fds0 = openFds();
  assert.throws(() => GuestRam.create({ regions: [{ gpa: 100, size: 4096 }] }), /page-aligned/);
  assert.throws(() => GuestRam.create({ regions: [] }), GuestMemoryError);
  assert.throws(
    () =>
      GuestRam.create({
        regions: [
          { gpa: 0, size: 8192 },
          { gpa: 4096, size: 8192 },
        ],
      }),
    /overlap/,
  );
  assert.deepEqual(openFds(), fds0);
});

// --- fake back-end -----------------------------------------------------------------------

interface Recorded {
  name: string;
  payload: unknown;
  fds: number;
  needReply: boolean;
}

const NET_FEATURES = featureSet(
  VirtioFeature.MAC,
  VirtioFeature.STATUS,
  VirtioFeature.VERSION_1,
  VirtioFeature.RING_EVENT_IDX,
  VirtioFeature.RING_PACKED,
  VirtioFeature.PROTOCOL_FEATURES,
);

/** A scripted back-end: records every request, answers the ones that need an answer. */
class FakeBackend {
  readonly channel: Channel<"main">;
  readonly log: Recorded[] = [];
  offered = NET_FEATURES;
  offeredPf = featureSet(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.STATUS,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CRYPTO_SESSION,
  );
  readonly failOn = new Set<string>();
  readonly vringBase = new Map<number, number>();
  readonly kickFds = new Map<number, number>();
  readonly callFds = new Map<number, number>();
  readonly errFds = new Map<number, number>();
  readonly memFdSizes: number[] = [];
  regions: Region[] = [];
  mem: GuestMemory | null = null;
  addr = new Map<number, { desc: number; avail: number; used: number }>();
  backendReq: Channel<"backend-req"> | null = null;
  status = 0;

  constructor(fd: number) {
    this.channel = new Channel<"main">(fd, { role: "backend", kind: "main", name: "fake" });
    this.channel.on("message", (m: FrontendMessage) => this.#handle(m));
  }

  names(): string[] {
    return this.log.map((r) => r.name);
  }

  #keep(map: Map<number, number>, index: number, fd: number | undefined): void {
    const old = map.get(index);
    if (old !== undefined) native.close(old);
    if (fd === undefined) map.delete(index);
    else map.set(index, fd);
  }

  #handle(m: FrontendMessage): void {
    this.log.push({ name: m.name, payload: m.payload, fds: m.fds.length, needReply: m.needReply });
    const ch = this.channel;
    switch (m.request) {
      case FrontendRequest.GET_FEATURES:
        ch.reply(m, this.offered);
        break;
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        ch.reply(m, this.offeredPf);
        break;
      case FrontendRequest.SET_PROTOCOL_FEATURES:
        ch.setNegotiatedProtocolFeatures(m.payload);
        break;
      case FrontendRequest.GET_QUEUE_NUM:
        ch.reply(m, 1n);
        break;
      case FrontendRequest.GET_MAX_MEM_SLOTS:
        ch.reply(m, 8n);
        break;
      case FrontendRequest.SET_MEM_TABLE: {
        for (const r of this.regions) unmapRegion(r);
        this.regions = m.payload.regions.map((r, i) => {
          const fd = m.fds[i] as number;
          this.memFdSizes.push(native.fstatSize(fd));
          return mapRegion(fd, {
            gpa: gpa(Number(r.guestPhysAddr)),
            size: Number(r.memorySize),
            uaddr: uaddr(Number(r.userspaceAddr)),
            mmapOffset: mmapOffset(Number(r.mmapOffset)),
          });
        });
        for (const fd of m.fds) native.close(fd);
        this.mem = new GuestMemory(this.regions);
        break;
      }
      case FrontendRequest.SET_VRING_ADDR:
        this.addr.set(m.payload.index, {
          desc: Number(m.payload.descUserAddr),
          avail: Number(m.payload.availUserAddr),
          used: Number(m.payload.usedUserAddr),
        });
        break;
      case FrontendRequest.SET_VRING_KICK:
        this.#keep(this.kickFds, m.payload.index, m.fds[0]);
        break;
      case FrontendRequest.SET_VRING_CALL:
        this.#keep(this.callFds, m.payload.index, m.fds[0]);
        break;
      case FrontendRequest.SET_VRING_ERR:
        this.#keep(this.errFds, m.payload.index, m.fds[0]);
        break;
      case FrontendRequest.GET_VRING_BASE:
        ch.reply(m, { index: m.payload.index, num: this.vringBase.get(m.payload.index) ?? 0 });
        break;
      case FrontendRequest.SET_BACKEND_REQ_FD:
        this.backendReq?.close();
        this.backendReq = new Channel<"backend-req">(m.fds[0] as number, {
          role: "backend",
          kind: "backend-req",
          name: "fake/backend-req",
        });
        this.backendReq.setNegotiatedProtocolFeatures(ch.protocolFeatures);
        break;
      case FrontendRequest.SET_STATUS:
        this.status = Number(m.payload);
        break;
      case FrontendRequest.GET_STATUS:
        ch.reply(m, BigInt(this.status));
        break;
      case FrontendRequest.GET_CONFIG: {
        const payload = Uint8Array.from({ length: m.payload.size }, (_, i) => m.payload.offset + i);
        ch.reply(m, { ...m.payload, payload });
        break;
      }
      default:
        for (const fd of m.fds) native.close(fd);
    }
    if (ch.needsAck(m)) ch.ack(m, !this.failOn.has(m.name));
  }

  /** Translate a ring's front-end addresses as a back-end does. */
  ringGpas(
    index: number,
    sizes: { desc: number; avail: number; used: number },
  ): { desc: Gpa; avail: Gpa; used: Gpa } {
    const a = this.addr.get(index);
    assert.ok(a && this.mem, `queue ${index} has addresses and memory`);
    return {
      desc: this.mem.uaddrToGpa(uaddr(a.desc), sizes.desc),
      avail: this.mem.uaddrToGpa(uaddr(a.avail), sizes.avail),
      used: this.mem.uaddrToGpa(uaddr(a.used), sizes.used),
    };
  }

  close(): void {
    this.channel.close();
    this.backendReq?.close();
    for (const m of [this.kickFds, this.callFds, this.errFds]) {
      for (const fd of m.values()) native.close(fd);
      m.clear();
    }
    for (const r of this.regions) unmapRegion(r);
    this.regions = [];
    this.mem = null;
  }
}

function pair(opts: { useReplyAck?: boolean } = {}): { fe: VhostUserFrontend; be: FakeBackend } {
  const [a, b] = native.socketpair();
  const be = new FakeBackend(b);
  const fe = new VhostUserFrontend(a, { name: "fe", requestTimeoutMs: 3000, ...opts });
  return { fe, be };
}

const WANTED = featureSet(
  VirtioFeature.MAC,
  VirtioFeature.VERSION_1,
  VirtioFeature.RING_EVENT_IDX,
  VirtioFeature.CTRL_VQ, // not offered: must not be acked
);

// --- front-end request sequence ------------------------------------------------------------

test("frontend: negotiate + start send QEMU's sequence with exact payloads and fds", async () => {
  const { fe, be } = pair();
  const ram = GuestRam.create({ size: 2 << 20 });
  try {
    const n = await fe.negotiate({ features: WANTED });
    const expectPf = be.offeredPf & FRONTEND_PROTOCOL_FEATURES;
    assert.equal(n.offeredFeatures, NET_FEATURES);
    assert.equal(
      n.features,
      featureSet(
        VirtioFeature.MAC,
        VirtioFeature.VERSION_1,
        VirtioFeature.RING_EVENT_IDX,
        VirtioFeature.PROTOCOL_FEATURES,
      ),
    );
    assert.equal(n.protocolFeatures, expectPf);
    assert.equal(n.queueNum, 1);
    assert.equal(n.maxMemSlots, 8);
    assert.deepEqual(be.names(), [
      "GET_FEATURES",
      "GET_PROTOCOL_FEATURES",
      "SET_PROTOCOL_FEATURES",
      "GET_QUEUE_NUM",
      "GET_MAX_MEM_SLOTS",
      "SET_BACKEND_REQ_FD",
      "SET_OWNER",
    ]);
    assert.equal(be.log[2]?.payload, expectPf);
    assert.equal(be.log[2]?.needReply, false, "SET_PROTOCOL_FEATURES precedes REPLY_ACK");
    assert.equal(be.log[5]?.fds, 1);
    assert.equal(be.log[6]?.needReply, true, "REPLY_ACK: SET_OWNER is acked");
    be.log.length = 0;

    const queues = await fe.start(ram, [{ size: 64 }, { size: 128, kick: "none" }]);
    const f = n.features;
    const q0 = queues[0] as FrontendQueue;
    const q1 = queues[1] as FrontendQueue;
    const ringReqs = (i: number, num: number, kickFds: number) => [
      ["SET_VRING_NUM", { index: i, num }, 0],
      ["SET_VRING_BASE", { index: i, num: 0 }, 0],
      ["SET_VRING_ADDR", null, 0],
      ["SET_VRING_KICK", { index: i, noFd: kickFds === 0 }, kickFds],
      ["SET_VRING_CALL", { index: i, noFd: false }, 1],
      ["SET_VRING_ERR", { index: i, noFd: false }, 1],
      ["SET_VRING_ENABLE", { index: i, num: 1 }, 0],
    ];
    const expected: [string, unknown, number][] = [
      ["SET_FEATURES", f, 0],
      [
        "SET_STATUS",
        BigInt(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK),
        0,
      ],
      ["SET_MEM_TABLE", null, 2],
      ...(ringReqs(0, 64, 1) as [string, unknown, number][]),
      ...(ringReqs(1, 128, 0) as [string, unknown, number][]),
      ["SET_STATUS", BigInt(0xf), 0],
    ];
    assert.deepEqual(
      be.names(),
      expected.map((e) => e[0]),
    );
    expected.forEach(([name, payload, fds], i) => {
      const rec = be.log[i] as Recorded;
      assert.equal(rec.fds, fds, `${name} fds`);
      assert.equal(rec.needReply, true, `${name} asks for an ack`);
      if (payload !== null) assert.deepEqual(rec.payload, payload, `${name} payload`);
    });
    // the memory table: every region, with its uaddr, and fds of the right size
    const mt = be.log[2]?.payload as unknown as {
      regions: { userspaceAddr: bigint; guestPhysAddr: bigint }[];
    };
    assert.deepEqual(mt.regions, ram.memoryTable());
    assert.deepEqual(be.memFdSizes, [1 << 20, 1 << 20]);
    // ring addresses are front-end virtual addresses that translate back to the rings' GPAs
    const addr0 = be.log[5]?.payload as {
      descUserAddr: bigint;
      flags: number;
      logGuestAddr: bigint;
    };
    assert.equal(addr0.flags, 0);
    assert.notEqual(Number(addr0.descUserAddr), q0.ring.desc);
    assert.deepEqual(be.ringGpas(0, splitRingSizes(64)), {
      desc: q0.ring.desc,
      avail: q0.ring.avail,
      used: q0.ring.used,
    });
    assert.equal(addr0.logGuestAddr, BigInt(q0.ring.used));
    assert.equal(q1.kickFd, -1);
    assert.equal(be.status, 0xf);
    assert.equal(await fe.getStatus(), 0xf);
    // kick/call/err fds are the queue's eventfds
    q0.forceKick();
    assert.equal(native.eventfdRead(be.kickFds.get(0) as number), 1n);
    const called = new Promise<number>((r) => q0.onCall(r));
    native.eventfdWrite(be.callFds.get(0) as number, 1);
    assert.equal(await called, 0);
    const broken = new Promise<number>((r) => fe.once("queue-error", r));
    native.eventfdWrite(be.errFds.get(1) as number, 1);
    assert.equal(await broken, 1);
    assert.equal(q1.stats.errors, 1);
  } finally {
    fe.close();
    be.close();
    ram.close();
  }
});

test("frontend: without REPLY_ACK nothing asks for an ack and barrier is a GET_FEATURES round trip", async () => {
  const { fe, be } = pair();
  be.offeredPf = featureSet(ProtocolFeature.MQ);
  const ram = GuestRam.create({ size: 1 << 20 });
  try {
    await fe.negotiate({ features: WANTED });
    await fe.setFeatures();
    await fe.setMemTable(ram);
    await fe.barrier();
    be.log.length = 0;
    await fe.setVringEnable(0, true);
    await fe.barrier();
    assert.deepEqual(be.names(), ["SET_VRING_ENABLE", "GET_FEATURES"]);
    assert.equal(be.log[0]?.needReply, false);
    // a sync memory table also ends with a round trip
    be.log.length = 0;
    await fe.setMemTable(ram, { sync: true });
    assert.deepEqual(be.names(), ["SET_MEM_TABLE", "GET_FEATURES"]);
  } finally {
    fe.close();
    be.close();
    ram.close();
  }
});

test("frontend: with REPLY_ACK barrier waits for acks and sends nothing", async () => {
  const { fe, be } = pair();
  try {
    await fe.negotiate({ features: WANTED });
    be.log.length = 0;
    const p = fe.setVringEnable(0, true);
    await fe.barrier();
    await p;
    await fe.barrier();
    assert.deepEqual(be.names(), ["SET_VRING_ENABLE"]);
    assert.equal(be.log[0]?.needReply, true);
  } finally {
    fe.close();
    be.close();
  }
});

test("frontend: a failed ack rejects with an error naming the request", async () => {
  const { fe, be } = pair();
  const ram = GuestRam.create({ size: 1 << 20 });
  try {
    await fe.negotiate({ features: WANTED });
    be.failOn.add("SET_MEM_TABLE");
    await assert.rejects(fe.setMemTable(ram), (err: unknown) => {
      assert.ok(err instanceof VhostUserError);
      assert.equal(err.code, "ERR_VHOST_REQUEST_FAILED");
      assert.equal(err.request, "SET_MEM_TABLE");
      assert.match(err.message, /SET_MEM_TABLE/);
      return true;
    });
    // the connection goes on
    be.failOn.clear();
    await fe.setMemTable(ram);
    be.failOn.add("SET_VRING_ADDR");
    await assert.rejects(fe.setupQueue(0, { size: 16 }), /SET_VRING_ADDR/);
    assert.equal(fe.queue(0), undefined, "a failed setup leaves no queue behind");
    // a refused SET_BACKEND_REQ_FD keeps the channel the back-end has
    const before = fe.backendChannel;
    assert.ok(before, "negotiate set up the back-end request channel");
    be.failOn.add("SET_BACKEND_REQ_FD");
    await assert.rejects(fe.setBackendReqFd(), /SET_BACKEND_REQ_FD/);
    assert.equal(fe.backendChannel, before, "the old channel is kept");
  } finally {
    fe.close();
    be.close();
    ram.close();
  }
});

test("frontend: stopQueue and restartQueue (split and packed bases, new kick fd)", async () => {
  const { fe, be } = pair();
  const ram = GuestRam.create({ size: 2 << 20 });
  try {
    const f = WANTED | featureSet(VirtioFeature.RING_PACKED);
    await fe.negotiate({ features: f });
    await fe.start(
      ram,
      [{ size: 32 }, { size: 24, packed: true }],
      fe.features & ~featureSet(VirtioFeature.RING_PACKED),
    );
    be.log.length = 0;
    be.vringBase.set(0, 7);
    const b0 = await fe.stopQueue(0);
    assert.deepEqual(b0, { availIdx: 7 });
    assert.deepEqual(be.names(), ["SET_VRING_ENABLE", "GET_VRING_BASE"]);
    assert.deepEqual(be.log[0]?.payload, { index: 0, num: 0 });
    const oldKick = be.kickFds.get(0) as number;
    be.log.length = 0;
    await fe.restartQueue(0);
    assert.deepEqual(be.names(), [
      "SET_VRING_NUM",
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_KICK",
      "SET_VRING_CALL",
      "SET_VRING_ERR",
      "SET_VRING_ENABLE",
    ]);
    assert.deepEqual(be.log[1]?.payload, { index: 0, num: 7 });
    assert.deepEqual(be.log[6]?.payload, { index: 0, num: 1 });
    const newKick = be.kickFds.get(0) as number;
    assert.notEqual(newKick, oldKick);
    await until(() => native.eventfdRead(newKick) === 1n, "the restart kick", 2000);

    // packed base: both indices and wrap counters
    be.vringBase.set(1, 5 | 0x8000 | (9 << 16));
    const b1 = await fe.stopQueue(1);
    assert.deepEqual(b1, { availIdx: 5, availWrap: true, usedIdx: 9, usedWrap: false });
    be.log.length = 0;
    await fe.restartQueue(1);
    assert.deepEqual(be.log[1]?.payload, { index: 1, num: 5 | 0x8000 | (9 << 16) });
    await assert.rejects(fe.restartQueue(3), /not set up/);
  } finally {
    fe.close();
    be.close();
    ram.close();
  }
});

test("frontend: stopQueues writes each ring's stop requests back to back, in stopQueue's order", async () => {
  const { fe, be } = pair();
  const ram = GuestRam.create({ size: 2 << 20 });
  const events: string[] = [];
  const onMessage = (m: unknown): void => {
    const d = m as MessageDiagnostic;
    if (d.direction === "out" && d.kind === "request") events.push(`-> ${d.name}`);
    if (d.direction === "in" && d.kind !== "request") events.push(`<- ${d.name}`);
  };
  try {
    await fe.negotiate({ features: WANTED });
    await fe.start(ram, [16, 16, 16]);
    be.log.length = 0;
    be.vringBase.set(0, 3);
    be.vringBase.set(2, 9);
    diagnostics_channel.subscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMessage);
    const bases = await fe.stopQueues([0, 1, 2]);
    diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMessage);
    assert.deepEqual(
      [...bases],
      [
        [0, { availIdx: 3 }],
        [1, { availIdx: 0 }],
        [2, { availIdx: 9 }],
      ],
    );
    // The back-end sees what one stopQueue after another sends...
    assert.deepEqual(be.names(), [
      "SET_VRING_ENABLE",
      "GET_VRING_BASE",
      "SET_VRING_ENABLE",
      "GET_VRING_BASE",
      "SET_VRING_ENABLE",
      "GET_VRING_BASE",
    ]);
    // ...but every request is on the wire before the first answer comes back.
    const firstAnswer = events.findIndex((e) => e.startsWith("<-"));
    assert.equal(firstAnswer, 6, events.join(", "));
    for (const q of fe.queues.values()) assert.equal(q.stopped, true);
    for (const q of fe.queues.values()) assert.equal(q.enabled, true, "the driver's choice stays");

    // A refused ENABLE 0 fails the stop, and the ring that did stop is marked stopped.
    for (const i of [0, 1, 2]) await fe.restartQueue(i);
    be.failOn.add("SET_VRING_ENABLE");
    await assert.rejects(fe.stopQueues([0, 1]), /SET_VRING_ENABLE/);
    assert.equal(fe.queue(0)?.stopped, true, "GET_VRING_BASE answered: ring 0 is stopped");
    assert.equal(fe.queue(1)?.stopped, true, "GET_VRING_BASE answered: ring 1 is stopped");
    assert.equal(fe.queue(2)?.stopped, false);
  } finally {
    diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMessage);
    fe.close();
    be.close();
    ram.close();
  }
});

test("frontend: data path over the fake back-end: batched kicks, TX bytes, RX frames, split and packed", async () => {
  for (const packed of [false, true]) {
    const { fe, be } = pair();
    const ram = GuestRam.create({ size: 2 << 20 });
    try {
      const f = WANTED | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
      await fe.negotiate({ features: f });
      const [rx, tx] = await fe.start(ram, [16, 16]);
      assert.ok(rx && tx);
      assert.equal(tx.packed, packed);
      const mem = be.mem as GuestMemory;
      const devQueue = (i: number) => {
        if (packed) {
          const s = packedRingSizes(16);
          const g = be.ringGpas(i, { desc: s.desc, avail: s.driverEvent, used: s.deviceEvent });
          return new PackedDeviceQueue(mem, {
            size: 16,
            desc: g.desc,
            driverEvent: g.avail,
            deviceEvent: g.used,
            eventIdx: true,
            index: i,
          });
        }
        const g = be.ringGpas(i, splitRingSizes(16));
        return new SplitDeviceQueue(mem, { size: 16, ...g, eventIdx: true, index: i });
      };
      const txDev = devQueue(1);
      const rxDev = devQueue(0);
      // three frames, one kick
      const frames = [1, 2, 3].map((k) =>
        Uint8Array.from({ length: 60 + k }, (_, i) => (i * k) & 0xff),
      );
      for (const fr of frames) assert.notEqual(tx.addFrame(fr), null);
      assert.equal(tx.kick(), true);
      assert.equal(native.eventfdRead(be.kickFds.get(1) as number), 1n);
      for (const fr of frames) {
        const c = txDev.pop();
        assert.ok(c);
        const bytes = new Uint8Array(c.readableLength);
        mem.read(c.readable[0]?.gpa as Gpa, bytes);
        assert.deepEqual(
          bytes.subarray(0, VIRTIO_NET_HDR_SIZE),
          new Uint8Array(VIRTIO_NET_HDR_SIZE),
        );
        assert.deepEqual(bytes.subarray(VIRTIO_NET_HDR_SIZE), fr);
        txDev.pushUsed(c, 0);
      }
      assert.equal(txDev.pop(), null);
      if (txDev.publish()) native.eventfdWrite(be.callFds.get(1) as number, 1);
      await tx.waitForUsed(2000, 3);
      assert.equal(tx.reclaim(), 3);
      // RX: post buffers, the device fills two
      assert.equal(rx.postRxBuffers(4), 4);
      for (const fr of frames.slice(0, 2)) {
        const c = rxDev.pop();
        assert.ok(c && c.writable[0]);
        const buf = new Uint8Array(VIRTIO_NET_HDR_SIZE + fr.length);
        buf.set(fr, VIRTIO_NET_HDR_SIZE);
        mem.write(c.writable[0].gpa, buf);
        rxDev.pushUsed(c, buf.length);
      }
      if (rxDev.publish()) native.eventfdWrite(be.callFds.get(0) as number, 1);
      await rx.waitForUsed(2000, 2);
      assert.deepEqual(rx.receiveFrames(), frames.slice(0, 2));
      assert.equal(rx.outstanding, 2);
    } finally {
      fe.close();
      be.close();
      ram.close();
    }
  }
});

test("frontend: EVENT_IDX on the driver side: a drained queue asks for one call at its next used buffer, kicks follow avail_event (split and packed)", async () => {
  // Regression: a packed queue never wrote its used event (RING_EVENT_FLAGS_DESC), so the
  // device notified every used buffer and the front-end's side of EVENT_IDX went untested.
  for (const packed of [false, true]) {
    const { fe, be } = pair();
    const ram = GuestRam.create({ size: 2 << 20 });
    try {
      const f = WANTED | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
      await fe.negotiate({ features: f });
      const [rx] = await fe.start(ram, [16, 16]);
      assert.ok(rx);
      assert.equal(rx.eventIdx, true);
      assert.equal(rx.packed, packed);
      const mem = be.mem as GuestMemory;
      let dev: SplitDeviceQueue | PackedDeviceQueue;
      if (packed) {
        const s = packedRingSizes(16);
        const g = be.ringGpas(0, { desc: s.desc, avail: s.driverEvent, used: s.deviceEvent });
        dev = new PackedDeviceQueue(mem, {
          size: 16,
          desc: g.desc,
          driverEvent: g.avail,
          deviceEvent: g.used,
          eventIdx: true,
          index: 0,
        });
      } else {
        const g = be.ringGpas(0, splitRingSizes(16));
        dev = new SplitDeviceQueue(mem, { size: 16, ...g, eventIdx: true, index: 0 });
      }
      const kickFd = be.kickFds.get(0) as number;
      const useOne = (): boolean => {
        const c = dev.pop();
        assert.ok(c, "a receive buffer is available");
        dev.pushUsed(c, VIRTIO_NET_HDR_SIZE + 60);
        return dev.publish();
      };
      // avail_event: the device asks for a kick at its next avail position; the driver kicks
      // when it crosses it, and not for buffers made available after that until the device
      // asks again.
      dev.setNotification(true);
      assert.equal(rx.postRxBuffers(2), 2);
      assert.equal(rx.stats.kicks, 1, "kicked: avail_event crossed");
      assert.equal(native.eventfdRead(kickFd), 1n);
      assert.equal(rx.postRxBuffers(6), 6);
      assert.equal(rx.stats.kicks, 1, "no kick: the device did not ask again");
      assert.equal(rx.stats.kicksSuppressed, 1);
      // used_event: the first publish notifies (no earlier decision); the driver drains and
      // asks for the next used buffer only.
      assert.equal(useOne(), true, "first publish");
      assert.equal(rx.receiveFrames().length, 1);
      assert.equal(useOne(), true, "the used buffer the drained driver waits for");
      assert.equal(useOne(), false, "not drained since: no call");
      assert.equal(useOne(), false, "still not drained: no call");
      assert.equal(rx.receiveFrames().length, 3);
      assert.equal(useOne(), true, "drained again: the next used buffer calls");
      // turned off, then on again
      assert.equal(rx.receiveFrames().length, 1);
      rx.setNotification(false);
      assert.equal(rx.postRxBuffers(1), 1);
      // split: disabling stops updating used_event, where one more call may still be asked
      // for (VIRTIO 1.2 §2.7.10); packed: DISABLE is exact
      const off = useOne();
      if (packed) assert.equal(off, false, "notifications off");
      assert.equal(rx.receiveFrames().length, 1);
      rx.setNotification(true);
      assert.equal(rx.postRxBuffers(1), 1);
      assert.equal(useOne(), true, "notifications on again");
    } finally {
      fe.close();
      be.close();
      ram.close();
    }
  }
});

test("frontend: config, RARP, reset, generic request, and the back-end request channel", async () => {
  const { fe, be } = pair();
  be.offeredPf |= featureSet(ProtocolFeature.RARP, ProtocolFeature.RESET_DEVICE);
  try {
    await fe.negotiate({ features: WANTED });
    assert.deepEqual([...(await fe.getConfig(4, 3))], [4, 5, 6]);
    await fe.setConfig(0, Uint8Array.of(1, 2));
    await fe.sendRarp("52:54:00:12:34:56");
    await fe.resetDevice();
    assert.deepEqual(be.names().slice(-4), [
      "GET_CONFIG",
      "SET_CONFIG",
      "SEND_RARP",
      "RESET_DEVICE",
    ]);
    assert.deepEqual(
      [...(be.log.at(-2)?.payload as { mac: Uint8Array }).mac],
      [0x52, 0x54, 0, 0x12, 0x34, 0x56],
    );
    await assert.rejects(fe.sendRarp("nope"), RangeError);
    // generic passthrough
    const r = await fe.request(FrontendRequest.GET_QUEUE_NUM, null);
    assert.equal(r.kind, "reply");
    assert.equal(r.payload, 1n);
    // back-end request channel: CONFIG_CHANGE_MSG with NEED_REPLY is acked with 0
    const changed = new Promise<void>((res) => fe.once("config-change", () => res()));
    const ack = be.backendReq?.request(BackendRequest.CONFIG_CHANGE_MSG, null);
    await changed;
    const a = await ack;
    assert.equal(a?.kind, "ack");
    assert.equal(a?.payload, 0n);
    // a request the front-end does not handle gets a failure ack
    await assert.rejects(
      be.backendReq?.request(BackendRequest.IOTLB_MSG, {
        iova: 0n,
        size: 4096n,
        uaddr: 0n,
        perm: 1,
        type: 1,
      }) ?? Promise.resolve(),
      /IOTLB_MSG/,
    );
  } finally {
    fe.close();
    be.close();
  }
});

test("frontend: connect retries until the back-end listens; listen waits for a client", async () => {
  const dir = tmpdir();
  const path = join(dir, `vhostkit-fe-${process.pid}-a.sock`);
  const pending = VhostUserFrontend.connect(path, { timeoutMs: 3000 });
  await tick(40);
  const lfd = native.unixListen(path, 1);
  let fe: VhostUserFrontend | null = null;
  let peer: number | null = null;
  try {
    fe = await pending;
    await until(() => (peer = native.unixAccept(lfd)) !== null, "accept", 2000);
    assert.equal(fe.closed, false);
  } finally {
    fe?.close();
    if (peer !== null) native.close(peer);
    native.close(lfd);
    try {
      (await import("node:fs")).unlinkSync(path);
    } catch {
      // gone
    }
  }
  await assert.rejects(
    VhostUserFrontend.connect(join(dir, `vhostkit-fe-${process.pid}-none.sock`), { timeoutMs: 60 }),
    (err: unknown) =>
      err instanceof VhostUserError &&
      err.code === "ERR_VHOST_TIMEOUT" &&
      /connect/.test(err.message),
  );

  const lpath = join(dir, `vhostkit-fe-${process.pid}-b.sock`);
  const accepted = VhostUserFrontend.listen(lpath, { timeoutMs: 3000 });
  const cfd = native.unixConnect(lpath);
  const fe2 = await accepted;
  try {
    assert.equal(existsSync(lpath), false, "the listening socket file is removed");
    const be = new FakeBackend(cfd);
    try {
      assert.equal(await fe2.getFeatures(), NET_FEATURES);
    } finally {
      be.close();
    }
  } finally {
    fe2.close();
  }
  await assert.rejects(
    VhostUserFrontend.listen(join(dir, `vhostkit-fe-${process.pid}-c.sock`), { timeoutMs: 30 }),
    /no back-end connected/,
  );
});

test("frontend: closing after the peer hung up releases everything", async () => {
  const { fe, be } = pair();
  const ram = GuestRam.create({ size: 1 << 20 });
  await fe.negotiate({ features: WANTED });
  await fe.start(ram, [8, 8]);
  const closed = new Promise<void>((r) => fe.once("close", () => r()));
  be.close();
  await closed;
  assert.equal(fe.closed, true);
  assert.equal(fe.queue(0)?.disposed, true);
  await assert.rejects(fe.getFeatures(), /closed/);
  fe.close({ closeRam: true });
  assert.equal(ram.closed, true);
});

test("frontend: every fd and mapping is released", async () => {
  await tick(10);
  assert.equal(memfdMappings(), MAPS_AT_START);
  const leaked = [...openFds()].filter((fd) => !FDS_AT_START.has(fd));
  const describe = (fd: string): string => {
    try {
      return `${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`;
    } catch {
      return fd;
    }
  };
  // libuv may open its own epoll fd lazily: not ours.
  assert.deepEqual(
    leaked.map(describe).filter((d) => !d.includes("eventpoll")),
    [],
  );
});
