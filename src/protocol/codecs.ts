/**
 * One pure decoder and encoder per vhost-user payload (vhost-user: "Message specification",
 * payload layouts). All fields are little-endian and read through `DataView`; u64 fields are
 * `bigint`, u32/u16/u8 fields are `number`.
 *
 * Decoders check the payload size and every field whose encoding is constrained (reserved bits,
 * counts); they throw {@link VhostUserError} naming the request, the field and the value.
 * Encoders check the value ranges of what they are given and always produce the exact wire form.
 *
 * Decisions where the spec or implementations leave room:
 * - SET_MEM_TABLE: `nregions` must be 1..8 (QEMU never sends 0; an empty table is refused).
 *   The payload may be exactly `8 + 32 * nregions` bytes (what QEMU, DPDK and rust-vmm send) or
 *   longer, up to the full 264-byte C struct, if the extra bytes are whole zero regions.
 * - Padding fields (memory table, single region, inflight, IOTLB) are ignored when decoding and
 *   written as zero.
 * - SET_DEVICE_STATE_FD parameters decode unknown directions and phases as plain numbers, so the
 *   back-end can refuse them with a named error ({@link checkDeviceStateParams}).
 * - Config-space `flags` are kept as a number: QEMU uses an enum (0 front-end, 1 migration),
 *   rust-vmm bit flags.
 * - Xen memory regions (40 bytes, XEN_MMAP) are not supported.
 */
import {
  DeviceStateDirection,
  DeviceStatePhase,
  IotlbPerm,
  IotlbType,
  MAX_CONFIG_SIZE,
  MAX_MEM_REGIONS,
  MAX_PAYLOAD_SIZE,
  VRING_F_LOG,
  VRING_INDEX_MASK,
  VRING_NOFD_FLAG,
} from "./constants.js";
import { VhostUserError } from "./errors.js";

/** Inclusive size bounds of a payload. */
export interface SizeRange {
  readonly min: number;
  readonly max: number;
}

/** A payload codec: its name, size bounds and a pure decode/encode pair. */
export interface Codec<T> {
  /** payload name as in the spec, e.g. `"vring state"` */
  readonly name: string;
  /** inclusive size bounds; the framing layer checks them before reading the body */
  readonly size: SizeRange;
  /**
   * Decode a payload.
   * @param bytes exactly the payload bytes (the framing layer passes `size` bytes)
   * @param request request name for error messages
   * @returns the decoded value
   * @throws VhostUserError on a bad size or field
   */
  decode(bytes: Uint8Array, request: string): T;
  /**
   * Encode a payload.
   * @param value the value
   * @param request request name for error messages
   * @returns the wire bytes
   * @throws VhostUserError when a field is out of range
   */
  encode(value: T, request: string): Uint8Array;
}

/** `VhostUserVringState`: a queue index and a number (size, base, enable, endianness). */
export interface VringState {
  /** queue index (u32) */
  index: number;
  /** the value (u32) */
  num: number;
}

/** Split-ring base (SET/GET_VRING_BASE `num`): the free-running next avail index. */
export interface SplitVringBase {
  /** next avail index to process, bits 0-15 */
  availIdx: number;
}

/** Packed-ring base (SET/GET_VRING_BASE `num`): both indices and both wrap counters. */
export interface PackedVringBase {
  /** next avail index, bits 0-14 */
  availIdx: number;
  /** avail wrap counter, bit 15 */
  availWrap: boolean;
  /** next used index, bits 16-30 */
  usedIdx: number;
  /** used wrap counter, bit 31 */
  usedWrap: boolean;
}

/** `VhostUserVringAddr`: ring addresses in the front-end's address space. */
export interface VringAddr {
  /** queue index (u32) */
  index: number;
  /** bit 0 = VRING_F_LOG; other bits are rejected */
  flags: number;
  /** descriptor table, front-end virtual address (or IOVA with ACCESS_PLATFORM) */
  descUserAddr: bigint;
  /** used ring, front-end virtual address */
  usedUserAddr: bigint;
  /** avail ring, front-end virtual address */
  availUserAddr: bigint;
  /** guest-physical address of the used ring, for dirty logging */
  logGuestAddr: bigint;
}

