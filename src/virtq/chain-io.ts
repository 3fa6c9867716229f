/**
 * Copying between a device's buffers and a descriptor chain's segments, for the back-end's
 * queues on the main thread and in workers alike.
 */
import type { Gpa } from "../memory/address.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import type { DescChain } from "./types.js";

/**
 * Copy the chain's device-readable bytes, starting `offset` bytes into them, into `dst`.
 * @param mem the guest memory the chain's addresses refer to
 * @param chain a chain popped from a device queue
 * @param dst where to copy (at most `dst.length` bytes)
 * @param offset bytes of the readable segments to skip first
 * @returns the number of bytes copied
 * @throws GuestMemoryError naming the address when a segment is outside guest memory
 * (VIRTIO 1.2 §2.7.4, §2.8.4: device-readable buffers)
 */
export function readChain(mem: GuestMemory, chain: DescChain, dst: Uint8Array, offset = 0): number {
  let copied = 0;
  let skip = offset;
  for (const seg of chain.readable) {
    if (copied >= dst.length) break;
    if (skip >= seg.len) {
      skip -= seg.len;
      continue;
    }
    const n = Math.min(seg.len - skip, dst.length - copied);
    const g = (seg.gpa + skip) as Gpa;
    const r = mem.tryRegionFor(g, n);
    if (r !== null) {
      // Fast path: one region; LIFETIME: the subarray is used at once and not kept.
      const at = g - r.gpa;
      dst.set(r.bytes.subarray(at, at + n), copied);
    } else {
      // Spans adjacent regions (or is outside guest memory: read throws naming the address).
      mem.read(g, dst.subarray(copied, copied + n));
    }
    copied += n;
    skip = 0;
  }
  return copied;
}

/**
 * Write a header and then a frame at the start of the chain's device-writable segments: what
 * a network device does per received frame. When the first segment holds both (the usual
 * receive buffer), the header's bytes are stored one by one and the frame copied once, with
 * one dirty-log check and mark for the whole range; otherwise as two {@link writeChain} calls.
 * @param mem the guest memory the chain's addresses refer to
 * @param chain a chain popped from a device queue
 * @param hdr the header (its first `hdrLen` bytes are written)
 * @param hdrLen header length (at most `hdr.length`)
 * @param data the frame, written right after the header
 * @returns the number of bytes written
 * @throws GuestMemoryError naming the address when a segment is outside guest memory
 * (VIRTIO 1.2 §5.1.6.4; vhost-user "Migration": dirty pages are logged)
 */
export function writeChainFrame(
  mem: GuestMemory,
  chain: DescChain,
  hdr: Uint8Array,
  hdrLen: number,
  data: Uint8Array,
): number {
  const total = hdrLen + data.length;
  const s0 = chain.writable[0];
  if (s0 !== undefined && s0.len >= total && hdrLen <= hdr.length) {
    const g = s0.gpa;
    const r = mem.tryRegionFor(g, total);
    if (r !== null) {
      const log = mem.log;
      // A write that no log bit can cover does not happen (check throws before it).
      if (log !== null) log.check(g, total);
      // LIFETIME: r.bytes is used at once and not kept.
      const bytes = r.bytes;
      const at = g - r.gpa;
      for (let i = 0; i < hdrLen; i++) bytes[at + i] = hdr[i] as number;
      bytes.set(data, at + hdrLen);
      // ORDERING: marked before the chain is pushed to the used ring (as in writeChain).
      if (log !== null) log.mark(g, total);
      return total;
    }
  }
  const h = hdrLen === hdr.length ? hdr : hdr.subarray(0, hdrLen);
  return writeChain(mem, chain, h) + writeChain(mem, chain, data, hdrLen);
}

/**
 * Copy `src` into the chain's device-writable segments, starting `offset` bytes into them,
 * marking the dirty log for every byte written while one is attached.
 * @param mem the guest memory the chain's addresses refer to
 * @param chain a chain popped from a device queue
 * @param src the bytes to write
 * @param offset bytes of the writable segments to skip first
 * @returns the number of bytes copied (less than `src.length` when the chain is too short)
 * @throws GuestMemoryError naming the address when a segment is outside guest memory
 * (VIRTIO 1.2 §2.7.4, §2.8.4; vhost-user "Migration": dirty pages are logged)
 */
export function writeChain(
  mem: GuestMemory,
  chain: DescChain,
  src: Uint8Array,
  offset = 0,
): number {
  let copied = 0;
  let skip = offset;
  for (const seg of chain.writable) {
    if (copied >= src.length) break;
    if (skip >= seg.len) {
      skip -= seg.len;
      continue;
    }
    const n = Math.min(seg.len - skip, src.length - copied);
    const g = (seg.gpa + skip) as Gpa;
    const part = n === src.length ? src : src.subarray(copied, copied + n);
    const r = mem.tryRegionFor(g, n);
    if (r !== null) {
      // Fast path: one region; LIFETIME: r.bytes is used at once and not kept.
      const log = mem.log;
      // A write that no log bit can cover does not happen (check throws before it).
      if (log !== null) log.check(g, n);
      r.bytes.set(part, g - r.gpa);
      // ORDERING: marked before the chain is pushed to the used ring, so the front-end's
      // log sync after the used index moves always sees this page.
      if (log !== null) log.mark(g, n);
    } else {
      mem.write(g, part);
    }
    copied += n;
    skip = 0;
  }
  return copied;
}
