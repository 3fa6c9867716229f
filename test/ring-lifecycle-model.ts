/**
 * Model-based property test of a ring's lifecycle at the migration boundary (vhost-user:
 * "Starting and stopping rings", "Migration", "Memory regions"), shared by the main-thread
 * (test/ring-lifecycle-model.test.ts) and worker-queue (test/ring-lifecycle-model-worker.test.ts)
 * variants: random sequences of kicks, device completions (in and out of order), SET_VRING_ADDR
 * with and without VHOST_VRING_F_LOG, SET_LOG_BASE swaps (a log for the ring's memory only, or
 * one that also covers an extra region), SET_MEM_TABLE, ADD_MEM_REG / REM_MEM_REG of an extra
 * region (CONFIGURE_MEM_SLOTS), SET_VRING_ENABLE, LOG_ALL on and off, and GET_VRING_BASE (the
 * device completing or cancelling what it holds) followed by a restart with SET_VRING_BASE,
 * checked against a small model: every buffer is used exactly once and never while the ring is
 * stopped; every device write made while logging is covered by a log bit; the base returned
 * equals the model's; a log that would not cover guest memory while logging (a short
 * SET_LOG_BASE, an ADD_MEM_REG past the log, LOG_ALL with a log memory outgrew) is refused, and
 * nothing else is.
 */
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BroadcastChannel } from "node:worker_threads";
import fc from "fast-check";

import {
  FrontendRequest,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import type { BackendQueue, VhostUserDevice, WorkerQueueSpec } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { DescChain } from "../src/virtq/types.js";
import type { Gpa } from "../src/memory/address.js";
import { ModelSlot } from "./fixtures/model-worker.js";
import type { CompleteRequest, ModelWorkerOptions } from "./fixtures/model-worker.js";
import { LogFile, sleep } from "./helpers.js";

const FR = FrontendRequest;
const RAM_SIZE = 1 << 20;
/** the extra region (ADD_MEM_REG / REM_MEM_REG): right above the ring's memory */
const EXTRA_GPA = RAM_SIZE;
const EXTRA_SIZE = 64 << 10;
const DATA_START = 256 << 10;
const QSIZE = 16;
const BUF = 64;
/** a log for [0, RAM_SIZE): 32 bytes */
const SMALL_LOG = RAM_SIZE / 4096 / 8;
/** a log for [0, 2 * RAM_SIZE): covers the extra region too */
const BIG_LOG = (2 * RAM_SIZE) / 4096 / 8;

/** What the test needs from the device, wherever its queue runs. */
interface Holder {
  readonly device: VhostUserDevice;
  /** complete the held chains at these positions (modulo the count), writing each fully */
  complete(picks: number[]): Promise<void>;
  /** the next stop cancels (true) or completes (false) the held chains */
  setCancelAtStop(cancel: boolean): void;
  /** chains held now */
  held(): number;
  /** the gpas of the writable segments written since the last call */
  takeWrites(): number[];
  close(): void;
}

/** Holds every chain it takes on the main thread; the test completes or cancels them. */
class ModelDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  held: DescChain[] = [];
  queue: BackendQueue | null = null;
  cancelAtStop = false;
  writes: number[] = [];
  processQueue(queue: BackendQueue): void {
    this.queue = queue;
    for (let c = queue.pop(); c !== null; c = queue.pop()) this.held.push(c);
  }
  #fill(q: BackendQueue, c: DescChain, byte: number): void {
    const n = q.write(c, new Uint8Array(c.writableLength).fill(byte));
    for (const s of c.writable) this.writes.push(s.gpa);
    q.pushUsed(c, n);
  }
  complete(picks: number[]): void {
    const q = this.queue;
    if (!q || !q.started) return;
    for (const p of picks) {
      if (this.held.length === 0) break;
      const [c] = this.held.splice(p % this.held.length, 1) as [DescChain];
      this.#fill(q, c, 0xab);
    }
    q.flush();
  }
  stopQueue(queue: BackendQueue): void {
    const chains = this.held.splice(0);
    if (this.cancelAtStop && queue.cancel(chains)) return;
    for (const c of chains) this.#fill(queue, c, 0xcd);
  }
}