/** `VhostUserMemoryRegion`. */
export interface MemoryRegion {
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
  mmapOffset: bigint;
}

/** `VhostUserMemory` (SET_MEM_TABLE): 1..8 regions, one fd each, in the same order. */
export interface MemoryTable {
  regions: MemoryRegion[];
}

/** `VhostUserLog` (SET_LOG_BASE): where the dirty log lies in the attached fd. */
export interface LogDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
}

/** `VhostUserInflight` (GET/SET_INFLIGHT_FD). */
export interface InflightDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
  /** u16 */
  numQueues: number;
  /** u16 */
  queueSize: number;
}

/** `vhost_iotlb_msg` as vhost-user carries it (32 bytes with padding). */
export interface IotlbMsg {
  iova: bigint;
  size: bigint;
  uaddr: bigint;
  /** {@link IotlbPerm} */
  perm: number;
  /** {@link IotlbType} */
  type: number;
}

/** `VhostUserConfig` (GET/SET_CONFIG). */
export interface ConfigSpace {
  /** offset into the config space (u32) */
  offset: number;
  /** payload length (u32, at most 256); must equal `payload.length` */
  size: number;
  /** {@link ConfigFlags} (u32) */
  flags: number;
  payload: Uint8Array;
}

/** `VhostUserVringArea` (BACKEND_VRING_HOST_NOTIFIER_MSG). */
export interface VringArea {
  /** queue index, bits 0-7 of the first u64 */
  index: number;
  /** bit 8 of the first u64: no fd attached (unregister the notifier) */
  noFd: boolean;
  size: bigint;
  offset: bigint;
}

/** `VhostUserShared`: a 16-byte UUID (first three components big-endian, i.e. canonical). */
export interface SharedObject {
  uuid: Uint8Array;
}

/** Device-state transfer parameters (SET_DEVICE_STATE_FD). Unknown values decode as numbers. */
export interface DeviceStateParams {
  /** {@link DeviceStateDirection} (u32) */
  direction: number;
  /** {@link DeviceStatePhase} (u32) */
  phase: number;
}

/** SET_DEVICE_STATE_FD reply u64: result code and whether the back-end sends its own fd. */
export interface DeviceStateReply {
  /** bits 0-7: 0 = success */
  result: number;
  /** bit 8: no fd attached (the front-end keeps its own channel) */
  noFd: boolean;
}

/** SET_VRING_KICK/CALL/ERR u64: queue index and the no-fd flag. */
export interface VringFd {
  /** bits 0-7 */
  index: number;
  /** bit 8: no fd attached (poll instead) */
  noFd: boolean;
}

/** SEND_RARP u64: the first 6 bytes are the guest MAC. */
export interface RarpPayload {
  mac: Uint8Array;
}

/**
 * SET_LOG_BASE reply: the body is unspecified. DPDK sends nothing, libvhost-user and passt a
 * u64, rust-vmm echoes the 16-byte log description; every size up to the cap is accepted.
 */
export interface LogBaseReply {
  /** set when the reply was 8 bytes */
  value: bigint | null;
  /** set when the reply was 16 bytes */
  log: LogDescription | null;
}

/**
 * GET_SHARED_OBJECT reply: the dmabuf fd travels as ancillary data; libvhost-user echoes the
 * 16-byte request, others send a u64 or nothing.
 */
export interface SharedObjectReply {
  /** set when the reply was 8 bytes */
  value: bigint | null;
  /** set when the reply was 16 bytes */
  uuid: Uint8Array | null;
}

const U64_MAX = (1n << 64n) - 1n;

function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function expectSize(bytes: Uint8Array, size: number, request: string, what: string): void {
  if (bytes.length !== size) {
    throw new VhostUserError(
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
      `${what} payload must be ${size} bytes`,
      {
        request,
        field: "size",
        value: bytes.length,
        fatal: false,
      },
    );
  }
}

function badField(request: string, what: string, field: string, value: unknown): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, { request, field, value });
}

function checkU64(value: bigint, request: string, field: string): bigint {
  if (typeof value !== "bigint" || value < 0n || value > U64_MAX) {
    throw badField(request, "not a u64", field, value);
  }
  return value;
}

