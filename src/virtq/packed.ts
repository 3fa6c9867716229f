/**
 * Packed virtqueues (VIRTIO_F_RING_PACKED), device side and driver side.
 *
 * Layout (VIRTIO 1.2 §2.8.10, §2.8.13, §2.8.14): a ring of `size` 16-byte descriptors
 * `{addr u64, len u32, id u16, flags u16}` (16-byte aligned), a driver event suppression
 * structure (the "avail"/driver area of SET_VRING_ADDR) and a device event suppression
 * structure (the "used"/device area), each `{desc_event_off_wrap u16, desc_event_flags u16}`
 * (4-byte aligned).
 *
 * Both sides read and write ring fields through typed arrays over the guest-memory region that
 * holds the ring (little-endian host, checked at construction), and use `Atomics.load` /
 * `Atomics.store` on the `flags` words, which are the publication points of this format.
 *
 * LIFETIME: a queue keeps typed-array views into the region(s) that hold its ring and event
 * structures. They are valid until that region is unmapped; a queue must be discarded (and a new
 * one built, e.g. with the saved {@link PackedDeviceQueue.getBase}) whenever the memory table
 * changes. After `munmap` the views are detached and the next `Atomics` access throws a
 * `TypeError` rather than touching freed memory.
 */
import type { Gpa } from "../memory/address.js";
import { isLittleEndianHost } from "../memory/dirty-log.js";
import type { GuestMemory, Region } from "../memory/guest-memory.js";
import {
  DESC_SIZE,
  MAX_QUEUE_SIZE,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  vringNeedEvent,
} from "./layout.js";
import {
  InFlight,
  VirtqueueError,
  type DescChain,
  type DeviceQueue,
  type DriverQueue,
  type Segment,
  type UsedLogOptions,
} from "./types.js";

/** Descriptor flag: the buffer continues in the next descriptor (VIRTIO 1.2 §2.8.6). */
export const PACKED_DESC_F_NEXT = VIRTQ_DESC_F_NEXT;
/** Descriptor flag: device-writable element; in a used descriptor, data was written (§2.8.4). */
export const PACKED_DESC_F_WRITE = VIRTQ_DESC_F_WRITE;
/** Descriptor flag: the element is a table of indirect descriptors (§2.8.7). */
export const PACKED_DESC_F_INDIRECT = VIRTQ_DESC_F_INDIRECT;
/** Descriptor flag: available bit, compared with the wrap counters (§2.8.1). */
export const PACKED_DESC_F_AVAIL = 1 << 7;
/** Descriptor flag: used bit, compared with the wrap counters (§2.8.1). */
export const PACKED_DESC_F_USED = 1 << 15;
/** Event suppression flags: notifications enabled (§2.8.10). */
export const RING_EVENT_FLAGS_ENABLE = 0;
/** Event suppression flags: notifications disabled (§2.8.10). */
export const RING_EVENT_FLAGS_DISABLE = 1;
/** Event suppression flags: notify for one descriptor offset/wrap; needs EVENT_IDX (§2.8.10). */
export const RING_EVENT_FLAGS_DESC = 2;
/** Bytes in one packed descriptor (§2.8.13). */
const PACKED_DESC_SIZE = DESC_SIZE;
/** Largest packed queue size (§2.8: "up to 2^15 entries"). */
const PACKED_MAX_QUEUE_SIZE = MAX_QUEUE_SIZE;

/** Largest number of entries accepted in one indirect table (same bound as the queue size). */
const MAX_INDIRECT_ENTRIES = 32768;
const U32_LIMIT = 0x1_0000_0000;
/** 2^53 / 2^32: a descriptor address whose high word reaches this is not a safe integer. */
const ADDR_HIGH_LIMIT = 0x20_0000;
const AVAIL_USED = PACKED_DESC_F_AVAIL | PACKED_DESC_F_USED;

/** Ring positions for GET/SET_VRING_BASE of a packed queue (vhost-user "vring base, packed"). */
export interface PackedBase {
  /** next descriptor position the device will read (0..size-1) */
  availIdx: number;
  /** device's view of the driver ring wrap counter at `availIdx` */
  availWrap: boolean;
  /** next descriptor position the device will write a used descriptor to (0..size-1) */
  usedIdx: number;
  /** device ring wrap counter at `usedIdx` */
  usedWrap: boolean;
}

/** Options of {@link PackedDeviceQueue}. */
export interface PackedDeviceQueueOptions {
  /** queue size (1..32768, need not be a power of two) */
  size: number;
  /** GPA of the descriptor ring (SET_VRING_ADDR desc, translated) */
  desc: Gpa;
  /** GPA of the driver event suppression structure (SET_VRING_ADDR avail, translated) */
  driverEvent: Gpa;
  /** GPA of the device event suppression structure (SET_VRING_ADDR used, translated) */
  deviceEvent: Gpa;
  /** VIRTIO_F_RING_EVENT_IDX negotiated: RING_EVENT_FLAGS_DESC is honoured and used */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated */
  indirect?: boolean;
  /** SET_VRING_BASE state; default: both positions 0, both wrap counters 1 */
  base?: PackedBase;
  /** VHOST_VRING_F_LOG: SET_VRING_ADDR log_guest_addr, or null/absent */
  usedLog?: UsedLogOptions | null;
  /**
   * the chains in flight on this ring, taken over from the queue object this one replaces
   * (a rebuild: SET_VRING_ADDR, memory-table change); default: none
   */
  inFlight?: InFlight;
  /** queue index, reported in errors */
  index?: number;
}

/** Options of {@link PackedDriverQueue}. */
export interface PackedDriverQueueOptions {
  /** queue size (1..32768, need not be a power of two) */
  size: number;
  /** GPA of the descriptor ring */
  desc: Gpa;
  /** GPA of the driver event suppression structure */
  driverEvent: Gpa;
  /** GPA of the device event suppression structure */
  deviceEvent: Gpa;
  /** VIRTIO_F_RING_EVENT_IDX negotiated */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated (enables {@link PackedDriverQueue.addIndirect}) */
  indirect?: boolean;
  /**
   * Continue a ring whose memory is already in place (e.g. migrated with guest RAM) at a
   * position saved by {@link PackedDriverQueue.position}: the ring memory is not initialised.
   */
  restore?: PackedDriverRestore;
}

