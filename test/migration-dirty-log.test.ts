/**
 * Dirty logging through the whole framework (vhost-user: "Migration", seeds 000-002): a
 * vhostkit front-end shares a log memfd with SET_LOG_BASE, turns VHOST_F_LOG_ALL on, and a
 * device writes guest memory through `queue.write`. The log must hold exactly the pages
 * written (data and used ring, the latter at log_guest_addr with VHOST_VRING_F_LOG); a log
 * smaller than guest memory is refused and nothing lands outside it; the log can be replaced
 * while traffic runs.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  VRING_F_LOG,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import type { BackendQueue, VhostUserDevice, WorkerQueueSpec } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { DirtyLog, LOG_PAGE_SIZE } from "../src/memory/dirty-log.js";
import { splitRingSizes } from "../src/virtq/layout.js";
import type { Gpa } from "../src/memory/address.js";
import { LogFile, sleep } from "./helpers.js";

const FR = FrontendRequest;
const LOG_ALL = featureMask(VirtioFeature.LOG_ALL);
const FEATURES = featureSet(VirtioFeature.VERSION_1);
const RAM_SIZE = 1 << 20;
/** Data buffers live in [DATA_START, RAM_SIZE); rings below. */
const DATA_START = 256 << 10;

/** A device that fills every writable byte of every chain queue 0 gets (with a pattern). */
class FillDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  written = 0;
  /** true: queue 0 runs in a worker thread (`test/fixtures/fill-worker.ts`) */
  readonly hasWorkerQueues: boolean;
  constructor(workers = false) {
    this.hasWorkerQueues = workers;
  }
  workerQueue(): WorkerQueueSpec | null {
    return { module: new URL("./fixtures/fill-worker.js", import.meta.url).href, options: null };
  }
  processQueue(queue: BackendQueue): void {
    for (let c = queue.pop(); c !== null; c = queue.pop()) {
      const n = queue.write(c, new Uint8Array(c.writableLength).fill(0x5a));
      this.written += n;
      queue.pushUsed(c, n);
    }
  }
}

function pagesOf(gpa: number, len: number, into: Set<number>): void {
  if (len === 0) return;
  for (let p = Math.floor(gpa / 4096); p <= Math.floor((gpa + len - 1) / 4096); p++) into.add(p);
}

interface Rig {
  fe: VhostUserFrontend;
  ram: GuestRam;
  q: FrontendQueue;
  dev: FillDevice;
  server: BackendServer;
  errors: Error[];
  close(): void;
}

let sockets = 0;
async function rig(name: string, workers = false): Promise<Rig> {
  sockets++;
  const path = join(tmpdir(), `vk-mig-log-${process.pid}-${sockets}.sock`);
  const dev = new FillDevice(workers);
  const server = serveBackend(dev, { path, logger: silentLogger });
  const errors: Error[] = [];
  server.on("error", (e: Error) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: RAM_SIZE }], name });
  await fe.negotiate({ features: FEATURES });
  const [q] = await fe.start(ram, [{ size: 64, eventIdx: false }]);
  return {
    fe,
    ram,
    q: q as FrontendQueue,
    dev,
    server,
    errors,
    close() {
      fe.close();
      server.close();
      ram.close();
    },
  };
}

/** The ring runs where the test says: in a worker thread or on the main thread. */
function assertWhere(r: Rig, workers: boolean): void {
  const vring = r.server.session?.vrings[0];
  assert.ok(vring?.started, "the ring runs");
  assert.equal(vring.worker !== null, workers, workers ? "in a worker" : "on the main thread");
}

async function setLogBase(fe: VhostUserFrontend, log: LogFile, size = log.size): Promise<void> {
  await fe.request(FR.SET_LOG_BASE, { mmapSize: BigInt(size), mmapOffset: 0n }, [log.fd]);
}

/** SET_VRING_ADDR for queue 0 with VHOST_VRING_F_LOG and the given log_guest_addr. */
async function setVringLogAt(r: Rig, logGuestAddr: number): Promise<void> {
  const s = splitRingSizes(r.q.size);
  await r.fe.request(FR.SET_VRING_ADDR, {
    index: 0,
    flags: VRING_F_LOG,
    descUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.desc, s.desc)),
    usedUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.used, s.used)),
    availUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.avail, s.avail)),
    logGuestAddr: BigInt(logGuestAddr),
  });
}

/** Post one chain per write (writable segments), kick, wait until all come back. */
async function writeThrough(r: Rig, writes: { gpa: number; len: number }[][]): Promise<void> {
  let pending = 0;
  for (const segs of writes) {
    const id = r.q.add(segs.map((s) => ({ gpa: s.gpa as Gpa, len: s.len, writable: true })));
    assert.notEqual(id, null, "ring has room");
    pending++;
  }
  r.q.kick();
  const end = Date.now() + 5000;
  while (pending > 0) {
    if (Date.now() > end) throw new Error(`${pending} chain(s) not returned`);
    const u = r.q.getUsed();
    if (u === null) await sleep(1);
    else pending--;
  }
}

