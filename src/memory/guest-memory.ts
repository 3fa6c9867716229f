/**
 * Guest memory: the regions of the memory table, address translation and bounds-checked
 * access (vhost-user: VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG).
 *
 * Ring code on the data path calls {@link GuestMemory.regionFor} (a last-hit cache, then a
 * binary search) and reads through the returned region's views; everything else may use the
 * copying {@link GuestMemory.read} / {@link GuestMemory.write}.
 */
import { ADDRESS_LIMIT, GuestMemoryError, hex } from "./address.js";
import type { Gpa, MmapOffset, Uaddr } from "./address.js";
import type { DirtyLog } from "./dirty-log.js";

export { GuestMemoryError } from "./address.js";

/** What the memory table says about one region. */
export interface RegionInfo {
  /** guest-physical address of the first byte */
  gpa: Gpa;
  /** size in bytes (> 0) */
  size: number;
  /** front-end virtual address of the first byte */
  uaddr: Uaddr;
  /** offset of the first byte in the region's fd */
  mmapOffset: MmapOffset;
}

/** A region together with the memory that backs it. */
export interface Region extends RegionInfo {
  /** the mapping (or any ArrayBuffer in unit tests) */
  buffer: ArrayBuffer;
  /** byte offset in `buffer` where guest address `gpa` lies */
  base: number;
  /** view over [base, base+size) of buffer. LIFETIME: valid until the region is unmapped */
  bytes: Uint8Array;
  /** DataView over the same range. LIFETIME: valid until the region is unmapped */
  view: DataView;
}

/**
 * Build a {@link Region} over an existing ArrayBuffer (unit tests, or memory mapped elsewhere).
 * @param info where the region lies in each address space
 * @param buffer the backing memory
 * @param base byte offset in `buffer` of guest address `info.gpa` (default 0)
 * @returns the region, with `bytes` and `view` over `[base, base + size)`
 * @throws GuestMemoryError when `[base, base + size)` does not fit in `buffer`
 */
export function createRegion(info: RegionInfo, buffer: ArrayBuffer, base = 0): Region {
  if (
    !Number.isSafeInteger(base) ||
    base < 0 ||
    !Number.isSafeInteger(info.size) ||
    info.size <= 0 ||
    base + info.size > buffer.byteLength
  ) {
    throw new GuestMemoryError(
      `region at gpa ${hex(info.gpa)}: [base ${base}, +size ${info.size}) does not fit in a ` +
        `buffer of ${buffer.byteLength} bytes`,
      { gpa: info.gpa, length: info.size, field: "size", value: info.size },
    );
  }
  // LIFETIME: these views die with the mapping; unmapping detaches `buffer` (length 0).
  return {
    gpa: info.gpa,
    size: info.size,
    uaddr: info.uaddr,
    mmapOffset: info.mmapOffset,
    buffer,
    base,
    bytes: new Uint8Array(buffer, base, info.size),
    view: new DataView(buffer, base, info.size),
  };
}

function checkInteger(index: number, field: string, value: number, min: number): void {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new GuestMemoryError(
      `memory region ${index}: ${field} ${String(value)} is not an integer >= ${min}`,
      { region: index, field, value },
    );
  }
}

/**
 * The guest's memory: an immutable set of non-overlapping regions. A memory-table update
 * builds a new GuestMemory (and new queues over it).
 *
 * LIFETIME: a GuestMemory, and every queue built on it, must not be used after its regions
 * are unmapped (unmapping detaches the buffers; views then have length 0).
 */
export class GuestMemory {
  /** the regions, in the order given */
  readonly regions: readonly Region[];
  /** one past the highest guest-physical address covered by any region */
  readonly end: number;

  readonly #byGpa: Region[];
  readonly #gpaStarts: number[];
  readonly #gpaEnds: number[];
  readonly #byUaddr: Region[];
  #hit: Region;
  #hitStart: number;
  #hitEnd: number;
  #log: DirtyLog | null = null;

