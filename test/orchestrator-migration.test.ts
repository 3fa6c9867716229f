/**
 * Live migration, front-end side: a vhostkit front-end passing sequence-numbered traffic
 * through a vhostkit back-end migrates to a second back-end over a TCP stream, with the
 * orchestrator (src/orchestrator). Checks: every transmit descriptor completes exactly once
 * across both sides, no frame is delivered twice, guest RAM hashes equal on both sides, the
 * back-end state is restored, and faults (destination killed mid-stream, stream truncated,
 * back-end refusing the state) leave the source running with its traffic going on.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import type { BackendQueue } from "../src/backend/device.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort } from "../src/net/virtio-net.js";
import {
  MigrationError,
  SectionType,
  SectionReader,
  SeqTrafficGuest,
  decodeVirtioState,
  encodeJsonSection,
  encodeSection,
  encodeVirtioState,
  migrateSource,
  receiveMigration,
} from "../src/orchestrator/index.js";
import type { IncomingResult, MigrationResult, Section } from "../src/orchestrator/index.js";
import {
  FrontendRequest,
  VirtioFeature,
  featureSet,
  hasFeature,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { encodeStreamHeader, hostStream } from "../src/migration/staged.js";
import type { QueueBase } from "../src/virtq/types.js";
import { sleep, until } from "./helpers.js";

const F_MAC = new Uint8Array([2, 0, 0, 0, 0, 0x11]);
const R_MAC = new Uint8Array([2, 0, 0, 0, 0, 0x22]);

/** fds of this process open on the destination's guest RAM memfds */
function incomingRamFds(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).includes("vhostkit-incoming")) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/** A device that keeps every frame and can save/load its counters (or refuse to load). */
class StatefulSink extends NetTestDevice {
  refuse = false;
  /** take nothing from the rings (buffers made available stay in flight) */
  hold = false;
  constructor() {
    super({ mode: "sink", keepFrames: true });
  }
  override processQueue(queue: BackendQueue): void {
    if (!this.hold) super.processQueue(queue);
  }
  saveState(): Uint8Array {
    return Buffer.from(JSON.stringify({ counters: this.counters[0] }));
  }
  loadState(data: Uint8Array): void {
    if (this.refuse) throw new Error("refusing this state");
    const j = JSON.parse(Buffer.from(data).toString()) as {
      counters: { txPackets: number; txBytes: number };
    };
    const c = this.counters[0];
    if (!c) throw new Error("no counters");
    c.txPackets = j.counters.txPackets;
    c.txBytes = j.counters.txBytes;
  }
}

function seqsOf(frames: readonly Uint8Array[]): number[] {
  // NetTestDevice keeps the frame without its virtio-net header.
  return frames
    .filter((f) => f.length >= 18 && f[12] === 0x88 && f[13] === 0xb5)
    .map((f) => Buffer.from(f.buffer, f.byteOffset, f.length).readUInt32BE(14));
}

async function startFrontend(
  path: string,
  memBytes = 4 << 20,
  packed = false,
): Promise<{ fe: VhostUserFrontend; ram: GuestRam }> {
  const fe = await VhostUserFrontend.connect(path);
  await fe.negotiate(
    packed ? { features: featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_PACKED) } : {},
  );
  const ram = GuestRam.create({ size: memBytes });
  await fe.start(ram, [256, 256]);
  // Guest data that is not zero, so the stream carries real pages (1.5 MiB).
  const data = ram.alloc(1536 << 10, 4096);
  const bytes = new Uint8Array(1536 << 10);
  let x = 12345;
  for (let i = 0; i < bytes.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    bytes[i] = x >>> 24;
  }
  ram.write(data, bytes);
  return { fe, ram };
}

/** A TCP listener that hands its first connection to `onConn`. */
async function listen(onConn: (s: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer({ noDelay: true }, onConn);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, port: (server.address() as AddressInfo).port };
}

/** A destination receiving one migration into the pair's B back-end. */
interface Destination {
  server: Server;
  port: number;
  /** how receiveMigration ended in error, or null while it has not */
  error(): unknown;
  /** how many times it connected to its back-end */
  backendConnects(): number;
}

/**
 * Listen for the source's stream and run receiveMigration on it, keeping its error.
 * @param p the pair (B's socket is the destination back-end)
 * @param hook called with the stream first (e.g. to kill it mid-way)
 */
async function listenDestination(p: Pair, hook?: (s: Socket) => void): Promise<Destination> {
  let error: unknown = null;
  let connects = 0;
  const l = await listen((s) => {
    hook?.(s);
    receiveMigration({
      stream: s,
      connectBackend: () => {
        connects++;
        return VhostUserFrontend.connect(join(p.dir, "b.sock"));
      },
    }).catch((e: unknown) => {
      error = e;
    });
  });
  return { ...l, error: () => error, backendConnects: () => connects };
}

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
    s.once("error", reject);
  });
}

function assertExactlyOnce(seqs: number[], total: number, what: string): void {
  const sorted = seqs.slice().sort((a, b) => a - b);
  assert.equal(sorted.length, total, `${what}: ${sorted.length} completions for ${total} frames`);
  sorted.forEach((s, i) => assert.equal(s, i, `${what}: sequence ${i} missing or repeated`));
}

