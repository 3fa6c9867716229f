/**
 * One front-end connection to a back-end: the handler of every front-end request
 * (vhost-user: "Front-end message types"), the rings, guest memory and the dirty log.
 *
 * Requests are handled one at a time, in order. Syntax (sizes, flags, fds) was checked by the
 * channel from the request table; this file checks semantics (negotiated features, ring
 * indices, memory ranges). Each request's handler and reply rule are found in the handler
 * table, `BackendSession.#handlers`, beside the request table's entry. A request that fails its checks gets a failure reply where a reply
 * is due (REPLY_ACK or a reply body), a log line naming the request and the value, and the
 * connection goes on; when no answer is due the front-end cannot be told, and the connection
 * is closed instead. A malformed ring breaks only that ring.
 */
import { EventEmitter } from "node:events";
import { native, FileSeal, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import {
  BackendRequest,
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  hasFeature,
  MAX_FDS,
  MAX_MEM_REGIONS,
  MAX_PAYLOAD_SIZE,
  VRING_F_LOG,
} from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import { checkGate, failureReply, requestSpec, hasExplicitReply } from "../protocol/table.js";
import type { AnyRequestSpec, FrontendReplyPayloads, HandlerReply } from "../protocol/table.js";
import {
  checkDeviceStateParams,
  decodePackedVringBase,
  decodeSplitVringBase,
  encodePackedVringBase,
  encodeSplitVringBase,
} from "../protocol/codecs.js";
import type { ConfigSpace, LogBaseReply, MemoryRegion, VringState } from "../protocol/codecs.js";
import { Channel } from "../channel.js";
import type { FrontendRequestMessage as FrontendMessage } from "../protocol/framing.js";
import { GuestMemory } from "../memory/guest-memory.js";
import type { Region, RegionInfo } from "../memory/guest-memory.js";
import { gpa as toGpa, uaddr as toUaddr, mmapOffset as toMmapOffset } from "../memory/address.js";
import {
  describeMappingFault,
  findMappingFault,
  mapRegionSplit,
  unmapRegion,
  mapDirtyLog,
  unmapDirtyLog,
} from "../memory/mapping.js";
import type { MappingFault } from "../memory/mapping.js";
import { LOG_PAGE_SIZE } from "../memory/dirty-log.js";
import type { DirtyLog } from "../memory/dirty-log.js";
import { MAX_QUEUE_SIZE, splitRingSizes } from "../virtq/layout.js";
import type { QueueBase } from "../virtq/types.js";
import { DeviceStateDirection } from "../protocol/constants.js";
import { readStateFromFd, writeStateToFd } from "../migration/transfer.js";
import { Vring } from "./vring.js";
import type { RingFormat, VringHost } from "./vring.js";
import type {
  BackendQueue,
  DeviceContext,
  Logger,
  VhostUserDevice,
  WorkerQueueSpec,
} from "./device.js";
import type { WorkerLogInit, WorkerRegionInit } from "./worker-queue.js";

/** Number of memory slots reported by GET_MAX_MEM_SLOTS. */
export const BACKEND_MAX_MEM_SLOTS = 32;

/** Transport features the framework itself implements. */
export const FRAMEWORK_FEATURES =
  featureMask(VirtioFeature.VERSION_1) |
  featureMask(VirtioFeature.RING_PACKED) |
  featureMask(VirtioFeature.RING_EVENT_IDX) |
  featureMask(VirtioFeature.RING_INDIRECT_DESC) |
  featureMask(VirtioFeature.PROTOCOL_FEATURES) |
  featureMask(VirtioFeature.LOG_ALL);

/** Protocol features the framework itself implements. */
export const FRAMEWORK_PROTOCOL_FEATURES =
  featureMask(ProtocolFeature.MQ) |
  featureMask(ProtocolFeature.LOG_SHMFD) |
  featureMask(ProtocolFeature.REPLY_ACK) |
  featureMask(ProtocolFeature.BACKEND_REQ) |
  featureMask(ProtocolFeature.RESET_DEVICE) |
  featureMask(ProtocolFeature.CONFIGURE_MEM_SLOTS) |
  featureMask(ProtocolFeature.STATUS);

/** Options of a {@link BackendSession}. */
export interface BackendSessionOptions {
  /** name used in log lines (e.g. the socket path) */
  name: string;
  logger: Logger;
  /**
   * SET_DEVICE_STATE_FD: use the back-end's own pipe and return its fd in the reply
   * (default false: use the front-end's fd).
   */
  ownStateChannel?: boolean;
  /** Largest device state accepted on LOAD (default 64 MiB). */
  maxStateBytes?: number;
  /**
   * A device-state transfer (SET_DEVICE_STATE_FD) that has not reached its end after this many
   * milliseconds fails and its fd is closed (default 60 000; 1..{@link MAX_STATE_TIMEOUT_MS});
   * it also ends when the connection closes.
   */
  stateTimeoutMs?: number;
  /**
   * Most requests waiting to be handled (behind a slow one, e.g. CHECK_DEVICE_STATE waiting
   * for a transfer) before the connection is closed: count (>= 1), payload bytes
   * (>= `MAX_PAYLOAD_SIZE`, 4096) and fds (>= `MAX_FDS`, 8), integers (default
   * {@link DEFAULT_REQUEST_BACKLOG}).
   */
  requestBacklog?: { requests: number; bytes: number; fds: number };
  /**
   * Adaptive polling: event-loop turns a ring is polled (driver notifications suppressed)
   * after the last turn that found work; 0 (the default) disables it. `SPIN_IDLE_TURNS` (vring.ts)
   * is an example value; measured against DPDK on 2 cores it lowered throughput.
   */
  pollTurns?: number;
  /**
   * Busy polling: after a ring found work, poll it synchronously (driver notifications
   * suppressed) until it has been idle this many microseconds, yielding to the event loop
   * every millisecond; 0 (the default) disables it. Takes precedence over `pollTurns` on the
   * main thread.
   */
  busyPollMicros?: number;
  /**
   * GET_VRING_BASE: longest wait (ms) for the chains a device still holds once it was asked to
   * complete or cancel them (`VhostUserDevice.stopQueue`); chains still in flight then fail
   * the connection. Default 1000; 0..60000.
   */
  stopTimeoutMs?: number;
}

/** Default {@link BackendSessionOptions.requestBacklog}. */
export const DEFAULT_REQUEST_BACKLOG = Object.freeze({ requests: 1024, bytes: 1 << 20, fds: 256 });

/** Largest {@link BackendSessionOptions.stateTimeoutMs} (one hour). */
export const MAX_STATE_TIMEOUT_MS = 3_600_000;

/**
 * Check the options of a session before any socket is made.
 * @param where the caller, named in the error
 * @param o the options
 * @throws RangeError naming the option and the value
 */
export function checkSessionLimits(
  where: string,
  o: { stateTimeoutMs?: number; requestBacklog?: { requests: number; bytes: number; fds: number } },
): void {
  const t = o.stateTimeoutMs;
  if (t !== undefined && !(Number.isInteger(t) && t >= 1 && t <= MAX_STATE_TIMEOUT_MS)) {
    throw new RangeError(
      `${where}: stateTimeoutMs must be an integer in 1..${MAX_STATE_TIMEOUT_MS}, got ${t}`,
    );
  }
  const b = o.requestBacklog;
  if (b === undefined) return;
  // At least one request of the largest kind must fit.
  const least = { requests: 1, bytes: MAX_PAYLOAD_SIZE, fds: MAX_FDS };
  for (const key of ["requests", "bytes", "fds"] as const) {
    const v = (b as Partial<Record<string, unknown>>)[key];
    if (!(typeof v === "number" && Number.isSafeInteger(v) && v >= least[key])) {
      throw new RangeError(
        `${where}: requestBacklog.${key} must be an integer >= ${least[key]}, got ${String(v)}`,
      );
    }
  }
}

/** Default of {@link BackendSessionOptions.stopTimeoutMs}. */
export const DEFAULT_STOP_TIMEOUT_MS = 1000;

/** Outcome of the last device-state transfer, for CHECK_DEVICE_STATE. */
interface StateTransfer {
  /** aborts the transfer (connection closed, or timed out) */
  abort: AbortController;
  direction: DeviceStateDirection;
  done: Promise<void>;
  error: Error | null;
  bytes: number;
  settled: boolean;
  /**
   * LIFETIME: the saved state, kept (alive and unchanged) until CHECK_DEVICE_STATE or the
   * connection's end: the zero-copy channel refers to its pages until the front-end read them.
   */
  data: Uint8Array | null;
}

/** Counters of one session, for stats and tests. */
export interface SessionStats {
  /** requests received */
  requests: number;
  /** requests that failed (a failure reply was sent where one was due) */
  failedRequests: number;
  /** memory-table changes installed (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) */
  memoryTableUpdates: number;
}

function toNumber(value: bigint, request: string, field: string): number {
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new VhostUserError("ERR_VHOST_BAD_FIELD", "value beyond 2^53", {
      request,
      field,
      value,
    });
  }
  return Number(value);
}

