/**
 * Profiles: how the checker makes a device do work. `net` transmits frames on TX (queue 1) and
 * posts receive buffers on RX (queue 0); `rng` posts writable buffers on its request queue;
 * `fs` sends FUSE requests on the request queue (queue 1) after FUSE_INIT; `generic` sets up one
 * ring and does no work (protocol-only checks).
 *
 * VIRTIO 1.2 §5.1 (network), §5.4 (entropy), §5.11 (file system, FUSE inside).
 */
import { hasFeature, VirtioFeature } from "../../protocol/constants.js";
import type { Gpa } from "../../memory/address.js";
import type { VhostUserFrontend } from "../../frontend/frontend.js";
import type { FrontendQueue, UsedBuffer } from "../../frontend/queue.js";
import { PoolBuffer } from "../../frontend/queue.js";

/** Profile names accepted by `vhostkit check --profile`. */
export const PROFILE_NAMES = ["auto", "net", "fs", "rng", "generic"] as const;

/** A profile name. */
export type ProfileName = (typeof PROFILE_NAMES)[number];

/** A buffer the checker handed to a device: where the device may write, and how much. */
export interface WorkToken {
  /** guest-physical address of the device-writable part, or null */
  writeGpa: Gpa | null;
  /** bytes of the device-writable part */
  writeLen: number;
  /** sequence number of the request */
  seq: number;
}

/** How to make a device do work. */
export interface Workload {
  /** the profile */
  readonly name: Exclude<ProfileName, "auto">;
  /** virtio device features the checker asks for besides VERSION_1 */
  readonly features: bigint;
  /** ring sizes, one per queue set up (index 0..n-1) */
  readonly queueSizes: readonly number[];
  /** the queue the checks put work on, or null (generic: no work) */
  readonly workQueue: number | null;
  /** queues the device writes into (their used buffers carry device data) */
  readonly receiveQueues: readonly number[];
  /**
   * Get the device ready for work once its rings run (net: post receive buffers; fs:
   * FUSE_INIT).
   * @param fe the started front-end
   */
  prepare(fe: VhostUserFrontend): Promise<void>;
  /**
   * Add `n` work buffers to the work queue and kick.
   * @param fe the front-end
   * @param n how many
   * @param seq0 first sequence number
   * @returns how many were added
   */
  submit(fe: VhostUserFrontend, n: number, seq0: number): number;
}

const FUSE_IN_HEADER = 40;
const FUSE_OUT_HEADER = 16;
/** FUSE opcodes used here (include/uapi/linux/fuse.h). */
export const FuseOp = Object.freeze({
  LOOKUP: 1,
  GETATTR: 3,
  OPEN: 14,
  READ: 15,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
});

/**
 * Encode a FUSE request: fuse_in_header then the argument bytes.
 * @param opcode FUSE opcode
 * @param unique request id
 * @param nodeid the inode the request is about
 * @param args the argument bytes
 * @returns the request bytes
 */
export function fuseRequest(
  opcode: number,
  unique: number,
  nodeid: number,
  args: Uint8Array,
): Uint8Array {
  const out = new Uint8Array(FUSE_IN_HEADER + args.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, out.length, true);
  dv.setUint32(4, opcode, true);
  dv.setBigUint64(8, BigInt(unique), true);
  dv.setBigUint64(16, BigInt(nodeid), true);
  out.set(args, FUSE_IN_HEADER);
  return out;
}

/** A FUSE reply read back from guest memory. */
export interface FuseReply {
  /** fuse_out_header.len */
  len: number;
  /** fuse_out_header.error (0 or a negative errno) */
  error: number;
  /** fuse_out_header.unique */
  unique: number;
  /** the bytes after the header */
  body: Uint8Array;
}

/**
 * Send one FUSE request on a virtio-fs request queue and wait for the reply.
 * @param q the request queue
 * @param req the request bytes ({@link fuseRequest})
 * @param replyRoom bytes the device may write (header included)
 * @param timeoutMs give up after this long
 * @returns the reply
 * @throws Error when no reply comes in time
 * (VIRTIO 1.2 §5.11.6: device-readable request, then device-writable reply)
 */