test("migration between two vhostkit switches: descriptors exactly once, RAM identical", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-orch-"));
  const swA = new Switch();
  const swB = new Switch();
  const ports: VhostUserPort[] = [];
  const fes: VhostUserFrontend[] = [];
  const rams: GuestRam[] = [];
  const gens: SeqTrafficGuest[] = [];
  let server: Server | null = null;
  try {
    const pA = addVhostUserPort(swA, { path: join(dir, "a.sock"), name: "a-vm" });
    const pB = addVhostUserPort(swB, { path: join(dir, "b.sock"), name: "b-vm" });
    const rA = addVhostUserPort(swA, { path: join(dir, "ra.sock"), name: "a-peer" });
    const rB = addVhostUserPort(swB, { path: join(dir, "rb.sock"), name: "b-peer" });
    ports.push(pA, pB, rA, rB);
    // The peers: front-ends that only receive.
    const peers = [];
    for (const p of ["ra.sock", "rb.sock"]) {
      const x = await startFrontend(join(dir, p));
      fes.push(x.fe);
      rams.push(x.ram);
      const g = new SeqTrafficGuest(x.fe, { limit: 0, record: true, srcMac: R_MAC });
      g.start();
      gens.push(g);
      peers.push(g);
    }
    const [peerA, peerB] = peers as [SeqTrafficGuest, SeqTrafficGuest];
    const src = await startFrontend(join(dir, "a.sock"));
    fes.push(src.fe);
    rams.push(src.ram);
    // No limit: the source sends until it is paused at the stop, however long pre-copy takes,
    // so that the destination always has frames left to send.
    const gen = new SeqTrafficGuest(src.fe, {
      dstMac: R_MAC,
      srcMac: F_MAC,
      burst: 16,
      record: true,
    });
    gen.start();
    gens.push(gen);
    await until(() => peerA.received > 200, "traffic on the source", 8000);

    let incoming: Promise<IncomingResult> | null = null;
    const l = await listen((s) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(dir, "b.sock")),
      });
    });
    server = l.server;
    const phases = new Set<string>();
    const res: MigrationResult = await migrateSource({
      frontend: src.fe,
      stream: await connect(l.port),
      guest: gen,
      deviceFields: F_MAC,
      verifyMemory: true,
      onProgress: (p) => phases.add(p.phase),
    });
    gen.stop();
    assert.ok(incoming !== null);
    const dst = await (incoming as Promise<IncomingResult>);
    fes.push(dst.frontend);
    rams.push(dst.ram);
    assert.equal(dst.memoryVerified, true, "destination checked the RAM hash");
    assert.ok(res.memoryHash !== null && res.memoryHash.length === 64);
    assert.ok(res.iterations >= 2, `iterations ${res.iterations}`);
    assert.ok(res.pagesSent >= src.ram.size / 4096, "the bulk pass sent every page");
    assert.ok(res.downtimeMs > 0 && res.downtimeMs < res.totalMs);
    const hasState = typeof (pA.device as { saveState?: unknown }).saveState === "function";
    assert.equal(hasState, true, "the switch port's device keeps a state (saveState)");
    assert.equal(res.deviceStateTransferred, true, "port state travels");
    {
      // The switch port's counters went along (B has since taken the re-posted pending
      // buffers, at most a ring's worth, and may count the RARP frame it broadcast).
      const stA = swA.stats().ports.find((x) => x.name === "a-vm");
      const stB = swB.stats().ports.find((x) => x.name === "b-vm");
      assert.ok(stA && stB);
      assert.ok(stA.counters.rxPackets > 200);
      assert.ok(
        stB.counters.rxPackets >= stA.counters.rxPackets &&
          stB.counters.rxPackets <= stA.counters.rxPackets + 1 + 256,
        `B rx ${stB.counters.rxPackets}, A rx ${stA.counters.rxPackets}`,
      );
    }
    assert.deepEqual([...phases].sort(), ["done", "precopy", "setup", "stop", "switchover"]);
    // RARP: the driver lacks GUEST_ANNOUNCE, the switch offers RARP: switch B learnt the MAC.
    assert.equal(dst.rarpSent, true);
    const macB = swB.macTable().find((m) => m.mac === "02:00:00:00:00:11");
    assert.equal(macB?.port, "b-vm", "switch B maps the migrated MAC to its port");

    assert.ok(dst.guestState !== null);
    const gen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState);
    gen2.start();
    gens.push(gen2);
    const target = gen.nextSeq + 1000;
    await until(
      () => gen2.completed > 0 && gen2.nextSeq >= target,
      "the destination sent 1000 more",
      8000,
    );
    gen2.stop();
    await until(() => gen2.drain() === 0, "the destination drained", 8000);
    const total = gen2.nextSeq;
    await until(() => peerA.received + peerB.received >= total - 256, "the peers received", 4000);
    // Descriptors: each sequence number completed exactly once, on one side or the other.
    assertExactlyOnce([...gen.completedSeqs, ...gen2.completedSeqs], total, "TX completions");
    assert.ok(gen2.completedSeqs.length > 0 && gen.completedSeqs.length > 0);
    // Frames: never delivered twice; frames dropped by the disabled ring at stop are few.
    const got = [...peerA.receivedSeqs, ...peerB.receivedSeqs];
    assert.equal(new Set(got).size, got.length, "no frame delivered twice");
    assert.ok(got.every((s) => s < total));
    assert.ok(got.length >= total - 256, `delivered ${got.length} of ${total}`);
    assert.ok(peerB.received > 0, "traffic reached the peer on switch B");
    assert.equal(src.fe.closed, true, "the source released its back-end connection");
  } finally {
    for (const g of gens) g.stop();
    server?.close();
    for (const fe of fes) fe.close();
    for (const r of rams) r.close();
    for (const p of ports) p.close();
    swA.close();
    swB.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

interface Pair {
  dir: string;
  devA: StatefulSink;
  devB: StatefulSink;
  srvA: BackendServer;
  srvB: BackendServer;
  fe: VhostUserFrontend;
  ram: GuestRam;
  gen: SeqTrafficGuest;
  close(): void;
}

async function statefulPair(packed = false): Promise<Pair> {
  const dir = mkdtempSync(join(tmpdir(), "vk-orch-"));
  const devA = new StatefulSink();
  const devB = new StatefulSink();
  const srvA = serveBackend(devA, { path: join(dir, "a.sock") });
  const srvB = serveBackend(devB, { path: join(dir, "b.sock") });
  // CHECK_DEVICE_STATE failures are reported as server errors too.
  const errors: Error[] = [];
  srvA.on("error", (e: Error) => errors.push(e));
  srvB.on("error", (e: Error) => errors.push(e));
  const { fe, ram } = await startFrontend(join(dir, "a.sock"), 4 << 20, packed);
  const gen = new SeqTrafficGuest(fe, { rxQueue: null, record: true, burst: 8 });
  gen.start();
  return {
    dir,
    devA,
    devB,
    srvA,
    srvB,
    fe,
    ram,
    gen,
    close() {
      gen.stop();
      fe.close();
      ram.close();
      srvA.close();
      srvB.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

for (const packed of [false, true]) {
  test(`device state moves through SET_DEVICE_STATE_FD; frames exactly once across sinks (${packed ? "packed" : "split"})`, async () => {
    const p = await statefulPair(packed);
    let server: Server | null = null;
    let dst: IncomingResult | null = null;
    let stopLater: SeqTrafficGuest | null = null;
    try {
      assert.equal(p.fe.queue(1)?.packed, packed);
      await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 300, "traffic", 8000);
      let incoming: Promise<IncomingResult> | null = null;
      const l = await listen((s) => {
        incoming = receiveMigration({
          stream: s,
          connectBackend: () => VhostUserFrontend.connect(join(p.dir, "b.sock")),
        });
      });
      server = l.server;
      const srcTx = p.fe.queue(1);
      const txA = (): number => p.devA.counters[0]?.txPackets ?? 0;
      // Packed: at the pause, A stops taking buffers (at a ring position other than the
      // initial one) and the guest makes 16 more available, so that they are in flight at the
      // stop; the destination must take them from the source's ring position.
      const holdingGuest = {
        pause: async (): Promise<void> => {
          p.devA.hold = true;
          while (txA() % 512 === 0) {
            p.devA.hold = false;
            const n = txA();
            await until(() => txA() > n, "A moves off the initial ring position", 8000);
            p.devA.hold = true;
          }
          const n0 = p.gen.nextSeq;
          await until(() => p.gen.nextSeq >= n0 + 16, "buffers in flight while A holds", 8000);
          p.gen.pause();
        },
        resume: (): void => p.gen.resume(),
        saveState: (): Uint8Array => p.gen.saveState(),
      };
      const res = await migrateSource({
        frontend: p.fe,
        stream: await connect(l.port),
        guest: packed ? holdingGuest : p.gen,
        verifyMemory: true,
      });
      p.gen.stop();
      dst = await (incoming as unknown as Promise<IncomingResult>);
      if (packed) {
        // The ring continues where the source stopped: B got SET_VRING_BASE with what A's
        // GET_VRING_BASE returned (avail idx + wrap, used idx + wrap), not the initial position.
        const srcBase = srcTx?.stoppedBase ?? null;
        const dstSetBase: QueueBase | null = p.srvB.session?.vrings[1]?.base ?? null;
        assert.ok(srcBase !== null && dstSetBase !== null);
        assert.deepEqual(dstSetBase, srcBase, "SET_VRING_BASE on B = GET_VRING_BASE on A");
        assert.notDeepEqual(
          srcBase,
          { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true },
          "the ring stopped away from its initial position",
        );
        assert.equal(srcBase.availIdx, txA() % 256, "A's position is the frames it took");
        assert.equal(srcBase.availWrap, Math.floor(txA() / 256) % 2 === 0);
        const dstTx = dst.queues.find((q) => q.index === 1);
        assert.ok(
          (dstTx?.outstanding ?? 0) >= 16,
          `buffers in flight at the stop: ${dstTx?.outstanding ?? 0}`,
        );
      }
      assert.equal(res.deviceStateTransferred, true);
      assert.ok(res.backendStateBytes > 10);
      assert.equal(dst.backendStateBytes, res.backendStateBytes);
      const atStop = p.devA.counters[0]?.txPackets ?? -1;
      // B loaded A's counters before its rings started; it may have taken the re-posted
      // buffers since (checked exactly at the end).
      assert.ok((p.devB.counters[0]?.txPackets ?? 0) >= atStop, "counters restored on B");
      const gen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState ?? new Uint8Array());
      stopLater = gen2;
      gen2.start();
      const target = p.gen.nextSeq + 500;
      await until(() => gen2.completed > 0 && gen2.nextSeq >= target, "more traffic on B", 8000);
      gen2.stop();
      await until(() => gen2.drain() === 0, "B drained", 8000);
      const sent = gen2.nextSeq;
      assertExactlyOnce([...p.gen.completedSeqs, ...gen2.completedSeqs], sent, "TX completions");
      // The sinks saw every frame once (no ring was disabled with frames pending: sinks drop
      // nothing while enabled, and a frame dropped at the stop would show up as a gap here).
      const seen = [...seqsOf(p.devA.frames), ...seqsOf(p.devB.frames)];
      assert.equal(new Set(seen).size, seen.length, "no frame processed twice");
      assert.ok(seen.length >= sent - 256, `sinks saw ${seen.length} of ${sent}`);
      assert.equal(
        p.devB.counters[0]?.txPackets,
        atStop + seqsOf(p.devB.frames).length,
        "B's counter continues from A's",
      );
      if (packed) {
        // The frames in flight at the stop went out once, through B, right after A's last one.
        const onA = seqsOf(p.devA.frames);
        const onB = seqsOf(p.devB.frames);
        assert.equal(onB[0], onA.length, "B starts with the first frame A had not taken");
        assert.deepEqual(
          [...onA, ...onB],
          Array.from({ length: onA.length + onB.length }, (_, i) => i),
          "every frame once, in order, across A and B",
        );
      }
    } finally {
      stopLater?.stop();
      server?.close();
      dst?.frontend.close();
      dst?.ram.close();
      p.close();
    }
  });
}

for (const packed of [false, true]) {
  test(`a device whose transmit ring runs in a worker thread migrates with dirty logging on: RAM identical, frames exactly once (${packed ? "packed" : "split"})`, async () => {
    const dir = mkdtempSync(join(tmpdir(), "vk-orch-w-"));
    const devA = new NetTestDevice({ mode: "sink", workerQueues: true });
    const devB = new NetTestDevice({ mode: "sink", workerQueues: true });
    const srvA = serveBackend(devA, { path: join(dir, "a.sock") });
    const srvB = serveBackend(devB, { path: join(dir, "b.sock") });
    const { fe, ram } = await startFrontend(join(dir, "a.sock"), 4 << 20, packed);
    const gen = new SeqTrafficGuest(fe, { rxQueue: null, record: true, burst: 8 });
    let gen2: SeqTrafficGuest | null = null;
    let server: Server | null = null;
    let dst: IncomingResult | null = null;
    try {
      gen.start();
      await until(() => devA.totalTx > 300, "traffic on A", 8000);
      assert.notEqual(srvA.session?.vrings[1]?.worker ?? null, null, "A's TX ring is a worker");
      let incoming: Promise<IncomingResult> | null = null;
      const l = await listen((s) => {
        incoming = receiveMigration({
          stream: s,
          connectBackend: () => VhostUserFrontend.connect(join(dir, "b.sock")),
        });
      });
      server = l.server;
      // The worker keeps taking frames through every pre-copy pass, with LOG_ALL on (its marks
      // are checked page by page in test/migration-dirty-log).
      const res = await migrateSource({
        frontend: fe,
        stream: await connect(l.port),
        guest: gen,
        verifyMemory: true,
      });
      gen.stop();
      dst = await (incoming as unknown as Promise<IncomingResult>);
      assert.equal(dst.memoryVerified, true, "destination RAM = source RAM (hash)");
      assert.ok(res.iterations >= 2, `iterations ${res.iterations}`);
      assert.equal(res.deviceStateTransferred, false, "NetTestDevice has no device state");
      const atStop = devA.totalTx;
      gen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState ?? new Uint8Array());
      gen2.start();
      const target = gen.nextSeq + 500;
      const g2 = gen2;
      await until(() => g2.completed > 0 && g2.nextSeq >= target, "more traffic on B", 8000);
      assert.notEqual(srvB.session?.vrings[1]?.worker ?? null, null, "B's TX ring is a worker");
      gen2.stop();
      await until(() => g2.drain() === 0, "B drained", 8000);
      const sent = gen2.nextSeq;
      assertExactlyOnce([...gen.completedSeqs, ...gen2.completedSeqs], sent, "TX completions");
      assert.equal(devA.totalTx, atStop, "A took nothing after the stop");
      assert.equal(atStop + devB.totalTx, sent, "every frame taken once, by A or by B");
    } finally {
      gen.stop();
      gen2?.stop();
      server?.close();
      dst?.frontend.close();
      dst?.ram.close();
      fe.close();
      ram.close();
      srvA.close();
      srvB.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

async function expectResumed(p: Pair, err: unknown): Promise<void> {
  assert.ok(err instanceof MigrationError, `MigrationError expected, got ${String(err)}`);
  assert.equal(err.sourceResumed, true);
  assert.equal(p.fe.closed, false);
  const before = p.devA.counters[0]?.txPackets ?? 0;
  const seqBefore = p.gen.nextSeq;
  await until(
    () => (p.devA.counters[0]?.txPackets ?? 0) > before + 100,
    "traffic continues on the source",
    8000,
  );
  assert.ok(p.gen.nextSeq > seqBefore);
  p.gen.stop();
  await until(() => p.gen.drain() === 0, "source drained", 4000);
  assertExactlyOnce(p.gen.completedSeqs, p.gen.nextSeq, "TX completions after a failed migration");
}

test("fault: the destination dies mid-stream; the source resumes", async () => {
  const p = await statefulPair();
  let server: Server | null = null;
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    const l = await listen((s) => {
      // A destination that answers HELLO, takes some pages, then dies.
      let got = 0;
      s.write(
        encodeJsonSection(SectionType.HELLO, {
          offeredFeatures: (~0n & 0xffff_ffff_ffffn).toString(),
          protocolFeatures: "0",
          deviceState: false,
        }),
      );
      s.on("data", (c: Buffer) => {
        got += c.length;
        if (got > 512 << 10) s.destroy();
      });
    });
    server = l.server;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
      helloTimeoutMs: 3000,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    await expectResumed(p, err);
  } finally {
    server?.close();
    p.close();
  }
});

test("fault: the destination really killed mid-stream (receiveMigration aborted)", async () => {
  const p = await statefulPair();
  let server: Server | null = null;
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    const l = await listenDestination(p, (s) => {
      let got = 0;
      s.on("data", (c: Buffer) => {
        got += c.length;
        if (got > 1 << 20) s.destroy(); // the process holding it dies
      });
    });
    const destErr = l.error;
    server = l.server;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    await until(() => destErr() !== null, "destination gave up", 8000);
    await expectResumed(p, err);
    assert.equal(p.devB.counters[0]?.txPackets ?? 0, 0, "the destination never ran");
  } finally {
    server?.close();
    p.close();
  }
});

test("fault: the source back-end dies during pre-copy; the migration fails, the destination releases everything", async () => {
  const p = await statefulPair();
  let server: Server | null = null;
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    const l = await listenDestination(p);
    const destErr = l.error;
    server = l.server;
    let killed = false;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
      onProgress: (pr) => {
        if (pr.phase === "precopy" && !killed) {
          // The back-end process goes away while pages stream: its writes since the last
          // log sync are lost to the log, so nothing may switch over.
          killed = true;
          p.srvA.close();
        }
      },
    }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.equal(killed, true, "the back-end was killed during pre-copy");
    assert.ok(err instanceof MigrationError, `MigrationError expected, got ${String(err)}`);
    assert.equal(err.sourceResumed, false, "no back-end left to resume");
    assert.match(err.message, /during precopy/, err.message);
    await until(() => destErr() !== null, "destination gave up", 8000);
    assert.equal(incomingRamFds(), 0, "the destination closed its guest RAM");
    assert.equal(p.devB.counters[0]?.txPackets ?? 0, 0, "the destination never ran");
  } finally {
    server?.close();
    p.close();
  }
});

test("fault: the stream is truncated; the destination releases everything, the source resumes", async () => {
  const p = await statefulPair();
  let proxy: Server | null = null;
  let server: Server | null = null;
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    const d = await listenDestination(p);
    const destErr = d.error;
    server = d.server;
    // A proxy that forwards 300 KiB of the source's stream, then ends the destination's side.
    const pr = await listen((up) => {
      void connect(d.port).then((down) => {
        let sent = 0;
        let cut = false;
        up.on("data", (c: Buffer) => {
          if (cut) return;
          const room = (300 << 10) - sent;
          if (c.length >= room) {
            down.end(c.subarray(0, room));
            cut = true;
          } else {
            down.write(c);
          }
          sent += c.length;
        });
        down.on("data", (c: Buffer) => up.write(c));
        down.on("close", () => up.destroy());
      });
    });
    proxy = pr.server;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(pr.port),
      guest: p.gen,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    await until(() => destErr() !== null, "destination gave up", 8000);
    assert.match(String(destErr()), /truncated/);
    assert.equal(incomingRamFds(), 0, "the destination closed its guest RAM");
    await expectResumed(p, err);
  } finally {
    proxy?.close();
    server?.close();
    p.close();
  }
});

