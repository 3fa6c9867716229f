/**
 * Micro-benchmark of the switch data path in one process, without sockets or a peer: two
 * `VirtioNetDevice` ports in a `Switch`, each over its own guest memory with split rings driven
 * by `SplitDriverQueue`. Each round the driver of port A makes a ring's worth of frames
 * available on its transmit queue and the driver of port B posts receive buffers; the time of
 * the device side alone (port A's transmit turn: pop, parse, MAC learn and lookup, copy into
 * B's receive chain, used entries, one publish per ring) is measured, so the figure is the CPU
 * cost per forwarded frame, unaffected by a peer's speed. `--log` also runs every case with
 * the dirty log attached (VHOST_F_LOG_ALL) and the used rings logged (VHOST_VRING_F_LOG), as a
 * migrating front-end sets them, and prints the loss.
 *
 * On a loaded machine the CPU time of a run still varies (caches and cores are shared): each
 * case runs `--repeat` times (alternating plain and logged runs) and the fastest run is taken.
 *
 * usage: node dist/bench/switch-path.js [--seconds 1] [--sizes 64,1500] [--repeat 5] [--log]
 */
import { performance } from "node:perf_hooks";

import type { BackendQueue, DeviceContext } from "../src/backend/device.js";
import { silentLogger } from "../src/backend/device.js";
import { gpa, mmapOffset, uaddr } from "../src/memory/address.js";
import type { Gpa } from "../src/memory/address.js";
import { DirtyLog } from "../src/memory/dirty-log.js";
import { GuestMemory, createRegion } from "../src/memory/guest-memory.js";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { featureSet, VirtioFeature } from "../src/protocol/constants.js";
import { readChain, writeChain, writeChainFrame } from "../src/virtq/chain-io.js";
import { splitRingPlacement } from "../src/virtq/layout.js";
import { SplitDeviceQueue, SplitDriverQueue } from "../src/virtq/split.js";
import type { DescChain, Segment } from "../src/virtq/types.js";

const RING = 256;
const MEM = 8 << 20;
const BUF = 2048;
const BUFS_AT = 1 << 20;
const MAC_A = [0x52, 0x54, 0x00, 0x00, 0x88, 0x0a];
const MAC_B = [0x52, 0x54, 0x00, 0x00, 0x88, 0x0b];

/** A started, enabled ring as the framework's `Vring` presents it (no fds, no event loop). */
class BenchQueue implements BackendQueue {
  readonly started = true;
  readonly enabled = true;
  readonly broken = null;
  notifies = 0;
  constructor(
    readonly index: number,
    readonly q: SplitDeviceQueue,
    readonly memory: GuestMemory,
  ) {}
  get size(): number {
    return this.q.size;
  }
  get inFlight(): number {
    return this.q.inFlight;
  }
  pop(): DescChain | null {
    return this.q.pop();
  }
  pushUsed(chain: DescChain, written: number): void {
    this.q.pushUsed(chain, written);
  }
  flush(): void {
    if (this.q.publish()) this.notifies++;
  }
  cancel(chains: readonly DescChain[]): boolean {
    return this.q.cancel(chains);
  }
  read(chain: DescChain, dst: Uint8Array, offset = 0): number {
    return readChain(this.memory, chain, dst, offset);
  }
  write(chain: DescChain, src: Uint8Array, offset = 0): number {
    return writeChain(this.memory, chain, src, offset);
  }
  writeFrame(chain: DescChain, hdr: Uint8Array, hdrLen: number, data: Uint8Array): number {
    return writeChainFrame(this.memory, chain, hdr, hdrLen, data);
  }
  markBroken(reason: string): void {
    throw new Error(`queue ${this.index} broken: ${reason}`);
  }
}

/** One port: its guest memory, rings (device and driver side) and the device. */
interface Side {
  mem: GuestMemory;
  bytes: Uint8Array;
  dev: VirtioNetDevice;
  rx: BenchQueue;
  tx: BenchQueue;
  rxDriver: SplitDriverQueue;
  txDriver: SplitDriverQueue;
}

function makeSide(name: string, log: boolean): Side {
  const buffer = new ArrayBuffer(MEM);
  const mem = new GuestMemory([
    createRegion(
      { gpa: gpa(0), size: MEM, uaddr: uaddr(0x10000000), mmapOffset: mmapOffset(0) },
      buffer,
    ),
  ]);
  const logBytes = MEM / 4096 / 8;
  if (log) mem.log = new DirtyLog(new ArrayBuffer(logBytes), 0, logBytes);
  const rings = [0, 1].map((i) => {
    const p = splitRingPlacement(i * 0x10000, RING);
    const spec = {
      size: RING,
      desc: gpa(p.desc),
      avail: gpa(p.avail),
      used: gpa(p.used),
      eventIdx: true,
    };
    const driver = new SplitDriverQueue(mem, spec);
    const device = new SplitDeviceQueue(mem, {
      ...spec,
      index: i,
      usedLog: log ? { logGuestAddr: p.used } : null,
    });
    return { driver, queue: new BenchQueue(i, device, mem) };
  });
  const dev = new VirtioNetDevice({ name, queuePairs: 1, ctrl: false });
  const [rx, tx] = rings as [(typeof rings)[0], (typeof rings)[0]];
  const features = featureSet(
    VirtioFeature.VERSION_1,
    VirtioFeature.MRG_RXBUF,
    VirtioFeature.RING_EVENT_IDX,
    ...(log ? [VirtioFeature.LOG_ALL] : []),
  );
  const ctx: DeviceContext = {
    logger: silentLogger,
    queue: (i) => (i === 0 ? rx.queue : i === 1 ? tx.queue : undefined),
    notifyConfigChange() {},
    features,
    protocolFeatures: 0n,
  };
  dev.attach(ctx);
  dev.setFeatures(features);
  dev.queueStateChanged(rx.queue);
  dev.queueStateChanged(tx.queue);
  return {
    mem,
    bytes: new Uint8Array(buffer),
    dev,
    rx: rx.queue,
    tx: tx.queue,
    rxDriver: rx.driver,
    txDriver: tx.driver,
  };
}

