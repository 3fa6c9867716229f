/**
 * A small virtio-fs driver for tests: FUSE requests (INIT, LOOKUP, OPEN, READ, RELEASE) on a
 * virtio-fs request queue driven by vhostkit's front-end, so a real virtiofsd can be checked
 * byte for byte. Layouts from Linux `include/uapi/linux/fuse.h` (protocol 7.36); virtio-fs
 * framing from VIRTIO 1.2 §5.11: each request is one chain, the device-readable
 * `fuse_in_header` + arguments, then a device-writable `fuse_out_header` + reply.
 *
 * Every request uses one slot: a page-aligned input area and a page-aligned output area in
 * guest RAM, so a test knows exactly which pages the device writes. The token of a buffer is
 * the request's `unique` (a number), so the driver's state survives a migration as plain data
 * (see {@link VirtioFsDriver.saveState}).
 */
import type { FrontendQueue } from "../../src/frontend/queue.js";
import type { GuestRam } from "../../src/frontend/guest-ram.js";
import type { Gpa } from "../../src/memory/address.js";

/** virtio-fs device id (VIRTIO 1.2 §5.11). */
export const VIRTIO_ID_FS = 26;
/** Queue 0: hiprio; queues 1..: requests (VIRTIO 1.2 §5.11.2). */
export const FS_HIPRIO_QUEUE = 0;
/** The first request queue. */
export const FS_REQUEST_QUEUE = 1;

/** FUSE opcodes used here (fuse.h `enum fuse_opcode`). */
export const FuseOpcode = Object.freeze({
  LOOKUP: 1,
  GETATTR: 3,
  OPEN: 14,
  READ: 15,
  RELEASE: 18,
  INIT: 26,
});

/** FUSE_ROOT_ID */
export const FUSE_ROOT_ID = 1n;
/** sizeof(struct fuse_in_header) */
export const FUSE_IN_HEADER = 40;
/** sizeof(struct fuse_out_header) */
export const FUSE_OUT_HEADER = 16;

/** A FUSE reply. */
export interface FuseReply {
  /** 0, or a negative errno */
  error: number;
  /** the reply after the out header */
  body: Uint8Array;
  /** bytes the device wrote (used.len) */
  usedLen: number;
  /** the slot's output area (GPA) */
  outGpa: number;
}

/** The driver's state as plain data (a migration carries it as the guest's own state). */
export interface VirtioFsDriverState {
  nextUnique: number;
  slots: { inGpa: number; outGpa: number }[];
  free: number[];
  /** requests made available and not answered yet: unique and slot */
  pending: { unique: number; slot: number }[];
}

interface Pending {
  slot: number;
  resolve: ((r: FuseReply) => void) | null;
  reject: ((e: Error) => void) | null;
}

/** Options of {@link VirtioFsDriver}. */
export interface VirtioFsDriverOptions {
  /** requests in flight at most (default 16) */
  slots?: number;
  /** bytes of reply room per slot after the out header (default 128 KiB) */
  maxReply?: number;
  /** continue from a migrated state (its slots are in this RAM) */
  restore?: VirtioFsDriverState;
}

const PAGE = 4096;

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

/** A virtio-fs driver on one request queue. */
export class VirtioFsDriver {
  readonly #queue: FrontendQueue;
  readonly #slots: { inGpa: number; outGpa: number }[];
  readonly #free: number[];
  readonly #pending = new Map<number, Pending>();
  readonly #waiters: (() => void)[] = [];
  readonly #maxReply: number;
  readonly #off: () => void;
  /** answers to requests made before a migration (unique to reply) */
  readonly orphanReplies = new Map<number, FuseReply>();
  #nextUnique: number;
  #failed: Error | null = null;

  /**
   * @param queue the request queue (started)
   * @param ram the guest RAM
   * @param opts slots, reply room, migrated state
   */
  constructor(queue: FrontendQueue, ram: GuestRam, opts: VirtioFsDriverOptions = {}) {
    this.#queue = queue;
    this.#maxReply = opts.maxReply ?? 128 << 10;
    if (opts.restore) {
      const s = opts.restore;
      this.#slots = s.slots.map((x) => ({ ...x }));
      this.#free = s.free.slice();
      this.#nextUnique = s.nextUnique;
      for (const p of s.pending)
        this.#pending.set(p.unique, { slot: p.slot, resolve: null, reject: null });
    } else {
      this.#slots = [];
      const n = opts.slots ?? 16;
      const outBytes = alignUp(FUSE_OUT_HEADER + this.#maxReply, PAGE);
      for (let i = 0; i < n; i++) {
        const inGpa = ram.alloc(PAGE, PAGE);
        const outGpa = ram.alloc(outBytes, PAGE);
        this.#slots.push({ inGpa, outGpa });
      }
      this.#free = this.#slots.map((_s, i) => i);
      this.#nextUnique = 2;
    }
    this.#off = queue.onCall(() => this.#drain());
    // Answers that came before the call watcher started (or migrated in the ready list).
    this.#drain();
  }

  /** The queue's RAM (it follows a memory replacement). */
  get #ram(): GuestRam {
    return this.#queue.ram;
  }

