/**
 * The cost of dirty logging on the switch's data path, end to end: `vhostkit switch` (busy
 * polling, pinned to core 0, as in `switch-vs-dpdk`) between two vhostkit front-ends in this
 * process (pinned to core 1): port A's driver keeps its transmit ring full of frames to port
 * B's MAC and port B's driver keeps its receive ring full of buffers. The rate is the frames
 * B receives per second, measured with logging off and on in alternation; "on" is what a
 * migrating front-end sets (QEMU's `vhost_migration_log`: SET_LOG_BASE, VHOST_F_LOG_ALL,
 * VHOST_VRING_F_LOG on every ring, `startDirtyLogging`), and the log is fetched and cleared
 * every 100 ms as a migration's dirty sync does. DPDK's virtio_user cannot turn logging on,
 * hence vhostkit's own front-end here. Prints the loss per frame size.
 *
 * usage: node dist/bench/switch-dirty-log.js [--seconds 2] [--sizes 64,1500] [--repeat 3]
 *        [--cpu-prof DIR]
 *
 * `--cpu-prof DIR` runs the switch under `node --cpu-prof --cpu-prof-dir DIR`.
 */
import { spawnSync } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setImmediate as yieldTurn } from "node:timers/promises";

import { featureSet, VirtioFeature } from "../src/protocol/constants.js";
import type { Gpa } from "../src/memory/address.js";
import { native } from "../src/native.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { startDirtyLogging, stopDirtyLogging } from "../src/frontend/migration.js";
import type { FrontendDirtyLog } from "../src/frontend/migration.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import type { SplitDriverQueue } from "../src/virtq/split.js";
import type { Segment } from "../src/virtq/types.js";
import { startSwitchMiddle } from "./switch-vs-dpdk.js";

const RING = 256;
const BUF = 2048;
const RAM = 64 << 20;
const MAC_A = [0x52, 0x54, 0x00, 0x00, 0x99, 0x0a];
const MAC_B = [0x52, 0x54, 0x00, 0x00, 0x99, 0x0b];
const FEATURES = featureSet(VirtioFeature.VERSION_1, VirtioFeature.MRG_RXBUF);
const SYNC_MS = 100;

/** One front-end on one switch port. */
interface Port {
  fe: VhostUserFrontend;
  ram: GuestRam;
  rx: FrontendQueue;
  tx: FrontendQueue;
}

async function connect(path: string, name: string): Promise<Port> {
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000, requestTimeoutMs: 5000 });
  const ram = GuestRam.create({ regions: [{ gpa: 0, size: RAM }], name });
  await fe.negotiate({ features: FEATURES });
  const [rx, tx] = await fe.start(ram, [{ size: RING }, { size: RING }]);
  return { fe, ram, rx: rx as FrontendQueue, tx: tx as FrontendQueue };
}

/** A frame (with its 12-byte virtio-net header) from `src` to `dst` at `g` in `ram`. */
function putFrame(ram: GuestRam, g: Gpa, len: number, dst: number[], src: number[]): Segment[] {
  const b = new Uint8Array(12 + len);
  b.set(dst, 12);
  b.set(src, 18);
  b[24] = 0x08;
  ram.write(g, b);
  return [{ gpa: g, len: 12 + len, writable: false }];
}

function kick(q: FrontendQueue): void {
  if ((q.driver as SplitDriverQueue).kick() && q.kickFd >= 0) native.eventfdWrite(q.kickFd, 1);
}

/**
 * Keep A's transmit ring full and B's receive ring posted for `ms`; count what B received.
 * The loop yields to the event loop every few ms (protocol replies, log syncs).
 */
async function pump(
  txSegs: Segment[][],
  rxSegs: Segment[][],
  a: Port,
  b: Port,
  ms: number,
): Promise<number> {
  const tx = a.tx.driver as SplitDriverQueue;
  const rx = b.rx.driver as SplitDriverQueue;
  let received = 0;
  const end = performance.now() + ms;
  while (performance.now() < end) {
    const slice = performance.now() + 5;
    while (performance.now() < slice) {
      let u;
      while ((u = tx.getUsed()) !== null) tx.add(txSegs[u.token as number] as Segment[], u.token);
      kick(a.tx);
      while ((u = rx.getUsed()) !== null) {
        received++;
        rx.add(rxSegs[u.token as number] as Segment[], u.token);
      }
      kick(b.rx);
    }
    await yieldTurn();
  }
  return received;
}