test("log arithmetic: page = gpa / 4096, log[page / 8] |= 1 << (page % 8)", () => {
  for (const gpa of [0, 4095, 4096, 7 * 4096, 8 * 4096 + 1, 123_456_789, 2 ** 32 + 5]) {
    const pages = Math.floor(gpa / LOG_PAGE_SIZE) + 1;
    const size = Math.ceil(pages / 8) + 3;
    const buf = new ArrayBuffer(size);
    const log = new DirtyLog(buf, 0, size);
    log.mark(gpa, 1);
    log.flush();
    const page = Math.floor(gpa / 4096);
    const want = new Uint8Array(size);
    want[Math.floor(page / 8)] = 1 << (page % 8);
    assert.deepEqual(new Uint8Array(buf), want, `gpa ${gpa}`);
  }
});

for (const workers of [false, true]) {
  test(`random device writes through the framework mark every page written and no other (property)${workers ? " (worker ring)" : ""}`, async () => {
    const r = await rig(`vk-mig-log-prop${workers ? "-w" : ""}`, workers);
    const log = new LogFile(RAM_SIZE / 4096 / 8);
    try {
      await setLogBase(r.fe, log);
      await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
      const usedSize = splitRingSizes(r.q.size).used;
      const seg = fc
        .record({
          gpa: fc.integer({ min: DATA_START, max: RAM_SIZE - 1 }),
          len: fc.integer({ min: 1, max: 3 * 4096 }),
        })
        .map((s) => ({ gpa: s.gpa, len: Math.min(s.len, RAM_SIZE - s.gpa) }));
      await fc.assert(
        fc.asyncProperty(
          fc.array(fc.array(seg, { minLength: 1, maxLength: 3 }), { minLength: 1, maxLength: 12 }),
          async (writes) => {
            log.clear();
            await writeThrough(r, writes);
            const want = new Set<number>();
            for (const chain of writes) for (const s of chain) pagesOf(s.gpa, s.len, want);
            const used = new Set<number>();
            pagesOf(r.q.ring.used, usedSize, used);
            const got = log.pages();
            for (const p of want) assert.ok(got.includes(p), `page ${p} written but not logged`);
            for (const p of got) {
              assert.ok(want.has(p) || used.has(p), `page ${p} logged but not written`);
            }
          },
        ),
        { numRuns: 40 },
      );
      assertWhere(r, workers);
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
      log.close();
    }
  });
}

for (const workers of [false, true]) {
  test(`VHOST_VRING_F_LOG: used-ring writes are marked at log_guest_addr, not at the ring${workers ? " (worker ring)" : ""}`, async () => {
    const r = await rig(`vk-mig-log-used${workers ? "-w" : ""}`, workers);
    const log = new LogFile(RAM_SIZE / 4096 / 8);
    try {
      // A log_guest_addr on a page that holds neither the ring nor data.
      const logAt = 200 << 10;
      await setVringLogAt(r, logAt);
      await setLogBase(r.fe, log);
      await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
      await writeThrough(r, [[{ gpa: DATA_START + 100, len: 10 }]]);
      const got = log.pages();
      const usedPage = Math.floor(r.q.ring.used / 4096);
      assert.ok(got.includes(logAt / 4096), "used ring logged at log_guest_addr");
      assert.ok(!got.includes(usedPage), "not at the used ring's own address");
      assert.ok(got.includes(DATA_START / 4096), "the data page");
      assert.equal(got.length, 2, `pages ${got.join(",")}`);
      assertWhere(r, workers);
    } finally {
      r.close();
      log.close();
    }
  });
}

for (const workers of [false, true]) {
  test(`a log smaller than guest memory is refused (SET_LOG_BASE names mmap_size); logging goes on in the old log, nothing written outside either${workers ? " (worker ring)" : ""}`, async () => {
    const r = await rig(`vk-mig-log-beyond${workers ? "-w" : ""}`, workers);
    // The short log covers 512 KiB (16 bytes) of 1 MiB; its memfd has a whole page, canaries
    // after the log.
    const short = new LogFile(16, 4096);
    short.bytes.fill(0xc3, 16);
    const log = new LogFile(RAM_SIZE / 4096 / 8);
    try {
      await setLogBase(r.fe, log);
      await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
      let refused = false;
      await r.fe
        .request(FR.SET_LOG_BASE, { mmapSize: 16n, mmapOffset: 0n }, [short.fd])
        .then((reply) => {
          const m = reply as unknown as { kind: string; payload: unknown };
          refused = m.kind === "ack" && m.payload === false;
        })
        .catch(() => {
          refused = true;
        });
      await sleep(20);
      const e = r.errors.find((x) => /SET_LOG_BASE/.test(x.message));
      assert.ok(e, `an error names SET_LOG_BASE (refused by reply: ${refused})`);
      assert.match(e.message, /mmap_size/);
      assert.match(e.message, /16/);
      // A write in the upper half of guest memory (beyond the short log) is still logged: the
      // refused log was never used.
      if (!r.fe.closed) {
        await writeThrough(r, [[{ gpa: RAM_SIZE - 4096, len: 100 }]]);
        assert.ok(log.pages().includes(RAM_SIZE / 4096 - 1), "logged in the log in use");
      }
      assert.deepEqual(short.pages(), [], "the refused log was never marked");
      assert.ok(
        short.bytes.subarray(16).every((b) => b === 0xc3),
        "nothing written past the short log's size",
      );
      assertWhere(r, workers);
    } finally {
      r.close();
      short.close();
      log.close();
    }
  });
}

