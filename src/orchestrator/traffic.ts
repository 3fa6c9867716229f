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
  readonly #txBase: Gpa;
  readonly #slots: number;
  #timer: NodeJS.Timeout | null = null;
  #paused = false;

  /**
   * @param fe a started front-end (its RAM shared, queues set up)
   * @param options queues, MACs, frame length, limit, pacing
   * @param restore internal: state from {@link saveState} (use {@link SeqTrafficGuest.restore})
   */
  constructor(fe: VhostUserFrontend, options: SeqTrafficOptions = {}, restore?: GuestStateJson) {
    this.#fe = fe;
    const ram = fe.ram;
    if (ram === null) throw new Error("SeqTrafficGuest: the front-end has no guest RAM");
    this.#ram = ram;
    this.#opts = restore?.options ?? {
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
    const tx = fe.queue(this.#opts.txQueue);
    if (!tx) throw new Error(`SeqTrafficGuest: no queue ${this.#opts.txQueue}`);
    this.#tx = tx;
    this.#rx = this.#opts.rxQueue === null ? null : (fe.queue(this.#opts.rxQueue) ?? null);
    const slotBytes = VIRTIO_NET_HDR_SIZE + this.#opts.frameLength;
    if (restore) {
      this.#txBase = restore.txBase as Gpa;
      this.#slots = restore.slots;
      this.nextSeq = restore.nextSeq;
    } else {
      this.#slots = tx.size * 2;
      this.#txBase = ram.alloc(this.#slots * slotBytes, 64);
      if (this.#rx) this.#rx.postRxBuffers();
    }
  }

  /**
   * Rebuild the generator on the destination from its GUEST_STATE.
   * @param fe the destination front-end (queues restored)
   * @param state bytes from {@link saveState}
   * @returns the generator (not started)
   */
  static restore(fe: VhostUserFrontend, state: Uint8Array): SeqTrafficGuest {
    const j = JSON.parse(Buffer.from(state).toString("utf8")) as GuestStateJson;
    return new SeqTrafficGuest(fe, {}, j);
  }

  /** @returns true once the limit was sent and every frame completed */
  get finished(): boolean {
    const lim = this.#opts.limit;
    return lim !== null && this.nextSeq >= lim && this.#tx.outstanding === 0;
  }

  /** Start ticking. */
  start(): void {
    if (this.#timer !== null) return;
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
      const at = (this.#txBase + (seq % this.#slots) * slotBytes) as Gpa;
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
      txBase: this.#txBase,
      slots: this.#slots,
      options: this.#opts,
    };
    return Buffer.from(JSON.stringify(j), "utf8");
  }
}
