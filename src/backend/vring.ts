/**
 * One virtqueue as the back-end keeps it: what the front-end configured (size, addresses,
 * base, kick/call/err fds), the started and enabled bits, and the device-side ring once the
 * ring starts (vhost-user: "Starting and stopping rings").
 */
import { VhostUserError } from "../protocol/errors.js";
import { native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { MappingFault } from "../memory/mapping.js";
import { uaddr as toUaddr } from "../memory/address.js";
import { createDeviceQueue } from "../virtq/device-queue.js";
import { splitRingSizes, packedRingSizes } from "../virtq/layout.js";
import type { DeviceQueue, DescChain, QueueBase } from "../virtq/types.js";
import { readChain, writeChain, writeChainFrame } from "../virtq/chain-io.js";
import type { BackendQueue, Logger, WorkerQueueSpec } from "./device.js";
import { QueueWorker } from "./worker-queue.js";
import type {
  WorkerLogInit,
  WorkerRegionInit,
  WorkerRingAddresses,
  WorkerUsedLog,
} from "./worker-queue.js";

/**
 * An example value for adaptive polling (`pollTurns`), not a recommendation: event-loop turns a
 * ring keeps being polled, with driver notifications suppressed, after the last turn that found
 * work. Off by default: against DPDK virtio_user on a 2-core machine it lowered the packet rate
 * (64-byte TX: median 2.9 Mpps with 64 turns vs 4.6 Mpps without, 5 alternated runs each).
 */
export const SPIN_IDLE_TURNS = 64;

/** Longest a busy-polling ring holds the event loop before it yields a turn (ms). */
const BUSY_POLL_SLICE_MS = 1;

/** Ring addresses as SET_VRING_ADDR gives them (front-end virtual addresses). */
export interface VringAddresses {
  desc: number;
  avail: number;
  used: number;
  /** VHOST_VRING_F_LOG: log used-ring writes at logGuestAddr */
  log: boolean;
  logGuestAddr: number;
}

/** Ring format and notification features taken from the negotiated virtio features. */
export interface RingFormat {
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
}

/** Callbacks from a vring to its session. */
export interface VringHost {
  readonly logger: Logger;
  /** current guest memory, or null before SET_MEM_TABLE */
  memory(): GuestMemory | null;
  format(): RingFormat;
  /** the device should process this queue now */
  process(vring: Vring): void;
  /** the queue started, stopped, or changed enabled state */
  stateChanged(vring: Vring): void;
  /**
   * The ring is stopping (GET_VRING_BASE) and takes no new chains: the device should complete
   * or cancel the chains it holds on it (`VhostUserDevice.stopQueue`).
   */
  stopRequested(vring: Vring): void;
  /** longest a stop waits for the device's chains in flight (ms) */
  readonly stopTimeoutMs: number;
  /** the worker the device wants for this queue, or null (main thread) */
  workerSpec(index: number): WorkerQueueSpec | null;
  /** the current memory regions with a dup of each region's fd, for a worker */
  workerRegions(): WorkerRegionInit[];
  /** the dirty log with a dup of its fd while VHOST_F_LOG_ALL is on, for a worker; else null */
  workerLog(): WorkerLogInit | null;
  /** adaptive polling: idle turns before notifications are asked for again (0: off) */
  readonly pollTurns: number;
  /** busy polling: idle microseconds before notifications are asked for again (0: off) */
  readonly busyPollMicros: number;
  /** a worker ring's own mapping of guest memory or of the log faulted (SIGBUS survived) */
  mappingFaulted(fault: MappingFault): void;
}

/**
 * The back-end's record of one virtqueue. It implements {@link BackendQueue} for the device.
 */
export class Vring implements BackendQueue {
  /** queue index in the device */
  readonly index: number;
  /** queue size from SET_VRING_NUM (0 until set; vhost-user: VHOST_USER_SET_VRING_NUM) */
  size = 0;
  /** ring addresses from SET_VRING_ADDR, or null (vhost-user: VHOST_USER_SET_VRING_ADDR) */
  addr: VringAddresses | null = null;
  /** SET_VRING_BASE value (or the value saved by GET_VRING_BASE) */
  base: QueueBase = { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true };
  #started = false;
  #enabled = false;
  /** true while GET_VRING_BASE stops the ring: pop() gives out nothing */
  #stopping = false;
  /** set when the ring was found malformed; cleared when the ring is set up again */
  broken: string | null = null;

  /** kick eventfd from SET_VRING_KICK, or -1 (vhost-user: VHOST_USER_SET_VRING_KICK) */
  kickFd = -1;
  /** call eventfd from SET_VRING_CALL, or -1 (vhost-user: VHOST_USER_SET_VRING_CALL) */
  callFd = -1;
  /** error eventfd from SET_VRING_ERR, or -1 (vhost-user: VHOST_USER_SET_VRING_ERR) */
  errFd = -1;
  /** true when SET_VRING_KICK came with the no-fd flag: the ring is polled */
  polling = false;

  #queue: DeviceQueue | null = null;
  #memory: GuestMemory | null = null;
  #kickWatcher: FdWatcher | null = null;
  #pollTimer: NodeJS.Timeout | null = null;
  #worker: QueueWorker | null = null;
  /** chains popped so far (tells the poller whether a turn found work) */
  #pops = 0;
  #spinning = false;
  #idleTurns = 0;
  readonly #host: VringHost;
  /** kicks received (counter for stats and tests) */
  kicks = 0;
  /** calls sent */
  calls = 0;

  /**
   * A stopped, unconfigured ring (vhost-user: "Starting and stopping rings").
   * @param index queue index
   * @param host the session that owns the ring
   */
  constructor(index: number, host: VringHost) {
    this.index = index;
    this.#host = host;
  }

  /**
   * @returns true while the ring is polled with driver notifications suppressed (busy polling
   *   or adaptive polling)
   */
  get busyPolling(): boolean {
    return this.#spinning;
  }

  /** @returns true while the ring is started */
  get started(): boolean {
    return this.#started;
  }

  /** @returns true while the ring is enabled */
  get enabled(): boolean {
    return this.#enabled;
  }

  /**
   * @returns the memory the running ring uses, or else the host's current memory
   * @throws Error when neither exists (no memory table yet)
   */
  get memory(): GuestMemory {
    const mem = this.#memory ?? this.#host.memory();
    if (!mem) throw new Error(`queue ${this.index}: no memory table`);
    return mem;
  }

  /**
   * Set the enabled bit (SET_VRING_ENABLE, or SET_FEATURES without PROTOCOL_FEATURES).
   * @param enabled the new value
   */
  setEnabled(enabled: boolean): void {
    if (this.#enabled === enabled) return;
    this.#enabled = enabled;
    this.#host.stateChanged(this);
    if (this.#worker) this.#worker.setEnabled(enabled);
    else if (enabled && this.#started) this.#process();
  }

  /**
   * Install a new kick fd (SET_VRING_KICK). The old one is closed. The ring starts when the
   * fd first becomes readable, or at once when `fd` is -1 (no-fd flag: the ring is polled).
   * @param fd the eventfd, or -1 for polling
   */
  setKick(fd: number): void {
    this.#stopKickWatch();
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd;
    this.polling = fd < 0;
    if (this.#worker) {
      // The worker watches (or polls) the ring itself.
      this.#worker.setKick(fd);
      return;
    }
    this.#watchKick();
  }

  /** Watch the kick fd (or poll when there is none) on the main thread. */
  #watchKick(): void {
    const fd = this.kickFd;
    if (fd >= 0) {
      const watcher = new native.FdWatcher(fd, (_events, error) => {
        if (error) {
          this.#host.logger.warn(`queue ${this.index}: kick fd error: ${error.message}`);
          this.#stopKickWatch();
          return;
        }
        this.#onKick();
      });
      watcher.start(POLL_READABLE);
      this.#kickWatcher = watcher;
    } else {
      // No fd: the front-end will never kick; the ring is started now and polled.
      this.#startPolling();
      this.#onKick();
    }
  }

  /**
   * Install a new call fd (SET_VRING_CALL); -1 means no fd. The old one is closed.
   * @param fd eventfd or -1
   */
  setCall(fd: number): void {
    if (this.callFd >= 0) native.close(this.callFd);
    this.callFd = fd;
    this.#worker?.setCall(fd);
  }

  /**
   * Install a new err fd (SET_VRING_ERR); -1 means no fd. The old one is closed.
   * @param fd eventfd or -1
   */
  setErr(fd: number): void {
    if (this.errFd >= 0) native.close(this.errFd);
    this.errFd = fd;
  }

  /** Kick handler: drain the eventfd, start the ring if needed, let the device work. */
  #onKick(): void {
    if (this.kickFd >= 0) {
      try {
        native.eventfdRead(this.kickFd);
      } catch {
        // A non-eventfd kick fd (a pipe, say) may not read 8 bytes; the readiness is the kick.
      }
    }
    this.kicks++;
    if (this.broken) return;
    if (!this.#started) {
      if (!this.#start()) return;
    }
    // A worker ring is processed by its worker (which does a first pass when it starts).
    if (this.#worker) return;
    this.#process();
  }

  /** Process the ring once (used by the session after memory changes and for polling). */
  poke(): void {
    if (this.#worker) this.#worker.poke();
    else if (this.#started && !this.broken) this.#process();
  }

  /**
   * Let the device process the ring; when it found work, keep polling on the next event-loop
   * turns with driver notifications suppressed, until {@link SPIN_IDLE_TURNS} turns found
   * nothing (VIRTIO 1.2 §2.7.10, §2.8.10: the device may suppress notifications).
   */
  #process(): void {
    const before = this.#pops;
    this.#host.process(this);
    if (this.#pops === before) return;
    if (this.#host.busyPollMicros > 0) this.#busyPoll(false);
    else if (this.#host.pollTurns > 0) this.#startSpin();
  }

  /**
   * Busy polling (`busyPollMicros`): with driver notifications suppressed, look at the ring
   * in a tight loop and let the device process what arrives, until no chain was taken for
   * `busyPollMicros`; then ask for notifications again. The loop yields to the event loop
   * every {@link BUSY_POLL_SLICE_MS} (protocol messages, other rings) and goes on after it.
   * @param continuing true when called back after yielding
   */
  #busyPoll(continuing: boolean): void {
    const q = this.#queue;
    if (!q) return;
    if (continuing) {
      // Ended meanwhile (stop, rebuild, disconnect): #endSpin re-enabled notifications.
      if (!this.#spinning) return;
    } else {
      if (this.#spinning) return;
      this.#spinning = true;
      q.setNotification(false);
    }
    const idleMs = this.#host.busyPollMicros / 1000;
    const start = performance.now();
    let lastWork = start;
    for (;;) {
      if (this.#queue !== q || !this.#started || this.broken) {
        this.#endSpin();
        return;
      }
      const now = performance.now();
      // Progress is a chain taken, not a non-empty ring: a ring the device cannot drain
      // (no frame to put in posted receive buffers) must not keep the loop going.
      const pops = this.#pops;
      if (q.hasAvailable()) this.#host.process(this);
      if (this.#pops !== pops) lastWork = now;
      else if (now - lastWork >= idleMs) break;
      if (now - start >= BUSY_POLL_SLICE_MS) {
        setImmediate(this.#busyPollTurn);
        return;
      }
    }
    this.#endSpin();
    // ORDERING: notifications were re-enabled (a seq-cst store) before this look at the
    // ring: a buffer published before the driver saw them enabled is found here.
    if (this.#queue === q && q.hasAvailable()) this.#process();
  }

  readonly #busyPollTurn = (): void => this.#busyPoll(true);

  #startSpin(): void {
    this.#idleTurns = 0;
    if (this.#spinning || !this.#queue) return;
    this.#spinning = true;
    this.#queue.setNotification(false);
    setImmediate(this.#spinTurn);
  }

  readonly #spinTurn = (): void => {
    if (!this.#spinning) return;
    const q = this.#queue;
    if (!q || !this.#started || this.broken) {
      this.#spinning = false;
      return;
    }
    const before = this.#pops;
    this.#host.process(this);
    if (this.#pops !== before) {
      this.#idleTurns = 0;
    } else if (++this.#idleTurns >= this.#host.pollTurns) {
      this.#endSpin();
      // ORDERING: notifications were re-enabled (a seq-cst store) before this look at the
      // ring: a buffer published before the driver saw them enabled is found here.
      if (this.#queue === q && q.hasAvailable()) this.#process();
      return;
    }
    if (this.#spinning) setImmediate(this.#spinTurn);
  };

  /** Stop polling and ask the driver for kicks again (before the ring stops or is rebuilt). */
  #endSpin(): void {
    if (!this.#spinning) return;
    this.#spinning = false;
    try {
      this.#queue?.setNotification(true);
    } catch {
      // the memory is gone (disconnect): nobody is left to kick
    }
  }

  /** @returns the worker running this ring, or null (main thread or stopped) */
  get worker(): QueueWorker | null {
    return this.#worker;
  }

  /**
   * Start the ring: translate its addresses and build the device-side queue, re-reading the
   * used index from guest memory (split) or taking the packed base.
   * @returns true when the ring started
   */
  #start(): boolean {
    const mem = this.#host.memory();
    if (!mem || !this.addr || this.size === 0) {
      this.#host.logger.warn(
        `queue ${this.index}: kicked before it was set up ` +
          `(memory=${mem ? "yes" : "no"}, addr=${this.addr ? "yes" : "no"}, size=${this.size}); ignored`,
      );
      return false;
    }
    let spec: WorkerQueueSpec | null;
    try {
      // Built on the main thread too for a worker ring: it validates the addresses here.
      const q = this.#buildQueue(mem);
      spec = this.#host.workerSpec(this.index);
      if (spec) {
        this.#startWorker(spec, mem);
      } else {
        this.#queue = q;
        this.#memory = mem;
      }
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return false;
    }
    this.#started = true;
    this.#host.logger.debug(
      `queue ${this.index}: started at avail ${this.base.availIdx}${spec ? " in a worker" : ""}`,
    );
    this.#host.stateChanged(this);
    return true;
  }

  /** The ring's guest-physical addresses in `mem`. */
  #ringGpas(mem: GuestMemory): WorkerRingAddresses {
    const addr = this.addr!;
    if (this.#host.format().packed) {
      const p = packedRingSizes(this.size);
      return {
        desc: mem.uaddrToGpa(toUaddr(addr.desc), p.desc),
        avail: mem.uaddrToGpa(toUaddr(addr.avail), p.driverEvent),
        used: mem.uaddrToGpa(toUaddr(addr.used), p.deviceEvent),
      };
    }
    const s = splitRingSizes(this.size);
    return {
      desc: mem.uaddrToGpa(toUaddr(addr.desc), s.desc),
      avail: mem.uaddrToGpa(toUaddr(addr.avail), s.avail),
      used: mem.uaddrToGpa(toUaddr(addr.used), s.used),
    };
  }

  /** Hand the ring to a worker thread; the main thread stops watching the kick fd. */
  #startWorker(spec: WorkerQueueSpec, mem: GuestMemory): void {
    const fmt = this.#host.format();
    const ring = this.#ringGpas(mem);
    const regions = this.#host.workerRegions();
    const log = this.#host.workerLog();
    const kick = this.kickFd >= 0 ? native.dup(this.kickFd) : -1;
    const call = this.callFd >= 0 ? native.dup(this.callFd) : -1;
    this.#stopKickWatch();
    this.#stopPolling();
    const worker = new QueueWorker(
      {
        index: this.index,
        size: this.size,
        packed: fmt.packed,
        eventIdx: fmt.eventIdx,
        indirect: fmt.indirect,
        ring,
        base: { ...this.base },
        regions,
        kickFd: kick,
        callFd: call,
        enabled: this.#enabled,
        log,
        usedLog: this.#usedLog(),
        pollTurns: this.#host.pollTurns,
        module: spec.module,
        options: spec.options,
        counters: spec.counters ?? null,
      },
      this.#host.logger,
      {
        broken: (reason, base) => {
          if (this.#worker !== worker) return;
          this.#worker = null;
          if (base) this.base = base;
          this.markBroken(`worker: ${reason}`);
        },
        fault: (fault) => this.#host.mappingFaulted(fault),
      },
    );
    this.#worker = worker;
  }

  /**
   * Build the device-side queue at the ring's base (the one construction path, shared with
   * worker rings: `createDeviceQueue`).
   * @param mem the guest memory
   * @param replaces the queue object being replaced (its chains in flight are carried over)
   */
  #buildQueue(mem: GuestMemory, replaces?: DeviceQueue): DeviceQueue {
    const addr = this.addr!;
    const fmt = this.#host.format();
    return createDeviceQueue(mem, {
      index: this.index,
      size: this.size,
      packed: fmt.packed,
      eventIdx: fmt.eventIdx,
      indirect: fmt.indirect,
      ring: this.#ringGpas(mem),
      base: this.base,
      usedLog: addr.log ? { logGuestAddr: addr.logGuestAddr } : null,
      ...(replaces ? { inFlight: replaces.inFlightList } : {}),
    });
  }

  /**
   * Rebuild the running ring over new guest memory (memory-table change while running), or
   * after its address flags changed (VHOST_VRING_F_LOG toggled during migration).
   */
  rebuild(): void {
    if (this.#worker) {
      void this.remapWorker();
      return;
    }
    if (!this.#started || !this.#queue) return;
    this.#endSpin();
    const mem = this.#host.memory();
    if (!mem) {
      this.stop();
      return;
    }
    // Used entries pushed into the old queue object are published before it is replaced.
    this.flush();
    const old = this.#queue;
    if (!old) return;
    this.base = old.getBase();
    try {
      // The chains the device holds stay in flight on the new queue object.
      this.#queue = this.#buildQueue(mem, old);
      this.#memory = mem;
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
    }
  }

  /**
   * Move a worker ring to the current guest memory (memory-table change): resolves once the
   * worker has mapped the new regions and dropped the old ones. A no-op for other rings.
   * @returns resolves when done (a failure marks the ring broken)
   */
  async remapWorker(): Promise<void> {
    const worker = this.#worker;
    if (!worker) return;
    const mem = this.#host.memory();
    if (!mem) {
      await this.halt();
      return;
    }
    let ring: WorkerRingAddresses;
    try {
      ring = this.#ringGpas(mem);
    } catch (err) {
      await this.halt();
      this.markBroken(err instanceof Error ? err.message : String(err));
      return;
    }
    await worker.remap(this.#host.workerRegions(), ring, this.#usedLog());
  }

  /** VHOST_VRING_F_LOG of the ring as a worker takes it. */
  #usedLog(): WorkerUsedLog | null {
    return this.addr?.log ? { logGuestAddr: this.addr.logGuestAddr } : null;
  }

  /**
   * Tell a worker ring how to log now (VHOST_F_LOG_ALL on or off, a new log from SET_LOG_BASE,
   * the ring's VHOST_VRING_F_LOG changed): resolves once the worker marks the new way. A no-op
   * for other rings (they use the session's memory, whose log the session swaps).
   * @returns resolves when done (a failure marks the ring broken)
   */
  async relogWorker(): Promise<void> {
    const worker = this.#worker;
    if (!worker) return;
    await worker.setLog(this.#host.workerLog(), this.#usedLog());
  }

  /**
   * Stop the ring for GET_VRING_BASE (vhost-user: "Starting and stopping rings": the back-end
   * stops the ring on GET_VRING_BASE), in this order: no new chain is taken; the device is
   * asked to complete or cancel the chains it holds ({@link VringHost.stopRequested}, in a
   * worker its handler's `stop`); chains in flight are waited for, up to
   * {@link VringHost.stopTimeoutMs}; used entries are published and pending dirty-log marks
   * flushed; then the base is returned. After it the ring writes no guest memory, and kicks
   * on the old kick fd are ignored: the ring starts again after the next SET_VRING_KICK.
   * @returns the next available index (and the packed fields)
   * @throws VhostUserError (fatal) naming the ring and the count when chains are still in
   *   flight at the bound, or when a worker ended without answering its position: the base
   *   would hide buffers the device still owns, so the connection must fail
   */
  async halt(): Promise<QueueBase> {
    const worker = this.#worker;
    if (worker) return this.#haltWorker(worker);
    const q = this.#queue;
    if (!this.#started || !q) {
      const base = this.stop();
      this.#stopKickWatch();
      return base;
    }
    this.#stopping = true;
    this.#endSpin();
    this.#stopKickWatch();
    this.#stopPolling();
    try {
      this.#host.stopRequested(this);
      this.flush();
      const limit = this.#host.stopTimeoutMs;
      const deadline = Date.now() + limit;
      while (this.#queue === q && q.inFlight > 0 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 1));
        this.flush();
      }
      const left = this.#queue === q ? q.inFlight : 0;
      if (left > 0) {
        // ORDERING: what the device wrote is logged before the connection fails; after
        // stop() the device can no longer write guest memory through this ring.
        this.stop();
        throw stopFailed(
          this.index,
          `${left} chains still in flight ${limit} ms after the stop`,
          left,
        );
      }
    } finally {
      this.#stopping = false;
    }
    const base = this.stop();
    this.#stopKickWatch();
    return base;
  }

  /** {@link halt} for a worker ring: the worker stops itself the same way. */
  async #haltWorker(worker: QueueWorker): Promise<QueueBase> {
    const limit = this.#host.stopTimeoutMs;
    const answer = await worker.stop(limit);
    if (answer === null || answer.inFlight > 0) {
      // The worker ended (broke, failed, timed out) without a position, or with chains still
      // in flight (it has unmapped guest memory): the base would be wrong, so the request
      // fails and the ring is broken (err eventfd), never a wrong base.
      if (this.#worker === worker) {
        this.#worker = null;
        this.markBroken(
          answer === null
            ? "worker ended without returning the ring position"
            : `${answer.inFlight} chains still in flight ${limit} ms after the stop`,
        );
      }
      this.#stopKickWatch();
      throw answer === null
        ? stopFailed(this.index, "ring position lost (the worker ended)", "lost")
        : stopFailed(
            this.index,
            `${answer.inFlight} chains still in flight ${limit} ms after the stop`,
            answer.inFlight,
          );
    }
    const base = answer.base;
    if (this.#worker !== worker) return { ...base };
    this.#worker = null;
    this.base = base;
    const wasStarted = this.#started;
    this.#started = false;
    // The old kick fd is not watched again: the ring restarts after SET_VRING_KICK.
    if (wasStarted) this.#host.stateChanged(this);
    return { ...this.base };
  }

  /** Flush the dirty-log marks batched by this ring's writes (a ring that stops or breaks). */
  #flushLog(): void {
    try {
      (this.#memory ?? this.#host.memory())?.log?.flush();
    } catch (err) {
      this.#host.logger.error(
        `queue ${this.index}: dirty log flush failed: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
  }

  /**
   * Stop the ring at once (reset, disconnect, memory gone; {@link halt} for GET_VRING_BASE) and
   * return its base. Used entries pushed are published and pending log marks flushed first.
   * The ring keeps its fds; a later kick starts it again from the returned base unless
   * SET_VRING_BASE changes it.
   * @returns the next available index (and the packed fields)
   */
  stop(): QueueBase {
    this.#endSpin();
    if (this.#queue) {
      if (!this.broken) this.flush();
      if (this.#queue) this.base = this.#queue.getBase();
    }
    this.#flushLog();
    if (this.#worker) {
      // Synchronous stop (reset, disconnect): the worker's position is lost; it exits.
      void this.#worker.close();
      this.#worker = null;
      if (this.kickFd >= 0 && !this.#kickWatcher) this.#watchKick();
    }
    const wasStarted = this.#started;
    this.#started = false;
    this.#queue = null;
    this.#memory = null;
    this.#stopPolling();
    if (wasStarted) this.#host.stateChanged(this);
    return { ...this.base };
  }

  /**
   * Mark the ring broken: it is no longer processed, and the front-end is told through the
   * err eventfd (vhost-user: VHOST_USER_SET_VRING_ERR).
   * @param reason what was wrong, with the field and value
   */
  markBroken(reason: string): void {
    if (this.broken) return;
    this.broken = reason;
    this.#host.logger.error(`queue ${this.index}: broken: ${reason}`);
    if (this.errFd >= 0) {
      try {
        native.eventfdWrite(this.errFd, 1);
      } catch (err) {
        this.#host.logger.warn(`queue ${this.index}: err fd write failed: ${String(err)}`);
      }
    }
    this.#endSpin();
    if (this.#queue) this.base = this.#queue.getBase();
    // ORDERING: what the device wrote before the ring broke is logged (the front-end may be
    // migrating); no write follows through this ring.
    this.#flushLog();
    if (this.#worker) {
      void this.#worker.close();
      this.#worker = null;
    }
    // Kicks are watched again (and ignored while broken) until the ring is set up anew.
    if (this.kickFd >= 0 && !this.#kickWatcher) this.#watchKick();
    this.#started = false;
    this.#queue = null;
    this.#stopPolling();
    this.#host.stateChanged(this);
  }

  /** Forget the ring's configuration and close its fds (RESET_DEVICE, disconnect). */
  reset(): void {
    this.stop();
    this.dispose();
    this.size = 0;
    this.addr = null;
    this.base = { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true };
    this.broken = null;
    this.polling = false;
    if (this.#enabled) {
      this.#enabled = false;
      this.#host.stateChanged(this);
    }
  }

  /** Close every fd and watcher; the object is dead afterwards. */
  dispose(): void {
    if (this.#worker) {
      void this.#worker.close();
      this.#worker = null;
    }
    this.#endSpin();
    this.#started = false;
    this.#queue = null;
    this.#memory = null;
    this.#stopPolling();
    this.#stopKickWatch();
    for (const fd of [this.kickFd, this.callFd, this.errFd]) {
      if (fd >= 0) native.close(fd);
    }
    this.kickFd = this.callFd = this.errFd = -1;
  }

  #stopKickWatch(): void {
    if (this.#kickWatcher) {
      this.#kickWatcher.close();
      this.#kickWatcher = null;
    }
  }

  #startPolling(): void {
    this.#stopPolling();
    this.#pollTimer = setInterval(() => this.poke(), 1);
    this.#pollTimer.unref();
  }

  #stopPolling(): void {
    if (this.#pollTimer) {
      clearInterval(this.#pollTimer);
      this.#pollTimer = null;
    }
  }

  // --- BackendQueue -------------------------------------------------------------------

  /** @inheritdoc */
  pop(): DescChain | null {
    const q = this.#queue;
    if (!q || this.broken || this.#stopping) return null;
    try {
      const chain = q.pop();
      if (chain !== null) this.#pops++;
      return chain;
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return null;
    }
  }

  /** @inheritdoc */
  get inFlight(): number {
    return this.#queue?.inFlight ?? 0;
  }

  /** @inheritdoc */
  cancel(chains: readonly DescChain[]): boolean {
    const q = this.#queue;
    if (!q || chains.length === 0) return chains.length === 0;
    return q.cancel(chains);
  }

  /** @inheritdoc */
  pushUsed(chain: DescChain, written: number): void {
    const q = this.#queue;
    if (!q) return;
    try {
      q.pushUsed(chain, written);
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
    }
  }

  /**
   * Publish the pushed used entries and signal the call fd when the driver asked for it
   * (VIRTIO 1.2 §2.7.7, §2.8.10; vhost-user: VHOST_USER_SET_VRING_CALL). A failure breaks the
   * ring.
   */
  flush(): void {
    const q = this.#queue;
    if (!q) return;
    let notify: boolean;
    try {
      notify = q.publish();
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return;
    }
    if (notify && this.callFd >= 0) {
      this.calls++;
      try {
        native.eventfdWrite(this.callFd, 1);
      } catch (err) {
        // The front-end chose this fd (SET_VRING_CALL): one that is not a writable eventfd
        // breaks this ring, not the process.
        this.markBroken(
          `call fd ${this.callFd}: ${err instanceof Error ? err.message : String(err)}`,
        );
      }
    }
  }

  /** @inheritdoc */
  read(chain: DescChain, dst: Uint8Array, offset = 0): number {
    return readChain(this.memory, chain, dst, offset);
  }

  /**
   * Copy `src` into the chain's writable segments, marking the dirty log. A ring that is not
   * running (stopped by GET_VRING_BASE, broken, reset) writes nothing: after the stop the
   * front-end's last log sync may already have happened.
   * @param chain a chain popped from this ring
   * @param src the bytes
   * @param offset bytes of the writable segments to skip
   * @returns the number of bytes written (0 when the ring is not running)
   */
  write(chain: DescChain, src: Uint8Array, offset = 0): number {
    const mem = this.#memory;
    if (this.#queue === null || mem === null) return 0;
    return writeChain(mem, chain, src, offset);
  }

  /**
   * Header then frame into the chain's writable segments, marking the dirty log; nothing once
   * the ring is not running (as {@link write}).
   * @param chain a chain popped from this ring
   * @param hdr the header
   * @param hdrLen bytes of `hdr` to write
   * @param data the frame, after the header
   * @returns the number of bytes written (0 when the ring is not running)
   */
  writeFrame(chain: DescChain, hdr: Uint8Array, hdrLen: number, data: Uint8Array): number {
    const mem = this.#memory;
    if (this.#queue === null || mem === null) return 0;
    return writeChainFrame(mem, chain, hdr, hdrLen, data);
  }

  /** The device-side ring while started (for tests and the session's own bookkeeping). */
  get deviceQueue(): DeviceQueue | null {
    return this.#queue;
  }
}

/**
 * The error of a stop that cannot answer a true base.
 * @param index the ring
 * @param why what went wrong
 * @param value the count in flight (or what was lost)
 * @returns a fatal VhostUserError naming GET_VRING_BASE and the ring
 */
function stopFailed(index: number, why: string, value: number | string): VhostUserError {
  return new VhostUserError("ERR_VHOST_REQUEST_FAILED", `queue ${index}: ${why}`, {
    request: "GET_VRING_BASE",
    field: "in flight",
    value,
    fatal: true,
  });
}