interface Result {
  frames: number;
  seconds: number;
}

function run(frameLen: number, seconds: number, log: boolean): Result {
  const sw = new Switch({ sweepIntervalMs: 0 });
  const a = makeSide("a", log);
  const b = makeSide("b", log);
  sw.addPort(a.dev);
  sw.addPort(b.dev);
  if (!a.dev.up || !b.dev.up) throw new Error("ports not up");
  // B's MAC is known, as once B has sent a frame (the loop through the switch learns both).
  sw.learn(Uint8Array.from(MAC_B), b.dev);
  // Port A's transmit buffers: virtio-net header (12 bytes, no offload) + frame to B.
  const txSegs: Segment[][] = [];
  for (let i = 0; i < RING; i++) {
    const at = BUFS_AT + i * BUF;
    a.bytes.fill(0, at, at + 12 + frameLen);
    a.bytes.set(MAC_B, at + 12);
    a.bytes.set(MAC_A, at + 18);
    a.bytes[at + 24] = 0x08;
    txSegs.push([{ gpa: gpa(at) as Gpa, len: 12 + frameLen, writable: false }]);
  }
  const rxSegs: Segment[][] = [];
  for (let i = 0; i < RING; i++) {
    rxSegs.push([{ gpa: gpa(BUFS_AT + i * BUF) as Gpa, len: BUF, writable: true }]);
  }
  let frames = 0;
  let time = 0;
  const end = performance.now() + seconds * 1000;
  let rxPosted = 0;
  while (performance.now() < end) {
    for (let i = 0; i < RING && rxPosted < RING; i++, rxPosted++) {
      if (b.rxDriver.add(rxSegs[i] as Segment[]) === null) break;
    }
    b.rxDriver.kick();
    for (let i = 0; i < RING; i++) if (a.txDriver.add(txSegs[i] as Segment[]) === null) break;
    a.txDriver.kick();
    // CPU time of this thread (not wall time): other processes on a loaded machine do not count.
    const t0 = process.cpuUsage();
    a.dev.processQueue(a.tx);
    a.tx.flush();
    const t1 = process.cpuUsage(t0);
    time += (t1.user + t1.system) / 1000;
    while (a.txDriver.getUsed() !== null);
    let got = 0;
    while (b.rxDriver.getUsed() !== null) got++;
    rxPosted -= got;
    frames += got;
  }
  const c = b.dev.counters;
  if (frames === 0 || c.drops["no-buffer"] > 0 || a.dev.counters.drops.malformed > 0) {
    throw new Error(`frames ${frames}, drops ${JSON.stringify(c.drops)}`);
  }
  sw.close();
  return { frames, seconds: time / 1000 };
}

function main(): void {
  const args = process.argv.slice(2);
  let seconds = 1;
  let repeat = 5;
  let sizes = [64, 1500];
  let withLog = false;
  for (let i = 0; i < args.length; i++) {
    const k = args[i];
    if (k === "--seconds") seconds = Number(args[++i]);
    else if (k === "--sizes") sizes = (args[++i] ?? "").split(",").map(Number);
    else if (k === "--log") withLog = true;
    else if (k === "--repeat") repeat = Number(args[++i]);
    else throw new Error(`unknown option ${k}`);
  }
  console.log(
    "switch data path in one process (port A transmit -> port B receive), device CPU time only",
  );
  const perFrame = (r: Result): number => (1e9 * r.seconds) / r.frames;
  for (const size of sizes) {
    let ns = Infinity;
    let nsl = Infinity;
    for (let r = 0; r < repeat; r++) {
      ns = Math.min(ns, perFrame(run(size, seconds, false)));
      if (withLog) nsl = Math.min(nsl, perFrame(run(size, seconds, true)));
    }
    let line =
      `${String(size).padStart(5)} B: ${ns.toFixed(0).padStart(5)} ns/frame ` +
      `(${(1e3 / ns).toFixed(2)} M frames/s of CPU)`;
    if (withLog) {
      line +=
        `; dirty log on: ${nsl.toFixed(0)} ns/frame, ` +
        `loss ${(100 * (1 - ns / nsl)).toFixed(1)} %`;
    }
    console.log(line);
  }
}

main();
