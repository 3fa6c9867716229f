/**
 * Worker-thread data path: NetTestDevice (sink) with its transmit queue processed in a worker
 * thread that maps the guest memory itself. Exact counts from a vhostkit front-end (split and
 * packed) and from DPDK virtio_user; ring stop and restart with indices preserved; memory-table
 * replacement while the worker runs; the worker exits and releases every fd and mapping on
 * disconnect; dirty logging is offered (the worker marks the log: test/migration-dirty-log).
 */
import { test } from "node:test";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setImmediate as nextTurn } from "node:timers/promises";

import {
  ProtocolFeature,
  VirtioFeature,
  featureSet,
  hasFeature,
} from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import type { WorkerQueueSpec } from "../src/backend/device.js";
import { VhostUserError } from "../src/protocol/errors.js";
import type { QueueWorker } from "../src/backend/worker-queue.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { gpa } from "../src/memory/address.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { startTestpmd } from "./peers/testpmd.js";
import { LineLogger, openFds, sleep, until } from "./helpers.js";

function describeFds(fds: Iterable<string>): string {
  return [...fds]
    .map((fd) => {
      try {
        return `${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`;
      } catch {
        return fd;
      }
    })
    .join(", ");
}

function memfdMappings(name: string): number {
  return readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((l) => l.includes(`/memfd:${name}`)).length;
}

let counter = 0;
function socketPath(): string {
  counter++;
  return join(tmpdir(), `vhostkit-wq-${process.pid}-${counter}.sock`);
}

function frame(seq: number): Uint8Array {
  const f = new Uint8Array(60 + (seq % 200));
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 4, 0x88, 0xb5]);
  new DataView(f.buffer).setUint32(14, seq, true);
  return f;
}

/** Transmit n frames, kicking per batch, reclaiming used buffers; resolves when all are used. */
/**
 * Post `n` frames on `tx`, kicking after each batch, until all are used.
 * @param pause what to wait for when the ring is full: a 1 ms timer by default; the polling
 *   tests pass one event-loop turn, so that batches land while the device still polls
 */
async function transmit(
  tx: FrontendQueue,
  n: number,
  from = 0,
  timeoutMs = 10_000,
  pause: () => Promise<unknown> = () => sleep(1),
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let next = 0;
  while (next < n || tx.outstanding > 0) {
    if (Date.now() > deadline) {
      throw new Error(`transmit: ${next} of ${n} added, ${tx.outstanding} outstanding`);
    }
    let added = 0;
    while (next < n && tx.addFrame(frame(from + next)) !== null) {
      next++;
      added++;
    }
    if (added > 0) tx.kick();
    else await pause();
    tx.reclaim();
  }
}

const FEATURES = featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX);
const here = fileURLToPath(new URL(".", import.meta.url));

interface Setup {
  server: BackendServer;
  session: BackendSession;
  device: NetTestDevice;
  fe: VhostUserFrontend;
  ram: GuestRam;
  log: LineLogger;
  offered: bigint;
  offeredPf: bigint;
  close(): void;
}

async function setup(
  name: string,
  packed: boolean,
  opts: { workerQueues?: boolean; pollTurns?: number; busyPollMicros?: number } = {},
): Promise<Setup> {
  const path = socketPath();
  const log = new LineLogger();
  const device = new NetTestDevice({ mode: "sink", workerQueues: opts.workerQueues ?? true });
  const server = serveBackend(device, {
    path,
    logger: log,
    ...(opts.pollTurns !== undefined ? { pollTurns: opts.pollTurns } : {}),
    ...(opts.busyPollMicros !== undefined ? { busyPollMicros: opts.busyPollMicros } : {}),
  });
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 8000 });
  await until(() => server.session !== null, "the session", 8000);
  const session = server.session as BackendSession;
  const neg = await fe.negotiate({
    features: FEATURES | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n),
  });
  const ram = GuestRam.create({ size: 4 << 20, name });
  return {
    server,
    session,
    device,
    fe,
    ram,
    log,
    offered: neg.offeredFeatures,
    offeredPf: neg.offeredProtocolFeatures,
    close() {
      fe.close();
      server.close();
      ram.close();
    },
  };
}

