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
   * Take the next available chain.
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
}

/** The driver (front-end / test mock) side of a virtqueue. */
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
