/**
 * Model-based property test of a ring's lifecycle at the migration boundary (vhost-user:
 * "Starting and stopping rings", "Migration"): random sequences of kicks, device completions
 * (in and out of order), SET_VRING_ADDR with and without VHOST_VRING_F_LOG, SET_LOG_BASE swaps,
 * SET_MEM_TABLE, SET_VRING_ENABLE, LOG_ALL on and off, and GET_VRING_BASE (the device
 * completing or cancelling what it holds) followed by a restart with SET_VRING_BASE, checked
 * against a small model: every buffer is used exactly once and never while the ring is
 * stopped; every device write made while logging is covered by a log bit; the base returned
 * equals the model's. Split and packed rings on the main thread.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import type { BackendQueue, VhostUserDevice } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { DescChain } from "../src/virtq/types.js";
import type { Gpa } from "../src/memory/address.js";

const FR = FrontendRequest;
const RAM_SIZE = 1 << 20;
const DATA_START = 256 << 10;
const QSIZE = 16;
const BUF = 64;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Holds every chain it takes; the test completes or cancels them. */
class ModelDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  held: DescChain[] = [];
  queue: BackendQueue | null = null;
  /** the next stop cancels (true) or completes (false) */
  cancelAtStop = false;
  /** writes made, with whether the test had logging on */
  readonly writes: { gpa: number; logging: boolean }[] = [];
  logging = false;
  processQueue(queue: BackendQueue): void {
    this.queue = queue;
    for (let c = queue.pop(); c !== null; c = queue.pop()) this.held.push(c);
  }
  /**
   * Complete the held chains at these positions (modulo the count), writing each fully.
   * @param picks positions
   */
  complete(picks: number[]): void {
    const q = this.queue;
    if (!q || !q.started) return;
    for (const p of picks) {
      if (this.held.length === 0) break;
      const [c] = this.held.splice(p % this.held.length, 1) as [DescChain];
      const n = q.write(c, new Uint8Array(c.writableLength).fill(0xab));
      for (const s of c.writable) this.writes.push({ gpa: s.gpa, logging: this.logging });
      q.pushUsed(c, n);
    }
    q.flush();
  }
  stopQueue(queue: BackendQueue): void {
    const chains = this.held.splice(0);
    if (this.cancelAtStop && queue.cancel(chains)) return;
    for (const c of chains) {
      const n = queue.write(c, new Uint8Array(c.writableLength).fill(0xcd));
      for (const s of c.writable) this.writes.push({ gpa: s.gpa, logging: this.logging });
      queue.pushUsed(c, n);
    }
  }
}

class LogFile {
  readonly fd: number;
  readonly bytes: Uint8Array;
  readonly #buf: ArrayBuffer;
  constructor(readonly size: number) {
    this.fd = native.memfdCreate("vk-model-log");
    native.ftruncate(this.fd, Math.max(size, 4096));
    this.#buf = native.mmap(this.fd, 0, Math.max(size, 4096), true);
    this.bytes = new Uint8Array(this.#buf);
  }
  dirty(gpa: number): boolean {
    const page = Math.floor(gpa / 4096);
    return ((this.bytes[page >> 3] as number) & (1 << (page & 7))) !== 0;
  }
  close(): void {
    native.munmap(this.#buf);
    native.close(this.fd);
  }
}

type Cmd =
  | { t: "kick"; n: number }
  | { t: "complete"; picks: number[] }
  | { t: "addr"; log: boolean }
  | { t: "logbase" }
  | { t: "memtable" }
  | { t: "enable"; on: boolean }
  | { t: "logall"; on: boolean }
  | { t: "stop"; cancel: boolean };

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
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
  { weight: 1, arbitrary: fc.record({ t: fc.constant("logbase" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("memtable" as const) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("enable" as const), on: fc.boolean() }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("logall" as const), on: fc.boolean() }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("stop" as const), cancel: fc.boolean() }) },
);

let sockets = 0;

