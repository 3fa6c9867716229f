/**
 * Benchmark of a front-end-driven live migration: downtime and total time for a device with
 * 1 GiB of guest RAM (a part of it filled with data) under echo traffic, moved between two
 * vhostkit back-ends (NetTestDevice echo with a saveState, in this process: `vhostkit`; each in
 * its own process, as beside a real VMM: `vhostkit-process`), between two
 * DPDK testpmd vhost PMDs (io forwarding, dirty log only) and, under FUSE reads, between two
 * QEMU virtiofsd processes (libvhost-user, dirty log only); then the device-state transfer
 * throughput over SET_DEVICE_STATE_FD (SAVE and LOAD) for a large state. Prints, asserts
 * nothing.
 *
 * Where QEMU can run, the same RAM size is migrated by QEMU 7.2 (TCG, an idle guest attached to
 * two testpmd vhost PMDs) and QEMU's own downtime and total time are printed alongside
 * (`--no-qemu` skips it).
 *
 * usage: node dist/bench/migration.js [--mem 1G] [--fill 256M]
 *        [--backends vhostkit,vhostkit-process,dpdk,virtiofsd]
 *        [--state 64M] [--repeat 1] [--no-qemu]
 */
import { spawn } from "node:child_process";
import type { ChildProcessWithoutNullStreams } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { randomBytes } from "node:crypto";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { performance } from "node:perf_hooks";

import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { loadBackendState, saveBackendState } from "../src/frontend/migration.js";
import { SeqTrafficGuest, migrateSource, receiveMigration } from "../src/orchestrator/index.js";
import type {
  IncomingResult,
  MigratableGuest,
  MigrationResult,
} from "../src/orchestrator/index.js";
import { featureSet, VirtioFeature } from "../src/protocol/constants.js";
import { startVirtiofsd } from "../test/peers/libvhost-user.js";
import type { LibvhostUserPeer } from "../test/peers/libvhost-user.js";
import {
  FS_REQUEST_QUEUE,
  FUSE_ROOT_ID,
  VIRTIO_ID_FS,
  VirtioFsDriver,
} from "../test/peers/virtio-fs.js";
import type { VirtioFsDriverState } from "../test/peers/virtio-fs.js";
import { freeTcpPort, startGuest } from "../test/peers/qemu.js";
import type { Guest } from "../test/peers/qemu.js";
import { startTestpmd } from "../test/peers/testpmd.js";
import type { Testpmd } from "../test/peers/testpmd.js";
import { sleep } from "../test/helpers.js";

function size(text: string): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(text);
  if (!m) throw new Error(`bad size ${text}`);
  const mult = { "": 1, k: 1 << 10, m: 1 << 20, g: 1 << 30 }[(m[2] as string).toLowerCase()] ?? 1;
  return Number(m[1]) * mult;
}

/** Bytes kept for the counters (JSON) at the start of a {@link StatefulEcho} state. */
const HEAD = 256;

/**
 * An echo device whose state is its counters plus `extra` bytes of opaque data:
 * `u32 n | counters as JSON (n bytes, in a 256-byte slot) | extra`. The state is built once
 * when `extra` is set and only its counters are rewritten at each save, and a loaded state is
 * kept as it came: the device-state figure measures the channel, not the device's copies.
 */
