/**
 * A guest for migration: a traffic generator on a front-end's virtio-net queues that sends
 * frames carrying sequence numbers (u32 big-endian after the Ethernet header, EtherType
 * 0x88b5) on the transmit queue and takes frames from the receive queue. Its state (the next
 * sequence number, its buffer area) is small and travels in the GUEST_STATE section; its
 * buffers and rings live in guest RAM and travel with it. Used by tests, the benchmark and
 * `vhostkit migrate serve`.
 */
import type { VhostUserFrontend } from "../frontend/frontend.js";
import type { GuestRam } from "../frontend/guest-ram.js";
import type { FrontendQueue } from "../frontend/queue.js";
import { VIRTIO_NET_HDR_SIZE } from "../frontend/queue.js";
import type { Gpa } from "../memory/address.js";
import { VhostUserError } from "../protocol/errors.js";
import type { MigratableGuest } from "./source.js";

/** EtherType of the generator's frames (IEEE local experimental). */
export const SEQ_ETHERTYPE = 0x88b5;

/** Options of {@link SeqTrafficGuest}. */
export interface SeqTrafficOptions {
  /** transmit queue index (default 1) */
  txQueue?: number;
  /** receive queue index, or null for none (default 0) */
  rxQueue?: number | null;
  /** destination MAC (default broadcast) */
  dstMac?: Uint8Array;
  /** source MAC (default 02:00:00:00:00:01) */
  srcMac?: Uint8Array;
  /** frame length without the virtio-net header (default 64, at least 18) */
  frameLength?: number;
  /** stop after this many frames (default: never) */
  limit?: number;
  /** frames added per tick at most (default 32) */
  burst?: number;
  /** ms between ticks (default 1) */
  intervalMs?: number;
  /** remember every completed and received sequence number (tests; default false) */
  record?: boolean;
}

/** The state carried to the destination. */
interface GuestStateJson {
  nextSeq: number;
  txBase: number;
  slots: number;
  options: {
    txQueue: number;
    rxQueue: number | null;
    dstMac: number[];
    srcMac: number[];
    frameLength: number;
    limit: number | null;
    burst: number;
    intervalMs: number;
    record: boolean;
  };
}

/**
 * The generator. Call {@link start}; {@link stop} before closing the front-end.
 */
export class SeqTrafficGuest implements MigratableGuest {
  /** next sequence number to send */
  nextSeq = 0;
  /** transmit buffers completed by the device */
  completed = 0;
  /** frames received */
  received = 0;
  /** with `record`: completed transmit sequence numbers, in completion order */
  readonly completedSeqs: number[] = [];
  /** with `record`: received sequence numbers */
  readonly receivedSeqs: number[] = [];
  readonly #fe: VhostUserFrontend;
  readonly #ram: GuestRam;
  readonly #tx: FrontendQueue;
  readonly #rx: FrontendQueue | null;
  readonly #opts: GuestStateJson["options"];
  /** transmit buffer area: allocated on first use, or taken from the migrated state */
  #txBase: Gpa | null = null;
  #slots: number;
  #timer: NodeJS.Timeout | null = null;
  #paused = false;

