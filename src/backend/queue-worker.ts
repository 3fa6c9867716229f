/**
 * The worker-thread side of a worker ring (see `worker-queue.ts`): maps the guest memory from
 * dup'ed fds, builds the device-side ring at the given base, watches the kick fd, runs the
 * handler module and signals the call fd. Started only by {@link QueueWorker}.
 */
import { parentPort, workerData } from "node:worker_threads";
import { native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import { GuestMemory } from "../memory/guest-memory.js";
import type { Region } from "../memory/guest-memory.js";
import { gpa as toGpa, uaddr as toUaddr, mmapOffset as toMmapOffset } from "../memory/address.js";
import {
  findMappingFault,
  mapDirtyLog,
  mapRegion,
  unmapDirtyLog,
  unmapRegion,
} from "../memory/mapping.js";
import type { DirtyLog } from "../memory/dirty-log.js";
import { createDeviceQueue } from "../virtq/device-queue.js";
import { readChain, writeChain } from "../virtq/chain-io.js";
import type { DescChain, DeviceQueue, QueueBase } from "../virtq/types.js";
import type { BackendQueue } from "./device.js";
import type {
  CreateQueueHandler,
  FromWorker,
  ToWorker,
  WorkerInit,
  WorkerLogInit,
  WorkerQueueHandler,
  WorkerRegionInit,
  WorkerRingAddresses,
  WorkerUsedLog,
} from "./worker-queue.js";

/**
 * Map every region, all or nothing. The fds stay open: they belong to the main thread's
 * QueueWorker, which closes every fd it sent once the worker is done with it.
 */
function mapAll(regions: WorkerRegionInit[]): Region[] {
  const mapped: Region[] = [];
  try {
    for (const r of regions) {
      mapped.push(
        mapRegion(r.fd, {
          gpa: toGpa(r.gpa),
          size: r.size,
          uaddr: toUaddr(r.uaddr),
          mmapOffset: toMmapOffset(r.mmapOffset),
        }),
      );
    }
    return mapped;
  } catch (err) {
    for (const m of mapped) unmapRegion(m);
    throw err;
  }
}

/** Map a dirty log sent by the main thread (the fd stays open: the QueueWorker closes it). */
function mapWorkerLog(log: WorkerLogInit): DirtyLog {
  return mapDirtyLog(log.fd, log.offset, log.size);
}

/** The ring as the handler sees it: the same contract as the main thread's queues. */
class WorkerRing implements BackendQueue {
  readonly index: number;
  readonly size: number;
  started = true;
  enabled: boolean;
  queue: DeviceQueue;
  memory: GuestMemory;
  callFd: number;
  calls = 0;
  /** chains popped so far (tells the poller whether a turn found work) */
  pops = 0;
  broken: string | null = null;
  /** true while the ring stops: pop() gives out nothing */
  stopping = false;

  constructor(init: WorkerInit, queue: DeviceQueue, memory: GuestMemory) {
    this.index = init.index;
    this.size = init.size;
    this.enabled = init.enabled;
    this.queue = queue;
    this.memory = memory;
    this.callFd = init.callFd;
  }

  get inFlight(): number {
    return this.queue.inFlight;
  }

  cancel(chains: readonly DescChain[]): boolean {
    if (this.broken !== null) return false;
    return this.queue.cancel(chains);
  }

  pop(): DescChain | null {
    if (this.broken !== null || this.stopping) return null;
    try {
      const chain = this.queue.pop();
      if (chain !== null) this.pops++;
      return chain;
    } catch (err) {
      this.broken = err instanceof Error ? err.message : String(err);
      return null;
    }
  }

  pushUsed(chain: DescChain, written: number): void {
    if (this.broken !== null) return;
    try {
      this.queue.pushUsed(chain, written);
    } catch (err) {
      this.broken = err instanceof Error ? err.message : String(err);
    }
  }

  flush(): void {
    if (this.broken !== null) return;
    let notify: boolean;
    try {
      notify = this.queue.publish();
    } catch (err) {
      this.broken = err instanceof Error ? err.message : String(err);
      return;
    }
    if (notify && this.callFd >= 0) {
      this.calls++;
      try {
        native.eventfdWrite(this.callFd, 1);
      } catch (err) {
        // A call fd that is not a writable eventfd breaks the ring (reported to the main
        // thread like any other broken ring), it does not kill the worker.
        this.broken = `call fd ${this.callFd}: ${err instanceof Error ? err.message : String(err)}`;
      }
    }
  }

  markBroken(reason: string): void {
    if (this.broken === null) this.broken = reason;
  }

  read(chain: DescChain, dst: Uint8Array, offset = 0): number {
    return readChain(this.memory, chain, dst, offset);
  }

  write(chain: DescChain, src: Uint8Array, offset = 0): number {
    // A stopped ring (its memory released) writes nothing.
    if (!this.started) return 0;
    return writeChain(this.memory, chain, src, offset);
  }
}

/**
 * Build the ring's device queue (the same construction path as the main thread's).
 * @param replaces the queue object being replaced: its chains in flight are carried over
 */
function buildQueue(
  init: WorkerInit,
  mem: GuestMemory,
  ring: WorkerRingAddresses,
  base: QueueBase,
  usedLog: WorkerUsedLog | null,
  replaces?: DeviceQueue,
): DeviceQueue {
  return createDeviceQueue(mem, {
    index: init.index,
    size: init.size,
    packed: init.packed,
    eventIdx: init.eventIdx,
    indirect: init.indirect,
    ring,
    base,
    usedLog,
    ...(replaces ? { inFlight: replaces.inFlightList } : {}),
  });
}

/** The worker's state machine; one per thread. */
class RingWorker {
  readonly #init: WorkerInit;
  readonly #port: NonNullable<typeof parentPort>;
  #regions: Region[] = [];
  /** the ring's addresses in the current memory */
  #addrs: WorkerRingAddresses;
  /** the dirty log this worker marks (its own mapping), or null while not logging */
  #log: DirtyLog | null = null;
  #usedLog: WorkerUsedLog | null;
  #ring: WorkerRing | null = null;
  #handler: WorkerQueueHandler | null = null;
  #kickFd: number;
  #watcher: FdWatcher | null = null;
  /** watches the fault eventfd (owned by the QueueWorker) */
  #faultWatcher: FdWatcher | null = null;
  #faultReported = false;
  #pollTimer: NodeJS.Timeout | null = null;
  #scheduled = false;
  #kicks = 0;
  #ended = false;
  #pending: ToWorker[] = [];
  #ready = false;
  #spinning = false;
  #idleTurns = 0;

  constructor(init: WorkerInit, port: NonNullable<typeof parentPort>) {
    this.#init = init;
    this.#port = port;
    this.#kickFd = init.kickFd;
    this.#addrs = init.ring;
    this.#usedLog = init.usedLog;
    port.on("message", (m: ToWorker) => {
      if (this.#ready) this.#onMessage(m);
      else this.#pending.push(m);
    });
  }

  #post(m: FromWorker): void {
    this.#port.postMessage(m);
  }

  async start(): Promise<void> {
    const init = this.#init;
    try {
      this.#regions = mapAll(init.regions);
      const mem = new GuestMemory(this.#regions);
      if (init.log) this.#log = mapWorkerLog(init.log);
      mem.log = this.#log;
      const queue = buildQueue(init, mem, init.ring, init.base, this.#usedLog);
      this.#ring = new WorkerRing(init, queue, mem);
      const mod = (await import(init.module)) as { createQueueHandler?: CreateQueueHandler };
      if (typeof mod.createQueueHandler !== "function") {
        throw new Error(`module ${init.module} does not export createQueueHandler`);
      }
      this.#handler = mod.createQueueHandler({
        index: init.index,
        options: init.options,
        counters: init.counters,
      });
    } catch (err) {
      this.#break(err instanceof Error ? err.message : String(err));
      return;
    }
    this.#watchKick();
    this.#watchFaults();
    this.#ready = true;
    this.#post({ type: "started" });
    const pending = this.#pending;
    this.#pending = [];
    for (const m of pending) this.#onMessage(m);
    this.#run();
  }

  #onMessage(m: ToWorker): void {
    // Fds in messages belong to the main thread (QueueWorker closes them): never closed here.
    if (this.#ended) return;
    const ring = this.#ring!;
    switch (m.type) {
      case "enable":
        ring.enabled = m.enabled;
        this.#schedule();
        return;
      case "call":
        ring.callFd = m.fd;
        return;
      case "kick":
        this.#unwatchKick();
        this.#kickFd = m.fd;
        this.#watchKick();
        this.#schedule();
        return;
      case "poke":
        this.#schedule();
        return;
      case "remap":
        this.#remap(m.regions, m.ring, m.usedLog);
        return;
      case "log":
        this.#setLog(m.log, m.usedLog);
        return;
      case "stop":
        void this.#stop(m.timeoutMs);
        return;
    }
  }

  #remap(
    regions: WorkerRegionInit[],
    addrs: WorkerRingAddresses,
    usedLog: WorkerUsedLog | null,
  ): void {
    const ring = this.#ring!;
    let mapped: Region[];
    try {
      mapped = mapAll(regions);
    } catch (err) {
      this.#break(`remap: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    const old = this.#regions;
    try {
      const mem = new GuestMemory(mapped);
      // The log mapping is the worker's own and outlives any memory table: attach it as is.
      mem.log = this.#log;
      // LIFETIME: the ring is rebuilt over the new mappings before the old ones are unmapped.
      // Used entries pushed are published first; chains in flight carry over.
      ring.flush();
      ring.queue = buildQueue(this.#init, mem, addrs, ring.queue.getBase(), usedLog, ring.queue);
      if (this.#spinning) ring.queue.setNotification(false);
      ring.memory = mem;
      this.#regions = mapped;
      this.#addrs = addrs;
      this.#usedLog = usedLog;
    } catch (err) {
      for (const r of mapped) unmapRegion(r);
      this.#break(`remap: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    this.#checkFaults(old, null);
    for (const r of old) unmapRegion(r);
    this.#post({ type: "remapped" });
    this.#schedule();
  }

  /** Log the new way: map `log` (or stop logging), rebuild the ring if `usedLog` changed. */
  #setLog(log: WorkerLogInit | null, usedLog: WorkerUsedLog | null): void {
    const ring = this.#ring!;
    let next: DirtyLog | null = null;
    try {
      if (log) next = mapWorkerLog(log);
    } catch (err) {
      this.#break(`log: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    const old = this.#log;
    // ORDERING: the setter flushes the marks batched in the old log before the first write
    // is marked in the new one; the old mapping goes only after that flush.
    ring.memory.log = next;
    this.#log = next;
    if (old) {
      this.#checkFaults([], old);
      unmapDirtyLog(old);
    }
    const changed = usedLog?.logGuestAddr !== this.#usedLog?.logGuestAddr;
    this.#usedLog = usedLog;
    if (changed) {
      try {
        ring.flush();
        ring.queue = buildQueue(
          this.#init,
          ring.memory,
          this.#addrs,
          ring.queue.getBase(),
          usedLog,
          ring.queue,
        );
        if (this.#spinning) ring.queue.setNotification(false);
      } catch (err) {
        this.#break(`log: ${err instanceof Error ? err.message : String(err)}`);
        return;
      }
    }
    this.#post({ type: "logged" });
    this.#schedule();
  }

  /**
   * GET_VRING_BASE: take no new chain, let the handler complete or cancel what it holds, wait
   * (bounded) for the chains in flight, publish, flush the log, answer, release.
   * @param timeoutMs longest wait for the chains in flight
   */
  async #stop(timeoutMs: number): Promise<void> {
    const ring = this.#ring!;
    ring.stopping = true;
    this.#unwatchKick();
    try {
      this.#handler?.stop?.(ring);
    } catch (err) {
      ring.broken ??= `device error at the stop: ${err instanceof Error ? err.message : String(err)}`;
    }
    ring.flush();
    const deadline = Date.now() + timeoutMs;
    while (ring.broken === null && ring.queue.inFlight > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      ring.flush();
    }
    if (this.#ended) return;
    const inFlight = ring.broken === null ? ring.queue.inFlight : 0;
    if (ring.broken !== null) {
      this.#break(ring.broken);
      return;
    }
    // Every mark reaches the log before the position is answered: the front-end's last log
    // sync follows GET_VRING_BASE.
    this.#log?.flush();
    // The next start (main thread or a new worker) relies on kicks: ask for them again.
    this.#endSpin();
    const base = ring.queue.getBase();
    this.#post({ type: "stopped", base, inFlight, kicks: this.#kicks, calls: ring.calls });
    this.#release();
  }

  #break(reason: string): void {
    let base: QueueBase | null = null;
    try {
      base = this.#ring?.queue.getBase() ?? null;
    } catch {
      base = null;
    }
    this.#post({ type: "broken", reason, base });
    this.#release();
  }

  /**
   * Unmap, stop watching: the thread then ends by itself. The fds it was sent are closed by the
   * main thread once the thread has exited.
   */
  #release(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#unwatchKick();
    // A fault not yet seen is reported before its mapping goes.
    this.#checkFaults(this.#regions, this.#log);
    this.#faultWatcher?.close();
    this.#faultWatcher = null;
    this.#kickFd = -1;
    const ring = this.#ring;
    if (ring) {
      ring.started = false;
      ring.callFd = -1;
    }
    for (const r of this.#regions) unmapRegion(r);
    this.#regions = [];
    if (this.#log) {
      if (ring) ring.memory.log = null;
      unmapDirtyLog(this.#log);
    }
    this.#log = null;
    this.#port.close();
  }

  #watchKick(): void {
    if (this.#kickFd >= 0) {
      const w = new native.FdWatcher(this.#kickFd, (_events, error) => {
        if (error) {
          this.#unwatchKick();
          return;
        }
        try {
          native.eventfdRead(this.#kickFd);
        } catch {
          // not an eventfd: the readiness is the kick
        }
        this.#kicks++;
        this.#run();
      });
      w.start(POLL_READABLE);
      this.#watcher = w;
    } else {
      this.#pollTimer = setInterval(() => this.#run(), 1);
    }
  }

  /** Learn of every SIGBUS the addon survives; look whether it was in this worker's mappings. */
  #watchFaults(): void {
    const fd = this.#init.faultFd;
    if (fd < 0) return;
    this.#faultWatcher = new native.FdWatcher(fd, () => {
      native.eventfdRead(fd);
      this.#checkFaults(this.#regions, this.#log);
    });
    this.#faultWatcher.start(POLL_READABLE);
  }

  /**
   * Report the first fault found in these mappings (once per worker: the counts only grow).
   * The ring goes on over the zero pages until the session closes the connection.
   */
  #checkFaults(regions: readonly Region[], log: DirtyLog | null): void {
    if (this.#faultReported) return;
    const fault = findMappingFault(regions, log);
    if (!fault) return;
    this.#faultReported = true;
    this.#post({ type: "fault", fault });
  }

  #unwatchKick(): void {
    this.#watcher?.close();
    this.#watcher = null;
    if (this.#pollTimer) clearInterval(this.#pollTimer);
    this.#pollTimer = null;
  }

  #schedule(): void {
    if (this.#scheduled || this.#ended) return;
    this.#scheduled = true;
    setImmediate(() => {
      this.#scheduled = false;
      this.#run();
    });
  }

  /** Stop polling and ask the driver for kicks again. */
  #endSpin(): void {
    if (!this.#spinning) return;
    this.#spinning = false;
    try {
      this.#ring?.queue.setNotification(true);
    } catch {
      // memory gone
    }
  }

  #run(): void {
    const ring = this.#ring;
    if (this.#ended || !ring || !this.#handler) return;
    const before = ring.pops;
    let more: boolean | void = false;
    try {
      more = this.#handler.process(ring);
    } catch (err) {
      ring.broken ??= `device error: ${err instanceof Error ? err.message : String(err)}`;
    }
    ring.flush();
    if (ring.broken !== null) {
      this.#break(ring.broken);
      return;
    }
    if (more === true) this.#schedule();
    // Adaptive polling, as on the main thread (see `Vring`): while turns find work, keep
    // polling with driver notifications suppressed; after `pollTurns` idle turns, ask for
    // kicks again and look once more.
    const turns = this.#init.pollTurns;
    if (turns <= 0) return;
    if (ring.pops !== before) {
      this.#idleTurns = 0;
      if (!this.#spinning) {
        this.#spinning = true;
        ring.queue.setNotification(false);
      }
      this.#schedule();
    } else if (this.#spinning) {
      if (++this.#idleTurns >= turns) {
        this.#endSpin();
        // ORDERING: notifications were re-enabled (seq-cst store) before this look at the ring.
        if (ring.queue.hasAvailable()) this.#schedule();
      } else {
        this.#schedule();
      }
    }
  }
}

if (parentPort !== null) {
  void new RingWorker(workerData as WorkerInit, parentPort).start();
}
