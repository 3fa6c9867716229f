/**
 * The virtio device state, saved and loaded in the layers and the order of seed 001 (QEMU
 * docs/virtio-migration.txt; hw/virtio/virtio.c `virtio_save` / `virtio_load`): the transport's
 * device fields (save_config), the common device fields, the common virtqueue fields, the
 * transport's per-queue fields (save_queue), the device's own fields (save_device), then
 * subsections for optional state; the load reads in the same order, then runs the sanitize
 * steps ({@link validateVirtioState}). All integers big-endian (network byte order), as QEMU's
 * stream.
 *
 * Layout (version 2):
 * - u8 version (2)
 * - transport (vhost-user): u8 transport id (1), u64 negotiated protocol features
 * - common device fields: u8 status, u32 features (low 32 bits), u32 config length, config
 *   bytes, u16 number of queues
 * - common virtqueue fields, per queue: u16 index, u16 size, u64 desc (GPA), u16 last avail
 *   index, u16 used index
 * - transport per-queue fields, per queue: u8 flags (bit 0: enabled)
 * - device: u16 virtio device id, u32 length, the device's own bytes (virtio-net: 6-byte MAC)
 * - subsections until a zero name length: u8 name length, name, u8 flags (bit 0: optional - a
 *   reader that does not know it may skip it; otherwise an unknown subsection fails the load, as
 *   QEMU does), u32 length, data. Sent only when needed, in this order:
 *   - `virtio/device_endian` (u8: 1 little, 2 big), when the device is not little-endian;
 *   - `virtio/64bit_features` (u32 high feature bits), when a feature bit above 31 is set;
 *   - `virtio/virtqueues` (per queue: u64 avail, u64 used GPAs), when VERSION_1 is set;
 *   - `virtio/legacy_rings` (the same), without VERSION_1 when a ring is not at the legacy
 *     layout (avail after the descriptors, used on the next 4 KiB boundary);
 *   - `virtio/packed_virtqueues` (per queue: u16 last avail idx, u8 avail wrap, u16 used idx,
 *     u8 used wrap), when VIRTIO_F_RING_PACKED is negotiated.
 */
import { VirtioFeature, featureMask } from "../protocol/constants.js";
import { VhostUserError } from "../protocol/errors.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { packedRingSizes, splitRingSizes } from "../virtq/layout.js";

/** Format version written (and the only one read). */
export const VIRTIO_STATE_VERSION = 2;
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
  /** the device's endianness (legacy devices only may be big-endian; default little) */
  deviceEndian?: "little" | "big";
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
const VERSION_1 = featureMask(VirtioFeature.VERSION_1);
const ENDIAN_LITTLE = 1;
const ENDIAN_BIG = 2;

/** Subsection names, in the order they are written (QEMU's vmstate_virtio subsections). */
export const VIRTIO_SUBSECTIONS = Object.freeze({
  deviceEndian: "virtio/device_endian",
  features64: "virtio/64bit_features",
  virtqueues: "virtio/virtqueues",
  legacyRings: "virtio/legacy_rings",
  packed: "virtio/packed_virtqueues",
});

/**
 * Where a legacy (pre-VERSION_1) split ring puts its avail and used rings after the
 * descriptors (VIRTIO 1.2 §2.7.2 legacy interfaces: 4 KiB alignment).
 * @param desc the descriptor table's GPA
 * @param size the queue size
 * @returns the avail and used GPAs
 */
export function legacyRingLayout(desc: number, size: number): { avail: number; used: number } {
  const avail = desc + 16 * size;
  const used = Math.ceil((avail + 6 + 2 * size) / 4096) * 4096;
  return { avail, used };
}

/**
 * Serialise the state in seed 001's save order.
 * @param s the state
 * @returns the bytes
 */