/** Run one command sequence against a fresh back-end and check it against the model. */
async function run(packed: boolean, cmds: Cmd[]): Promise<void> {
  sockets++;
  const path = join(tmpdir(), `vk-model-${process.pid}-${sockets}.sock`);
  const dev = new ModelDevice();
  const server = serveBackend(dev, { path, logger: silentLogger });
  const errors: Error[] = [];
  server.on("error", (e: Error) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  const ram = GuestRam.create({
    regions: [{ gpa: 0, size: RAM_SIZE }],
    name: `vk-model-${sockets}`,
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
    const newLog = async (): Promise<void> => {
      const log = new LogFile(RAM_SIZE / 4096 / 8);
      logs.push(log);
      await fe.request(FR.SET_LOG_BASE, { mmapSize: BigInt(log.size), mmapOffset: 0n }, [log.fd]);
    };
    await newLog();
    // --- the model ---
    let nextToken = 0;
    const posted = new Set<number>(); // tokens made available, not yet used
    const usedTokens = new Set<number>();
    let usedTotal = 0; // used entries the driver has seen (the ring's consumed count)
    let stopped = false;
    let stopBase = 0;
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
    const restart = async (): Promise<void> => {
      await fe.restartQueue(0);
      stopped = false;
      await sleep(2);
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
          await sleep(2);
          break;
        case "complete":
          dev.complete(c.picks);
          break;
        case "addr":
          await fe.setVringLog(0, c.log);
          break;
        case "logbase":
          await newLog();
          break;
        case "memtable":
          await fe.setMemTable(ram);
          break;
        case "enable":
          if (!stopped) await fe.setVringEnable(0, c.on);
          break;
        case "logall":
          await fe.setFeatures(c.on ? base | featureMask(VirtioFeature.LOG_ALL) : base);
          dev.logging = c.on;
          break;
        case "stop": {
          if (stopped) break;
          dev.cancelAtStop = c.cancel;
          const b = await fe.stopQueue(0);
          // What the device completed at the stop was published before the reply.
          collect();
          stopped = true;
          stopBase = b.availIdx;
          // The base equals the model's: every chain the ring gave out is used (the ones
          // cancelled were given back), so the position is the used count.
          if (packed) {
            assert.equal(b.availIdx, usedTotal % QSIZE, "packed avail position");
            assert.equal(b.availWrap, Math.floor(usedTotal / QSIZE) % 2 === 0, "wrap counter");
          } else {
            assert.equal(b.availIdx, usedTotal & 0xffff, "split avail index");
          }
          assert.equal(dev.held.length, 0, "nothing held after the stop");
          break;
        }
      }
      collect();
      if (stopped) await sleep(1);
      collect();
      assert.equal(session.vrings[0]!.broken, null, `ring broken: ${session.vrings[0]!.broken}`);
      // Every write made while logging is covered by a bit of some log.
      for (const w of dev.writes) {
        if (w.logging)
          assert.ok(
            logs.some((l) => l.dirty(w.gpa)),
            `write at ${w.gpa} not logged`,
          );
      }
    }
    void stopBase;
    // Drain: restart, let the device take and complete everything, stop: nothing lost.
    if (stopped) await restart();
    await fe.setVringEnable(0, true);
    q.forceKick();
    await sleep(5);
    dev.complete(Array.from({ length: QSIZE }, () => 0));
    dev.cancelAtStop = false;
    await fe.stopQueue(0);
    collect();
    assert.equal(posted.size, 0, `buffers never used: ${[...posted].join(",")}`);
    assert.equal(usedTokens.size, nextToken, "every buffer used exactly once");
    assert.deepEqual(errors, []);
  } finally {
    fe.close();
    server.close();
    ram.close();
    for (const l of logs) l.close();
  }
}

for (const packed of [false, true]) {
  test(`ring lifecycle against a model (${packed ? "packed" : "split"}): used exactly once, never while stopped; writes logged; base as the model's`, async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(cmd, { minLength: 5, maxLength: 40 }), (cmds) =>
        run(packed, cmds).catch((e: unknown) => {
          if (process.env.VK_DEBUG) console.log("model:", (e as Error).message);
          throw e;
        }),
      ),
      { numRuns: 25 },
    );
  });
}