test("fault: the destination back-end refuses the state; the source resumes", async () => {
  const p = await statefulPair();
  let server: Server | null = null;
  try {
    p.devB.refuse = true;
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    const l = await listenDestination(p);
    const destErr = l.error;
    server = l.server;
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof MigrationError);
    assert.match(err.message, /CHECK_DEVICE_STATE|destination failed/);
    await until(() => destErr() !== null, "destination gave up", 8000);
    assert.match(String(destErr()), /CHECK_DEVICE_STATE/);
    assert.equal(incomingRamFds(), 0, "the destination closed its guest RAM");
    await expectResumed(p, err);
  } finally {
    server?.close();
    p.close();
  }
});

/** fds of this process open on a front-end dirty-log memfd */
function dirtyLogFds(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).includes("vhostkit-dirty-log")) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/**
 * Migrate `p` to a real destination on b.sock; `hook` runs with the destination's accepted
 * socket so a test can make the destination fail at a chosen point.
 */
async function migrateWithHook(
  p: Pair,
  hook: (dest: Socket) => void,
): Promise<{ err: unknown; destErr: () => unknown }> {
  const l = await listenDestination(p, hook);
  const destErr = l.error;
  try {
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(l.port),
      guest: p.gen,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    await until(() => destErr() !== null, "destination gave up", 8000);
    return { err, destErr };
  } finally {
    l.server.close();
  }
}