/**
 * The driver-side bookkeeping of a packed ring that is not in ring memory (what a guest kernel
 * keeps in its own `vring_virtqueue`), as {@link PackedDriverQueue.position} returns it.
 * Plain JSON data.
 */
export interface PackedDriverPosition {
  /** next descriptor position the driver writes (0..size-1) */
  availIdx: number;
  /** driver ring wrap counter at `availIdx` */
  availWrap: boolean;
  /** next descriptor position the driver reads a used descriptor from (0..size-1) */
  usedIdx: number;
  /** device ring wrap counter the driver expects at `usedIdx` */
  usedWrap: boolean;
  /** buffers made available and not yet collected: id and descriptors occupied in the ring */
  inFlight: { id: number; count: number }[];
  /** free buffer ids in pop order (the last one is taken next) */
  freeIds: number[];
  /** heads written by add() but not yet published by kick(): ring position and flags word */
  pendingHeads: { pos: number; flags: number }[];
  /** descriptors added since the last kick (for the EVENT_IDX kick decision) */
  pendingDescs: number;
}

/** What {@link PackedDriverQueueOptions.restore} takes. */
export interface PackedDriverRestore {
  /** the saved position */
  position: PackedDriverPosition;
  /** tokens of the in-flight buffers by id (returned by getUsed(); default undefined) */
  tokens?: ReadonlyMap<number, unknown>;
}

/**
 * Encode packed ring positions as the vhost-user SET/GET_VRING_BASE `num`.
 * @param base positions and wrap counters (positions must be < 2^15)
 * @returns bits 0-14 avail idx, bit 15 avail wrap, bits 16-30 used idx, bit 31 used wrap
 * @throws RangeError when a position is not an integer in 0..32767
 * vhost-user: "vring base, packed" encoding.
 */
export function packedBaseToNum(base: PackedBase): number {
  for (const [name, v] of [
    ["availIdx", base.availIdx],
    ["usedIdx", base.usedIdx],
  ] as const) {
    if (!Number.isInteger(v) || v < 0 || v > 0x7fff) {
      throw new RangeError(`vring base ${name} must be an integer in 0..32767, got ${v}`);
    }
  }
  return (
    (base.availIdx | (base.availWrap ? 0x8000 : 0)) +
    (base.usedIdx | (base.usedWrap ? 0x8000 : 0)) * 0x1_0000
  );
}

/**
 * Decode the vhost-user SET/GET_VRING_BASE `num` of a packed ring.
 * @param num the 32-bit state number
 * @returns positions and wrap counters (positions are not checked against a queue size here)
 * @throws RangeError when `num` is not an integer in 0..2^32-1
 * vhost-user: "vring base, packed" encoding.
 */
export function packedBaseFromNum(num: number): PackedBase {
  if (!Number.isInteger(num) || num < 0 || num >= U32_LIMIT) {
    throw new RangeError(`vring base num must be a u32, got ${num}`);
  }
  const lo = num & 0xffff;
  const hi = Math.floor(num / 0x1_0000);
  return {
    availIdx: lo & 0x7fff,
    availWrap: (lo & 0x8000) !== 0,
    usedIdx: hi & 0x7fff,
    usedWrap: (hi & 0x8000) !== 0,
  };
}

function vqError(field: string, value: number, message: string, queue?: number): VirtqueueError {
  return new VirtqueueError(field, value, message, queue);
}

/** Typed views over one packed ring and its two event structures (internal). */
class RingViews {
  /** descriptor ring as 16-bit words: id at 8*i+6, flags at 8*i+7 */
  readonly u16: Uint16Array;
  /** descriptor ring as 32-bit words: addr lo/hi at 4*i, 4*i+1, len at 4*i+2 */
  readonly u32: Uint32Array;
  /** driver event suppression: [off_wrap, flags] */
  readonly driverEvent: Uint16Array;
  /** device event suppression: [off_wrap, flags] */
  readonly deviceEvent: Uint16Array;

  constructor(
    mem: GuestMemory,
    size: number,
    desc: Gpa,
    driverEvent: Gpa,
    deviceEvent: Gpa,
    queue: number | undefined,
  ) {
    if (!isLittleEndianHost()) {
      throw new Error("vhostkit packed virtqueues need a little-endian host");
    }
    if (!Number.isInteger(size) || size < 1 || size > PACKED_MAX_QUEUE_SIZE) {
      throw vqError("size", size, `packed queue size ${size} is not in 1..32768`, queue);
    }
    checkAligned("desc", desc, 16, queue);
    checkAligned("driverEvent", driverEvent, 4, queue);
    checkAligned("deviceEvent", deviceEvent, 4, queue);
    // LIFETIME: these views live as long as the queue; see the module comment.
    const d = regionOffset(mem, "desc", desc, size * PACKED_DESC_SIZE, queue);
    this.u16 = new Uint16Array(d.region.buffer, d.offset, size * 8);
    this.u32 = new Uint32Array(d.region.buffer, d.offset, size * 4);
    const drv = regionOffset(mem, "driverEvent", driverEvent, 4, queue);
    this.driverEvent = new Uint16Array(drv.region.buffer, drv.offset, 2);
    const dev = regionOffset(mem, "deviceEvent", deviceEvent, 4, queue);
    this.deviceEvent = new Uint16Array(dev.region.buffer, dev.offset, 2);
  }
}

function checkAligned(field: string, address: Gpa, align: number, queue?: number): void {
  if (!Number.isSafeInteger(address) || address < 0 || address % align !== 0) {
    throw vqError(
      field,
      address,
      `${field} address ${address} is not ${align}-byte aligned`,
      queue,
    );
  }
}

function regionOffset(
  mem: GuestMemory,
  field: string,
  address: Gpa,
  len: number,
  queue?: number,
): { region: Region; offset: number } {
  let region: Region;
  try {
    region = mem.regionFor(address, len);
  } catch (err) {
    throw vqError(
      field,
      address,
      `${field} [${address}, +${len}) is not inside one guest memory region: ${(err as Error).message}`,
      queue,
    );
  }
  const offset = region.base + (address - region.gpa);
  if (offset % 4 !== 0) {
    throw vqError(field, address, `${field} maps to a misaligned buffer offset ${offset}`, queue);
  }
  return { region, offset };
}

interface PendingUsed {
  pos: number;
  flags: number;
}

