/**
 * Split virtqueues (VIRTIO 1.2 §2.7): the device side used by back-ends and the driver side
 * used by front-ends and test mocks.
 *
 * Ring fields are read and written through typed-array views (the host is checked to be
 * little-endian once per queue), over the one region that holds each ring part; indirect
 * tables, which may lie anywhere, are read with DataView little-endian.
 *
 * LIFETIME: a queue holds views into guest memory. It must not be used after the regions
 * holding its rings are unmapped (pop()/publish() then throw a VirtqueueError "memory").
 */
import { isLittleEndianHost } from "../memory/dirty-log.js";
import type { Gpa } from "../memory/address.js";
import type { GuestMemory, Region } from "../memory/guest-memory.js";
import {
  DESC_SIZE,
  MAX_QUEUE_SIZE,
  SPLIT_AVAIL_ALIGN,
  SPLIT_DESC_ALIGN,
  SPLIT_USED_ALIGN,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_USED_F_NO_NOTIFY,
  vringNeedEvent,
} from "./layout.js";
import { InFlight, VirtqueueError } from "./types.js";
import type {
  DescChain,
  DeviceQueue,
  DriverQueue,
  QueueBase,
  Segment,
  UsedLogOptions,
} from "./types.js";

const TWO_32 = 4294967296;
/** high 32 bits of an address at or above 2^53 */
const ADDR_HI_LIMIT = 0x200000;
/** default bound on descriptors per chain, direct and indirect together (as QEMU, Linux vhost) */
const DEFAULT_MAX_CHAIN = 1024;

/** Options of {@link SplitDeviceQueue}. */
export interface SplitDeviceQueueOptions {
  /** queue size: a power of 2, at most 32768 */
  size: number;
  /** guest-physical address of the descriptor table (16-byte aligned) */
  desc: Gpa;
  /** guest-physical address of the available ring (2-byte aligned) */
  avail: Gpa;
  /** guest-physical address of the used ring (4-byte aligned) */
  used: Gpa;
  /** VIRTIO_F_EVENT_IDX (VIRTIO_RING_F_EVENT_IDX) was negotiated */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC was negotiated (default false: INDIRECT descriptors are errors) */
  indirect?: boolean;
  /** next available index to process (SET_VRING_BASE; default 0) */
  lastAvailIdx?: number;
  /** VHOST_VRING_F_LOG: log used-ring writes at logGuestAddr + offset; null: at the used GPA */
  usedLog?: UsedLogOptions | null;
  /**
   * the chains in flight on this ring, taken over from the queue object this one replaces
   * (a rebuild: SET_VRING_ADDR, memory-table change); default: none
   */
  inFlight?: InFlight;
  /** queue index, named in errors */
  index?: number;
  /**
   * most descriptors one chain may have, direct and indirect together
   * (default max(size, 1024)); longer chains are refused with "chain length"
   */
  maxChainLength?: number;
}

/** Options of {@link SplitDriverQueue}. */
export interface SplitDriverQueueOptions {
  /** queue size: a power of 2, at most 32768 */
  size: number;
  /** guest-physical address of the descriptor table (16-byte aligned) */
  desc: Gpa;
  /** guest-physical address of the available ring (2-byte aligned) */
  avail: Gpa;
  /** guest-physical address of the used ring (4-byte aligned) */
  used: Gpa;
  /** VIRTIO_F_EVENT_IDX was negotiated */
  eventIdx: boolean;
  /**
   * use indirect tables for buffers of more than one segment (VIRTIO_F_INDIRECT_DESC);
   * needs `indirectTable`
   */
  indirect?: boolean;
  /** guest area of `size * indirectMaxSegments * 16` bytes for the indirect tables (16-aligned) */
  indirectTable?: Gpa;
  /** most segments per indirect table (default 16); longer buffers use direct descriptors */
  indirectMaxSegments?: number;
  /** initial avail.idx and used.idx written at initialisation (default 0; for wrap tests) */
  startIdx?: number;
  /** queue index, named in errors */
  index?: number;
}

function checkSize(size: number, queue: number | undefined): void {
  if (!Number.isInteger(size) || size < 1 || size > MAX_QUEUE_SIZE || (size & (size - 1)) !== 0) {
    throw new VirtqueueError(
      "size",
      size,
      `split queue size must be a power of 2 in [1, ${MAX_QUEUE_SIZE}]`,
      queue,
    );
  }
  if (!isLittleEndianHost()) {
    throw new VirtqueueError("host", 0, "ring views need a little-endian host", queue);
  }
}

function checkU16(field: string, value: number, queue: number | undefined): void {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff) {
    throw new VirtqueueError(field, value, "must be an integer in [0, 65535]", queue);
  }
}

/**
 * Locate one ring part: it must be aligned, lie entirely in one region and be aligned in
 * that region's buffer (typed arrays and Atomics need it).
 */