/** Send FAIL to the source from the destination's socket, then hang up. */
function destinationFails(dest: Socket): void {
  dest.write(encodeJsonSection(SectionType.FAIL, { error: "injected" }));
  setTimeout(() => dest.destroy(), 20);
}

test("fault: the destination FAILs while the source starts dirty logging; logging really ends", async () => {
  const p = await statefulPair();
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    let dest: Socket | null = null;
    let injected = false;
    const orig = p.fe.request.bind(p.fe);
    p.fe.request = ((...args: Parameters<typeof orig>) => {
      if (args[0] === FrontendRequest.SET_LOG_BASE && dest !== null && !injected) {
        injected = true;
        destinationFails(dest);
        // the source sees the FAIL while SET_LOG_BASE is still on its way
        return sleep(100).then(() => orig(...args));
      }
      return orig(...args);
    }) as typeof orig;
    const { err } = await migrateWithHook(p, (s) => {
      dest = s;
    });
    assert.equal(injected, true, "the FAIL came during SET_LOG_BASE");
    assert.ok(err instanceof MigrationError, String(err));
    assert.match(err.message, /injected/);
    await sleep(200); // nothing may still be running behind the rollback
    assert.equal(hasFeature(p.fe.features, VirtioFeature.LOG_ALL), false, "LOG_ALL is off");
    assert.equal(dirtyLogFds(), 0, "the dirty log memfd is closed");
    assert.equal(incomingRamFds(), 0, "the destination closed its guest RAM");
    await expectResumed(p, err);
  } finally {
    p.close();
  }
});

