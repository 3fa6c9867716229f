/**
 * The interface a device author implements. vhostkit owns the protocol, guest memory and the
 * rings; a device declares what it is and is called when one of its queues has work.
 */
import type { GuestMemory } from "../memory/guest-memory.js";
import type { DescChain } from "../virtq/types.js";

/** Minimal logger the application passes in (no global logger). */
export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** A logger that drops everything. */
export const silentLogger: Logger = Object.freeze({
  debug() {},
  info() {},
  warn() {},
  error() {},
});

/**
 * A queue as the device sees it. The device reads and writes guest buffers only through
 * {@link BackendQueue.read} and {@link BackendQueue.write}, which bounds-check every access and
 * mark the dirty log while the front-end is migrating.
 */
export interface BackendQueue {
  /** queue index */
  readonly index: number;
  /** number of descriptors */
  readonly size: number;
  /** true while the ring may be processed (started by a kick, not yet stopped by GET_VRING_BASE) */
  readonly started: boolean;
  /** true when the ring may pass data to or from the device (SET_VRING_ENABLE) */
  readonly enabled: boolean;
  /**
   * Take the next available chain, or null. A malformed ring marks the queue broken (the
   * front-end is told through the ring's err eventfd) and null is returned.
   * LIFETIME: the chain object is valid until it is pushed to used or cancelled; a split ring
   * reuses it for a later pop of the same head.
   */
  pop(): DescChain | null;
  /**
   * Return a chain to the driver (visible at the next {@link flush}).
   * @param chain a chain returned by pop()
   * @param written bytes written into its writable segments
   */
  pushUsed(chain: DescChain, written: number): void;
  /** Publish used entries and notify the driver if it asked for it. */
  flush(): void;
  /** number of chains popped and not yet pushed to used */
  readonly inFlight: number;
  /**
   * Give back chains never written (a stop that cancels held work, see
   * {@link VhostUserDevice.stopQueue}): the ring's avail position is rewound over them, so the
   * driver's buffers are taken again after a restart or on a migration's destination. Only the
   * chains popped last can be given back: `chains` must be exactly the last chains popped, in
   * pop order, none written or pushed to used.
   * @param chains the chains to give back
   * @returns true when they were given back; false (nothing changed) when they are not the
   *   last chains popped: complete them with `pushUsed(chain, 0)` instead
   */
  cancel(chains: readonly DescChain[]): boolean;
  /**
   * Copy the chain's readable bytes, starting at `offset`, into `dst`.
   * @returns the number of bytes copied
   */
  read(chain: DescChain, dst: Uint8Array, offset?: number): number;
  /**
   * Copy `src` into the chain's writable segments starting at `offset`, marking the dirty log.
   * @returns the number of bytes copied (less than src.length when the chain is too short; 0
   *   once the ring is stopped: a stopped ring writes no guest memory)
   */
  write(chain: DescChain, src: Uint8Array, offset?: number): number;
  /**
   * Write a header (its first `hdrLen` bytes) and then `data` at the start of the chain's
   * writable segments, marking the dirty log: {@link write} twice, in one pass when the first
   * segment holds both (optional: a device falls back to two writes).
   * @returns the number of bytes copied (0 once the ring is stopped)
   */
  writeFrame?(chain: DescChain, hdr: Uint8Array, hdrLen: number, data: Uint8Array): number;
  /** why the queue was marked broken (it is then no longer processed), or null */
  readonly broken: string | null;
  /**
   * Mark the queue broken: it is no longer processed and the front-end is told through the
   * ring's err eventfd. For a device that finds a buffer it cannot make sense of.
   * @param reason what was wrong, naming the field and the value
   */
  markBroken(reason: string): void;
  /** The guest memory this queue works on (for zero-copy devices). LIFETIME: until the next memory-table change. */
  readonly memory: GuestMemory;
}

/**
 * A queue the device wants processed in a worker thread (see `VhostUserDevice.workerQueue`).
 * The worker maps the same guest memory, watches the kick fd itself and calls the handler
 * module's `createQueueHandler` export (see `src/backend/worker-queue.ts`).
 */
export interface WorkerQueueSpec {
  /** URL (file: or absolute path) of an ES module exporting `createQueueHandler` */
  readonly module: string;
  /** structured-cloneable options given to `createQueueHandler` */
  readonly options?: unknown;
  /**
   * Counters shared with the worker (a Float64Array over a SharedArrayBuffer). The handler in
   * the worker is the only writer; the device reads them (aligned 8-byte loads, never torn on
   * x86-64 and AArch64). They outlive the worker, so counts survive ring stop and restart.
   */
  readonly counters?: Float64Array;
}