function mainThreadHolder(): Holder {
  const dev = new ModelDevice();
  return {
    device: dev,
    complete: (picks) => Promise.resolve(dev.complete(picks)),
    setCancelAtStop: (cancel) => (dev.cancelAtStop = cancel),
    held: () => dev.held.length,
    takeWrites: () => dev.writes.splice(0),
    close: () => undefined,
  };
}

/** The queue runs in a worker (test/fixtures/model-worker.ts). */
class ModelWorkerDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  readonly hasWorkerQueues = true;
  readonly options: ModelWorkerOptions;
  constructor(options: ModelWorkerOptions) {
    this.options = options;
  }
  workerQueue(): WorkerQueueSpec {
    return {
      module: new URL("./fixtures/model-worker.js", import.meta.url).href,
      options: this.options,
    };
  }
  processQueue(): void {
    throw new Error("queue 0 runs in a worker");
  }
}

let channels = 0;

function workerHolder(session: () => BackendSession | null): Holder {
  const shared = new SharedArrayBuffer(4 * (ModelSlot.RECORDS + (1 << 16)));
  const s = new Int32Array(shared);
  const name = `vk-model-${process.pid}-${++channels}`;
  const dev = new ModelWorkerDevice({ channel: name, shared });
  const bc = new BroadcastChannel(name);
  bc.unref();
  let nextId = 0;
  const answers = new Map<number, () => void>();
  bc.onmessage = (e: unknown) => {
    const m = (e as { data: { id: number } }).data;
    answers.get(m.id)?.();
    answers.delete(m.id);
  };
  let taken = 0;
  return {
    device: dev,
    async complete(picks) {
      const vring = session()?.vrings[0];
      // Only a running worker whose handler listens can be asked; else there is nothing held.
      const end = Date.now() + 200;
      while (!(vring?.worker && Atomics.load(s, ModelSlot.ALIVE) === 1)) {
        if (Date.now() > end || !vring?.started) return;
        await sleep(1);
      }
      const id = nextId++;
      const req: CompleteRequest = { id, picks };
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`worker did not answer complete ${id}`)), 3000);
        answers.set(id, () => {
          clearTimeout(t);
          resolve();
        });
        bc.postMessage(req);
      });
    },
    setCancelAtStop: (cancel) => Atomics.store(s, ModelSlot.CANCEL_AT_STOP, cancel ? 1 : 0),
    held: () => Atomics.load(s, ModelSlot.HELD),
    takeWrites() {
      const n = Atomics.load(s, ModelSlot.WRITES);
      const out = Array.from(s.subarray(ModelSlot.RECORDS + taken, ModelSlot.RECORDS + n));
      taken = n;
      return out;
    },
    close: () => bc.close(),
  };
}

/** One step of a sequence. */
export type Cmd =
  | { t: "kick"; n: number }
  | { t: "complete"; picks: number[] }
  | { t: "addr"; log: boolean }
  | { t: "logbase"; big: boolean }
  | { t: "memtable" }
  | { t: "addreg" }
  | { t: "remreg" }
  | { t: "enable"; on: boolean }
  | { t: "logall"; on: boolean }
  | { t: "stop"; cancel: boolean };

/** Random steps. */
export const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({ t: fc.constant("kick" as const), n: fc.integer({ min: 1, max: 5 }) }),
  },
  {
    weight: 4,
    arbitrary: fc.record({
      t: fc.constant("complete" as const),
      picks: fc.array(fc.nat(20), { minLength: 1, maxLength: 4 }),
    }),
  },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("addr" as const), log: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("logbase" as const), big: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("memtable" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("addreg" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("remreg" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("enable" as const), on: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("logall" as const), on: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("stop" as const), cancel: fc.boolean() }) },
);

let sockets = 0;

/**
 * Run one command sequence against a fresh back-end and check it against the model.
 * @param packed packed ring (else split)
 * @param workers the ring runs in a worker thread (else on the main thread)
 * @param cmds the steps
 */