for (const packed of [false, true]) {
  test(`worker queue (${packed ? "packed" : "split"}): exact count, stop/restart keeps indices, memory replaced, released on disconnect`, async () => {
    const name = `wq-${packed ? "p" : "s"}-${process.pid}`;
    const fdsBefore = openFds();
    const s = await setup(name, packed);
    try {
      // Worker rings mark the dirty log (test/migration-dirty-log): live migration is offered.
      assert.equal(hasFeature(s.offered, VirtioFeature.LOG_ALL), true, "LOG_ALL offered");
      assert.equal(hasFeature(s.offeredPf, ProtocolFeature.LOG_SHMFD), true, "LOG_SHMFD offered");
      const [, tx] = await s.fe.start(s.ram, [256, 256]);
      assert.ok(tx);
      const vring = s.session.vrings[1]!;
      // a function, so that assertions do not narrow the getter's type
      const current = (): QueueWorker | null => vring.worker;

      // 1. exact count, processed in the worker (the main thread holds no ring for it)
      const n1 = 3000;
      await transmit(tx, n1);
      await until(() => s.device.totalTx === n1, `${n1} frames counted`, 8000);
      const worker = vring.worker;
      assert.ok(worker, "queue 1 runs in a worker");
      assert.equal(vring.deviceQueue, null, "the main thread does not process queue 1");
      assert.equal(s.device.counters[0]!.txBytes, expectedBytes(0, n1));

      // 2. stop: the worker returns its position and exits
      const base1 = await s.fe.stopQueue(1);
      assert.equal(base1.availIdx, packed ? n1 % 256 : n1 & 0xffff, "GET_VRING_BASE position");
      if (packed) assert.equal(base1.availWrap, Math.floor(n1 / 256) % 2 === 0, "wrap counter");
      assert.equal(await worker.exited, 0, "the worker thread ended");
      assert.equal(current(), null);
      assert.equal(vring.started, false);

      // frames added while stopped are not consumed
      let queued = 0;
      while (queued < 50 && tx.addFrame(frame(n1 + queued)) !== null) queued++;
      tx.kick();
      await sleep(50);
      assert.equal(s.device.totalTx, n1, "a stopped ring is not processed");

      // 3. restart from the returned base: a new worker continues exactly where it stopped
      await s.fe.restartQueue(1);
      await transmit(tx, 0);
      const n2 = 2000;
      await transmit(tx, n2, n1 + queued);
      const total = n1 + queued + n2;
      await until(() => s.device.totalTx === total, `${total} frames counted`, 8000);
      assert.ok(current() && current() !== worker, "a new worker after the restart");

      // 4. memory-table replacement while the worker runs (split: live; packed: stop mode)
      const copy = s.ram.duplicate(`b${name}`);
      const running = current();
      const old = await s.fe.replaceMemory(copy, { mode: packed ? "stop" : "live" });
      old.close();
      s.ram = copy;
      const n3 = 1500;
      await transmit(tx, n3, total);
      await until(() => s.device.totalTx === total + n3, `${total + n3} frames counted`, 8000);
      await sleep(30);
      assert.equal(s.device.totalTx, total + n3, "no frame counted twice");
      if (!packed) assert.equal(current(), running, "the same worker remapped (live)");
      assert.equal(memfdMappings(name), 0, "the first RAM is unmapped everywhere");
      assert.equal(
        s.log.lines.some((l) => l.startsWith("E ")),
        false,
        `no error logged:\n${s.log.lines.join("\n")}`,
      );

      // 5. disconnect: the worker exits; every fd and mapping is released
      const last = current()!;
      s.fe.close();
      assert.equal(await last.exited, 0, "the worker ended on disconnect");
      await until(() => s.session.closed, "the session to close", 8000);
      s.server.close();
      s.ram.close();
      await sleep(20);
      assert.equal(memfdMappings(name), 0, "no mapping of the guest RAM left");
      assert.equal(memfdMappings(`b${name}`), 0, "no mapping of the second RAM left");
      const leaked = [...openFds()].filter((fd) => !fdsBefore.has(fd));
      assert.deepEqual(leaked, [], `leaked fds: ${describeFds(leaked)}`);
    } finally {
      s.close();
    }
  });
}

function expectedBytes(from: number, n: number): number {
  let b = 0;
  for (let i = from; i < from + n; i++) b += frame(i).length;
  return b;
}

for (const workerQueues of [false, true]) {
  for (const packed of [false, true]) {
    test(`adaptive polling (pollTurns) on ${workerQueues ? "a worker" : "the main thread"}, ${packed ? "packed" : "split"}: kicks suppressed while polling, exact count across pauses`, async () => {
      const s = await setup(`wq-poll-${process.pid}`, packed, { workerQueues, pollTurns: 64 });
      try {
        const [, tx] = await s.fe.start(s.ram, [256, 256]);
        assert.ok(tx);
        let sent = 0;
        for (let round = 0; round < 4; round++) {
          await transmit(tx, 1000, sent, 10_000, nextTurn);
          sent += 1000;
          await until(() => s.device.totalTx === sent, `${sent} frames counted`, 8000);
          // a pause longer than the polling window: notifications must be asked for again,
          // or the next round would never be kicked through
          await sleep(30);
        }
        assert.equal(s.device.totalTx, sent, "every frame counted once");
        if (!workerQueues) {
          // On the main thread the polling turns interleave with this front-end's batches.
          // (A worker's idle turns are much shorter: its polling window usually closes before
          // the next batch, so only the exact count is checked there.)
          assert.ok(tx.stats.kicksSuppressed > 0, `kicks suppressed (${tx.stats.kicksSuppressed})`);
        }
        assert.equal(s.session.vrings[1]!.worker !== null, workerQueues);
      } finally {
        s.close();
      }
    });
  }
}

