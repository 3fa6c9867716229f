/**
 * Worker-thread data path: one virtqueue processed in a `worker_thread` that maps the same
 * guest memory (vhost-user: "Starting and stopping rings").
 *
 * The main thread keeps the protocol: it hands the worker dup'ed region fds (with their
 * addresses, sizes and mmap offsets), dup'ed kick and call fds, the ring's guest-physical
 * addresses and its base. The worker maps the regions (`src/memory/mapping.ts`), watches the
 * kick fd with the native FdWatcher, runs the device's handler module over the ring in
 * TypeScript and signals the call fd. The main thread tells it about:
 * - SET_VRING_ENABLE (`enable`), SET_VRING_CALL / SET_VRING_KICK while running (`call`, `kick`),
 * - a memory-table change (`remap`: the worker maps the new regions, rebuilds the ring at its
 *   current position and unmaps the old ones before the request is acknowledged),
 * - GET_VRING_BASE (`stop`: the worker returns its position, then unmaps everything and
 *   exits).
 *
 * Fd ownership: every fd sent to a worker (region, kick and call dups, in `workerData` or in a
 * message) stays owned by the main thread's {@link QueueWorker}, which closes region fds once
 * the worker answered that it mapped them and every other one once the thread has exited,
 * whatever the way it ended (stop, broken ring, error, termination after a timeout). The
 * worker never closes an fd it was sent, so no fd number is closed twice. The same holds for
 * the worker's fault subscription (`native.faultSubscribe`), released once the thread exited.
 *
 * Faults (vhost-user: VHOST_USER_SET_MEM_TABLE): the worker's mappings are its own, so a SIGBUS
 * the addon survives in one (the front-end shrank a file after it was mapped) is found by the
 * worker, which posts a `fault` naming the guest-physical address (or the log offset); the
 * session then fails the connection as for a fault in its own mappings.
 *
 * Dirty logging (vhost-user: "Migration"): while VHOST_F_LOG_ALL is on, the worker maps the
 * log from a dup of the SET_LOG_BASE fd and marks every write it makes, with the used ring
 * logged at log_guest_addr when VHOST_VRING_F_LOG is set. A change of log, of LOG_ALL or of
 * the ring's log flag is a `log` message (or part of `remap`), answered once the worker marks
 * the new way: the request that caused it is acknowledged only then.
 */
import { Worker } from "node:worker_threads";
import { native } from "../native.js";
import type { MappingFault } from "../memory/mapping.js";
import type { QueueBase } from "../virtq/types.js";
import type { BackendQueue, Logger } from "./device.js";

/** One memory region as the worker maps it; `fd` is a dup owned by the {@link QueueWorker}. */
export interface WorkerRegionInit {
  /** the region's fd (a dup) */
  fd: number;
  /** guest-physical address of the first byte */
  gpa: number;
  /** size in bytes */
  size: number;
  /** front-end virtual address of the first byte */
  uaddr: number;
  /** offset of the first byte in the fd */
  mmapOffset: number;
}

/** A dirty log for a worker to map; `fd` is a dup owned by the {@link QueueWorker}. */
export interface WorkerLogInit {
  /** the log's fd (a dup of the SET_LOG_BASE fd) */
  fd: number;
  /** mmap offset of the log in the fd */
  offset: number;
  /** log size in bytes */
  size: number;
}

/** VHOST_VRING_F_LOG: the used ring is logged at this guest-physical address. */
export interface WorkerUsedLog {
  /** log_guest_addr of SET_VRING_ADDR */
  logGuestAddr: number;
}

/** The ring's guest-physical addresses (split: desc/avail/used; packed: desc/driver/device). */
export interface WorkerRingAddresses {
  /** descriptor table (both formats) */
  desc: number;
  /** split: available ring; packed: driver event suppression */
  avail: number;
  /** split: used ring; packed: device event suppression */
  used: number;
}

/** Everything a worker needs to run one ring (passed as `workerData`). */
export interface WorkerInit {
  /** queue index */
  index: number;
  /** queue size */
  size: number;
  /** VIRTIO_F_RING_PACKED negotiated */
  packed: boolean;
  /** VIRTIO_F_EVENT_IDX negotiated */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated */
  indirect: boolean;
  /** the ring's guest-physical addresses */
  ring: WorkerRingAddresses;
  /** position to start from (SET_VRING_BASE or the last GET_VRING_BASE) */
  base: QueueBase;
  /** the guest memory regions to map */
  regions: WorkerRegionInit[];
  /** a dup of the kick fd for the worker (owned by the QueueWorker), or -1: the worker polls */
  kickFd: number;
  /** a dup of the call fd for the worker (owned by the QueueWorker), or -1 */
  callFd: number;
  /** SET_VRING_ENABLE state */
  enabled: boolean;
  /** the dirty log to mark while VHOST_F_LOG_ALL is on, or null */
  log: WorkerLogInit | null;
  /** VHOST_VRING_F_LOG of the ring, or null */
  usedLog: WorkerUsedLog | null;
  /** adaptive polling turns (see `BackendSessionOptions.pollTurns`) */
  pollTurns: number;
  /** the handler module (URL) */
  module: string;
  /** options passed to the handler module */
  options: unknown;
  /** counters shared with the main thread, or null */
  counters: Float64Array | null;
  /**
   * An eventfd of `native.faultSubscribe`, made and owned by the {@link QueueWorker}: the
   * worker watches it and reports a fault in its own mappings.
   */
  faultFd: number;
}

