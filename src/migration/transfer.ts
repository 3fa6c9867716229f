/**
 * Moving a state stream over the SET_DEVICE_STATE_FD channel (a pipe, or any fd that behaves
 * like one): write everything then close; read to end of file with a cap. Both sides of the
 * channel use these, without ever blocking the event loop.
 *
 * Spec: vhost-user "Migrating back-end state" (the writer signals the end by closing its end).
 */
import { native, POLL_READABLE, POLL_WRITABLE } from "../native.js";
import { MigrationStreamError } from "./state-codec.js";

/** First receive buffer: a state that fits is read without any reservation. */
const FIRST_READ = 64 << 10;
/** Receive reservation (address space; pages are mapped as the reads reach them). */
const RESERVE = 256 << 20;
/** States below this are copied out of the reservation. */
const SMALL_STATE = 1 << 20;
/**
 * Capacity asked for a pipe used as the channel (the default is 64 KiB). Each time the pipe
 * fills or empties both ends go back to the event loop; a 1 MiB pipe (the default
 * /proc/sys/fs/pipe-max-size, allowed without privileges) makes 16 times fewer round trips.
 */
export const TRANSFER_PIPE_SIZE = 1 << 20;

/** Enlarge the channel when it is a pipe (a back-end-provided fd may be anything: ignored). */
function widenPipe(fd: number): void {
  native.setPipeSize(fd, TRANSFER_PIPE_SIZE);
}

function waitFd(fd: number, events: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(new MigrationStreamError("ABORTED", "transfer aborted", { field: "fd", value: fd }));
      return;
    }
    const onAbort = (): void => {
      w.close();
      reject(new MigrationStreamError("ABORTED", "transfer aborted", { field: "fd", value: fd }));
    };
    const w = new native.FdWatcher(fd, (_ev, err) => {
      w.close();
      signal?.removeEventListener("abort", onAbort);
      if (err) {
        reject(
          new MigrationStreamError("IO", `waiting on the transfer fd failed: ${err.message}`, {
            field: "fd",
            value: fd,
            cause: err,
          }),
        );
      } else resolve();
    });
    signal?.addEventListener("abort", onAbort, { once: true });
    w.start(events);
  });
}

/** Retries through the event loop's check phase before an fd watcher is armed. */
const QUICK_RETRIES = 8;

/**
 * Wait until the fd may be ready: first a few turns of the event loop (when the other end is
 * served by this same process it moves on meanwhile, and no watcher round trip is paid), then
 * a watcher.
 */
async function waitReady(
  fd: number,
  events: number,
  signal: AbortSignal | undefined,
  spins: { n: number },
): Promise<void> {
  if (spins.n < QUICK_RETRIES) {
    spins.n++;
    await new Promise((resolve) => setImmediate(resolve));
    return;
  }
  spins.n = 0;
  await waitFd(fd, events, signal);
}

/** Options of {@link writeStateToFd} and {@link readStateFromFd}. */
export interface TransferOptions {
  /** abort the transfer (the fd is still closed) */
  signal?: AbortSignal;
}

/** Options of {@link writeStateToFd}. */
export interface WriteStateOptions extends TransferOptions {
  /**
   * Hand the pages of `data` to the channel instead of copying them (vmsplice), when it is a
   * pipe and `data` is large (default false). The pipe then refers to `data` itself until its
   * reader has read it: the caller keeps `data` alive and unchanged until the reader is known
   * to be done (CHECK_DEVICE_STATE answered, or the channel's reader closed).
   */
  zeroCopy?: boolean;
}

/** Below this, zero copy saves less than the page pinning costs: the bytes are copied. */
const ZERO_COPY_MIN = 64 << 10;

/**
 * Write a whole state stream to the transfer fd, then close it (the end of the transfer).
 * @param fd the writing end (owned: closed at the end, also on error); made non-blocking
 * @param data the stream
 * @param options abort signal; zero copy (see {@link WriteStateOptions.zeroCopy})
 * @throws MigrationStreamError IO when a write fails (e.g. EPIPE), ABORTED
 * (vhost-user: "Migrating back-end state")
 */
