/**
 * The source side of a live migration, as QEMU's migration thread drives a vhost-user device:
 * dirty logging on, iterative pre-copy of guest RAM, then stop-and-copy (rings disabled and
 * stopped with GET_VRING_BASE, a last log sync, the back-end's state through
 * SET_DEVICE_STATE_FD when both back-ends offer DEVICE_STATE, the virtio device state, the
 * driver's own state), and switch-over when the destination says it runs. If anything fails
 * before switch-over the source restarts its rings, turns logging off and carries on.
 *
 * vhost-user: "Migration", "Migrating back-end state"; virtio save order as QEMU's vmstate_virtio
 * (hw/virtio/virtio.c).
 */
import type { Duplex } from "node:stream";
import { VhostUserFrontend, DeviceStatus } from "../frontend/frontend.js";
import type { FrontendDirtyLog } from "../frontend/migration.js";
import { saveBackendState, startDirtyLogging, stopDirtyLogging } from "../frontend/migration.js";
import type { GuestRam } from "../frontend/guest-ram.js";
import type { DriverSnapshot } from "../frontend/queue.js";
import { ProtocolFeature, VirtioFeature, featureMask, hasFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import { packedRingSizes, splitRingSizes } from "../virtq/layout.js";
import type { QueueBase } from "../virtq/types.js";
import { allPages, hashGuestRam, PAGE_SIZE, PageSender } from "./pages.js";
import type { PageCounters } from "./pages.js";
import {
  SectionReader,
  SectionType,
  StageTable,
  encodeJsonSection,
  encodeSection,
  hostStream,
  hostVersions,
  parseJson,
  runSourceStages,
  writeAll,
} from "./stream.js";
import type { HostStage, HostStageError, HostVersion } from "./stream.js";
import { encodeVirtioState } from "./virtio-state.js";
import type { VirtioDeviceState } from "./virtio-state.js";

const LOG_ALL = featureMask(VirtioFeature.LOG_ALL);

/** The guest (the driver's application): paused at stop, resumed if the migration fails. */
export interface MigratableGuest {
  /** Stop adding buffers and touching guest RAM (a VM's vCPUs stop). */
  pause(): void | Promise<void>;
  /** Go on after a failed migration. */
  resume(): void;
  /** The guest's own state (a VM's CPU state), carried in a GUEST_STATE section. */
  saveState?(): Uint8Array;
}

/** A progress report. */
export interface MigrationProgress {
  phase: "setup" | "precopy" | "stop" | "switchover" | "done" | "failed";
  /** pre-copy iteration (1 = the bulk pass) */
  iteration: number;
  /** pages sent so far */
  pagesSent: number;
  /** pages found dirty at the start of this iteration */
  dirtyPages: number;
  /** stream bytes sent so far */
  bytesSent: number;
}

/** Options of {@link migrateSource}. */
export interface SourceOptions {
  /** the front-end holding the device (started, with its RAM shared) */
  frontend: VhostUserFrontend;
  /** a connection to the destination */
  stream: Duplex;
  /** the guest to pause at stop */
  guest?: MigratableGuest;
  /** the virtio device id (default 1: net) */
  deviceId?: number;
  /** device-specific virtio fields (virtio-net: the 6-byte MAC; default none) */
  deviceFields?: Uint8Array;
  /** bytes of config space to read with GET_CONFIG when CONFIG is negotiated (default 0) */
  configSize?: number;
  /** most pre-copy iterations before stopping anyway (default 30) */
  maxIterations?: number;
  /** stop when at most this many pages are dirty (default 256, 1 MiB) */
  stopPages?: number;
  /** send a SHA-256 of guest RAM for the destination to check (default false) */
  verifyMemory?: boolean;
  /**
   * wait this long for the destination's HELLO, and for each ITERATION_ACK (the destination
   * applied a pre-copy pass) (default 15 000 ms)
   */
  helloTimeoutMs?: number;
  /** wait this long for DONE after the last section (default 20 000 ms) */
  doneTimeoutMs?: number;
  /** close the front-end after switch-over (default true) */
  closeOnSuccess?: boolean;
  /**
   * send RESET_DEVICE before closing after switch-over, when negotiated (default false: as
   * QEMU, the source only stops its rings; RESET_OWNER is never sent)
   */
  resetDevice?: boolean;
  /** the host stream versions this source knows (default {@link SOURCE_VERSIONS}) */
  streamVersions?: readonly HostVersion<SourceContext>[];
  /** the version to send (default the newest of `streamVersions`) */
  streamVersion?: number;
  /** progress callback */
  onProgress?: (p: MigrationProgress) => void;
}

/** What a migration did. */
export interface MigrationResult {
  /** ms from the stop (rings disabled) to DONE from the destination */
  downtimeMs: number;
  /**
   * the downtime per step: each source stage from the stop to DONE (the last, `switchover`,
   * covers the destination's work), then the destination's own steps within it
   */
  downtimeSteps: DowntimeStep[];
  /** ms from the start to DONE */
  totalMs: number;
  /** pre-copy iterations, the final one included */
  iterations: number;
  /** pages sent (zero pages included) */
  pagesSent: number;
  /** of which all-zero */
  zeroPages: number;
  /** pages sent after the stop */
  finalPages: number;
  /** bytes of the virtio device state section */
  virtioStateBytes: number;
  /** bytes of the back-end state blob (0 when not transferred) */
  backendStateBytes: number;
  /** ms the back-end state SAVE took (0 when not transferred) */
  backendSaveMs: number;
  /** stream bytes sent */
  bytesSent: number;
  /** whether the back-end state went through SET_DEVICE_STATE_FD */
  deviceStateTransferred: boolean;
  /** SHA-256 of guest RAM at switch-over (hex), when verifyMemory */
  memoryHash: string | null;
}

/** A failed migration; the source went on running when `sourceResumed`. */
export class MigrationError extends VhostUserError {
  /** where it failed */
  readonly phase: string;
  /** the source restarted its rings and turned logging off */
  readonly sourceResumed: boolean;
  /**
   * @param phase where it failed
   * @param cause the error
   * @param sourceResumed whether the rollback succeeded
   */
  constructor(phase: string, cause: unknown, sourceResumed: boolean) {
    const msg = cause instanceof Error ? cause.message : String(cause);
    super("ERR_VHOST_REQUEST_FAILED", `migration failed during ${phase}: ${msg}`, {
      request: "migrate",
      field: "phase",
      value: phase,
      cause,
      fatal: false,
    });
    this.name = "MigrationError";
    this.phase = phase;
    this.sourceResumed = sourceResumed;
  }
}

/** Setup section contents (JSON). */
export interface SetupSection {
  regions: { gpa: number; size: number; uaddr: number }[];
  layout: "fd-per-region" | "shared-fd";
  features: string;
  protocolFeatures: string;
  queues: number[];
  deviceId: number;
  /** each ring's layout, for the destination to set the rings up during pre-copy */
  rings?: {
    index: number;
    size: number;
    packed: boolean;
    desc: number;
    avail: number;
    used: number;
  }[];
}

/** HELLO contents (JSON). */
export interface HelloSection {
  offeredFeatures: string;
  protocolFeatures: string;
  deviceState: boolean;
}

function ringPages(fe: VhostUserFrontend): number[] {
  const out: number[] = [];
  for (const q of fe.queues.values()) {
    const parts: [number, number][] = q.packed
      ? (() => {
          const p = packedRingSizes(q.size);
          return [
            [q.ring.desc, p.desc],
            [q.ring.avail, p.driverEvent],
            [q.ring.used, p.deviceEvent],
          ] as [number, number][];
        })()
      : (() => {
          const s = splitRingSizes(q.size);
          return [
            [q.ring.desc, s.desc],
            [q.ring.avail, s.avail],
            [q.ring.used, s.used],
          ] as [number, number][];
        })();
    if (q.ring.indirectTable !== null) parts.push([q.ring.indirectTable, q.size * 16 * 16]);
    for (const [at, len] of parts) {
      for (let p = Math.floor(at / PAGE_SIZE); p <= Math.floor((at + len - 1) / PAGE_SIZE); p++) {
        out.push(p);
      }
    }
  }
  return out;
}

/** Everything the source's stages share (one migration's state). */
export interface SourceContext {
  options: SourceOptions;
  fe: VhostUserFrontend;
  ram: GuestRam;
  stream: Duplex;
  counters: PageCounters;
  /** sends the PAGES sections (its buffers are reused across passes) */
  pages: PageSender;
  progress(phase: MigrationProgress["phase"], iteration: number, dirty: number): void;
  send(b: Uint8Array): Promise<void>;
  /** a stream write or a wait that loses the race to an abort (FAIL, hang-up, back-end gone) */
  guard<T>(p: Promise<T>): Promise<T>;
  /** as guard, with a timeout naming what was awaited */
  guardFor<T>(p: Promise<T>, ms: number, what: string): Promise<T>;
  checkAbort(): void;
  /** wait until the destination applied every page up to an iteration */
  caughtUp(iteration: number): Promise<void>;
  /** resolves with the destination's HELLO */
  hello: Promise<HelloSection>;
  /** resolves with the destination's DONE (its own step timings) */
  done: Promise<DoneSection>;
  acked: bigint;
  deviceState: boolean;
  log: FrontendDirtyLog | null;
  paused: boolean;
  iteration: number;
  bases: Map<number, QueueBase>;
  enabled: Map<number, boolean>;
  snapshots: DriverSnapshot[];
  /** GET_STATUS, sent behind the stop's requests (null without STATUS); never rejects */
  status: Promise<number | Error> | null;
  finalPages: number;
  backendState: Uint8Array | null;
  backendSaveMs: number;
  vsBytes: number;
  hash: Buffer | null;
}

/** DONE contents (JSON): the destination's step timings during the downtime. */
export interface DoneSection {
  ok: true;
  /** ms per step on the destination, in order */
  steps?: DowntimeStep[];
}

/** One step of the downtime. */
export interface DowntimeStep {
  /** `source: <stage>` or `destination: <step>` */
  step: string;
  ms: number;
}

/** setup: send the layout, take the destination's offer (nothing to undo). */
async function sourceSetup(c: SourceContext): Promise<void> {
  const ram = c.ram;
  const setup: SetupSection = {
    regions: ram.layoutSpec().map((r) => ({ gpa: r.gpa, size: r.size, uaddr: r.uaddr ?? 0 })),
    layout: ram.layout,
    features: c.acked.toString(),
    protocolFeatures: c.fe.protocolFeatures.toString(),
    queues: [...c.fe.queues.keys()],
    deviceId: c.options.deviceId ?? 1,
    rings: [...c.fe.queues.values()].map((q) => ({
      index: q.index,
      size: q.size,
      packed: q.packed,
      desc: q.ring.desc,
      avail: q.ring.avail,
      used: q.ring.used,
    })),
  };
  c.progress("setup", 0, 0);
  await c.guard(c.send(encodeJsonSection(SectionType.SETUP, setup)));
  const h = await c.guardFor(c.hello, c.options.helloTimeoutMs ?? 15_000, "HELLO");
  const missing = c.acked & ~BigInt(h.offeredFeatures);
  if (missing !== 0n) {
    throw new VhostUserError("ERR_VHOST_BAD_FIELD", "destination back-end lacks features", {
      request: "migrate",
      field: "features",
      value: `0x${missing.toString(16)}`,
    });
  }
  c.deviceState = h.deviceState && hasFeature(c.fe.protocolFeatures, ProtocolFeature.DEVICE_STATE);
}

/** precopy: dirty logging on, the bulk pass, then passes until few pages are dirty. */
async function sourcePrecopy(c: SourceContext): Promise<void> {
  const { fe, ram, counters } = c;
  c.log = await startDirtyLogging(fe);
  const log = c.log;
  ram.trackDirty(true);
  c.checkAbort();
  const maxIter = c.options.maxIterations ?? 30;
  const stopPages = c.options.stopPages ?? 256;
  // ORDERING: the log (and the front-end's own dirty set) is fetched and cleared before the
  // pages of a pass are copied; a write that races the copy sets its bit again and the page
  // is sent again in the next pass. This is the invariant pre-copy relies on.
  log.fetchAndClear(() => undefined);
  ram.takeDirty();
  c.iteration = 1;
  c.progress("precopy", 1, ram.size / PAGE_SIZE);
  await c.guard(c.pages.send(1, allPages(ram)));
  await c.guard(c.send(iterationEnd(1, counters.pages)));
  await c.caughtUp(1);
  for (;;) {
    // ORDERING: fetch-and-clear before the copy below (see the first pass).
    const dirty = new Set<number>(ram.takeDirty());
    log.fetchAndClear((p) => dirty.add(p));
    if (dirty.size <= stopPages || c.iteration >= maxIter) {
      // Put them back for the final pass.
      for (const p of dirty) ram.markDirty(p * PAGE_SIZE, 1);
      break;
    }
    c.iteration++;
    c.progress("precopy", c.iteration, dirty.size);
    const before = counters.pages;
    const pages = [...dirty].sort((a, b) => a - b);
    await c.guard(c.pages.send(c.iteration, pages));
    await c.guard(c.send(iterationEnd(c.iteration, counters.pages - before)));
    // Pace on the destination: the next dirty set is taken once this pass is applied there
    // (the guest and the back-ends run meanwhile).
    await c.caughtUp(c.iteration);
  }
}

/** precopy undone: dirty logging off, the log released. */
async function rollbackPrecopy(c: SourceContext): Promise<void> {
  try {
    if (c.log !== null || hasFeature(c.fe.features, VirtioFeature.LOG_ALL)) {
      await stopDirtyLogging(c.fe, c.log);
      c.log = null;
    }
  } finally {
    c.log?.close();
    c.log = null;
    c.ram.trackDirty(false);
  }
}

/** stop: the guest pauses, every ring stops (GET_VRING_BASE), the driver collects its used. */
async function sourceStop(c: SourceContext): Promise<void> {
  const fe = c.fe;
  c.progress("stop", c.iteration + 1, 0);
  for (const [index, q] of fe.queues) c.enabled.set(index, q.enabled);
  if (c.options.guest) await c.options.guest.pause();
  c.paused = true;
  // One round trip for every ring (the requests written back to back, in queue order). When
  // one fails, the rings that did stop are marked so, and the rollback restarts them.
  const stopping = fe.stopQueues(fe.queues.keys());
  // ORDERING: stopQueues wrote its requests before returning its promise; GET_STATUS follows
  // them on the wire, so the status read is the stopped device's, in the same round trip.
  if (hasFeature(fe.protocolFeatures, ProtocolFeature.STATUS)) {
    c.status = fe.getStatus().catch((err: unknown) => err as Error);
  }
  for (const [index, base] of await stopping) c.bases.set(index, base);
  c.checkAbort();
  for (const [index, q] of fe.queues) {
    q.collectUsed();
    const b = c.bases.get(index) as QueueBase;
    if (!q.packed && q.lastUsedIdx !== b.availIdx) {
      throw new VhostUserError("ERR_VHOST_BAD_FIELD", "buffers still in flight in the back-end", {
        request: "GET_VRING_BASE",
        field: `queue[${index}].lastAvailIdx`,
        value: `${b.availIdx} (driver used idx ${q.lastUsedIdx ?? "?"})`,
      });
    }
    c.snapshots.push(q.snapshot());
  }
}

/** stop undone: the rings restart from their bases, the guest resumes. */
async function rollbackStop(c: SourceContext): Promise<void> {
  const fe = c.fe;
  try {
    for (const [index, q] of fe.queues) {
      if (q.stopped) await fe.restartQueue(index, c.bases.get(index) ?? undefined, false);
      else if (c.paused && hasFeature(fe.features, VirtioFeature.PROTOCOL_FEATURES)) {
        // SET_VRING_ENABLE 0 may have gone out before GET_VRING_BASE failed.
        await fe.setVringEnable(index, true);
      }
    }
  } finally {
    if (c.paused) c.options.guest?.resume();
    c.paused = false;
  }
}

/** final pages: the last dirty pages and the ring pages, with the back-end stopped. */
async function sourceFinalPages(c: SourceContext): Promise<void> {
  const { fe, ram, counters } = c;
  const log = c.log as FrontendDirtyLog;
  // ORDERING: the rings are stopped (GET_VRING_BASE answered): the back-end writes no more,
  // so this last fetch-and-clear sees every write, and the copy below is final.
  const finalSet = new Set<number>(ram.takeDirty());
  log.fetchAndClear((p) => finalSet.add(p));
  for (const p of ringPages(fe)) finalSet.add(p);
  const before = counters.pages;
  c.iteration++;
  const pages = [...finalSet].sort((a, b) => a - b);
  await c.guard(c.pages.send(c.iteration, pages));
  c.finalPages = counters.pages - before;
  await c.guard(c.send(iterationEnd(c.iteration, c.finalPages)));
}

/** virtio state: the device's layers (seed 001's save order), from the stopped rings. */
async function sourceVirtioState(c: SourceContext): Promise<void> {
  const fe = c.fe;
  const read = c.status !== null ? await c.status : null;
  if (read instanceof Error) throw read;
  const status =
    read ??
    DeviceStatus.ACKNOWLEDGE |
      DeviceStatus.DRIVER |
      DeviceStatus.FEATURES_OK |
      DeviceStatus.DRIVER_OK;
  const configSize = c.options.configSize ?? 0;
  const config =
    configSize > 0 && hasFeature(fe.protocolFeatures, ProtocolFeature.CONFIG)
      ? await fe.getConfig(0, configSize)
      : new Uint8Array(0);
  c.checkAbort();
  const vs: VirtioDeviceState = {
    status,
    features: c.acked,
    config,
    protocolFeatures: fe.protocolFeatures,
    queues: [...fe.queues.values()].map((q) => {
      const b = c.bases.get(q.index) as QueueBase;
      return {
        index: q.index,
        size: q.size,
        desc: q.ring.desc,
        avail: q.ring.avail,
        used: q.ring.used,
        lastAvailIdx: b.availIdx,
        usedIdx: q.packed ? (b.usedIdx ?? b.availIdx) : (q.lastUsedIdx ?? b.availIdx),
        enabled: c.enabled.get(q.index) ?? true,
        availWrap: b.availWrap ?? true,
        usedWrap: b.usedWrap ?? true,
      };
    }),
    deviceId: c.options.deviceId ?? 1,
    device: c.options.deviceFields ?? new Uint8Array(0),
  };
  const bytes = encodeVirtioState(vs);
  c.vsBytes = bytes.length;
  await c.guard(c.send(encodeSection(SectionType.VIRTIO_STATE, bytes)));
}

/** backend state: SET_DEVICE_STATE_FD SAVE + CHECK_DEVICE_STATE, when both offer it. */
async function sourceBackendState(c: SourceContext): Promise<void> {
  if (!c.deviceState) return;
  const ts = performance.now();
  c.backendState = await saveBackendState(c.fe);
  c.backendSaveMs = performance.now() - ts;
  c.checkAbort();
  await c.guard(c.send(encodeSection(SectionType.BACKEND_STATE, c.backendState)));
}

/** driver state: the driver side of each ring and the allocator. */
async function sourceDriverState(c: SourceContext): Promise<void> {
  const j = { queues: c.snapshots, allocator: c.ram.allocatorState() };
  await c.guard(c.send(encodeJsonSection(SectionType.DRIVER_STATE, j)));
}

/** guest state: the guest's own state, when it has one. */
async function sourceGuestState(c: SourceContext): Promise<void> {
  const gs = c.options.guest?.saveState?.();
  if (gs !== undefined) await c.guard(c.send(encodeSection(SectionType.GUEST_STATE, gs)));
}

/** switchover: END (with the RAM hash when asked), then wait until the destination runs. */
async function sourceSwitchover(c: SourceContext): Promise<void> {
  c.hash = c.options.verifyMemory ? hashGuestRam(c.ram) : null;
  const end = Buffer.alloc(33);
  if (c.hash) {
    end.writeUInt8(1, 0);
    c.hash.copy(end, 1);
  }
  c.progress("switchover", c.iteration, 0);
  await c.guard(c.send(encodeSection(SectionType.END, end)));
  await c.guard(c.pages.flushed());
  await c.guardFor(c.done, c.options.doneTimeoutMs ?? 20_000, "DONE");
}

/** Sections up to this size are queued on the stream without waiting for it to drain. */
const SMALL_SECTION = 64 << 10;

/** The source's stage functions, by the names of HOST_STREAM_STAGES. */
const SOURCE_STAGES: Readonly<Record<string, Omit<HostStage<SourceContext>, "name">>> = {
  setup: { run: sourceSetup },
  precopy: { run: sourcePrecopy, rollback: rollbackPrecopy },
  stop: { run: sourceStop, rollback: rollbackStop },
  "final pages": { run: sourceFinalPages },
  "virtio state": { run: sourceVirtioState },
  "backend state": { run: sourceBackendState },
  "driver state": { run: sourceDriverState },
  "guest state": { run: sourceGuestState },
  switchover: { run: sourceSwitchover },
};

/** The source's host stream versions (see HOST_STREAM_STAGES). */
export const SOURCE_VERSIONS: readonly HostVersion<SourceContext>[] = hostVersions(SOURCE_STAGES);

/** The stages during which the source is stopped (the downtime), in order. */
const DOWNTIME_STAGES = new Set([
  "stop",
  "final pages",
  "virtio state",
  "backend state",
  "driver state",
  "guest state",
  "switchover",
]);

/**
 * Migrate the device held by a front-end to a destination listening for the stream (see
 * {@link receiveMigration}): the stages of the host stream's newest version, in order
 * (HOST_STREAM_STAGES), each rolled back when a later one fails.
 * @param options the front-end, the connection, the guest, limits, callbacks
 * @returns the figures of the migration; the front-end is closed (unless `closeOnSuccess` is
 *   false) and the destination runs the device
 * @throws MigrationError when anything fails before switch-over; the source then runs as before
 *   (`sourceResumed`)
 * (vhost-user: "Migration", "Migrating back-end state"; passt `migrate.h`)
 */
export async function migrateSource(options: SourceOptions): Promise<MigrationResult> {
  const fe = options.frontend;
  const ram = fe.ram;
  if (ram === null) throw new MigrationError("setup", new Error("no guest RAM shared"), true);
  if (fe.closed) {
    throw new MigrationError("setup", new Error("the source back-end is disconnected"), false);
  }
  const stream = options.stream;
  const reader = new SectionReader(stream);
  const counters: PageCounters = { pages: 0, zeroPages: 0, bytes: 0 };
  const t0 = performance.now();
  let bytesSent = 0;
  // Read the destination's answers in the background: a FAIL or a hang-up aborts the source.
  let abort: Error | null = null;
  let onAbort: ((e: Error) => void) | null = null;
  const waiters: {
    hello: ((h: HelloSection) => void) | null;
    done: ((d: DoneSection) => void) | null;
    acked: number;
    ack: (() => void) | null;
  } = { hello: null, done: null, acked: 0, ack: null };
  const fail = (e: Error): void => {
    if (abort === null) abort = e;
    onAbort?.(e);
  };
  const hello = new Promise<HelloSection>((resolve) => {
    waiters.hello = resolve;
  });
  const done = new Promise<DoneSection>((resolve) => {
    waiters.done = resolve;
  });
  void (async () => {
    try {
      for (;;) {
        const s = await reader.next();
        if (s.type === SectionType.HELLO) waiters.hello?.(checkHello(parseJson(s)));
        else if (s.type === SectionType.ITERATION_ACK && s.payload.length === 4) {
          waiters.acked = Buffer.from(s.payload).readUInt32BE(0);
          waiters.ack?.();
        } else if (s.type === SectionType.DONE) {
          waiters.done?.(checkDone(parseJson(s)));
          return;
        } else if (s.type === SectionType.FAIL) {
          const j = parseJson(s);
          const e =
            typeof j === "object" && j !== null && "error" in j && typeof j.error === "string"
              ? j.error
              : "?";
          fail(new Error(`destination failed: ${e}`));
          return;
        } else
          fail(new Error(`unexpected section ${SectionType[s.type] ?? s.type} from destination`));
      }
    } catch (err) {
      fail(err as Error);
    }
  })();
  const aborted = new Promise<never>((_resolve, reject) => {
    onAbort = reject;
    if (abort) reject(abort);
  });
  aborted.catch(() => undefined);
  // The source back-end going away fails the migration at once: the writes it made since the
  // last log fetch are lost to the log, so no later pass could be complete.
  const onBackendClose = (): void => fail(new Error("the source back-end disconnected"));
  fe.once("close", onBackendClose);
  const guardFor = <T>(p: Promise<T>, ms: number, what: string): Promise<T> => {
    let t: NodeJS.Timeout | null = null;
    const timer = new Promise<never>((_resolve, reject) => {
      t = setTimeout(
        () =>
          reject(
            new VhostUserError("ERR_VHOST_TIMEOUT", `no ${what} from the destination`, {
              request: "migrate",
              field: "timeoutMs",
              value: ms,
            }),
          ),
        ms,
      );
    });
    return Promise.race([p, aborted, timer]).finally(() => {
      if (t) clearTimeout(t);
    });
  };
  const ctx: SourceContext = {
    options,
    fe,
    ram,
    stream,
    counters,
    pages: new PageSender(stream, ram.memory, counters),
    progress: (phase, iteration, dirty) =>
      options.onProgress?.({
        phase,
        iteration,
        pagesSent: counters.pages,
        dirtyPages: dirty,
        bytesSent: counters.bytes,
      }),
    send: async (b) => {
      bytesSent += b.length;
      // A small section goes behind what the socket still holds without waiting for it to
      // drain: the state sections of the downtime do not wait for the final pages to flush
      // (the stream keeps the order; the few small sections bound what is queued).
      if (b.length <= SMALL_SECTION && !stream.destroyed && !stream.writableEnded) {
        stream.write(b);
        return;
      }
      await writeAll(stream, b);
    },
    // Only stream I/O and waits for the destination race the abort: a front-end request
    // (dirty logging, GET_VRING_BASE, the back-end state) always runs to its end (each has its
    // own request timeout), so that the rollback sees what it did; `checkAbort` follows it.
    guard: (p) => Promise.race([p, aborted]),
    guardFor,
    checkAbort: () => {
      if (abort !== null) throw abort;
    },
    caughtUp: async (iteration) => {
      while (waiters.acked < iteration) {
        await guardFor(
          new Promise<void>((resolve) => {
            waiters.ack = resolve;
          }),
          options.helloTimeoutMs ?? 15_000,
          `ITERATION_ACK ${iteration}`,
        );
      }
    },
    hello,
    done,
    acked: (fe.ackedFeatures ?? fe.features) & ~LOG_ALL,
    deviceState: false,
    log: null,
    paused: false,
    iteration: 0,
    bases: new Map(),
    enabled: new Map(),
    snapshots: [],
    status: null,
    finalPages: 0,
    backendState: null,
    backendSaveMs: 0,
    vsBytes: 0,
    hash: null,
  };
  const table = new StageTable(hostStream, options.streamVersions ?? SOURCE_VERSIONS);
  const stageStart = new Map<string, number>();
  let tStop = 0;
  try {
    await runSourceStages(table, ctx, ctx.send, {
      ...(options.streamVersion !== undefined ? { version: options.streamVersion } : {}),
      onStage: (name) => {
        const now = performance.now();
        stageStart.set(name, now);
        if (tStop === 0 && DOWNTIME_STAGES.has(name)) tStop = now;
      },
      // The destination learns of the failure first: it releases what it holds meanwhile.
      beforeRollback: () => {
        fe.off("close", onBackendClose);
        ctx.progress("failed", 0, 0);
        stream.destroy();
      },
    });
  } catch (err) {
    const e = err as HostStageError;
    // Nothing resumes without a back-end (it disconnected, or the rollback closed it).
    throw new MigrationError(e.stage, e.cause, e.rolledBack && !fe.closed);
  }
  const tDone = performance.now();
  fe.off("close", onBackendClose);

  // --- switch-over happened: the destination runs the device.
  ram.trackDirty(false);
  ctx.log?.close();
  ctx.log = null;
  stream.end();
  if (options.closeOnSuccess !== false) {
    // QEMU stops the rings and keeps the connection until the VM goes: no RESET_OWNER after
    // switch-over; RESET_DEVICE only when negotiated and asked for.
    if (
      options.resetDevice === true &&
      hasFeature(fe.protocolFeatures, ProtocolFeature.RESET_DEVICE)
    ) {
      try {
        await fe.resetDevice();
      } catch {
        // the back-end may already be gone: nothing left to release there
      }
    }
    fe.close();
  }
  ctx.progress("done", ctx.iteration, 0);
  const steps: DowntimeStep[] = [];
  const names = [...stageStart.keys()].filter((n) => DOWNTIME_STAGES.has(n));
  names.forEach((n, i) => {
    const next = names[i + 1];
    const end = next !== undefined ? (stageStart.get(next) as number) : tDone;
    steps.push({ step: `source: ${n}`, ms: end - (stageStart.get(n) as number) });
  });
  const d = await done;
  for (const s of d.steps ?? []) steps.push({ step: `destination: ${s.step}`, ms: s.ms });
  return {
    downtimeMs: tDone - tStop,
    downtimeSteps: steps,
    totalMs: tDone - t0,
    iterations: ctx.iteration,
    pagesSent: counters.pages,
    zeroPages: counters.zeroPages,
    finalPages: ctx.finalPages,
    virtioStateBytes: ctx.vsBytes,
    backendStateBytes: ctx.backendState?.length ?? 0,
    backendSaveMs: ctx.backendSaveMs,
    bytesSent: bytesSent + counters.bytes,
    deviceStateTransferred: ctx.backendState !== null,
    memoryHash: ctx.hash?.toString("hex") ?? null,
  };
}

function bad(field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, { request: "migrate", field, value });
}

