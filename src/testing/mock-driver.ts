/**
 * A mock virtio driver for device authors' tests: guest memory in a memfd (so it can be sent
 * to a back-end with SET_MEM_TABLE, or mapped a second time as another process would), a bump
 * allocator, and split queues with a buffer pool for sending and receiving payloads, plus raw
 * access to descriptors for malformed-ring tests.
 *
 * Not for production: allocation is never reclaimed and errors are plain.
 */
import { native } from "../native.js";
import { gpa as toGpa, mmapOffset, uaddr } from "../memory/address.js";
import type { Gpa } from "../memory/address.js";
import { GuestMemory } from "../memory/guest-memory.js";
import type { Region, RegionInfo } from "../memory/guest-memory.js";
import { mapRegion, unmapRegion } from "../memory/mapping.js";
import { alignUp, splitRingPlacement } from "../virtq/layout.js";
import { SplitDriverQueue } from "../virtq/split.js";
import type { SplitDeviceQueueOptions } from "../virtq/split.js";

/** Options of {@link MockGuest.create}. */
export interface MockGuestOptions {
  /** guest memory size in bytes (default 1 MiB; rounded up to the page size) */
  size?: number;
  /** guest-physical address of the first byte (default 0) */
  gpa?: number;
  /** front-end virtual address reported for the first byte (default 0x7f0000000000) */
  uaddr?: number;
  /** memfd name (default "vhostkit-mock-guest") */
  name?: string;
}

/** Options of {@link MockGuest.createSplitQueue}. */
export interface MockSplitQueueOptions {
  /** queue size (power of 2) */
  size: number;
  /** negotiate VIRTIO_F_EVENT_IDX (default false) */
  eventIdx?: boolean;
  /** use indirect tables for multi-segment buffers (default false) */
  indirect?: boolean;
  /** most segments per indirect table (default 16) */
  indirectMaxSegments?: number;
  /** initial avail.idx / used.idx (default 0) */
  startIdx?: number;
  /** bytes of each pool buffer used by send()/receive() (default 2048) */
  bufferSize?: number;
  /** queue index (default 0) */
  index?: number;
}

/**
 * Guest memory backed by one memfd, mapped once for the driver side.
 */
export class MockGuest {
  /** the memfd holding guest memory (closed by close()) */
  readonly fd: number;
  /** guest memory size in bytes */
  readonly size: number;
  /** the region as a memory table lists it */
  readonly info: RegionInfo;
  /** the driver's mapping */
  readonly region: Region;
  /** guest memory as the driver sees it */
  readonly mem: GuestMemory;
  #next: number;
  #extra: Region[] = [];
  #closed = false;

  private constructor(fd: number, info: RegionInfo) {
    this.fd = fd;
    this.size = info.size;
    this.info = info;
    this.region = mapRegion(fd, info);
    this.mem = new GuestMemory([this.region]);
    this.#next = info.gpa;
  }