function badField(request: string, field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, { request, field, value });
}

/** A decoded front-end request with id `R` (its payload typed from the request table). */
type RequestOf<R extends FrontendRequest> = Extract<FrontendMessage, { request: R }>;

/**
 * One entry of the handler table: what handles request `R` and how its success is answered
 * (see `BackendSession.#handlers`).
 */
type Handler<R extends FrontendRequest> =
  | {
      readonly reply: "body";
      run(
        session: BackendSession,
        msg: RequestOf<R>,
      ): FrontendReplyPayloads[R] | Promise<FrontendReplyPayloads[R]>;
    }
  | {
      readonly reply: Exclude<HandlerReply, "body">;
      run(session: BackendSession, msg: RequestOf<R>): void | Promise<void>;
    };

/** The handler table: at most one handler per front-end request. */
type FrontendHandlers = { readonly [R in FrontendRequest]?: Handler<R> };

/** A handler looked up by a request id only known at run time. */
interface AnyHandler {
  readonly reply: HandlerReply;
  run(session: BackendSession, msg: FrontendMessage): unknown;
}

/**
 * The back-end side of one vhost-user connection.
 *
 * Events: `close` (the connection ended), `error` (a request failed; the connection goes on
 * unless the error is fatal), `ready` (a ring started).
 */
export class BackendSession extends EventEmitter implements VringHost, DeviceContext {
  /** the main channel of the connection (role back-end) */
  readonly channel: Channel<"main">;
  /** the device served */
  readonly device: VhostUserDevice;
  /** the session's logger */
  readonly logger: Logger;
  /** name used in log lines (e.g. the socket path) */
  readonly name: string;
  /** one record per queue of the device, by index */
  readonly vrings: Vring[];
  /** request counters */
  readonly stats: SessionStats = { requests: 0, failedRequests: 0, memoryTableUpdates: 0 };

  #features = 0n;
  #featuresSet = false;
  #protocolFeatures = 0n;
  #status = 0;
  #owner = false;
  #regions: Region[] = [];
  /** the fd of each mapped region, kept open so worker rings can map the region too */
  readonly #regionFds = new Map<Region, number>();
  /**
   * The memory-table region each mapped region belongs to: a region of 2 GiB or more is mapped
   * as several adjacent ones (see `mapRegionSplit`), which share one entry here.
   */
  readonly #origin = new Map<Region, RegionInfo>();
  #memory: GuestMemory | null = null;
  #dirtyLog: DirtyLog | null = null;
  #logFd = -1;
  /**
   * The SET_LOG_BASE fd with its offset and size, kept open while the device has worker
   * queues: each worker maps the log from a dup of it.
   */
  #logSource: { fd: number; offset: number; size: number } | null = null;
  #backendChannel: Channel<"backend-req"> | null = null;
  #closed = false;
  #queue: Promise<void> = Promise.resolve();
  #transfer: StateTransfer | null = null;
  #migrating = false;
  readonly #ownStateChannel: boolean;
  readonly #maxStateBytes: number;
  readonly #stateTimeoutMs: number;
  readonly #backlogLimit: { requests: number; bytes: number; fds: number };
  /** requests received and not yet handled, with their payload bytes and fds */
  readonly #backlog = { requests: 0, bytes: 0, fds: 0 };
  /** eventfd the addon kicks when it survives a SIGBUS in any mapping (see native.mappingFault) */
  #faultFd = -1;
  #faultWatcher: FdWatcher | null = null;
  /** see {@link BackendSessionOptions.pollTurns} */
  readonly pollTurns: number;
  /** see {@link BackendSessionOptions.busyPollMicros} */
  readonly busyPollMicros: number;
  /** see {@link BackendSessionOptions.stopTimeoutMs} */
  readonly stopTimeoutMs: number;

  /**
   * Attach a device to a connected channel (vhost-user: "Front-end message types").
   * @param channel the main channel, role back-end
   * @param device the device to serve
   * @param options name and logger
   * @throws RangeError when `options.pollTurns` is not an integer >= 0,
   *   `options.busyPollMicros` not a number in 0..1000, or `options.stateTimeoutMs` /
   *   `options.requestBacklog` out of range (see {@link checkSessionLimits})
   */
  constructor(channel: Channel<"main">, device: VhostUserDevice, options: BackendSessionOptions) {
    super();
    this.channel = channel;
    this.device = device;
    this.name = options.name;
    this.logger = options.logger;
    this.#ownStateChannel = options.ownStateChannel ?? false;
    this.#maxStateBytes = options.maxStateBytes ?? 64 * 1024 * 1024;
    checkSessionLimits("BackendSession", options);
    this.#stateTimeoutMs = options.stateTimeoutMs ?? 60_000;
    this.#backlogLimit = options.requestBacklog ?? DEFAULT_REQUEST_BACKLOG;
    this.pollTurns = options.pollTurns ?? 0;
    if (!Number.isInteger(this.pollTurns) || this.pollTurns < 0) {
      throw new RangeError(
        `BackendSession: pollTurns must be an integer >= 0, got ${this.pollTurns}`,
      );
    }
    this.busyPollMicros = options.busyPollMicros ?? 0;
    if (!(this.busyPollMicros >= 0 && this.busyPollMicros <= 1000)) {
      throw new RangeError(
        `BackendSession: busyPollMicros must be in 0..1000, got ${this.busyPollMicros}`,
      );
    }
    this.stopTimeoutMs = options.stopTimeoutMs ?? DEFAULT_STOP_TIMEOUT_MS;
    if (!(
      Number.isInteger(this.stopTimeoutMs) &&
      this.stopTimeoutMs >= 0 &&
      this.stopTimeoutMs <= 60000
    )) {
      throw new RangeError(
        `BackendSession: stopTimeoutMs must be an integer in 0..60000, got ${this.stopTimeoutMs}`,
      );
    }
    this.vrings = Array.from({ length: device.queueCount }, (_, i) => new Vring(i, this));
    channel.on("message", (msg: FrontendMessage) => {
      if (!this.#admit(msg)) return;
      const cost = { bytes: msg.size, fds: msg.fds.length };
      // Requests are handled strictly in order: GET_VRING_BASE may wait for in-flight buffers.
      this.#queue = this.#queue
        .then(() => this.#dispatch(msg))
        .finally(() => {
          this.#backlog.requests--;
          this.#backlog.bytes -= cost.bytes;
          this.#backlog.fds -= cost.fds;
        })
        .catch((err: unknown) => {
          // #dispatch reports its own failures; anything reaching here is a bug in the
          // framework. Log it and keep the chain alive so later requests are still handled.
          this.logger.error(
            `${this.name}: ${msg.name}: ${err instanceof Error ? err.message : String(err)}`,
          );
        });
    });
    channel.on("error", (err: Error) => {
      this.logger.error(`${this.name}: connection error: ${err.message}`);
      this.#emitError(err);
    });
    channel.on("close", (cause?: Error) => {
      if (cause && !this.#closed)
        this.logger.warn(`${this.name}: connection closed: ${cause.message}`);
      this.#teardown();
    });
    this.#watchFaults();
    device.attach?.(this);
  }

  /**
   * Count a request into the backlog, or close the connection when it would exceed the limit
   * (a front-end that keeps sending behind a request that waits cannot make the process hold
   * its fds and messages without bound).
   * @returns false when the request was refused (its fds closed, the connection closing)
   */
  #admit(msg: FrontendMessage): boolean {
    const b = this.#backlog;
    const max = this.#backlogLimit;
    if (
      b.requests + 1 > max.requests ||
      b.bytes + msg.size > max.bytes ||
      b.fds + msg.fds.length > max.fds
    ) {
      for (const fd of msg.fds) native.close(fd);
      if (this.#closed) return false;
      const error = new VhostUserError(
        "ERR_VHOST_REQUEST_FAILED",
        `too many requests waiting (${b.requests} requests, ${b.bytes} bytes, ${b.fds} fds; ` +
          `at most ${max.requests}, ${max.bytes}, ${max.fds})`,
        { request: msg.name, field: "backlog", value: b.requests, fatal: true },
      );
      this.logger.error(`${this.name}: ${error.message}; closing the connection`);
      this.#emitError(error);
      this.channel.close();
      return false;
    }
    b.requests++;
    b.bytes += msg.size;
    b.fds += msg.fds.length;
    return true;
  }

  /**
   * Learn when the addon survives a SIGBUS (a front-end shrank the file behind a mapping):
   * every session is told, each looks at its own mappings.
   */
  #watchFaults(): void {
    const fd = native.faultSubscribe();
    this.#faultFd = fd;
    this.#faultWatcher = new native.FdWatcher(fd, () => {
      native.eventfdRead(fd);
      this.#checkFaults();
    });
    this.#faultWatcher.start(POLL_READABLE);
  }