class StatefulEcho extends NetTestDevice {
  #state: Uint8Array = new Uint8Array(HEAD + 4);
  loaded = 0;
  constructor() {
    super({ mode: "echo" });
  }
  get extra(): Uint8Array {
    return this.#state.subarray(4 + HEAD);
  }
  set extra(bytes: Uint8Array) {
    const state = new Uint8Array(4 + HEAD + bytes.length);
    state.set(bytes, 4 + HEAD);
    this.#state = state;
  }
  saveState(): Uint8Array {
    const head = Buffer.from(JSON.stringify(this.counters[0]));
    if (head.length > HEAD)
      throw new RangeError(`StatefulEcho: counters take ${head.length} bytes`);
    new DataView(this.#state.buffer, this.#state.byteOffset).setUint32(0, head.length);
    this.#state.set(head, 4);
    return this.#state;
  }
  loadState(data: Uint8Array): void {
    if (data.length < 4 + HEAD)
      throw new RangeError(`StatefulEcho.loadState: ${data.length} bytes`);
    const n = new DataView(data.buffer, data.byteOffset, data.length).getUint32(0);
    if (n > HEAD) throw new RangeError(`StatefulEcho.loadState: counters of ${n} bytes`);
    const saved: unknown = JSON.parse(Buffer.from(data.subarray(4, 4 + n)).toString());
    const c = this.counters[0];
    if (c === undefined || typeof saved !== "object" || saved === null) {
      throw new RangeError("StatefulEcho.loadState: counters missing from the state");
    }
    // Apply the source's counters: the destination's port goes on counting from them.
    for (const k of ["rxPackets", "rxBytes", "txPackets", "txBytes", "dropped"] as const) {
      const v = (saved as Record<string, unknown>)[k];
      if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
        throw new RangeError(`StatefulEcho.loadState: counter ${k} = ${String(v)}`);
      }
      c[k] = v;
    }
    this.#state = data;
    this.loaded = data.length;
  }
}

interface Ends {
  pathA: string;
  pathB: string;
  close(): Promise<void>;
}

/**
 * Two vhostkit back-ends, each in its own process (bench/backend-process.js, echo, a 260-byte
 * state): the layout of a real deployment, where the VMM and the back-end are two processes.
 */
async function vhostkitProcessEnds(dir: string): Promise<Ends> {
  const script = fileURLToPath(new URL("./backend-process.js", import.meta.url));
  const children: ChildProcessWithoutNullStreams[] = [];
  try {
    for (const name of ["a", "b"]) {
      const child = spawn(process.execPath, [
        script,
        "--socket",
        join(dir, `${name}.sock`),
        "--mode",
        "echo",
        "--state-bytes",
        String(4 + HEAD),
      ]);
      child.stderr.pipe(process.stderr);
      children.push(child);
      await once(child.stdout, "data");
    }
  } catch (err) {
    for (const c of children) c.kill();
    throw err;
  }
  return {
    pathA: join(dir, "a.sock"),
    pathB: join(dir, "b.sock"),
    close: async () => {
      for (const c of children) {
        c.stdin.end();
        if (c.exitCode === null) await once(c, "exit");
      }
    },
  };
}

async function vhostkitEnds(dir: string): Promise<Ends> {
  const a = serveBackend(new StatefulEcho(), { path: join(dir, "a.sock") });
  const b = serveBackend(new StatefulEcho(), { path: join(dir, "b.sock") });
  return {
    pathA: join(dir, "a.sock"),
    pathB: join(dir, "b.sock"),
    close: async () => {
      a.close();
      b.close();
    },
  };
}

async function dpdkEnds(dir: string): Promise<Ends & { tps: Testpmd[] }> {
  const common = { forwardMode: "io" as const, extraAppArgs: ["--port-topology=loop"] };
  // Both pollers on core 0, both control threads (vhost-events, which answers the vhost-user
  // requests) on core 1: on this 2-core machine the destination's control thread would
  // otherwise wait for the source's poller's time slice at every request of the switch-over,
  // where a real host gives its pollers cores of their own. Only one poller runs at a time:
  // the source's is stopped before the destination's starts.
  const tps = await Promise.all([
    startTestpmd({
      ...common,
      vdev: { kind: "vhost", iface: join(dir, "a.sock") },
      forwardLcore: 0,
      name: "bm-a",
    }),
    startTestpmd({
      ...common,
      vdev: { kind: "vhost", iface: join(dir, "b.sock") },
      forwardLcore: 0,
      name: "bm-b",
    }),
  ]);
  await Promise.all(tps.map((t) => t.ready()));
  return {
    tps,
    pathA: join(dir, "a.sock"),
    pathB: join(dir, "b.sock"),
    close: async () => {
      for (const t of tps) await t.close();
    },
  };
}