for (const workers of [false, true]) {
  test(`the log replaced (SET_LOG_BASE again, bigger) while traffic runs: no write goes unlogged${workers ? " (worker ring)" : ""}`, async () => {
    const r = await rig(`vk-mig-log-swap${workers ? "-w" : ""}`, workers);
    const small = new LogFile(RAM_SIZE / 4096 / 8);
    const big = new LogFile(2 * (RAM_SIZE / 4096 / 8));
    try {
      await setLogBase(r.fe, small);
      await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
      const all = new Set<number>();
      const after = new Set<number>();
      let swapped = false;
      let stop = false;
      const traffic = (async () => {
        let i = 0;
        while (!stop) {
          const gpa = DATA_START + ((i * 7919 * 64) % (RAM_SIZE - DATA_START - 64));
          const was = swapped;
          await writeThrough(r, [[{ gpa, len: 64 }]]);
          pagesOf(gpa, 64, all);
          if (was) pagesOf(gpa, 64, after);
          i++;
        }
      })();
      await sleep(50);
      await setLogBase(r.fe, big);
      swapped = true;
      await sleep(50);
      stop = true;
      await traffic;
      const union = new Set([...small.pages(), ...big.pages()]);
      for (const p of all) assert.ok(union.has(p), `page ${p} written but in neither log`);
      const inBig = new Set(big.pages());
      for (const p of after)
        assert.ok(inBig.has(p), `page ${p} written after the swap, not in the new log`);
      assert.ok(after.size > 0, "traffic ran after the swap");
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
      small.close();
      big.close();
    }
  });
}

test("SET_LOG_FD kicked after logging; LOG_ALL off and on again while the ring runs", async () => {
  const r = await rig("vk-mig-log-fd");
  const log = new LogFile(RAM_SIZE / 4096 / 8);
  const efd = native.eventfd(0);
  try {
    await setLogBase(r.fe, log);
    await r.fe.request(FR.SET_LOG_FD, null, [efd]);
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
    assert.equal(native.eventfdRead(efd), null, "no kick before any write");
    await writeThrough(r, [[{ gpa: DATA_START, len: 10 }]]);
    const n = native.eventfdRead(efd);
    assert.ok(n !== null && n >= 1n, "kicked after the write was logged");
    assert.ok(log.pages().includes(DATA_START / 4096));
    // LOG_ALL cleared while the ring runs: writes are no longer logged.
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES));
    log.clear();
    await writeThrough(r, [[{ gpa: DATA_START + 8192, len: 10 }]]);
    assert.deepEqual(log.pages(), []);
    // And on again.
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
    await writeThrough(r, [[{ gpa: DATA_START + 8192, len: 10 }]]);
    assert.ok(log.pages().includes(DATA_START / 4096 + 2));
  } finally {
    native.close(efd);
    r.close();
    log.close();
  }
});

test("LOG_ALL off and on again while a worker ring runs; the worker's log follows SET_LOG_BASE", async () => {
  const r = await rig("vk-mig-log-w-toggle", true);
  const log = new LogFile(RAM_SIZE / 4096 / 8);
  const other = new LogFile(RAM_SIZE / 4096 / 8);
  try {
    await writeThrough(r, [[{ gpa: DATA_START, len: 10 }]]);
    assertWhere(r, true);
    await setLogBase(r.fe, log);
    assert.deepEqual(log.pages(), [], "nothing logged before LOG_ALL");
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
    await writeThrough(r, [[{ gpa: DATA_START + 4096, len: 10 }]]);
    assert.ok(log.pages().includes(DATA_START / 4096 + 1), "logged once LOG_ALL is on");
    // LOG_ALL cleared while the worker runs: its writes are no longer logged.
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES));
    log.clear();
    await writeThrough(r, [[{ gpa: DATA_START + 8192, len: 10 }]]);
    assert.deepEqual(log.pages(), []);
    // On again, then a new log: the worker marks the new one only.
    await r.fe.setFeatures(FEATURES | featureMask(VirtioFeature.PROTOCOL_FEATURES) | LOG_ALL);
    await setLogBase(r.fe, other);
    log.clear();
    await writeThrough(r, [[{ gpa: DATA_START + 3 * 4096, len: 10 }]]);
    assert.deepEqual(log.pages(), [], "the old log is no longer marked");
    assert.ok(other.pages().includes(DATA_START / 4096 + 3), "the new log is");
    assertWhere(r, true);
    assert.deepEqual(r.errors, []);
  } finally {
    r.close();
    log.close();
    other.close();
  }
});
