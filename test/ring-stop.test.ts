/**
 * Rings at the migration boundary (vhost-user: "Starting and stopping rings", "Migration";
 * seeds 000-002): GET_VRING_BASE stops the ring first, lets the device complete or cancel
 * what it holds (bounded), flushes the dirty log and only then answers; a split ring keeps
 * its chains in flight across a rebuild; a short log or a used ring beyond the log is
 * refused; a packed base is read in its full encoding; a failed GET_VRING_BASE closes the
 * connection. Split and packed rings, main-thread and worker queues.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  FrontendRequest,
  VRING_F_LOG,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import type { BackendQueue, VhostUserDevice, WorkerQueueSpec } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory } from "../src/memory/guest-memory.js";
import type { Region } from "../src/memory/guest-memory.js";
import { writeChain } from "../src/virtq/chain-io.js";
import { splitRingSizes } from "../src/virtq/layout.js";
import type { Gpa } from "../src/memory/address.js";
import { Holder } from "./fixtures/hold-worker.js";
import type { HoldOptions } from "./fixtures/hold-worker.js";
import { LogFile, sleep, until } from "./helpers.js";

const FR = FrontendRequest;
const LOG_ALL = featureMask(VirtioFeature.LOG_ALL);
const PF = featureMask(VirtioFeature.PROTOCOL_FEATURES);
const RAM_SIZE = 1 << 20;
const DATA_START = 256 << 10;
const BUF = 256;

/** One queue; its chains go to a {@link Holder} (on the main thread or in a worker). */
class HoldDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  readonly hasWorkerQueues: boolean;
  readonly holder: Holder;
  /** the worker holder's counters: [0] chains taken */
  readonly counters = new Float64Array(new SharedArrayBuffer(16));
  readonly #opts: HoldOptions;
  constructor(opts: HoldOptions, workers: boolean) {
    this.#opts = opts;
    this.holder = new Holder(opts);
    this.hasWorkerQueues = workers;
  }
  workerQueue(): WorkerQueueSpec | null {
    return {
      module: new URL("./fixtures/hold-worker.js", import.meta.url).href,
      options: this.#opts,
      counters: this.counters,
    };
  }
  processQueue(queue: BackendQueue): void {
    this.holder.process(queue);
  }
  stopQueue(queue: BackendQueue): void {
    this.holder.stop(queue);
  }
}

interface Rig {
  fe: VhostUserFrontend;
  ram: GuestRam;
  q: FrontendQueue;
  dev: HoldDevice;
  server: BackendServer;
  session: BackendSession;
  errors: Error[];
  closed: () => boolean;
  features: bigint;
  close(): void;
}

let sockets = 0;
async function rig(
  name: string,
  packed: boolean,
  workers: boolean,
  hold: HoldOptions,
  stopTimeoutMs?: number,
): Promise<Rig> {
  sockets++;
  const path = join(tmpdir(), `vk-ring-stop-${process.pid}-${sockets}.sock`);
  const dev = new HoldDevice(hold, workers);
  const server = serveBackend(dev, {
    path,
    logger: process.env.VK_DEBUG
      ? { debug: console.log, info: console.log, warn: console.log, error: console.log }
      : silentLogger,
    ...(stopTimeoutMs !== undefined ? { stopTimeoutMs } : {}),
  } as Parameters<typeof serveBackend>[1]);
  const errors: Error[] = [];
  server.on("error", (e: Error) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 8000 });
  let closed = false;
  fe.on("close", () => {
    closed = true;
  });
  fe.on("error", () => {});
  await until(() => server.session !== null, "the session", 3000);
  const features =
    featureSet(VirtioFeature.VERSION_1) | (packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
  await fe.negotiate({ features });
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: RAM_SIZE }], name });
  const [q] = await fe.start(ram, [{ size: 64, eventIdx: false }]);
  return {
    fe,
    ram,
    q: q as FrontendQueue,
    dev,
    server,
    session: server.session as BackendSession,
    errors,
    closed: () => closed,
    features,
    close() {
      fe.close();
      server.close();
      ram.close();
    },
  };
}

/** Post `n` writable buffers (zeroed) and kick. @returns their guest addresses */
function post(r: Rig, n: number, from = 0): number[] {
  const gpas: number[] = [];
  for (let i = 0; i < n; i++) {
    const gpa = DATA_START + (from + i) * 4096;
    r.ram.write(gpa as Gpa, new Uint8Array(BUF));
    assert.notEqual(r.q.add([{ gpa: gpa as Gpa, len: BUF, writable: true }]), null);
    gpas.push(gpa);
  }
  r.q.kick();
  return gpas;
}