function checkUint(value: number, bits: number, request: string, field: string): number {
  if (!Number.isInteger(value) || value < 0 || value >= 2 ** bits) {
    throw badField(request, `not a u${bits}`, field, value);
  }
  return value;
}

/** The u64 payload. */
export const u64Codec: Codec<bigint> = {
  name: "u64",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "u64");
    return view(bytes).getBigUint64(0, true);
  },
  encode(value, request) {
    const out = new Uint8Array(8);
    view(out).setBigUint64(0, checkU64(value, request, "u64"), true);
    return out;
  },
};

/** The empty payload; decodes to `null`. */
export const emptyCodec: Codec<null> = {
  name: "empty",
  size: { min: 0, max: 0 },
  decode(bytes, request) {
    expectSize(bytes, 0, request, "empty");
    return null;
  },
  encode(value, request) {
    if (value !== null) throw badField(request, "payload must be null", "payload", value);
    return new Uint8Array(0);
  },
};

/** `VhostUserVringState` (8 bytes): index u32 @0, num u32 @4. */
export const vringStateCodec: Codec<VringState> = {
  name: "vring state",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "vring state");
    const dv = view(bytes);
    return { index: dv.getUint32(0, true), num: dv.getUint32(4, true) };
  },
  encode(value, request) {
    const out = new Uint8Array(8);
    const dv = view(out);
    dv.setUint32(0, checkUint(value.index, 32, request, "index"), true);
    dv.setUint32(4, checkUint(value.num, 32, request, "num"), true);
    return out;
  },
};

/**
 * Decode the split-ring form of a vring base (vhost-user: "Vring base"; bits 16-31 reserved).
 * @param num the `num` of a {@link VringState}
 * @param request request name for error messages
 * @returns the next avail index
 * @throws VhostUserError ERR_VHOST_BAD_FIELD when a reserved bit is set
 */
export function decodeSplitVringBase(num: number, request = "SET_VRING_BASE"): SplitVringBase {
  checkUint(num, 32, request, "num");
  if (num > 0xffff)
    throw badField(request, "reserved bits 16-31 of a split vring base set", "num", num);
  return { availIdx: num };
}

/**
 * Encode the split-ring form of a vring base.
 * @param base the next avail index (0..0xffff)
 * @param request request name for error messages
 * @returns the `num` value
 * @throws VhostUserError ERR_VHOST_BAD_FIELD when the index does not fit 16 bits
 */
export function encodeSplitVringBase(base: SplitVringBase, request = "SET_VRING_BASE"): number {
  return checkUint(base.availIdx, 16, request, "availIdx");
}

/**
 * Decode the packed-ring form of a vring base (vhost-user: "Vring base", packed layout:
 * bits 0-14 avail index, 15 avail wrap, 16-30 used index, 31 used wrap).
 * @param num the `num` of a {@link VringState}
 * @param request request name for error messages
 * @returns both indices and wrap counters
 */
export function decodePackedVringBase(num: number, request = "SET_VRING_BASE"): PackedVringBase {
  checkUint(num, 32, request, "num");
  return {
    availIdx: num & 0x7fff,
    availWrap: (num & 0x8000) !== 0,
    usedIdx: (num >>> 16) & 0x7fff,
    usedWrap: (num & 0x80000000) !== 0,
  };
}

/**
 * Encode the packed-ring form of a vring base.
 * @param base both indices (15 bits each) and wrap counters
 * @param request request name for error messages
 * @returns the `num` value
 * @throws VhostUserError ERR_VHOST_BAD_FIELD when an index does not fit 15 bits
 */
export function encodePackedVringBase(base: PackedVringBase, request = "SET_VRING_BASE"): number {
  const avail = checkUint(base.availIdx, 15, request, "availIdx");
  const used = checkUint(base.usedIdx, 15, request, "usedIdx");
  return (
    (avail | (base.availWrap ? 0x8000 : 0) | (used << 16) | (base.usedWrap ? 0x80000000 : 0)) >>> 0
  );
}