export async function fuseCall(
  q: FrontendQueue,
  req: Uint8Array,
  replyRoom: number,
  timeoutMs = 3000,
): Promise<FuseReply> {
  const ram = q.ram;
  const inAt = ram.alloc(req.length, 64);
  ram.write(inAt, req);
  const outAt = ram.alloc(replyRoom, 64);
  const id = q.add(
    [
      { gpa: inAt, len: req.length, writable: false },
      { gpa: outAt, len: replyRoom, writable: true },
    ],
    { writeGpa: outAt, writeLen: replyRoom, seq: 0 } satisfies WorkToken,
  );
  if (id === null) throw new Error(`queue ${q.index}: ring full`);
  q.kick();
  const u = await waitUsedId(q, id, timeoutMs);
  const bytes = ram.read(outAt, Math.min(Math.max(u.len, FUSE_OUT_HEADER), replyRoom));
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return {
    len: dv.getUint32(0, true),
    error: dv.getInt32(4, true),
    unique: Number(dv.getBigUint64(8, true)),
    body: bytes.subarray(FUSE_OUT_HEADER, Math.min(u.len, bytes.length)),
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Take used buffers from a queue until the one with `id` comes (others are dropped).
 * @param q the queue
 * @param id buffer id
 * @param timeoutMs give up after this long
 * @returns the used buffer
 * @throws Error when it does not come in time
 */
export async function waitUsedId(
  q: FrontendQueue,
  id: number,
  timeoutMs: number,
): Promise<UsedBuffer> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    for (let u = q.getUsed(); u !== null; u = q.getUsed()) if (u.id === id) return u;
    if (Date.now() > deadline) throw new Error(`queue ${q.index}: buffer ${id} not used`);
    await sleep(2);
  }
}

/**
 * Take every used buffer a queue has now.
 * @param q the queue
 * @returns the used buffers
 */
export function drainUsed(q: FrontendQueue): UsedBuffer[] {
  const out: UsedBuffer[] = [];
  for (let u = q.getUsed(); u !== null; u = q.getUsed()) out.push(u);
  return out;
}

/**
 * Collect used buffers until `n` came or the time is up.
 * @param q the queue
 * @param n how many to wait for
 * @param timeoutMs how long at most
 * @returns what came (possibly fewer than n)
 */
export async function collectUsed(
  q: FrontendQueue,
  n: number,
  timeoutMs: number,
): Promise<UsedBuffer[]> {
  const out: UsedBuffer[] = [];
  const deadline = Date.now() + timeoutMs;
  while (out.length < n && Date.now() < deadline && !q.disposed) {
    out.push(...drainUsed(q));
    if (out.length < n) await sleep(2);
  }
  return out;
}

/**
 * The write extent of a used buffer: where the device wrote `len` bytes.
 * @param u a used buffer
 * @returns gpa and length, or null when the buffer had no device-writable part
 */
export function writeExtent(u: UsedBuffer): { gpa: number; len: number } | null {
  const t = u.token;
  if (t instanceof PoolBuffer) return t.receive ? { gpa: t.gpa, len: u.len } : null;
  if (t !== null && typeof t === "object" && "writeGpa" in t) {
    const w = t as WorkToken;
    return w.writeGpa === null ? null : { gpa: w.writeGpa, len: Math.min(u.len, w.writeLen) };
  }
  return null;
}

/**
 * A broadcast test frame carrying `seq` (EtherType 0x88b5, local experimental).
 * @param seq sequence number
 * @param len frame length (default 64)
 * @returns the frame
 */
export function testFrame(seq: number, len = 64): Uint8Array {
  const f = new Uint8Array(len);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0x76, 0x6b, 0x01, 0x88, 0xb5]);
  new DataView(f.buffer).setUint32(14, seq, true);
  for (let i = 18; i < len; i++) f[i] = (i * 7 + seq) & 0xff;
  return f;
}

/**
 * The sequence number of a test frame, or null for another frame.
 * @param f a frame
 * @returns the number
 */
export function frameSeq(f: Uint8Array): number | null {
  if (f.length < 18 || f[12] !== 0x88 || f[13] !== 0xb5) return null;
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getUint32(14, true);
}

