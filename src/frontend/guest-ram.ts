/**
 * Guest RAM for the front-end: memory regions allocated in memfds and mapped in this process,
 * each with a made-up front-end virtual address (uaddr) distinct from its guest-physical
 * address, so that a back-end confusing the two address spaces fails visibly. A bump allocator
 * hands out guest memory for rings and buffers.
 *
 * vhost-user: "Memory regions" (VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG).
 */
import { FileSeal, native } from "../native.js";
import {
  GuestMemoryError,
  gpa as toGpa,
  hex,
  mmapOffset,
  uaddr as toUaddr,
} from "../memory/address.js";
import type { Gpa, Uaddr } from "../memory/address.js";
import { GuestMemory } from "../memory/guest-memory.js";
import type { Region, RegionInfo } from "../memory/guest-memory.js";
import { MAX_REGION_MAPPING, mapRegionSplit, unmapRegion } from "../memory/mapping.js";
import type { MemoryRegion } from "../protocol/codecs.js";
import { alignUp } from "../virtq/layout.js";

/** Default front-end virtual address of guest-physical address 0 (as a VMM's heap would be). */
export const DEFAULT_UADDR_BASE = 0x7f00_0000_0000;
/** Extra uaddr distance added per region index, so regions do not share one gpa→uaddr delta. */
export const DEFAULT_UADDR_STRIDE = 0x10_0000_0000;
/** Where the second default region starts in GPA space (above a hole, as x86 RAM above 4 GiB). */
export const DEFAULT_HIGH_GPA = 0x1_0000_0000;

/** One region wanted in {@link GuestRamOptions.regions}. */
export interface GuestRamRegionSpec {
  /** guest-physical address of the first byte (page-aligned) */
  gpa: number;
  /** size in bytes (rounded up to the page size) */
  size: number;
  /** front-end virtual address of the first byte (default: base + gpa + index * stride) */
  uaddr?: number;
}

/** Options of {@link GuestRam.create}. */
export interface GuestRamOptions {
  /**
   * The regions. Default: two regions of `size / 2` bytes, the first at GPA 0 and the second
   * at GPA 4 GiB (a hole between them).
   */
  regions?: GuestRamRegionSpec[];
  /** total size for the default layout (default 4 MiB) */
  size?: number;
  /** uaddr of GPA 0 for regions without an explicit uaddr (default 0x7f00_0000_0000) */
  uaddrBase?: number;
  /** uaddr distance added per region index (default 64 GiB) */
  uaddrStride?: number;
  /**
   * `"fd-per-region"` (default): one memfd per region, mmap offset 0. `"shared-fd"`: one memfd
   * holding every region one after the other, each with its own mmap offset (as a VMM's
   * RAM block split around a hole).
   */
  layout?: "fd-per-region" | "shared-fd";
  /** memfd name (default "vhostkit-guest-ram") */
  name?: string;
  /**
   * Seal each memfd once sized (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL, as QEMU's
   * `memory-backend-memfd` does by default), so that a back-end holding the fd cannot shrink it
   * under this process's mapping (the next access would raise SIGBUS). Default true; false only
   * to play a front-end that shrinks its memory (tests).
   */
  seal?: boolean;
}

/** The seals of {@link GuestRamOptions.seal}. */
export const GUEST_RAM_SEALS = FileSeal.SHRINK | FileSeal.GROW | FileSeal.SEAL;

/** One region of {@link GuestRam}: where it lies, its fd and this process's mapping of it. */
export interface GuestRamRegion {
  /** addresses, size and mmap offset as the memory table lists them */
  readonly info: RegionInfo;
  /** the memfd holding the region (shared between regions with `layout: "shared-fd"`) */
  readonly fd: number;
  /**
   * The front-end's own mapping, in address order: one piece, or adjacent pieces of at most
   * {@link MAX_REGION_MAPPING} bytes for a larger region (an ArrayBuffer holds at most 4 GiB).
   * LIFETIME: valid until {@link GuestRam.close}.
   */
  readonly pieces: readonly Region[];
}

interface Cursor {
  next: number;
}

/**
 * Guest RAM of a front-end: memfd-backed regions mapped in this process, a {@link GuestMemory}
 * over them and a bump allocator.
 *
 * LIFETIME: `memory`, every region view and every queue built over them are unusable after
 * {@link GuestRam.close} (the mappings are detached).
 */
