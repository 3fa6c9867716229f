/**
 * The virtio device state, saved and loaded in layers as QEMU's `virtio_save` / `virtio_load`
 * do (QEMU hw/virtio/virtio.c, vmstate_virtio and its subsections; vhost-user "Migration"):
 * common device fields, transport fields, per-queue
 * fields (with the transport's per-queue fields), device fields, then subsections for optional
 * state. All integers big-endian (network byte order), as QEMU's stream.
 *
 * Layout (version 1):
 * - u8 version (1)
 * - common: u8 status, u32 features (low 32 bits), u16 number of queues, u32 config length,
 *   config bytes
 * - transport (vhost-user): u8 transport id (1), u64 negotiated protocol features
 * - per queue: u16 index, u16 size, u64 desc, u64 avail, u64 used (GPAs), u16 last avail index,
 *   u16 used index; transport per queue: u8 flags (bit 0 enabled)
 * - device: u16 virtio device id, u32 length, the device's own bytes (virtio-net: 6-byte MAC)
 * - subsections until a zero name length: u8 name length, name, u8 flags (bit 0: optional - a
 *   reader that does not know it may skip it; otherwise an unknown subsection fails the load, as
 *   QEMU does), u32 length, data. Sent only when needed:
 *   - `virtio/features64` (u32 high feature bits), when a feature bit above 31 is set;
 *   - `virtio/packed` (per queue: u16 last avail idx, u8 avail wrap, u16 used idx, u8 used
 *     wrap), when VIRTIO_F_RING_PACKED is negotiated.
 */
import { VirtioFeature, featureMask } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { packedRingSizes, splitRingSizes } from "../virtq/layout.js";

/** Format version written. */
export const VIRTIO_STATE_VERSION = 1;
/** Transport id of vhost-user. */
export const TRANSPORT_VHOST_USER = 1;
/** Subsection flag: a reader may skip it when it does not know it. */
export const SUBSECTION_OPTIONAL = 1;

/** One queue in the state. */
export interface VirtioQueueState {
  index: number;
  size: number;
  /** GPAs of the descriptor area, driver area (avail / driver event), device area */
  desc: number;
  avail: number;
  used: number;
  /** the device's next avail index (GET_VRING_BASE) */
  lastAvailIdx: number;
  /** the used index the device published */
  usedIdx: number;
  /** transport: the ring was enabled */
  enabled: boolean;
  /** packed only: wrap counters (subsection `virtio/packed`) */
  availWrap?: boolean;
  usedWrap?: boolean;
}

/** A subsection kept as bytes (unknown-but-optional ones are reported, not applied). */
export interface Subsection {
  name: string;
  optional: boolean;
  data: Uint8Array;
}

/** The whole state. */
export interface VirtioDeviceState {
  /** virtio status byte */
  status: number;
  /** driver-acked features (LOG_ALL excluded) */
  features: bigint;
  /** config space bytes (may be empty) */
  config: Uint8Array;
  /** transport: negotiated protocol features */
  protocolFeatures: bigint;
  queues: VirtioQueueState[];
  /** virtio device id */
  deviceId: number;
  /** device-specific bytes */
  device: Uint8Array;
  /** extra subsections to write (beyond features64 / packed), or read and not known */
  extraSubsections?: Subsection[];
  /** on load: names of optional subsections that were skipped */
  skipped?: string[];
}

/**
 * A virtio state that cannot be loaded, naming the field.
 */
export class VirtioStateError extends VhostUserError {
  /**
   * @param field the field (e.g. `queue[1].lastAvailIdx`)
   * @param value the offending value
   * @param message what is wrong
   */
  constructor(field: string, value: unknown, message: string) {
    super("ERR_VHOST_BAD_FIELD", message, {
      request: "virtio state",
      field,
      value,
      fatal: false,
    });
  }
}