/**
 * Device side (back-end) of a packed virtqueue.
 *
 * `pop()` reads driver descriptors in ring order; `pushUsed()` writes the used descriptor's `id`
 * and `len` at the next used position at once but keeps its `flags`; `publish()` then stores the
 * flags of the whole batch, the first entry's flags last (as DPDK's
 * `vhost_flush_enqueue_shadow_packed` does), so the driver, which polls only its next used
 * position, never sees part of a batch.
 *
 * Dirty log (VHOST_F_LOG_ALL): used descriptors are written into the descriptor ring. When
 * `usedLog` is given (VHOST_VRING_F_LOG), each used-descriptor write is marked at
 * `usedLog.logGuestAddr + 16 * position`, as DPDK does (`vhost_log_cache_used_vring` with offset
 * `idx * sizeof(struct vring_packed_desc)`); because QEMU passes `vq->used_phys` (for a packed
 * ring, the device area's GPA) as `log_guest_addr`, the page actually written (the descriptor ring's GPA +
 * 16 * position) is always marked as well. Writes to the device event suppression structure are
 * marked at its GPA.
 *
 * VIRTIO 1.2 §2.8 (Packed Virtqueues).
 */
export class PackedDeviceQueue implements DeviceQueue {
  /** queue size in descriptors */
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly ring: RingViews;
  private readonly descGpa: number;
  private readonly deviceEventGpa: number;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  private readonly usedLogAddr: number | null;
  private readonly index: number | undefined;
  private lastAvailIdx: number;
  private availWrap: boolean;
  /** next position pushUsed writes to (includes pushed, unpublished entries) */
  private usedIdx: number;
  private usedWrap: boolean;
  /** used position as last published (what the driver can see) */
  private publishedUsedIdx: number;
  private publishedUsedWrap: boolean;
  private readonly pending: PendingUsed[] = [];
  private signalledUsed = 0;
  private signalledUsedValid = false;
  private readonly popped: InFlight;

  /**
   * Attach to a packed ring in guest memory (the ring memory is not modified).
   * @param mem guest memory holding the ring and the buffers
   * @param opts ring addresses, size, negotiated features, SET_VRING_BASE state, log address
   * @throws VirtqueueError (field "size", "desc", "driverEvent", "deviceEvent",
   *   "base.availIdx", "base.usedIdx") for a bad size, misaligned or unmapped ring, or bad base
   * VIRTIO 1.2 §2.8; vhost-user SET_VRING_ADDR / SET_VRING_BASE.
   */
  constructor(mem: GuestMemory, opts: PackedDeviceQueueOptions) {
    this.mem = mem;
    this.size = opts.size;
    this.index = opts.index;
    this.ring = new RingViews(
      mem,
      opts.size,
      opts.desc,
      opts.driverEvent,
      opts.deviceEvent,
      opts.index,
    );
    this.descGpa = opts.desc;
    this.deviceEventGpa = opts.deviceEvent;
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect ?? false;
    this.usedLogAddr = opts.usedLog ? opts.usedLog.logGuestAddr : null;
    const base = opts.base ?? { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true };
    for (const [field, v] of [
      ["base.availIdx", base.availIdx],
      ["base.usedIdx", base.usedIdx],
    ] as const) {
      if (!Number.isInteger(v) || v < 0 || v >= opts.size) {
        throw vqError(
          field,
          v,
          `${field} ${v} is not below the queue size ${opts.size}`,
          this.index,
        );
      }
    }
    this.lastAvailIdx = base.availIdx;
    this.availWrap = base.availWrap;
    this.usedIdx = base.usedIdx;
    this.usedWrap = base.usedWrap;
    this.publishedUsedIdx = base.usedIdx;
    this.publishedUsedWrap = base.usedWrap;
    this.signalledUsed = base.usedIdx;
    this.popped = opts.inFlight ?? new InFlight();
  }

  /** Chains popped (by this queue object or the ones it replaced) and not yet pushed. */
  get inFlight(): number {
    return this.popped.count;
  }

  /** @returns the chains in flight (pop order), carried into a rebuilt queue object */
  get inFlightList(): InFlight {
    return this.popped;
  }

  /**
   * Give back the last chains popped, never written: the avail position (and its wrap
   * counter) is rewound over their descriptors (see {@link DeviceQueue.cancel}).
   * @param chains the last chains popped, in pop order
   * @returns true when rewound; false (nothing changed) when they are not the last popped
   */
  cancel(chains: readonly DescChain[]): boolean {
    if (!this.popped.isTail(chains)) return false;
    let descs = 0;
    for (const c of chains) descs += c.descCount;
    this.popped.dropTail(chains.length);
    const back = this.lastAvailIdx - descs;
    if (back < 0) {
      this.lastAvailIdx = back + this.size;
      this.availWrap = !this.availWrap;
    } else {
      this.lastAvailIdx = back;
    }
    return true;
  }

  /**
   * Read the next available buffer.
   * @returns the chain (segments in order, buffer id in `head`, descriptors consumed in
   *   `descCount`), or null when the descriptor at the next position is not available
   * @throws VirtqueueError for a malformed ring: field "chain length" (more than `size`
   *   descriptors, or an indirect table over 32768 entries), "desc.flags" (indirect without the
   *   feature, indirect in a NEXT chain, nested indirect, readable after writable), "desc.addr"
   *   (element or table outside guest memory), "desc.len" (zero length, total over 2^32-1),
   *   "indirect.len" (not a non-zero multiple of 16); the queue position does not move
   * VIRTIO 1.2 §2.8.6, §2.8.7, §2.8.21.
   */
  pop(): DescChain | null {
    const { u16, u32 } = this.ring;
    const size = this.size;
    let pos = this.lastAvailIdx;
    // ORDERING: read the head's flags first (acquire); the rest of the chain is read after it,
    // so it is the contents the driver wrote before making the head available.
    let flags = Atomics.load(u16, pos * 8 + 7);
    if (!this.isAvail(flags)) return null;
    const chain = new ChainBuilder(this.mem, this.index);
    let count = 0;
    let id = 0;
    for (;;) {
      if (count === size) {
        throw vqError(
          "chain length",
          count + 1,
          `descriptor chain at ${this.lastAvailIdx} is longer than the queue size ${size}`,
          this.index,
        );
      }
      count++;
      const addr = descAddr(u32, pos, this.index);
      const len = u32[pos * 4 + 2] ?? 0;
      id = u16[pos * 8 + 6] ?? 0;
      if ((flags & PACKED_DESC_F_INDIRECT) !== 0) {
        if (!this.indirect) {
          throw vqError(
            "desc.flags",
            flags,
            `indirect descriptor at ${pos} but VIRTIO_F_INDIRECT_DESC was not negotiated`,
            this.index,
          );
        }
        if (count !== 1 || (flags & PACKED_DESC_F_NEXT) !== 0) {
          throw vqError(
            "desc.flags",
            flags,
            `indirect descriptor at ${pos} is part of a NEXT chain`,
            this.index,
          );
        }
        chain.addIndirect(addr, len);
      } else {
        chain.add(addr, len, (flags & PACKED_DESC_F_WRITE) !== 0, flags);
      }
      pos = pos + 1 === size ? 0 : pos + 1;
      if ((flags & PACKED_DESC_F_NEXT) === 0) break;
      flags = u16[pos * 8 + 7] ?? 0;
    }
    const next = this.lastAvailIdx + count;
    if (next >= size) {
      this.lastAvailIdx = next - size;
      this.availWrap = !this.availWrap;
    } else {
      this.lastAvailIdx = next;
    }
    // The buffer id is the one in the last descriptor of the list (§2.8.6).
    const result = chain.finish(id, count);
    this.popped.add(result);
    return result;
  }

