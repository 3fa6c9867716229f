/**
 * vhostkit front-end against vhostkit back-end over a real Unix socket: echo traffic on split
 * and packed rings, every handled request, memory-table replacement while rings run, ring stop
 * and restart with indices preserved, and bad input on a live connection.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureSet,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import type { Logger } from "../src/backend/device.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { VIRTQ_DESC_F_NEXT } from "../src/virtq/layout.js";
import { FRONTEND_REQUEST_SPECS, hasExplicitReply } from "../src/protocol/table.js";
import { gpa, uaddr } from "../src/memory/address.js";
import { openFds, sleep, until } from "./helpers.js";

// --- helpers -----------------------------------------------------------------------------

function describeFd(fd: string): string {
  try {
    return `${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`;
  } catch {
    return fd;
  }
}

/** Mappings in /proc/self/maps of memfds whose name starts with `name`. */
function memfdMappings(name: string): number {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => l.includes(`/memfd:${name}`)).length;
}

let socketCounter = 0;
function socketPath(): string {
  socketCounter++;
  return join(tmpdir(), `vhostkit-engines-${process.pid}-${socketCounter}.sock`);
}

/** A logger that keeps what it is told. */
class CapturingLogger implements Logger {
  readonly lines: { level: string; message: string }[] = [];
  debug(message: string): void {
    this.lines.push({ level: "debug", message });
  }
  info(message: string): void {
    this.lines.push({ level: "info", message });
  }
  warn(message: string): void {
    this.lines.push({ level: "warn", message });
  }
  error(message: string): void {
    this.lines.push({ level: "error", message });
  }
  has(level: string, re: RegExp): boolean {
    return this.lines.some((l) => l.level === level && re.test(l.message));
  }
}

/** The test device with a config space, SET_CONFIG and RARP, to exercise those requests. */
class ConfigNetDevice extends NetTestDevice {
  override readonly protocolFeatures = featureSet(ProtocolFeature.MQ, ProtocolFeature.RARP);
  readonly config = Uint8Array.from({ length: 12 }, (_, i) => 0x10 + i);
  readonly rarps: Uint8Array[] = [];
  getConfig(offset: number, size: number): Uint8Array {
    const out = new Uint8Array(size);
    out.set(this.config.subarray(offset, offset + size));
    return out;
  }
  setConfig(offset: number, data: Uint8Array): void {
    this.config.set(data, offset);
  }
  sendRarp(mac: Uint8Array): void {
    this.rarps.push(mac.slice());
  }
}

/** An Ethernet frame carrying a sequence number at offset 14 and a pattern after it. */
function frame(seq: number, len = 60 + (seq % 300)): Uint8Array {
  const f = new Uint8Array(len);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5]);
  new DataView(f.buffer).setUint32(14, seq, true);
  for (let i = 18; i < len; i++) f[i] = (i * 7 + seq) & 0xff;
  return f;
}

function seqOf(f: Uint8Array): number {
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getUint32(14, true);
}

const BASE_FEATURES = featureSet(
  VirtioFeature.VERSION_1,
  VirtioFeature.RING_EVENT_IDX,
  VirtioFeature.MAC,
  VirtioFeature.STATUS,
);

interface Pair {
  server: BackendServer;
  device: NetTestDevice;
  fe: VhostUserFrontend;
  ram: GuestRam;
  errors: VhostUserError[];
  logger: CapturingLogger;
  session: BackendSession;
  close(): void;
}

