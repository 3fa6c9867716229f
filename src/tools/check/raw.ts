/**
 * Raw exchanges on a socket fd, below the channel: send bytes with fds, read one whole message
 * (header and payload, whatever its size). The checker uses them where a peer's answer is one
 * the channel would refuse (e.g. an empty GET_CONFIG reply) and for malformed messages.
 */
import { native } from "../../native.js";
import { HEADER_SIZE } from "../../protocol/constants.js";
import { decodeHeader } from "../../protocol/framing.js";
import type { MessageHeader } from "../../protocol/framing.js";

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** A message read whole by {@link readRaw}. */
export interface RawMessage {
  header: MessageHeader;
  payload: Uint8Array;
}

/**
 * Send bytes (and fds, not taken over) on a connected socket.
 * @param fd the socket
 * @param data the bytes (one or more whole messages)
 * @param fds fds for SCM_RIGHTS
 * @throws Error when the socket cannot take them now
 */
export function sendRaw(fd: number, data: Uint8Array, fds: number[] = []): void {
  const n = native.sendmsg(fd, data, 0, data.length, fds);
  if (n === null || n !== data.length)
    throw new Error(`short send (${n ?? "EAGAIN"} of ${data.length})`);
}

/**
 * Read one message: the 12-byte header, then `size` bytes of payload (fds received are closed).
 * @param fd the socket
 * @param timeoutMs give up after this long
 * @returns the message, or null when the peer closed the connection
 * @throws Error on a timeout, or a header that does not decode
 */
export async function readRaw(fd: number, timeoutMs = 2000): Promise<RawMessage | null> {
  const head = new Uint8Array(HEADER_SIZE);
  const deadline = Date.now() + timeoutMs;
  const fill = async (buf: Uint8Array): Promise<boolean> => {
    let got = 0;
    while (got < buf.length) {
      const r = native.recvmsg(fd, buf, got, buf.length - got);
      if (r === null) {
        if (Date.now() > deadline) throw new Error(`no reply within ${timeoutMs} ms`);
        await sleep(2);
        continue;
      }
      for (const f of r.fds) native.close(f);
      if (r.bytes === 0) return false;
      got += r.bytes;
    }
    return true;
  };
  if (!(await fill(head))) return null;
  const header = decodeHeader(head);
  if (header.size > 65536) throw new Error(`reply announces ${header.size} bytes`);
  const payload = new Uint8Array(header.size);
  if (header.size > 0 && !(await fill(payload))) return null;
  return { header, payload };
}
