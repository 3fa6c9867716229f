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
