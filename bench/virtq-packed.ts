/**
 * Packed virtqueue throughput: device-side pop + pushUsed + publish per second for
 * 1-descriptor chains (the driver side refills the ring between batches; its time is excluded).
 *
 * Run: `node dist/bench/virtq-packed.js [queueSize] [batch] [seconds]`
 */
import { performance } from "node:perf_hooks";

import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import { createRegion, GuestMemory } from "../src/memory/guest-memory.js";
import { packedRingSizes } from "../src/virtq/layout.js";
import { PackedDeviceQueue, PackedDriverQueue } from "../src/virtq/packed.js";
import type { DescChain, Segment } from "../src/virtq/types.js";

/**
 * Run the benchmark and print the result.
 * @param size queue size
 * @param batch chains popped before one publish
 * @param seconds how long to measure
 */
function main(size: number, batch: number, seconds: number): void {
  const memSize = 0x40_0000;
  const mem = new GuestMemory([
    createRegion(
      { gpa: gpa(0), size: memSize, uaddr: uaddr(0x7f00_0000_0000), mmapOffset: mmapOffset(0) },
      new ArrayBuffer(memSize),
    ),
  ]);
  const sizes = packedRingSizes(size);
  const ring = {
    size,
    desc: gpa(0x1000),
    driverEvent: gpa(0x1000 + sizes.desc),
    deviceEvent: gpa(0x1000 + sizes.desc + sizes.driverEvent),
    eventIdx: true,
  };
  const drv = new PackedDriverQueue(mem, ring);
  const dev = new PackedDeviceQueue(mem, ring);
  const seg: Segment[] = [{ gpa: gpa(0x20_0000), len: 1500, writable: true }];
  const chains: DescChain[] = [];

  let ops = 0;
  let deviceNs = 0;
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    // refill (driver side, not timed)
    while (drv.getUsed() !== null);
    while (drv.add(seg) !== null);
    drv.kick();
    // device side (timed)
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < 64; i++) {
      for (let k = 0; k < batch; k++) {
        const c = dev.pop();
        if (c === null) break;
        chains.push(c);
      }
      if (chains.length === 0) break;
      for (const c of chains) dev.pushUsed(c, 64);
      ops += chains.length;
      chains.length = 0;
      dev.publish();
    }
    deviceNs += Number(process.hrtime.bigint() - t0);
  }
  const perSec = ops / (deviceNs / 1e9);
  console.log(
    `packed virtqueue, size ${size}, batch ${batch}, 1-descriptor chains: ` +
      `${(perSec / 1e6).toFixed(2)} M pop+push+publish/s (${ops} chains, ` +
      `${(deviceNs / ops).toFixed(1)} ns each)`,
  );
}

const args = process.argv.slice(2).map(Number);
main(args[0] || 256, args[1] || 32, args[2] || 2);
main(args[0] || 256, 1, args[2] || 2);