export class GuestRam {
  /** the regions, in memory-table order */
  readonly regions: readonly GuestRamRegion[];
  /** guest memory over this process's mappings */
  readonly memory: GuestMemory;
  /** the layout the regions were made with */
  readonly layout: "fd-per-region" | "shared-fd";
  /** memfd name */
  readonly name: string;
  readonly #fds: number[];
  readonly #cursors: Cursor[];
  #closed = false;
  /** pages (gpa >> 12) written through this object or marked, while tracking */
  #dirty: Set<number> | null = null;

  private constructor(
    regions: GuestRamRegion[],
    fds: number[],
    layout: "fd-per-region" | "shared-fd",
    name: string,
  ) {
    this.regions = Object.freeze(regions);
    this.#fds = fds;
    this.layout = layout;
    this.name = name;
    this.memory = new GuestMemory(regions.flatMap((r) => r.pieces));
    this.#cursors = regions.map((r) => ({ next: r.info.gpa }));
  }

  /**
   * Allocate guest RAM in memfds and map it.
   * @param opts regions (or a total size for the default two-region layout), uaddr scheme,
   *   fd layout, memfd name
   * @returns the guest RAM; call {@link close} when done
   * @throws GuestMemoryError for overlapping, misaligned or empty regions; NativeError when a
   *   memfd cannot be created or mapped
   */
  static create(opts: GuestRamOptions = {}): GuestRam {
    const page = native.pageSize();
    const base = opts.uaddrBase ?? DEFAULT_UADDR_BASE;
    const stride = opts.uaddrStride ?? DEFAULT_UADDR_STRIDE;
    const layout = opts.layout ?? "fd-per-region";
    const name = opts.name ?? "vhostkit-guest-ram";
    let specs = opts.regions;
    if (specs === undefined) {
      const total = alignUp(opts.size ?? 4 << 20, 2 * page);
      specs = [
        { gpa: 0, size: total / 2 },
        { gpa: Math.max(DEFAULT_HIGH_GPA, alignUp(total / 2, page)), size: total / 2 },
      ];
    }
    if (specs.length === 0) {
      throw new GuestMemoryError("guest RAM needs at least one region", {
        field: "regions",
        value: 0,
      });
    }
    const infos: RegionInfo[] = [];
    let sharedOffset = 0;
    specs.forEach((s, i) => {
      if (!Number.isSafeInteger(s.gpa) || s.gpa < 0 || s.gpa % page !== 0) {
        throw new GuestMemoryError(
          `guest RAM region ${i}: gpa ${String(s.gpa)} is not page-aligned`,
          {
            region: i,
            field: "gpa",
            value: s.gpa,
          },
        );
      }
      if (!Number.isSafeInteger(s.size) || s.size <= 0) {
        throw new GuestMemoryError(`guest RAM region ${i}: size ${String(s.size)} is invalid`, {
          region: i,
          field: "size",
          value: s.size,
        });
      }
      const size = alignUp(s.size, page);
      infos.push({
        gpa: toGpa(s.gpa),
        size,
        uaddr: toUaddr(s.uaddr ?? base + s.gpa + i * stride),
        mmapOffset: mmapOffset(layout === "shared-fd" ? sharedOffset : 0),
      });
      sharedOffset += size;
    });
    const fds: number[] = [];
    const mapped: GuestRamRegion[] = [];
    const seal = (fd: number): void => {
      if (opts.seal ?? true) native.addSeals(fd, GUEST_RAM_SEALS);
    };
    try {
      if (layout === "shared-fd") {
        const fd = native.memfdCreate(name);
        fds.push(fd);
        native.ftruncate(fd, sharedOffset);
        seal(fd);
        for (const info of infos) mapped.push({ info, fd, pieces: mapRegionSplit(fd, info) });
      } else {
        infos.forEach((info, i) => {
          const fd = native.memfdCreate(`${name}-${i}`);
          fds.push(fd);
          native.ftruncate(fd, info.size);
          seal(fd);
          mapped.push({ info, fd, pieces: mapRegionSplit(fd, info) });
        });
      }
      return new GuestRam(mapped, fds, layout, name);
    } catch (err) {
      for (const m of mapped) for (const piece of m.pieces) unmapRegion(piece);
      for (const fd of fds) native.close(fd);
      throw err;
    }
  }

  /** @returns true once {@link close} ran */
  get closed(): boolean {
    return this.#closed;
  }

  /** @returns total bytes of guest RAM */
  get size(): number {
    return this.regions.reduce((s, r) => s + r.info.size, 0);
  }

