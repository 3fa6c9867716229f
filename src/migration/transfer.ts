/**
 * Moving a state stream over the SET_DEVICE_STATE_FD channel (a pipe, or any fd that behaves
 * like one): write everything then close; read to end of file with a cap. Both sides of the
 * channel use these, without ever blocking the event loop.
 *
 * Spec: vhost-user "Migrating back-end state" (the writer signals the end by closing its end).
 */
import { native, POLL_READABLE, POLL_WRITABLE } from "../native.js";
import { MigrationStreamError } from "./state-codec.js";

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

/**
 * Write a whole state stream to the transfer fd, then close it (the end of the transfer).
 * @param fd the writing end (owned: closed at the end, also on error); made non-blocking
 * @param data the stream
 * @param options abort signal
 * @throws MigrationStreamError IO when a write fails (e.g. EPIPE), ABORTED
 * (vhost-user: "Migrating back-end state")
 */
export async function writeStateToFd(
  fd: number,
  data: Uint8Array,
  options: TransferOptions = {},
): Promise<void> {
  try {
    native.setNonBlocking(fd, true);
    widenPipe(fd);
    const spins = { n: 0 };
    let off = 0;
    while (off < data.length) {
      let n: number | null;
      try {
        n = native.write(fd, data, off, data.length - off);
      } catch (err) {
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
  // LIFETIME: read straight into one zero-filled reservation: the kernel maps its pages only
  // as the reads reach them, so memory follows the bytes received, nothing is copied while it
  // fills, and a large state pays one page fault per page (fresh pages dominate the cost of a
  // large transfer). Past the reservation it doubles, capped at maxBytes + 1.
  let out = new Uint8Array(Math.min(options.maxBytes + 1, RESERVE));
  let total = 0;
  try {
    native.setNonBlocking(fd, true);
    widenPipe(fd);
    const spins = { n: 0 };
    for (;;) {
      if (total === out.length) {
        const grown = new Uint8Array(Math.min(out.length * 2, options.maxBytes + 1));
        grown.set(out);
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
  } finally {
    native.close(fd);
  }
  // A small state is copied out of its reservation; a large one keeps it (its untouched tail
  // holds no memory).
  return total < SMALL_STATE ? out.slice(0, total) : out.subarray(0, total);
}