async function connectPair(
  opts: { device?: NetTestDevice; name?: string; ramSize?: number } = {},
): Promise<Pair> {
  const path = socketPath();
  const device = opts.device ?? new NetTestDevice({ mode: "echo" });
  const logger = new CapturingLogger();
  const server = serveBackend(device, { path, logger });
  const errors: VhostUserError[] = [];
  server.on("error", (e: VhostUserError) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  await until(() => server.session !== null, "the session", 3000);
  const session = server.session as BackendSession;
  const ram = GuestRam.create({ size: opts.ramSize ?? 4 << 20, name: opts.name ?? "eng" });
  return {
    server,
    device,
    fe,
    ram,
    errors,
    logger,
    session,
    close() {
      fe.close();
      server.close();
      ram.close();
    },
  };
}

/**
 * Echo frames: keep RX stocked, add TX frames while the ring and pool have room, kick once per
 * batch, collect what comes back.
 */
async function pump(
  rx: FrontendQueue,
  tx: FrontendQueue,
  frames: Uint8Array[],
  timeoutMs = 8000,
): Promise<Uint8Array[]> {
  const got: Uint8Array[] = [];
  let next = 0;
  const deadline = Date.now() + timeoutMs;
  while (got.length < frames.length) {
    if (Date.now() > deadline) {
      throw new Error(`echo: ${got.length} of ${frames.length} frames back (sent ${next})`);
    }
    const room = rx.size - rx.outstanding;
    if (room > 0) rx.postRxBuffers(room);
    let added = 0;
    while (next < frames.length && tx.addFrame(frames[next] as Uint8Array) !== null) {
      next++;
      added++;
    }
    if (added > 0) tx.kick();
    try {
      await rx.waitForUsed(200);
    } catch {
      // re-check the loop condition
    }
    got.push(...rx.receiveFrames());
    tx.reclaim();
  }
  return got;
}

function assertSameFrames(got: Uint8Array[], sent: Uint8Array[], what: string): void {
  assert.equal(got.length, sent.length, `${what}: frame count`);
  for (let i = 0; i < sent.length; i++) {
    if (Buffer.compare(got[i] as Uint8Array, sent[i] as Uint8Array) !== 0) {
      assert.fail(
        `${what}: frame ${i} differs (seq got ${seqOf(got[i] as Uint8Array)}, want ${seqOf(sent[i] as Uint8Array)})`,
      );
    }
  }
}

const FDS_AT_START = openFds();

// --- echo --------------------------------------------------------------------------------

for (const packed of [false, true]) {
  test(`engines: echo on ${packed ? "packed" : "split"} rings returns identical frames`, async () => {
    const p = await connectPair({ name: `eng-echo-${packed ? "p" : "s"}` });
    try {
      const wanted = BASE_FEATURES | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
      const n = await p.fe.negotiate({ features: wanted });
      assert.equal((n.features & featureSet(VirtioFeature.RING_PACKED)) !== 0n, packed);
      const [rx, tx] = await p.fe.start(p.ram, [128, 128]);
      assert.ok(rx && tx);
      assert.equal(tx.packed, packed);
      const frames = Array.from({ length: 600 }, (_, i) => frame(i));
      const got = await pump(rx, tx, frames);
      assertSameFrames(got, frames, "echo");
      assert.equal(p.device.counters[0]?.txPackets, 600);
      assert.equal(p.device.counters[0]?.rxPackets, 600);
      assert.ok(tx.stats.kicks < 600, `kicks are batched (kicks=${tx.stats.kicks})`);
      // multi-descriptor buffers too
      const parts = Array.from({ length: 20 }, (_, i) => frame(1000 + i, 200));
      for (const f of parts) assert.notEqual(tx.addFrame(f, 3), null);
      tx.kick();
      rx.postRxBuffers(20, 2048, 2);
      const back: Uint8Array[] = [];
      await until(
        () => {
          back.push(...rx.receiveFrames());
          return back.length >= 20;
        },
        "multi-descriptor echo",
        3000,
      );
      assertSameFrames(back, parts, "multi-descriptor echo");
      assert.deepEqual(p.errors, []);
    } finally {
      p.close();
    }
  });
}

// --- every handled request ---------------------------------------------------------------

test("engines: every request the back-end handles", async () => {
  const device = new ConfigNetDevice({ mode: "echo" });
  const p = await connectPair({ device, name: "eng-all" });
  const extra = GuestRam.create({
    regions: [{ gpa: 0x2_0000_0000, size: 64 << 10 }],
    name: "eng-all-extra",
  });
  try {
    const n = await p.fe.negotiate({ features: BASE_FEATURES });
    for (const bit of [
      ProtocolFeature.MQ,
      ProtocolFeature.REPLY_ACK,
      ProtocolFeature.BACKEND_REQ,
      ProtocolFeature.CONFIGURE_MEM_SLOTS,
      ProtocolFeature.STATUS,
      ProtocolFeature.RESET_DEVICE,
      ProtocolFeature.CONFIG,
      ProtocolFeature.RARP,
    ]) {
      assert.ok(
        (n.protocolFeatures >> BigInt(bit)) & 1n,
        `protocol feature ${ProtocolFeature[bit]}`,
      );
    }
    assert.equal(n.queueNum, 1, "GET_QUEUE_NUM reports queue pairs");
    assert.ok(n.maxMemSlots !== null && n.maxMemSlots >= 8);
    assert.equal(await p.fe.getQueueNum(), 1);
    assert.equal(await p.fe.getMaxMemSlots(), n.maxMemSlots);
    assert.equal(p.session.owned, true);
    assert.notEqual(p.fe.backendChannel, null);

    // SET_FEATURES, SET/GET_STATUS
    await p.fe.setFeatures();
    assert.equal(p.session.features, n.features);
    await p.fe.setStatus(0xb);
    assert.equal(await p.fe.getStatus(), 0xb);

    // memory by ADD_MEM_REG, then queues with the no-fd flags on the TX ring
    await p.fe.setMemTable(p.ram, { method: "add-mem-reg" });
    const rx = await p.fe.setupQueue(0, { size: 64 });
    const tx = await p.fe.setupQueue(1, { size: 64, kick: "none", call: "none", err: "none" });
    assert.equal(p.session.vrings[1]?.polling, true);
    const f1 = Array.from({ length: 50 }, (_, i) => frame(i));
    assertSameFrames(await pump(rx, tx, f1), f1, "echo over ADD_MEM_REG memory, polled TX");

    // a buffer in a region added later reaches the device
    await p.fe.addMemRegion(extra, 0);
    // the identical region again (QEMU 7.2 sends it once per queue pair) is a no-op
    const regionsBefore = p.session.stats.memoryTableUpdates;
    await p.fe.addMemRegion(extra, 0);
    assert.equal(
      p.session.stats.memoryTableUpdates,
      regionsBefore,
      "duplicate ADD_MEM_REG remaps nothing",
    );
    const g = extra.alloc(256);
    const fx = frame(4242, 100);
    const hdrAndFrame = new Uint8Array(12 + fx.length);
    hdrAndFrame.set(fx, 12);
    extra.write(g, hdrAndFrame);
    rx.postRxBuffers(4);
    assert.notEqual(tx.add([{ gpa: g, len: hdrAndFrame.length, writable: false }], "extra"), null);
    tx.kick();
    const fromExtra: Uint8Array[] = [];
    await until(
      () => {
        fromExtra.push(...rx.receiveFrames());
        return fromExtra.length === 1;
      },
      "the frame from the added region",
      3000,
    );
    assertSameFrames(fromExtra, [fx], "frame in the added region");
    await until(() => tx.getUsed()?.token === "extra", "the extra TX buffer back", 3000);
    await p.fe.removeMemRegion(extra.memoryTable()[0] as (typeof p.fe.memoryTable)[number]);
    await assert.rejects(
      p.fe.removeMemRegion(extra.memoryTable()[0] as (typeof p.fe.memoryTable)[number]),
      (e: unknown) => e instanceof VhostUserError && e.request === "REM_MEM_REG",
    );

    // GET/SET_CONFIG, SEND_RARP
    assert.deepEqual([...(await p.fe.getConfig(2, 4))], [0x12, 0x13, 0x14, 0x15]);
    await p.fe.setConfig(0, Uint8Array.of(0xaa, 0xbb));
    assert.deepEqual([...device.config.subarray(0, 3)], [0xaa, 0xbb, 0x12]);
    await p.fe.sendRarp("52:54:00:ab:cd:ef");
    assert.deepEqual([...(device.rarps[0] ?? [])], [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);

    // back-end request channel: a config change reaches the front-end
    const changed = new Promise<void>((r) => p.fe.once("config-change", () => r()));
    p.session.notifyConfigChange();
    await changed;

    // GET_VRING_BASE and restart
    const base = await p.fe.stopQueue(0);
    assert.equal(base.availIdx, rx.lastUsedIdx);
    await p.fe.restartQueue(0);
    const f2 = Array.from({ length: 30 }, (_, i) => frame(100 + i));
    assertSameFrames(await pump(rx, tx, f2), f2, "echo after restart");

    // RESET_OWNER disables every ring: TX is dropped, nothing comes back
    const droppedBefore = device.counters[0]?.dropped ?? 0;
    await p.fe.request(FrontendRequest.RESET_OWNER, null);
    assert.equal(p.session.vrings[1]?.enabled, false);
    tx.sendFrame(frame(9999));
    await until(
      () => (device.counters[0]?.dropped ?? 0) > droppedBefore,
      "the dropped frame",
      3000,
    );
    await p.fe.setVringEnable(0, true);
    await p.fe.setVringEnable(1, true);
    tx.reclaim();
    rx.receiveFrames();
    const f3 = Array.from({ length: 10 }, (_, i) => frame(200 + i));
    assertSameFrames(await pump(rx, tx, f3), f3, "echo after re-enable");

    // RESET_DEVICE: the front-end starts over on the same connection
    await p.fe.resetDevice();
    assert.equal(p.session.features, 0n);
    assert.equal(p.session.vrings[0]?.size, 0);
    const [rx2, tx2] = await p.fe.start(p.ram, [32, 32]);
    assert.ok(rx2 && tx2);
    const f4 = Array.from({ length: 40 }, (_, i) => frame(300 + i));
    assertSameFrames(await pump(rx2, tx2, f4), f4, "echo after RESET_DEVICE");
    assert.deepEqual(
      p.errors.map((e) => e.request),
      ["REM_MEM_REG"],
      "only the bad REM_MEM_REG failed",
    );
  } finally {
    p.close();
    extra.close();
  }
});

// --- memory-table replacement ------------------------------------------------------------

test("engines: memory-table replacement while the rings run (split live, packed stop/restart)", async () => {
  for (const packed of [false, true]) {
    const name = `eng-mt${packed ? "p" : "s"}`;
    const p = await connectPair({ name });
    let current = p.ram;
    try {
      await p.fe.negotiate({
        features: BASE_FEATURES | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n),
      });
      const [rx, tx] = await p.fe.start(p.ram, [128, 128]);
      assert.ok(rx && tx);
      let seq = 0;
      const batch = (n: number) => Array.from({ length: n }, () => frame(seq++));
      const f1 = batch(200);
      assertSameFrames(await pump(rx, tx, f1), f1, "before the switch");
      assert.equal(memfdMappings(name), 4, "front-end and back-end map both regions");
      for (let round = 0; round < 3; round++) {
        rx.postRxBuffers(rx.size - rx.outstanding);
        const copy = current.duplicate(`${name}-r${round}`);
        const before = p.session.stats.memoryTableUpdates;
        const old = await p.fe.replaceMemory(copy, {
          mode: packed ? "stop" : "live",
          closePrevious: true,
        });
        assert.equal(old, current);
        current = copy;
        assert.equal(p.session.stats.memoryTableUpdates, before + 1);
        // old mappings are gone on both sides; the new ones are mapped twice
        await until(() => memfdMappings(`${name}-r${round}`) === 4, "the new mappings", 3000);
        assert.equal(
          memfdMappings(`${name}-`) - memfdMappings(`${name}-r`),
          0,
          "original RAM unmapped",
        );
        if (round > 0)
          assert.equal(memfdMappings(`${name}-r${round - 1}`), 0, "previous copy unmapped");
        const f = batch(150);
        assertSameFrames(await pump(rx, tx, f), f, `after switch ${round}`);
      }
      assert.equal(p.device.counters[0]?.txPackets, seq);
      assert.equal(p.device.counters[0]?.rxPackets, seq);
      assert.deepEqual(p.errors, []);
    } finally {
      p.fe.close();
      p.server.close();
      current.close();
      p.ram.close();
    }
    assert.equal(memfdMappings(name), 0);
  }
});

// --- stop and restart -------------------------------------------------------------------------

test("engines: ring stop and restart keep indices (no frame lost or duplicated)", async () => {
  for (const packed of [false, true]) {
    const p = await connectPair({ name: `eng-sr${packed ? "p" : "s"}` });
    try {
      await p.fe.negotiate({
        features: BASE_FEATURES | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n),
      });
      const [rx, tx] = await p.fe.start(p.ram, [64, 64]);
      assert.ok(rx && tx);
      const all = Array.from({ length: 400 }, (_, i) => frame(i));
      const got: Uint8Array[] = [];
      got.push(...(await pump(rx, tx, all.slice(0, 100))));
      // 40 more frames go out while RX has fewer free buffers: some echoes wait in the device
      for (const f of all.slice(100, 140)) assert.notEqual(tx.addFrame(f), null);
      tx.kick();
      await tx.waitForUsed(3000, 40);
      tx.reclaim();
      const txBase = await p.fe.stopQueue(1);
      const rxBase = await p.fe.stopQueue(0);
      got.push(...rx.receiveFrames());
      if (!packed) {
        assert.equal(txBase.availIdx, tx.lastUsedIdx, "TX base = buffers the device consumed");
        assert.equal(rxBase.availIdx, rx.lastUsedIdx, "RX base = buffers the device filled");
        assert.equal(txBase.availIdx, 140);
      } else {
        assert.equal(typeof txBase.availWrap, "boolean");
        assert.equal(txBase.availIdx, 140 % 64, "packed TX position");
      }
      // while stopped: more frames and RX buffers are added; nothing is kicked
      for (const f of all.slice(140, 160)) assert.notEqual(tx.addFrame(f), null);
      tx.kick();
      rx.postRxBuffers(rx.size - rx.outstanding);
      const kicksWhileStopped = tx.stats.kicks;
      await sleep(20);
      assert.equal(rx.receiveFrames().length, 0, "a stopped ring is not touched");
      assert.equal(tx.stats.kicks, kicksWhileStopped);
      await p.fe.restartQueue(1);
      await p.fe.restartQueue(0);
      got.push(...(await pump(rx, tx, all.slice(160))));
      const deadline = Date.now() + 5000;
      while (got.length < all.length && Date.now() < deadline) {
        rx.postRxBuffers(rx.size - rx.outstanding);
        try {
          await rx.waitForUsed(100);
        } catch {
          // loop
        }
        got.push(...rx.receiveFrames());
      }
      await sleep(20);
      got.push(...rx.receiveFrames());
      // the device echoes in order, so every sequence number comes back once, in order
      assert.deepEqual(got.map(seqOf), all.map(seqOf), "every sequence number exactly once");
      assertSameFrames(got, all, "bytes");
      assert.deepEqual(p.errors, []);
    } finally {
      p.close();
    }
  }
});

