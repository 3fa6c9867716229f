/**
 * Worker-thread data path: one virtqueue processed in a `worker_thread` that maps the same
 * guest memory (vhost-user: "Starting and stopping rings"; the "Data path").
 *
 * The main thread keeps the protocol: it hands the worker dup'ed region fds (with their
 * addresses, sizes and mmap offsets), dup'ed kick and call fds, the ring's guest-physical
 * addresses and its base. The worker maps the regions (`src/memory/mapping.ts`), watches the
 * kick fd with the native FdWatcher, runs the device's handler module over the ring in
 * TypeScript and signals the call fd. The main thread tells it about:
 * - SET_VRING_ENABLE (`enable`), SET_VRING_CALL / SET_VRING_KICK while running (`call`, `kick`),
 * - a memory-table change (`remap`: the worker maps the new regions, rebuilds the ring at its
 *   current position and unmaps the old ones before the request is acknowledged),
 * - GET_VRING_BASE (`stop`: the worker returns its position, then unmaps everything, closes
 *   its fds and exits).
 *
 * Dirty logging is refused: a device with worker queues is not offered VHOST_F_LOG_ALL (nor
 * LOG_SHMFD), and a worker ring whose SET_VRING_ADDR asks for used-ring logging is broken.
 */
import { Worker } from "node:worker_threads";
import { native } from "../native.js";
import type { QueueBase } from "../virtq/types.js";
import type { BackendQueue, Logger } from "./device.js";

/** One memory region as the worker maps it; `fd` is the worker's own dup (it closes it). */
export interface WorkerRegionInit {
  fd: number;
  gpa: number;
  size: number;
  uaddr: number;
  mmapOffset: number;
}

/** The ring's guest-physical addresses (split: desc/avail/used; packed: desc/driver/device). */
export interface WorkerRingAddresses {
  desc: number;
  avail: number;
  used: number;
}

/** Everything a worker needs to run one ring (passed as `workerData`). */
export interface WorkerInit {
  index: number;
  size: number;
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  ring: WorkerRingAddresses;
  base: QueueBase;
  regions: WorkerRegionInit[];
  /** the worker's dup of the kick fd, or -1: the worker polls the ring */
  kickFd: number;
  /** the worker's dup of the call fd, or -1 */
  callFd: number;
  enabled: boolean;
  /** adaptive polling turns (see `BackendSessionOptions.pollTurns`) */
  pollTurns: number;
  /** the handler module (URL) and its options */
  module: string;
  options: unknown;
  counters: Float64Array | null;
}

/** Messages from the main thread to a worker. */
export type ToWorker =
  | { type: "enable"; enabled: boolean }
  | { type: "call"; fd: number }
  | { type: "kick"; fd: number }
  | { type: "poke" }
  | { type: "remap"; regions: WorkerRegionInit[]; ring: WorkerRingAddresses }
  | { type: "stop" };

/** Messages from a worker to the main thread. */
export type FromWorker =
  | { type: "started" }
  | { type: "remapped" }
  | { type: "stopped"; base: QueueBase; kicks: number; calls: number }
  | { type: "broken"; reason: string; base: QueueBase | null };

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
}

/** The export a handler module must provide. */
export type CreateQueueHandler = (init: WorkerHandlerInit) => WorkerQueueHandler;

/** Callbacks from a {@link QueueWorker} to its ring. */
export interface QueueWorkerEvents {
  /** the worker found the ring malformed (or could not start) and has stopped */
  broken(reason: string, base: QueueBase | null): void;
}

/** How long a worker may take to answer stop/remap before it is terminated. */
const ANSWER_TIMEOUT_MS = 5000;

/**
 * The main thread's handle on one worker ring. Owns the worker and the fds it sent until the
 * worker took them (the worker closes its dups itself when it stops).
 */
export class QueueWorker {
  readonly index: number;
  readonly #worker: Worker;
  readonly #log: Logger;
  readonly #events: QueueWorkerEvents;
  #waiters: Array<{ type: FromWorker["type"]; resolve: (m: FromWorker) => void }> = [];
  #done = false;
  #stopping: Promise<QueueBase | null> | null = null;
  /** resolves with the exit code when the thread has ended */
  readonly exited: Promise<number>;
  /** kicks the worker consumed and calls it sent, as of its stop */
  kicks = 0;
  calls = 0;