function collect(q: FrontendQueue): { id: number; len: number }[] {
  const out: { id: number; len: number }[] = [];
  for (let u = q.getUsed(); u !== null; u = q.getUsed()) out.push({ id: u.id, len: u.len });
  return out;
}

/** Wait until the back-end has taken `n` chains (the ring's avail position moved). */
async function taken(r: Rig, n: number, workers: boolean): Promise<void> {
  if (workers) {
    await until(() => (r.dev.counters[0] as number) >= n, `${n} chains taken by the worker`, 3000);
    return;
  }
  await until(() => r.dev.holder.held.length === n, `${n} chains held`, 3000);
}

async function startLogging(r: Rig, log: LogFile): Promise<void> {
  await r.fe.request(FR.SET_LOG_BASE, { mmapSize: BigInt(log.size), mmapOffset: 0n }, [log.fd]);
  await r.fe.setFeatures(r.features | PF | LOG_ALL);
}

const MATRIX = [false, true].flatMap((packed) =>
  [false, true].map((workers) => ({
    packed,
    workers,
    label: `${packed ? "packed" : "split"}, ${workers ? "worker" : "main thread"}`,
  })),
);

for (const { packed, workers, label } of MATRIX) {
  test(`GET_VRING_BASE stops first, then the device completes what it holds: every chain used, base counts them (${label})`, async () => {
    const r = await rig(`vk-rs-complete`, packed, workers, { holdMs: null, onStop: "complete" });
    try {
      const gpas = post(r, 3);
      await taken(r, 3, workers);
      const t0 = Date.now();
      const base = await r.fe.stopQueue(0);
      const ms = Date.now() - t0;
      const used = collect(r.q);
      assert.equal(used.length, 3, "the held chains were completed before the reply");
      for (const u of used) assert.equal(u.len, BUF);
      for (const g of gpas) assert.equal(r.ram.read(g as Gpa, 1)[0], 0x77, "data written");
      assert.equal(base.availIdx, 3);
      assert.ok(ms < 1000, `answered in ${ms} ms`);
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
    }
  });

  test(`GET_VRING_BASE with the device cancelling what it holds: nothing used, the base rewound, the buffers taken again after a restart (${label})`, async () => {
    const r = await rig(`vk-rs-cancel`, packed, workers, { holdMs: null, onStop: "cancel" });
    try {
      post(r, 3);
      await taken(r, 3, workers);
      const heads = workers ? [] : r.dev.holder.held.map((c) => c.head);
      const t0 = Date.now();
      const base = await r.fe.stopQueue(0);
      const ms = Date.now() - t0;
      assert.deepEqual(collect(r.q), [], "nothing used");
      assert.equal(base.availIdx, 0, "the position is before the held chains");
      if (packed) {
        assert.equal(base.availWrap, true);
        assert.equal(base.usedIdx, 0);
      }
      assert.ok(ms < 200, `a cancel costs no wait (${ms} ms)`);
      await r.fe.restartQueue(0);
      await taken(r, workers ? 6 : 3, workers); // the worker's count is cumulative
      if (!workers) {
        assert.deepEqual(
          r.dev.holder.held.map((c) => c.head),
          heads,
          "the same buffers again",
        );
      }
      const again = await r.fe.stopQueue(0);
      assert.equal(again.availIdx, 0);
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
    }
  });

  test(`GET_VRING_BASE with chains the device keeps past the bound fails the connection, naming the ring and the count (${label})`, async () => {
    const r = await rig(`vk-rs-keep`, packed, workers, { holdMs: null, onStop: "keep" }, 150);
    try {
      const gpas = post(r, 3);
      await taken(r, 3, workers);
      const t0 = Date.now();
      await assert.rejects(r.fe.stopQueue(0));
      const ms = Date.now() - t0;
      await until(() => r.closed(), "the connection closed", 3000);
      assert.ok(ms < 1500, `failed after the bound (${ms} ms)`);
      const e = r.errors.find((x) => /GET_VRING_BASE/.test(x.message));
      assert.ok(e, `an error names GET_VRING_BASE: ${r.errors.map((x) => x.message).join("; ")}`);
      assert.match(e.message, /queue 0/);
      assert.match(e.message, /3 (chains|buffers)/);
      // No guest write after the stop: the device's late completion writes nothing.
      if (!workers) {
        const vring = r.session.vrings[0]!;
        const c = r.dev.holder.held[0]!;
        assert.equal(vring.write(c, new Uint8Array(BUF).fill(0x99)), 0, "write refused");
        for (const g of gpas) assert.equal(r.ram.read(g as Gpa, 1)[0], 0, "guest memory untouched");
      }
    } finally {
      r.close();
    }
  });

  test(`the ring stops within the bound when held chains complete by themselves (${label})`, async () => {
    const r = await rig(`vk-rs-late`, packed, workers, { holdMs: 60, onStop: "keep" }, 2000);
    try {
      post(r, 2);
      await taken(r, 2, workers);
      const base = await r.fe.stopQueue(0);
      assert.equal(base.availIdx, 2);
      assert.equal(collect(r.q).length, 2);
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
    }
  });

  test(`a ring rebuilt while chains are held (SET_VRING_ADDR with VHOST_VRING_F_LOG) completes them normally (${label})`, async () => {
    const r = await rig(`vk-rs-rebuild`, packed, workers, { holdMs: 150, onStop: "complete" });
    try {
      post(r, 2);
      await taken(r, 2, workers);
      await r.fe.setVringLog(0, true);
      await until(() => r.q.outstanding === 0 || collect(r.q).length > 0, "used", 3000).catch(
        () => {},
      );
      await sleep(250);
      const vring = r.session.vrings[0]!;
      assert.equal(vring.broken, null, `ring not broken: ${vring.broken}`);
      post(r, 1, 2);
      await sleep(250);
      const used = collect(r.q);
      assert.ok(used.length >= 1, "the ring still works after the rebuild");
      const base = await r.fe.stopQueue(0);
      assert.equal(base.availIdx, 3);
      assert.equal(r.q.outstanding, 0, "every buffer came back");
      assert.deepEqual(r.errors, []);
    } finally {
      r.close();
    }
  });
}