async function oneMigration(
  kind: string,
  mem: number,
  fill: number,
): Promise<{ res: MigrationResult; echoesBefore: number; echoesAfter: number }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-mig-"));
  const ends =
    kind === "dpdk"
      ? await dpdkEnds(dir)
      : kind === "vhostkit-process"
        ? await vhostkitProcessEnds(dir)
        : await vhostkitEnds(dir);
  const fe = await VhostUserFrontend.connect(ends.pathA);
  const ram = GuestRam.create({ size: mem, name: "bench-mig" });
  let dst: IncomingResult | null = null;
  const server = createServer({ noDelay: true });
  try {
    await fe.negotiate();
    await fe.start(ram, [256, 256]);
    const chunk = new Uint8Array(1 << 20);
    for (let off = 0; off < fill; off += chunk.length) {
      for (let i = 0; i < chunk.length; i += 64) chunk[i] = (off + i) & 0xff || 1;
      ram.write(ram.alloc(chunk.length, 4096), chunk);
    }
    if ("tps" in ends) {
      const [a] = ends.tps as [Testpmd, Testpmd];
      await a.waitLinkUp();
      await a.start();
    }
    const gen = new SeqTrafficGuest(fe, { burst: 32 });
    gen.start();
    await sleep(500);
    const echoesBefore = gen.received;
    let incoming: Promise<IncomingResult> | null = null;
    server.on("connection", (s: Socket) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(ends.pathB),
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as AddressInfo).port;
    const stream = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
      s.once("error", reject);
    });
    const res = await migrateSource({
      frontend: fe,
      stream,
      guest: gen,
      deviceFields: new Uint8Array([2, 0, 0, 0, 0, 1]),
    });
    gen.stop();
    dst = await (incoming as unknown as Promise<IncomingResult>);
    if ("tps" in ends) {
      const [a, b] = ends.tps as [Testpmd, Testpmd];
      await a.stop();
      await b.waitLinkUp();
      await b.start();
    }
    const gen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState ?? new Uint8Array());
    gen2.start();
    await sleep(300);
    gen2.stop();
    return { res, echoesBefore, echoesAfter: gen2.received };
  } finally {
    server.close();
    fe.close();
    dst?.frontend.close();
    dst?.ram.close();
    ram.close();
    await ends.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A guest reading a file through FUSE in a loop (random offsets and lengths). */
class FsReader implements MigratableGuest {
  reads = 0;
  #paused = false;
  #loop: Promise<void> | null = null;
  constructor(
    readonly driver: VirtioFsDriver,
    readonly file: Buffer,
  ) {}

  start(): void {
    this.#paused = false;
    this.#loop = this.#run();
  }

  async #run(): Promise<void> {
    const { nodeid } = await this.driver.lookup(FUSE_ROOT_ID, "data.bin");
    const fh = await this.driver.open(nodeid);
    let x = 7;
    while (!this.#paused) {
      x = (x * 1103515245 + 12345) >>> 0;
      const off = x % (this.file.length - 1);
      const len = 1 + ((x >>> 8) % (64 << 10));
      const r = await this.driver.read(nodeid, fh, off, len);
      const want = this.file.subarray(off, Math.min(this.file.length, off + len));
      if (!Buffer.from(r.body).equals(want)) throw new Error(`read ${off}+${len} differs`);
      this.reads++;
    }
    await this.driver.release(nodeid, fh);
  }

  async pause(): Promise<void> {
    this.#paused = true;
    await this.#loop;
  }

  resume(): void {
    this.start();
  }

  saveState(): Uint8Array {
    return Buffer.from(JSON.stringify(this.driver.saveState()));
  }
}

/**
 * QEMU 7.2's virtiofsd to a second virtiofsd sharing the same directory, under FUSE reads:
 * reads before the migration, and reads on the destination in 300 ms after it.
 */
