/**
 * Issue: a SIGBUS inside a guest mapping that a worker thread made (a worker queue maps guest
 * memory from its own dup of the region fd) was survived but not reported: the front-end that
 * shrank its memory kept its connection while the worker read zeros. The connection that owns
 * the mapping must fail as for a fault on the main thread, and every other one go on. The
 * back-end runs as a child process, so a crash fails the test instead of killing the runner.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { VhostUserDevice, WorkerQueueSpec } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { Gpa } from "../src/memory/address.js";
import { connectGuest, seqFrame, until } from "./hardening-helpers.js";
import type { TestGuest } from "./hardening-helpers.js";

const here = dirname(fileURLToPath(import.meta.url));

interface PortStats {
  tx: number;
  connected: boolean;
  worker: boolean;
}

/** The child of test/fixtures/sigbus-worker-child.ts, asked for its counters over stdin. */
class SinkChild {
  stderr = "";
  alive = true;
  readonly #child;
  readonly #answers: ((s: PortStats[]) => void)[] = [];
  readonly listening: Promise<void>;
  constructor(a: string, b: string) {
    this.#child = spawn(
      process.execPath,
      [join(here, "fixtures", "sigbus-worker-child.js"), a, b],
      {
        stdio: ["pipe", "pipe", "pipe"],
      },
    );
    this.#child.stderr.setEncoding("utf8").on("data", (d: string) => (this.stderr += d));
    this.#child.once("exit", () => (this.alive = false));
    const lines = createInterface({ input: this.#child.stdout });
    this.listening = new Promise((resolve) => {
      lines.on("line", (l) => {
        if (l === "listening") resolve();
        else this.#answers.shift()?.(JSON.parse(l) as PortStats[]);
      });
    });
  }
  stats(): Promise<PortStats[]> {
    return new Promise((resolve) => {
      this.#answers.push(resolve);
      this.#child.stdin.write("stats\n");
    });
  }
  async waitFor(cond: (s: PortStats[]) => boolean, what: string): Promise<PortStats[]> {
    const end = Date.now() + 8000;
    for (;;) {
      const s = await this.stats();
      if (cond(s)) return s;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(s)}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }
  async stop(): Promise<void> {
    if (!this.alive) return;
    const exited = new Promise((r) => this.#child.once("exit", r));
    this.#child.stdin.end();
    const t = setTimeout(() => this.#child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(t);
  }
}

/** Send `count` frames on `g`'s TX ring, in batches the ring can hold. */
async function send(g: TestGuest, child: SinkChild, port: number, count: number): Promise<void> {
  const before = (await child.stats())[port]!.tx;
  for (let sent = 0; sent < count;) {
    const batch = Math.min(32, count - sent);
    g.tx.reclaim();
    for (let i = 0; i < batch; i++) {
      assert.notEqual(
        g.tx.addFrame(seqFrame("52:54:00:00:02:0b", "52:54:00:00:02:0a", sent + i)),
        null,
      );
    }
    g.tx.kick();
    sent += batch;
    await child.waitFor((s) => s[port]!.tx >= before + sent, `${sent} frames on port ${port}`);
  }
}

test("sigbus (worker queue): a front-end that shrinks guest memory under a worker ring loses its connection; the process survives and the other port goes on", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-sigbus-worker-"));
  const [a, b] = [join(dir, "a.sock"), join(dir, "b.sock")];
  const child = new SinkChild(a, b);
  const guests: TestGuest[] = [];
  try {
    await child.listening;
    const A = await connectGuest(a, "wa", { regions: [{ gpa: 0, size: 1 << 20 }], seal: false });
    guests.push(A);
    const B = await connectGuest(b, "wb");
    guests.push(B);
    // the first kick starts each TX ring in its worker
    await send(A, child, 0, 10);
    await send(B, child, 1, 10);
    assert.deepEqual(
      (await child.stats()).map((p) => p.worker),
      [true, true],
      "both TX rings run in workers",
    );

    // A queues a frame in a buffer far above 16 KiB (read by its worker only), shrinks its
    // memfd to 16 KiB and kicks.
    let closed = false;
    A.fe.on("close", () => (closed = true));
    A.tx.reclaim();
    assert.notEqual(A.tx.addFrame(seqFrame("52:54:00:00:02:0b", "52:54:00:00:02:0a", 99)), null);
    native.ftruncate(A.ram.regionFds[0]!, 16 << 10);
    A.tx.kick();

    await until(() => closed || !child.alive, "A's connection to close");
    assert.equal(child.alive, true, `the back-end died: ${child.stderr.slice(-2000)}`);
    assert.match(
      child.stderr,
      /memory region 0 \(gpa 0x0, size 0x100000\): SIGBUS at offset 0x[0-9a-f]+ .*shorter than the memory table says.*; closing the connection/,
    );
    await child.waitFor((s) => !s[0]!.connected, "port 0 to drop its session");

    // B goes on: its worker counts every frame
    await send(B, child, 1, 200);
    assert.equal(child.alive, true);
    assert.equal((await child.stats())[1]!.tx, 210);
  } finally {
    for (const g of guests) g.close();
    await child.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

/** One queue, run in a worker that fills every chain (test/fixtures/fill-worker.ts). */
class FillWorkerDevice implements VhostUserDevice {
  readonly deviceId = 1;
  readonly features = 0n;
  readonly queueCount = 1;
  readonly maxQueueSize = 256;
  readonly hasWorkerQueues = true;
  workerQueue(): WorkerQueueSpec {
    return { module: new URL("./fixtures/fill-worker.js", import.meta.url).href, options: null };
  }
  processQueue(): void {
    throw new Error("queue 0 runs in a worker");
  }
}

test("sigbus (worker queue): a front-end that shrinks the dirty log under a worker ring loses its connection, naming the log", async () => {
  const path = join(tmpdir(), `vk-sigbus-wlog-${process.pid}.sock`);
  const server = serveBackend(new FillWorkerDevice(), { path, logger: silentLogger });
  const errors: Error[] = [];
  server.on("error", (e: Error) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  fe.on("error", () => undefined);
  let closed = false;
  fe.on("close", () => (closed = true));
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: 1 << 20 }], name: "vk-sigbus-wlog" });
  const logFd = native.memfdCreate("vk-sigbus-wlog");
  try {
    const features = featureSet(VirtioFeature.VERSION_1);
    await fe.negotiate({ features });
    const [q] = await fe.start(ram, [{ size: 64, eventIdx: false }]);
    assert.ok(q);
    // 1 MiB of guest memory: 256 pages, a 32-byte log in a one-page file
    native.ftruncate(logFd, 4096);
    await fe.request(FrontendRequest.SET_LOG_BASE, { mmapSize: 32n, mmapOffset: 0n }, [logFd]);
    await fe.setFeatures(
      features | featureMask(VirtioFeature.PROTOCOL_FEATURES) | featureMask(VirtioFeature.LOG_ALL),
    );
    q.add([{ gpa: (512 << 10) as Gpa, len: 64, writable: true }]);
    q.kick();
    await until(() => q.getUsed() !== null, "the first chain back");
    assert.notEqual(server.session?.vrings[0]?.worker ?? null, null, "the ring runs in a worker");

    // the front-end shrinks the log's file to nothing; the worker's next mark faults
    native.ftruncate(logFd, 0);
    q.add([{ gpa: (520 << 10) as Gpa, len: 64, writable: true }]);
    q.kick();
    await until(() => closed, "the connection to close");
    assert.equal(errors.length, 1, errors.map((e) => e.message).join("; "));
    assert.match(
      errors[0]!.message,
      /dirty log \(32 bytes\): SIGBUS at offset 0x[0-9a-f]+: its file is shorter than SET_LOG_BASE said/,
    );
  } finally {
    fe.close();
    server.close();
    ram.close();
    native.close(logFd);
  }
});