  /**
   * Build the generator; its buffers are allocated in guest RAM (and receive buffers posted) on
   * the first {@link start}, {@link tick} or {@link saveState}.
   * @param fe a started front-end (its RAM shared, queues set up)
   * @param options queues, MACs, frame length, limit, pacing
   * @throws Error when the front-end has no RAM or lacks the queues
   */
  constructor(fe: VhostUserFrontend, options: SeqTrafficOptions = {}) {
    this.#fe = fe;
    const ram = fe.ram;
    if (ram === null) throw new Error("SeqTrafficGuest: the front-end has no guest RAM");
    this.#ram = ram;
    this.#opts = {
      txQueue: options.txQueue ?? 1,
      rxQueue: options.rxQueue === undefined ? 0 : options.rxQueue,
      dstMac: [...(options.dstMac ?? new Uint8Array([255, 255, 255, 255, 255, 255]))],
      srcMac: [...(options.srcMac ?? new Uint8Array([2, 0, 0, 0, 0, 1]))],
      frameLength: Math.max(18, options.frameLength ?? 64),
      limit: options.limit ?? null,
      burst: options.burst ?? 32,
      intervalMs: options.intervalMs ?? 1,
      record: options.record ?? false,
    };
    if (options.srcMac !== undefined) checkMac(this.#opts.srcMac, "srcMac");
    if (options.dstMac !== undefined) checkMac(this.#opts.dstMac, "dstMac");
    const tx = fe.queue(this.#opts.txQueue);
    if (!tx) throw new Error(`SeqTrafficGuest: no queue ${this.#opts.txQueue}`);
    this.#tx = tx;
    this.#rx = this.#opts.rxQueue === null ? null : (fe.queue(this.#opts.rxQueue) ?? null);
    this.#slots = tx.size * 2;
  }

  /** Allocate the transmit buffers and post receive buffers, once (not after a restore). */
  #buffers(): Gpa {
    if (this.#txBase === null) {
      const slotBytes = VIRTIO_NET_HDR_SIZE + this.#opts.frameLength;
      this.#txBase = this.#ram.alloc(this.#slots * slotBytes, 64);
      if (this.#rx) this.#rx.postRxBuffers();
    }
    return this.#txBase;
  }

  /**
   * Rebuild the generator on the destination from its GUEST_STATE.
   * @param fe the destination front-end (queues restored)
   * @param state bytes from {@link saveState}
   * @returns the generator (not started)
   * @throws VhostUserError naming the field when the state is malformed or its buffer area is
   *   outside guest RAM
   */
  static restore(fe: VhostUserFrontend, state: Uint8Array): SeqTrafficGuest {
    let v: unknown;
    try {
      v = JSON.parse(Buffer.from(state).toString("utf8"));
    } catch (err) {
      throw badState("GUEST_STATE", state.length, `not JSON: ${(err as Error).message}`);
    }
    return SeqTrafficGuest.#fromState(fe, v);
  }

  static #fromState(fe: VhostUserFrontend, v: unknown): SeqTrafficGuest {
    const j = object(v, "GUEST_STATE");
    const o = object(j.options, "options");
    const rxQueue = o.rxQueue === null ? null : uint(o.rxQueue, "options.rxQueue", 0xffff);
    const limit = o.limit === null ? null : uint(o.limit, "options.limit");
    const frameLength = uint(o.frameLength, "options.frameLength", 65535);
    if (frameLength < 18) throw badState("options.frameLength", frameLength, "below 18");
    if (typeof o.record !== "boolean") throw badState("options.record", o.record, "not a boolean");
    const g = new SeqTrafficGuest(fe, {
      txQueue: uint(o.txQueue, "options.txQueue", 0xffff),
      rxQueue,
      dstMac: macOf(o.dstMac, "options.dstMac"),
      srcMac: macOf(o.srcMac, "options.srcMac"),
      frameLength,
      ...(limit !== null ? { limit } : {}),
      burst: uint(o.burst, "options.burst", 1 << 16),
      intervalMs: Math.max(1, uint(o.intervalMs, "options.intervalMs", 60_000)),
      record: o.record,
    });
    const slots = uint(j.slots, "slots", 1 << 20);
    const txBase = uint(j.txBase, "txBase");
    if (slots === 0) throw badState("slots", slots, "no transmit slots");
    const bytes = slots * (VIRTIO_NET_HDR_SIZE + frameLength);
    if (g.#ram.memory.tryRegionFor(txBase, bytes) === null) {
      throw badState("txBase", `0x${txBase.toString(16)}+${bytes}`, "outside guest RAM");
    }
    g.#slots = slots;
    g.#txBase = txBase as Gpa;
    g.nextSeq = uint(j.nextSeq, "nextSeq", 0xffffffff);
    return g;
  }

  /** @returns true once the limit was sent and every frame completed */
  get finished(): boolean {
    const lim = this.#opts.limit;
    return lim !== null && this.nextSeq >= lim && this.#tx.outstanding === 0;
  }

  /** Start ticking. */
  start(): void {
    if (this.#timer !== null) return;
    this.#buffers();
    this.#timer = setInterval(() => this.tick(), this.#opts.intervalMs);
  }

  /** Stop ticking (the queues stay as they are). */
  stop(): void {
    if (this.#timer !== null) clearInterval(this.#timer);
    this.#timer = null;
  }

  /**
   * Take completed transmit buffers and received frames, without sending.
   * @returns transmit buffers still outstanding
   */
  drain(): number {
    if (this.#fe.closed) return 0;
    const tx = this.#tx;
    for (let u = tx.getUsed(); u !== null; u = tx.getUsed()) {
      this.completed++;
      if (this.#opts.record && typeof u.token === "number") this.completedSeqs.push(u.token);
    }
    const rx = this.#rx;
    if (rx) {
      const frames = rx.receiveFrames();
      for (const f of frames) {
        this.received++;
        if (
          this.#opts.record &&
          f.length >= 18 &&
          (((f[12] as number) << 8) | (f[13] as number)) === SEQ_ETHERTYPE
        ) {
          this.receivedSeqs.push(Buffer.from(f.buffer, f.byteOffset, f.length).readUInt32BE(14));
        }
      }
      if (frames.length > 0) rx.postRxBuffers(frames.length);
    }
    return tx.outstanding;
  }

  /** One round: reap used buffers, receive, send up to a burst. */
  tick(): void {
    if (this.#paused || this.#fe.closed) return;
    const tx = this.#tx;
    const txBase = this.#buffers();
    this.drain();
    const slotBytes = VIRTIO_NET_HDR_SIZE + this.#opts.frameLength;
    const frame = new Uint8Array(slotBytes);
    frame.set(this.#opts.dstMac, VIRTIO_NET_HDR_SIZE);
    frame.set(this.#opts.srcMac, VIRTIO_NET_HDR_SIZE + 6);
    frame[VIRTIO_NET_HDR_SIZE + 12] = SEQ_ETHERTYPE >> 8;
    frame[VIRTIO_NET_HDR_SIZE + 13] = SEQ_ETHERTYPE & 0xff;
    let added = 0;
    const lim = this.#opts.limit ?? Infinity;
    while (added < this.#opts.burst && this.nextSeq < lim && tx.freeCount > 0) {
      if (tx.outstanding >= this.#slots / 2) break;
      const seq = this.nextSeq;
      const at = (txBase + (seq % this.#slots) * slotBytes) as Gpa;
      new DataView(frame.buffer).setUint32(VIRTIO_NET_HDR_SIZE + 14, seq >>> 0);
      this.#ram.write(at, frame);
      if (tx.add([{ gpa: at, len: slotBytes, writable: false }], seq) === null) break;
      this.nextSeq++;
      added++;
    }
    if (added > 0) tx.kick();
  }

  /** Stop adding buffers (migration stop). */
  pause(): void {
    this.#paused = true;
  }

  /** Go on after a failed migration. */
  resume(): void {
    this.#paused = false;
  }

  /**
   * The generator's state for the destination.
   * @returns JSON bytes
   */
  saveState(): Uint8Array {
    const j: GuestStateJson = {
      nextSeq: this.nextSeq,
      txBase: this.#buffers(),
      slots: this.#slots,
      options: this.#opts,
    };
    return Buffer.from(JSON.stringify(j), "utf8");
  }
}

function badState(field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, {
    request: "SeqTrafficGuest.restore",
    field,
    value,
  });
}

function object(v: unknown, field: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw badState(field, typeof v, "expected an object");
  }
  return v as Record<string, unknown>;
}

function uint(v: unknown, field: string, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0 || v > max) {
    throw badState(field, v, `expected an integer in [0, ${max}]`);
  }
  return v;
}

function checkMac(m: readonly number[], field: string): void {
  if (m.length !== 6) throw new RangeError(`SeqTrafficGuest: ${field} must be 6 bytes`);
}

function macOf(v: unknown, field: string): Uint8Array {
  if (!Array.isArray(v) || v.length !== 6) throw badState(field, v, "expected 6 bytes");
  return Uint8Array.from(v, (x: unknown, i) => uint(x, `${field}[${i}]`, 255));
}