function ringPlace(
  mem: GuestMemory,
  part: string,
  g: number,
  bytes: number,
  align: number,
  queue: number | undefined,
): { region: Region; offset: number } {
  if (!Number.isSafeInteger(g) || g < 0 || g % align !== 0) {
    throw new VirtqueueError(part, g, `${part} ring address must be ${align}-byte aligned`, queue);
  }
  const region = mem.tryRegionFor(g, bytes);
  if (region === null) {
    throw new VirtqueueError(
      part,
      g,
      `${part} ring [0x${g.toString(16)}, +${bytes}) does not lie inside one memory region`,
      queue,
    );
  }
  const offset = region.base + (g - region.gpa);
  if (offset % align !== 0) {
    throw new VirtqueueError(
      part,
      g,
      `${part} ring is not ${align}-byte aligned inside its mapping (buffer offset ${offset})`,
      queue,
    );
  }
  return { region, offset };
}

/**
 * The device side of a split virtqueue (VIRTIO 1.2 §2.7).
 *
 * LIFETIME: a chain returned by pop() belongs to the queue: it is valid until it is pushed to
 * used or cancelled, after which the queue reuses the object (and its segment objects) for a
 * later pop of the same head (no allocation per chain on the data path). A device that keeps a
 * chain's fields after pushUsed copies them first. Its segments are checked to lie inside
 * guest memory; a segment spanning two adjacent regions is split into
 * one segment per region; zero-length descriptors yield no segment.
 *
 * Chain walking rules: head and next indexes < size ("avail.ring", "desc.next"); a descriptor
 * reached twice is a loop ("desc.next" / "indirect.next", value = the index reached twice);
 * INDIRECT needs the feature, must not be combined with NEXT, must not appear inside an
 * indirect table ("desc.flags") and must have a non-zero length that is a multiple of 16
 * ("indirect.len"); tables over 32768 entries and chains over `maxChainLength` descriptors
 * are refused ("chain length"); a readable descriptor after a writable one ("desc.flags");
 * total length over 2^32 - 1 ("desc.len"); buffers outside guest memory ("desc.addr").
 */
export class SplitDeviceQueue implements DeviceQueue {
  /** number of descriptors in the ring */
  readonly size: number;
  /** the queue index named in errors, if given */
  readonly index: number | undefined;

  readonly #mem: GuestMemory;
  readonly #mask: number;
  readonly #eventIdx: boolean;
  readonly #indirect: boolean;
  readonly #maxChain: number;
  readonly #descU32: Uint32Array;
  readonly #availU16: Uint16Array;
  readonly #usedU16: Uint16Array;
  readonly #usedU32: Uint32Array;
  /** u16 index of used_event in the avail ring */
  readonly #usedEventAt: number;
  /** u16 index of avail_event in the used ring */
  readonly #availEventAt: number;
  /** address at which used-ring byte 0 is logged */
  readonly #usedLogBase: number;

  #lastAvail: number;
  #usedIdx: number;
  #pendingUsed = 0;
  readonly #inFlight: InFlight;
  #notify = true;
  #availEventWritten = -1;
  #signalledValid = false;

  /** loop detection: stamp[i] === epoch when descriptor i was seen in the current chain */
  readonly #stamp: Uint32Array;
  #indStamp: Uint32Array | null = null;
  #epoch = 0;
  /** scratch totals of the chain being walked */
  #rlen = 0;
  #wlen = 0;
  #count = 0;
  /** segments filled in so far in the chain being walked (readable, writable) */
  #nr = 0;
  #nw = 0;
  /** one reusable chain object per head, and whether it is in flight */
  readonly #pool: (DescChain | null)[];
  readonly #poolBusy: Uint8Array;

  /**
   * Attach to a split ring the driver has set up (vhost-user: SET_VRING_NUM, SET_VRING_ADDR,
   * SET_VRING_BASE, ring start). Re-reads used.idx from guest memory.
   * @param mem guest memory holding the rings
   * @param opts ring addresses, size, negotiated features and the saved avail index
   * @throws VirtqueueError naming the ring part ("desc", "avail", "used") that is misaligned
   *   or not inside one region, or "size" / "lastAvailIdx" / "maxChainLength" when invalid
   */
  constructor(mem: GuestMemory, opts: SplitDeviceQueueOptions) {
    const q = opts.index;
    const size = opts.size;
    checkSize(size, q);
    const lastAvail = opts.lastAvailIdx ?? 0;
    checkU16("lastAvailIdx", lastAvail, q);
    const maxChain = opts.maxChainLength ?? Math.max(size, DEFAULT_MAX_CHAIN);
    if (!Number.isInteger(maxChain) || maxChain < 1) {
      throw new VirtqueueError("maxChainLength", maxChain, "must be a positive integer", q);
    }
    const ev = opts.eventIdx ? 1 : 0;
    const d = ringPlace(mem, "desc", opts.desc, DESC_SIZE * size, SPLIT_DESC_ALIGN, q);
    const a = ringPlace(mem, "avail", opts.avail, 4 + 2 * size + 2 * ev, SPLIT_AVAIL_ALIGN, q);
    const u = ringPlace(mem, "used", opts.used, 4 + 8 * size + 2 * ev, SPLIT_USED_ALIGN, q);
    this.#mem = mem;
    this.size = size;
    this.index = q;
    this.#mask = size - 1;
    this.#eventIdx = opts.eventIdx;
    this.#indirect = opts.indirect ?? false;
    this.#maxChain = maxChain;
    // LIFETIME: views into the regions holding the rings; valid until they are unmapped.
    this.#descU32 = new Uint32Array(d.region.buffer, d.offset, 4 * size);
    this.#availU16 = new Uint16Array(a.region.buffer, a.offset, 2 + size + ev);
    this.#usedU16 = new Uint16Array(u.region.buffer, u.offset, 2 + 4 * size + ev);
    this.#usedU32 = new Uint32Array(u.region.buffer, u.offset, 1 + 2 * size);
    this.#usedEventAt = 2 + size;
    this.#availEventAt = 2 + 4 * size;
    this.#usedLogBase = opts.usedLog ? opts.usedLog.logGuestAddr : opts.used;
    this.#lastAvail = lastAvail;
    this.#inFlight = opts.inFlight ?? new InFlight();
    // ORDERING: the used index is re-read from guest memory whenever a ring is (re)started.
    this.#usedIdx = Atomics.load(this.#usedU16, 1);
    this.#stamp = new Uint32Array(size);
    this.#pool = new Array<DescChain | null>(size).fill(null);
    this.#poolBusy = new Uint8Array(size);
  }