export async function writeStateToFd(
  fd: number,
  data: Uint8Array,
  options: WriteStateOptions = {},
): Promise<void> {
  try {
    native.setNonBlocking(fd, true);
    widenPipe(fd);
    let splice = options.zeroCopy === true && data.length >= ZERO_COPY_MIN;
    const spins = { n: 0 };
    let off = 0;
    while (off < data.length) {
      let n: number | null;
      try {
        n = splice
          ? native.vmsplice(fd, data, off, data.length - off)
          : native.write(fd, data, off, data.length - off);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (splice && (code === "EBADF" || code === "EINVAL")) {
          // Not a pipe (a back-end's own channel may be anything): copy instead.
          splice = false;
          continue;
        }
        throw new MigrationStreamError("IO", `write to the transfer fd failed at byte ${off}`, {
          field: "fd",
          value: fd,
          cause: err,
        });
      }
      if (n === null) await waitReady(fd, POLL_WRITABLE, options.signal, spins);
      else {
        off += n;
        spins.n = 0;
      }
    }
  } finally {
    native.close(fd);
  }
}

/**
 * Read a state stream from the transfer fd to end of file, then close it.
 * @param fd the reading end (owned: closed at the end, also on error); made non-blocking
 * @param options `maxBytes` (fail with TOO_LARGE past it, before keeping more), abort signal
 * @returns the bytes
 * @throws MigrationStreamError TOO_LARGE, IO, ABORTED
 * (vhost-user: "Migrating back-end state")
 */
export async function readStateFromFd(
  fd: number,
  options: TransferOptions & { maxBytes: number },
): Promise<Uint8Array> {
  const cap = options.maxBytes + 1;
  // First into a small buffer: a small state (the usual case) costs no reservation (Node
  // counts a reservation's whole length as external memory and answers it with a garbage
  // collection: milliseconds per transfer). A large one goes on in an anonymous mapping with
  // transparent huge pages (mapReserve), not in a buffer Node allocates, whose pages would
  // fault in one 4 KiB page at a time.
  let out = new Uint8Array(Math.min(cap, FIRST_READ));
  let mapped: ArrayBuffer | null = null;
  let total = 0;
  let done = false;
  try {
    native.setNonBlocking(fd, true);
    widenPipe(fd);
    const spins = { n: 0 };
    for (;;) {
      if (total === out.length) {
        const next = mapReserve(Math.min(cap, Math.max(RESERVE, total * 2)));
        const grown = new Uint8Array(next);
        grown.set(out.subarray(0, total));
        if (mapped) native.munmap(mapped);
        mapped = next;
        out = grown;
      }
      let n: number | null;
      try {
        n = native.read(fd, out, total, out.length - total);
      } catch (err) {
        throw new MigrationStreamError("IO", `read from the transfer fd failed at byte ${total}`, {
          field: "fd",
          value: fd,
          cause: err,
        });
      }
      if (n === null) {
        await waitReady(fd, POLL_READABLE, options.signal, spins);
        continue;
      }
      spins.n = 0;
      if (n === 0) break;
      total += n;
      if (total > options.maxBytes) {
        throw new MigrationStreamError("TOO_LARGE", `state exceeds ${options.maxBytes} bytes`, {
          field: "stream.length",
          value: total,
        });
      }
    }
    done = true;
  } finally {
    native.close(fd);
    // LIFETIME: a failed transfer releases its reservation now, not at some later collection.
    if (!done && mapped) native.munmap(mapped);
  }
  if (mapped === null) return out.slice(0, total);
  if (total < SMALL_STATE) {
    const copy = out.slice(0, total);
    native.munmap(mapped);
    return copy;
  }
  // LIFETIME: a large state keeps its mapping (its untouched tail holds no memory); it is
  // unmapped when the returned view is collected. Node counts the mapping's whole length as
  // external memory, so unreferenced ones are collected: memory stays bounded.
  return out.subarray(0, total);
}

/** Huge-page size: reservations are whole multiples of it. */
const HUGE_PAGE = 2 << 20;

/** A zero-filled reservation of at least `bytes` (rounded up to whole huge pages). */
function mapReserve(bytes: number): ArrayBuffer {
  return native.mapAnonymous(Math.ceil(bytes / HUGE_PAGE) * HUGE_PAGE, true);
}