for (const workers of [false, true]) {
  test(`a failed stop flushes the device's pending log marks before the connection closes (${workers ? "worker" : "main thread"})`, async () => {
    const r = await rig(
      `vk-rs-logflush`,
      false,
      workers,
      { holdMs: null, onStop: "keep", writeOnPop: true },
      100,
    );
    const log = new LogFile(RAM_SIZE / 4096 / 8);
    try {
      await startLogging(r, log);
      const gpas = post(r, 1);
      await taken(r, 1, workers);
      await assert.rejects(r.fe.stopQueue(0));
      assert.ok(log.dirty(gpas[0]!), "the page the device wrote is logged");
    } finally {
      r.close();
      log.close();
    }
  });
}

test("a ring the device marks broken flushes its pending log marks", async () => {
  const r = await rig(`vk-rs-broken`, false, false, {
    holdMs: null,
    onStop: "keep",
    writeOnPop: true,
  });
  const log = new LogFile(RAM_SIZE / 4096 / 8);
  try {
    await startLogging(r, log);
    const gpas = post(r, 1);
    await taken(r, 1, false);
    r.session.vrings[0]!.markBroken("device gave up");
    assert.ok(log.dirty(gpas[0]!), "the page the device wrote is logged");
  } finally {
    r.close();
    log.close();
  }
});

test("packed SET_VRING_BASE is read in the full encoding: used index 0 with wrap 0 is a real position; the avail-only form only with avail wrap 1", async () => {
  const r = await rig(`vk-rs-packed-base`, true, false, { holdMs: null, onStop: "complete" });
  try {
    await r.fe.stopQueue(0);
    const roundTrip = async (num: number): Promise<number> => {
      await r.fe.request(FR.SET_VRING_BASE, { index: 0, num });
      const reply = (await r.fe.request(FR.GET_VRING_BASE, { index: 0, num: 0 })) as unknown as {
        payload: { num: number };
      };
      return reply.payload.num;
    };
    // avail 3 wrap 0, used 0 wrap 0: three descriptors outstanding on an odd lap.
    assert.equal(await roundTrip(3), 3);
    // avail 0 wrap 0, used 0 wrap 0 (every other lap).
    assert.equal(await roundTrip(0), 0);
    // DPDK's avail-only form (avail 0 wrap 1, nothing above bit 15): used = avail.
    assert.equal((await roundTrip(0x8000)) >>> 0, 0x80008000);
    assert.equal((await roundTrip(0x8005)) >>> 0, 0x80058005);
    // The full form as vhostkit and QEMU send it.
    assert.equal((await roundTrip(0x80048007)) >>> 0, 0x80048007);
    assert.deepEqual(r.errors, []);
  } finally {
    r.close();
  }
});