/** `VhostUserVringAddr` (40 bytes). */
export const vringAddrCodec: Codec<VringAddr> = {
  name: "vring address",
  size: { min: 40, max: 40 },
  decode(bytes, request) {
    expectSize(bytes, 40, request, "vring address");
    const dv = view(bytes);
    const flags = dv.getUint32(4, true);
    if ((flags & ~VRING_F_LOG) !== 0) {
      throw badField(request, "unknown vring address flag", "flags", flags);
    }
    return {
      index: dv.getUint32(0, true),
      flags,
      descUserAddr: dv.getBigUint64(8, true),
      usedUserAddr: dv.getBigUint64(16, true),
      availUserAddr: dv.getBigUint64(24, true),
      logGuestAddr: dv.getBigUint64(32, true),
    };
  },
  encode(value, request) {
    const out = new Uint8Array(40);
    const dv = view(out);
    checkUint(value.flags, 32, request, "flags");
    if ((value.flags & ~VRING_F_LOG) !== 0) {
      throw badField(request, "unknown vring address flag", "flags", value.flags);
    }
    dv.setUint32(0, checkUint(value.index, 32, request, "index"), true);
    dv.setUint32(4, value.flags, true);
    dv.setBigUint64(8, checkU64(value.descUserAddr, request, "descUserAddr"), true);
    dv.setBigUint64(16, checkU64(value.usedUserAddr, request, "usedUserAddr"), true);
    dv.setBigUint64(24, checkU64(value.availUserAddr, request, "availUserAddr"), true);
    dv.setBigUint64(32, checkU64(value.logGuestAddr, request, "logGuestAddr"), true);
    return out;
  },
};

/** Size of one `VhostUserMemoryRegion`. */
export const MEMORY_REGION_SIZE = 32;

function readRegion(dv: DataView, at: number): MemoryRegion {
  return {
    guestPhysAddr: dv.getBigUint64(at, true),
    memorySize: dv.getBigUint64(at + 8, true),
    userspaceAddr: dv.getBigUint64(at + 16, true),
    mmapOffset: dv.getBigUint64(at + 24, true),
  };
}

function writeRegion(dv: DataView, at: number, r: MemoryRegion, request: string, i: number): void {
  dv.setBigUint64(at, checkU64(r.guestPhysAddr, request, `regions[${i}].guestPhysAddr`), true);
  dv.setBigUint64(at + 8, checkU64(r.memorySize, request, `regions[${i}].memorySize`), true);
  dv.setBigUint64(at + 16, checkU64(r.userspaceAddr, request, `regions[${i}].userspaceAddr`), true);
  dv.setBigUint64(at + 24, checkU64(r.mmapOffset, request, `regions[${i}].mmapOffset`), true);
}

/**
 * `VhostUserMemory` (SET_MEM_TABLE, and its postcopy reply): nregions u32 @0, padding u32 @4,
 * regions @8. See the module comment for the accepted sizes.
 */
export const memoryTableCodec: Codec<MemoryTable> = {
  name: "memory table",
  size: { min: 8 + MEMORY_REGION_SIZE, max: 8 + MEMORY_REGION_SIZE * MAX_MEM_REGIONS },
  decode(bytes, request) {
    if (bytes.length < 8) expectSize(bytes, 8 + MEMORY_REGION_SIZE, request, "memory table");
    const dv = view(bytes);
    const n = dv.getUint32(0, true);
    if (n === 0 || n > MAX_MEM_REGIONS) {
      throw badField(
        request,
        `memory table must hold 1..${MAX_MEM_REGIONS} regions`,
        "nregions",
        n,
      );
    }
    const expected = 8 + n * MEMORY_REGION_SIZE;
    const extra = bytes.length - expected;
    if (
      extra < 0 ||
      extra % MEMORY_REGION_SIZE !== 0 ||
      bytes.length > 8 + MAX_MEM_REGIONS * MEMORY_REGION_SIZE
    ) {
      throw new VhostUserError(
        "ERR_VHOST_BAD_PAYLOAD_SIZE",
        `memory table size does not match nregions=${n} (expected ${expected})`,
        { request, field: "size", value: bytes.length, fatal: false },
      );
    }
    for (let i = expected; i < bytes.length; i++) {
      if (bytes[i] !== 0) {
        throw badField(request, "non-zero bytes after the last region", "offset", i);
      }
    }
    const regions: MemoryRegion[] = [];
    for (let i = 0; i < n; i++) regions.push(readRegion(dv, 8 + i * MEMORY_REGION_SIZE));
    return { regions };
  },
  encode(value, request) {
    const n = value.regions.length;
    if (n === 0 || n > MAX_MEM_REGIONS) {
      throw badField(
        request,
        `memory table must hold 1..${MAX_MEM_REGIONS} regions`,
        "nregions",
        n,
      );
    }
    const out = new Uint8Array(8 + n * MEMORY_REGION_SIZE);
    const dv = view(out);
    dv.setUint32(0, n, true);
    value.regions.forEach((r, i) => writeRegion(dv, 8 + i * MEMORY_REGION_SIZE, r, request, i));
    return out;
  },
};

