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
import type { DriverSnapshot } from "../frontend/queue.js";
import { ProtocolFeature, VirtioFeature, featureMask, hasFeature } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import { packedRingSizes, splitRingSizes } from "../virtq/layout.js";
import type { QueueBase } from "../virtq/types.js";
import { allPages, hashGuestRam, PAGE_SIZE, sendPages } from "./pages.js";
import type { PageCounters } from "./pages.js";
import {
  SectionReader,
  SectionType,
  encodeHeader,
  encodeJsonSection,
  encodeSection,
  parseJson,
  writeAll,
} from "./stream.js";
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
  /** progress callback */
  onProgress?: (p: MigrationProgress) => void;
}

/** What a migration did. */
export interface MigrationResult {
  /** ms from the stop (rings disabled) to DONE from the destination */
  downtimeMs: number;
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

/**
 * Migrate the device held by a front-end to a destination listening for the stream (see
 * {@link receiveMigration}).
 * @param options the front-end, the connection, the guest, limits, callbacks
 * @returns the figures of the migration; the front-end is closed (unless `closeOnSuccess` is
 *   false) and the destination runs the device
 * @throws MigrationError when anything fails before switch-over; the source then runs as before
 *   (`sourceResumed`)
 * (vhost-user: "Migration", "Migrating back-end state")
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
  const maxIter = options.maxIterations ?? 30;
  const stopPages = options.stopPages ?? 256;
  const counters: PageCounters = { pages: 0, zeroPages: 0, bytes: 0 };
  const progress = (phase: MigrationProgress["phase"], iteration: number, dirty: number): void =>
    options.onProgress?.({
      phase,
      iteration,
      pagesSent: counters.pages,
      dirtyPages: dirty,
      bytesSent: counters.bytes,
    });
  const t0 = performance.now();
  let phase = "setup";
  let log: FrontendDirtyLog | null = null;
  let paused = false;
  let tStop = 0;
  const bases = new Map<number, QueueBase>();
  let bytesSent = 0;
  const send = async (b: Uint8Array): Promise<void> => {
    bytesSent += b.length;
    await writeAll(stream, b);
  };
  // Read the destination's answers in the background: a FAIL or a hang-up aborts the source.
  let abort: Error | null = null;
  let onAbort: ((e: Error) => void) | null = null;
  const waiters: {
    hello: ((h: HelloSection) => void) | null;
    done: (() => void) | null;
    acked: number;
    ack: (() => void) | null;
  } = { hello: null, done: null, acked: 0, ack: null };
  const fail = (e: Error): void => {
    if (abort === null) abort = e;
    onAbort?.(e);
  };
  void (async () => {
    try {
      for (;;) {
        const s = await reader.next();
        if (s.type === SectionType.HELLO) waiters.hello?.(checkHello(parseJson(s)));
        else if (s.type === SectionType.ITERATION_ACK && s.payload.length === 4) {
          waiters.acked = Buffer.from(s.payload).readUInt32BE(0);
          waiters.ack?.();
        } else if (s.type === SectionType.DONE) {
          waiters.done?.();
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
  // Only stream I/O and waits for the destination race the abort: a front-end request
  // (dirty logging, GET_VRING_BASE, the back-end state) always runs to its end (each has its
  // own request timeout), so that the rollback sees what it did; `checkAbort` follows it.
  const guard = <T>(p: Promise<T>): Promise<T> => Promise.race([p, aborted]);
  const checkAbort = (): void => {
    if (abort !== null) throw abort;
  };
  /** Wait until the destination applied every page up to `iteration`. */
  const caughtUp = async (iteration: number): Promise<void> => {
    while (waiters.acked < iteration) {
      await guardFor(
        new Promise<void>((resolve) => {
          waiters.ack = resolve;
        }),
        options.helloTimeoutMs ?? 15_000,
        `ITERATION_ACK ${iteration}`,
      );
    }
  };
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
  try {
    // --- setup: header, layout, and the destination's offer
    const hello = new Promise<HelloSection>((resolve) => {
      waiters.hello = resolve;
    });
    const acked = (fe.ackedFeatures ?? fe.features) & ~LOG_ALL;
    const setup: SetupSection = {
      regions: ram.layoutSpec().map((r) => ({ gpa: r.gpa, size: r.size, uaddr: r.uaddr ?? 0 })),
      layout: ram.layout,
      features: acked.toString(),
      protocolFeatures: fe.protocolFeatures.toString(),
      queues: [...fe.queues.keys()],
      deviceId: options.deviceId ?? 1,
    };
    progress("setup", 0, 0);
    await guard(send(encodeHeader()));
    await guard(send(encodeJsonSection(SectionType.SETUP, setup)));
    const h = await guardFor(hello, options.helloTimeoutMs ?? 15_000, "HELLO");
    const destOffered = BigInt(h.offeredFeatures);
    const missing = acked & ~destOffered;
    if (missing !== 0n) {
      throw new VhostUserError("ERR_VHOST_BAD_FIELD", "destination back-end lacks features", {
        request: "migrate",
        field: "features",
        value: `0x${missing.toString(16)}`,
      });
    }
    const deviceState =
      h.deviceState && hasFeature(fe.protocolFeatures, ProtocolFeature.DEVICE_STATE);

    // --- pre-copy
    phase = "dirty logging";
    log = await startDirtyLogging(fe);
    ram.trackDirty(true);
    checkAbort();
    phase = "precopy";
    // ORDERING: the log (and the front-end's own dirty set) is fetched and cleared before the
    // pages of a pass are copied; a write that races the copy sets its bit again and the page
    // is sent again in the next pass. This is the invariant pre-copy relies on.
    log.fetchAndClear(() => undefined);
    ram.takeDirty();
    let iteration = 1;
    progress("precopy", 1, ram.size / PAGE_SIZE);
    await guard(sendPages(stream, ram.memory, 1, allPages(ram), counters));
    await guard(send(iterationEnd(1, counters.pages)));
    await caughtUp(1);
    for (;;) {
      // ORDERING: fetch-and-clear before the copy below (see the first pass).
      const dirty = new Set<number>(ram.takeDirty());
      log.fetchAndClear((p) => dirty.add(p));
      if (dirty.size <= stopPages || iteration >= maxIter) {
        // Put them back for the final pass.
        for (const p of dirty) ram.markDirty(p * PAGE_SIZE, 1);
        break;
      }
      iteration++;
      progress("precopy", iteration, dirty.size);
      const before = counters.pages;
      await guard(
        sendPages(
          stream,
          ram.memory,
          iteration,
          [...dirty].sort((a, b) => a - b),
          counters,
        ),
      );
      await guard(send(iterationEnd(iteration, counters.pages - before)));
      // Pace on the destination: the next dirty set is taken once this pass is applied there
      // (the guest and the back-ends run meanwhile).
      await caughtUp(iteration);
    }

    // --- stop and copy
    phase = "stop";
    tStop = performance.now();
    progress("stop", iteration + 1, 0);
    if (options.guest) {
      await options.guest.pause();
    }
    paused = true;
    for (const index of fe.queues.keys()) bases.set(index, await fe.stopQueue(index));
    checkAbort();
    const snapshots: DriverSnapshot[] = [];
    for (const [index, q] of fe.queues) {
      q.collectUsed();
      const b = bases.get(index) as QueueBase;
      if (!q.packed && q.lastUsedIdx !== b.availIdx) {
        throw new VhostUserError("ERR_VHOST_BAD_FIELD", "buffers still in flight in the back-end", {
          request: "GET_VRING_BASE",
          field: `queue[${index}].lastAvailIdx`,
          value: `${b.availIdx} (driver used idx ${q.lastUsedIdx ?? "?"})`,
        });
      }
      snapshots.push(q.snapshot());
    }
    // ORDERING: the rings are stopped (GET_VRING_BASE answered): the back-end writes no more,
    // so this last fetch-and-clear sees every write, and the copy below is final.
    const finalSet = new Set<number>(ram.takeDirty());
    log.fetchAndClear((p) => finalSet.add(p));
    for (const p of ringPages(fe)) finalSet.add(p);
    const finalBefore = counters.pages;
    iteration++;
    await guard(
      sendPages(
        stream,
        ram.memory,
        iteration,
        [...finalSet].sort((a, b) => a - b),
        counters,
      ),
    );
    const finalPages = counters.pages - finalBefore;
    await guard(send(iterationEnd(iteration, finalPages)));

    // back-end state (SET_DEVICE_STATE_FD SAVE + CHECK_DEVICE_STATE)
    phase = "backend state";
    let backendState: Uint8Array | null = null;
    let backendSaveMs = 0;
    if (deviceState) {
      const ts = performance.now();
      backendState = await saveBackendState(fe);
      backendSaveMs = performance.now() - ts;
      checkAbort();
      await guard(send(encodeSection(SectionType.BACKEND_STATE, backendState)));
    }

    // virtio device state
    phase = "virtio state";
    const status = hasFeature(fe.protocolFeatures, ProtocolFeature.STATUS)
      ? await fe.getStatus()
      : DeviceStatus.ACKNOWLEDGE |
        DeviceStatus.DRIVER |
        DeviceStatus.FEATURES_OK |
        DeviceStatus.DRIVER_OK;
    const configSize = options.configSize ?? 0;
    const config =
      configSize > 0 && hasFeature(fe.protocolFeatures, ProtocolFeature.CONFIG)
        ? await fe.getConfig(0, configSize)
        : new Uint8Array(0);
    checkAbort();
    const vs: VirtioDeviceState = {
      status,
      features: acked,
      config,
      protocolFeatures: fe.protocolFeatures,
      queues: [...fe.queues.values()].map((q) => {
        const b = bases.get(q.index) as QueueBase;
        return {
          index: q.index,
          size: q.size,
          desc: q.ring.desc,
          avail: q.ring.avail,
          used: q.ring.used,
          lastAvailIdx: b.availIdx,
          usedIdx: q.packed ? (b.usedIdx ?? b.availIdx) : (q.lastUsedIdx ?? b.availIdx),
          enabled: true,
          availWrap: b.availWrap ?? true,
          usedWrap: b.usedWrap ?? true,
        };
      }),
      deviceId: options.deviceId ?? 1,
      device: options.deviceFields ?? new Uint8Array(0),
    };
    const vsBytes = encodeVirtioState(vs);
    await guard(send(encodeSection(SectionType.VIRTIO_STATE, vsBytes)));
    await guard(
      send(
        encodeJsonSection(SectionType.DRIVER_STATE, {
          queues: snapshots,
          allocator: ram.allocatorState(),
        }),
      ),
    );
    const gs = options.guest?.saveState?.();
    if (gs !== undefined) await guard(send(encodeSection(SectionType.GUEST_STATE, gs)));
    const hash = options.verifyMemory ? hashGuestRam(ram) : null;
    const end = Buffer.alloc(33);
    if (hash) {
      end.writeUInt8(1, 0);
      hash.copy(end, 1);
    }
    phase = "switchover";
    progress("switchover", iteration, 0);
    const done = new Promise<void>((resolve) => {
      waiters.done = resolve;
    });
    await guard(send(encodeSection(SectionType.END, end)));
    await guardFor(done, options.doneTimeoutMs ?? 20_000, "DONE");
    const tDone = performance.now();
    fe.off("close", onBackendClose);

    // --- switch-over happened: the destination runs the device.
    ram.trackDirty(false);
    log.close();
    log = null;
    stream.end();
    if (options.closeOnSuccess !== false) {
      // The rings are stopped; the source sends nothing more (no RESET_OWNER, which some
      // back-ends do not handle) and hangs up, as QEMU does when the VM is gone.
      fe.close();
    }
    progress("done", iteration, 0);
    return {
      downtimeMs: tDone - tStop,
      totalMs: tDone - t0,
      iterations: iteration,
      pagesSent: counters.pages,
      zeroPages: counters.zeroPages,
      finalPages,
      virtioStateBytes: vsBytes.length,
      backendStateBytes: backendState?.length ?? 0,
      backendSaveMs,
      bytesSent: bytesSent + counters.bytes,
      deviceStateTransferred: backendState !== null,
      memoryHash: hash?.toString("hex") ?? null,
    };
  } catch (err) {
    fe.off("close", onBackendClose);
    progress("failed", 0, 0);
    stream.destroy();
    let resumed = true;
    try {
      for (const [index, q] of fe.queues) {
        if (q.stopped) await fe.restartQueue(index, bases.get(index) ?? undefined, false);
        else if (paused && hasFeature(fe.features, VirtioFeature.PROTOCOL_FEATURES)) {
          // SET_VRING_ENABLE 0 may have gone out before GET_VRING_BASE failed.
          await fe.setVringEnable(index, true);
        }
      }
      if (log !== null || hasFeature(fe.features, VirtioFeature.LOG_ALL)) {
        await stopDirtyLogging(fe, log);
        log = null;
      }
    } catch {
      resumed = false;
    } finally {
      log?.close();
      ram.trackDirty(false);
      if (paused) options.guest?.resume();
    }
    // Nothing resumes without a back-end (it disconnected, or the rollback closed it).
    if (fe.closed) resumed = false;
    throw new MigrationError(phase, err, resumed);
  }
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

function iterationEnd(iteration: number, pages: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(iteration, 0);
  b.writeUInt32BE(pages, 4);
  return encodeSection(SectionType.ITERATION_END, b);
}