const netWorkload: Workload = {
  name: "net",
  features: 0n,
  queueSizes: [256, 256],
  workQueue: 1,
  receiveQueues: [0],
  async prepare(fe) {
    const rx = fe.queue(0);
    if (rx) rx.postRxBuffers(128);
    await Promise.resolve();
  },
  submit(fe, n, seq0) {
    const tx = fe.queue(1);
    if (!tx) return 0;
    let added = 0;
    for (let i = 0; i < n; i++) {
      if (tx.addFrame(testFrame(seq0 + i)) === null) break;
      added++;
    }
    if (added > 0) tx.kick();
    return added;
  },
};

const rngWorkload: Workload = {
  name: "rng",
  features: 0n,
  queueSizes: [256],
  workQueue: 0,
  receiveQueues: [0],
  async prepare() {
    await Promise.resolve();
  },
  submit(fe, n, seq0) {
    const q = fe.queue(0);
    if (!q) return 0;
    let added = 0;
    for (let i = 0; i < n; i++) {
      const at = q.ram.alloc(64, 64);
      const tok: WorkToken = { writeGpa: at, writeLen: 64, seq: seq0 + i };
      if (q.add([{ gpa: at, len: 64, writable: true }], tok) === null) break;
      added++;
    }
    if (added > 0) q.kick();
    return added;
  },
};

const GETATTR_REPLY = FUSE_OUT_HEADER + 104;

const fsWorkload: Workload = {
  name: "fs",
  features: 0n,
  queueSizes: [128, 128],
  workQueue: 1,
  receiveQueues: [1],
  async prepare(fe) {
    const q = fe.queue(1);
    if (!q) return;
    const init = new Uint8Array(16);
    const dv = new DataView(init.buffer);
    dv.setUint32(0, 7, true); // major
    dv.setUint32(4, 31, true); // minor
    dv.setUint32(8, 0, true); // max_readahead
    dv.setUint32(12, 0, true); // flags
    const r = await fuseCall(q, fuseRequest(FuseOp.INIT, 1, 0, init), FUSE_OUT_HEADER + 64);
    if (r.error !== 0) throw new Error(`FUSE_INIT failed: error ${r.error}`);
  },
  submit(fe, n, seq0) {
    const q = fe.queue(1);
    if (!q) return 0;
    let added = 0;
    for (let i = 0; i < n; i++) {
      const req = fuseRequest(FuseOp.GETATTR, 1000 + seq0 + i, 1, new Uint8Array(16));
      const inAt = q.ram.alloc(req.length, 64);
      q.ram.write(inAt, req);
      const outAt = q.ram.alloc(GETATTR_REPLY, 64);
      const tok: WorkToken = { writeGpa: outAt, writeLen: GETATTR_REPLY, seq: seq0 + i };
      const id = q.add(
        [
          { gpa: inAt, len: req.length, writable: false },
          { gpa: outAt, len: GETATTR_REPLY, writable: true },
        ],
        tok,
      );
      if (id === null) break;
      added++;
    }
    if (added > 0) q.kick();
    return added;
  },
};

const genericWorkload: Workload = {
  name: "generic",
  features: 0n,
  queueSizes: [64],
  workQueue: null,
  receiveQueues: [],
  async prepare() {
    await Promise.resolve();
  },
  submit() {
    return 0;
  },
};

/** Every profile's workload, by name. */
export const WORKLOADS: Readonly<Record<Exclude<ProfileName, "auto">, Workload>> = Object.freeze({
  net: netWorkload,
  rng: rngWorkload,
  fs: fsWorkload,
  generic: genericWorkload,
});

/** Virtio-net device feature bits: a back-end offering one of them is a network device. */
const NET_BITS = [
  VirtioFeature.MAC,
  VirtioFeature.MRG_RXBUF,
  VirtioFeature.STATUS,
  VirtioFeature.CTRL_VQ,
  VirtioFeature.GUEST_ANNOUNCE,
  VirtioFeature.NET_MQ,
  VirtioFeature.HOST_TSO4,
  VirtioFeature.GUEST_TSO4,
];

/**
 * Pick a profile from the offered features: `net` when a virtio-net device bit is offered,
 * else `generic` (vhost-user carries no device id; `fs` and `rng` must be asked for).
 * @param offered GET_FEATURES
 * @returns the profile
 */
export function autoProfile(offered: bigint): Exclude<ProfileName, "auto"> {
  return NET_BITS.some((b) => hasFeature(offered, b)) ? "net" : "generic";
}