  /**
   * Create a memfd of the given size and map it.
   * @param opts size, guest-physical and front-end addresses, memfd name
   * @returns the mock guest; call close() when done
   */
  static create(opts: MockGuestOptions = {}): MockGuest {
    const page = native.pageSize();
    const size = alignUp(opts.size ?? 1 << 20, page);
    const fd = native.memfdCreate(opts.name ?? "vhostkit-mock-guest");
    try {
      native.ftruncate(fd, size);
      return new MockGuest(fd, {
        gpa: toGpa(opts.gpa ?? 0),
        size,
        uaddr: uaddr(opts.uaddr ?? 0x7f0000000000),
        mmapOffset: mmapOffset(0),
      });
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /**
   * Allocate guest memory (never freed).
   * @param len bytes
   * @param align alignment (default 16)
   * @returns the guest-physical address
   * @throws RangeError when guest memory is exhausted
   */
  alloc(len: number, align = 16): Gpa {
    const at = alignUp(this.#next, align);
    if (at + len > this.info.gpa + this.size) {
      throw new RangeError(`mock guest: cannot allocate ${len} bytes (guest memory full)`);
    }
    this.#next = at + len;
    return at as Gpa;
  }

  /**
   * Map the same memfd a second time, as the back-end process would (unmapped by close()).
   * @returns guest memory over the new mapping
   */
  mapAsDevice(): GuestMemory {
    const r = mapRegion(this.fd, this.info);
    this.#extra.push(r);
    return new GuestMemory([r]);
  }

  /**
   * Copy bytes into guest memory.
   * @param g guest-physical address
   * @param data bytes
   */
  write(g: Gpa, data: Uint8Array): void {
    this.mem.write(g, data);
  }

  /**
   * Copy bytes out of guest memory.
   * @param g guest-physical address
   * @param len bytes
   * @returns a copy
   */
  read(g: Gpa, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.mem.read(g, out);
    return out;
  }

  /**
   * Allocate a split ring and its buffer pool, and initialise it as a driver would.
   * @param opts queue size, features, pool buffer size
   * @returns the queue
   */
  createSplitQueue(opts: MockSplitQueueOptions): MockSplitQueue {
    return new MockSplitQueue(this, opts);
  }

  /** Unmap every mapping and close the memfd. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const r of this.#extra) unmapRegion(r);
    unmapRegion(this.region);
    native.close(this.fd);
  }
}

/** A used buffer collected by {@link MockSplitQueue.collect}. */
export interface MockUsed {
  /** the head id */
  id: number;
  /** the length the device reported */
  len: number;
  /** for receive buffers: the first `len` bytes the device wrote (a copy); else null */
  data: Uint8Array | null;
}

interface PoolToken {
  slot: number;
  receive: boolean;
}

/**
 * A split queue driven by a mock driver, with a pool of fixed-size buffers.
 */
export class MockSplitQueue {
  /** the driver side */
  readonly driver: SplitDriverQueue;
  /** descriptor table address */
  readonly desc: Gpa;
  /** available ring address */
  readonly avail: Gpa;
  /** used ring address */
  readonly used: Gpa;
  /** queue size */
  readonly size: number;
  /** whether EVENT_IDX is on */
  readonly eventIdx: boolean;
  /** whether indirect descriptors are on */
  readonly indirect: boolean;
  /** queue index */
  readonly index: number;
  /** pool buffer size */
  readonly bufferSize: number;
  readonly #guest: MockGuest;
  readonly #pool: Gpa;
  readonly #freeSlots: number[];

  /**
   * Allocate and initialise the ring (use {@link MockGuest.createSplitQueue}).
   * @param guest the mock guest
   * @param opts queue options
   */
  constructor(guest: MockGuest, opts: MockSplitQueueOptions) {
    this.#guest = guest;
    this.size = opts.size;
    this.eventIdx = opts.eventIdx ?? false;
    this.indirect = opts.indirect ?? false;
    this.index = opts.index ?? 0;
    this.bufferSize = opts.bufferSize ?? 2048;
    const maxSeg = opts.indirectMaxSegments ?? 16;
    const probe = splitRingPlacement(0, opts.size);
    const base = guest.alloc(probe.end, 4096);
    const p = splitRingPlacement(base, opts.size);
    this.desc = p.desc as Gpa;
    this.avail = p.avail as Gpa;
    this.used = p.used as Gpa;
    const indirectTable = this.indirect ? guest.alloc(opts.size * maxSeg * 16, 16) : undefined;
    this.#pool = guest.alloc(opts.size * this.bufferSize, 64);
    this.#freeSlots = Array.from({ length: opts.size }, (_, i) => opts.size - 1 - i);
    this.driver = new SplitDriverQueue(guest.mem, {
      size: opts.size,
      desc: this.desc,
      avail: this.avail,
      used: this.used,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      indirectTable,
      indirectMaxSegments: maxSeg,
      startIdx: opts.startIdx ?? 0,
      index: this.index,
    });
  }

  /**
   * Options for a {@link SplitDeviceQueue} over this ring.
   * @param extra options to add or override (e.g. usedLog)
   * @returns the device-side options
   */
  deviceOptions(extra: Partial<SplitDeviceQueueOptions> = {}): SplitDeviceQueueOptions {
    const d = this.driver;
    return {
      size: this.size,
      desc: this.desc,
      avail: this.avail,
      used: this.used,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      lastAvailIdx: d.availIdx,
      index: this.index,
      ...extra,
    };
  }

  /**
   * The guest address of a pool slot.
   * @param slot slot number in [0, size)
   * @returns its guest-physical address
   */
  slotAddress(slot: number): Gpa {
    return (this.#pool + slot * this.bufferSize) as Gpa;
  }

  /**
   * Offer a device-readable buffer holding `data` (e.g. a TX packet), split into `parts`
   * segments. Call kick() to publish.
   * @param data payload (at most bufferSize bytes)
   * @param parts number of segments (default 1)
   * @returns the head id, or null when the ring or the pool is full
   */
  send(data: Uint8Array, parts = 1): number | null {
    return this.#offer(data, data.length, parts, false);
  }

  /**
   * Offer a device-writable buffer of `len` bytes (e.g. an RX buffer). Call kick() to publish.
   * @param len buffer length (default bufferSize)
   * @param parts number of segments (default 1)
   * @returns the head id, or null when the ring or the pool is full
   */
  receive(len = this.bufferSize, parts = 1): number | null {
    return this.#offer(null, len, parts, true);
  }

  #offer(data: Uint8Array | null, len: number, parts: number, writable: boolean): number | null {
    if (len > this.bufferSize || parts < 1 || parts > Math.max(len, 1)) {
      throw new RangeError(`mock queue: ${len} bytes in ${parts} parts does not fit a buffer`);
    }
    const slot = this.#freeSlots.pop();
    if (slot === undefined) return null;
    const at = this.slotAddress(slot);
    if (data !== null) this.#guest.write(at, data);
    const segs = [];
    const step = Math.ceil(len / parts);
    for (let off = 0; off < len || segs.length === 0; off += step) {
      segs.push({ gpa: (at + off) as Gpa, len: Math.min(step, len - off), writable });
    }
    const id = this.driver.add(segs, { slot, receive: writable } satisfies PoolToken);
    if (id === null) this.#freeSlots.push(slot);
    return id;
  }

  /**
   * Publish offered buffers.
   * @returns whether the device should be kicked
   */
  kick(): boolean {
    return this.driver.kick();
  }

  /**
   * Collect every used buffer, returning pool slots.
   * @returns the used buffers in order; receive buffers carry a copy of the written bytes
   */
  collect(): MockUsed[] {
    const out: MockUsed[] = [];
    for (;;) {
      const u = this.driver.getUsed();
      if (u === null) return out;
      const t = u.token as PoolToken | undefined;
      let data: Uint8Array | null = null;
      if (t !== undefined) {
        if (t.receive) {
          data = this.#guest.read(this.slotAddress(t.slot), Math.min(u.len, this.bufferSize));
        }
        this.#freeSlots.push(t.slot);
      }
      out.push({ id: u.id, len: u.len, data });
    }
  }

  /**
   * Write a raw descriptor (for malformed-ring tests).
   * @param i descriptor index
   * @param addr buffer address
   * @param len buffer length
   * @param flags NEXT / WRITE / INDIRECT bits
   * @param next next descriptor index
   */
  writeRawDescriptor(i: number, addr: number, len: number, flags: number, next: number): void {
    const view = this.#guest.region.view;
    const o = this.desc - this.#guest.info.gpa + i * 16;
    view.setUint32(o, addr % 2 ** 32, true);
    view.setUint32(o + 4, Math.floor(addr / 2 ** 32), true);
    view.setUint32(o + 8, len, true);
    view.setUint16(o + 12, flags, true);
    view.setUint16(o + 14, next, true);
  }

  /**
   * Put a raw head in the next available slot and publish it (for malformed-ring tests; it
   * bypasses the driver's bookkeeping, so do not mix with send()/receive() on the same ring).
   * @param head the head index to publish
   * @param idx the avail.idx to publish (default: one past the current one)
   */
  publishRawHead(head: number, idx?: number): void {
    const view = this.#guest.region.view;
    const a = this.avail - this.#guest.info.gpa;
    const cur = view.getUint16(a + 2, true);
    view.setUint16(a + 4 + 2 * (cur % this.size), head, true);
    view.setUint16(a + 2, idx ?? (cur + 1) & 0xffff, true);
  }
}