/** Messages from the main thread to a worker. */
export type ToWorker =
  | { type: "enable"; enabled: boolean }
  | { type: "call"; fd: number }
  | { type: "kick"; fd: number }
  | { type: "poke" }
  | {
      type: "remap";
      regions: WorkerRegionInit[];
      ring: WorkerRingAddresses;
      usedLog: WorkerUsedLog | null;
    }
  | { type: "log"; log: WorkerLogInit | null; usedLog: WorkerUsedLog | null }
  | { type: "stop"; timeoutMs: number };

/** Messages from a worker to the main thread. */
export type FromWorker =
  | { type: "started" }
  | { type: "remapped" }
  | { type: "logged" }
  | { type: "stopped"; base: QueueBase; inFlight: number; kicks: number; calls: number }
  | { type: "broken"; reason: string; base: QueueBase | null }
  | { type: "fault"; fault: MappingFault };

/** What a handler module's `createQueueHandler` receives. */
export interface WorkerHandlerInit {
  /** queue index */
  index: number;
  /** the options of the {@link WorkerQueueSpec} */
  options: unknown;
  /** the shared counters of the spec, or null */
  counters: Float64Array | null;
}

/**
 * A queue handler running in a worker. `process` is called when the ring was kicked (and once
 * when it starts or the memory changed); it takes chains with `queue.pop()` and returns them
 * with `queue.pushUsed()`; the worker flushes afterwards. Return true to be called again on
 * the next turn (work left over a budget).
 */
export interface WorkerQueueHandler {
  process(queue: BackendQueue): boolean | void;
  /**
   * The ring is stopping (GET_VRING_BASE): `queue.pop()` gives out nothing more. Complete
   * (write, `pushUsed`) or cancel (`queue.cancel`) the chains held, now or within the
   * session's `stopTimeoutMs`; a handler that never holds chains across turns needs nothing
   * here (see `VhostUserDevice.stopQueue`).
   */
  stop?(queue: BackendQueue): void;
}

/** What a worker answers to a stop. */
export interface WorkerStopAnswer {
  /** the ring position */
  base: QueueBase;
  /** chains still in flight at the bound (the stop failed when > 0) */
  inFlight: number;
}

/** The export a handler module must provide. */
export type CreateQueueHandler = (init: WorkerHandlerInit) => WorkerQueueHandler;

/** Callbacks from a {@link QueueWorker} to its ring. */
export interface QueueWorkerEvents {
  /** the worker found the ring malformed (or could not start) and has stopped */
  broken(reason: string, base: QueueBase | null): void;
  /**
   * A SIGBUS was survived in the worker's own mapping of guest memory or of the dirty log (the
   * front-end shrank the file): the connection must fail (reported once per worker).
   */
  fault(fault: MappingFault): void;
}

/** How long a worker may take to answer stop/remap before it is terminated. */
const ANSWER_TIMEOUT_MS = 5000;

/**
 * The main thread's handle on one worker ring. Owns the worker and every fd sent to it (see
 * the file comment): a broken, failed, timed-out or stopped worker never leaks one.
 */
export class QueueWorker {
  /** queue index of the ring */
  readonly index: number;
  readonly #worker: Worker;
  readonly #logger: Logger;
  readonly #events: QueueWorkerEvents;
  #waiters: Array<{ type: FromWorker["type"]; resolve: (m: FromWorker) => void }> = [];
  #done = false;
  #exited = false;
  #stoppedCleanly = false;
  #brokenReported = false;
  #stopping: Promise<WorkerStopAnswer | null> | null = null;
  /** every fd sent to the worker and not closed yet */
  readonly #owned = new Set<number>();
  /**
   * Fds of the start (regions and log) and of each remap or log change not answered yet, in
   * order: the worker answers in the order it was asked, and an answer means it has mapped
   * them, so the oldest group can be closed.
   */
  readonly #fdGroups: number[][] = [];
  /** the worker's fault subscription (native.faultSubscribe), released once the thread exits */
  #faultFd = -1;
  /** resolves with the exit code when the thread has ended */
  readonly exited: Promise<number>;
  /** kicks the worker consumed, as of its stop */
  kicks = 0;
  /** calls the worker sent, as of its stop */
  calls = 0;