  /**
   * Validate the regions and index them.
   * @param regions the memory table (at least one region)
   * @throws GuestMemoryError naming the region index and the values when a region has zero
   *   size, extends beyond 2^53 in either address space, does not fit in its buffer, or
   *   overlaps another region in guest-physical or front-end virtual address space
   */
  constructor(regions: Region[]) {
    if (regions.length === 0) {
      throw new GuestMemoryError("memory table has no regions", { field: "regions", value: 0 });
    }
    regions.forEach((r, i) => {
      checkInteger(i, "gpa", r.gpa, 0);
      checkInteger(i, "uaddr", r.uaddr, 0);
      checkInteger(i, "mmapOffset", r.mmapOffset, 0);
      checkInteger(i, "base", r.base, 0);
      if (!Number.isSafeInteger(r.size) || r.size <= 0) {
        throw new GuestMemoryError(
          `memory region ${i}: size ${String(r.size)} is zero or invalid`,
          {
            region: i,
            gpa: r.gpa,
            field: "size",
            value: r.size,
          },
        );
      }
      if (r.size > ADDRESS_LIMIT - r.gpa) {
        throw new GuestMemoryError(
          `memory region ${i}: gpa ${hex(r.gpa)} + size ${hex(r.size)} wraps beyond 2^53`,
          { region: i, gpa: r.gpa, length: r.size, field: "size", value: r.size },
        );
      }
      if (r.size > ADDRESS_LIMIT - r.uaddr) {
        throw new GuestMemoryError(
          `memory region ${i}: uaddr ${hex(r.uaddr)} + size ${hex(r.size)} wraps beyond 2^53`,
          { region: i, gpa: r.gpa, length: r.size, field: "uaddr", value: r.uaddr },
        );
      }
      if (r.base + r.size > r.buffer.byteLength || r.bytes.length !== r.size) {
        throw new GuestMemoryError(
          `memory region ${i}: base ${r.base} + size ${r.size} exceeds its buffer ` +
            `(${r.buffer.byteLength} bytes) or its views do not match`,
          { region: i, gpa: r.gpa, length: r.size, field: "base", value: r.base },
        );
      }
    });
    const order = regions.map((_, i) => i);
    const checkOverlap = (field: "gpa" | "uaddr"): void => {
      order.sort((a, b) => (regions[a] as Region)[field] - (regions[b] as Region)[field]);
      for (let k = 1; k < order.length; k++) {
        const ia = order[k - 1] as number;
        const ib = order[k] as number;
        const a = regions[ia] as Region;
        const b = regions[ib] as Region;
        if (b[field] < a[field] + a.size) {
          throw new GuestMemoryError(
            `memory regions ${ia} and ${ib} overlap in ${field} space: ` +
              `[${hex(a[field])}, ${hex(a[field] + a.size)}) and ` +
              `[${hex(b[field])}, ${hex(b[field] + b.size)})`,
            { region: ib, gpa: b.gpa, field, value: b[field] },
          );
        }
      }
    };
    checkOverlap("gpa");
    this.#byGpa = order.map((i) => regions[i] as Region);
    checkOverlap("uaddr");
    this.#byUaddr = order.map((i) => regions[i] as Region);
    this.#gpaStarts = this.#byGpa.map((r) => r.gpa);
    this.#gpaEnds = this.#byGpa.map((r) => r.gpa + r.size);
    this.regions = Object.freeze(regions.slice());
    this.end = Math.max(...this.#gpaEnds);
    const first = this.#byGpa[0] as Region;
    this.#hit = first;
    this.#hitStart = first.gpa;
    this.#hitEnd = first.gpa + first.size;
  }

  /**
   * The dirty log attached by the back-end while VHOST_F_LOG_ALL is on, or null.
   * Replacing the log flushes the batched marks of the one it replaces first.
   * (vhost-user: Migration, VHOST_USER_SET_LOG_BASE)
   */
  get log(): DirtyLog | null {
    return this.#log;
  }

  set log(next: DirtyLog | null) {
    const prev = this.#log;
    if (prev === next) return;
    // ORDERING: marks batched in the old log reach it before anyone writes into the new one.
    prev?.flush();
    this.#log = next;
  }

  /**
   * Find the region that holds [gpa, gpa+len) entirely, without throwing.
   * A zero-length range matches a region whose [start, end] holds `gpa`.
   * @param g guest-physical address
   * @param len length in bytes (>= 0)
   * @returns the region, or null when no single region holds the range
   */
  tryRegionFor(g: number, len: number): Region | null {
    if (g >= this.#hitStart && len >= 0 && g + len <= this.#hitEnd) return this.#hit;
    return this.#search(g, len);
  }

  /**
   * Find the region that holds [gpa, gpa+len) entirely.
   * @param g guest-physical address
   * @param len length in bytes (>= 0)
   * @returns the region
   * @throws GuestMemoryError naming the address and length when no single region holds it
   * (vhost-user: VHOST_USER_SET_MEM_TABLE, "memory regions")
   */
  regionFor(g: Gpa, len: number): Region {
    if (g >= this.#hitStart && len >= 0 && g + len <= this.#hitEnd) return this.#hit;
    const r = this.#search(g, len);
    if (r === null) {
      throw new GuestMemoryError(
        `guest range [${hex(g)}, +${len}) is not inside one memory region`,
        { gpa: g, length: len },
      );
    }
    return r;
  }

  #search(g: number, len: number): Region | null {
    if (!(len >= 0) || !Number.isSafeInteger(g)) return null;
    const starts = this.#gpaStarts;
    let lo = 0;
    let hi = starts.length - 1;
    // last region whose start <= g
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if ((starts[mid] as number) <= g) lo = mid;
      else hi = mid - 1;
    }
    const start = starts[lo] as number;
    const end = this.#gpaEnds[lo] as number;
    if (g < start || g + len > end) return null;
    const r = this.#byGpa[lo] as Region;
    this.#hit = r;
    this.#hitStart = start;
    this.#hitEnd = end;
    return r;
  }

  /**
   * A view of [gpa, gpa+len) when it lies inside one region. Writes through the view are
   * not logged: call `mem.log?.mark(gpa, len)` after writing.
   * LIFETIME: the view is valid until the region is unmapped.
   * @param g guest-physical address
   * @param len length in bytes
   * @returns a Uint8Array over the guest memory itself (no copy)
   * @throws GuestMemoryError naming the address when no single region holds the range
   */
  gpaToView(g: Gpa, len: number): Uint8Array {
    const r = this.regionFor(g, len);
    return new Uint8Array(r.buffer, r.base + (g - r.gpa), len);
  }

  /**
   * Translate a front-end virtual address (ring addresses in SET_VRING_ADDR) to a GPA.
   * @param ua front-end virtual address
   * @param len bytes that must be covered by the same region
   * @returns the guest-physical address
   * @throws GuestMemoryError naming the address when no region covers [ua, ua+len)
   * (vhost-user: VHOST_USER_SET_VRING_ADDR)
   */
  uaddrToGpa(ua: Uaddr, len: number): Gpa {
    if (len >= 0) {
      for (const r of this.#byUaddr) {
        if (ua >= r.uaddr && ua + len <= r.uaddr + r.size) return (r.gpa + (ua - r.uaddr)) as Gpa;
      }
    }
    throw new GuestMemoryError(
      `front-end address range [${hex(ua)}, +${len}) is not inside one memory region`,
      { length: len, field: "uaddr", value: ua },
    );
  }

  /**
   * Check that [gpa, gpa+len) is covered by regions (possibly several adjacent ones).
   * @param g guest-physical address
   * @param len length in bytes
   * @returns true when every byte of the range lies in some region
   */
  covers(g: number, len: number): boolean {
    let cur = g;
    const end = g + len;
    if (!(len >= 0) || !Number.isSafeInteger(g) || end > ADDRESS_LIMIT) return false;
    while (cur < end) {
      const r = this.#search(cur, 1);
      if (r === null) return false;
      cur = r.gpa + r.size;
    }
    return len > 0 || this.#search(g, 0) !== null;
  }

  #copy(g: Gpa, data: Uint8Array, toGuest: boolean): void {
    const len = data.length;
    let r = this.tryRegionFor(g, len);
    if (r !== null) {
      const off = r.base + (g - r.gpa);
      if (toGuest) new Uint8Array(r.buffer, off, len).set(data);
      else data.set(new Uint8Array(r.buffer, off, len));
      return;
    }
    if (!this.covers(g, len)) {
      throw new GuestMemoryError(`guest range [${hex(g)}, +${len}) is not inside guest memory`, {
        gpa: g,
        length: len,
      });
    }
    let done = 0;
    while (done < len) {
      const cur = g + done;
      r = this.#search(cur, 1) as Region;
      const n = Math.min(len - done, r.gpa + r.size - cur);
      const guest = new Uint8Array(r.buffer, r.base + (cur - r.gpa), n);
      if (toGuest) guest.set(data.subarray(done, done + n));
      else data.set(guest, done);
      done += n;
    }
  }

  /**
   * Copy guest memory out; the range may span adjacent regions.
   * @param g guest-physical address of the first byte
   * @param dst where to copy `dst.length` bytes
   * @throws GuestMemoryError naming the address when part of the range is outside guest memory
   *   (nothing is copied then)
   */
  read(g: Gpa, dst: Uint8Array): void {
    this.#copy(g, dst, false);
  }

  /**
   * Copy into guest memory and mark the dirty log if one is attached; the range may span
   * adjacent regions.
   * @param g guest-physical address of the first byte
   * @param src the bytes to write
   * @throws GuestMemoryError naming the address when part of the range is outside guest memory
   *   or beyond the attached dirty log (nothing is written then)
   */
  write(g: Gpa, src: Uint8Array): void {
    // A write that no log bit can cover does not happen (check throws before it).
    if (this.#log !== null && src.length > 0) this.#log.check(g, src.length);
    this.#copy(g, src, true);
    // ORDERING: marked after the write, so a log sync between the two can only re-send the
    // page, never miss it (vhost-user: "Migration", dirty page logging).
    if (this.#log !== null && src.length > 0) this.#log.mark(g, src.length);
  }
}
