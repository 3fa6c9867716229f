/**
 * Benchmark of the back-end side of a migration: saving and loading a switch port's state
 * (port-state stream v2) with 0 to 16 384 learned MACs, and the stream engine alone (CRC and
 * parse) on a large section, and the device-state transfer over SET_DEVICE_STATE_FD between an
 * in-process front-end and back-end: SAVE and LOAD of a 64 MiB state (`--rounds` rounds, 5 by
 * default, each on a new connection; every round and the median; then as many on one connection
 * to a back-end in its own process, bench/backend-process.js), and the time of SAVE and
 * LOAD of an 87-byte state with the default size caps (the channel's fixed cost: first call and
 * median of 20).
 * Prints, asserts nothing.
 *
 * Run: node dist/bench/migration-backend.js [--state-only] [--rounds N]
 */
import { performance } from "node:perf_hooks";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { loadPortState, savePortState } from "../src/net/port-state.js";
import { MigrationFormat } from "../src/migration/stream.js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { loadBackendState, saveBackendState } from "../src/frontend/migration.js";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { fileURLToPath } from "node:url";

/** A device whose state is a fixed blob. */
class BlobDevice extends NetTestDevice {
  blob: Uint8Array = new Uint8Array(0);
  loaded = 0;
  constructor() {
    super({ mode: "sink" });
  }
  saveState(): Uint8Array {
    return this.blob;
  }
  loadState(data: Uint8Array): void {
    this.loaded = data.length;
  }
}