  /**
   * Write a used descriptor for a finished chain at the next used position (not yet visible:
   * its flags are stored by {@link publish}).
   * @param chain a chain returned by `pop()` (of this or an earlier queue object on this ring:
   *   chains in flight may be carried across a restart from `getBase()`)
   * @param writtenLen bytes written into the chain's writable segments
   * @throws VirtqueueError field `inFlight` when the ring has fewer descriptors popped and not
   *   yet used than the chain occupies (nothing in flight), `used.len` when `writtenLen` is
   *   not an integer in
   *   0..chain.writableLength (as the split ring)
   * VIRTIO 1.2 §2.8.22 (Receiving used buffers), §2.8.6.
   */
  pushUsed(chain: DescChain, writtenLen: number): void {
    // Descriptors popped (by any queue object on this ring) and not yet used.
    const outstanding =
      this.availWrap === this.usedWrap
        ? this.lastAvailIdx - this.usedIdx
        : this.lastAvailIdx + this.size - this.usedIdx;
    if (chain.descCount > outstanding) {
      throw vqError(
        "inFlight",
        outstanding,
        `pushUsed without a popped chain (${outstanding} descriptors in flight, buffer ${chain.head} occupies ${chain.descCount})`,
        this.index,
      );
    }
    const head = chain.head;
    if (!Number.isInteger(writtenLen) || writtenLen < 0 || writtenLen > chain.writableLength) {
      throw vqError(
        "used.len",
        writtenLen,
        `written length exceeds the chain's writable length ${chain.writableLength} (buffer ${head})`,
        this.index,
      );
    }
    const pos = this.usedIdx;
    const { u16, u32 } = this.ring;
    u16[pos * 8 + 6] = chain.head;
    u32[pos * 4 + 2] = writtenLen;
    let flags = this.usedWrap ? AVAIL_USED : 0;
    if (writtenLen > 0) flags |= PACKED_DESC_F_WRITE;
    this.pending.push({ pos, flags });
    const next = pos + chain.descCount;
    if (next >= this.size) {
      this.usedIdx = next - this.size;
      this.usedWrap = !this.usedWrap;
    } else {
      this.usedIdx = next;
    }
    this.popped.remove(chain);
  }

  /**
   * Make the pushed used descriptors visible and decide whether the driver must be notified.
   * @returns true when a used buffer notification is needed (driver event suppression: ENABLE,
   *   or DESC with EVENT_IDX and the event offset/wrap crossed by this batch)
   * VIRTIO 1.2 §2.8.10, §2.8.22; DPDK `vhost_vring_call_packed`.
   */
  publish(): boolean {
    const n = this.pending.length;
    if (n === 0) return false;
    const u16 = this.ring.u16;
    const first = this.pending[0] as PendingUsed;
    // ORDERING: id/len were written by pushUsed; the flags of entries 2..n go next (the driver
    // cannot look at them before it has seen entry 1), then the dirty log is flushed, then entry
    // 1's flags are stored last: that store publishes the whole batch.
    for (let k = 1; k < n; k++) {
      const e = this.pending[k] as PendingUsed;
      Atomics.store(u16, e.pos * 8 + 7, e.flags);
    }
    const log = this.mem.log;
    if (log) {
      for (const e of this.pending) this.markUsed(e.pos);
      log.flush();
    }
    // ORDERING: the first entry's flags last (seq-cst store), after the other flags and the
    // flushed log marks: this store makes the whole batch visible to the driver.
    Atomics.store(u16, first.pos * 8 + 7, first.flags);
    if (log) {
      // The head's flags changed after the marks above: mark its page again.
      this.markUsed(first.pos);
      log.flush();
    }
    this.pending.length = 0;
    this.publishedUsedIdx = this.usedIdx;
    this.publishedUsedWrap = this.usedWrap;
    return this.needCall();
  }

  /**
   * Ask the driver for available buffer notifications (kicks) or suppress them, in the device
   * event suppression structure: DISABLE; ENABLE; or, with EVENT_IDX, DESC at the next position
   * to be read (a kick when the driver makes that descriptor available). After enabling, check
   * {@link hasAvailable} again: buffers made available before the store are not kicked.
   * @param enabled true to ask for kicks
   * VIRTIO 1.2 §2.8.10, §2.8.21.3.
   */
  setNotification(enabled: boolean): void {
    const ev = this.ring.deviceEvent;
    if (enabled && this.eventIdx) {
      ev[0] = this.lastAvailIdx | (this.availWrap ? 0x8000 : 0);
      // ORDERING: offset/wrap before flags; the seq-cst store also orders it before the
      // caller's next hasAvailable() read.
      Atomics.store(ev, 1, RING_EVENT_FLAGS_DESC);
    } else {
      Atomics.store(ev, 1, enabled ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE);
    }
    const log = this.mem.log;
    if (log) {
      log.mark(this.deviceEventGpa, 4);
      log.flush();
    }
  }

  /**
   * Whether the descriptor at the next position is available.
   * @returns true when `pop()` would return a chain (or throw for a malformed one)
   * VIRTIO 1.2 §2.8.1.
   */
  hasAvailable(): boolean {
    // ORDERING: atomic load of the flags word, as in pop().
    return this.isAvail(Atomics.load(this.ring.u16, this.lastAvailIdx * 8 + 7));
  }