class Writer {
  #parts: Buffer[] = [];
  u8(v: number): void {
    const b = Buffer.alloc(1);
    b.writeUInt8(v);
    this.#parts.push(b);
  }
  u16(v: number): void {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    this.#parts.push(b);
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(v >>> 0);
    this.#parts.push(b);
  }
  u64(v: bigint | number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(v));
    this.#parts.push(b);
  }
  bytes(v: Uint8Array): void {
    this.#parts.push(Buffer.from(v));
  }
  done(): Buffer {
    return Buffer.concat(this.#parts);
  }
}

class Reader {
  #b: Buffer;
  #o = 0;
  constructor(b: Uint8Array) {
    this.#b = Buffer.from(b.buffer, b.byteOffset, b.length);
  }
  #need(n: number, field: string): void {
    if (this.#o + n > this.#b.length) {
      throw new VirtioStateError(field, this.#b.length, `state truncated reading ${field}`);
    }
  }
  u8(f: string): number {
    this.#need(1, f);
    return this.#b.readUInt8(this.#o++);
  }
  u16(f: string): number {
    this.#need(2, f);
    const v = this.#b.readUInt16BE(this.#o);
    this.#o += 2;
    return v;
  }
  u32(f: string): number {
    this.#need(4, f);
    const v = this.#b.readUInt32BE(this.#o);
    this.#o += 4;
    return v;
  }
  u64(f: string): bigint {
    this.#need(8, f);
    const v = this.#b.readBigUInt64BE(this.#o);
    this.#o += 8;
    return v;
  }
  addr(f: string): number {
    const v = this.u64(f);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new VirtioStateError(f, v, "address above 2^53");
    }
    return Number(v);
  }
  bytes(n: number, f: string): Uint8Array {
    this.#need(n, f);
    const v = new Uint8Array(this.#b.subarray(this.#o, this.#o + n));
    this.#o += n;
    return v;
  }
  get left(): number {
    return this.#b.length - this.#o;
  }
}

const PACKED = featureMask(VirtioFeature.RING_PACKED);

/**
 * Serialise the state.
 * @param s the state
 * @returns the bytes
 */
export function encodeVirtioState(s: VirtioDeviceState): Buffer {
  const w = new Writer();
  w.u8(VIRTIO_STATE_VERSION);
  // common
  w.u8(s.status);
  w.u32(Number(s.features & 0xffff_ffffn));
  w.u16(s.queues.length);
  w.u32(s.config.length);
  w.bytes(s.config);
  // transport
  w.u8(TRANSPORT_VHOST_USER);
  w.u64(s.protocolFeatures);
  // queues
  for (const q of s.queues) {
    w.u16(q.index);
    w.u16(q.size);
    w.u64(q.desc);
    w.u64(q.avail);
    w.u64(q.used);
    w.u16(q.lastAvailIdx & 0xffff);
    w.u16(q.usedIdx & 0xffff);
    w.u8(q.enabled ? 1 : 0);
  }
  // device
  w.u16(s.deviceId);
  w.u32(s.device.length);
  w.bytes(s.device);
  // subsections
  const sub = (name: string, optional: boolean, data: Uint8Array): void => {
    const n = Buffer.from(name, "utf8");
    w.u8(n.length);
    w.bytes(n);
    w.u8(optional ? SUBSECTION_OPTIONAL : 0);
    w.u32(data.length);
    w.bytes(data);
  };
  const high = Number(s.features >> 32n);
  if (high !== 0) {
    const b = new Writer();
    b.u32(high);
    sub("virtio/features64", false, b.done());
  }
  if ((s.features & PACKED) !== 0n) {
    const b = new Writer();
    for (const q of s.queues) {
      b.u16(q.lastAvailIdx & 0x7fff);
      b.u8(q.availWrap === false ? 0 : 1);
      b.u16(q.usedIdx & 0x7fff);
      b.u8(q.usedWrap === false ? 0 : 1);
    }
    sub("virtio/packed", false, b.done());
  }
  for (const e of s.extraSubsections ?? []) sub(e.name, e.optional, e.data);
  w.u8(0);
  return w.done();
}

