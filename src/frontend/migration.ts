/**
 * Front-end helpers for live migration: the dirty log the front-end shares with its back-end
 * (allocation, SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG, fetch-and-clear), and the back-end's
 * device state moved over SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE.
 *
 * vhost-user: "Migration", VHOST_USER_SET_LOG_BASE, "Migrating back-end state",
 * VHOST_USER_SET_DEVICE_STATE_FD, VHOST_USER_CHECK_DEVICE_STATE.
 */
import { native } from "../native.js";
import {
  DeviceStateDirection,
  DeviceStatePhase,
  FrontendRequest,
  ProtocolFeature,
  VHOST_LOG_PAGE,
  VirtioFeature,
  featureMask,
  hasFeature,
} from "../protocol/constants.js";
import type { DeviceStateReply, MemoryRegion } from "../protocol/codecs.js";
import { VhostUserError } from "../protocol/errors.js";
import type { VhostUserFrontend } from "./frontend.js";
import { GUEST_RAM_SEALS } from "./guest-ram.js";
import { readStateFromFd, writeStateToFd } from "../migration/transfer.js";

/** Largest back-end state accepted from a SAVE (default of {@link saveBackendState}). */
export const DEFAULT_MAX_STATE_BYTES = 256 << 20;

const LOG_ALL = featureMask(VirtioFeature.LOG_ALL);

/**
 * Bytes of dirty log needed to cover a memory table: one bit per 4 KiB page from GPA 0 to the
 * end of the highest region, rounded up to whole u64 words (as QEMU's `vhost_get_log_size`).
 * @param table the memory table
 * @returns the log size in bytes (at least 8)
 */
export function logSizeFor(table: readonly MemoryRegion[]): number {
  let end = 0;
  for (const r of table) end = Math.max(end, Number(r.guestPhysAddr + r.memorySize));
  const pages = Math.ceil(end / VHOST_LOG_PAGE);
  return Math.max(8, Math.ceil(pages / 64) * 8);
}

/**
 * The front-end's side of the dirty log: a memfd mapped here and shared with the back-end,
 * sealed against shrinking (see `GUEST_RAM_SEALS`).
 *
 * LIFETIME: the word view lives in the mapping; it is unusable after {@link close}.
 */
export class FrontendDirtyLog {
  /** the memfd (sent with SET_LOG_BASE) */
  readonly fd: number;
  /** bytes of bitmap */
  readonly size: number;
  readonly #buffer: ArrayBuffer;
  readonly #words: Uint32Array;
  #closed = false;

  private constructor(fd: number, size: number) {
    this.fd = fd;
    this.size = size;
    this.#buffer = native.mmap(fd, 0, size, true);
    // LIFETIME: valid until close() unmaps the buffer (munmap detaches it).
    this.#words = new Uint32Array(this.#buffer, 0, size / 4);
  }