  /**
   * Start a worker for a ring. The fds in `init` are dups made by the caller; this object owns
   * them from now on (also when the constructor throws).
   * @param init ring, memory and handler description (the fault fd is made here)
   * @param logger the session's logger
   * @param events broken-ring and fault callbacks
   * @throws Error when the thread cannot be created (the fds in `init` are closed)
   */
  constructor(init: Omit<WorkerInit, "faultFd">, logger: Logger, events: QueueWorkerEvents) {
    this.index = init.index;
    this.#logger = logger;
    this.#events = events;
    const mapped = init.regions.map((r) => r.fd);
    if (init.log) mapped.push(init.log.fd);
    for (const fd of [...mapped, init.kickFd, init.callFd]) if (fd >= 0) this.#owned.add(fd);
    this.#fdGroups.push(mapped);
    try {
      this.#faultFd = native.faultSubscribe();
      const data: WorkerInit = { ...init, faultFd: this.#faultFd };
      this.#worker = new Worker(new URL("./queue-worker.js", import.meta.url), {
        workerData: data,
      });
    } catch (err) {
      this.#closeOwned();
      throw err;
    }
    this.exited = new Promise((resolve) => this.#worker.once("exit", resolve));
    this.#worker.on("message", (m: FromWorker) => this.#onMessage(m));
    this.#worker.on("error", (err: Error) => {
      this.#logger.error(`queue ${this.index}: worker failed: ${err.message}`);
      this.#finish();
      this.#reportBroken(`worker failed: ${err.message}`, null);
    });
    this.#worker.once("exit", (code: number) => {
      this.#exited = true;
      this.#finish();
      // LIFETIME: the thread is gone; nothing uses the fds it was sent any more.
      this.#closeOwned();
      this.#reportBroken(`worker exited (code ${code})`, null);
    });
  }

  /** Close every fd still owned (the thread has exited or could not be created). */
  #closeOwned(): void {
    for (const fd of this.#owned) native.close(fd);
    this.#owned.clear();
    this.#fdGroups.length = 0;
    if (this.#faultFd >= 0) native.faultUnsubscribe(this.#faultFd);
    this.#faultFd = -1;
  }

  /** Close the fds of the oldest start/remap/log: the worker has mapped (or dropped) them. */
  #releaseFdGroup(): void {
    for (const fd of this.#fdGroups.shift() ?? []) {
      if (this.#owned.delete(fd)) native.close(fd);
    }
  }

  /** Tell the ring once that the worker ended without a clean stop. */
  #reportBroken(reason: string, base: QueueBase | null): void {
    if (this.#brokenReported || this.#stoppedCleanly) return;
    this.#brokenReported = true;
    this.#events.broken(reason, base);
  }

  #onMessage(m: FromWorker): void {
    if (m.type === "fault") {
      this.#logger.debug(`queue ${this.index}: the worker's mapping faulted`);
      this.#events.fault(m.fault);
      return;
    }
    if (m.type === "broken") {
      this.#finish();
      this.#reportBroken(m.reason, m.base);
      return;
    }
    if (m.type === "started") {
      this.#releaseFdGroup();
      this.#logger.debug(`queue ${this.index}: worker running`);
      return;
    }
    if (m.type === "remapped" || m.type === "logged") this.#releaseFdGroup();
    if (m.type === "stopped") {
      this.kicks = m.kicks;
      this.calls = m.calls;
      this.#done = true;
      this.#stoppedCleanly = true;
    }
    const i = this.#waiters.findIndex((w) => w.type === m.type);
    if (i >= 0) this.#waiters.splice(i, 1)[0]!.resolve(m);
  }

  /** The worker is gone: answer every waiter with a broken message. */
  #finish(): void {
    this.#done = true;
    const ws = this.#waiters;
    this.#waiters = [];
    for (const w of ws) w.resolve({ type: "broken", reason: "worker exited", base: null });
  }

  #send(m: ToWorker): void {
    if (!this.#done) this.#worker.postMessage(m);
  }

  /** Send an fd dup to the worker; it is owned here until the thread exits. */
  #sendFd(type: "call" | "kick", fd: number): void {
    if (this.#done) return;
    const dup = fd >= 0 ? native.dup(fd) : -1;
    if (dup >= 0) this.#owned.add(dup);
    this.#worker.postMessage({ type, fd: dup });
  }

  #ask(m: ToWorker, answer: FromWorker["type"], extraMs = 0): Promise<FromWorker> {
    if (this.#done) {
      return Promise.resolve({ type: "broken", reason: "worker exited", base: null });
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        // The exit that follows answers the waiter with "broken", closes the fds and reports
        // the ring broken.
        this.#logger.error(`queue ${this.index}: worker did not answer "${m.type}"; terminated`);
        void this.#worker.terminate();
      }, ANSWER_TIMEOUT_MS + extraMs);
      this.#waiters.push({
        type: answer,
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
      });
      this.#worker.postMessage(m);
    });
  }

  /** @returns true once the worker stopped, broke or exited */
  get done(): boolean {
    return this.#done;
  }

  /** @returns how many fds sent to the worker are still open (for tests) */
  get ownedFds(): number {
    return this.#owned.size;
  }

  /**
   * SET_VRING_ENABLE while the worker runs.
   * @param enabled the new state
   */
  setEnabled(enabled: boolean): void {
    this.#send({ type: "enable", enabled });
  }

  /**
   * Hand the worker a new call fd (SET_VRING_CALL while running). `fd` is dup'ed here; the
   * dup is closed once the thread has exited.
   * @param fd the session's call fd, or -1
   */
  setCall(fd: number): void {
    this.#sendFd("call", fd);
  }

  /**
   * Hand the worker a new kick fd (SET_VRING_KICK while running); -1 makes it poll. `fd` is
   * dup'ed here; the dup is closed once the thread has exited.
   * @param fd the session's kick fd, or -1
   */
  setKick(fd: number): void {
    this.#sendFd("kick", fd);
  }

  /** Ask the worker to look at the ring now (in-band kick, memory change). */
  poke(): void {
    this.#send({ type: "poke" });
  }

  /**
   * Move the worker to new guest memory: it maps `regions`, rebuilds the ring at its current
   * position over `ring` (with `usedLog`), and unmaps the old regions before answering.
   * @param regions the new memory table, fds dup'ed for the worker (owned here from now on)
   * @param ring the ring addresses translated in the new memory
   * @param usedLog VHOST_VRING_F_LOG of the ring, or null
   * @returns true when the worker uses the new memory; false when it broke, failed or timed
   *   out (the ring is then reported broken through the broken callback)
   */
  async remap(
    regions: WorkerRegionInit[],
    ring: WorkerRingAddresses,
    usedLog: WorkerUsedLog | null,
  ): Promise<boolean> {
    return this.#askWithFds(
      regions.map((r) => r.fd),
      { type: "remap", regions, ring, usedLog },
      "remapped",
    );
  }

  /**
   * Change how the worker logs its writes (VHOST_F_LOG_ALL turned on or off, SET_LOG_BASE while
   * logging): it maps `log`, marks into it from its next write on, flushes and unmaps the old
   * one, and rebuilds the ring when `usedLog` changed, before answering.
   * @param log the log to mark (fd dup'ed for the worker, owned here from now on), or null
   * @param usedLog VHOST_VRING_F_LOG of the ring, or null
   * @returns true once the worker logs the new way; false when it broke, failed or timed out
   *   (the ring is then reported broken through the broken callback)
   */
  async setLog(log: WorkerLogInit | null, usedLog: WorkerUsedLog | null): Promise<boolean> {
    return this.#askWithFds(log ? [log.fd] : [], { type: "log", log, usedLog }, "logged");
  }

  /** Send a message carrying fds (owned here from now on) and wait for its answer. */
  async #askWithFds(fds: number[], m: ToWorker, answer: "remapped" | "logged"): Promise<boolean> {
    if (this.#done) {
      for (const fd of fds) native.close(fd);
      return false;
    }
    for (const fd of fds) this.#owned.add(fd);
    this.#fdGroups.push(fds);
    const got = await this.#ask(m, answer);
    if (got.type !== answer) {
      this.#reportBroken(`${m.type}: ${got.type === "broken" ? got.reason : got.type}`, null);
      return false;
    }
    return true;
  }

  /**
   * GET_VRING_BASE: the worker stops taking chains, asks its handler to complete or cancel
   * what it holds, waits up to `timeoutMs` for the chains in flight, flushes its log marks,
   * answers its position and exits after releasing its mappings.
   * @param timeoutMs longest wait for chains in flight (default 0)
   * @returns the base and the chains still in flight, or null when the worker had already
   *   ended (broken, exited or timed out)
   */
  stop(timeoutMs = 0): Promise<WorkerStopAnswer | null> {
    if (this.#stopping) return this.#stopping;
    this.#stopping = this.#ask({ type: "stop", timeoutMs }, "stopped", timeoutMs).then((m) =>
      m.type === "stopped" ? { base: m.base, inFlight: m.inFlight } : null,
    );
    return this.#stopping;
  }

  /**
   * Stop and wait for the thread to end (disconnect). Terminates it if it does not answer.
   * @returns resolves when the thread has exited and its fds are closed
   */
  async close(): Promise<void> {
    await this.stop();
    if (this.#exited) return;
    const t = setTimeout(() => void this.#worker.terminate(), ANSWER_TIMEOUT_MS);
    await this.exited;
    clearTimeout(t);
  }
}