export function encodeVirtioState(s: VirtioDeviceState): Buffer {
  const w = new Writer();
  w.u8(VIRTIO_STATE_VERSION);
  // transport: save_config
  w.u8(TRANSPORT_VHOST_USER);
  w.u64(s.protocolFeatures);
  // common device fields
  w.u8(s.status);
  w.u32(Number(s.features & 0xffff_ffffn));
  w.u32(s.config.length);
  w.bytes(s.config);
  w.u16(s.queues.length);
  // common virtqueue fields
  for (const q of s.queues) {
    w.u16(q.index);
    w.u16(q.size);
    w.u64(q.desc);
    w.u16(q.lastAvailIdx & 0xffff);
    w.u16(q.usedIdx & 0xffff);
  }
  // transport per-queue fields: save_queue
  for (const q of s.queues) w.u8(q.enabled ? 1 : 0);
  // device fields: save_device
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
  if ((s.deviceEndian ?? "little") !== "little") {
    sub(VIRTIO_SUBSECTIONS.deviceEndian, false, Uint8Array.of(ENDIAN_BIG));
  }
  const high = Number(s.features >> 32n);
  if (high !== 0) {
    const b = new Writer();
    b.u32(high);
    sub(VIRTIO_SUBSECTIONS.features64, false, b.done());
  }
  const rings = (): Buffer => {
    const b = new Writer();
    for (const q of s.queues) {
      b.u64(q.avail);
      b.u64(q.used);
    }
    return b.done();
  };
  if ((s.features & VERSION_1) !== 0n) sub(VIRTIO_SUBSECTIONS.virtqueues, false, rings());
  else if (
    s.queues.some((q) => {
      const l = legacyRingLayout(q.desc, q.size);
      return l.avail !== q.avail || l.used !== q.used;
    })
  ) {
    sub(VIRTIO_SUBSECTIONS.legacyRings, false, rings());
  }
  if ((s.features & PACKED) !== 0n) {
    const b = new Writer();
    for (const q of s.queues) {
      b.u16(q.lastAvailIdx & 0x7fff);
      b.u8(q.availWrap === false ? 0 : 1);
      b.u16(q.usedIdx & 0x7fff);
      b.u8(q.usedWrap === false ? 0 : 1);
    }
    sub(VIRTIO_SUBSECTIONS.packed, false, b.done());
  }
  for (const e of s.extraSubsections ?? []) sub(e.name, e.optional, e.data);
  w.u8(0);
  return w.done();
}

/**
 * Parse a state in seed 001's load order (no semantic checks: the sanitize steps are
 * {@link validateVirtioState}).
 * @param bytes the bytes
 * @returns the state; optional unknown subsections are listed in `skipped`
 * @throws VirtioStateError naming the field for a truncated state, an unknown version or
 *   transport, a subsection of the wrong size or missing, an unknown subsection that is not
 *   optional, or trailing bytes
 */