  /**
   * Ring state for GET_VRING_BASE / migration. `usedIdx`/`usedWrap` are the published used
   * position: entries pushed but not published are not counted (call publish() first).
   * @returns next avail position and wrap counter, next used position and wrap counter
   * vhost-user GET_VRING_BASE (packed encoding: see {@link packedBaseToNum}).
   */
  getBase(): PackedBase {
    return {
      availIdx: this.lastAvailIdx,
      availWrap: this.availWrap,
      usedIdx: this.publishedUsedIdx,
      usedWrap: this.publishedUsedWrap,
    };
  }

  private isAvail(flags: number): boolean {
    const avail = (flags & PACKED_DESC_F_AVAIL) !== 0;
    const used = (flags & PACKED_DESC_F_USED) !== 0;
    return avail === this.availWrap && used !== this.availWrap;
  }

  private markUsed(pos: number): void {
    const log = this.mem.log;
    if (!log) return;
    const offset = pos * PACKED_DESC_SIZE;
    if (this.usedLogAddr !== null) log.mark(this.usedLogAddr + offset, PACKED_DESC_SIZE);
    log.mark(this.descGpa + offset, PACKED_DESC_SIZE);
  }

  private needCall(): boolean {
    const ev = this.ring.driverEvent;
    // ORDERING: the flags stores above are seq-cst; this load cannot move before them.
    const flags = Atomics.load(ev, 1);
    if (!this.eventIdx) return flags !== RING_EVENT_FLAGS_DISABLE;
    let old = this.signalledUsed;
    const now = this.usedIdx;
    const valid = this.signalledUsedValid;
    this.signalledUsed = now;
    this.signalledUsedValid = true;
    if (flags !== RING_EVENT_FLAGS_DESC) return flags !== RING_EVENT_FLAGS_DISABLE;
    if (!valid) return true;
    // ORDERING: the used flags were stored (seq-cst) before this load of the driver's event
    // offset/wrap, as the spec's barrier before reading the event suppression structure.
    const offWrap = Atomics.load(ev, 0);
    let off = offWrap & 0x7fff;
    if (now <= old) old -= this.size;
    if (offWrap >> 15 !== (this.usedWrap ? 1 : 0)) off -= this.size;
    return vringNeedEvent(off, now, old);
  }
}

function descAddr(u32: Uint32Array, pos: number, queue: number | undefined): number {
  const lo = u32[pos * 4] ?? 0;
  const hi = u32[pos * 4 + 1] ?? 0;
  if (hi >= ADDR_HIGH_LIMIT) {
    throw vqError(
      "desc.addr",
      hi * U32_LIMIT + lo,
      `descriptor ${pos} address is beyond 2^53`,
      queue,
    );
  }
  return hi * U32_LIMIT + lo;
}

/** Collects and validates the segments of one chain (internal). */
class ChainBuilder {
  readonly readable: Segment[] = [];
  readonly writable: Segment[] = [];
  readableLength = 0;
  writableLength = 0;

  constructor(
    private readonly mem: GuestMemory,
    private readonly queue: number | undefined,
  ) {}

  add(addr: number, len: number, writable: boolean, flags: number): void {
    if (!writable && this.writable.length > 0) {
      throw vqError(
        "desc.flags",
        flags,
        "device-readable descriptor after a device-writable one",
        this.queue,
      );
    }
    // A zero-length descriptor is legal and carries nothing: no segment (as the split ring).
    if (len === 0) return;
    checkCovered(this.mem, addr, len, this.queue);
    const seg: Segment = { gpa: addr as Gpa, len, writable };
    if (writable) {
      this.writableLength += len;
      if (this.readableLength + this.writableLength >= U32_LIMIT) this.tooLong();
      this.writable.push(seg);
    } else {
      this.readableLength += len;
      if (this.readableLength + this.writableLength >= U32_LIMIT) this.tooLong();
      this.readable.push(seg);
    }
  }

  addIndirect(table: number, len: number): void {
    if (len === 0 || len % PACKED_DESC_SIZE !== 0) {
      throw vqError(
        "indirect.len",
        len,
        `indirect table length ${len} is not a non-zero multiple of 16`,
        this.queue,
      );
    }
    const entries = len / PACKED_DESC_SIZE;
    if (entries > MAX_INDIRECT_ENTRIES) {
      throw vqError(
        "chain length",
        entries,
        `indirect table has ${entries} entries (more than 32768)`,
        this.queue,
      );
    }
    let region: Region;
    try {
      region = this.mem.regionFor(table as Gpa, len);
    } catch (err) {
      throw vqError(
        "desc.addr",
        table,
        `indirect table [${table}, +${len}) is not inside one guest memory region: ${(err as Error).message}`,
        this.queue,
      );
    }
    // LIFETIME: `view` is the region's own DataView, used only during this call.
    const view = region.view;
    const base = table - region.gpa;
    for (let i = 0; i < entries; i++) {
      const o = base + i * PACKED_DESC_SIZE;
      const lo = view.getUint32(o, true);
      const hi = view.getUint32(o + 4, true);
      const elen = view.getUint32(o + 8, true);
      const eflags = view.getUint16(o + 14, true);
      if ((eflags & PACKED_DESC_F_INDIRECT) !== 0) {
        throw vqError(
          "desc.flags",
          eflags,
          `nested indirect descriptor at entry ${i} of the table at ${table}`,
          this.queue,
        );
      }
      if (hi >= ADDR_HIGH_LIMIT) {
        throw vqError(
          "desc.addr",
          hi * U32_LIMIT + lo,
          `indirect entry ${i} address is beyond 2^53`,
          this.queue,
        );
      }
      // Only WRITE is meaningful inside a table; NEXT and the id are ignored (§2.8.7).
      this.add(hi * U32_LIMIT + lo, elen, (eflags & PACKED_DESC_F_WRITE) !== 0, eflags);
    }
  }

  finish(head: number, descCount: number): DescChain {
    return {
      head,
      descCount,
      readable: this.readable,
      writable: this.writable,
      readableLength: this.readableLength,
      writableLength: this.writableLength,
    };
  }

  private tooLong(): never {
    throw vqError(
      "desc.len",
      this.readableLength + this.writableLength,
      "total buffer length exceeds 2^32-1",
      this.queue,
    );
  }
}