// --- bad input on a live connection ---------------------------------------------------------

test("engines: bad input breaks only what it targets; other connections keep running", async () => {
  const bystander = await connectPair({ name: "eng-by" });
  // two queue pairs: pair 0 carries traffic, pair 1 (queues 2 and 3) takes the abuse
  const p = await connectPair({
    name: "eng-bad",
    device: new NetTestDevice({ mode: "echo", queuePairs: 2 }),
  });
  const scratch = GuestRam.create({ regions: [{ gpa: 0, size: 64 << 10 }], name: "eng-bad-small" });
  try {
    await bystander.fe.negotiate({ features: BASE_FEATURES });
    const [brx, btx] = await bystander.fe.start(bystander.ram, [64, 64]);
    assert.ok(brx && btx);
    let bseq = 0;
    const bystanderRound = async (what: string): Promise<void> => {
      const f = Array.from({ length: 30 }, () => frame(bseq++));
      assertSameFrames(await pump(brx, btx, f), f, `bystander ${what}`);
    };
    await bystanderRound("before");

    await p.fe.negotiate({ features: BASE_FEATURES });
    const [rx, tx] = await p.fe.start(p.ram, [64, 64]);
    assert.ok(rx && tx);
    let seq = 0;
    const round = async (what: string): Promise<void> => {
      const f = Array.from({ length: 30 }, () => frame(seq++));
      assertSameFrames(await pump(rx, tx, f), f, what);
    };
    await round("pair 0 before");
    const errs = (request: string): number => p.errors.filter((e) => e.request === request).length;

    // 1. ring addresses outside guest memory
    await p.fe.request(FrontendRequest.SET_VRING_NUM, { index: 2, num: 64 });
    await assert.rejects(
      p.fe.request(FrontendRequest.SET_VRING_ADDR, {
        index: 2,
        flags: 0,
        descUserAddr: 0x1000n, // a GPA, not a front-end address: outside every region
        usedUserAddr: 0x2000n,
        availUserAddr: 0x3000n,
        logGuestAddr: 0n,
      }),
      (e: unknown) => e instanceof VhostUserError && /SET_VRING_ADDR/.test(e.message),
    );
    assert.equal(errs("SET_VRING_ADDR"), 1);

    // 2. memory regions that overlap, or are larger than their fd: refused, old table kept
    const [r0, r1] = p.ram.memoryTable();
    assert.ok(r0 && r1);
    await assert.rejects(
      p.fe.request(
        FrontendRequest.SET_MEM_TABLE,
        { regions: [r0, { ...r1, guestPhysAddr: r0.guestPhysAddr + 4096n }] },
        p.ram.regionFds,
      ),
      (e: unknown) => e instanceof VhostUserError && e.request === "SET_MEM_TABLE",
    );
    await assert.rejects(
      p.fe.request(
        FrontendRequest.SET_MEM_TABLE,
        { regions: [{ ...r0, memorySize: r0.memorySize * 4n }] },
        [p.ram.regionFds[0] as number],
      ),
      (e: unknown) => e instanceof VhostUserError && e.request === "SET_MEM_TABLE",
    );
    await assert.rejects(
      p.fe.request(
        FrontendRequest.ADD_MEM_REG,
        {
          ...(scratch.memoryTable()[0] as typeof r0),
          guestPhysAddr: 0x3_0000_0000n,
          memorySize: 1n << 30n,
        },
        scratch.regionFds,
      ),
      (e: unknown) => e instanceof VhostUserError && e.request === "ADD_MEM_REG",
    );
    // a region that wraps past 2^53: refused from its description, before any mmap
    await assert.rejects(
      p.fe.request(
        FrontendRequest.SET_MEM_TABLE,
        { regions: [r0, { ...r1, guestPhysAddr: (1n << 53n) - 4096n }] },
        p.ram.regionFds,
      ),
      (e: unknown) => e instanceof VhostUserError && e.request === "SET_MEM_TABLE",
    );
    const layoutErrors = p.errors.filter((e) => e.request === "SET_MEM_TABLE");
    assert.match(layoutErrors[0]?.message ?? "", /overlaps regions\[0\]/);
    assert.match(layoutErrors[2]?.message ?? "", /wraps around \(regions\[1\]\.guest_phys_addr=/);
    assert.equal(errs("SET_MEM_TABLE"), 3);
    assert.equal(errs("ADD_MEM_REG"), 1);
    await round("pair 0 after the bad memory tables");

    // 3. kicks on rings never set up, and fds for queues that do not exist
    const stray = native.eventfd(0);
    try {
      await p.fe.request(FrontendRequest.SET_VRING_KICK, { index: 3, noFd: false }, [stray]);
      native.eventfdWrite(stray, 1);
      await until(
        () => p.logger.has("warn", /queue 3: kicked before it was set up/),
        "the warning",
        3000,
      );
      await assert.rejects(
        p.fe.request(FrontendRequest.SET_VRING_KICK, { index: 7, noFd: false }, [stray]),
        (e: unknown) => e instanceof VhostUserError && e.request === "SET_VRING_KICK",
      );
    } finally {
      native.close(stray);
    }
    assert.equal(errs("SET_VRING_KICK"), 1);
    await round("pair 0 after the stray kicks");

    // 4. a descriptor loop written into queue 3 by hand: the ring breaks, its err eventfd fires
    const q3 = await p.fe.setupQueue(3, { size: 64 });
    const broken = new Promise<number>((r) => p.fe.once("queue-error", r));
    const mem = p.ram.memory;
    const size = q3.size;
    const desc = mem.gpaToView(q3.ring.desc, size * 16);
    const dv = new DataView(desc.buffer, desc.byteOffset, desc.byteLength);
    const buf = p.ram.alloc(64);
    for (const [i, next] of [
      [0, 1],
      [1, 0],
    ] as const) {
      dv.setBigUint64(i * 16, BigInt(buf), true);
      dv.setUint32(i * 16 + 8, 64, true);
      dv.setUint16(i * 16 + 12, VIRTQ_DESC_F_NEXT, true);
      dv.setUint16(i * 16 + 14, next, true);
    }
    const availView = mem.gpaToView(q3.ring.avail, 4 + 2 * size);
    const av = new DataView(availView.buffer, availView.byteOffset, availView.byteLength);
    const idx = av.getUint16(2, true);
    av.setUint16(4 + 2 * (idx % size), 0, true);
    // ORDERING: the entry before the index, as a driver publishes.
    av.setUint16(2, (idx + 1) & 0xffff, true);
    q3.forceKick();
    assert.equal(await broken, 3, "the err eventfd of queue 3 fired");
    assert.equal(q3.stats.errors, 1);
    await until(
      () => p.logger.has("error", /queue 3: broken: .*desc\.next/),
      "the broken-ring log line",
      3000,
    );
    assert.notEqual(p.session.vrings[3]?.broken, null);
    assert.equal(p.session.vrings[1]?.broken, null);
    // the connection, the other rings and the other connection are fine
    assert.equal(p.session.closed, false);
    assert.equal(await p.fe.getQueueNum(), 2);
    await round("pair 0 after the broken ring");
    await bystanderRound("after the broken ring");
    assert.deepEqual(bystander.errors, []);
  } finally {
    p.close();
    bystander.close();
    scratch.close();
  }
});

test("engines: a call fd that is not a writable eventfd breaks its ring, not the process", async () => {
  const p = await connectPair({ name: "eng-badcall", device: new NetTestDevice({ mode: "sink" }) });
  const [r, w] = native.pipe(true);
  try {
    // no EVENT_IDX: every used batch notifies
    await p.fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
    const [rx, tx] = await p.fe.start(p.ram, [64, 64]);
    assert.ok(rx && tx);
    // the read end of a pipe as queue 1's call fd: the device's notify write fails (EBADF)
    await p.fe.request(FrontendRequest.SET_VRING_CALL, { index: 1, noFd: false }, [r]);
    assert.notEqual(tx.sendFrame(frame(1)), null);
    await until(() => p.session.vrings[1]?.broken != null, "queue 1 broken", 3000);
    assert.match(p.session.vrings[1]?.broken ?? "", /call fd/);
    assert.equal(p.session.closed, false, "the connection goes on");
    assert.equal(await p.fe.getQueueNum(), 1);
    assert.equal(p.session.vrings[0]?.broken, null, "the other ring is fine");
  } finally {
    native.close(r);
    native.close(w);
    p.close();
  }
});

// --- request gates and failure replies ----------------------------------------------------

test("engines: a gated request without its feature fails naming it; every reply comes on failure", async () => {
  const p = await connectPair({ name: "eng-gate" });
  const efd = native.eventfd(0);
  try {
    // Negotiate REPLY_ACK only: every other protocol feature gate stays shut.
    await p.fe.negotiate({
      features: BASE_FEATURES,
      protocolFeatures: featureSet(ProtocolFeature.REPLY_ACK),
      backendReq: false,
    });
    await p.fe.setFeatures();
    const failedOn = (request: string): VhostUserError | undefined =>
      p.errors.find((e) => e.request === request);

    // reply-body requests: answered with the failure body, the error names the feature
    assert.equal((await p.fe.request(FrontendRequest.GET_QUEUE_NUM, null)).payload, 0n);
    assert.equal(failedOn("GET_QUEUE_NUM")?.code, "ERR_VHOST_NOT_NEGOTIATED");
    assert.equal(failedOn("GET_QUEUE_NUM")?.value, "PROTOCOL_F_MQ");
    assert.equal((await p.fe.request(FrontendRequest.GET_MAX_MEM_SLOTS, null)).payload, 0n);
    assert.equal(failedOn("GET_MAX_MEM_SLOTS")?.value, "PROTOCOL_F_CONFIGURE_MEM_SLOTS");

    // ack requests: a failed REPLY_ACK, the fds of the refused request closed
    await assert.rejects(
      p.fe.request(FrontendRequest.RESET_DEVICE, null),
      (e: unknown) => e instanceof VhostUserError && e.code === "ERR_VHOST_REQUEST_FAILED",
    );
    assert.equal(failedOn("RESET_DEVICE")?.value, "PROTOCOL_F_RESET_DEVICE");
    const [a, b] = native.socketpair();
    try {
      await assert.rejects(p.fe.request(FrontendRequest.SET_BACKEND_REQ_FD, null, [b]));
    } finally {
      native.close(a);
      native.close(b);
    }
    assert.equal(failedOn("SET_BACKEND_REQ_FD")?.value, "PROTOCOL_F_BACKEND_REQ");

    // every request with a reply body gets one when it fails (here: by its gate)
    const answered: string[] = [];
    for (const spec of FRONTEND_REQUEST_SPECS) {
      if (spec.gate === null || spec.gate === "PROTOCOL_FEATURES") continue;
      if (!hasExplicitReply(spec, p.fe.channel.protocolFeatures)) continue;
      if (p.fe.channel.closed) break;
      const bytes = new Uint8Array(spec.size.min);
      if (spec.name === "IOTLB_MSG") bytes[25] = 3; // IOTLB_INVALIDATE
      const payload = spec.codec.decode(bytes, spec.name);
      const fds = Array.from({ length: spec.fds.min }, () => efd);
      await p.fe.request(spec.id as FrontendRequest, payload as never, fds, {
        timeoutMs: 3000,
      });
      assert.equal(failedOn(spec.name)?.code, "ERR_VHOST_NOT_NEGOTIATED", spec.name);
      answered.push(spec.name);
    }
    for (const name of [
      "IOTLB_MSG",
      "GET_CONFIG",
      "CREATE_CRYPTO_SESSION",
      "POSTCOPY_LISTEN",
      "POSTCOPY_END",
      "GET_SHARED_OBJECT",
      "SET_DEVICE_STATE_FD",
      "CHECK_DEVICE_STATE",
    ]) {
      assert.ok(answered.includes(name), `${name} answered (answered: ${answered.join(",")})`);
    }
    // the connection is still usable
    assert.equal((await p.fe.request(FrontendRequest.GET_FEATURES, null)).payload > 0n, true);
  } finally {
    native.close(efd);
    p.close();
  }
});

test("engines: SET_LOG_BASE smaller than guest memory is refused; memory beyond the log is refused while logging", async () => {
  const p = await connectPair({ name: "eng-log" });
  const extra = GuestRam.create({
    regions: [{ gpa: 0x2_0000_0000, size: 64 << 10 }],
    name: "eng-log-extra",
  });
  const logFd = native.memfdCreate("eng-log-bitmap");
  try {
    native.ftruncate(logFd, 1 << 20);
    await p.fe.negotiate({ features: BASE_FEATURES | featureSet(VirtioFeature.LOG_ALL) });
    await p.fe.setFeatures();
    await p.fe.setMemTable(p.ram);
    const end = p.session.memory()!.end;
    const needed = Math.ceil(end / 4096 / 8);

    // 1. a log of 8 bytes covers 64 pages (256 KiB): less than guest memory. Refused, naming
    // the request and the size (a write it could not cover would go unlogged).
    const value = (r: unknown): unknown => (r as { value: bigint | null }).value;
    const small = await p.fe.request(
      FrontendRequest.SET_LOG_BASE,
      { mmapSize: 8n, mmapOffset: 0n },
      [logFd],
    );
    assert.notEqual(value(small.payload), 0n, "the failure reply");
    const logErr = p.errors.find((e) => e.request === "SET_LOG_BASE");
    assert.match(logErr?.message ?? "", /guest memory ends at 0x.*mmap_size=8/);

    // 2. a log that covers guest memory is taken
    const ok = await p.fe.request(
      FrontendRequest.SET_LOG_BASE,
      { mmapSize: BigInt(needed), mmapOffset: 0n },
      [logFd],
    );
    assert.equal(value(ok.payload), 0n, p.errors.map((e) => e.message).join("; "));
    assert.notEqual(p.session.memory()!.log, null, "log attached while LOG_ALL is on");

    // 3. a region past the log's end while logging: refused, memory unchanged
    await assert.rejects(
      p.fe.addMemRegion(extra, 0),
      (e: unknown) => e instanceof VhostUserError && e.request === "ADD_MEM_REG",
    );
    const memErr = p.errors.find((e) => e.request === "ADD_MEM_REG");
    assert.match(memErr?.message ?? "", /beyond the dirty log/);
    assert.equal(p.session.memory()!.end, end, "the old memory is kept");
  } finally {
    native.close(logFd);
    p.close();
    extra.close();
  }
});

test("engines: a 5 GiB region is mapped as adjacent sub-regions of at most 2 GiB", async () => {
  const p = await connectPair({ name: "eng-big" });
  const fd = native.memfdCreate("eng-big-ram");
  const GiB = 2 ** 30;
  try {
    // sparse: ftruncate only; the few pages written below are the only ones allocated
    native.ftruncate(fd, 5 * GiB);
    await p.fe.negotiate({ features: BASE_FEATURES });
    await p.fe.setFeatures();
    const uaddrBase = 0x10_0000_0000;
    await p.fe.request(
      FrontendRequest.SET_MEM_TABLE,
      {
        regions: [
          {
            guestPhysAddr: 0n,
            memorySize: BigInt(5 * GiB),
            userspaceAddr: BigInt(uaddrBase),
            mmapOffset: 0n,
          },
        ],
      },
      [fd],
    );
    assert.deepEqual(p.errors, [], "SET_MEM_TABLE succeeded");
    const mem = p.session.memory();
    assert.ok(mem);
    assert.deepEqual(
      mem.regions.map((r) => [r.gpa / GiB, r.size / GiB, (r.uaddr - uaddrBase) / GiB]),
      [
        [0, 2, 0],
        [2, 2, 2],
        [4, 1, 4],
      ],
    );
    assert.equal(mem.end, 5 * GiB);
    assert.equal(memfdMappings("eng-big-ram"), 3, "three mappings of the memfd");
    // a copy across each sub-region boundary, and a translation in the last one
    for (const at of [2 * GiB - 3, 4 * GiB - 5]) {
      const data = Uint8Array.from({ length: 16 }, (_, i) => (at + i * 7) & 0xff);
      mem.write(gpa(at), data);
      const back = new Uint8Array(16);
      mem.read(gpa(at), back);
      assert.deepEqual([...back], [...data], `bytes across 0x${at.toString(16)}`);
    }
    assert.equal(mem.uaddrToGpa(uaddr(uaddrBase + 4.5 * GiB), 4096), 4.5 * GiB);
  } finally {
    native.close(fd);
    p.close();
  }
  await until(() => memfdMappings("eng-big-ram") === 0, "the big region unmapped", 3000);
});

test("engines: every fd is released once everything is closed", async () => {
  await sleep(20);
  const leaked = [...openFds()].filter((fd) => !FDS_AT_START.has(fd)).map(describeFd);
  assert.deepEqual(leaked, []);
  assert.equal(memfdMappings("eng"), 0);
});