/** `VhostUserMemRegMsg` (ADD_MEM_REG, REM_MEM_REG): padding u64 @0, region @8 (40 bytes). */
export const singleRegionCodec: Codec<MemoryRegion> = {
  name: "single memory region",
  size: { min: 40, max: 40 },
  decode(bytes, request) {
    expectSize(bytes, 40, request, "single memory region");
    return readRegion(view(bytes), 8);
  },
  encode(value, request) {
    const out = new Uint8Array(40);
    writeRegion(view(out), 8, value, request, 0);
    return out;
  },
};

/** `VhostUserLog` (16 bytes): mmap_size u64 @0, mmap_offset u64 @8. */
export const logCodec: Codec<LogDescription> = {
  name: "log description",
  size: { min: 16, max: 16 },
  decode(bytes, request) {
    expectSize(bytes, 16, request, "log description");
    const dv = view(bytes);
    return { mmapSize: dv.getBigUint64(0, true), mmapOffset: dv.getBigUint64(8, true) };
  },
  encode(value, request) {
    const out = new Uint8Array(16);
    const dv = view(out);
    dv.setBigUint64(0, checkU64(value.mmapSize, request, "mmapSize"), true);
    dv.setBigUint64(8, checkU64(value.mmapOffset, request, "mmapOffset"), true);
    return out;
  },
};

/**
 * `VhostUserInflight` (24 bytes: the C struct is padded from 20 to 24, and QEMU rejects any other
 * size): mmap_size u64 @0, mmap_offset u64 @8, num_queues u16 @16, queue_size u16 @18.
 */
export const inflightCodec: Codec<InflightDescription> = {
  name: "inflight description",
  size: { min: 24, max: 24 },
  decode(bytes, request) {
    expectSize(bytes, 24, request, "inflight description");
    const dv = view(bytes);
    return {
      mmapSize: dv.getBigUint64(0, true),
      mmapOffset: dv.getBigUint64(8, true),
      numQueues: dv.getUint16(16, true),
      queueSize: dv.getUint16(18, true),
    };
  },
  encode(value, request) {
    const out = new Uint8Array(24);
    const dv = view(out);
    dv.setBigUint64(0, checkU64(value.mmapSize, request, "mmapSize"), true);
    dv.setBigUint64(8, checkU64(value.mmapOffset, request, "mmapOffset"), true);
    dv.setUint16(16, checkUint(value.numQueues, 16, request, "numQueues"), true);
    dv.setUint16(18, checkUint(value.queueSize, 16, request, "queueSize"), true);
    return out;
  },
};

function checkIotlb(perm: number, type: number, request: string): void {
  if (perm > IotlbPerm.READ_WRITE)
    throw badField(request, "unknown IOTLB permission", "perm", perm);
  if (type < IotlbType.MISS || type > IotlbType.ACCESS_FAIL) {
    throw badField(request, "unknown IOTLB message type", "type", type);
  }
}

/**
 * IOTLB message (32 bytes): iova u64 @0, size u64 @8, uaddr u64 @16, perm u8 @24, type u8 @25,
 * 6 bytes of padding.
 */