/** Events and context the framework gives to a device. */
export interface DeviceContext {
  /** the application's logger, prefixed with the connection name */
  readonly logger: Logger;
  /** the queue with this index, or undefined when it is not set up */
  queue(index: number): BackendQueue | undefined;
  /** Send a config-change notification to the front-end (BACKEND_REQ channel), if negotiated. */
  notifyConfigChange(): void;
  /** negotiated virtio features */
  readonly features: bigint;
  /** negotiated protocol features */
  readonly protocolFeatures: bigint;
}

/** A virtio device served over vhost-user. */
export interface VhostUserDevice {
  /** virtio device id (VIRTIO 1.2 §5: 1 = network) */
  readonly deviceId: number;
  /** the device's own virtio feature bits (the framework adds the transport bits it supports) */
  readonly features: bigint;
  /** protocol features the device supports beyond the framework's own (e.g. MQ, RARP, CONFIG) */
  readonly protocolFeatures?: bigint;
  /** number of virtqueues */
  readonly queueCount: number;
  /** largest queue size accepted */
  readonly maxQueueSize: number;
  /** value of GET_QUEUE_NUM (defaults to queueCount; net devices report queue pairs) */
  readonly queueNum?: number;

  /**
   * Run this queue in a worker thread instead of calling {@link processQueue} for it: return
   * the handler module, or null to process the queue on the main thread. Asked each time the
   * ring starts. Only asked when {@link hasWorkerQueues} is true.
   */
  workerQueue?(index: number): WorkerQueueSpec | null;
  /**
   * True when {@link workerQueue} may return a spec. The back-end then keeps the region and
   * log fds open so that workers can map guest memory and the dirty log themselves (worker
   * rings mark the log like main-thread ones).
   */
  readonly hasWorkerQueues?: boolean;

  /** A front-end connected (the device is set up again from scratch). */
  attach?(ctx: DeviceContext): void;
  /** The front-end left or reset the device. */
  detach?(): void;
  /** Features were negotiated (SET_FEATURES). */
  setFeatures?(features: bigint): void;
  /**
   * A queue has work: it was kicked, or it was started. While the queue is started but not
   * enabled the device must process it without side effects (for a network device: drop TX,
   * fill no RX). The framework flushes the queue afterwards.
   */
  processQueue(queue: BackendQueue): void;
  /** A queue started, stopped, was enabled or disabled. */
  queueStateChanged?(queue: BackendQueue): void;
  /**
   * The queue is being stopped (GET_VRING_BASE; vhost-user: "the back-end stops the ring on
   * GET_VRING_BASE"). The framework already gives out no new chain (`pop()` returns null).
   * Complete (`write`, then `pushUsed`) or cancel (`queue.cancel`, for chains never written)
   * every chain the device holds on this queue, here or within the session's `stopTimeoutMs`
   * (asynchronously, e.g. when a write finishes); the framework then publishes the used
   * entries, flushes the dirty log and answers the base. Chains still in flight at the bound
   * fail the connection (the base would hide buffers the device owns). After the answer the
   * queue writes no guest memory. Worker queues: `WorkerQueueHandler.stop`.
   */
  stopQueue?(queue: BackendQueue): void;
  /** GET_CONFIG: return `size` bytes of config space from `offset`. */
  getConfig?(offset: number, size: number): Uint8Array;
  /** offer PROTOCOL_F_CONFIG when {@link getConfig} exists (default true) */
  readonly offerConfig?: boolean;
  /** SET_CONFIG. */
  setConfig?(offset: number, data: Uint8Array): void;
  /** SEND_RARP with the guest's MAC (vhost-user: VHOST_USER_SEND_RARP). */
  sendRarp?(mac: Uint8Array): void;
  /** NET_SET_MTU. */
  setMtu?(mtu: number): void;

  /**
   * Serialise the device's internal state for a migration (SET_DEVICE_STATE_FD, SAVE). Called
   * while the device is suspended (all rings stopped). Must not change the device: if the
   * migration fails, the source device resumes as it was. The returned bytes must stay
   * unchanged until the transfer ends (CHECK_DEVICE_STATE): a large state is handed to the
   * channel without copying.
   * vhost-user: "Migrating back-end state".
   */
  saveState?(): Uint8Array | Promise<Uint8Array>;
  /**
   * Load a state produced by {@link saveState} on the source (SET_DEVICE_STATE_FD, LOAD). The
   * data is untrusted: validate all of it first and change nothing when it is invalid (throw).
   */
  loadState?(data: Uint8Array): void | Promise<void>;
  /** Dirty logging started (VHOST_F_LOG_ALL set): a migration is beginning; prepare for it. */
  prepareMigration?(): void;
  /** Dirty logging stopped before the device state was saved: the migration was cancelled. */
  cancelMigration?(): void;
}