  /**
   * Allocate a zeroed log in a memfd, sized for a memory table.
   * @param table the memory table the back-end was given
   * @returns the log; {@link close} it
   */
  static create(table: readonly MemoryRegion[]): FrontendDirtyLog {
    const size = logSizeFor(table);
    const fd = native.memfdCreate("vhostkit-dirty-log");
    try {
      native.ftruncate(fd, size);
      // The back-end gets this fd: sealed, it cannot shrink the file under the mapping here.
      native.addSeals(fd, GUEST_RAM_SEALS);
      return new FrontendDirtyLog(fd, size);
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /** @returns the number of pages the log covers */
  get pages(): number {
    return this.size * 8;
  }

  /**
   * Fetch and clear the log: every non-zero 32-bit word is swapped with 0 atomically, so a bit
   * the back-end sets concurrently is either seen now or stays for the next fetch.
   * @param onPage called with each dirty page number (gpa / 4096), in increasing order
   * @returns the number of dirty pages
   */
  fetchAndClear(onPage: (page: number) => void): number {
    if (this.#closed) throw new Error("dirty log: fetchAndClear after close()");
    const w = this.#words;
    let n = 0;
    for (let i = 0; i < w.length; i++) {
      if (w[i] === 0) continue;
      // ORDERING: atomic exchange with the back-end's atomic ORs (vhost-user "Migration").
      let v = Atomics.exchange(w, i, 0) >>> 0;
      while (v !== 0) {
        const b = 31 - Math.clz32(v & -v);
        v &= v - 1;
        onPage(i * 32 + b);
        n++;
      }
    }
    return n;
  }

  /** Unmap and close the memfd. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    native.munmap(this.#buffer);
    native.close(this.fd);
  }
}

/**
 * Turn dirty logging on, as QEMU's `vhost_dev_set_log` / `vhost_migration_log` do: a log sized
 * from the memory table sent with SET_LOG_BASE (any reply size accepted), a barrier, then
 * SET_FEATURES with VHOST_F_LOG_ALL and a barrier, then SET_VRING_ADDR with VHOST_VRING_F_LOG on
 * every ring and a barrier. A barrier is the REPLY_ACK replies when negotiated, else a
 * GET_FEATURES round trip.
 * @param fe a started front-end
 * @returns the log (close it with {@link stopDirtyLogging})
 * @throws VhostUserError ERR_VHOST_NOT_NEGOTIATED when LOG_SHMFD or LOG_ALL is not offered; any
 *   request failure (logging is turned off again first)
 * (vhost-user: "Migration", VHOST_USER_SET_LOG_BASE)
 */
export async function startDirtyLogging(fe: VhostUserFrontend): Promise<FrontendDirtyLog> {
  if (!hasFeature(fe.protocolFeatures, ProtocolFeature.LOG_SHMFD)) {
    throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "back-end cannot take a shared log", {
      request: "SET_LOG_BASE",
      field: "protocol feature",
      value: "LOG_SHMFD",
    });
  }
  const offered = fe.negotiated?.offeredFeatures ?? 0n;
  if ((offered & LOG_ALL) === 0n) {
    throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "back-end does not offer LOG_ALL", {
      request: "SET_FEATURES",
      field: "features",
      value: `0x${offered.toString(16)}`,
    });
  }
  const log = FrontendDirtyLog.create(fe.memoryTable);
  try {
    const reply = await fe.request(
      FrontendRequest.SET_LOG_BASE,
      { mmapSize: BigInt(log.size), mmapOffset: 0n },
      [log.fd],
    );
    for (const fd of reply.fds) native.close(fd);
    await fe.barrier();
    await fe.setFeatures(fe.features | LOG_ALL);
    await fe.barrier();
    for (const index of fe.queues.keys()) await fe.setVringLog(index, true);
    await fe.barrier();
  } catch (err) {
    await stopDirtyLogging(fe, null).catch(() => undefined);
    log.close();
    throw err;
  }
  return log;
}

/**
 * Turn dirty logging off: SET_VRING_ADDR without VHOST_VRING_F_LOG on every ring that is not
 * stopped, SET_FEATURES without LOG_ALL, a barrier; then the log is closed.
 * @param fe the front-end
 * @param log the log from {@link startDirtyLogging}, or null
 */
export async function stopDirtyLogging(
  fe: VhostUserFrontend,
  log: FrontendDirtyLog | null,
): Promise<void> {
  try {
    if (!fe.closed) {
      for (const [index, q] of fe.queues) if (!q.stopped) await fe.setVringLog(index, false);
      await fe.setFeatures(fe.features & ~LOG_ALL);
      await fe.barrier();
    }
  } finally {
    log?.close();
  }
}

/** Options of {@link saveBackendState}. */
export interface SaveStateOptions {
  /** fail when the back-end writes more than this (default 256 MiB) */
  maxBytes?: number;
  /** fail when the back-end does not finish writing in this long (default 10 000 ms) */
  timeoutMs?: number;
}

async function setDeviceStateFd(
  fe: VhostUserFrontend,
  direction: DeviceStateDirection,
  fd: number,
): Promise<number | null> {
  const reply = await fe.request(
    FrontendRequest.SET_DEVICE_STATE_FD,
    { direction, phase: DeviceStatePhase.STOPPED },
    [fd],
  );
  const body = reply.payload as DeviceStateReply;
  const extra = reply.fds.slice();
  if (body.result !== 0) {
    for (const f of extra) native.close(f);
    throw new VhostUserError("ERR_VHOST_REQUEST_FAILED", "back-end refused the transfer", {
      request: "SET_DEVICE_STATE_FD",
      field: "result",
      value: body.result,
    });
  }
  if (body.noFd) {
    for (const f of extra) native.close(f);
    return null;
  }
  const [own, ...rest] = extra;
  for (const f of rest) native.close(f);
  if (own === undefined) {
    throw new VhostUserError("ERR_VHOST_MISSING_FDS", "reply says an fd follows, none came", {
      request: "SET_DEVICE_STATE_FD",
      field: "fds",
      value: 0,
    });
  }
  return own;
}

async function checkDeviceState(fe: VhostUserFrontend): Promise<void> {
  const reply = await fe.request(FrontendRequest.CHECK_DEVICE_STATE, null);
  for (const fd of reply.fds) native.close(fd);
  const v = reply.payload as bigint;
  if (v !== 0n) {
    throw new VhostUserError("ERR_VHOST_REQUEST_FAILED", "back-end reports a failed transfer", {
      request: "CHECK_DEVICE_STATE",
      field: "result",
      value: v,
    });
  }
}

/**
 * The transfer pipe: the back-end's end blocking, ours non-blocking. O_NONBLOCK belongs to each
 * end's open file description, so setting it on ours leaves the back-end's end blocking, as
 * QEMU passes it: back-ends read or write the state in a blocking loop right after their reply
 * and treat EAGAIN as a failure.
 * @param ours which end this side keeps
 * @returns [readEnd, writeEnd]
 */
function statePipe(ours: "read" | "write"): [number, number] {
  const [r, w] = native.pipe(false);
  try {
    native.setNonBlocking(ours === "read" ? r : w, true);
  } catch (err) {
    native.close(r);
    native.close(w);
    throw err;
  }
  return [r, w];
}

function requireDeviceState(fe: VhostUserFrontend, step: string): void {
  if (!hasFeature(fe.protocolFeatures, ProtocolFeature.DEVICE_STATE)) {
    throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "protocol feature not negotiated", {
      request: step,
      field: "protocol feature",
      value: "DEVICE_STATE",
    });
  }
}

/**
 * Save the back-end's internal state (source side, every ring stopped): a pipe whose write end
 * (blocking) goes with SET_DEVICE_STATE_FD (SAVE, phase STOPPED), or the back-end's own fd from
 * the reply; read to end of file (our end non-blocking); then CHECK_DEVICE_STATE.
 * @param fe the front-end (DEVICE_STATE negotiated)
 * @param options size cap, timeout
 * @returns the state bytes
 * @throws VhostUserError naming SET_DEVICE_STATE_FD or CHECK_DEVICE_STATE on failure; Error when
 *   the state is too large or the back-end stalls
 * (vhost-user: "Migrating back-end state")
 */
export async function saveBackendState(
  fe: VhostUserFrontend,
  options: SaveStateOptions = {},
): Promise<Uint8Array> {
  requireDeviceState(fe, "SET_DEVICE_STATE_FD");
  const maxBytes = options.maxBytes ?? DEFAULT_MAX_STATE_BYTES;
  const [r, w] = statePipe("read");
  // Every fd still ours: each is closed exactly once, whatever throws (a second close could
  // hit an unrelated fd that reused the number).
  const owned = new Set([r, w]);
  const release = (fd: number): void => {
    if (owned.delete(fd)) native.close(fd);
  };
  let readFd = r;
  try {
    const own = await setDeviceStateFd(fe, DeviceStateDirection.SAVE, w);
    if (own !== null) owned.add(own);
    release(w);
    if (own !== null) {
      release(r);
      readFd = own;
      native.setNonBlocking(readFd, true);
    }
  } catch (err) {
    for (const fd of owned) native.close(fd);
    throw err;
  }
  // The back-end writes after its reply; read to end of file (the fd is closed either way).
  const data = await readStateFromFd(readFd, {
    maxBytes,
    signal: AbortSignal.timeout(options.timeoutMs ?? 10_000),
  });
  await checkDeviceState(fe);
  return data;
}

/**
 * Load a back-end state (destination side, rings not started): a pipe whose read end (blocking)
 * goes with SET_DEVICE_STATE_FD (LOAD, phase STOPPED), or the back-end's own fd from the reply;
 * write the state (our end non-blocking; a large state's pages are handed to the pipe without
 * copying) and close; then CHECK_DEVICE_STATE.
 * @param fe the front-end (DEVICE_STATE negotiated)
 * @param data the state saved on the source (must not change until this returns)
 * @throws VhostUserError naming SET_DEVICE_STATE_FD or CHECK_DEVICE_STATE when the back-end
 *   refuses the state
 * (vhost-user: "Migrating back-end state")
 */
export async function loadBackendState(fe: VhostUserFrontend, data: Uint8Array): Promise<void> {
  requireDeviceState(fe, "SET_DEVICE_STATE_FD");
  const [r, w] = statePipe("write");
  // Every fd still ours: each is closed exactly once, whatever throws.
  const owned = new Set([r, w]);
  const release = (fd: number): void => {
    if (owned.delete(fd)) native.close(fd);
  };
  let writeFd = w;
  try {
    const own = await setDeviceStateFd(fe, DeviceStateDirection.LOAD, r);
    if (own !== null) owned.add(own);
    release(r);
    if (own !== null) {
      release(w);
      writeFd = own;
      native.setNonBlocking(writeFd, true);
    }
  } catch (err) {
    for (const fd of owned) native.close(fd);
    throw err;
  }
  try {
    // LIFETIME: zero copy: the pipe refers to `data` until the back-end has read it, which
    // CHECK_DEVICE_STATE below waits for; the caller keeps `data` unchanged until we return.
    await writeStateToFd(writeFd, data, { zeroCopy: true });
  } catch (err) {
    // EPIPE: the back-end stopped reading (it refused the state); CHECK tells why.
    const cause = (err as { cause?: { code?: string } }).cause;
    if (cause?.code !== "EPIPE") throw err;
  }
  await checkDeviceState(fe);
}