  /** @returns the slots (GPAs of their input and output areas) */
  get slots(): readonly { inGpa: number; outGpa: number }[] {
    return this.#slots;
  }

  /** @returns requests in flight */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** @returns the driver's state as plain data */
  saveState(): VirtioFsDriverState {
    return {
      nextUnique: this.#nextUnique,
      slots: this.#slots.map((s) => ({ ...s })),
      free: this.#free.slice(),
      pending: [...this.#pending].map(([unique, p]) => ({ unique, slot: p.slot })),
    };
  }

  /** Stop listening to the queue (the driver is unusable after). */
  detach(): void {
    this.#off();
    const e = new Error("virtio-fs driver detached");
    for (const p of this.#pending.values()) p.reject?.(e);
  }

  #drain(): void {
    if (this.#queue.disposed) return;
    try {
      for (let u = this.#queue.getUsed(); u !== null; u = this.#queue.getUsed()) {
        const unique = u.token as number;
        const p = this.#pending.get(unique);
        if (!p) throw new Error(`used buffer with unknown token ${String(u.token)}`);
        this.#pending.delete(unique);
        const slot = this.#slots[p.slot] as { inGpa: number; outGpa: number };
        const out = this.#ram.read(slot.outGpa as Gpa, Math.max(u.len, FUSE_OUT_HEADER));
        const dv = new DataView(out.buffer, out.byteOffset, out.byteLength);
        const len = dv.getUint32(0, true);
        const error = dv.getInt32(4, true);
        const uq = Number(dv.getBigUint64(8, true));
        this.#free.push(p.slot);
        this.#waiters.shift()?.();
        if (uq !== unique || len !== u.len) {
          const e = new Error(
            `FUSE reply: header unique ${uq} len ${len}, ring token ${unique} used.len ${u.len}`,
          );
          if (p.reject) p.reject(e);
          else this.#failed = e;
          continue;
        }
        const r: FuseReply = {
          error,
          body: out.slice(FUSE_OUT_HEADER, u.len),
          usedLen: u.len,
          outGpa: slot.outGpa,
        };
        if (p.resolve) p.resolve(r);
        else this.orphanReplies.set(unique, r);
      }
    } catch (err) {
      this.#failed = err as Error;
      for (const p of this.#pending.values()) p.reject?.(err as Error);
    }
  }

  async #takeSlot(): Promise<number> {
    for (;;) {
      const s = this.#free.shift();
      if (s !== undefined) return s;
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  /**
   * Send one FUSE request and wait for its answer.
   * @param opcode FUSE opcode
   * @param nodeid the node
   * @param args the arguments after the in header
   * @param replyRoom bytes of reply room after the out header (default: the slot's)
   * @param timeoutMs give up after this long (default 5000)
   * @returns the reply
   * @throws Error when the device answers inconsistently or not in time
   */
  async request(
    opcode: number,
    nodeid: bigint,
    args: Uint8Array,
    replyRoom = this.#maxReply,
    timeoutMs = 5000,
  ): Promise<FuseReply> {
    if (this.#failed) throw this.#failed;
    const slotIdx = await this.#takeSlot();
    const slot = this.#slots[slotIdx] as { inGpa: number; outGpa: number };
    const unique = this.#nextUnique;
    this.#nextUnique += 2;
    const inBytes = new Uint8Array(FUSE_IN_HEADER + args.length);
    const dv = new DataView(inBytes.buffer);
    dv.setUint32(0, inBytes.length, true);
    dv.setUint32(4, opcode, true);
    dv.setBigUint64(8, BigInt(unique), true);
    dv.setBigUint64(16, nodeid, true);
    // uid, gid, pid 0 (root); total_extlen 0
    inBytes.set(args, FUSE_IN_HEADER);
    this.#ram.write(slot.inGpa as Gpa, inBytes);
    const reply = new Promise<FuseReply>((resolve, reject) => {
      this.#pending.set(unique, { slot: slotIdx, resolve, reject });
    });
    const id = this.#queue.add(
      [
        { gpa: slot.inGpa as Gpa, len: inBytes.length, writable: false },
        {
          gpa: slot.outGpa as Gpa,
          len: FUSE_OUT_HEADER + Math.min(replyRoom, this.#maxReply),
          writable: true,
        },
      ],
      unique,
    );
    if (id === null) {
      this.#pending.delete(unique);
      this.#free.push(slotIdx);
      throw new Error("virtio-fs request queue full");
    }
    this.#queue.kick();
    let t: NodeJS.Timeout | null = null;
    const timeout = new Promise<never>((_r, reject) => {
      t = setTimeout(
        () =>
          reject(new Error(`FUSE opcode ${opcode} unique ${unique}: no answer in ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      return await Promise.race([reply, timeout]);
    } finally {
      if (t) clearTimeout(t);
    }
  }

  /**
   * FUSE_INIT (protocol 7.36, no flags).
   * @returns the device's major and minor version and max_write
   * @throws Error when the device answers an error
   */
  async init(): Promise<{ major: number; minor: number; maxWrite: number }> {
    const a = new Uint8Array(64);
    const dv = new DataView(a.buffer);
    dv.setUint32(0, 7, true);
    dv.setUint32(4, 36, true);
    const r = await this.request(FuseOpcode.INIT, 0n, a, 4096);
    if (r.error !== 0) throw new Error(`FUSE_INIT: error ${r.error}`);
    const o = new DataView(r.body.buffer, r.body.byteOffset, r.body.byteLength);
    return {
      major: o.getUint32(0, true),
      minor: o.getUint32(4, true),
      maxWrite: o.getUint32(20, true),
    };
  }

  /**
   * FUSE_LOOKUP of a name in a directory.
   * @param parent the directory's node id
   * @param name the entry name
   * @returns node id and file size
   * @throws Error with the errno when the device answers an error
   */
  async lookup(parent: bigint, name: string): Promise<{ nodeid: bigint; size: number }> {
    const n = Buffer.from(`${name}\0`);
    const r = await this.request(FuseOpcode.LOOKUP, parent, n, 4096);
    if (r.error !== 0) throw new Error(`FUSE_LOOKUP ${name}: error ${r.error}`);
    const o = new DataView(r.body.buffer, r.body.byteOffset, r.body.byteLength);
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, 2 x u32, then fuse_attr
    return { nodeid: o.getBigUint64(0, true), size: Number(o.getBigUint64(48, true)) };
  }

  /**
   * FUSE_OPEN read-only.
   * @param nodeid the file's node id
   * @returns the file handle
   * @throws Error with the errno when the device answers an error
   */
  async open(nodeid: bigint): Promise<bigint> {
    const r = await this.request(FuseOpcode.OPEN, nodeid, new Uint8Array(8), 4096);
    if (r.error !== 0) throw new Error(`FUSE_OPEN: error ${r.error}`);
    return new DataView(r.body.buffer, r.body.byteOffset, r.body.byteLength).getBigUint64(0, true);
  }

  /**
   * FUSE_READ.
   * @param nodeid the file's node id
   * @param fh the handle from {@link open}
   * @param offset byte offset
   * @param size bytes to read (at most the slot's reply room)
   * @returns the reply (its body is the data)
   * @throws Error with the errno when the device answers an error
   */
  async read(nodeid: bigint, fh: bigint, offset: number, size: number): Promise<FuseReply> {
    const a = new Uint8Array(40);
    const dv = new DataView(a.buffer);
    dv.setBigUint64(0, fh, true);
    dv.setBigUint64(8, BigInt(offset), true);
    dv.setUint32(16, size, true);
    const r = await this.request(FuseOpcode.READ, nodeid, a, size);
    if (r.error !== 0) throw new Error(`FUSE_READ: error ${r.error}`);
    return r;
  }

  /**
   * FUSE_RELEASE.
   * @param nodeid the file's node id
   * @param fh the handle
   */
  async release(nodeid: bigint, fh: bigint): Promise<void> {
    const a = new Uint8Array(24);
    new DataView(a.buffer).setBigUint64(0, fh, true);
    const r = await this.request(FuseOpcode.RELEASE, nodeid, a, 0);
    if (r.error !== 0) throw new Error(`FUSE_RELEASE: error ${r.error}`);
  }
}