/**
 * Check that [addr, addr+len) is guest memory; the range may span adjacent regions.
 * @throws VirtqueueError field "desc.addr"
 */
function checkCovered(
  mem: GuestMemory,
  addr: number,
  len: number,
  queue: number | undefined,
): void {
  if (mem.tryRegionFor(addr, len) !== null || mem.covers(addr, len)) return;
  throw vqError("desc.addr", addr, `buffer [${addr}, +${len}) is not inside guest memory`, queue);
}

interface DriverBufferState {
  /** descriptors the buffer occupies in the ring (0 = id free) */
  count: number;
  token: unknown;
}

/**
 * Driver side (front-end / test mock) of a packed virtqueue.
 *
 * `add()` writes a buffer's descriptors (all but the head's flags); `kick()` stores the heads'
 * flags (the first pending head last), then reads the device event suppression structure to
 * decide whether to notify. `getUsed()` reads the used descriptor at the driver's used position.
 * Buffer ids come from a free list of 0..size-1; every descriptor of a buffer carries its id.
 * The driver does not check that segments lie in guest memory (tests use it to build malformed
 * rings) and does not mark the dirty log (guest writes are not the back-end's to log).
 *
 * VIRTIO 1.2 §2.8.21 (Supplying buffers), §2.8.22 (Receiving used buffers).
 */
export class PackedDriverQueue implements DriverQueue {
  /** queue size in descriptors */
  readonly size: number;
  private readonly mem: GuestMemory;
  private readonly ring: RingViews;
  private readonly eventIdx: boolean;
  private readonly indirect: boolean;
  private availIdx = 0;
  private availWrap = true;
  private usedIdx = 0;
  private usedWrap = true;
  private freeDescs: number;
  private readonly freeIds: number[] = [];
  private readonly buffers: DriverBufferState[] = [];
  private readonly pendingHeads: PendingUsed[] = [];
  private numAdded = 0;

  /**
   * Create the driver side and initialise the ring memory: descriptors zeroed, both event
   * suppression structures set to ENABLE with offset 0; or, with `opts.restore`, continue at a
   * saved position over ring memory left as it is (descriptors in flight, used descriptors not
   * yet collected and the event suppression structures are taken from the ring).
   * @param mem guest memory holding the ring
   * @param opts ring addresses, size, negotiated features, optional saved position
   * @throws VirtqueueError (field "size", "desc", "driverEvent", "deviceEvent") for a bad size or
   *   a misaligned or unmapped ring; (field "position.*") for a saved position that does not fit
   *   this ring (index out of range, ids repeated or out of range, in-flight extents that do not
   *   add up to the distance between the used and the avail position)
   * VIRTIO 1.2 §2.8.13 ("The descriptor ring is zero-initialized"), §2.8.21, §2.8.22.
   */
  constructor(mem: GuestMemory, opts: PackedDriverQueueOptions) {
    this.mem = mem;
    this.size = opts.size;
    this.ring = new RingViews(
      mem,
      opts.size,
      opts.desc,
      opts.driverEvent,
      opts.deviceEvent,
      undefined,
    );
    this.eventIdx = opts.eventIdx;
    this.indirect = opts.indirect ?? false;
    this.freeDescs = opts.size;
    for (let id = 0; id < opts.size; id++) this.buffers.push({ count: 0, token: undefined });
    if (opts.restore !== undefined) {
      this.restorePosition(opts.restore);
      return;
    }
    for (let id = opts.size - 1; id >= 0; id--) this.freeIds.push(id);
    this.ring.u32.fill(0);
    this.ring.driverEvent.fill(0);
    this.ring.deviceEvent.fill(0);
  }

  /**
   * The driver's bookkeeping, to rebuild this driver over the same ring memory later (e.g. on a
   * migration destination) with {@link PackedDriverQueueOptions.restore}.
   * @returns positions, wrap counters, in-flight ids with their extents, free ids, unpublished
   *   heads (JSON-safe; tokens are not included)
   * VIRTIO 1.2 §2.8.21, §2.8.22 (the driver's next avail / next used positions and counters).
   */
  position(): PackedDriverPosition {
    const inFlight: { id: number; count: number }[] = [];
    this.buffers.forEach((b, id) => {
      if (b.count > 0) inFlight.push({ id, count: b.count });
    });
    return {
      availIdx: this.availIdx,
      availWrap: this.availWrap,
      usedIdx: this.usedIdx,
      usedWrap: this.usedWrap,
      inFlight,
      freeIds: this.freeIds.slice(),
      pendingHeads: this.pendingHeads.map((h) => ({ pos: h.pos, flags: h.flags })),
      pendingDescs: this.numAdded,
    };
  }

  /** Check a saved position against this ring and load it (the ring memory is not touched). */
  private restorePosition(r: PackedDriverRestore): void {
    const p = r.position;
    const size = this.size;
    const bad = (field: string, value: number, what: string): VirtqueueError =>
      vqError(`position.${field}`, value, what);
    for (const [field, v] of [
      ["availIdx", p.availIdx],
      ["usedIdx", p.usedIdx],
    ] as const) {
      if (!Number.isInteger(v) || v < 0 || v >= size) {
        throw bad(field, v, `${field} ${v} is not below the queue size ${size}`);
      }
    }
    const seen = new Uint8Array(size);
    let descs = 0;
    for (const b of p.inFlight) {
      if (!Number.isInteger(b.id) || b.id < 0 || b.id >= size || seen[b.id] !== 0) {
        throw bad("inFlight.id", b.id, `in-flight id ${b.id} is out of range or repeated`);
      }
      if (!Number.isInteger(b.count) || b.count < 1 || b.count > size) {
        throw bad("inFlight.count", b.count, `buffer ${b.id} occupies ${b.count} descriptors`);
      }
      seen[b.id] = 1;
      descs += b.count;
    }
    // Descriptors between the next used and the next avail position, across the wrap.
    const span = p.availIdx - p.usedIdx + (p.availWrap !== p.usedWrap ? size : 0);
    if (span < 0 || span > size || descs !== span) {
      throw bad(
        "inFlight.count",
        descs,
        `in-flight buffers occupy ${descs} descriptors but the ring holds ${span} between used ` +
          `${p.usedIdx}/${Number(p.usedWrap)} and avail ${p.availIdx}/${Number(p.availWrap)}`,
      );
    }
    if (p.freeIds.length + p.inFlight.length !== size) {
      throw bad("freeIds", p.freeIds.length, `free ids and in-flight ids do not make ${size} ids`);
    }
    for (const id of p.freeIds) {
      if (!Number.isInteger(id) || id < 0 || id >= size || seen[id] !== 0) {
        throw bad("freeIds", id, `free id ${id} is out of range, repeated or in flight`);
      }
      seen[id] = 1;
    }
    for (const h of p.pendingHeads) {
      if (!Number.isInteger(h.pos) || h.pos < 0 || h.pos >= size) {
        throw bad("pendingHeads.pos", h.pos, `unpublished head at ${h.pos} is outside the ring`);
      }
      if (!Number.isInteger(h.flags) || h.flags < 0 || h.flags > 0xffff) {
        throw bad("pendingHeads.flags", h.flags, `flags ${h.flags} are not a u16`);
      }
    }
    if (!Number.isInteger(p.pendingDescs) || p.pendingDescs < 0 || p.pendingDescs > descs) {
      throw bad("pendingDescs", p.pendingDescs, `${p.pendingDescs} unpublished descriptors`);
    }
    for (const b of p.inFlight) {
      const state = this.buffers[b.id] as DriverBufferState;
      state.count = b.count;
      state.token = r.tokens?.get(b.id);
    }
    this.freeIds.push(...p.freeIds);
    this.freeDescs = size - descs;
    this.availIdx = p.availIdx;
    this.availWrap = p.availWrap;
    this.usedIdx = p.usedIdx;
    this.usedWrap = p.usedWrap;
    for (const h of p.pendingHeads) this.pendingHeads.push({ pos: h.pos, flags: h.flags });
    this.numAdded = p.pendingDescs;
  }