  /** @returns the next available index to process (free-running u16) */
  get lastAvailIdx(): number {
    return this.#lastAvail;
  }

  /** @returns the used index as last published (free-running u16) */
  get usedIdx(): number {
    return this.#usedIdx;
  }

  /** @returns number of chains popped but not yet pushed to used */
  get inFlight(): number {
    return this.#inFlight.count;
  }

  /** @returns the chains in flight (pop order), carried into a rebuilt queue object */
  get inFlightList(): InFlight {
    return this.#inFlight;
  }

  /**
   * Give back the last chains popped, never written: last_avail_idx is rewound over them
   * (see {@link DeviceQueue.cancel}).
   * @param chains the last chains popped, in pop order
   * @returns true when rewound; false (nothing changed) when they are not the last popped
   */
  cancel(chains: readonly DescChain[]): boolean {
    if (!this.#inFlight.isTail(chains)) return false;
    const n = chains.length;
    this.#inFlight.dropTail(n);
    for (const c of chains) this.#release(c);
    this.#lastAvail = (this.#lastAvail - n) & 0xffff;
    return true;
  }

  /** @returns number of used entries pushed but not yet published */
  get pendingUsed(): number {
    return this.#pendingUsed;
  }

  #error(field: string, value: number, message: string): VirtqueueError {
    return new VirtqueueError(field, value, message, this.index);
  }

