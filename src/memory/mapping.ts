/**
 * Mapping memory-table regions and the dirty log from the fds the front-end sends
 * (vhost-user: VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG, VHOST_USER_SET_LOG_BASE).
 */
import { native } from "../native.js";
import { GuestMemoryError, hex } from "./address.js";
import { DirtyLog } from "./dirty-log.js";
import { createRegion } from "./guest-memory.js";
import type { Region, RegionInfo } from "./guest-memory.js";

/**
 * Round an mmap offset down to the page size and check the range against the fd's size.
 * Touching a shared mapping beyond the end of its file raises SIGBUS, which would kill the
 * process: the check must come before mmap.
 */
function planMapping(
  fd: number,
  offset: number,
  size: number,
  what: string,
): { aligned: number; delta: number } {
  if (!Number.isSafeInteger(offset) || offset < 0) {
    throw new GuestMemoryError(`${what}: mmap offset ${String(offset)} is invalid`, {
      field: "mmapOffset",
      value: offset,
    });
  }
  if (!Number.isSafeInteger(size) || size <= 0) {
    throw new GuestMemoryError(`${what}: size ${String(size)} is zero or invalid`, {
      field: "size",
      value: size,
    });
  }
  const fileSize = native.fstatSize(fd);
  if (offset + size > fileSize) {
    throw new GuestMemoryError(
      `${what}: mmap offset ${hex(offset)} + size ${hex(size)} exceeds the size of fd ${fd} ` +
        `(${hex(fileSize)} bytes)`,
      { field: "size", value: size, length: size },
    );
  }
  const page = native.pageSize();
  const aligned = offset - (offset % page);
  return { aligned, delta: offset - aligned };
}

/**
 * Map one memory region from its fd (read-write, shared).
 * @param fd the region's fd (not closed; the caller may close it after mapping)
 * @param info the region's addresses, size and mmap offset from the memory table
 * @returns the region; `base` is the mmap offset's distance from its page boundary
 * @throws GuestMemoryError when `mmapOffset + size` exceeds the fd's size (checked before mmap)
 *   or a field is invalid; a NativeError when mmap fails
 * (vhost-user: VHOST_USER_SET_MEM_TABLE)
 */
export function mapRegion(fd: number, info: RegionInfo): Region {
  const { aligned, delta } = planMapping(
    fd,
    info.mmapOffset,
    info.size,
    `memory region at gpa ${hex(info.gpa)}`,
  );
  const buffer = native.mmap(fd, aligned, info.size + delta, true);
  try {
    return createRegion(info, buffer, delta);
  } catch (err) {
    native.munmap(buffer);
    throw err;
  }
}

/**
 * Largest single mapping made for a memory region: an external ArrayBuffer on Node.js 20 is
 * capped at `buffer.constants.MAX_LENGTH` (2^32 bytes), so a larger region (a QEMU guest with
 * `-m 8G` has a ~6 GiB one) is mapped as adjacent sub-regions of at most this size.
 */
export const MAX_REGION_MAPPING = 2 ** 31;

/**
 * Cut a memory-table region into adjacent pieces of at most `max` bytes (same fd, advancing
 * guest-physical address, front-end address and mmap offset together).
 * @param info the region as the front-end described it
 * @param max largest piece (default {@link MAX_REGION_MAPPING}); a multiple of the page size
 * @returns the pieces in address order (one piece when the region is small enough)
 * @throws RangeError when `max` is not a positive integer
 */
export function splitRegionInfo(info: RegionInfo, max = MAX_REGION_MAPPING): RegionInfo[] {
  if (!Number.isSafeInteger(max) || max <= 0) {
    throw new RangeError(`splitRegionInfo: max must be a positive integer, got ${max}`);
  }
  const out: RegionInfo[] = [];
  for (let off = 0; off < info.size; off += max) {
    out.push({
      gpa: (info.gpa + off) as RegionInfo["gpa"],
      size: Math.min(max, info.size - off),
      uaddr: (info.uaddr + off) as RegionInfo["uaddr"],
      mmapOffset: (info.mmapOffset + off) as RegionInfo["mmapOffset"],
    });
  }
  return out;
}

/**
 * Map one memory-table region, as adjacent sub-regions of at most {@link MAX_REGION_MAPPING}
 * bytes when it is larger (GuestMemory copies across adjacent regions; a ring must lie within
 * one sub-region, else its translation fails naming the address). All or nothing.
 * @param fd the region's fd (not closed)
 * @param info the region from the memory table
 * @param max largest sub-region (default {@link MAX_REGION_MAPPING}; tests use less)
 * @returns the sub-regions in address order
 * @throws GuestMemoryError or NativeError as {@link mapRegion} (nothing stays mapped)
 * (vhost-user: VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG)
 */