async function stateRound(
  bytes: number,
  repeat = 1,
): Promise<{ saveMBs: number; loadMBs: number; saveMs: number[]; loadMs: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-state-"));
  const dev = new BlobDevice();
  dev.blob = new Uint8Array(bytes).fill(0x5a);
  // A small state uses the default caps, as a migration does (256 MiB on the front-end, 64 MiB
  // on the back-end).
  const small = bytes < 1 << 20;
  const srv = serveBackend(dev, {
    path: join(dir, "s.sock"),
    ...(small ? {} : { maxStateBytes: bytes * 2 }),
  });
  const fe = await VhostUserFrontend.connect(join(dir, "s.sock"));
  const ram = GuestRam.create({ size: 4 << 20 });
  try {
    await fe.negotiate();
    await fe.start(ram, [256, 256]);
    for (const i of [0, 1]) await fe.stopQueue(i);
    const saveMs: number[] = [];
    const loadMs: number[] = [];
    for (let i = 0; i < repeat; i++) {
      let t = performance.now();
      const data = await saveBackendState(fe, small ? {} : { maxBytes: bytes + (1 << 20) });
      saveMs.push(performance.now() - t);
      t = performance.now();
      await loadBackendState(fe, data);
      loadMs.push(performance.now() - t);
      if (dev.loaded !== bytes) throw new Error(`loaded ${dev.loaded} of ${bytes} bytes`);
    }
    return {
      saveMBs: bytes / 1048576 / ((saveMs[0] as number) / 1000),
      loadMBs: bytes / 1048576 / ((loadMs[0] as number) / 1000),
      saveMs,
      loadMs,
    };
  } finally {
    fe.close();
    ram.close();
    srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * SAVE and LOAD against a back-end in its own process (bench/backend-process.js): `rounds`
 * transfers on one connection.
 */
async function processRounds(
  bytes: number,
  rounds: number,
): Promise<{ saveMBs: number[]; loadMBs: number[] }> {
  const dir = mkdtempSync(join(tmpdir(), "vk-bench-state-p-"));
  const sock = join(dir, "s.sock");
  const script = fileURLToPath(new URL("./backend-process.js", import.meta.url));
  const child = spawn(
    process.execPath,
    [script, "--socket", sock, "--mode", "sink", "--state-bytes", String(bytes)],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const ram = GuestRam.create({ size: 4 << 20 });
  let fe: VhostUserFrontend | null = null;
  try {
    await once(child.stdout, "data");
    fe = await VhostUserFrontend.connect(sock);
    await fe.negotiate();
    await fe.start(ram, [256, 256]);
    for (const i of [0, 1]) await fe.stopQueue(i);
    const saveMBs: number[] = [];
    const loadMBs: number[] = [];
    for (let i = 0; i < rounds; i++) {
      let t = performance.now();
      const data = await saveBackendState(fe, { maxBytes: bytes });
      saveMBs.push(bytes / 1048576 / ((performance.now() - t) / 1000));
      t = performance.now();
      await loadBackendState(fe, data);
      loadMBs.push(bytes / 1048576 / ((performance.now() - t) / 1000));
    }
    return { saveMBs, loadMBs };
  } finally {
    fe?.close();
    ram.close();
    child.stdin.end();
    await once(child, "exit");
    rmSync(dir, { recursive: true, force: true });
  }
}

function macOf(i: number): string {
  const b = [0x02, 0, (i >> 24) & 0xff, (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff];
  return b.map((x) => x.toString(16).padStart(2, "0")).join(":");
}

function portRound(macs: number): { bytes: number; saveMs: number; loadMs: number } {
  const swA = new Switch({ maxMacs: 20_000 });
  const swB = new Switch({ maxMacs: 20_000 });
  const a = new VirtioNetDevice({ name: "vm", queuePairs: 4, mac: "52:54:00:00:00:01" });
  const b = new VirtioNetDevice({ name: "vm", queuePairs: 4, mac: "52:54:00:00:00:01" });
  swA.addPort(a);
  swB.addPort(b);
  for (let i = 0; i < macs; i++) swA.learnMac(macOf(i), "vm");
  const rounds = macs > 1000 ? 5 : 200;
  let data: Uint8Array = new Uint8Array(0);
  let t = performance.now();
  for (let i = 0; i < rounds; i++) data = savePortState(a, { host: swA });
  const saveMs = (performance.now() - t) / rounds;
  t = performance.now();
  for (let i = 0; i < rounds; i++) loadPortState(b, data, { host: swB });
  const loadMs = (performance.now() - t) / rounds;
  swA.close();
  swB.close();
  return { bytes: data.length, saveMs, loadMs };
}

function streamRound(sectionBytes: number): { mbps: number } {
  const blob = new Uint8Array(sectionBytes).fill(7);
  const f = new MigrationFormat<null>([
    {
      id: 1,
      stages: [
        {
          name: "blob",
          save: (_c, w) => w.bytes("blob", blob),
          load: (_c, r) => void r.bytes("blob", sectionBytes),
        },
      ],
    },
  ]);
  const data = f.saveStream(null);
  const rounds = 20;
  const t = performance.now();
  for (let i = 0; i < rounds; i++) f.loadStream(null, data);
  const s = (performance.now() - t) / 1000;
  return { mbps: (data.length * rounds) / s / 1e6 };
}

console.log("port state v2 (4 queue pairs): save / load per call");
for (const n of process.argv.includes("--state-only") ? [] : [0, 64, 1024, 16_384]) {
  const r = portRound(n);
  console.log(
    `  ${String(n).padStart(6)} MACs  ${String(r.bytes).padStart(7)} bytes  ` +
      `save ${r.saveMs.toFixed(3)} ms  load ${r.loadMs.toFixed(3)} ms`,
  );
}
const only = process.argv.includes("--state-only");
const s = only ? { mbps: NaN } : streamRound(16 << 20);
console.log(`stream engine, one 16 MiB section: load (CRC + copy) ${s.mbps.toFixed(0)} MB/s`);
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

const roundsAt = process.argv.indexOf("--rounds");
const rounds = roundsAt > 0 ? Number(process.argv[roundsAt + 1]) : 5;
const saves: number[] = [];
const loads: number[] = [];
for (let i = 0; i < rounds; i++) {
  const r = await stateRound(64 << 20);
  saves.push(r.saveMBs);
  loads.push(r.loadMBs);
  console.log(
    `device state over SET_DEVICE_STATE_FD, 64 MiB: SAVE ${r.saveMBs.toFixed(0)} MiB/s, ` +
      `LOAD ${r.loadMBs.toFixed(0)} MiB/s`,
  );
}
console.log(
  `device state, 64 MiB, median of ${rounds}: SAVE ${median(saves).toFixed(0)} MiB/s, ` +
    `LOAD ${median(loads).toFixed(0)} MiB/s`,
);
const apart = await processRounds(64 << 20, rounds);
console.log(
  `device state, 64 MiB, back-end in its own process, ${rounds} transfers on one connection: ` +
    `SAVE ${apart.saveMBs.map((x) => x.toFixed(0)).join(", ")} MiB/s (median ` +
    `${median(apart.saveMBs).toFixed(0)}), LOAD ${apart.loadMBs.map((x) => x.toFixed(0)).join(", ")} ` +
    `MiB/s (median ${median(apart.loadMBs).toFixed(0)})`,
);
const tiny = await stateRound(87, 20);
console.log(
  `device state, 87 bytes: SAVE ${(tiny.saveMs[0] as number).toFixed(2)} ms first, ` +
    `${median(tiny.saveMs).toFixed(2)} ms median; LOAD ${(tiny.loadMs[0] as number).toFixed(2)} ms ` +
    `first, ${median(tiny.loadMs).toFixed(2)} ms median`,
);