test("fault: the destination FAILs while the source stops its rings; the rings really restart", async () => {
  const p = await statefulPair();
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    let dest: Socket | null = null;
    let injected = false;
    const orig = p.fe.request.bind(p.fe);
    p.fe.request = ((...args: Parameters<typeof orig>) => {
      const [request, payload] = args;
      if (
        request === FrontendRequest.SET_VRING_ENABLE &&
        (payload as { num: number }).num === 0 &&
        dest !== null &&
        !injected
      ) {
        injected = true;
        // Written now (the wire order stays), answered to the source only after the FAIL:
        // the source sees the FAIL while SET_VRING_ENABLE 0 / GET_VRING_BASE are on their way.
        const reply = orig(...args);
        destinationFails(dest);
        return sleep(100).then(() => reply);
      }
      return orig(...args);
    }) as typeof orig;
    const { err } = await migrateWithHook(p, (s) => {
      dest = s;
    });
    assert.equal(injected, true, "the FAIL came during the stop");
    assert.ok(err instanceof MigrationError, String(err));
    assert.equal(err.phase, "stop");
    await sleep(200);
    for (const [index, q] of p.fe.queues) assert.equal(q.stopped, false, `queue ${index} runs`);
    assert.equal(hasFeature(p.fe.features, VirtioFeature.LOG_ALL), false, "LOG_ALL is off");
    assert.equal(dirtyLogFds(), 0, "the dirty log memfd is closed");
    await expectResumed(p, err);
  } finally {
    p.close();
  }
});

