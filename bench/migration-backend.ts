/**
 * Benchmark of the back-end side of a migration: saving and loading a switch port's state
 * (port-state stream v2) with 0 to 16 384 learned MACs, and the stream engine alone (CRC and
 * parse) on a large section. Prints, asserts nothing.
 *
 * Run: node dist/bench/migration-backend.js
 */
import { performance } from "node:perf_hooks";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { loadPortState, savePortState } from "../src/net/port-state.js";
import { MigrationFormat } from "../src/migration/stream.js";

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
for (const n of [0, 64, 1024, 16_384]) {
  const r = portRound(n);
  console.log(
    `  ${String(n).padStart(6)} MACs  ${String(r.bytes).padStart(7)} bytes  ` +
      `save ${r.saveMs.toFixed(3)} ms  load ${r.loadMs.toFixed(3)} ms`,
  );
}
const s = streamRound(16 << 20);
console.log(`stream engine, one 16 MiB section: load (CRC + copy) ${s.mbps.toFixed(0)} MB/s`);