function isDecimal(v: unknown): v is string {
  return typeof v === "string" && /^\d{1,20}$/.test(v);
}

/**
 * Check the destination's HELLO.
 * @param v the parsed JSON
 * @returns the section
 * @throws VhostUserError naming the field that is missing or of the wrong type
 */
function checkHello(v: unknown): HelloSection {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw bad("HELLO", JSON.stringify(v)?.slice(0, 80), "HELLO must be an object");
  }
  const h = v as Record<string, unknown>;
  if (!isDecimal(h.offeredFeatures) || BigInt(h.offeredFeatures) >= 1n << 64n) {
    throw bad("HELLO.offeredFeatures", h.offeredFeatures, "expected a u64 as a decimal string");
  }
  if (!isDecimal(h.protocolFeatures) || BigInt(h.protocolFeatures) >= 1n << 64n) {
    throw bad("HELLO.protocolFeatures", h.protocolFeatures, "expected a u64 as a decimal string");
  }
  if (typeof h.deviceState !== "boolean") {
    throw bad("HELLO.deviceState", h.deviceState, "expected a boolean");
  }
  return {
    offeredFeatures: h.offeredFeatures,
    protocolFeatures: h.protocolFeatures,
    deviceState: h.deviceState,
  };
}

/**
 * Check the destination's DONE.
 * @param v the parsed JSON
 * @returns the section (steps dropped when malformed: they are only reported)
 */
function checkDone(v: unknown): DoneSection {
  const steps: DowntimeStep[] = [];
  if (typeof v === "object" && v !== null && Array.isArray((v as { steps?: unknown }).steps)) {
    for (const x of (v as { steps: unknown[] }).steps) {
      const o = x as { step?: unknown; ms?: unknown };
      if (typeof o?.step === "string" && typeof o.ms === "number") {
        steps.push({ step: o.step.slice(0, 64), ms: o.ms });
      }
    }
  }
  return { ok: true, steps };
}

function iterationEnd(iteration: number, pages: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(iteration, 0);
  b.writeUInt32BE(pages, 4);
  return encodeSection(SectionType.ITERATION_END, b);
}