async function virtiofsdMigration(
  mem: number,
  fill: number,
): Promise<{ res: MigrationResult; echoesBefore: number; echoesAfter: number }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-vfs-"));
  const file = randomBytes(1 << 20);
  writeFileSync(join(dir, "data.bin"), file);
  const peers: LibvhostUserPeer[] = [];
  let fe: VhostUserFrontend | null = null;
  let ram: GuestRam | null = null;
  let dst: IncomingResult | null = null;
  const server = createServer({ noDelay: true });
  try {
    const srcPeer = await startVirtiofsd({ source: dir });
    peers.push(srcPeer);
    const dstPeer = await startVirtiofsd({ source: dir });
    peers.push(dstPeer);
    fe = await VhostUserFrontend.connect(srcPeer.socketPath, { timeoutMs: 5000 });
    ram = GuestRam.create({ size: mem, name: "bench-mig-vfs" });
    await fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
    const queues = await fe.start(ram, [128, 128]);
    const driver = new VirtioFsDriver(queues[FS_REQUEST_QUEUE] as never, ram);
    await driver.init();
    const chunk = new Uint8Array(1 << 20);
    for (let off = 0; off < fill; off += chunk.length) {
      for (let i = 0; i < chunk.length; i += 64) chunk[i] = (off + i) & 0xff || 1;
      ram.write(ram.alloc(chunk.length, 4096), chunk);
    }
    const guest = new FsReader(driver, file);
    guest.start();
    await sleep(500);
    const echoesBefore = guest.reads;
    let incoming: Promise<IncomingResult> | null = null;
    server.on("connection", (s: Socket) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(dstPeer.socketPath, { timeoutMs: 5000 }),
      });
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as AddressInfo).port;
    const stream = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
      s.once("error", reject);
    });
    const res = await migrateSource({ frontend: fe, stream, guest, deviceId: VIRTIO_ID_FS });
    dst = await (incoming as unknown as Promise<IncomingResult>);
    // QEMU 7.2's virtiofsd has no DEVICE_STATE: the FUSE session does not move, the driver
    // goes on from its migrated state and mounts again.
    const state = JSON.parse(
      Buffer.from(dst.guestState ?? new Uint8Array()).toString(),
    ) as VirtioFsDriverState;
    const q = dst.queues[FS_REQUEST_QUEUE];
    const d2 = new VirtioFsDriver(q as never, dst.ram, { restore: state });
    await d2.init();
    const after = new FsReader(d2, file);
    after.start();
    await sleep(300);
    await after.pause();
    d2.detach();
    return { res, echoesBefore, echoesAfter: after.reads };
  } finally {
    server.close();
    fe?.close();
    dst?.frontend.close();
    dst?.ram.close();
    ram?.close();
    for (const p of peers) await p.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * QEMU 7.2 (TCG) migrating a guest with the same RAM size, attached to two testpmd vhost PMDs
 * (the comparable migration; QEMU reports its own downtime and total time).
 */
async function qemuMigration(memMiB: number): Promise<{ downtimeMs: number; totalMs: number }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-qemu-"));
  const ends = await dpdkEnds(dir);
  const guests: Guest[] = [];
  try {
    const nic = { mode: "client" as const, guestAnnounceOff: true };
    // Exactly memMiB (no TCG workaround slack): QEMU's downtime for the same RAM size.
    const src = await startGuest({
      name: "bm-src",
      memMiB,
      ramSlackKiB: 0,
      nics: [{ socketPath: ends.pathA, ...nic }],
    });
    guests.push(src);
    const port = await freeTcpPort();
    const dst = await startGuest({
      name: "bm-dst",
      memMiB,
      ramSlackKiB: 0,
      incoming: `tcp:127.0.0.1:${port}`,
      nics: [{ socketPath: ends.pathB, ...nic }],
    });
    guests.push(dst);
    await src.ready(90_000);
    await dst.waitStatus("inmigrate", 30_000);
    const info = await src.migrate(`tcp:127.0.0.1:${port}`, 120_000);
    return { downtimeMs: info.downtimeMs ?? NaN, totalMs: info.totalTimeMs ?? NaN };
  } finally {
    for (const g of guests) await g.kill();
    await ends.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function stateThroughput(bytes: number): Promise<{ saveMBs: number; loadMBs: number }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-state-"));
  const dev = new StatefulEcho();
  dev.extra = new Uint8Array(bytes).fill(0x5a);
  const srv = serveBackend(dev, { path: join(dir, "s.sock"), maxStateBytes: bytes * 2 });
  const fe = await VhostUserFrontend.connect(join(dir, "s.sock"));
  const ram = GuestRam.create({ size: 4 << 20 });
  try {
    await fe.negotiate();
    await fe.start(ram, [256, 256]);
    for (const i of [0, 1]) await fe.stopQueue(i);
    let t = performance.now();
    const data = await saveBackendState(fe, { maxBytes: bytes + (1 << 20) });
    const saveMs = performance.now() - t;
    t = performance.now();
    await loadBackendState(fe, data);
    const loadMs = performance.now() - t;
    return {
      saveMBs: data.length / 1048576 / (saveMs / 1000),
      loadMBs: data.length / 1048576 / (loadMs / 1000),
    };
  } finally {
    fe.close();
    ram.close();
    srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      mem: { type: "string", default: "1G" },
      fill: { type: "string", default: "256M" },
      backends: { type: "string", default: "vhostkit,vhostkit-process,dpdk,virtiofsd" },
      state: { type: "string", default: "64M" },
      repeat: { type: "string", default: "1" },
    },
    args: process.argv.slice(2).filter((a) => a !== "--no-qemu"),
  });
  const qemu = !process.argv.includes("--no-qemu");
  const mem = size(values.mem);
  const fill = size(values.fill);
  const repeat = Number(values.repeat);
  console.log(
    `guest RAM ${mem / 1048576} MiB (${fill / 1048576} MiB of data), echo traffic during the migration`,
  );
  console.log(
    "backend          downtime(ms)  total(ms)  iterations  pages     zero      final  stream(MiB)  state(B)  echoes before/after",
  );
  const runs: { kind: string; res: MigrationResult }[] = [];
  for (let r = 0; r < repeat; r++) {
    for (const kind of values.backends.split(",")) {
      const { res, echoesBefore, echoesAfter } =
        kind === "virtiofsd"
          ? await virtiofsdMigration(mem, fill)
          : await oneMigration(kind, mem, fill);
      runs.push({ kind, res });
      console.log(
        `${kind.padEnd(16)} ${res.downtimeMs.toFixed(1).padStart(12)} ${res.totalMs.toFixed(0).padStart(10)} ` +
          `${String(res.iterations).padStart(11)} ${String(res.pagesSent).padStart(9)} ` +
          `${String(res.zeroPages).padStart(9)} ${String(res.finalPages).padStart(6)} ` +
          `${(res.bytesSent / 1048576).toFixed(1).padStart(12)} ${String(res.backendStateBytes).padStart(9)}` +
          `  ${echoesBefore} / ${echoesAfter}`,
      );
    }
  }
  for (const { kind, res } of runs) {
    console.log(`${kind} downtime breakdown:`);
    for (const d of res.downtimeSteps) {
      console.log(`  ${d.step.padEnd(36)} ${d.ms.toFixed(2).padStart(8)} ms`);
    }
  }
  if (qemu) {
    try {
      const q = await qemuMigration(mem / 1048576);
      console.log(
        `qemu+dpdk ${q.downtimeMs.toFixed(1).padStart(12)} ${q.totalMs.toFixed(0).padStart(10)}` +
          "   (QEMU 7.2 TCG's own figures, same RAM size, guest idle, testpmd back-ends)",
      );
      for (const { kind, res } of runs) {
        console.log(
          `${kind} downtime / QEMU's: ${(res.downtimeMs / q.downtimeMs).toFixed(2)} ` +
            `(${res.downtimeMs.toFixed(1)} / ${q.downtimeMs.toFixed(1)} ms)`,
        );
      }
    } catch (err) {
      console.log(`qemu+dpdk: not run (${(err as Error).message.split("\n")[0] ?? ""})`);
    }
  }
  const st = size(values.state);
  // Three rounds (a process's first transfer also pays for fresh memory), the median.
  const tps: { saveMBs: number; loadMBs: number }[] = [];
  for (let i = 0; i < 3; i++) tps.push(await stateThroughput(st));
  const mid = (xs: number[]): number => [...xs].sort((a, b) => a - b)[1] as number;
  console.log(
    `device state over SET_DEVICE_STATE_FD, ${st / 1048576} MiB, median of 3: ` +
      `SAVE ${mid(tps.map((t) => t.saveMBs)).toFixed(0)} MiB/s, ` +
      `LOAD ${mid(tps.map((t) => t.loadMBs)).toFixed(0)} MiB/s`,
  );
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