export function decodeVirtioState(bytes: Uint8Array): VirtioDeviceState {
  const r = new Reader(bytes);
  const version = r.u8("version");
  if (version !== VIRTIO_STATE_VERSION) {
    throw new VirtioStateError(
      "version",
      version,
      `virtio state version ${version} unknown (this side reads ${VIRTIO_STATE_VERSION})`,
    );
  }
  // transport: load_config
  const transport = r.u8("transport");
  if (transport !== TRANSPORT_VHOST_USER) {
    throw new VirtioStateError("transport", transport, "unknown transport");
  }
  const protocolFeatures = r.u64("protocolFeatures");
  // common device fields
  const status = r.u8("status");
  let features = BigInt(r.u32("features"));
  const clen = r.u32("configLength");
  if (clen > 4096) throw new VirtioStateError("configLength", clen, "config space too large");
  const config = r.bytes(clen, "config");
  const nq = r.u16("numQueues");
  // common virtqueue fields
  const queues: VirtioQueueState[] = [];
  for (let i = 0; i < nq; i++) {
    const f = `queue[${i}]`;
    const index = r.u16(`${f}.index`);
    const size = r.u16(`${f}.size`);
    const desc = r.addr(`${f}.desc`);
    const lastAvailIdx = r.u16(`${f}.lastAvailIdx`);
    const usedIdx = r.u16(`${f}.usedIdx`);
    const legacy = legacyRingLayout(desc, size);
    queues.push({
      index,
      size,
      desc,
      avail: legacy.avail,
      used: legacy.used,
      lastAvailIdx,
      usedIdx,
      enabled: true,
    });
  }
  // transport per-queue fields: load_queue
  queues.forEach((q, i) => {
    q.enabled = (r.u8(`queue[${i}].flags`) & 1) !== 0;
  });
  // device fields: load_device
  const deviceId = r.u16("deviceId");
  const dlen = r.u32("deviceLength");
  const device = r.bytes(dlen, "device");
  // subsections
  const skipped: string[] = [];
  const extra: Subsection[] = [];
  let deviceEndian: "little" | "big" = "little";
  let rings: { data: Uint8Array; name: string } | null = null;
  let packed: Uint8Array | null = null;
  const sized = (name: string, data: Uint8Array, want: number): Uint8Array => {
    if (data.length !== want) {
      throw new VirtioStateError(`subsection ${name}.length`, data.length, `must be ${want}`);
    }
    return data;
  };
  for (;;) {
    const nlen = r.u8("subsection.nameLength");
    if (nlen === 0) break;
    const name = Buffer.from(r.bytes(nlen, "subsection.name")).toString("utf8");
    const flags = r.u8(`subsection ${name}.flags`);
    const len = r.u32(`subsection ${name}.length`);
    const data = r.bytes(len, `subsection ${name}`);
    const optional = (flags & SUBSECTION_OPTIONAL) !== 0;
    if (name === VIRTIO_SUBSECTIONS.deviceEndian) {
      const e = (sized(name, data, 1)[0] as number) ?? 0;
      if (e !== ENDIAN_LITTLE && e !== ENDIAN_BIG) {
        throw new VirtioStateError("deviceEndian", e, "device endianness is 1 (little) or 2 (big)");
      }
      deviceEndian = e === ENDIAN_BIG ? "big" : "little";
    } else if (name === VIRTIO_SUBSECTIONS.features64) {
      features |= BigInt(Buffer.from(sized(name, data, 4)).readUInt32BE(0)) << 32n;
    } else if (name === VIRTIO_SUBSECTIONS.virtqueues || name === VIRTIO_SUBSECTIONS.legacyRings) {
      rings = { data: sized(name, data, nq * 16), name };
    } else if (name === VIRTIO_SUBSECTIONS.packed) {
      packed = sized(name, data, nq * 6);
    } else if (optional) {
      skipped.push(name);
      extra.push({ name, optional, data });
    } else {
      throw new VirtioStateError("subsection", name, "unknown subsection that is not optional");
    }
  }
  if (r.left !== 0) throw new VirtioStateError("trailing", r.left, "bytes after the end marker");
  // Post-load: what the subsections carry, now that the features are whole.
  if ((features & VERSION_1) !== 0n && rings?.name !== VIRTIO_SUBSECTIONS.virtqueues) {
    throw new VirtioStateError(
      "subsection",
      VIRTIO_SUBSECTIONS.virtqueues,
      "VERSION_1 set but the subsection is missing",
    );
  }
  if (rings !== null) {
    const b = Buffer.from(rings.data);
    queues.forEach((q, i) => {
      const f = `queue[${i}]`;
      for (const [part, at] of [
        ["avail", i * 16],
        ["used", i * 16 + 8],
      ] as const) {
        const v = b.readBigUInt64BE(at);
        if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
          throw new VirtioStateError(`${f}.${part}`, v, "address above 2^53");
        }
        q[part] = Number(v);
      }
    });
  }
  if ((features & PACKED) !== 0n) {
    if (packed === null) {
      throw new VirtioStateError(
        "subsection",
        VIRTIO_SUBSECTIONS.packed,
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
    deviceEndian,
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
  /**
   * the destination back-end serves a device of the other endianness (CROSS_ENDIAN
   * negotiated); without it a big-endian legacy device is refused (default false)
   */
  crossEndian?: boolean;
}

/** Read a u16 of a ring from guest memory (null when outside it). */
function ringU16(memory: GuestMemory, gpa: number, little: boolean): number | null {
  const r = memory.tryRegionFor(gpa, 2);
  // ORDERING: plain read from guest memory. The rings are stopped (GET_VRING_BASE on the
  // source, not yet started here) and the pages were applied by this thread, so no other
  // writer can race it.
  return r === null ? null : r.view.getUint16(gpa - r.gpa, little);
}

/**
 * The sanitize steps after a load (seed 001: "sanitize endianness, sanitize features,
 * virtqueue index sanity check"), run before anything is applied, in this order:
 * 1. endianness: a VERSION_1 device is little-endian; a big-endian legacy device needs a
 *    back-end that serves the other endianness (`crossEndian`);
 * 2. features: every feature acked on the source is offered by the destination back-end;
 * 3. each queue: size, ring addresses inside guest memory, and (split rings) the indices
 *    against the rings in guest memory: `avail idx - last avail idx <= size`, the used index
 *    read from guest memory equal to the state's, `last avail idx - used idx <= size` (QEMU's
 *    "VQ %d size 0x%x < last_avail_idx 0x%x - used_idx 0x%x"); packed rings: positions inside
 *    the ring;
 * 4. queue count and every queue index within the count the destination back-end supports.
 * @param s the decoded state
 * @param ctx the destination's offer and memory
 * @throws VirtioStateError naming the first field that fails, with the values compared
 */
export function validateVirtioState(s: VirtioDeviceState, ctx: ValidateContext): void {
  // 1. endianness
  const little = (s.deviceEndian ?? "little") === "little";
  if (!little && (s.features & VERSION_1) !== 0n) {
    throw new VirtioStateError(
      "deviceEndian",
      "big (VERSION_1 negotiated)",
      "a virtio 1 device is little-endian",
    );
  }
  if (!little && ctx.crossEndian !== true) {
    throw new VirtioStateError(
      "deviceEndian",
      "big (back-end without CROSS_ENDIAN)",
      "the destination back-end serves little-endian devices only",
    );
  }
  // 2. features
  const missing = s.features & ~ctx.offeredFeatures;
  if (missing !== 0n) {
    throw new VirtioStateError(
      "features",
      `0x${missing.toString(16)} (acked 0x${s.features.toString(16)}, offered ` +
        `0x${ctx.offeredFeatures.toString(16)})`,
      "features acked on the source are not offered by the destination back-end",
    );
  }
  // 3. each queue
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
      const availIdx = ringU16(ctx.memory, q.avail + 2, little) ?? 0;
      const pending = (availIdx - q.lastAvailIdx) & 0xffff;
      if (pending > q.size) {
        throw new VirtioStateError(
          `${f}.lastAvailIdx`,
          `${q.lastAvailIdx} (avail idx ${availIdx}, size ${q.size})`,
          "avail idx - last avail idx exceeds the queue size",
        );
      }
      const usedIdx = ringU16(ctx.memory, q.used + 2, little) ?? 0;
      if (usedIdx !== q.usedIdx) {
        throw new VirtioStateError(
          `${f}.usedIdx`,
          `${q.usedIdx} (used idx in guest memory ${usedIdx})`,
          "the state's used idx differs from the ring's in guest memory",
        );
      }
      const inUse = (q.lastAvailIdx - usedIdx) & 0xffff;
      if (inUse > q.size) {
        throw new VirtioStateError(
          `${f}.usedIdx`,
          `${usedIdx} (last avail idx ${q.lastAvailIdx}, size ${q.size})`,
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
        `${q.lastAvailIdx} (used idx ${q.usedIdx}, size ${q.size})`,
        "packed ring index outside the ring",
      );
    }
  });
  // 4. queue indices within the queue count
  if (ctx.maxQueues !== undefined) {
    const max = ctx.maxQueues;
    if (s.queues.length > max) {
      throw new VirtioStateError(
        "numQueues",
        `${s.queues.length} (at most ${max})`,
        "too many queues",
      );
    }
    s.queues.forEach((q, i) => {
      if (q.index >= max) {
        throw new VirtioStateError(
          `queue[${i}].index`,
          `${q.index} (queue count ${max})`,
          "queue index beyond the destination back-end's queue count",
        );
      }
    });
  }
}