for (const packed of [false, true]) {
  test(`busy polling (busyPollMicros) in a back-end process, ${packed ? "packed" : "split"}: kicks suppressed while polling, exact count across pauses, the loop ends when idle`, async () => {
    const path = socketPath();
    const child = spawn(
      process.execPath,
      [join(here, "fixtures", "busy-sink-child.js"), path, "1000"],
      { stdio: ["pipe", "pipe", "inherit"] },
    );
    const lines = createInterface({ input: child.stdout! });
    const waiting: ((l: string) => void)[] = [];
    lines.on("line", (l) => waiting.shift()?.(l));
    const nextLine = (): Promise<string> => new Promise((resolve) => waiting.push(resolve));
    const stats = async (): Promise<{ totalTx: number; spinning: boolean }> => {
      const l = nextLine();
      child.stdin!.write("stats\n");
      return JSON.parse(await l) as { totalTx: number; spinning: boolean };
    };
    let fe: VhostUserFrontend | null = null;
    const ram = GuestRam.create({ size: 4 << 20, name: `wq-busy-${process.pid}` });
    try {
      assert.equal(await nextLine(), "listening");
      fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 8000 });
      await fe.negotiate({
        features: FEATURES | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n),
      });
      // A small TX ring: each refill is quick, well inside the idle window.
      const [, tx] = await fe.start(ram, [256, 64]);
      assert.ok(tx);
      let sent = 0;
      for (let round = 0; round < 4; round++) {
        // Batches one event-loop turn apart: they land while the back-end polls.
        await transmit(tx, 1000, sent, 10_000, nextTurn);
        sent += 1000;
        const deadline = Date.now() + 5000;
        while ((await stats()).totalTx !== sent) {
          if (Date.now() > deadline) assert.fail(`${sent} frames not counted`);
          await sleep(1);
        }
        // Longer than the idle window: the loop has ended and asked for kicks again, or
        // this frame would never be kicked through.
        await sleep(30);
        assert.equal((await stats()).spinning, false, "the polling loop ended when idle");
        assert.notEqual(tx.addFrame(frame(sent)), null);
        assert.equal(tx.kick(), true, "notifications asked for again once idle");
        sent += 1;
        const d2 = Date.now() + 5000;
        while ((await stats()).totalTx !== sent) {
          if (Date.now() > d2) assert.fail(`frame ${sent} not counted`);
          await sleep(1);
        }
        tx.reclaim();
      }
      assert.equal((await stats()).totalTx, sent, "every frame counted once");
      assert.ok(tx.stats.kicksSuppressed > 0, `kicks suppressed (${tx.stats.kicksSuppressed})`);
    } finally {
      fe?.close();
      ram.close();
      child.stdin!.end();
      await new Promise((r) => child.once("exit", r));
    }
  });
}

test("serveBackend refuses busyPollMicros and pollTurns out of range before making a socket", () => {
  const path = socketPath();
  const device = new NetTestDevice({ mode: "sink" });
  assert.throws(
    () => serveBackend(device, { path, busyPollMicros: 5000 }),
    /busyPollMicros must be in 0\.\.1000, got 5000/,
  );
  assert.throws(() => serveBackend(device, { path, pollTurns: -1 }), /pollTurns must be/);
  assert.equal(existsSync(path), false, "no socket file made");
});

test("worker queue: a bad ring breaks only that queue (err eventfd), the worker exits", async () => {
  const name = `wq-bad-${process.pid}`;
  const s = await setup(name, false);
  try {
    const [, tx] = await s.fe.start(s.ram, [64, 64]);
    assert.ok(tx);
    await transmit(tx, 100);
    await until(() => s.device.totalTx === 100, "100 frames", 8000);
    const worker = s.session.vrings[1]!.worker!;
    assert.ok(worker);
    // Publish a buffer whose descriptor points outside guest memory.
    tx.add([{ gpa: gpa(0x7000_0000_0000), len: 64, writable: false }]);
    tx.kick();
    await until(() => s.session.vrings[1]!.broken !== null, "the ring to break", 8000);
    assert.match(s.session.vrings[1]!.broken!, /worker: .*desc\.addr|outside/);
    await until(() => tx.stats.errors > 0, "the err eventfd to fire", 8000);
    assert.equal(await worker.exited, 0);
    assert.equal(s.session.vrings[1]!.worker, null);
    assert.equal(s.session.closed, false, "the connection goes on");
  } finally {
    s.close();
  }
});