  /**
   * Start a worker for a ring. The fds in `init` are the worker's (dups made by the caller).
   * @param init ring, memory and handler description
   * @param log the session's logger
   * @param events broken-ring callback
   */
  constructor(init: WorkerInit, log: Logger, events: QueueWorkerEvents) {
    this.index = init.index;
    this.#log = log;
    this.#events = events;
    this.#worker = new Worker(new URL("./queue-worker.js", import.meta.url), {
      workerData: init,
    });
    this.exited = new Promise((resolve) => this.#worker.once("exit", resolve));
    this.#worker.on("message", (m: FromWorker) => this.#onMessage(m));
    this.#worker.on("error", (err: Error) => {
      this.#log.error(`queue ${this.index}: worker failed: ${err.message}`);
      this.#finish();
      this.#events.broken(`worker failed: ${err.message}`, null);
    });
    this.#worker.once("exit", () => this.#finish());
  }

  #onMessage(m: FromWorker): void {
    if (m.type === "broken") {
      this.#finish();
      this.#events.broken(m.reason, m.base);
      return;
    }
    if (m.type === "started") {
      this.#log.debug(`queue ${this.index}: worker running`);
      return;
    }
    if (m.type === "stopped") {
      this.kicks = m.kicks;
      this.calls = m.calls;
      this.#done = true;
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

  #ask(m: ToWorker, answer: FromWorker["type"]): Promise<FromWorker> {
    if (this.#done) {
      return Promise.resolve({ type: "broken", reason: "worker exited", base: null });
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#log.error(`queue ${this.index}: worker did not answer "${m.type}"; terminated`);
        void this.#worker.terminate();
      }, ANSWER_TIMEOUT_MS);
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

  /**
   * SET_VRING_ENABLE while the worker runs.
   * @param enabled the new state
   */
  setEnabled(enabled: boolean): void {
    this.#send({ type: "enable", enabled });
  }

  /**
   * Hand the worker a new call fd (it closes the old one). `fd` is dup'ed here.
   * @param fd the session's call fd, or -1
   */
  setCall(fd: number): void {
    if (this.#done) return;
    this.#send({ type: "call", fd: fd >= 0 ? native.dup(fd) : -1 });
  }

  /**
   * Hand the worker a new kick fd (it closes the old one); -1 makes it poll. `fd` is dup'ed.
   * @param fd the session's kick fd, or -1
   */
  setKick(fd: number): void {
    if (this.#done) return;
    this.#send({ type: "kick", fd: fd >= 0 ? native.dup(fd) : -1 });
  }

  /** Ask the worker to look at the ring now (in-band kick, memory change). */
  poke(): void {
    this.#send({ type: "poke" });
  }

  /**
   * Move the worker to new guest memory: it maps `regions` (its own dups), rebuilds the ring at
   * its current position over `ring`, and unmaps the old regions before answering.
   * @param regions the new memory table, fds dup'ed for the worker
   * @param ring the ring addresses translated in the new memory
   * @returns resolves when the worker uses the new memory (or broke: see the broken callback)
   */
  async remap(regions: WorkerRegionInit[], ring: WorkerRingAddresses): Promise<void> {
    if (this.#done) {
      for (const r of regions) native.close(r.fd);
      return;
    }
    await this.#ask({ type: "remap", regions, ring }, "remapped");
  }

  /**
   * GET_VRING_BASE: the worker stops processing, answers its position and exits after releasing
   * its mappings and fds.
   * @returns the base, or null when the worker had already ended (broken or exited)
   */
  stop(): Promise<QueueBase | null> {
    if (this.#stopping) return this.#stopping;
    this.#stopping = this.#ask({ type: "stop" }, "stopped").then((m) =>
      m.type === "stopped" ? m.base : null,
    );
    return this.#stopping;
  }

  /**
   * Stop and wait for the thread to end (disconnect). Terminates it if it does not answer.
   * @returns resolves when the thread has exited
   */
  async close(): Promise<void> {
    await this.stop();
    const t = setTimeout(() => void this.#worker.terminate(), ANSWER_TIMEOUT_MS);
    await this.exited;
    clearTimeout(t);
  }
}