/**
 * Parse a state (no semantic checks: see {@link validateVirtioState}).
 * @param bytes the bytes
 * @returns the state; optional unknown subsections are listed in `skipped`
 * @throws VirtioStateError for a truncated state, an unknown version or transport, an unknown
 *   subsection that is not optional, or trailing bytes
 */
export function decodeVirtioState(bytes: Uint8Array): VirtioDeviceState {
  const r = new Reader(bytes);
  const version = r.u8("version");
  if (version !== VIRTIO_STATE_VERSION) {
    throw new VirtioStateError("version", version, `virtio state version ${version} unknown`);
  }
  const status = r.u8("status");
  let features = BigInt(r.u32("features"));
  const nq = r.u16("numQueues");
  const clen = r.u32("configLength");
  if (clen > 4096) throw new VirtioStateError("configLength", clen, "config space too large");
  const config = r.bytes(clen, "config");
  const transport = r.u8("transport");
  if (transport !== TRANSPORT_VHOST_USER) {
    throw new VirtioStateError("transport", transport, "unknown transport");
  }
  const protocolFeatures = r.u64("protocolFeatures");
  const queues: VirtioQueueState[] = [];
  for (let i = 0; i < nq; i++) {
    const f = `queue[${i}]`;
    queues.push({
      index: r.u16(`${f}.index`),
      size: r.u16(`${f}.size`),
      desc: r.addr(`${f}.desc`),
      avail: r.addr(`${f}.avail`),
      used: r.addr(`${f}.used`),
      lastAvailIdx: r.u16(`${f}.lastAvailIdx`),
      usedIdx: r.u16(`${f}.usedIdx`),
      enabled: (r.u8(`${f}.flags`) & 1) !== 0,
    });
  }
  const deviceId = r.u16("deviceId");
  const dlen = r.u32("deviceLength");
  const device = r.bytes(dlen, "device");
  const skipped: string[] = [];
  const extra: Subsection[] = [];
  let packed: Uint8Array | null = null;
  for (;;) {
    const nlen = r.u8("subsection.nameLength");
    if (nlen === 0) break;
    const name = Buffer.from(r.bytes(nlen, "subsection.name")).toString("utf8");
    const flags = r.u8(`subsection ${name}.flags`);
    const len = r.u32(`subsection ${name}.length`);
    const data = r.bytes(len, `subsection ${name}`);
    const optional = (flags & SUBSECTION_OPTIONAL) !== 0;
    if (name === "virtio/features64") {
      if (len !== 4) throw new VirtioStateError(`subsection ${name}.length`, len, "must be 4");
      features |= BigInt(Buffer.from(data).readUInt32BE(0)) << 32n;
    } else if (name === "virtio/packed") {
      if (len !== nq * 6)
        throw new VirtioStateError(`subsection ${name}.length`, len, `must be ${nq * 6}`);
      packed = data;
    } else if (optional) {
      skipped.push(name);
      extra.push({ name, optional, data });
    } else {
      throw new VirtioStateError("subsection", name, "unknown subsection that is not optional");
    }
  }
  if (r.left !== 0) throw new VirtioStateError("trailing", r.left, "bytes after the end marker");
  if ((features & PACKED) !== 0n) {
    if (packed === null) {
      throw new VirtioStateError(
        "subsection",
        "virtio/packed",
        "RING_PACKED set but the subsection is missing",
      );
    }
    const b = Buffer.from(packed);
    queues.forEach((q, i) => {
      q.lastAvailIdx = b.readUInt16BE(i * 6);
      q.availWrap = b.readUInt8(i * 6 + 2) !== 0;
      q.usedIdx = b.readUInt16BE(i * 6 + 3);
      q.usedWrap = b.readUInt8(i * 6 + 5) !== 0;
    });
  }
  return {
    status,
    features,
    config,
    protocolFeatures,
    queues,
    deviceId,
    device,
    extraSubsections: extra,
    skipped,
  };
}

