/**
 * Types shared by the split and packed virtqueue implementations (VIRTIO 1.2 §2.7, §2.8).
 */
import type { Gpa } from "../memory/address.js";

/** One guest buffer of a descriptor chain. */
export interface Segment {
  /** guest-physical address of the first byte */
  gpa: Gpa;
  /** length in bytes */
  len: number;
  /** true when the device may write it (VIRTQ_DESC_F_WRITE) */
  writable: boolean;
}

/** A descriptor chain taken from the available ring. */
export interface DescChain {
  /** descriptor id to return in the used ring (split: head index; packed: buffer id) */
  head: number;
  /** descriptors consumed in the ring (packed needs it to advance); 1 for an indirect head */
  descCount: number;
  /** device-readable segments, in order */
  readable: Segment[];
  /** device-writable segments, in order */
  writable: Segment[];
  /** sum of the readable segments' lengths */
  readableLength: number;
  /** sum of the writable segments' lengths */
  writableLength: number;
}

/**
 * A malformed ring or a misuse of a queue. The caller marks the queue broken (the device
 * should then set DEVICE_NEEDS_RESET or stop the ring); the connection may go on.
 */
export class VirtqueueError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOST_VIRTQUEUE" as const;
  /** the queue index, when known */
  readonly queue?: number;
  /**
   * the field that held the offending value, e.g. `"desc.next"` (descriptor loop or index out
   * of range), `"avail.idx"` (more than size ahead), `"desc.addr"` (outside guest memory),
   * `"chain length"`, `"indirect.len"`, `"desc.flags"`, `"used.id"`, `"size"`, `"avail"`
   */
  readonly field: string;
  /** the offending value */
  readonly value: number;

  /**
   * Create the error.
   * @param field the field that held the offending value
   * @param value the offending value
   * @param message what is wrong (the field and value are prefixed to it)
   * @param queue the queue index, when known
   */
  constructor(field: string, value: number, message: string, queue?: number) {
    super(
      `${queue === undefined ? "virtqueue" : `virtqueue ${queue}`}: ${field}=${value}: ${message}`,
    );
    this.name = "VirtqueueError";
    this.field = field;
    this.value = value;
    if (queue !== undefined) this.queue = queue;
  }
}

/** Saved position of a device queue (GET_VRING_BASE / SET_VRING_BASE, migration). */
export interface QueueBase {
  /** next available index to process (free-running u16; packed: 15 bits) */
  availIdx: number;
  /** packed only: the driver ring wrap counter */
  availWrap?: boolean;
  /** packed only: next used index */
  usedIdx?: number;
  /** packed only: the device ring wrap counter */
  usedWrap?: boolean;
}

/** The device (back-end) side of a virtqueue. */
export interface DeviceQueue {
  /** number of descriptors in the ring */
  readonly size: number;
  /**
   * Take the next available chain. LIFETIME: valid until pushed to used or cancelled (a split
   * ring reuses the object for a later pop of the same head).
   * @returns the chain, or null when none is available
   * @throws VirtqueueError for a malformed ring (the caller marks the queue broken)
   */
  pop(): DescChain | null;
  /**
   * Put a finished chain in the used ring (not yet visible to the driver).
   * @param chain a chain returned by pop()
   * @param writtenLen bytes the device wrote into the chain's writable segments
   */
  pushUsed(chain: DescChain, writtenLen: number): void;
  /**
   * Make pushed used entries visible (ORDERING: entries, then log flush, then idx).
   * @returns true when the driver must be notified (EVENT_IDX / NO_INTERRUPT / packed event
   *   suppression)
   */
  publish(): boolean;
  /**
   * Ask the driver for kicks (true) or suppress them (false). ORDERING: after enabling, call
   * hasAvailable() (or pop()) once more: a buffer made available just before the driver saw
   * the change would otherwise never be kicked. (Implementations may return that answer.)
   */
  setNotification(enabled: boolean): void;
  /** @returns true when chains are available that pop() has not taken (reads avail idx) */
  hasAvailable(): boolean;
  /** @returns the state for GET_VRING_BASE / migration */
  getBase(): QueueBase;
  /** number of chains popped but not yet pushed to used */
  readonly inFlight: number;
  /**
   * The chains popped and not yet pushed to used, in pop order. Handed to the queue object
   * that replaces this one when the ring is rebuilt (`inFlight` of the constructor options),
   * so a chain held across SET_VRING_ADDR or a memory-table change completes normally.
   */
  readonly inFlightList: InFlight;
  /**
   * Give back chains the device took and never wrote (a stop that cancels held work): the
   * avail position is rewound over them, so the driver's buffers are taken again by the next
   * pop (here, after a restart, or on a migration's destination). Only the chains popped last
   * can be given back: `chains` must be exactly the last `chains.length` chains popped, in pop
   * order, none of them pushed to used.
   * @param chains chains returned by pop(), never written, not pushed to used
   * @returns true when the position was rewound; false (nothing changed) when `chains` are
   *   not the last chains popped: complete them with pushUsed(chain, 0) instead
   */
  cancel(chains: readonly DescChain[]): boolean;
}