  /** Close the connection when one of its own (main-thread) mappings faulted. */
  #checkFaults(): void {
    const fault = findMappingFault(this.#regions, this.#dirtyLog);
    if (fault) this.mappingFaulted(fault);
  }

  /**
   * A mapping of this connection faulted (on the main thread, or in a worker ring's own
   * mapping): close the connection naming the region and offset. The faulting pages read as
   * zeros until then.
   * @param fault where
   */
  mappingFaulted(fault: MappingFault): void {
    if (this.#closed) return;
    const d = describeMappingFault(fault, this.#frontendRegions());
    const error = new VhostUserError("ERR_VHOST_REQUEST_FAILED", d.message, {
      request: "memory access",
      field: d.field,
      value: d.value,
      fatal: true,
    });
    this.logger.error(`${this.name}: ${error.message}; closing the connection`);
    this.#emitError(error);
    this.channel.close();
  }

  /** Emit `error` for listeners; without one, the log line already written is the report. */
  #emitError(err: Error): void {
    if (this.listenerCount("error") > 0) this.emit("error", err);
  }

  // --- DeviceContext ------------------------------------------------------------------

  /** @returns negotiated virtio features */
  get features(): bigint {
    return this.#features;
  }

  /** @returns negotiated protocol features */
  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /** @returns the virtio device status set by SET_STATUS */
  get status(): number {
    return this.#status;
  }

  /**
   * @param index queue index
   * @returns the queue, or undefined when out of range
   */
  queue(index: number): BackendQueue | undefined {
    return this.vrings[index];
  }

  /**
   * Send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG if the BACKEND_REQ channel is up and
   * PROTOCOL_F_CONFIG was negotiated (vhost-user: "Back-end message types"); otherwise the
   * change is only logged.
   */
  notifyConfigChange(): void {
    const ch = this.#backendChannel;
    if (!ch) return;
    if (!hasFeature(this.#protocolFeatures, ProtocolFeature.CONFIG)) {
      this.logger.debug(`${this.name}: config changed; PROTOCOL_F_CONFIG not negotiated, not sent`);
      return;
    }
    try {
      ch.send(BackendRequest.CONFIG_CHANGE_MSG, null);
    } catch (err) {
      this.logger.warn(
        `${this.name}: config-change notification failed: ${(err as Error).message}`,
      );
    }
  }

  /** @returns the features this back-end offers in GET_FEATURES */
  offeredFeatures(): bigint {
    return this.device.features | FRAMEWORK_FEATURES;
  }

  /** @returns the protocol features this back-end offers */
  offeredProtocolFeatures(): bigint {
    let pf = FRAMEWORK_PROTOCOL_FEATURES | (this.device.protocolFeatures ?? 0n);
    if (this.device.getConfig && this.device.offerConfig !== false) {
      pf |= featureMask(ProtocolFeature.CONFIG);
    }
    if (this.device.saveState && this.device.loadState) {
      pf |= featureMask(ProtocolFeature.DEVICE_STATE);
    }
    return pf;
  }

  // --- VringHost ----------------------------------------------------------------------

  /** @returns current guest memory */
  memory(): GuestMemory | null {
    return this.#memory;
  }

  /** @returns the ring format from the negotiated features */
  format(): RingFormat {
    return {
      packed: hasFeature(this.#features, VirtioFeature.RING_PACKED),
      eventIdx: hasFeature(this.#features, VirtioFeature.RING_EVENT_IDX),
      indirect: hasFeature(this.#features, VirtioFeature.RING_INDIRECT_DESC),
    };
  }

  /**
   * The ring is stopping: ask the device to complete or cancel what it holds on it.
   * @param vring the queue
   */
  stopRequested(vring: Vring): void {
    try {
      this.device.stopQueue?.(vring);
    } catch (err) {
      this.logger.error(
        `${this.name}: queue ${vring.index}: device error at the stop: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
  }

  /**
   * Let the device process a queue, then publish its used entries.
   * @param vring the queue
   */
  process(vring: Vring): void {
    try {
      this.device.processQueue(vring);
    } catch (err) {
      vring.markBroken(`device error: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    vring.flush();
    if (this.#logFd >= 0 && this.#memory?.log) {
      // SET_LOG_FD: tell the front-end the log changed. Best effort: the counter may be full.
      try {
        native.eventfdWrite(this.#logFd, 1);
      } catch (err) {
        // Not a writable eventfd (the front-end chose it): stop using it, keep serving.
        this.logger.error(
          `${this.name}: log fd ${this.#logFd}: ${err instanceof Error ? err.message : String(err)}; no longer kicked`,
        );
        native.close(this.#logFd);
        this.#logFd = -1;
      }
    }
  }

  /**
   * Forward ring state changes to the device.
   * @param vring the queue
   */
  stateChanged(vring: Vring): void {
    this.device.queueStateChanged?.(vring);
    if (vring.started) this.emit("ring", vring);
  }

  /**
   * @param index queue index
   * @returns the device's worker spec for the queue, or null (processed on the main thread)
   */
  workerSpec(index: number): WorkerQueueSpec | null {
    if (!this.device.hasWorkerQueues || !this.device.workerQueue) return null;
    return this.device.workerQueue(index);
  }

  /**
   * @returns while VHOST_F_LOG_ALL is on, the dirty log with a fresh dup of its fd (the
   *   QueueWorker it is handed to closes it); else null
   */
  workerLog(): WorkerLogInit | null {
    const src = this.#logSource;
    if (!src || !this.#dirtyLog || !hasFeature(this.#features, VirtioFeature.LOG_ALL)) return null;
    return { fd: native.dup(src.fd), offset: src.offset, size: src.size };
  }

  /** @returns the current regions, each with a fresh dup of its fd (the worker closes it) */
  workerRegions(): WorkerRegionInit[] {
    const out: WorkerRegionInit[] = [];
    try {
      for (const r of this.#regions) {
        const fd = this.#regionFds.get(r);
        if (fd === undefined) throw new Error(`region at gpa ${r.gpa} has no fd`);
        out.push({
          fd: native.dup(fd),
          gpa: r.gpa,
          size: r.size,
          uaddr: r.uaddr,
          mmapOffset: r.mmapOffset,
        });
      }
    } catch (err) {
      for (const o of out) native.close(o.fd);
      throw err;
    }
    return out;
  }

  // --- request handling ---------------------------------------------------------------

  async #dispatch(msg: FrontendMessage): Promise<void> {
    if (this.#closed) {
      for (const fd of msg.fds) native.close(fd);
      return;
    }
    this.stats.requests++;
    try {
      this.#checkGate(msg);
      await this.#handle(msg);
    } catch (err) {
      this.stats.failedRequests++;
      const error =
        err instanceof VhostUserError
          ? err
          : new VhostUserError("ERR_VHOST_REQUEST_FAILED", String((err as Error)?.message ?? err), {
              request: msg.name,
              cause: err,
            });
      this.logger.error(`${this.name}: ${error.message}`);
      this.#emitError(error);
      if (this.#closed) return;
      if (error.fatal) {
        this.channel.close();
        return;
      }
      if (!this.#fail(msg)) {
        // The front-end would believe the request succeeded: end the connection instead (as
        // DPDK and rust-vmm do), naming the request and value in the log line above.
        this.logger.error(
          `${this.name}: ${msg.name} failed and the front-end cannot be told (no reply, no ` +
            "REPLY_ACK): closing the connection",
        );
        this.channel.close();
      }
    }
  }

  /**
   * Answer a failed request where an answer is due, from the request table: a request with a
   * reply body gets the table's failure body (vhost-user: "Communication"), any other gets a
   * failed REPLY_ACK when it asked for one.
   * @returns false when the front-end cannot be told (no reply body, no REPLY_ACK asked for)
   */
  #fail(msg: FrontendMessage): boolean {
    const spec: AnyRequestSpec | undefined = requestSpec("frontend", msg.request);
    if (spec && hasExplicitReply(spec, this.#protocolFeatures)) {
      this.channel.reply(msg.request, failureReply(spec, msg.payload) as never);
      return true;
    }
    if (msg.needReply && this.#replyAck()) {
      this.channel.ack(msg.request, false);
      return true;
    }
    return false;
  }

  #replyAck(): boolean {
    return hasFeature(this.#protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  /** Acknowledge success when the front-end asked for it. */
  #ok(msg: FrontendMessage): void {
    if (msg.needReply && this.#replyAck()) this.channel.ack(msg.request, true);
  }

  #vring(msg: FrontendMessage, index: number): Vring {
    const vring = this.vrings[index];
    if (!vring) {
      throw badField(
        msg.name,
        "index",
        index,
        `queue index out of range (queues=${this.vrings.length})`,
      );
    }
    return vring;
  }

  /**
   * Enforce the request table's gate (vhost-user: "Protocol features" and each message's
   * "requires ... negotiated"). GET/SET_PROTOCOL_FEATURES need F_PROTOCOL_FEATURES offered
   * only (QEMU sends them before SET_FEATURES); SET_VRING_ENABLE is accepted before
   * SET_FEATURES as before. The fds of a refused request are closed.
   * @throws VhostUserError ERR_VHOST_NOT_NEGOTIATED naming the feature
   */
  #checkGate(msg: FrontendMessage): void {
    const spec: AnyRequestSpec | undefined = requestSpec("frontend", msg.request);
    if (!spec) return;
    try {
      const offered = this.offeredFeatures();
      const early = !this.#featuresSet && msg.request === FrontendRequest.SET_VRING_ENABLE;
      checkGate(spec, {
        features: early ? offered : this.#features,
        protocolFeatures: this.#protocolFeatures,
        offeredFeatures: offered,
      });
    } catch (err) {
      for (const fd of msg.fds) native.close(fd);
      throw err;
    }
  }

  #requireProtocol(msg: FrontendMessage, feature: ProtocolFeature): void {
    if (!hasFeature(this.#protocolFeatures, feature)) {
      throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "protocol feature not negotiated", {
        request: msg.name,
        field: "protocol feature",
        value: ProtocolFeature[feature],
      });
    }
  }

  /**
   * Run the request's entry of {@link BackendSession.#handlers}, then answer as its reply rule
   * says. A request without an entry is refused, its fds closed.
   */
  async #handle(msg: FrontendMessage): Promise<void> {
    const handler = Object.hasOwn(BackendSession.#handlers, msg.request)
      ? (BackendSession.#handlers[msg.request] as AnyHandler | undefined)
      : undefined;
    if (!handler) {
      for (const fd of msg.fds) native.close(fd);
      throw new VhostUserError(
        "ERR_VHOST_REQUEST_FAILED",
        "request not supported by this back-end",
        {
          request: msg.name,
          field: "request",
          value: msg.request,
        },
      );
    }
    const result = handler.run(this, msg);
    // A synchronous handler is answered in the same turn, an asynchronous one once it settled.
    const body = result instanceof Promise ? await result : result;
    if (handler.reply === "body") this.channel.reply(msg.request, body as never);
    else if (handler.reply === "ack") this.#ok(msg);
  }

  /**
   * The handler of each front-end request this back-end serves (vhost-user: "Front-end message
   * types"), beside its entry in the request table (src/protocol/table.ts: codec, size bounds,
   * fds, reply kind, gate; checked before the handler runs). `reply` is how a request that
   * succeeded is answered: `body` the handler's result as the reply body; `ack` a REPLY_ACK
   * when the front-end asked for one (NEED_REPLY); `self` the handler sends its reply itself
   * (at a point that matters); `none` nothing. A failed request is answered by `#fail`.
   */
  static readonly #handlers = Object.freeze<FrontendHandlers>({
    [FrontendRequest.GET_FEATURES]: { reply: "body", run: (s) => s.offeredFeatures() },
    [FrontendRequest.SET_FEATURES]: { reply: "ack", run: (s, m) => s.#setFeatures(m, m.payload) },
    [FrontendRequest.SET_OWNER]: {
      reply: "ack",
      run(s) {
        s.#owner = true;
      },
    },
    [FrontendRequest.RESET_OWNER]: {
      reply: "ack",
      run(s) {
        // Deprecated; the spec recommends disabling all rings and keeping the session.
        for (const v of s.vrings) v.setEnabled(false);
      },
    },
    [FrontendRequest.SET_MEM_TABLE]: {
      reply: "ack",
      run: (s, m) => s.#setMemTable(m, m.payload.regions, m.fds),
    },
    [FrontendRequest.SET_LOG_BASE]: { reply: "body", run: (s, m) => s.#setLogBase(m) },
    [FrontendRequest.SET_LOG_FD]: {
      reply: "ack",
      run(s, m) {
        const fd = m.fds[0];
        if (s.#logFd >= 0) native.close(s.#logFd);
        s.#logFd = fd ?? -1;
      },
    },
    [FrontendRequest.SET_VRING_NUM]: { reply: "ack", run: (s, m) => s.#setVringNum(m) },
    [FrontendRequest.SET_VRING_ADDR]: { reply: "ack", run: (s, m) => s.#setVringAddr(m) },
    [FrontendRequest.SET_VRING_BASE]: { reply: "ack", run: (s, m) => s.#setVringBase(m) },
    [FrontendRequest.GET_VRING_BASE]: { reply: "body", run: (s, m) => s.#getVringBase(m) },
    [FrontendRequest.SET_VRING_KICK]: { reply: "ack", run: (s, m) => s.#setVringFd(m) },
    [FrontendRequest.SET_VRING_CALL]: { reply: "ack", run: (s, m) => s.#setVringFd(m) },
    [FrontendRequest.SET_VRING_ERR]: { reply: "ack", run: (s, m) => s.#setVringFd(m) },
    [FrontendRequest.GET_PROTOCOL_FEATURES]: {
      reply: "body",
      run: (s) => s.offeredProtocolFeatures(),
    },
    [FrontendRequest.SET_PROTOCOL_FEATURES]: {
      reply: "ack",
      run: (s, m) => s.#setProtocolFeatures(m),
    },
    [FrontendRequest.GET_QUEUE_NUM]: {
      reply: "body",
      run: (s) => BigInt(s.device.queueNum ?? s.device.queueCount),
    },
    [FrontendRequest.SET_VRING_ENABLE]: { reply: "ack", run: (s, m) => s.#setVringEnable(m) },
    [FrontendRequest.SEND_RARP]: {
      reply: "ack",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.RARP);
        if (!s.device.sendRarp)
          throw badField(m.name, "mac", m.payload.mac, "device cannot send RARP");
        s.device.sendRarp(m.payload.mac);
      },
    },
    [FrontendRequest.NET_SET_MTU]: {
      reply: "ack",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.MTU);
        const mtu = toNumber(m.payload, m.name, "mtu");
        if (!s.device.setMtu) throw badField(m.name, "mtu", mtu, "device has no MTU");
        s.device.setMtu(mtu);
      },
    },
    [FrontendRequest.SET_BACKEND_REQ_FD]: { reply: "ack", run: (s, m) => s.#setBackendReqFd(m) },
    [FrontendRequest.GET_CONFIG]: { reply: "body", run: (s, m) => s.#getConfig(m) },
    [FrontendRequest.SET_CONFIG]: {
      reply: "ack",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.CONFIG);
        if (!s.device.setConfig) {
          throw badField(m.name, "offset", m.payload.offset, "config space is read-only");
        }
        s.device.setConfig(m.payload.offset, m.payload.payload);
      },
    },
    [FrontendRequest.RESET_DEVICE]: { reply: "ack", run: (s) => s.#resetDevice() },
    [FrontendRequest.VRING_KICK]: {
      reply: "none",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.INBAND_NOTIFICATIONS);
        s.#vring(m, m.payload.index).poke();
      },
    },
    [FrontendRequest.GET_MAX_MEM_SLOTS]: {
      reply: "body",
      run: () => BigInt(BACKEND_MAX_MEM_SLOTS),
    },
    [FrontendRequest.ADD_MEM_REG]: {
      reply: "ack",
      run: (s, m) => s.#addMemReg(m, m.payload, m.fds),
    },
    [FrontendRequest.REM_MEM_REG]: {
      reply: "ack",
      run(s, m) {
        for (const fd of m.fds) native.close(fd);
        return s.#remMemReg(m, m.payload);
      },
    },
    [FrontendRequest.SET_STATUS]: {
      reply: "ack",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.STATUS);
        s.#status = toNumber(m.payload, m.name, "status") & 0xff;
      },
    },
    [FrontendRequest.GET_STATUS]: {
      reply: "body",
      run(s, m) {
        s.#requireProtocol(m, ProtocolFeature.STATUS);
        return BigInt(s.#status);
      },
    },
    // The reply goes out before the transfer starts, or a front-end that reads or writes the
    // pipe right after it would deadlock.
    [FrontendRequest.SET_DEVICE_STATE_FD]: { reply: "self", run: (s, m) => s.#setDeviceStateFd(m) },
    // A failed transfer is answered with a failure body and counted as a failed request.
    [FrontendRequest.CHECK_DEVICE_STATE]: { reply: "self", run: (s, m) => s.#checkDeviceState(m) },
  });

  /**
   * The front-end requests this back-end handles, by id, each with its reply rule (see
   * {@link HandlerReply}); any other one is refused ("request not supported by this
   * back-end"). docs/protocol.md shows it beside the request table.
   */
  static readonly handledRequests: ReadonlyMap<FrontendRequest, HandlerReply> = new Map(
    Object.entries(this.#handlers)
      .map(([id, h]) => [Number(id) as FrontendRequest, h.reply] as const)
      .sort((a, b) => a[0] - b[0]),
  );

  #setProtocolFeatures(msg: RequestOf<FrontendRequest.SET_PROTOCOL_FEATURES>): void {
    const unknown = msg.payload & ~this.offeredProtocolFeatures();
    if (unknown !== 0n) {
      throw badField(msg.name, "protocol features", unknown, "features not offered");
    }
    this.#protocolFeatures = msg.payload;
    this.channel.setNegotiatedProtocolFeatures(msg.payload);
    this.logger.info(`${this.name}: protocol features 0x${msg.payload.toString(16)}`);
  }

  #setVringNum(msg: RequestOf<FrontendRequest.SET_VRING_NUM>): void {
    const { index, num } = msg.payload;
    const vring = this.#vring(msg, index);
    const max = Math.min(this.device.maxQueueSize, MAX_QUEUE_SIZE);
    const packed = this.format().packed;
    if (num === 0 || num > max || (!packed && (num & (num - 1)) !== 0)) {
      throw badField(
        msg.name,
        "num",
        num,
        `queue ${index}: size must be ${packed ? "1" : "a power of 2"} up to ${max}`,
      );
    }
    if (vring.started) throw badField(msg.name, "index", index, "queue is running");
    vring.size = num;
    vring.broken = null;
  }

  /** @returns a promise when a worker ring has to take the new addresses first */
  #setVringAddr(msg: RequestOf<FrontendRequest.SET_VRING_ADDR>): Promise<void> | void {
    const a = msg.payload;
    const vring = this.#vring(msg, a.index);
    const addr = {
      desc: toNumber(a.descUserAddr, msg.name, "desc_user_addr"),
      avail: toNumber(a.availUserAddr, msg.name, "avail_user_addr"),
      used: toNumber(a.usedUserAddr, msg.name, "used_user_addr"),
      log: (a.flags & VRING_F_LOG) !== 0,
      logGuestAddr: toNumber(a.logGuestAddr, msg.name, "log_guest_addr"),
    };
    const mem = this.#memory;
    if (mem && vring.size > 0) {
      // Check now so a bad address is reported against this request, not a later kick.
      this.#checkRingAddresses(msg, vring, addr, mem);
    }
    if (addr.log && this.#dirtyLog) {
      const bad = this.#usedLogBeyond(vring, addr.logGuestAddr, this.#dirtyLog);
      if (bad)
        throw badField(msg.name, "log_guest_addr", `0x${addr.logGuestAddr.toString(16)}`, bad);
    }
    vring.addr = addr;
    if (vring.started) {
      // Logging toggled during migration, or the ring moved: rebuild over the same base
      // (a worker ring answers once it uses the new addresses and log flag).
      if (vring.worker) return vring.remapWorker();
      else vring.rebuild();
    } else {
      vring.broken = null;
    }
  }

  #setVringBase(msg: RequestOf<FrontendRequest.SET_VRING_BASE>): void {
    const { index, num } = msg.payload;
    const vring = this.#vring(msg, index);
    if (vring.started) throw badField(msg.name, "index", index, "queue is running");
    if (this.format().packed) {
      const b = decodePackedVringBase(num, msg.name);
      // The full encoding (bits 0-14 avail, 15 avail wrap, 16-30 used, 31 used wrap), as
      // QEMU sends it. DPDK sends only the avail half: its virtio-user front-end starts a
      // ring with 0x8000 (avail 0, wrap 1), and its vhost back-end answers GET_VRING_BASE
      // with the avail half only (lib/vhost/vhost_user.c, vhost_user_get_vring_base) and
      // takes used = avail on SET_VRING_BASE. That form is taken as such only where it is
      // unambiguous: nothing above bit 15 and the avail wrap counter 1, which in the full
      // encoding (used 0, used wrap 0) would put `size` or more descriptors in flight, a
      // position no stopped ring has. Used 0 with used wrap 0 and avail wrap 0 is a real
      // position (every other lap) and is kept as sent.
      const availOnly = num >>> 16 === 0 && b.availWrap;
      vring.base = availOnly ? { ...b, usedIdx: b.availIdx, usedWrap: b.availWrap } : b;
    } else {
      const b = decodeSplitVringBase(num, msg.name);
      vring.base = { availIdx: b.availIdx };
    }
    vring.broken = null;
  }

  /**
   * GET_VRING_BASE: stop the ring and return where it stopped. The request has no failure
   * value (a base is always a valid position): a stop that fails closes the connection
   * instead of answering.
   */
  async #getVringBase(msg: RequestOf<FrontendRequest.GET_VRING_BASE>): Promise<VringState> {
    let vring: Vring;
    let base: QueueBase;
    try {
      vring = this.#vring(msg, msg.payload.index);
      base = await vring.halt();
    } catch (err) {
      throw fatalStop(msg.name, msg.payload.index, err);
    }
    const num = this.format().packed
      ? encodePackedVringBase(
          {
            availIdx: base.availIdx,
            availWrap: base.availWrap ?? true,
            usedIdx: base.usedIdx ?? base.availIdx,
            usedWrap: base.usedWrap ?? true,
          },
          msg.name,
        )
      : encodeSplitVringBase({ availIdx: base.availIdx }, msg.name);
    this.logger.debug(`${this.name}: queue ${vring.index} stopped at ${num}`);
    return { index: vring.index, num };
  }

  /** SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR. */
  #setVringFd(
    msg: RequestOf<
      | FrontendRequest.SET_VRING_KICK
      | FrontendRequest.SET_VRING_CALL
      | FrontendRequest.SET_VRING_ERR
    >,
  ): void {
    const { index, noFd } = msg.payload;
    const vring = this.vrings[index];
    if (!vring) {
      for (const fd of msg.fds) native.close(fd);
      throw badField(
        msg.name,
        "index",
        index,
        `queue index out of range (queues=${this.vrings.length})`,
      );
    }
    const fd = noFd ? -1 : msg.fds[0]!;
    // LIFETIME: a kick fd is installed only once it is known to be watchable; a bad one
    // is closed and the ring keeps the one it had.
    if (msg.request === FrontendRequest.SET_VRING_KICK) checkKickFd(msg.name, index, fd);
    if (msg.request === FrontendRequest.SET_VRING_KICK) vring.setKick(fd);
    else if (msg.request === FrontendRequest.SET_VRING_CALL) vring.setCall(fd);
    else vring.setErr(fd);
  }

  #setVringEnable(msg: RequestOf<FrontendRequest.SET_VRING_ENABLE>): void {
    const { index, num } = msg.payload;
    if (!hasFeature(this.#features, VirtioFeature.PROTOCOL_FEATURES) && this.#featuresSet) {
      throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "PROTOCOL_FEATURES not negotiated", {
        request: msg.name,
        field: "features",
        value: this.#features,
      });
    }
    if (num !== 0 && num !== 1) throw badField(msg.name, "num", num, "must be 0 or 1");
    this.#vring(msg, index).setEnabled(num === 1);
    this.logger.debug(`${this.name}: queue ${index} ${num ? "enabled" : "disabled"}`);
  }

  #getConfig(msg: RequestOf<FrontendRequest.GET_CONFIG>): ConfigSpace {
    this.#requireProtocol(msg, ProtocolFeature.CONFIG);
    const { offset, size, flags } = msg.payload;
    if (!this.device.getConfig)
      throw badField(msg.name, "size", size, "device has no config space");
    const data = this.device.getConfig(offset, size);
    return { offset, size: data.length, flags, payload: data };
  }

  #setBackendReqFd(msg: RequestOf<FrontendRequest.SET_BACKEND_REQ_FD>): void {
    const fd = msg.fds[0]!;
    this.#backendChannel?.close();
    const ch = new Channel(fd, {
      role: "backend",
      kind: "backend-req",
      name: `${this.name}/backend-req`,
    });
    ch.setNegotiatedProtocolFeatures(this.#protocolFeatures);
    ch.on("error", (err: Error) =>
      this.logger.warn(`${this.name}: backend-req channel: ${err.message}`),
    );
    this.#backendChannel = ch;
  }

  async #setFeatures(msg: FrontendMessage, features: bigint): Promise<void> {
    const unknown = features & ~this.offeredFeatures();
    if (unknown !== 0n) throw badField(msg.name, "features", unknown, "features not offered");
    const wasLogging = hasFeature(this.#features, VirtioFeature.LOG_ALL);
    // A log that covered memory when it was set may not any more (memory grew while logging
    // was off): refuse to log with it now rather than miss the first write above it.
    const refusal =
      !wasLogging && hasFeature(features, VirtioFeature.LOG_ALL) && this.#dirtyLog
        ? this.#logRefusal(this.#dirtyLog)
        : null;
    if (refusal) {
      throw badField(
        msg.name,
        "features",
        "VHOST_F_LOG_ALL",
        `the dirty log of SET_LOG_BASE is too short: ${refusal.why}; send a larger log first`,
      );
    }
    const formatBefore = this.format();
    this.#features = features;
    this.#featuresSet = true;
    const formatAfter = this.format();
    if (formatBefore.packed !== formatAfter.packed && this.vrings.some((v) => v.started)) {
      this.logger.warn(`${this.name}: ring format changed while rings run`);
    }
    if (!hasFeature(features, VirtioFeature.PROTOCOL_FEATURES)) {
      // Without PROTOCOL_FEATURES rings are enabled from the start; SET_FEATURES never disables.
      for (const v of this.vrings) v.setEnabled(true);
    }
    const logging = hasFeature(features, VirtioFeature.LOG_ALL);
    if (logging !== wasLogging) {
      this.logger.info(`${this.name}: dirty logging ${logging ? "on" : "off"}`);
      await this.#applyLog();
      // The start of logging is the hint that a migration begins; its end without a saved
      // state means the migration was cancelled (vhost-user: "Migrating back-end state").
      if (logging) {
        this.#migrating = true;
        this.device.prepareMigration?.();
      } else if (this.#migrating) {
        this.#migrating = false;
        this.device.cancelMigration?.();
      }
    }
    this.device.setFeatures?.(features);
    this.logger.info(`${this.name}: features 0x${features.toString(16)}`);
  }

  /**
   * While logging, refuse memory that reaches past the dirty log (vhost-user: "Migration": the
   * front-end grows the log with SET_LOG_BASE before it extends the memory table).
   * @throws VhostUserError naming the memory end and the log size
   */
  #checkLogCovers(msg: FrontendMessage, memory: GuestMemory): void {
    const log = this.#dirtyLog;
    if (!log || !hasFeature(this.#features, VirtioFeature.LOG_ALL)) return;
    if (log.pages * LOG_PAGE_SIZE >= memory.end) return;
    throw badField(
      msg.name,
      "memory end",
      `0x${memory.end.toString(16)}`,
      `beyond the dirty log (${log.pages} pages, ${log.pages * LOG_PAGE_SIZE} bytes) while logging; send SET_LOG_BASE with a larger log first`,
    );
  }

  /** Attach the log to the session's guest memory while LOG_ALL is on, detach it otherwise. */
  #attachLog(): void {
    const logging = hasFeature(this.#features, VirtioFeature.LOG_ALL);
    if (this.#memory) this.#memory.log = logging ? this.#dirtyLog : null;
  }

  /**
   * Attach the log to guest memory while LOG_ALL is negotiated, detach it otherwise; worker
   * rings map it (or drop theirs) in their thread.
   * @returns resolves once every worker ring logs the new way
   */
  #applyLog(): Promise<void> {
    this.#attachLog();
    const workers = this.vrings.filter((v) => v.worker !== null);
    return Promise.all(workers.map((v) => v.relogWorker())).then(() => undefined);
  }

  async #setLogBase(
    msg: FrontendMessage & { request: FrontendRequest.SET_LOG_BASE },
  ): Promise<LogBaseReply> {
    this.#requireProtocol(msg, ProtocolFeature.LOG_SHMFD);
    const fd = msg.fds[0];
    if (fd === undefined) {
      throw new VhostUserError("ERR_VHOST_MISSING_FDS", "no log fd", {
        request: msg.name,
        field: "fds",
        value: 0,
      });
    }
    let log: DirtyLog;
    let keep = false;
    try {
      const size = toNumber(msg.payload.mmapSize, msg.name, "mmap_size");
      const offset = toNumber(msg.payload.mmapOffset, msg.name, "mmap_offset");
      if (size === 0) throw badField(msg.name, "mmap_size", 0, "empty log");
      log = mapDirtyLog(fd, offset, size);
      // vhost-user "Migration": the log covers every guest address, and the last byte of
      // each logged used ring. A shorter log is refused now (the log in use stays): a write
      // it cannot cover would change a guest page with no log bit.
      const refusal = this.#logRefusal(log);
      if (refusal) {
        unmapDirtyLog(log);
        throw badField(msg.name, refusal.field, refusal.value, refusal.why);
      }
      if (this.device.hasWorkerQueues) {
        // Worker rings map the log themselves, from dups of this fd.
        if (this.#logSource) native.close(this.#logSource.fd);
        this.#logSource = { fd, offset, size };
        keep = true;
      }
    } finally {
      if (!keep) native.close(fd);
    }
    // Swap atomically: from the next write on, marks go to the new log; the old one is
    // flushed (pending marks land in it) and unmapped.
    const old = this.#dirtyLog;
    this.#dirtyLog = log;
    // Worker rings have their own mappings of the logs: the old one can go at once.
    const relogged = this.#applyLog();
    if (old) unmapDirtyLog(old);
    await relogged;
    this.logger.info(`${this.name}: dirty log of ${log.size} bytes (${log.pages} pages)`);
    return { value: 0n, log: null };
  }

  /**
   * Why a log cannot be used: guest memory reaches past it, or a ring's used ring is logged
   * (VHOST_VRING_F_LOG) past it.
   * @returns the field, value and reason, or null when the log covers everything
   */
  #logRefusal(log: DirtyLog): { field: string; value: string; why: string } | null {
    const covered = log.pages * LOG_PAGE_SIZE;
    const end = this.#memory?.end ?? 0;
    if (covered < end) {
      return {
        field: "mmap_size",
        value: String(log.size),
        why: `the log covers guest addresses below 0x${covered.toString(16)} (${log.pages} pages) but guest memory ends at 0x${end.toString(16)}`,
      };
    }
    for (const v of this.vrings) {
      if (!v.addr?.log) continue;
      const bad = this.#usedLogBeyond(v, v.addr.logGuestAddr, log);
      if (bad) {
        return { field: "mmap_size", value: String(log.size), why: `queue ${v.index}: ${bad}` };
      }
    }
    return null;
  }

  /**
   * Whether the used ring of `vring`, logged at `logGuestAddr`, ends past the log (vhost-user
   * "Migration": the last byte of the ring must fall within the log).
   * @returns the reason, or null when it fits
   */
  #usedLogBeyond(vring: Vring, logGuestAddr: number, log: DirtyLog): string | null {
    const size = Math.max(vring.size, 1);
    const bytes = this.format().packed ? 16 * size : splitRingSizes(size).used;
    const last = logGuestAddr + bytes - 1;
    const covered = log.pages * LOG_PAGE_SIZE;
    if (last < covered) return null;
    return `the used ring's last byte is logged at 0x${last.toString(16)}, beyond the log (it covers addresses below 0x${covered.toString(16)})`;
  }

  #regionInfo(msg: FrontendMessage, r: MemoryRegion): RegionInfo {
    return {
      gpa: toGpa(toNumber(r.guestPhysAddr, msg.name, "guest_phys_addr")),
      size: toNumber(r.memorySize, msg.name, "memory_size"),
      uaddr: toUaddr(toNumber(r.userspaceAddr, msg.name, "userspace_addr")),
      mmapOffset: toMmapOffset(toNumber(r.mmapOffset, msg.name, "mmap_offset")),
    };
  }

  /** Map every region, then switch all rings to the new memory, then unmap the old. */
  async #setMemTable(msg: FrontendMessage, regions: MemoryRegion[], fds: number[]): Promise<void> {
    const mapped: Region[] = [];
    let installed: Promise<void>;
    let fdsTaken = false;
    try {
      if (fds.length !== regions.length) {
        throw new VhostUserError("ERR_VHOST_MISSING_FDS", "one fd per region expected", {
          request: msg.name,
          field: "fds",
          value: fds.length,
        });
      }
      const infos = regions.map((r) => this.#regionInfo(msg, r));
      // Validate the layout before mapping anything (overlap, zero size, wrap-around).
      validateLayout(msg.name, infos);
      const groups: Region[][] = [];
      for (let i = 0; i < infos.length; i++) {
        const group = this.#mapFrontendRegion(fds[i]!, infos[i]!);
        groups.push(group);
        mapped.push(...group);
      }
      const memory = new GuestMemory(mapped);
      this.#checkLogCovers(msg, memory);
      this.#keepRegionFds(groups, fds);
      fdsTaken = true;
      installed = this.#installMemory(mapped, memory);
    } catch (err) {
      for (const r of mapped) this.#unmap(r);
      if (!fdsTaken) for (const fd of fds) native.close(fd);
      throw err instanceof VhostUserError ? err : wrapMemoryError(msg.name, err);
    }
    await installed;
  }

  /**
   * Map one memory-table region (as sub-regions of at most 2 GiB when larger: an ArrayBuffer
   * on Node.js 20 holds at most 4 GiB) and remember which table entry each piece belongs to.
   * @returns the mapped pieces in address order
   */
  #mapFrontendRegion(fd: number, info: RegionInfo): Region[] {
    if ((native.fileSeals(fd) & FileSeal.SHRINK) === 0) {
      this.logger.info(
        `${this.name}: memory region at gpa 0x${info.gpa.toString(16)} is not sealed against ` +
          "shrinking (F_SEAL_SHRINK): if its file shrinks, the connection is closed",
      );
    }
    const pieces = mapRegionSplit(fd, info);
    for (const r of pieces) this.#origin.set(r, info);
    return pieces;
  }

  /** @returns the memory-table regions as the front-end described them, in table order */
  #frontendRegions(): RegionInfo[] {
    return [...new Set(this.#regions.map((r) => this.#origin.get(r) ?? r))];
  }

  /**
   * Keep each region's fd open with it when the device has worker queues (a worker maps the
   * region from a dup; the fd is closed when the region is unmapped); close them otherwise.
   * @param groups the pieces of each memory-table region, in the order of `fds`
   * @param fds one fd per memory-table region (taken over here)
   */
  #keepRegionFds(groups: Region[][], fds: number[]): void {
    if (!this.device.hasWorkerQueues) {
      for (const fd of fds) native.close(fd);
      return;
    }
    groups.forEach((pieces, i) => {
      const fd = fds[i]!;
      // Each piece keeps its own fd (the first the original, the others dups).
      pieces.forEach((r, k) => this.#regionFds.set(r, k === 0 ? fd : native.dup(fd)));
    });
    for (const fd of fds.slice(groups.length)) native.close(fd);
  }

  async #addMemReg(msg: FrontendMessage, region: MemoryRegion, fds: number[]): Promise<void> {
    let mapped: Region[] = [];
    let installed: Promise<void>;
    let fdsTaken = false;
    try {
      this.#requireProtocol(msg, ProtocolFeature.CONFIGURE_MEM_SLOTS);
      const fd = fds[0];
      if (fd === undefined) {
        throw new VhostUserError("ERR_VHOST_MISSING_FDS", "no region fd", {
          request: msg.name,
          field: "fds",
          value: 0,
        });
      }
      const info = this.#regionInfo(msg, region);
      const table = this.#frontendRegions();
      const same = table.find(
        (r) =>
          r.gpa === info.gpa &&
          r.size === info.size &&
          r.uaddr === info.uaddr &&
          r.mmapOffset === info.mmapOffset,
      );
      if (same) {
        // QEMU before 8.0 sends ADD_MEM_REG once per queue pair of a multiqueue device (it
        // was not a one-time request there): the same region again is a no-op, as in
        // libvhost-user. Any other overlap is refused when the new table is validated.
        for (const f of fds) native.close(f);
        fdsTaken = true;
        this.logger.debug(
          `${this.name}: ${msg.name}: region at gpa 0x${info.gpa.toString(16)} already mapped`,
        );
        return;
      }
      if (table.length >= BACKEND_MAX_MEM_SLOTS) {
        throw badField(msg.name, "regions", table.length, "no free memory slot");
      }
      validateLayout(msg.name, [...table, info]);
      mapped = this.#mapFrontendRegion(fd, info);
      const regions = [...this.#regions, ...mapped];
      const memory = new GuestMemory(regions);
      this.#checkLogCovers(msg, memory);
      this.#keepRegionFds([mapped], fds);
      fdsTaken = true;
      installed = this.#installMemory(regions, memory);
    } catch (err) {
      for (const r of mapped) this.#unmap(r);
      if (!fdsTaken) for (const fd of fds) native.close(fd);
      throw err instanceof VhostUserError ? err : wrapMemoryError(msg.name, err);
    }
    await installed;
  }

  async #remMemReg(msg: FrontendMessage, region: MemoryRegion): Promise<void> {
    this.#requireProtocol(msg, ProtocolFeature.CONFIGURE_MEM_SLOTS);
    const info = this.#regionInfo(msg, region);
    const victim = this.#frontendRegions().find(
      (r) => r.gpa === info.gpa && r.uaddr === info.uaddr && r.size === info.size,
    );
    if (!victim) throw badField(msg.name, "guest_phys_addr", info.gpa, "no such region");
    const rest = this.#regions.filter((r) => (this.#origin.get(r) ?? r) !== victim);
    if (rest.length === 0) {
      await this.#installMemory([], null);
    } else {
      await this.#installMemory(rest, new GuestMemory(rest));
    }
  }

  /**
   * Switch to new memory. Running rings are rebuilt over it (keeping their position) before
   * the old regions that are no longer used are unmapped.
   */
  #installMemory(regions: Region[], memory: GuestMemory | null): Promise<void> {
    const old = this.#regions;
    // LIFETIME: queues hold views into the old mappings; rebuild them before unmapping.
    // Worker rings have mappings of their own: they remap (and drop the old ones) in their
    // thread; the request is acknowledged once they did.
    this.#regions = regions;
    this.#memory = memory;
    // Worker rings keep their own log mapping across memory tables.
    this.#attachLog();
    const remaps: Promise<void>[] = [];
    for (const v of this.vrings) {
      if (v.worker) remaps.push(v.remapWorker());
      else v.rebuild();
    }
    for (const r of old) if (!regions.includes(r)) this.#unmap(r);
    this.stats.memoryTableUpdates++;
    this.logger.info(
      `${this.name}: memory table: ${regions.length} region(s), ` +
        `${regions.reduce((s, r) => s + r.size, 0)} bytes`,
    );
    for (const v of this.vrings) v.poke();
    return Promise.all(remaps).then(() => undefined);
  }

  /** Unmap a region and close the fd kept with it. */
  #unmap(r: Region): void {
    unmapRegion(r);
    this.#origin.delete(r);
    const fd = this.#regionFds.get(r);
    if (fd !== undefined) {
      this.#regionFds.delete(r);
      native.close(fd);
    }
  }

  #checkRingAddresses(
    msg: FrontendMessage,
    vring: Vring,
    addr: { desc: number; avail: number; used: number },
    mem: GuestMemory,
  ): void {
    for (const [field, value] of [
      ["desc_user_addr", addr.desc],
      ["avail_user_addr", addr.avail],
      ["used_user_addr", addr.used],
    ] as const) {
      try {
        mem.uaddrToGpa(toUaddr(value), 1);
      } catch {
        throw badField(
          msg.name,
          field,
          value,
          `queue ${vring.index}: ring address outside guest memory`,
        );
      }
    }
  }

