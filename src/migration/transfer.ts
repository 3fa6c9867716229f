/**
 * Moving a state stream over the SET_DEVICE_STATE_FD channel (a pipe, or any fd that behaves
 * like one): write everything then close; read to end of file with a cap. Both sides of the
 * channel use these, without ever blocking the event loop.
 *
 * Spec: vhost-user "Migrating back-end state" (the writer signals the end by closing its end).
 */
import { native, POLL_READABLE, POLL_WRITABLE } from "../native.js";
import { MigrationStreamError } from "./state-codec.js";

/** Bytes read per read(2) call. */
const CHUNK = 64 * 1024;

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
      if (n === null) await waitFd(fd, POLL_WRITABLE, options.signal);
      else off += n;
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
  // Read straight into one buffer that doubles as it fills, capped at maxBytes + 1: memory
  // stays proportional to the bytes received however the writer chunks them.
  let out = new Uint8Array(Math.min(CHUNK, options.maxBytes + 1));
  let total = 0;
  try {
    native.setNonBlocking(fd, true);
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
        await waitFd(fd, POLL_READABLE, options.signal);
        continue;
      }
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
  return out.slice(0, total);
}
