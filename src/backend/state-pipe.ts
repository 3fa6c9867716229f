/**
 * Temporary pipe transfer helpers for SET_DEVICE_STATE_FD (replaced by src/migration).
 */
import { native, POLL_READABLE, POLL_WRITABLE } from "../native.js";

function waitFd(fd: number, events: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const w = new native.FdWatcher(fd, (_ev, err) => {
      w.close();
      if (err) reject(err);
      else resolve();
    });
    w.start(events);
  });
}

/**
 * Write all bytes to a non-blocking fd, then close it.
 * @param fd the fd (owned: closed at the end, also on error)
 * @param data the bytes
 */
export async function writeAllToFd(fd: number, data: Uint8Array): Promise<void> {
  try {
    let off = 0;
    while (off < data.length) {
      const n = native.write(fd, data, off, data.length - off);
      if (n === null) await waitFd(fd, POLL_WRITABLE);
      else off += n;
    }
  } finally {
    native.close(fd);
  }
}

/**
 * Read a non-blocking fd to end of file, then close it.
 * @param fd the fd (owned)
 * @param opts maxBytes: fail when more arrive
 * @returns the bytes
 */
export async function readAllFromFd(fd: number, opts: { maxBytes: number }): Promise<Uint8Array> {
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    for (;;) {
      const buf = new Uint8Array(65536);
      const n = native.read(fd, buf, 0, buf.length);
      if (n === null) {
        await waitFd(fd, POLL_READABLE);
        continue;
      }
      if (n === 0) break;
      total += n;
      if (total > opts.maxBytes) throw new Error(`device state larger than ${opts.maxBytes} bytes`);
      chunks.push(buf.subarray(0, n));
    }
  } finally {
    native.close(fd);
  }
  const out = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    out.set(c, off);
    off += c.length;
  }
  return out;
}
