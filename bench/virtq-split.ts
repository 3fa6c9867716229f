/**
 * Micro-benchmark of the split virtqueue data path: pop + pushUsed + publish per second on
 * the device side, over a 256-entry ring with 1-descriptor chains (the driver side refills
 * between rounds and is timed separately). Prints, asserts nothing.
 *
 * Run: node dist/bench/virtq-split.js [seconds]
 */
import { performance } from "node:perf_hooks";
import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import { splitRingPlacement } from "../src/virtq/layout.js";
import { SplitDeviceQueue, SplitDriverQueue } from "../src/virtq/split.js";
import type { Segment } from "../src/virtq/types.js";

interface Result {
  name: string;
  chains: number;
  deviceSeconds: number;
  driverSeconds: number;
}

function run(name: string, seconds: number, eventIdx: boolean, withLog: boolean): Result {
  const size = 256;
  const memSize = 1 << 20;
  const mem = new GuestMemory([
    createRegion(
      { gpa: gpa(0), size: memSize, uaddr: uaddr(0x10000000), mmapOffset: mmapOffset(0) },
      new ArrayBuffer(memSize),
    ),
  ]);
  if (withLog) mem.log = new DirtyLog(new ArrayBuffer(memSize / 4096 / 8), 0, memSize / 4096 / 8);
  const p = splitRingPlacement(0, size);
  const ring = {
    size,
    desc: gpa(p.desc),
    avail: gpa(p.avail),
    used: gpa(p.used),
    eventIdx,
  };
  const driver = new SplitDriverQueue(mem, ring);
  const device = new SplitDeviceQueue(mem, ring);
  const segs: Segment[][] = [];
  for (let i = 0; i < size; i++) {
    segs.push([{ gpa: gpa(0x10000 + i * 2048), len: 1500, writable: true }]);
  }
  let chains = 0;
  let deviceTime = 0;
  let driverTime = 0;
  const deadline = performance.now() + seconds * 1000;
  while (performance.now() < deadline) {
    for (let round = 0; round < 100; round++) {
      const t0 = performance.now();
      for (let i = 0; i < size; i++) driver.add(segs[i] as Segment[]);
      driver.kick();
      const t1 = performance.now();
      for (;;) {
        const c = device.pop();
        if (c === null) break;
        device.pushUsed(c, 64);
        chains++;
      }
      device.publish();
      const t2 = performance.now();
      while (driver.getUsed() !== null);
      const t3 = performance.now();
      deviceTime += t2 - t1;
      driverTime += t1 - t0 + (t3 - t2);
    }
  }
  return { name, chains, deviceSeconds: deviceTime / 1000, driverSeconds: driverTime / 1000 };
}

function main(): void {
  const seconds = Number(process.argv[2] ?? "1");
  // warm-up
  run("warm-up", 0.3, false, false);
  const rows = [
    run("no EVENT_IDX", seconds, false, false),
    run("EVENT_IDX", seconds, true, false),
    run("EVENT_IDX + dirty log", seconds, true, true),
  ];
  for (const r of rows) {
    const dev = r.chains / r.deviceSeconds / 1e6;
    const drv = r.chains / r.driverSeconds / 1e6;
    console.log(
      `split ring 256, 1-desc chains, ${r.name.padEnd(22)}: device pop+pushUsed+publish ` +
        `${dev.toFixed(2)} M chains/s; driver add+kick+getUsed ${drv.toFixed(2)} M/s`,
    );
  }
}

main();