for (const packed of [false, true]) {
  test(`DPDK virtio_user -> vhostkit sink with its TX queue in a worker (${packed ? "packed_vq=1" : "split"}): N sent, N counted`, async () => {
    const dir = mkdtempSync(join(tmpdir(), "vk-wq-dpdk-"));
    const path = join(dir, "sink.sock");
    const log = new LineLogger();
    const device = new NetTestDevice({ mode: "sink", workerQueues: true });
    let server: BackendServer | null = null;
    const tp = await startTestpmd({
      vdev: { kind: "virtio_user", path, queues: 1, server: true, packed },
      forwardMode: "io",
      name: "vu-wq",
    });
    try {
      await tp.listening();
      server = serveBackend(device, { path, client: true, logger: log });
      await tp.ready();
      let expected = 0;
      for (let i = 0; i < 5; i++) {
        const sent = await tp.sendExactly(200);
        assert.equal(sent.txDropped, 0);
        expected += sent.txPackets;
      }
      assert.equal(expected, 1000);
      await until(() => device.totalTx >= expected, `${expected} frames at the device`, 8000);
      await sleep(200);
      assert.equal(device.totalTx, expected, "every frame counted once");
      assert.equal(device.counters[0]!.txBytes, expected * 64, "64-byte frames");
      const session = server.session;
      assert.ok(session);
      assert.ok(session.vrings[1]!.worker, "TX queue in a worker");
      assert.equal(
        session.vrings.some((v) => v.broken),
        false,
      );
    } catch (err) {
      (err as Error).message +=
        `\n--- back-end ---\n${log.lines.join("\n")}\n--- testpmd ---\n${tp.tail(30)}`;
      throw err;
    } finally {
      await tp.close();
      server?.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

/** A handler that never returns once it sees a buffer: the worker stops answering. */
const HANGING_MODULE =
  "data:text/javascript," +
  encodeURIComponent(
    "export function createQueueHandler() { return { process(q) { if (q.pop()) for (;;) {} } }; }",
  );

/** Sink device whose TX worker hangs on its first buffer. */
class HangingDevice extends NetTestDevice {
  constructor() {
    super({ mode: "sink", workerQueues: true });
  }
  override workerQueue(index: number): WorkerQueueSpec | null {
    return index === 1 ? { module: HANGING_MODULE, options: null } : null;
  }
}

test("worker queue: a worker that stops answering is terminated; GET_VRING_BASE fails by closing the connection (never a base), its fds are closed", async () => {
  const fdsBefore = openFds();
  const path = socketPath();
  const log = new LineLogger();
  const server = serveBackend(new HangingDevice(), { path, logger: log });
  const errors: VhostUserError[] = [];
  server.on("error", (e: VhostUserError) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 12_000 });
  const ram = GuestRam.create({ size: 4 << 20, name: `wq-hang-${process.pid}` });
  try {
    await until(() => server.session !== null, "the session", 8000);
    const session = server.session as BackendSession;
    await fe.negotiate({ features: FEATURES });
    const [, tx] = await fe.start(ram, [64, 64]);
    assert.ok(tx);
    const vring = session.vrings[1]!;
    // The ring starts (in its worker) on the first kick; the worker then hangs on the buffer.
    tx.sendFrame(frame(1));
    await until(() => vring.worker !== null, "the worker", 8000);
    const worker = vring.worker!;
    await sleep(50);
    assert.ok(worker.ownedFds > 0, "the worker holds kick/call dups");
    // The worker is stuck: GET_VRING_BASE waits for the answer timeout (5 s), then fails. The
    // request has no failure value: the connection closes instead of answering a base.
    await assert.rejects(fe.stopQueue(1));
    assert.ok(
      errors.some((e) => e.request === "GET_VRING_BASE" && /position lost/.test(e.message)),
      `GET_VRING_BASE failed: ${errors.map((e) => e.message).join("; ")}`,
    );
    assert.notEqual(await worker.exited, 0, "the worker was terminated");
    assert.equal(worker.ownedFds, 0, "every fd sent to the worker is closed");
    assert.equal(vring.worker, null);
    await until(() => session.closed, "the connection closed", 8000);
  } finally {
    fe.close();
    server.close();
    ram.close();
  }
  await sleep(50);
  const leaked = [...openFds()].filter((fd) => !fdsBefore.has(fd));
  assert.deepEqual(leaked, [], `leaked fds: ${describeFds(leaked)}`);
});