/**
 * The chains a device queue has popped and not pushed to used, in pop order, each with its
 * pop number (to tell whether chains are the last ones popped, which a cancel needs). One
 * object follows a ring across its queue objects (rebuilds keep it).
 */
export class InFlight {
  readonly #chains: DescChain[] = [];
  readonly #seqs: number[] = [];
  /** pop number the next chain gets */
  #next = 0;

  /** @returns the number of chains in flight */
  get count(): number {
    return this.#chains.length;
  }

  /** @returns the chains in flight, in pop order (a copy) */
  get chains(): DescChain[] {
    return this.#chains.slice();
  }

  /**
   * Record a popped chain.
   * @param chain the chain pop() returns
   */
  add(chain: DescChain): void {
    this.#chains.push(chain);
    this.#seqs.push(this.#next++);
  }

  /**
   * Forget a completed chain: the same object, else the first in flight with its head (a
   * device may pass a copy).
   * @param chain the chain pushed to used
   * @returns false when no such chain is in flight
   */
  remove(chain: DescChain): boolean {
    const list = this.#chains;
    let i = list[0] === chain ? 0 : list.indexOf(chain);
    if (i < 0) i = list.findIndex((c) => c.head === chain.head);
    if (i < 0) return false;
    if (i === 0) {
      list.shift();
      this.#seqs.shift();
    } else {
      list.splice(i, 1);
      this.#seqs.splice(i, 1);
    }
    return true;
  }

  /**
   * Whether `chains` are the last chains popped, in order, all still in flight.
   * @param chains the chains to give back
   * @returns true when a cancel may rewind over them
   */
  isTail(chains: readonly DescChain[]): boolean {
    const n = chains.length;
    const from = this.#chains.length - n;
    if (from < 0) return false;
    for (let i = 0; i < n; i++) {
      if (this.#chains[from + i] !== chains[i]) return false;
      if (this.#seqs[from + i] !== this.#next - n + i) return false;
    }
    return true;
  }

  /**
   * Forget the last `n` chains popped (after {@link isTail}): they are taken again later.
   * @param n number of chains
   */
  dropTail(n: number): void {
    this.#chains.length -= n;
    this.#seqs.length -= n;
    this.#next -= n;
  }
}

export interface DriverQueue {
  /** number of descriptors in the ring */
  readonly size: number;
  /**
   * Add a buffer made of segments (readable first, then writable).
   * @param segments the buffer's segments
   * @param token any value, returned with the buffer by getUsed()
   * @returns the buffer id, or null when the ring is full
   */
  add(segments: Segment[], token?: unknown): number | null;
  /**
   * Publish added buffers (ORDERING: descriptors, then avail entries, then idx).
   * @returns true when the device must be kicked (EVENT_IDX / NO_NOTIFY / packed suppression)
   */
  kick(): boolean;
  /** @returns the next used buffer, or null */
  getUsed(): { id: number; len: number; token: unknown } | null;
  /** Ask the device for used-buffer notifications (true) or not (false). */
  setNotification(enabled: boolean): void;
  /** number of free descriptors */
  readonly freeCount: number;
}

/** Options for the dirty logging of used-ring writes (VHOST_VRING_F_LOG). */
export interface UsedLogOptions {
  /** log address of the used ring's first byte (SET_VRING_ADDR log_guest_addr) */
  logGuestAddr: number;
}