export function mapRegionSplit(fd: number, info: RegionInfo, max = MAX_REGION_MAPPING): Region[] {
  const pieces = splitRegionInfo(info, max);
  // The whole region must fit the fd: check once, before mapping any piece.
  planMapping(fd, info.mmapOffset, info.size, `memory region at gpa ${hex(info.gpa)}`);
  const mapped: Region[] = [];
  try {
    for (const piece of pieces) mapped.push(mapRegion(fd, piece));
  } catch (err) {
    for (const r of mapped) unmapRegion(r);
    throw err;
  }
  return mapped;
}

/**
 * Unmap a region made by {@link mapRegion}. Its buffer is detached: every view into it (and
 * every GuestMemory or queue built on it) becomes unusable. Idempotent.
 * @param region the region
 */
export function unmapRegion(region: Region): void {
  native.munmap(region.buffer);
}

/**
 * Map the dirty log sent with SET_LOG_BASE.
 * @param fd the log's fd
 * @param offset the log's mmap offset
 * @param size the log's size in bytes
 * @returns the log over the mapping
 * @throws GuestMemoryError when `offset + size` exceeds the fd's size; NativeError from mmap
 * (vhost-user: VHOST_USER_SET_LOG_BASE)
 */
export function mapDirtyLog(fd: number, offset: number, size: number): DirtyLog {
  const { aligned, delta } = planMapping(fd, offset, size, "dirty log");
  const buffer = native.mmap(fd, aligned, size + delta, true);
  try {
    return new DirtyLog(buffer, delta, size);
  } catch (err) {
    native.munmap(buffer);
    throw err;
  }
}

/**
 * Flush and unmap a log made by {@link mapDirtyLog}. Detach it from every GuestMemory first.
 * @param log the log
 */
export function unmapDirtyLog(log: DirtyLog): void {
  log.flush();
  native.munmap(log.buffer);
}

/**
 * A SIGBUS survived in a mapping made here (the file behind it was shrunk after it was
 * mapped; see `native.mappingFault`): where it was, in terms that mean the same on every
 * thread (a worker maps the same memory at other addresses).
 */
export type MappingFault =
  | {
      kind: "region";
      /** guest-physical address of the first faulting byte */
      gpa: number;
      /** pages of the mapping that faulted so far */
      faults: number;
    }
  | {
      kind: "log";
      /** byte offset in the dirty log of the first fault */
      offset: number;
      /** the log's size in bytes */
      size: number;
    };

/**
 * Find the first survived fault among one owner's mappings (a session's, or a worker ring's).
 * @param regions the mapped regions (made by {@link mapRegion})
 * @param log the mapped dirty log, or null
 * @returns the fault, or null when none of these mappings faulted
 */
export function findMappingFault(
  regions: readonly Region[],
  log: DirtyLog | null,
): MappingFault | null {
  for (const r of regions) {
    const f = native.mappingFault(r.buffer);
    if (f) return { kind: "region", gpa: r.gpa + (f.offset - r.base), faults: f.faults };
  }
  const lf = log ? native.mappingFault(log.buffer) : null;
  if (lf) return { kind: "log", offset: lf.offset - log!.offset, size: log!.size };
  return null;
}

/**
 * Say what a survived fault means for the connection that owns the mapping (vhost-user:
 * VHOST_USER_SET_MEM_TABLE, VHOST_USER_SET_LOG_BASE: the front-end must keep each file at
 * least as large as it said).
 * @param fault the fault
 * @param table the connection's memory table (memory-table regions, not their pieces)
 * @returns the message (naming the region by its index in `table`, its gpa and size, and the
 *   offset), and the field and value for a `VhostUserError`
 */
export function describeMappingFault(
  fault: MappingFault,
  table: readonly RegionInfo[],
): { message: string; field: "gpa" | "log"; value: string | number } {
  if (fault.kind === "log") {
    return {
      message:
        `dirty log (${fault.size} bytes): SIGBUS at offset ${hex(fault.offset)}: ` +
        "its file is shorter than SET_LOG_BASE said",
      field: "log",
      value: fault.offset,
    };
  }
  const i = table.findIndex((r) => fault.gpa >= r.gpa && fault.gpa - r.gpa < r.size);
  const info = table[i];
  const where = info
    ? `memory region ${i} (gpa ${hex(info.gpa)}, size ${hex(info.size)}): SIGBUS at offset ${hex(fault.gpa - info.gpa)}`
    : `memory at gpa ${hex(fault.gpa)}: SIGBUS`;
  return {
    message: `${where} (${fault.faults} page(s)): its file is shorter than the memory table says`,
    field: "gpa",
    value: hex(fault.gpa),
  };
}