export const iotlbCodec: Codec<IotlbMsg> = {
  name: "IOTLB message",
  size: { min: 32, max: 32 },
  decode(bytes, request) {
    expectSize(bytes, 32, request, "IOTLB message");
    const dv = view(bytes);
    const perm = dv.getUint8(24);
    const type = dv.getUint8(25);
    checkIotlb(perm, type, request);
    return {
      iova: dv.getBigUint64(0, true),
      size: dv.getBigUint64(8, true),
      uaddr: dv.getBigUint64(16, true),
      perm,
      type,
    };
  },
  encode(value, request) {
    const out = new Uint8Array(32);
    const dv = view(out);
    checkUint(value.perm, 8, request, "perm");
    checkUint(value.type, 8, request, "type");
    checkIotlb(value.perm, value.type, request);
    dv.setBigUint64(0, checkU64(value.iova, request, "iova"), true);
    dv.setBigUint64(8, checkU64(value.size, request, "size"), true);
    dv.setBigUint64(16, checkU64(value.uaddr, request, "uaddr"), true);
    dv.setUint8(24, value.perm);
    dv.setUint8(25, value.type);
    return out;
  },
};

/**
 * `VhostUserConfig` (12 + size bytes): offset u32 @0, size u32 @4, flags u32 @8, payload @12.
 * `size` must equal the payload length and be at most 256.
 */
export const configCodec: Codec<ConfigSpace> = {
  name: "config space",
  size: { min: 12, max: 12 + MAX_CONFIG_SIZE },
  decode(bytes, request) {
    if (bytes.length < 12) expectSize(bytes, 12, request, "config space header");
    const dv = view(bytes);
    const size = dv.getUint32(4, true);
    if (size > MAX_CONFIG_SIZE) {
      throw badField(request, `config size above ${MAX_CONFIG_SIZE}`, "size", size);
    }
    if (size !== bytes.length - 12) {
      throw new VhostUserError(
        "ERR_VHOST_BAD_PAYLOAD_SIZE",
        `config size field does not match the payload (payload=${bytes.length - 12})`,
        { request, field: "size", value: size, fatal: false },
      );
    }
    return {
      offset: dv.getUint32(0, true),
      size,
      flags: dv.getUint32(8, true),
      payload: bytes.slice(12),
    };
  },
  encode(value, request) {
    if (value.size !== value.payload.length || value.size > MAX_CONFIG_SIZE) {
      throw badField(
        request,
        `config size must equal the payload length (${value.payload.length}) and be <= ${MAX_CONFIG_SIZE}`,
        "size",
        value.size,
      );
    }
    const out = new Uint8Array(12 + value.size);
    const dv = view(out);
    dv.setUint32(0, checkUint(value.offset, 32, request, "offset"), true);
    dv.setUint32(4, value.size, true);
    dv.setUint32(8, checkUint(value.flags, 32, request, "flags"), true);
    out.set(value.payload, 12);
    return out;
  },
};

function decodeIndexNoFd(
  raw: bigint,
  request: string,
  field: string,
): { index: number; noFd: boolean } {
  if ((raw & ~BigInt(VRING_INDEX_MASK | VRING_NOFD_FLAG)) !== 0n) {
    throw badField(request, "reserved bits set (only bits 0-8 are defined)", field, raw);
  }
  const n = Number(raw);
  return { index: n & VRING_INDEX_MASK, noFd: (n & VRING_NOFD_FLAG) !== 0 };
}

function encodeIndexNoFd(index: number, noFd: boolean, request: string): bigint {
  checkUint(index, 8, request, "index");
  return BigInt(index | (noFd ? VRING_NOFD_FLAG : 0));
}

/** `VhostUserVringArea` (24 bytes): u64 @0 (index bits 0-7, no-fd bit 8), size @8, offset @16. */
export const vringAreaCodec: Codec<VringArea> = {
  name: "vring area",
  size: { min: 24, max: 24 },
  decode(bytes, request) {
    expectSize(bytes, 24, request, "vring area");
    const dv = view(bytes);
    const { index, noFd } = decodeIndexNoFd(dv.getBigUint64(0, true), request, "u64");
    return { index, noFd, size: dv.getBigUint64(8, true), offset: dv.getBigUint64(16, true) };
  },
  encode(value, request) {
    const out = new Uint8Array(24);
    const dv = view(out);
    dv.setBigUint64(0, encodeIndexNoFd(value.index, value.noFd, request), true);
    dv.setBigUint64(8, checkU64(value.size, request, "size"), true);
    dv.setBigUint64(16, checkU64(value.offset, request, "offset"), true);
    return out;
  },
};