  /**
   * SET_DEVICE_STATE_FD: reply first, then stream the state in the background, so a
   * front-end that reads (or writes) the pipe synchronously after the reply never deadlocks,
   * whatever the size of the state. vhost-user: "Migrating back-end state".
   */
  #setDeviceStateFd(msg: FrontendMessage & { request: FrontendRequest.SET_DEVICE_STATE_FD }): void {
    const frontFd = msg.fds[0];
    try {
      this.#requireProtocol(msg, ProtocolFeature.DEVICE_STATE);
      if (frontFd === undefined) {
        throw new VhostUserError("ERR_VHOST_MISSING_FDS", "no transfer fd", {
          request: msg.name,
          field: "fds",
          value: 0,
        });
      }
      checkDeviceStateParams(msg.payload, msg.name);
      const running = this.vrings.filter((v) => v.started).map((v) => v.index);
      if (running.length > 0) {
        throw badField(
          msg.name,
          "phase",
          msg.payload.phase,
          `device not suspended: rings ${running.join(",")} are running`,
        );
      }
      if (this.#transfer && this.#transfer.error === null && !this.#transfer.settled) {
        throw badField(
          msg.name,
          "direction",
          msg.payload.direction,
          "a state transfer is already running",
        );
      }
    } catch (err) {
      if (frontFd !== undefined) native.close(frontFd);
      throw err;
    }
    const direction = msg.payload.direction as DeviceStateDirection;
    // Our end of the channel: the front-end's fd, or one end of our own pipe whose other end
    // goes back in the reply (the reply dups it; we close our copy after sending).
    let fd = frontFd;
    let replyFd: number | null = null;
    if (this.#ownStateChannel) {
      native.close(frontFd);
      const [r, w] = native.pipe(true);
      if (direction === DeviceStateDirection.SAVE) {
        fd = w;
        replyFd = r;
      } else {
        fd = r;
        replyFd = w;
      }
    } else {
      native.setNonBlocking(fd, true);
    }
    const transfer: StateTransfer = {
      abort: new AbortController(),
      direction,
      done: Promise.resolve(),
      error: null,
      bytes: 0,
      settled: false,
      data: null,
    };
    this.#transfer = transfer;
    this.#migrating = false;
    if (replyFd !== null) {
      this.channel.reply(msg.request, { result: 0, noFd: false }, [replyFd]);
      native.close(replyFd);
    } else {
      this.channel.reply(msg.request, { result: 0, noFd: true });
    }
    // LIFETIME: the transfer ends by itself, when the connection closes, or at the timeout;
    // its fd is closed in every case.
    const timer = setTimeout(() => transfer.abort.abort(), this.#stateTimeoutMs);
    timer.unref();
    transfer.done = (
      direction === DeviceStateDirection.SAVE
        ? this.#saveTo(fd, transfer)
        : this.#loadFrom(fd, transfer)
    )
      .catch((err: Error) => {
        if (!transfer.abort.signal.aborted) throw err;
        throw new VhostUserError(
          "ERR_VHOST_TIMEOUT",
          this.#closed
            ? "connection closed during the device state transfer"
            : `device state transfer did not end within ${this.#stateTimeoutMs} ms`,
          { request: msg.name, field: "bytes", value: transfer.bytes, fatal: false, cause: err },
        );
      })
      .finally(() => clearTimeout(timer))
      .then(
        () => {
          transfer.settled = true;
          this.logger.info(
            `${this.name}: device state ${direction === DeviceStateDirection.SAVE ? "saved" : "loaded"} (${transfer.bytes} bytes)`,
          );
        },
        (err: Error) => {
          transfer.settled = true;
          transfer.error = err;
          this.logger.error(`${this.name}: device state transfer failed: ${err.message}`);
        },
      );
  }