/** A proxy from the source to a destination that rewrites sections on the way. */
async function tamperingProxy(
  destPort: number,
  rewrite: (s: Section) => Section,
): Promise<{ server: Server; port: number }> {
  return listen((up) => {
    up.on("error", () => undefined);
    void connect(destPort).then(async (down) => {
      down.on("error", () => undefined);
      down.on("data", (c: Buffer) => {
        if (!up.destroyed) up.write(c);
      });
      down.on("close", () => up.destroy());
      up.on("close", () => down.destroy());
      const r = new SectionReader(up);
      try {
        await r.header();
        down.write(encodeStreamHeader(hostStream, 1, 1));
        for (;;) {
          const s = rewrite(await r.next());
          down.write(encodeSection(s.type, s.payload));
        }
      } catch {
        down.end();
      }
    });
  });
}

function rewriteJson(s: Section, type: SectionType, f: (v: unknown) => unknown): Section {
  if (s.type !== type) return s;
  const v: unknown = JSON.parse(Buffer.from(s.payload).toString("utf8"));
  return { type, payload: Buffer.from(JSON.stringify(f(v)) ?? "null", "utf8") };
}

type Json = Record<string, unknown> & { queues: Record<string, unknown>[] };

/** Migrate through a tampering proxy; the destination must fail naming `field`. */
async function tamperedMigration(
  p: Pair,
  rewrite: (s: Section) => Section,
  field: string | RegExp,
): Promise<void> {
  const d = await listenDestination(p);
  const pr = await tamperingProxy(d.port, rewrite);
  try {
    const err = await migrateSource({
      frontend: p.fe,
      stream: await connect(pr.port),
      guest: p.gen,
    }).then(
      () => null,
      (e: unknown) => e,
    );
    await until(() => d.error() !== null, "destination gave up", 8000);
    const destErr = d.error();
    assert.ok(destErr instanceof VhostUserError, `field error expected, got ${String(destErr)}`);
    if (typeof field === "string") assert.equal(destErr.field, field, destErr.message);
    else assert.match(destErr.field ?? "", field, destErr.message);
    assert.ok(d.backendConnects() <= 1);
    await until(() => p.srvB.session === null, "destination released its back-end", 4000).catch(
      () => undefined,
    );
    assert.equal(incomingRamFds(), 0, "the destination closed its guest RAM");
    assert.ok(err instanceof MigrationError, String(err));
    assert.match(err.message, /destination failed|connection closed|truncated/);
    await expectResumed(p, err);
  } finally {
    pr.server.close();
    d.server.close();
  }
}

