/**
 * Address spaces of guest memory as branded number types, and the error that guest-memory
 * code raises.
 *
 * Every address is a JavaScript `number` below 2^53 (see docs/architecture.md, "Numbers").
 * The brands keep guest-physical addresses, front-end virtual addresses and mmap offsets apart
 * at compile time; they cost nothing at run time.
 */

/** A guest-physical address (GPA): what descriptors and ring addresses (after translation) hold. */
export type Gpa = number & { readonly __brand: "Gpa" };
/** A front-end virtual address: what SET_VRING_ADDR and the memory table's `userspace_addr` hold. */
export type Uaddr = number & { readonly __brand: "Uaddr" };
/** An offset into a memory region's fd, as sent in the memory table's `mmap_offset`. */
export type MmapOffset = number & { readonly __brand: "MmapOffset" };

/** One past the largest address the library handles (2^53). */
export const ADDRESS_LIMIT = Number.MAX_SAFE_INTEGER + 1;

/** Extra context carried by a {@link GuestMemoryError}. */
export interface GuestMemoryErrorDetails {
  /** the offending guest-physical (or front-end virtual) address */
  gpa?: number;
  /** the length of the access */
  length?: number;
  /** index of the offending region in the memory table */
  region?: number;
  /** the field that held the offending value, e.g. `"size"`, `"gpa"`, `"uaddr"`, `"mmapOffset"` */
  field?: string;
  /** the offending value */
  value?: number;
}

/**
 * Error raised for an invalid memory table, an access outside guest memory or a dirty-log
 * mark beyond the log. Not fatal for the process; the connection decides.
 */
export class GuestMemoryError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOST_GUEST_MEMORY" as const;
  /** the offending address, when there is one */
  readonly gpa?: number;
  /** the length of the offending access, when there is one */
  readonly length?: number;
  /** index of the offending region in the memory table, when there is one */
  readonly region?: number;
  /** the field holding the offending value, when there is one */
  readonly field?: string;
  /** the offending value, when there is one */
  readonly value?: number;

  /**
   * Create the error.
   * @param message what went wrong, naming the addresses involved
   * @param details the offending address, length, region index, field and value
   */
  constructor(message: string, details: GuestMemoryErrorDetails = {}) {
    super(message);
    this.name = "GuestMemoryError";
    if (details.gpa !== undefined) this.gpa = details.gpa;
    if (details.length !== undefined) this.length = details.length;
    if (details.region !== undefined) this.region = details.region;
    if (details.field !== undefined) this.field = details.field;
    if (details.value !== undefined) this.value = details.value;
  }
}

/**
 * Format an address as hex for error messages.
 * @param n the address
 * @returns `0x...`
 */
export function hex(n: number): string {
  return "0x" + n.toString(16);
}

function checkAddress(kind: string, n: number): void {
  if (!Number.isInteger(n) || n < 0 || n >= ADDRESS_LIMIT) {
    throw new GuestMemoryError(`${kind} ${String(n)} is not an integer in [0, 2^53)`, {
      field: kind,
      value: n,
    });
  }
}

/**
 * Brand a number as a guest-physical address.
 * @param n an integer in [0, 2^53)
 * @returns the same number, typed as {@link Gpa}
 * @throws GuestMemoryError when `n` is not an integer in range
 */
export function gpa(n: number): Gpa {
  checkAddress("gpa", n);
  return n as Gpa;
}

/**
 * Brand a number as a front-end virtual address.
 * @param n an integer in [0, 2^53)
 * @returns the same number, typed as {@link Uaddr}
 * @throws GuestMemoryError when `n` is not an integer in range
 */
export function uaddr(n: number): Uaddr {
  checkAddress("uaddr", n);
  return n as Uaddr;
}

/**
 * Brand a number as an mmap offset.
 * @param n an integer in [0, 2^53)
 * @returns the same number, typed as {@link MmapOffset}
 * @throws GuestMemoryError when `n` is not an integer in range
 */
export function mmapOffset(n: number): MmapOffset {
  checkAddress("mmapOffset", n);
  return n as MmapOffset;
}