  /** Descriptors free in the ring. */
  get freeCount(): number {
    return this.freeDescs;
  }

  /**
   * Write a buffer as a chain of descriptors (made available by the next {@link kick}).
   * @param segments elements, device-readable ones first (1..size of them)
   * @param token returned with the buffer by getUsed()
   * @returns the buffer id, or null when the ring lacks free descriptors
   * @throws RangeError for no segments, more than `size`, a readable segment after a writable
   *   one, or an address/length that does not fit the descriptor fields
   * VIRTIO 1.2 §2.8.21.1 (Placing available buffers into the descriptor ring).
   */
  add(segments: Segment[], token?: unknown): number | null {
    const n = segments.length;
    if (n === 0 || n > this.size) {
      throw new RangeError(`a buffer needs 1..${this.size} segments, got ${n}`);
    }
    checkSegments(segments);
    if (n > this.freeDescs) return null;
    const id = this.freeIds.pop() as number;
    let pos = this.availIdx;
    let wrap = this.availWrap;
    let headFlags = 0;
    for (let k = 0; k < n; k++) {
      const s = segments[k] as Segment;
      let flags = wrap ? PACKED_DESC_F_AVAIL : PACKED_DESC_F_USED;
      if (s.writable) flags |= PACKED_DESC_F_WRITE;
      if (k < n - 1) flags |= PACKED_DESC_F_NEXT;
      this.writeDesc(pos, s.gpa, s.len, id);
      // ORDERING: the head's flags are stored by kick(), after every other descriptor.
      if (k === 0) headFlags = flags;
      else this.ring.u16[pos * 8 + 7] = flags;
      pos++;
      if (pos === this.size) {
        pos = 0;
        wrap = !wrap;
      }
    }
    this.pendingHeads.push({ pos: this.availIdx, flags: headFlags });
    this.commit(id, n, pos, wrap, token);
    return id;
  }