  /**
   * Take the next available chain (VIRTIO 1.2 §2.7.13, device side).
   * With EVENT_IDX and notifications enabled, finding the ring empty publishes avail_event
   * (so the driver kicks for the next buffer) and looks once more.
   * @returns the chain, or null when none is available
   * @throws VirtqueueError for a malformed ring; the avail index is then not advanced
   */
  pop(): DescChain | null {
    const avail = this.#availU16;
    if (avail.length === 0) throw this.#error("memory", 0, "guest memory was unmapped");
    // ORDERING: avail.idx is loaded (Atomics, sequentially consistent) before the ring entry
    // and the descriptors; the driver wrote those before storing idx, so plain loads after
    // this one see them.
    let idx = Atomics.load(avail, 1);
    const last = this.#lastAvail;
    if (idx === last) {
      if (!this.#eventIdx || !this.#notify || this.#availEventWritten === last) return null;
      this.#writeAvailEvent(last);
      // ORDERING: avail_event was stored (seq-cst) before this re-load of avail.idx. A driver
      // that published idx before seeing the new avail_event did not kick: we see its idx
      // here. One that publishes later sees avail_event and kicks. No lost wake-up.
      idx = Atomics.load(avail, 1);
      if (idx === last) return null;
    }
    const ahead = (idx - last) & 0xffff;
    if (ahead > this.size) {
      throw this.#error(
        "avail.idx",
        idx,
        `${ahead} buffers ahead of last_avail_idx ${last}, more than the queue size ${this.size}`,
      );
    }
    const head = avail[2 + (last & this.#mask)] as number;
    const chain = this.#walk(head);
    this.#lastAvail = (last + 1) & 0xffff;
    this.#inFlight.add(chain);
    return chain;
  }

  #nextEpoch(): number {
    let e = (this.#epoch + 1) >>> 0;
    if (e === 0) {
      this.#stamp.fill(0);
      this.#indStamp?.fill(0);
      e = 1;
    }
    this.#epoch = e;
    return e;
  }

  /** The pooled chain of a head goes back to the pool (pushed to used, or cancelled). */
  #release(chain: DescChain): void {
    const h = chain.head;
    if (this.#pool[h] === chain) this.#poolBusy[h] = 0;
  }

  #walk(head: number): DescChain {
    if (head >= this.size) {
      throw this.#error("avail.ring", head, `head index out of range (queue size ${this.size})`);
    }
    // The head's pooled chain, unless it is in flight (a driver that makes a head available
    // twice gets a second, fresh object, as before pooling). A walk that throws leaves the
    // pooled object unused: it is not in flight, so nobody sees the partial fill.
    let chain = this.#pool[head] ?? null;
    let pooled = true;
    if (chain === null) {
      chain = newChain(head);
      this.#pool[head] = chain;
    } else if (this.#poolBusy[head] !== 0) {
      chain = newChain(head);
      pooled = false;
    }
    const readable = chain.readable;
    const writable = chain.writable;
    this.#rlen = 0;
    this.#wlen = 0;
    this.#count = 0;
    this.#nr = 0;
    this.#nw = 0;
    const epoch = this.#nextEpoch();
    const stamp = this.#stamp;
    const d = this.#descU32;
    let descCount = 0;
    let i = head;
    for (;;) {
      if (stamp[i] === epoch) {
        throw this.#error("desc.next", i, `descriptor loop: descriptor ${i} reached twice`);
      }
      stamp[i] = epoch;
      descCount++;
      const o = i << 2;
      const lo = d[o] as number;
      const hi = d[o + 1] as number;
      const len = d[o + 2] as number;
      const fn = d[o + 3] as number;
      const flags = fn & 0xffff;
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        if (!this.#indirect) {
          throw this.#error("desc.flags", flags, `descriptor ${i}: INDIRECT not negotiated`);
        }
        if ((flags & VIRTQ_DESC_F_NEXT) !== 0) {
          throw this.#error("desc.flags", flags, `descriptor ${i}: INDIRECT with NEXT`);
        }
        this.#walkIndirect(lo, hi, len, epoch, readable, writable);
        break;
      }
      if (++this.#count > this.#maxChain) {
        throw this.#error("chain length", this.#count, `more than ${this.#maxChain} descriptors`);
      }
      this.#segment(lo, hi, len, flags, readable, writable, i);
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) break;
      const next = fn >>> 16;
      if (next >= this.size) {
        throw this.#error(
          "desc.next",
          next,
          `descriptor ${i}: next index out of range (queue size ${this.size})`,
        );
      }
      i = next;
    }
    if (readable.length !== this.#nr) readable.length = this.#nr;
    if (writable.length !== this.#nw) writable.length = this.#nw;
    chain.descCount = descCount;
    chain.readableLength = this.#rlen;
    chain.writableLength = this.#wlen;
    if (pooled) this.#poolBusy[head] = 1;
    return chain;
  }

  #walkIndirect(
    lo: number,
    hi: number,
    len: number,
    epoch: number,
    readable: Segment[],
    writable: Segment[],
  ): void {
    if (len === 0 || len % DESC_SIZE !== 0) {
      throw this.#error("indirect.len", len, "indirect table length is not a multiple of 16 > 0");
    }
    const n = len / DESC_SIZE;
    if (n > MAX_QUEUE_SIZE) {
      throw this.#error("chain length", n, `indirect table of more than ${MAX_QUEUE_SIZE} entries`);
    }
    if (hi >= ADDR_HI_LIMIT) {
      throw this.#error("desc.addr", hi * TWO_32 + lo, "indirect table address beyond 2^53");
    }
    const addr = hi * TWO_32 + lo;
    const region = this.#mem.tryRegionFor(addr, len);
    if (region === null) {
      throw this.#error(
        "desc.addr",
        addr,
        `indirect table [0x${addr.toString(16)}, +${len}) is not inside one memory region`,
      );
    }
    // LIFETIME: region.view is valid while the region is mapped (for the duration of pop()).
    const view = region.view;
    const base = addr - region.gpa;
    let stamp = this.#indStamp;
    if (stamp === null) {
      stamp = new Uint32Array(MAX_QUEUE_SIZE);
      this.#indStamp = stamp;
    }
    let j = 0;
    for (;;) {
      if (stamp[j] === epoch) {
        throw this.#error("indirect.next", j, `descriptor loop: indirect entry ${j} reached twice`);
      }
      stamp[j] = epoch;
      if (++this.#count > this.#maxChain) {
        throw this.#error("chain length", this.#count, `more than ${this.#maxChain} descriptors`);
      }
      const o = base + j * DESC_SIZE;
      const flags = view.getUint16(o + 12, true);
      if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
        throw this.#error("desc.flags", flags, `indirect entry ${j}: nested INDIRECT`);
      }
      this.#segment(
        view.getUint32(o, true),
        view.getUint32(o + 4, true),
        view.getUint32(o + 8, true),
        flags,
        readable,
        writable,
        j,
      );
      if ((flags & VIRTQ_DESC_F_NEXT) === 0) return;
      const next = view.getUint16(o + 14, true);
      if (next >= n) {
        throw this.#error(
          "indirect.next",
          next,
          `indirect entry ${j}: next index out of range (table of ${n} entries)`,
        );
      }
      j = next;
    }
  }

  #segment(
    lo: number,
    hi: number,
    len: number,
    flags: number,
    readable: Segment[],
    writable: Segment[],
    at: number,
  ): void {
    const isWritable = (flags & VIRTQ_DESC_F_WRITE) !== 0;
    if (isWritable) {
      this.#wlen += len;
    } else {
      if (this.#nw !== 0 || this.#wlen !== 0) {
        throw this.#error("desc.flags", flags, `descriptor ${at}: readable after a writable one`);
      }
      this.#rlen += len;
    }
    if (this.#rlen + this.#wlen > 0xffffffff) {
      throw this.#error("desc.len", len, `descriptor ${at}: chain longer than 2^32 - 1 bytes`);
    }
    if (len === 0) return;
    if (hi >= ADDR_HI_LIMIT) {
      throw this.#error("desc.addr", hi * TWO_32 + lo, `descriptor ${at}: address beyond 2^53`);
    }
    const addr = hi * TWO_32 + lo;
    const mem = this.#mem;
    const list = isWritable ? writable : readable;
    if (mem.tryRegionFor(addr, len) !== null) {
      this.#put(list, isWritable, addr, len);
      return;
    }
    if (!mem.covers(addr, len)) {
      throw this.#error(
        "desc.addr",
        addr,
        `descriptor ${at}: buffer [0x${addr.toString(16)}, +${len}) is outside guest memory`,
      );
    }
    // The buffer spans adjacent regions: one segment per region.
    let cur = addr;
    const end = addr + len;
    while (cur < end) {
      const r = mem.tryRegionFor(cur, 1) as Region;
      const n = Math.min(end, r.gpa + r.size) - cur;
      this.#put(list, isWritable, cur, n);
      cur += n;
    }
  }

  /** Fill the next segment of `list` (reusing its object when the pooled chain has one). */
  #put(list: Segment[], isWritable: boolean, gpa: number, len: number): void {
    const k = isWritable ? this.#nw++ : this.#nr++;
    const seg = list[k];
    if (seg === undefined) {
      list.push({ gpa: gpa as Gpa, len, writable: isWritable });
    } else {
      seg.gpa = gpa as Gpa;
      seg.len = len;
    }
  }

  /**
   * Put a finished chain in the used ring; the driver sees it after publish(). The used
   * element is logged when a dirty log is attached.
   * @param chain a chain returned by pop()
   * @param writtenLen bytes written into the chain's writable segments
   * @throws VirtqueueError "used.len" when writtenLen exceeds the chain's writable length,
   *   "used.id" for a bad head, "inFlight" when no chain is in flight
   * (VIRTIO 1.2 §2.7.8)
   */
  pushUsed(chain: DescChain, writtenLen: number): void {
    const inFlight = this.#inFlight.count;
    if (inFlight === 0) throw this.#error("inFlight", 0, "pushUsed without a popped chain");
    const head = chain.head;
    if (!(head >= 0 && head < this.size && Number.isInteger(head))) {
      throw this.#error("used.id", head, `head out of range (queue size ${this.size})`);
    }
    if (!(writtenLen >= 0 && writtenLen <= chain.writableLength && Number.isInteger(writtenLen))) {
      throw this.#error(
        "used.len",
        writtenLen,
        `written length exceeds the chain's writable length ${chain.writableLength}`,
      );
    }
    if (!this.#inFlight.remove(chain)) {
      throw this.#error(
        "used.id",
        head,
        `pushUsed of a chain not in flight (${inFlight} chains in flight)`,
      );
    }
    this.#release(chain);
    const slot = (this.#usedIdx + this.#pendingUsed) & this.#mask;
    const u32 = this.#usedU32;
    u32[1 + 2 * slot] = head;
    u32[2 + 2 * slot] = writtenLen;
    this.#pendingUsed++;
    const log = this.#mem.log;
    if (log !== null) log.mark(this.#usedLogBase + 4 + 8 * slot, 8);
  }

  /**
   * Make the pushed used entries visible and decide whether to notify the driver
   * (VIRTIO 1.2 §2.7.8, §2.7.7.2).
   * @returns true when the driver must be notified (used_event crossed with EVENT_IDX, else
   *   NO_INTERRUPT clear); false when nothing was pushed. The first publish with EVENT_IDX
   *   after construction always notifies (the previous decision is unknown).
   */
  publish(): boolean {
    const n = this.#pendingUsed;
    if (n === 0) return false;
    const usedU16 = this.#usedU16;
    if (usedU16.length === 0) throw this.#error("memory", 0, "guest memory was unmapped");
    const old = this.#usedIdx;
    const next = (old + n) & 0xffff;
    this.#pendingUsed = 0;
    this.#usedIdx = next;
    const log = this.#mem.log;
    // ORDERING: used elements (plain stores) and their dirty-log marks (flushed here) come
    // before used.idx (seq-cst store); the driver loads idx, then the elements.
    if (log !== null) log.flush();
    Atomics.store(usedU16, 1, next);
    if (log !== null) {
      // ORDERING: logged after the store: a log sync between mark and store cannot lose the
      // new idx.
      log.mark(this.#usedLogBase + 2, 2);
      log.flush();
    }
    // ORDERING: used.idx was stored (seq-cst) before used_event / flags are loaded: a full
    // fence, as the spec's mb() here. Otherwise a stale used_event could skip a notification
    // the driver is waiting for.
    if (this.#eventIdx) {
      const event = Atomics.load(this.#availU16, this.#usedEventAt);
      const valid = this.#signalledValid;
      this.#signalledValid = true;
      return !valid || vringNeedEvent(event, next, old);
    }
    return (Atomics.load(this.#availU16, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  }

  #writeAvailEvent(value: number): void {
    // ORDERING: seq-cst store; callers re-load avail.idx after it (see setNotification, pop).
    Atomics.store(this.#usedU16, this.#availEventAt, value);
    this.#availEventWritten = value;
    this.#logUsed(2 * this.#availEventAt, 2);
  }

  #logUsed(offset: number, len: number): void {
    const log = this.#mem.log;
    if (log !== null) {
      log.mark(this.#usedLogBase + offset, len);
      log.flush();
    }
  }

  /**
   * Ask the driver for kicks (true) or suppress them (false) (VIRTIO 1.2 §2.7.7, §2.7.10).
   * With EVENT_IDX, enabling writes avail_event = last_avail_idx and disabling stops updating
   * it (at most one more kick may come); without it, NO_NOTIFY in used.flags is cleared / set.
   * @param enabled whether kicks are wanted
   * @returns when enabling: true if buffers are already available (process them: no kick will
   *   come for them); false otherwise and when disabling
   */
  setNotification(enabled: boolean): boolean {
    this.#notify = enabled;
    if (this.#eventIdx) {
      if (!enabled) return false;
      this.#writeAvailEvent(this.#lastAvail);
    } else {
      const usedU16 = this.#usedU16;
      const flags = usedU16[0] as number;
      const next = enabled ? flags & ~VIRTQ_USED_F_NO_NOTIFY : flags | VIRTQ_USED_F_NO_NOTIFY;
      if (next !== flags) {
        // ORDERING: seq-cst store of used.flags, before the avail.idx load below.
        Atomics.store(usedU16, 0, next);
        this.#logUsed(0, 2);
      }
      if (!enabled) return false;
    }
    // ORDERING: the seq-cst store above precedes this load of avail.idx. A buffer the driver
    // published before seeing notifications enabled shows up here (see pop()).
    return Atomics.load(this.#availU16, 1) !== this.#lastAvail;
  }

  /**
   * Whether the driver has made chains available that pop() has not taken.
   * @returns true when avail.idx differs from last_avail_idx
   */
  hasAvailable(): boolean {
    // ORDERING: seq-cst load of avail.idx (the ring entries are read only by pop()).
    return Atomics.load(this.#availU16, 1) !== this.#lastAvail;
  }

  /**
   * The state for GET_VRING_BASE / migration (vhost-user: VHOST_USER_GET_VRING_BASE).
   * @returns `{ availIdx }`: the next available index to process (free-running u16)
   */
  getBase(): QueueBase {
    return { availIdx: this.#lastAvail };
  }
}

/**
 * The driver side of a split virtqueue (VIRTIO 1.2 §2.7.13, §2.7.14): what a front-end or a
 * test mock uses to offer buffers and collect used ones. Initialises the ring memory.
 *
 * Its bookkeeping (free list, chain lengths, tokens) is kept in private memory, so a device
 * writing garbage into the rings cannot corrupt it; getUsed() checks the ids the device
 * returns ("used.id", "used.idx").
 */
export class SplitDriverQueue implements DriverQueue {
  /** number of descriptors in the ring */
  readonly size: number;
  /** the queue index named in errors, if given */
  readonly index: number | undefined;

  readonly #mem: GuestMemory;
  readonly #mask: number;
  readonly #eventIdx: boolean;
  readonly #descU32: Uint32Array;
  readonly #availU16: Uint16Array;
  readonly #usedU16: Uint16Array;
  readonly #usedU32: Uint32Array;
  readonly #usedEventAt: number;
  readonly #availEventAt: number;
  readonly #indirectTable: number | null;
  readonly #indirectMax: number;

  /** free list: next free descriptor after i; also links the descriptors of a chain */
  readonly #free: Uint16Array;
  readonly #chainLen: Uint16Array;
  readonly #inUse: Uint8Array;
  readonly #tokens: unknown[];
  #freeHead = 0;
  #freeCount: number;
  #availShadow: number;
  #lastKicked: number;
  #lastUsed: number;
  #notify = true;
  #usedEventWritten = -1;

  /**
   * Set up a split ring: zero the descriptor table, write flags 0 and idx `startIdx` in both
   * rings and `startIdx` in the event fields.
   * @param mem guest memory holding the rings
   * @param opts ring addresses, size and features
   * @throws VirtqueueError naming the ring part that is misaligned or not inside one region,
   *   or "indirectTable" when indirect is on without a valid table area
   */
  constructor(mem: GuestMemory, opts: SplitDriverQueueOptions) {
    const q = opts.index;
    const size = opts.size;
    checkSize(size, q);
    const start = opts.startIdx ?? 0;
    checkU16("startIdx", start, q);
    const d = ringPlace(mem, "desc", opts.desc, DESC_SIZE * size, SPLIT_DESC_ALIGN, q);
    const a = ringPlace(mem, "avail", opts.avail, 6 + 2 * size, SPLIT_AVAIL_ALIGN, q);
    const u = ringPlace(mem, "used", opts.used, 6 + 8 * size, SPLIT_USED_ALIGN, q);
    this.#mem = mem;
    this.size = size;
    this.index = q;
    this.#mask = size - 1;
    this.#eventIdx = opts.eventIdx;
    // LIFETIME: views into the regions holding the rings; valid until they are unmapped.
    this.#descU32 = new Uint32Array(d.region.buffer, d.offset, 4 * size);
    this.#availU16 = new Uint16Array(a.region.buffer, a.offset, 3 + size);
    this.#usedU16 = new Uint16Array(u.region.buffer, u.offset, 3 + 4 * size);
    this.#usedU32 = new Uint32Array(u.region.buffer, u.offset, 1 + 2 * size);
    this.#usedEventAt = 2 + size;
    this.#availEventAt = 2 + 4 * size;
    this.#indirectMax = opts.indirectMaxSegments ?? 16;
    if (opts.indirect) {
      const t = opts.indirectTable;
      const bytes = size * this.#indirectMax * DESC_SIZE;
      if (
        t === undefined ||
        !Number.isInteger(this.#indirectMax) ||
        this.#indirectMax < 2 ||
        this.#indirectMax > MAX_QUEUE_SIZE ||
        mem.tryRegionFor(t, bytes) === null
      ) {
        throw new VirtqueueError(
          "indirectTable",
          t ?? -1,
          `indirect needs a table area of ${bytes} bytes inside one region`,
          q,
        );
      }
      this.#indirectTable = t;
    } else {
      this.#indirectTable = null;
    }
    this.#free = new Uint16Array(size);
    for (let i = 0; i < size; i++) this.#free[i] = i + 1;
    this.#chainLen = new Uint16Array(size);
    this.#inUse = new Uint8Array(size);
    this.#tokens = new Array<unknown>(size).fill(undefined);
    this.#freeCount = size;
    this.#availShadow = start;
    this.#lastKicked = start;
    this.#lastUsed = start;
    this.#descU32.fill(0);
    this.#availU16.fill(0);
    this.#usedU16.fill(0);
    this.#availU16[this.#usedEventAt] = start;
    this.#usedU16[this.#availEventAt] = start;
    // ORDERING: the indices are stored last, with seq-cst stores.
    Atomics.store(this.#usedU16, 1, start);
    Atomics.store(this.#availU16, 1, start);
  }

  /** @returns number of free descriptors */
  get freeCount(): number {
    return this.#freeCount;
  }

  /** @returns the avail index the next kick() publishes (free-running u16) */
  get availIdx(): number {
    return this.#availShadow;
  }

  /** @returns the next used index getUsed() reads (free-running u16) */
  get lastUsedIdx(): number {
    return this.#lastUsed;
  }

  /**
   * Add a buffer: its descriptors and its available-ring entry (visible after kick()).
   * Buffers of more than one segment use an indirect table when indirect is on and they fit.
   * @param segments readable segments first, then writable ones (at least one)
   * @param token returned with the buffer by getUsed()
   * @returns the head descriptor id, or null when there are not enough free descriptors
   * @throws VirtqueueError "segments" for an empty list or a readable segment after a writable
   * (VIRTIO 1.2 §2.7.13)
   */
  add(segments: Segment[], token?: unknown): number | null {
    const n = segments.length;
    if (n === 0) throw new VirtqueueError("segments", 0, "a buffer needs a segment", this.index);
    for (let k = 1; k < n; k++) {
      if ((segments[k - 1] as Segment).writable && !(segments[k] as Segment).writable) {
        throw new VirtqueueError(
          "segments",
          k,
          "readable segment after a writable one",
          this.index,
        );
      }
    }
    const table = this.#indirectTable;
    const indirect = table !== null && n > 1 && n <= this.#indirectMax;
    const need = indirect ? 1 : n;
    if (need > this.#freeCount) return null;
    const free = this.#free;
    const d = this.#descU32;
    const head = this.#freeHead;
    if (indirect) {
      const tableGpa = table + head * this.#indirectMax * DESC_SIZE;
      const view = this.#mem.regionFor(tableGpa as Gpa, n * DESC_SIZE);
      const base = tableGpa - view.gpa;
      for (let k = 0; k < n; k++) {
        const s = segments[k] as Segment;
        const flags = (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (k < n - 1 ? VIRTQ_DESC_F_NEXT : 0);
        writeDescView(view.view, base + k * DESC_SIZE, s.gpa, s.len, flags, k + 1 < n ? k + 1 : 0);
      }
      writeDesc(d, head, tableGpa, n * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0);
      this.#freeHead = free[head] as number;
    } else {
      let i = head;
      for (let k = 0; k < n; k++) {
        const s = segments[k] as Segment;
        const next = free[i] as number;
        const more = k < n - 1;
        const flags = (s.writable ? VIRTQ_DESC_F_WRITE : 0) | (more ? VIRTQ_DESC_F_NEXT : 0);
        writeDesc(d, i, s.gpa, s.len, flags, more ? next : 0);
        i = next;
      }
      this.#freeHead = i;
    }
    this.#freeCount -= need;
    this.#chainLen[head] = need;
    this.#inUse[head] = 1;
    this.#tokens[head] = token;
    this.#availU16[2 + (this.#availShadow & this.#mask)] = head;
    this.#availShadow = (this.#availShadow + 1) & 0xffff;
    return head;
  }

  /**
   * Publish the buffers added since the last kick and decide whether to notify the device
   * (VIRTIO 1.2 §2.7.13.3, §2.7.13.4).
   * @returns true when the device must be kicked (avail_event crossed with EVENT_IDX, else
   *   NO_NOTIFY clear); false when nothing was added
   */
  kick(): boolean {
    const next = this.#availShadow;
    const old = this.#lastKicked;
    if (next === old) return false;
    this.#lastKicked = next;
    // ORDERING: descriptors and avail entries (plain stores) before avail.idx (seq-cst store).
    Atomics.store(this.#availU16, 1, next);
    // ORDERING: avail.idx stored before avail_event / used.flags is loaded (a full fence).
    if (this.#eventIdx) {
      return vringNeedEvent(Atomics.load(this.#usedU16, this.#availEventAt), next, old);
    }
    return (Atomics.load(this.#usedU16, 0) & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /**
   * Take the next used buffer and free its descriptors. With EVENT_IDX and notifications
   * enabled, finding none publishes used_event and looks once more.
   * @returns the buffer's id, the length the device wrote and its token; null when none
   * @throws VirtqueueError "used.id" for an id that is not an outstanding head, "used.idx"
   *   when used.idx runs more than the queue size ahead
   */
  getUsed(): { id: number; len: number; token: unknown } | null {
    const usedU16 = this.#usedU16;
    // ORDERING: used.idx loaded (seq-cst) before the used element it covers.
    let idx = Atomics.load(usedU16, 1);
    const last = this.#lastUsed;
    if (idx === last) {
      if (!this.#eventIdx || !this.#notify || this.#usedEventWritten === last) return null;
      Atomics.store(this.#availU16, this.#usedEventAt, last);
      this.#usedEventWritten = last;
      // ORDERING: used_event stored before used.idx is re-loaded (see SplitDeviceQueue.pop).
      idx = Atomics.load(usedU16, 1);
      if (idx === last) return null;
    }
    const ahead = (idx - last) & 0xffff;
    if (ahead > this.size) {
      throw new VirtqueueError(
        "used.idx",
        idx,
        `${ahead} ahead of the last used index ${last}, more than the queue size`,
        this.index,
      );
    }
    const slot = last & this.#mask;
    const id = this.#usedU32[1 + 2 * slot] as number;
    const len = this.#usedU32[2 + 2 * slot] as number;
    if (id >= this.size || this.#inUse[id] !== 1) {
      throw new VirtqueueError("used.id", id, "not a head the driver made available", this.index);
    }
    const count = this.#chainLen[id] as number;
    let tail = id;
    for (let k = 1; k < count; k++) tail = this.#free[tail] as number;
    this.#free[tail] = this.#freeHead;
    this.#freeHead = id;
    this.#freeCount += count;
    this.#inUse[id] = 0;
    const token = this.#tokens[id];
    this.#tokens[id] = undefined;
    this.#lastUsed = (last + 1) & 0xffff;
    return { id, len, token };
  }

  /**
   * Ask the device for used-buffer notifications (VIRTIO 1.2 §2.7.7, §2.7.10).
   * With EVENT_IDX, enabling writes used_event = the next used index; without it,
   * NO_INTERRUPT in avail.flags is cleared / set.
   * @param enabled whether notifications are wanted
   * @returns when enabling: true if used buffers are already waiting; false otherwise
   */
  setNotification(enabled: boolean): boolean {
    this.#notify = enabled;
    if (this.#eventIdx) {
      if (!enabled) return false;
      // ORDERING: seq-cst store of used_event, before used.idx is re-loaded below.
      Atomics.store(this.#availU16, this.#usedEventAt, this.#lastUsed);
      this.#usedEventWritten = this.#lastUsed;
    } else {
      // ORDERING: seq-cst store of avail.flags, before used.idx is re-loaded below.
      Atomics.store(this.#availU16, 0, enabled ? 0 : VIRTQ_AVAIL_F_NO_INTERRUPT);
      if (!enabled) return false;
    }
    // ORDERING: seq-cst store above, then this load (see SplitDeviceQueue.setNotification).
    return Atomics.load(this.#usedU16, 1) !== this.#lastUsed;
  }
}

/** A fresh, empty chain object for `head` (filled by the walk). */
function newChain(head: number): DescChain {
  return { head, descCount: 0, readable: [], writable: [], readableLength: 0, writableLength: 0 };
}

/** Write one descriptor through the table's u32 view (little-endian host). */
function writeDesc(
  d: Uint32Array,
  i: number,
  addr: number,
  len: number,
  flags: number,
  next: number,
): void {
  const o = i << 2;
  d[o] = addr % TWO_32;
  d[o + 1] = Math.floor(addr / TWO_32);
  d[o + 2] = len;
  d[o + 3] = (flags | (next << 16)) >>> 0;
}

/** Write one descriptor at a byte offset of a DataView (indirect tables). */
function writeDescView(
  view: DataView,
  o: number,
  addr: number,
  len: number,
  flags: number,
  next: number,
): void {
  view.setUint32(o, addr % TWO_32, true);
  view.setUint32(o + 4, Math.floor(addr / TWO_32), true);
  view.setUint32(o + 8, len, true);
  view.setUint16(o + 12, flags, true);
  view.setUint16(o + 14, next, true);
}