  async #saveTo(fd: number, transfer: StateTransfer): Promise<void> {
    let data: Uint8Array;
    try {
      if (!this.device.saveState) throw new Error("device cannot save its state");
      data = await this.device.saveState();
    } catch (err) {
      native.close(fd);
      throw err;
    }
    transfer.bytes = data.length;
    transfer.data = data;
    await writeStateToFd(fd, data, { signal: transfer.abort.signal, zeroCopy: true });
  }

  async #loadFrom(fd: number, transfer: StateTransfer): Promise<void> {
    const data = await readStateFromFd(fd, {
      maxBytes: this.#maxStateBytes,
      signal: transfer.abort.signal,
    });
    transfer.bytes = data.length;
    if (!this.device.loadState) throw new Error("device cannot load a state");
    await this.device.loadState(data);
  }

  /** CHECK_DEVICE_STATE: wait for the transfer and report whether it completed. */
  async #checkDeviceState(
    msg: FrontendMessage & { request: FrontendRequest.CHECK_DEVICE_STATE },
  ): Promise<void> {
    this.#requireProtocol(msg, ProtocolFeature.DEVICE_STATE);
    const transfer = this.#transfer;
    if (!transfer)
      throw badField(msg.name, "transfer", "none", "no device state transfer was started");
    await transfer.done;
    this.#transfer = null;
    if (transfer.error) {
      this.channel.reply(msg.request, 1n);
      this.stats.failedRequests++;
      this.#emitError(
        new VhostUserError("ERR_VHOST_REQUEST_FAILED", transfer.error.message, {
          request: msg.name,
          field: "direction",
          value: transfer.direction,
          cause: transfer.error,
        }),
      );
      return;
    }
    this.channel.reply(msg.request, 0n);
  }

  #resetDevice(): void {
    for (const v of this.vrings) v.reset();
    this.#features = 0n;
    this.#featuresSet = false;
    this.#status = 0;
    this.device.detach?.();
    this.device.attach?.(this);
  }

  /** Close the connection (the device is detached and everything is released). */
  close(): void {
    this.channel.close();
  }

  #teardown(): void {
    if (this.#closed) return;
    this.#closed = true;
    // A transfer still running ends now (its fd is closed), so requests queued behind a
    // CHECK_DEVICE_STATE are released (their fds closed) at once.
    this.#transfer?.abort.abort();
    for (const v of this.vrings) v.dispose();
    this.device.detach?.();
    this.#backendChannel?.close();
    this.#backendChannel = null;
    if (this.#memory) this.#memory.log = null;
    for (const r of this.#regions) this.#unmap(r);
    this.#regions = [];
    this.#memory = null;
    if (this.#dirtyLog) unmapDirtyLog(this.#dirtyLog);
    this.#dirtyLog = null;
    if (this.#logSource) native.close(this.#logSource.fd);
    this.#logSource = null;
    if (this.#logFd >= 0) native.close(this.#logFd);
    this.#logFd = -1;
    this.#faultWatcher?.close();
    this.#faultWatcher = null;
    if (this.#faultFd >= 0) native.faultUnsubscribe(this.#faultFd);
    this.#faultFd = -1;
    this.logger.info(`${this.name}: front-end disconnected`);
    this.emit("close");
  }

  /** @returns true once the connection has ended */
  get closed(): boolean {
    return this.#closed;
  }

  /** @returns true after SET_OWNER */
  get owned(): boolean {
    return this.#owner;
  }
}

/** Where a region sits, as SET_MEM_TABLE / ADD_MEM_REG describe it. */
interface RegionLayout {
  gpa: number;
  size: number;
  uaddr: number;
  mmapOffset: number;
}

/**
 * Check a memory table before anything is mapped (vhost-user: VHOST_USER_SET_MEM_TABLE,
 * VHOST_USER_ADD_MEM_REG): no empty region, no range that wraps past 2^53 (the largest address
 * handled exactly), no two regions overlapping in guest-physical or in front-end address space.
 * @param request the request name for errors
 * @param regions the regions, the new one last for ADD_MEM_REG
 * @throws VhostUserError ERR_VHOST_BAD_FIELD naming the region index, field and value
 */
function validateLayout(request: string, regions: readonly RegionLayout[]): void {
  const max = Number.MAX_SAFE_INTEGER;
  regions.forEach((r, i) => {
    if (r.size === 0) throw badField(request, `regions[${i}].memory_size`, 0, "empty region");
    if (r.gpa > max - r.size) {
      throw badField(request, `regions[${i}].guest_phys_addr`, r.gpa, "range wraps around");
    }
    if (r.uaddr > max - r.size) {
      throw badField(request, `regions[${i}].userspace_addr`, r.uaddr, "range wraps around");
    }
    if (r.mmapOffset > max - r.size) {
      throw badField(request, `regions[${i}].mmap_offset`, r.mmapOffset, "range wraps around");
    }
  });
  for (const [key, field] of [
    ["gpa", "guest_phys_addr"],
    ["uaddr", "userspace_addr"],
  ] as const) {
    const order = regions.map((_, i) => i).sort((a, b) => regions[a]![key] - regions[b]![key]);
    for (let k = 1; k < order.length; k++) {
      const prev = regions[order[k - 1]!]!;
      const i = order[k]!;
      const cur = regions[i]!;
      if (cur[key] < prev[key] + prev.size) {
        throw badField(
          request,
          `regions[${i}].${field}`,
          `0x${cur[key].toString(16)}`,
          `overlaps regions[${order[k - 1]}] [0x${prev[key].toString(16)}, +0x${prev.size.toString(16)})`,
        );
      }
    }
  }
}

/**
 * Check that a kick fd can be watched (epoll refuses regular files, for one) before it
 * replaces the ring's current one.
 * @param request the request name for errors
 * @param index queue index
 * @param fd the new kick fd, or -1 (no fd: nothing to check)
 * @throws VhostUserError ERR_VHOST_BAD_FIELD naming the fd and the errno (the fd is closed)
 */
function checkKickFd(request: string, index: number, fd: number): void {
  if (fd < 0) return;
  let watcher: FdWatcher | null = null;
  try {
    watcher = new native.FdWatcher(fd, () => undefined);
    watcher.start(POLL_READABLE);
  } catch (err) {
    native.close(fd);
    const code = (err as { code?: string }).code ?? String(err);
    throw badField(request, "fd", fd, `queue ${index}: kick fd cannot be watched (${code})`);
  } finally {
    watcher?.close();
  }
}

function wrapMemoryError(request: string, err: unknown): VhostUserError {
  const e = err as Error & { field?: string; value?: unknown; code?: string };
  return new VhostUserError("ERR_VHOST_BAD_FIELD", e.message ?? String(err), {
    request,
    field: e.field ?? "regions",
    value: e.value ?? e.code,
    cause: err,
  });
}

export { MAX_MEM_REGIONS };

/**
 * A GET_VRING_BASE that cannot answer a true base: fatal (the connection closes).
 * @param request the request name
 * @param index the ring asked for
 * @param err what failed
 * @returns the fatal error, naming the request and the ring
 */
function fatalStop(request: string, index: number, err: unknown): VhostUserError {
  if (err instanceof VhostUserError && err.fatal) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new VhostUserError("ERR_VHOST_REQUEST_FAILED", `queue ${index}: ${message}`, {
    request,
    field: "index",
    value: index,
    fatal: true,
    cause: err,
  });
}