const malformed: {
  name: string;
  field: string | RegExp;
  rewrite: (s: Section) => Section;
}[] = [
  {
    name: "SETUP asks for 128 GiB",
    field: "SETUP.regions[0].size",
    rewrite: (s) =>
      rewriteJson(s, SectionType.SETUP, (v) => {
        const j = v as { regions: { size: number }[] };
        (j.regions[0] as { size: number }).size = 2 ** 37;
        return j;
      }),
  },
  {
    name: "SETUP has 33 regions",
    field: "SETUP.regions.length",
    rewrite: (s) =>
      rewriteJson(s, SectionType.SETUP, (v) => {
        const j = v as { regions: { gpa: number; size: number; uaddr: number }[] };
        j.regions = Array.from({ length: 33 }, (_, i) => ({
          gpa: i * 4096,
          size: 4096,
          uaddr: 0,
        }));
        return j;
      }),
  },
  {
    name: "SETUP features are not a number",
    field: "SETUP.features",
    rewrite: (s) => rewriteJson(s, SectionType.SETUP, (v) => ({ ...(v as Json), features: "x" })),
  },
  {
    name: "SETUP features the destination back-end lacks",
    field: "features",
    rewrite: (s) =>
      rewriteJson(s, SectionType.SETUP, (v) => {
        const j = v as { features: string };
        return { ...j, features: (BigInt(j.features) | (1n << 55n)).toString() };
      }),
  },
  {
    name: "DRIVER_STATE is null",
    field: "DRIVER_STATE",
    rewrite: (s) => rewriteJson(s, SectionType.DRIVER_STATE, () => null),
  },
  {
    name: "DRIVER_STATE ring.avail disagrees with the virtio state",
    field: /^DRIVER_STATE\.queue\[\d\]\.ring\.avail$/,
    rewrite: (s) =>
      rewriteJson(s, SectionType.DRIVER_STATE, (v) => {
        const j = v as Json;
        const q = j.queues[0] as { ring: { avail: number } };
        q.ring.avail += 4096;
        return j;
      }),
  },
  {
    name: "DRIVER_STATE lastUsedIdx is a string",
    field: /^DRIVER_STATE\.queue\[\d\]\.lastUsedIdx$/,
    rewrite: (s) =>
      rewriteJson(s, SectionType.DRIVER_STATE, (v) => {
        const j = v as Json;
        (j.queues[0] as { lastUsedIdx: unknown }).lastUsedIdx = "7";
        return j;
      }),
  },
  {
    name: "DRIVER_STATE pool outside guest RAM",
    field: /^DRIVER_STATE\.queue\[\d\]\.pool$/,
    rewrite: (s) =>
      rewriteJson(s, SectionType.DRIVER_STATE, (v) => {
        const j = v as Json;
        (j.queues[0] as { pool: unknown }).pool = 2 ** 40;
        return j;
      }),
  },
  {
    name: "DRIVER_STATE allocator not a list",
    field: "DRIVER_STATE.allocator",
    rewrite: (s) =>
      rewriteJson(s, SectionType.DRIVER_STATE, (v) => ({ ...(v as Json), allocator: 5 })),
  },
];

for (const c of malformed) {
  test(`fault: malformed stream (${c.name}); the destination fails naming the field`, async () => {
    const p = await statefulPair();
    try {
      await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
      await tamperedMigration(p, c.rewrite, c.field);
    } finally {
      p.close();
    }
  });
}