test("a failed GET_VRING_BASE closes the connection instead of answering base 0", async () => {
  const r = await rig(`vk-rs-getbase-fail`, false, false, { holdMs: null, onStop: "complete" });
  try {
    let answered = false;
    await r.fe
      .request(FR.GET_VRING_BASE, { index: 7, num: 0 })
      .then(() => {
        answered = true;
      })
      .catch(() => {});
    assert.equal(answered, false, "no answer with a base");
    await until(() => r.closed(), "the connection closed", 3000);
    assert.ok(r.errors.some((e) => /GET_VRING_BASE/.test(e.message) && /7/.test(e.message)));
  } finally {
    r.close();
  }
});

for (const { packed, workers, label } of MATRIX) {
  test(`SET_LOG_BASE with a log smaller than guest memory is refused, naming the request and the size (${label})`, async () => {
    const r = await rig(`vk-rs-shortlog`, packed, workers, { holdMs: null, onStop: "complete" });
    const log = new LogFile(16);
    try {
      let failed = false;
      try {
        const reply = (await r.fe.request(FR.SET_LOG_BASE, { mmapSize: 16n, mmapOffset: 0n }, [
          log.fd,
        ])) as unknown as { kind: string; payload: unknown };
        failed = reply.kind === "ack" ? reply.payload === false : false;
      } catch {
        failed = true;
      }
      await sleep(20);
      const e = r.errors.find((x) => /SET_LOG_BASE/.test(x.message));
      assert.ok(e || failed, "refused");
      assert.ok(e, "an error names SET_LOG_BASE");
      assert.match(e.message, /mmap_size/);
      assert.match(e.message, /16/);
    } finally {
      r.close();
      log.close();
    }
  });

  test(`SET_VRING_ADDR whose used ring's last byte is logged beyond the log is refused (${label})`, async () => {
    const r = await rig(`vk-rs-logaddr`, packed, workers, { holdMs: null, onStop: "complete" });
    const log = new LogFile(RAM_SIZE / 4096 / 8);
    try {
      await r.fe.request(FR.SET_LOG_BASE, { mmapSize: BigInt(log.size), mmapOffset: 0n }, [log.fd]);
      const s = splitRingSizes(r.q.size);
      const beyond = RAM_SIZE - 8; // the ring's last byte lands past the log's last page
      await r.fe
        .request(FR.SET_VRING_ADDR, {
          index: 0,
          flags: VRING_F_LOG,
          descUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.desc, 16)),
          usedUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.used, 4)),
          availUserAddr: BigInt(r.ram.gpaToUaddr(r.q.ring.avail, 4)),
          logGuestAddr: BigInt(beyond),
        })
        .catch(() => {});
      void s;
      await sleep(20);
      const e = r.errors.find((x) => /SET_VRING_ADDR/.test(x.message));
      assert.ok(e, `an error names SET_VRING_ADDR: ${r.errors.map((x) => x.message).join("; ")}`);
      assert.match(e.message, /log_guest_addr/);
    } finally {
      r.close();
      log.close();
    }
  });
}

test("a write that no log bit could cover writes nothing (the mark is checked before the write)", () => {
  const buf = new ArrayBuffer(64 * 4096);
  const region = {
    gpa: 0,
    size: buf.byteLength,
    uaddr: 0,
    mmapOffset: 0,
    buffer: buf,
    base: 0,
    bytes: new Uint8Array(buf),
    view: new DataView(buf),
  };
  const mem = new GuestMemory([region as unknown as Region]);
  // The log covers 8 pages; the memory 64.
  mem.log = new DirtyLog(new ArrayBuffer(1), 0, 1);
  const chain = {
    head: 0,
    descCount: 1,
    readable: [],
    writable: [{ gpa: (20 * 4096) as Gpa, len: 16, writable: true }],
    readableLength: 0,
    writableLength: 16,
  };
  assert.throws(() => writeChain(mem, chain, new Uint8Array(16).fill(1)), /beyond the log/);
  assert.equal(new Uint8Array(buf)[20 * 4096], 0, "nothing written");
  assert.throws(() => mem.write((20 * 4096) as Gpa, new Uint8Array(4).fill(1)), /beyond the log/);
  assert.equal(new Uint8Array(buf)[20 * 4096], 0, "nothing written");
});