  /** @returns the fds of the regions, one per region in memory-table order (may repeat) */
  get regionFds(): number[] {
    return this.regions.map((r) => r.fd);
  }

  #checkOpen(what: string): void {
    if (this.#closed) throw new Error(`guest RAM: ${what} after close()`);
  }

  /**
   * Allocate guest memory with a bump allocator (never freed; see {@link reset}). An allocation
   * of at most {@link MAX_REGION_MAPPING} bytes never crosses a mapped piece's boundary.
   * @param size bytes (> 0)
   * @param align alignment (a power of 2; default 16)
   * @param regionIndex allocate in this region only (default: the first region with room)
   * @returns the guest-physical address of the first byte
   * @throws RangeError when no region has `size` bytes left at that alignment
   */
  alloc(size: number, align = 16, regionIndex?: number): Gpa {
    this.#checkOpen("alloc");
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RangeError(`guest RAM alloc: size must be a positive integer (size=${size})`);
    }
    if (!Number.isSafeInteger(align) || align <= 0 || (align & (align - 1)) !== 0) {
      throw new RangeError(`guest RAM alloc: align must be a power of 2 (align=${align})`);
    }
    const candidates = regionIndex === undefined ? this.regions.map((_, i) => i) : [regionIndex];
    for (const i of candidates) {
      const r = this.regions[i];
      const c = this.#cursors[i];
      if (r === undefined || c === undefined) {
        throw new RangeError(`guest RAM alloc: no region ${i} (regions=${this.regions.length})`);
      }
      let at = alignUp(c.next, align);
      // A ring or buffer must lie in one mapped piece (rings are viewed as typed arrays over
      // one mapping): an allocation that would cross a piece boundary starts at the boundary.
      const piece = Math.floor((at - r.info.gpa) / MAX_REGION_MAPPING);
      const boundary = r.info.gpa + (piece + 1) * MAX_REGION_MAPPING;
      if (size <= MAX_REGION_MAPPING && at < boundary && at + size > boundary) {
        at = alignUp(boundary, align);
      }
      if (at + size <= r.info.gpa + r.info.size) {
        c.next = at + size;
        return at as Gpa;
      }
    }
    throw new RangeError(
      `guest RAM alloc: no room for ${size} bytes aligned to ${align}` +
        (regionIndex === undefined ? "" : ` in region ${regionIndex}`),
    );
  }

  /** Forget every allocation (the memory keeps its contents). */
  reset(): void {
    this.regions.forEach((r, i) => {
      (this.#cursors[i] as Cursor).next = r.info.gpa;
    });
  }

  /** @returns bytes still free for the allocator, over all regions */
  get free(): number {
    return this.regions.reduce(
      (s, r, i) => s + r.info.gpa + r.info.size - (this.#cursors[i] as Cursor).next,
      0,
    );
  }

  /**
   * Translate a guest-physical address to this front-end's virtual address (what
   * SET_VRING_ADDR and the memory table carry).
   * @param g guest-physical address
   * @param len bytes that must lie in the same region (default 1)
   * @returns the front-end virtual address
   * @throws GuestMemoryError when [g, g+len) is not inside one region
   * (vhost-user: VHOST_USER_SET_VRING_ADDR)
   */
  gpaToUaddr(g: Gpa, len = 1): Uaddr {
    const r = this.memory.regionFor(g, len);
    return (r.uaddr + (g - r.gpa)) as Uaddr;
  }

  /**
   * Copy bytes into guest memory.
   * @param g guest-physical address
   * @param data bytes
   * @throws GuestMemoryError when the range is outside guest RAM
   */
  write(g: Gpa, data: Uint8Array): void {
    this.#checkOpen("write");
    this.memory.write(g, data);
    if (this.#dirty !== null) this.markDirty(g, data.length);
  }

  /**
   * Copy bytes out of guest memory.
   * @param g guest-physical address
   * @param len bytes
   * @returns a copy
   * @throws GuestMemoryError when the range is outside guest RAM
   */
  read(g: Gpa, len: number): Uint8Array {
    this.#checkOpen("read");
    const out = new Uint8Array(len);
    this.memory.read(g, out);
    return out;
  }

  /**
   * The memory table as SET_MEM_TABLE carries it (one entry per region, fds in the same order:
   * {@link regionFds}).
   * @returns the regions as wire structures
   * (vhost-user: VHOST_USER_SET_MEM_TABLE)
   */
  memoryTable(): MemoryRegion[] {
    return this.regions.map((r) => toWireRegion(r.info));
  }

  /**
   * Make a copy: new memfds with the same layout (GPAs, uaddrs, mmap offsets) and the same
   * contents, e.g. to replace the memory table while traffic runs.
   * @param name memfd name of the copy (default: this name + "-copy")
   * @returns the copy; the allocator state is copied too
   */
  duplicate(name = `${this.name}-copy`): GuestRam {
    this.#checkOpen("duplicate");
    const copy = GuestRam.create({
      regions: this.regions.map((r) => ({
        gpa: r.info.gpa,
        size: r.info.size,
        uaddr: r.info.uaddr,
      })),
      layout: this.layout,
      name,
    });
    this.regions.forEach((r, i) => {
      // LIFETIME: both views are used at once, while both RAMs are open.
      const to = (copy.regions[i] as GuestRamRegion).pieces;
      r.pieces.forEach((piece, k) => (to[k] as Region).bytes.set(piece.bytes));
      (copy.#cursors[i] as Cursor).next = (this.#cursors[i] as Cursor).next;
    });
    return copy;
  }

  // --- migration -------------------------------------------------------------------

  /** @returns true while the front-end's own writes are tracked ({@link trackDirty}) */
  get tracking(): boolean {
    return this.#dirty !== null;
  }

  /**
   * Track the pages this process writes (the "guest CPU" side of dirty tracking during a
   * migration: the back-end logs its own writes in the shared log, the front-end's driver writes
   * are tracked here).
   * @param on start (clearing the set) or stop tracking
   */
  trackDirty(on: boolean): void {
    this.#dirty = on ? new Set<number>() : null;
  }

  /**
   * Mark [g, g+len) dirty when tracking (a no-op otherwise).
   * @param g guest-physical address
   * @param len bytes
   */
  markDirty(g: number, len: number): void {
    const d = this.#dirty;
    if (d === null || len <= 0) return;
    const last = Math.floor((g + len - 1) / 4096);
    for (let p = Math.floor(g / 4096); p <= last; p++) d.add(p);
  }

  /**
   * Fetch and clear the set of pages marked since the last call.
   * @returns guest page numbers (gpa / 4096), unsorted
   */
  takeDirty(): number[] {
    const d = this.#dirty;
    if (d === null) return [];
    const out = [...d];
    d.clear();
    return out;
  }

  /**
   * The layout as {@link GuestRam.create} takes it (a destination builds the same layout).
   * @returns one spec per region with gpa, size and uaddr
   */
  layoutSpec(): GuestRamRegionSpec[] {
    return this.regions.map((r) => ({ gpa: r.info.gpa, size: r.info.size, uaddr: r.info.uaddr }));
  }

  /** @returns the allocator's next free GPA per region (for a migration) */
  allocatorState(): number[] {
    return this.#cursors.map((c) => c.next);
  }

  /**
   * Set the allocator's position per region (the destination of a migration).
   * @param next next free GPA per region, as {@link allocatorState} returned
   * @throws RangeError when the list does not match the regions
   */
  restoreAllocator(next: readonly number[]): void {
    if (next.length !== this.regions.length) {
      throw new RangeError(
        `guest RAM restoreAllocator: ${next.length} cursors for ${this.regions.length} regions`,
      );
    }
    this.regions.forEach((r, i) => {
      const n = next[i] as number;
      if (!Number.isSafeInteger(n) || n < r.info.gpa || n > r.info.gpa + r.info.size) {
        throw new RangeError(`guest RAM restoreAllocator: cursor ${i} = ${n} outside its region`);
      }
      (this.#cursors[i] as Cursor).next = n;
    });
  }

  /** Unmap every region and close the memfds. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const r of this.regions) for (const piece of r.pieces) unmapRegion(piece);
    for (const fd of this.#fds) native.close(fd);
  }
}

/**
 * A region as a wire structure.
 * @param info the region
 * @returns guest_phys_addr, memory_size, userspace_addr, mmap_offset as u64s
 */
export function toWireRegion(info: RegionInfo): MemoryRegion {
  return {
    guestPhysAddr: BigInt(info.gpa),
    memorySize: BigInt(info.size),
    userspaceAddr: BigInt(info.uaddr),
    mmapOffset: BigInt(info.mmapOffset),
  };
}

/**
 * Describe a region for messages.
 * @param info the region
 * @returns `gpa 0x..+0x.. uaddr 0x..`
 */
export function describeRegion(info: RegionInfo): string {
  return `gpa ${hex(info.gpa)}+${hex(info.size)} uaddr ${hex(info.uaddr)}`;
}