test("fault: packed ring with buffers in flight in the source back-end is refused", async () => {
  const p = await statefulPair(true);
  try {
    await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
    await tamperedMigration(
      p,
      (s) => {
        if (s.type !== SectionType.VIRTIO_STATE) return s;
        const vs = decodeVirtioState(s.payload);
        const q = vs.queues.find((x) => x.index === 1);
        assert.ok(q);
        const availWrap = q.availWrap ?? true;
        const halfMissing = q.usedIdx === 0 && q.usedWrap === false;
        // the device's used position as the destination reads it, stated explicitly ...
        q.usedIdx = halfMissing ? q.lastAvailIdx : q.usedIdx;
        q.usedWrap = halfMissing ? availWrap : (q.usedWrap ?? true);
        // ... and an avail position one buffer ahead of it: popped and not used at the stop
        if (q.lastAvailIdx + 1 < q.size) q.lastAvailIdx += 1;
        else {
          q.lastAvailIdx = 0;
          q.availWrap = !availWrap;
        }
        // keep the driver's view consistent with the used half, so that only the in-flight
        // check can refuse it
        return { type: s.type, payload: encodeVirtioState(vs) };
      },
      // A ring stopped at position 0 with wrap 0 cannot state its used half explicitly (0/0
      // reads as "used = avail", DPDK's form): the driver check refuses it first then.
      /^queue\[1\]\.(lastAvailIdx|usedIdx)$/,
    );
  } finally {
    p.close();
  }
});

/** A fake destination that answers with `hello` (or nothing) and never acknowledges. */
async function fakeDestination(
  hello: unknown,
): Promise<{ server: Server; port: number; conns: Socket[] }> {
  const conns: Socket[] = [];
  const l = await listen((s) => {
    conns.push(s);
    s.on("error", () => undefined);
    s.on("data", () => undefined);
    if (hello !== null) s.write(encodeJsonSection(SectionType.HELLO, hello));
  });
  return { ...l, conns };
}

const ALL_FEATURES = (2n ** 64n - 1n).toString();

for (const c of [
  {
    name: "a destination back-end lacking features",
    hello: { offeredFeatures: "1", protocolFeatures: "0", deviceState: false },
    match: /lacks features/,
    phase: "setup",
  },
  {
    name: "a malformed HELLO",
    hello: { offeredFeatures: 5, protocolFeatures: "0", deviceState: false },
    match: /HELLO\.offeredFeatures/,
    phase: "setup",
  },
  {
    name: "no HELLO (timeout)",
    hello: null,
    match: /no HELLO from the destination/,
    phase: "setup",
  },
  {
    name: "no ITERATION_ACK (timeout)",
    hello: { offeredFeatures: ALL_FEATURES, protocolFeatures: "0", deviceState: false },
    match: /no ITERATION_ACK 1 from the destination/,
    phase: "precopy",
  },
]) {
  test(`fault: ${c.name}; the source resumes`, async () => {
    const p = await statefulPair();
    const d = await fakeDestination(c.hello);
    try {
      await until(() => (p.devA.counters[0]?.txPackets ?? 0) > 100, "traffic", 8000);
      const err = await migrateSource({
        frontend: p.fe,
        stream: await connect(d.port),
        guest: p.gen,
        helloTimeoutMs: 1000,
      }).then(
        () => null,
        (e: unknown) => e,
      );
      assert.ok(err instanceof MigrationError, String(err));
      assert.match(err.message, c.match);
      assert.equal(err.phase, c.phase);
      assert.equal(hasFeature(p.fe.features, VirtioFeature.LOG_ALL), false, "LOG_ALL is off");
      assert.equal(dirtyLogFds(), 0, "the dirty log memfd is closed");
      await expectResumed(p, err);
    } finally {
      for (const s of d.conns) s.destroy();
      d.server.close();
      p.close();
    }
  });
}

test("SeqTrafficGuest.restore: a malformed GUEST_STATE fails naming the field", async () => {
  const p = await statefulPair();
  try {
    const good = JSON.parse(Buffer.from(p.gen.saveState()).toString("utf8")) as Record<
      string,
      unknown
    >;
    const restore = (v: unknown): unknown => {
      try {
        SeqTrafficGuest.restore(p.fe, Buffer.from(typeof v === "string" ? v : JSON.stringify(v)));
        return null;
      } catch (e) {
        return e;
      }
    };
    const cases: [unknown, string][] = [
      ["{not json", "GUEST_STATE"],
      [null, "GUEST_STATE"],
      [{ ...good, options: 3 }, "options"],
      [{ ...good, txBase: 2 ** 40 }, "txBase"],
      [{ ...good, nextSeq: -1 }, "nextSeq"],
      [{ ...good, options: { ...(good.options as object), srcMac: [1, 2] } }, "options.srcMac"],
      [{ ...good, options: { ...(good.options as object), txQueue: "1" } }, "options.txQueue"],
    ];
    for (const [v, field] of cases) {
      const e = restore(v);
      assert.ok(e instanceof VhostUserError, `${JSON.stringify(v)}: ${String(e)}`);
      assert.equal(e.field, field);
    }
    // the untampered state restores (same RAM: its buffer area is inside it)
    assert.equal(restore(good), null);
  } finally {
    p.close();
  }
});