export async function runModel(packed: boolean, workers: boolean, cmds: Cmd[]): Promise<void> {
  sockets++;
  const path = join(tmpdir(), `vk-model-${process.pid}-${sockets}.sock`);
  let server: ReturnType<typeof serveBackend> | null = null;
  const holder = workers ? workerHolder(() => server?.session ?? null) : mainThreadHolder();
  server = serveBackend(holder.device, {
    path,
    logger: process.env.VK_DEBUG_LOG
      ? { debug: console.log, info: console.log, warn: console.log, error: console.log }
      : silentLogger,
  });
  const errors: VhostUserError[] = [];
  server.on("error", (e: VhostUserError) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  fe.on("error", () => undefined);
  const ram = GuestRam.create({
    regions: [{ gpa: 0, size: RAM_SIZE }],
    name: `vk-model-${sockets}`,
  });
  const extraRam = GuestRam.create({
    regions: [{ gpa: EXTRA_GPA, size: EXTRA_SIZE }],
    name: `vk-model-extra-${sockets}`,
  });
  const logs: LogFile[] = [];
  try {
    const features =
      featureSet(VirtioFeature.VERSION_1) | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
    await fe.negotiate({ features });
    const base = features | featureMask(VirtioFeature.PROTOCOL_FEATURES);
    const [q] = await fe.start(ram, [{ size: QSIZE, eventIdx: false }]);
    assert.ok(q);
    const session = server.session as BackendSession;
    assert.equal(session.vrings[0]!.worker, null, "not started before the first kick");
    // --- the model ---
    let logging = false;
    let extra = false;
    /** bytes of guest memory the current log covers */
    let logCovers = 0;
    const memEnd = (): number => (extra ? EXTRA_GPA + EXTRA_SIZE : RAM_SIZE);
    /** requests the back-end must have refused, in order */
    const refusals: string[] = [];
    /** writes made while logging, to be covered by a bit of some log */
    const logged: number[] = [];
    const newLog = async (big: boolean): Promise<void> => {
      const log = new LogFile(big ? BIG_LOG : SMALL_LOG);
      logs.push(log);
      const reply = await fe.request(
        FR.SET_LOG_BASE,
        { mmapSize: BigInt(log.size), mmapOffset: 0n },
        [log.fd],
      );
      const ok = (reply.payload as { value: bigint | null }).value === 0n;
      const covers = log.size * 8 * 4096;
      // refused exactly when it cannot cover guest memory
      assert.equal(ok, covers >= memEnd(), `SET_LOG_BASE of ${log.size} bytes accepted: ${ok}`);
      if (ok) logCovers = covers;
      else refusals.push("SET_LOG_BASE");
    };
    await newLog(false);
    let nextToken = 0;
    const posted = new Set<number>(); // tokens made available, not yet used
    const usedTokens = new Set<number>();
    let usedTotal = 0; // used entries the driver has seen (the ring's consumed count)
    let stopped = false;
    let slot = 0;
    const collect = (): void => {
      for (let u = q.getUsed(); u !== null; u = q.getUsed()) {
        const t = u.token as number;
        assert.ok(!stopped, `buffer ${t} used while the ring is stopped`);
        assert.ok(posted.has(t), `buffer ${t} used but not outstanding`);
        assert.ok(!usedTokens.has(t), `buffer ${t} used twice`);
        posted.delete(t);
        usedTokens.add(t);
        usedTotal++;
      }
    };
    const takeWrites = (): void => {
      for (const gpa of holder.takeWrites()) if (logging) logged.push(gpa);
    };
    const restart = async (): Promise<void> => {
      await fe.restartQueue(0);
      stopped = false;
      await sleep(2);
    };
    const refused = async (request: string, p: Promise<unknown>): Promise<void> => {
      await assert.rejects(p, (e: unknown) => e instanceof VhostUserError && e.request === request);
      refusals.push(request);
    };
    for (const c of cmds) {
      switch (c.t) {
        case "kick":
          if (stopped) await restart();
          for (let i = 0; i < c.n && q.freeCount > 0; i++) {
            const gpa = DATA_START + (slot++ % 128) * 4096;
            const token = nextToken++;
            q.add([{ gpa: gpa as Gpa, len: BUF, writable: true }], token);
            posted.add(token);
          }
          q.kick();
          await sleep(workers ? 4 : 2);
          break;
        case "complete":
          await holder.complete(c.picks);
          break;
        case "addr":
          await fe.setVringLog(0, c.log);
          break;
        case "logbase":
          await newLog(c.big);
          break;
        case "memtable":
          await fe.setMemTable(ram);
          extra = false;
          break;
        case "addreg":
          if (extra) break;
          if (logging && logCovers < EXTRA_GPA + EXTRA_SIZE) {
            await refused("ADD_MEM_REG", fe.addMemRegion(extraRam, 0));
          } else {
            await fe.addMemRegion(extraRam, 0);
            extra = true;
          }
          break;
        case "remreg":
          if (!extra) break;
          await fe.removeMemRegion(extraRam.memoryTable()[0]!);
          extra = false;
          break;
        case "enable":
          if (!stopped) await fe.setVringEnable(0, c.on);
          break;
        case "logall":
          takeWrites();
          if (c.on && !logging && logCovers < memEnd()) {
            await refused(
              "SET_FEATURES",
              fe.setFeatures(base | featureMask(VirtioFeature.LOG_ALL)),
            );
            break;
          }
          await fe.setFeatures(c.on ? base | featureMask(VirtioFeature.LOG_ALL) : base);
          logging = c.on;
          break;
        case "stop": {
          if (stopped) break;
          holder.setCancelAtStop(c.cancel);
          const b = await fe.stopQueue(0);
          // What the device completed at the stop was published before the reply.
          collect();
          stopped = true;
          // The base equals the model's: every chain the ring gave out is used (the ones
          // cancelled were given back), so the position is the used count.
          if (packed) {
            assert.equal(b.availIdx, usedTotal % QSIZE, "packed avail position");
            assert.equal(b.availWrap, Math.floor(usedTotal / QSIZE) % 2 === 0, "wrap counter");
          } else {
            assert.equal(b.availIdx, usedTotal & 0xffff, "split avail index");
          }
          assert.equal(holder.held(), 0, "nothing held after the stop");
          break;
        }
      }
      takeWrites();
      collect();
      if (stopped) await sleep(1);
      collect();
      assert.equal(session.vrings[0]!.broken, null, `ring broken: ${session.vrings[0]!.broken}`);
      // Every write made while logging is covered by a bit of some log.
      for (const gpa of logged) {
        assert.ok(
          logs.some((l) => l.dirty(gpa)),
          `write at ${gpa} not logged`,
        );
      }
      assert.deepEqual(
        errors.map((e) => e.request),
        refusals,
        `only the expected refusals: ${errors.map((e) => e.message).join("; ")}`,
      );
    }
    // Drain: restart, let the device take and complete everything, stop: nothing lost. A
    // stop may come before the device looked at the ring (a worker that is still starting):
    // what it did not take stays available, so kick until every buffer came back.
    if (stopped) await restart();
    await fe.setVringEnable(0, true);
    const drainEnd = Date.now() + 5000;
    while (posted.size > 0 && Date.now() < drainEnd) {
      q.forceKick();
      await sleep(workers ? 10 : 2);
      await holder.complete(Array.from({ length: QSIZE }, () => 0));
      takeWrites();
      collect();
    }
    holder.setCancelAtStop(false);
    await fe.stopQueue(0);
    collect();
    assert.equal(posted.size, 0, `buffers never used: ${[...posted].join(",")}`);
    assert.equal(usedTokens.size, nextToken, "every buffer used exactly once");
    assert.deepEqual(
      errors.map((e) => e.request),
      refusals,
    );
    if (workers) {
      // every worker has ended and released its fds
      const w = session.vrings[0]!.worker;
      assert.equal(w, null, "no worker after the stop");
    }
  } finally {
    fe.close();
    server.close();
    holder.close();
    ram.close();
    extraRam.close();
    for (const l of logs) l.close();
  }
}

/**
 * The property: {@link runModel} over random sequences.
 * @param packed packed ring
 * @param workers worker queue
 * @param numRuns sequences (`VK_MODEL_RUNS` in the environment overrides it, for long runs)
 * @param seed fast-check seed (default: random)
 */
export async function checkModel(
  packed: boolean,
  workers: boolean,
  numRuns: number,
  seed?: number,
): Promise<void> {
  await fc.assert(
    fc.asyncProperty(fc.array(cmd, { minLength: 5, maxLength: 40 }), (cmds) =>
      runModel(packed, workers, cmds).catch((e: unknown) => {
        if (process.env.VK_DEBUG) console.log("model:", (e as Error).message);
        throw e;
      }),
    ),
    {
      numRuns: Number(process.env.VK_MODEL_RUNS ?? numRuns),
      ...(seed !== undefined ? { seed } : {}),
    },
  );
}