  /**
   * Write a buffer as one indirect descriptor whose table (`16 * segments.length` bytes) is
   * written at `table` in guest memory; the caller keeps that memory until the buffer is used.
   * @param segments elements, device-readable ones first (1..32768 of them)
   * @param table GPA for the table (16-byte aligned by convention; checked to be guest memory)
   * @param token returned with the buffer by getUsed()
   * @returns the buffer id, or null when the ring has no free descriptor
   * @throws Error when indirect descriptors were not negotiated; RangeError as for add();
   *   GuestMemoryError when the table is not inside guest memory
   * VIRTIO 1.2 §2.8.7 (Indirect flag).
   */
  addIndirect(segments: Segment[], table: Gpa, token?: unknown): number | null {
    if (!this.indirect) {
      throw new Error("addIndirect: VIRTIO_F_INDIRECT_DESC was not negotiated for this queue");
    }
    const n = segments.length;
    if (n === 0 || n > MAX_INDIRECT_ENTRIES) {
      throw new RangeError(`an indirect buffer needs 1..32768 segments, got ${n}`);
    }
    checkSegments(segments);
    if (this.freeDescs === 0) return null;
    const bytes = this.mem.gpaToView(table, n * PACKED_DESC_SIZE);
    // LIFETIME: `dv` is used only within this call.
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let k = 0; k < n; k++) {
      const s = segments[k] as Segment;
      const o = k * PACKED_DESC_SIZE;
      dv.setUint32(o, s.gpa % U32_LIMIT, true);
      dv.setUint32(o + 4, Math.floor(s.gpa / U32_LIMIT), true);
      dv.setUint32(o + 8, s.len, true);
      dv.setUint16(o + 12, 0, true);
      dv.setUint16(o + 14, s.writable ? PACKED_DESC_F_WRITE : 0, true);
    }
    const id = this.freeIds.pop() as number;
    const pos = this.availIdx;
    this.writeDesc(pos, table, n * PACKED_DESC_SIZE, id);
    const flags =
      PACKED_DESC_F_INDIRECT | (this.availWrap ? PACKED_DESC_F_AVAIL : PACKED_DESC_F_USED);
    this.pendingHeads.push({ pos, flags });
    let next = pos + 1;
    let wrap = this.availWrap;
    if (next === this.size) {
      next = 0;
      wrap = !wrap;
    }
    this.commit(id, 1, next, wrap, token);
    return id;
  }

  /**
   * Make the buffers added since the last kick available and decide whether to notify.
   * @returns true when an available buffer notification is needed: something was added and the
   *   device event suppression is ENABLE, or DESC (EVENT_IDX) with its offset/wrap crossed
   * VIRTIO 1.2 §2.8.21.2; Linux `virtqueue_kick_prepare_packed`.
   */
  kick(): boolean {
    const n = this.pendingHeads.length;
    if (n === 0) return false;
    const u16 = this.ring.u16;
    // ORDERING: every descriptor is written; store the later heads' flags, then the first
    // head's flags last, which exposes the whole batch.
    for (let k = 1; k < n; k++) {
      const h = this.pendingHeads[k] as PendingUsed;
      Atomics.store(u16, h.pos * 8 + 7, h.flags);
    }
    const first = this.pendingHeads[0] as PendingUsed;
    Atomics.store(u16, first.pos * 8 + 7, first.flags);
    this.pendingHeads.length = 0;
    const added = this.numAdded;
    this.numAdded = 0;
    const ev = this.ring.deviceEvent;
    // ORDERING: the seq-cst flags store above precedes this read of the suppression structure.
    const flags = Atomics.load(ev, 1);
    if (flags !== RING_EVENT_FLAGS_DESC || !this.eventIdx) {
      return flags !== RING_EVENT_FLAGS_DISABLE;
    }
    const offWrap = Atomics.load(ev, 0);
    let event = offWrap & 0x7fff;
    if (offWrap >> 15 !== (this.availWrap ? 1 : 0)) event -= this.size;
    const now = this.availIdx;
    return vringNeedEvent(event, now, now - added);
  }

  /**
   * Take the next used buffer.
   * @returns id, written length (0 when the used descriptor has no WRITE flag) and the token
   *   given to add(), or null when the device has not used the next buffer
   * @throws VirtqueueError field "used.id" when the id is >= size or not outstanding
   * VIRTIO 1.2 §2.8.22.
   */
  getUsed(): { id: number; len: number; token: unknown } | null {
    const pos = this.usedIdx;
    const { u16, u32 } = this.ring;
    // ORDERING: flags first; id and len are read after the device's flags store is seen.
    const flags = Atomics.load(u16, pos * 8 + 7);
    const wrapBits = this.usedWrap ? AVAIL_USED : 0;
    if ((flags & AVAIL_USED) !== wrapBits) return null;
    const id = u16[pos * 8 + 6] ?? 0;
    const state = id < this.size ? this.buffers[id] : undefined;
    if (state === undefined || state.count === 0) {
      throw vqError(
        "used.id",
        id,
        `used descriptor at ${pos} names buffer id ${id}, which is not outstanding`,
      );
    }
    const len = (flags & PACKED_DESC_F_WRITE) !== 0 ? (u32[pos * 4 + 2] ?? 0) : 0;
    const next = pos + state.count;
    if (next >= this.size) {
      this.usedIdx = next - this.size;
      this.usedWrap = !this.usedWrap;
    } else {
      this.usedIdx = next;
    }
    this.freeDescs += state.count;
    state.count = 0;
    const token = state.token;
    state.token = undefined;
    this.freeIds.push(id);
    return { id, len, token };
  }

  /**
   * Ask the device for used buffer notifications or suppress them (driver event suppression):
   * DISABLE; ENABLE; or, with EVENT_IDX, DESC at the driver's next used position. After
   * enabling, call getUsed() again: buffers used before the store are not notified.
   * @param enabled true to ask for notifications
   * VIRTIO 1.2 §2.8.10, §2.8.22.
   */
  setNotification(enabled: boolean): void {
    if (enabled && this.eventIdx) {
      this.setUsedEvent(0);
      return;
    }
    // ORDERING: seq-cst store, ordered before the caller's next getUsed() read.
    Atomics.store(
      this.ring.driverEvent,
      1,
      enabled ? RING_EVENT_FLAGS_ENABLE : RING_EVENT_FLAGS_DISABLE,
    );
  }

  /**
   * With EVENT_IDX, ask for one used buffer notification when the device writes the used
   * descriptor `descriptorsAhead` positions past the driver's next used position (DESC mode).
   * @param descriptorsAhead 0..size-1
   * @throws Error when EVENT_IDX was not negotiated; RangeError for a bad distance
   * VIRTIO 1.2 §2.8.10 (RING_EVENT_FLAGS_DESC).
   */
  setUsedEvent(descriptorsAhead: number): void {
    if (!this.eventIdx) {
      throw new Error("setUsedEvent: VIRTIO_F_RING_EVENT_IDX was not negotiated for this queue");
    }
    if (
      !Number.isInteger(descriptorsAhead) ||
      descriptorsAhead < 0 ||
      descriptorsAhead >= this.size
    ) {
      throw new RangeError(
        `descriptorsAhead must be in 0..${this.size - 1}, got ${descriptorsAhead}`,
      );
    }
    let pos = this.usedIdx + descriptorsAhead;
    let wrap = this.usedWrap;
    if (pos >= this.size) {
      pos -= this.size;
      wrap = !wrap;
    }
    const ev = this.ring.driverEvent;
    ev[0] = pos | (wrap ? 0x8000 : 0);
    // ORDERING: offset/wrap before the flags (seq-cst store).
    Atomics.store(ev, 1, RING_EVENT_FLAGS_DESC);
  }

  private writeDesc(pos: number, addr: number, len: number, id: number): void {
    const u32 = this.ring.u32;
    u32[pos * 4] = addr % U32_LIMIT;
    u32[pos * 4 + 1] = Math.floor(addr / U32_LIMIT);
    u32[pos * 4 + 2] = len;
    this.ring.u16[pos * 8 + 6] = id;
  }

  private commit(id: number, count: number, pos: number, wrap: boolean, token: unknown): void {
    const state = this.buffers[id] as DriverBufferState;
    state.count = count;
    state.token = token;
    this.freeDescs -= count;
    this.availIdx = pos;
    this.availWrap = wrap;
    this.numAdded += count;
  }
}

/** Check every segment's fields and the readable-then-writable order before writing any. */
function checkSegments(segments: Segment[]): void {
  let sawWritable = false;
  for (let k = 0; k < segments.length; k++) {
    const s = segments[k] as Segment;
    checkDescFields(s.gpa, s.len);
    if (s.writable) sawWritable = true;
    else if (sawWritable) {
      throw new RangeError(`segment ${k} is device-readable but follows a device-writable one`);
    }
  }
}

function checkDescFields(addr: number, len: number): void {
  if (!Number.isSafeInteger(addr) || addr < 0) {
    throw new RangeError(`descriptor address ${addr} is not a non-negative safe integer`);
  }
  if (!Number.isInteger(len) || len < 0 || len >= U32_LIMIT) {
    throw new RangeError(`descriptor length ${len} is not a u32`);
  }
}