async function measure(
  size: number,
  seconds: number,
  repeat: number,
  cpuProfDir: string | null,
): Promise<number[]> {
  const dir = await mkdtemp(join(tmpdir(), "vk-swlog-"));
  const mid = await startSwitchMiddle(dir, 1, true, cpuProfDir);
  const ports: Port[] = [];
  try {
    const a = await connect(mid.sockets[0], "swlog-a");
    ports.push(a);
    const b = await connect(mid.sockets[1], "swlog-b");
    ports.push(b);
    const txSegs: Segment[][] = [];
    const rxSegs: Segment[][] = [];
    for (let i = 0; i < RING; i++) {
      txSegs.push(putFrame(a.ram, a.ram.alloc(BUF, 64), size, MAC_B, MAC_A));
      rxSegs.push([{ gpa: b.ram.alloc(BUF, 64), len: BUF, writable: true }]);
    }
    // B sends one frame first so that the switch learns its MAC (unicast from then on).
    const hello = putFrame(b.ram, b.ram.alloc(BUF, 64), 60, MAC_A, MAC_B);
    (b.tx.driver as SplitDriverQueue).add(hello);
    kick(b.tx);
    for (let i = 0; i < RING; i++) (a.tx.driver as SplitDriverQueue).add(txSegs[i]!, i);
    for (let i = 0; i < RING; i++) (b.rx.driver as SplitDriverQueue).add(rxSegs[i]!, i);
    kick(a.tx);
    kick(b.rx);
    await pump(txSegs, rxSegs, a, b, 1000); // warm-up
    const losses: number[] = [];
    for (let r = 0; r < repeat; r++) {
      const off = await pump(txSegs, rxSegs, a, b, seconds * 1000);
      const logs: FrontendDirtyLog[] = [];
      for (const p of ports) logs.push(await startDirtyLogging(p.fe));
      const sync = setInterval(() => {
        for (const l of logs) l.fetchAndClear(() => {});
      }, SYNC_MS);
      let on: number;
      try {
        await pump(txSegs, rxSegs, a, b, 300); // the rings were rebuilt: settle
        on = await pump(txSegs, rxSegs, a, b, seconds * 1000);
      } finally {
        clearInterval(sync);
        for (let i = 0; i < ports.length; i++) await stopDirtyLogging(ports[i]!.fe, logs[i]!);
      }
      const offRate = off / seconds;
      const onRate = on / seconds;
      losses.push(1 - onRate / offRate);
      console.log(
        `  ${size} B run ${r + 1}: log off ${(offRate / 1e6).toFixed(2)} M/s, ` +
          `log on ${(onRate / 1e6).toFixed(2)} M/s, loss ${(100 * (1 - onRate / offRate)).toFixed(1)} %`,
      );
      await pump(txSegs, rxSegs, a, b, 300);
    }
    return losses;
  } finally {
    for (const p of ports) {
      p.fe.close();
      p.ram.close();
    }
    await mid.close();
    await rm(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  let seconds = 2;
  let sizes = [64, 1500];
  let repeat = 3;
  let cpuProfDir: string | null = null;
  for (let i = 0; i < args.length; i += 2) {
    const k = args[i];
    const v = args[i + 1] ?? "";
    if (k === "--seconds") seconds = Number(v);
    else if (k === "--sizes") sizes = v.split(",").map(Number);
    else if (k === "--repeat") repeat = Number(v);
    else if (k === "--cpu-prof") cpuProfDir = v;
    else throw new Error(`unknown option ${k}`);
  }
  // The front-ends poll on core 1; the switch is pinned to core 0.
  spawnSync("taskset", ["-pc", "1", String(process.pid)], { stdio: "ignore" });
  console.log(
    `vhostkit switch (busy polling, core 0) between two vhostkit front-ends (core 1): ` +
      `dirty logging off vs on, ${seconds} s per run, ${repeat} alternated run(s)`,
  );
  const rows: string[] = [];
  for (const size of sizes) {
    const losses = await measure(size, seconds, repeat, cpuProfDir);
    const sorted = [...losses].sort((x, y) => x - y);
    const median = sorted[Math.floor(sorted.length / 2)] ?? 0;
    rows.push(
      `${String(size).padStart(5)} B: median loss ${(100 * median).toFixed(1)} % ` +
        `[${losses.map((x) => (100 * x).toFixed(1)).join(", ")}]`,
    );
  }
  console.log("\ndirty logging on the switch's rings (VHOST_F_LOG_ALL + VHOST_VRING_F_LOG):");
  for (const r of rows) console.log(r);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