/** `VhostUserShared` (16 bytes): a UUID. */
export const sharedObjectCodec: Codec<SharedObject> = {
  name: "shared object",
  size: { min: 16, max: 16 },
  decode(bytes, request) {
    expectSize(bytes, 16, request, "shared object");
    return { uuid: bytes.slice(0, 16) };
  },
  encode(value, request) {
    if (!(value.uuid instanceof Uint8Array) || value.uuid.length !== 16) {
      throw badField(request, "UUID must be 16 bytes", "uuid", value.uuid);
    }
    return value.uuid.slice();
  },
};

/**
 * Format a 16-byte UUID in its canonical text form (vhost-user: "VhostUserShared") (the wire order is the canonical byte order,
 * as VhostUserShared stores the first three components big-endian).
 * @param uuid 16 bytes
 * @returns `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`
 * @throws RangeError when `uuid` is not 16 bytes
 */
export function uuidToString(uuid: Uint8Array): string {
  if (uuid.length !== 16) throw new RangeError(`UUID must be 16 bytes (length=${uuid.length})`);
  const hex = Array.from(uuid, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * Parse a UUID in canonical text form into the 16 wire bytes.
 * @param text `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (case-insensitive)
 * @returns 16 bytes
 * @throws RangeError when the text is not a UUID
 */
export function uuidFromString(text: string): Uint8Array {
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)) {
    throw new RangeError(`not a UUID (text=${text})`);
  }
  const hex = text.replace(/-/g, "");
  const out = new Uint8Array(16);
  for (let i = 0; i < 16; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/** Device-state transfer parameters (8 bytes): direction u32 @0, phase u32 @4. */
export const deviceStateParamsCodec: Codec<DeviceStateParams> = {
  name: "device state transfer parameters",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "device state transfer parameters");
    const dv = view(bytes);
    return { direction: dv.getUint32(0, true), phase: dv.getUint32(4, true) };
  },
  encode(value, request) {
    const out = new Uint8Array(8);
    const dv = view(out);
    dv.setUint32(0, checkUint(value.direction, 32, request, "direction"), true);
    dv.setUint32(4, checkUint(value.phase, 32, request, "phase"), true);
    return out;
  },
};

/**
 * Check SET_DEVICE_STATE_FD parameters against the values the spec defines (a back-end's
 * semantic step; the codec accepts any value). vhost-user: "Device state transfer parameters".
 * @param params decoded parameters
 * @param request request name for error messages
 * @throws VhostUserError ERR_VHOST_BAD_FIELD (non-fatal) naming direction or phase
 */
export function checkDeviceStateParams(
  params: DeviceStateParams,
  request = "SET_DEVICE_STATE_FD",
): void {
  if (
    params.direction !== DeviceStateDirection.SAVE &&
    params.direction !== DeviceStateDirection.LOAD
  ) {
    throw badField(request, "unknown transfer direction", "direction", params.direction);
  }
  if (params.phase !== DeviceStatePhase.STOPPED) {
    throw badField(request, "unknown migration phase", "phase", params.phase);
  }
}

/** SET_DEVICE_STATE_FD reply u64 (8 bytes): result bits 0-7, no-fd bit 8. */
export const deviceStateReplyCodec: Codec<DeviceStateReply> = {
  name: "device state reply",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "device state reply");
    const { index, noFd } = decodeIndexNoFd(view(bytes).getBigUint64(0, true), request, "u64");
    return { result: index, noFd };
  },
  encode(value, request) {
    const out = new Uint8Array(8);
    view(out).setBigUint64(0, encodeIndexNoFd(value.result, value.noFd, request), true);
    return out;
  },
};

/** SET_VRING_KICK/CALL/ERR u64 (8 bytes): index bits 0-7, no-fd bit 8, other bits rejected. */
export const vringFdCodec: Codec<VringFd> = {
  name: "vring fd",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "vring fd");
    return decodeIndexNoFd(view(bytes).getBigUint64(0, true), request, "u64");
  },
  encode(value, request) {
    const out = new Uint8Array(8);
    view(out).setBigUint64(0, encodeIndexNoFd(value.index, value.noFd, request), true);
    return out;
  },
};

/** SEND_RARP u64 (8 bytes): the MAC in bytes 0-5; bytes 6-7 are ignored and sent as zero. */
export const rarpCodec: Codec<RarpPayload> = {
  name: "RARP MAC",
  size: { min: 8, max: 8 },
  decode(bytes, request) {
    expectSize(bytes, 8, request, "RARP MAC");
    return { mac: bytes.slice(0, 6) };
  },
  encode(value, request) {
    if (!(value.mac instanceof Uint8Array) || value.mac.length !== 6) {
      throw badField(request, "MAC must be 6 bytes", "mac", value.mac);
    }
    const out = new Uint8Array(8);
    out.set(value.mac, 0);
    return out;
  },
};

/**
 * An opaque payload, copied as bytes (crypto sessions, whose C layout this library does not
 * interpret; the POSTCOPY_ADVISE reply).
 * @param name payload name
 * @param min smallest size
 * @param max largest size (at most {@link MAX_PAYLOAD_SIZE})
 * @returns a codec of `Uint8Array`
 */
export function opaqueCodec(name: string, min: number, max: number): Codec<Uint8Array> {
  const size = { min, max: Math.min(max, MAX_PAYLOAD_SIZE) };
  const check = (length: number, request: string): void => {
    if (length < size.min || length > size.max) {
      throw new VhostUserError(
        "ERR_VHOST_BAD_PAYLOAD_SIZE",
        `${name} payload must be ${size.min}..${size.max} bytes`,
        { request, field: "size", value: length, fatal: false },
      );
    }
  };
  return {
    name,
    size,
    decode(bytes, request) {
      check(bytes.length, request);
      return bytes.slice();
    },
    encode(value, request) {
      check(value.length, request);
      return value.slice();
    },
  };
}

/** SET_LOG_BASE reply: any size up to the cap; 8 bytes decode as a u64, 16 as a log. */
export const logBaseReplyCodec: Codec<LogBaseReply> = {
  name: "log base reply",
  size: { min: 0, max: MAX_PAYLOAD_SIZE },
  decode(bytes, request) {
    if (bytes.length > MAX_PAYLOAD_SIZE) expectSize(bytes, MAX_PAYLOAD_SIZE, request, "reply");
    return {
      value: bytes.length === 8 ? view(bytes).getBigUint64(0, true) : null,
      log: bytes.length === 16 ? logCodec.decode(bytes, request) : null,
    };
  },
  encode(value, request) {
    if (value.value !== null && value.log !== null) {
      throw badField(
        request,
        "reply holds either a u64 or a log description",
        "value",
        value.value,
      );
    }
    if (value.log !== null) return logCodec.encode(value.log, request);
    if (value.value !== null) return u64Codec.encode(value.value, request);
    return new Uint8Array(0);
  },
};

/** GET_SHARED_OBJECT reply: 0 bytes, a u64 (8) or the echoed UUID (16). */
export const sharedObjectReplyCodec: Codec<SharedObjectReply> = {
  name: "shared object reply",
  size: { min: 0, max: 16 },
  decode(bytes, request) {
    if (bytes.length !== 0 && bytes.length !== 8 && bytes.length !== 16) {
      throw new VhostUserError(
        "ERR_VHOST_BAD_PAYLOAD_SIZE",
        "shared object reply must be 0, 8 or 16 bytes",
        { request, field: "size", value: bytes.length, fatal: false },
      );
    }
    return {
      value: bytes.length === 8 ? view(bytes).getBigUint64(0, true) : null,
      uuid: bytes.length === 16 ? bytes.slice() : null,
    };
  },
  encode(value, request) {
    if (value.value !== null && value.uuid !== null) {
      throw badField(request, "reply holds either a u64 or a UUID", "value", value.value);
    }
    if (value.uuid !== null) return sharedObjectCodec.encode({ uuid: value.uuid }, request);
    if (value.value !== null) return u64Codec.encode(value.value, request);
    return new Uint8Array(0);
  },
};