/** What the destination checks a state against. */
export interface ValidateContext {
  /** features the destination back-end offers */
  offeredFeatures: bigint;
  /** largest queue count the destination accepts (default: no limit) */
  maxQueues?: number;
  /** the destination's guest memory (pages already loaded) */
  memory: GuestMemory;
}

/**
 * Check a state before anything is applied (as `virtio_load`'s sanity checks): features
 * against what the destination back-end offers, queue sizes, ring addresses inside guest
 * memory, `avail idx - last avail idx <= size` (the avail index read from guest memory).
 * @param s the decoded state
 * @param ctx the destination's offer and memory
 * @throws VirtioStateError naming the first field that fails
 */
export function validateVirtioState(s: VirtioDeviceState, ctx: ValidateContext): void {
  const missing = s.features & ~ctx.offeredFeatures;
  if (missing !== 0n) {
    throw new VirtioStateError(
      "features",
      `0x${missing.toString(16)}`,
      "features acked on the source are not offered by the destination back-end",
    );
  }
  if (ctx.maxQueues !== undefined && s.queues.length > ctx.maxQueues) {
    throw new VirtioStateError("numQueues", s.queues.length, `more than ${ctx.maxQueues} queues`);
  }
  const packed = (s.features & PACKED) !== 0n;
  const seen = new Set<number>();
  s.queues.forEach((q, i) => {
    const f = `queue[${i}]`;
    if (seen.has(q.index))
      throw new VirtioStateError(`${f}.index`, q.index, "duplicate queue index");
    seen.add(q.index);
    if (q.size === 0 || q.size > 32768 || (!packed && (q.size & (q.size - 1)) !== 0)) {
      throw new VirtioStateError(`${f}.size`, q.size, "invalid queue size");
    }
    const sz = packed
      ? (() => {
          const p = packedRingSizes(q.size);
          return { desc: p.desc, avail: p.driverEvent, used: p.deviceEvent };
        })()
      : splitRingSizes(q.size);
    for (const [part, at, len] of [
      ["desc", q.desc, sz.desc],
      ["avail", q.avail, sz.avail],
      ["used", q.used, sz.used],
    ] as const) {
      if (ctx.memory.tryRegionFor(at, len) === null) {
        throw new VirtioStateError(
          `${f}.${part}`,
          `0x${at.toString(16)}+${len}`,
          "ring outside guest memory",
        );
      }
    }
    if (!packed) {
      const r = ctx.memory.tryRegionFor(q.avail, 4);
      // ORDERING: plain read of the driver's avail idx from guest memory. The rings are stopped
      // (GET_VRING_BASE on the source, not yet started here) and the pages were applied by this
      // thread, so no other writer can race it; it is only a sanity bound, as QEMU's
      // virtio_load check of "avail idx - last avail idx <= queue size".
      const availIdx = r === null ? 0 : r.view.getUint16(q.avail - r.gpa + 2, true);
      const pending = (availIdx - q.lastAvailIdx) & 0xffff;
      if (pending > q.size) {
        throw new VirtioStateError(
          `${f}.lastAvailIdx`,
          `${q.lastAvailIdx} (avail idx ${availIdx}, size ${q.size})`,
          "avail idx - last avail idx exceeds the queue size",
        );
      }
      const inUse = (q.lastAvailIdx - q.usedIdx) & 0xffff;
      if (inUse > q.size) {
        throw new VirtioStateError(
          `${f}.usedIdx`,
          q.usedIdx,
          "last avail idx - used idx exceeds the queue size",
        );
      }
    } else if (
      q.lastAvailIdx > 0x7fff ||
      q.usedIdx > 0x7fff ||
      q.lastAvailIdx >= q.size ||
      q.usedIdx >= q.size
    ) {
      throw new VirtioStateError(
        `${f}.lastAvailIdx`,
        q.lastAvailIdx,
        "packed ring index outside the ring",
      );
    }
  });
}
