/**
 * Ring layouts: sizes, alignments, field offsets and flag bits of split and packed
 * virtqueues (VIRTIO 1.2 §2.7 split, §2.8 packed).
 */

/** Descriptor flag: the chain continues in `next` (VIRTIO 1.2 §2.7.5). */
export const VIRTQ_DESC_F_NEXT = 1;
/** Descriptor flag: the buffer is device-writable (VIRTIO 1.2 §2.7.5). */
export const VIRTQ_DESC_F_WRITE = 2;
/** Descriptor flag: the buffer holds an indirect descriptor table (VIRTIO 1.2 §2.7.5.3). */
export const VIRTQ_DESC_F_INDIRECT = 4;
/** Available ring flag: the driver does not want used-buffer notifications (§2.7.6). */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
/** Used ring flag: the device does not want available-buffer notifications (§2.7.8). */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** Size of one split (and packed) descriptor in bytes. */
export const DESC_SIZE = 16;
/** Largest queue size (VIRTIO 1.2 §2.7: split sizes are powers of 2 up to 32768). */
export const MAX_QUEUE_SIZE = 32768;

/** Required alignment of the descriptor table (VIRTIO 1.2 §2.7). */
export const SPLIT_DESC_ALIGN = 16;
/** Required alignment of the available ring (VIRTIO 1.2 §2.7). */
export const SPLIT_AVAIL_ALIGN = 2;
/** Required alignment of the used ring (VIRTIO 1.2 §2.7). */
export const SPLIT_USED_ALIGN = 4;

/** Byte sizes of the three parts of a split ring. */
export interface SplitRingSizes {
  /** descriptor table: 16 * size */
  desc: number;
  /** available ring: flags, idx, ring[size], used_event = 6 + 2 * size */
  avail: number;
  /** used ring: flags, idx, ring[size] of {id, len}, avail_event = 6 + 8 * size */
  used: number;
}

/**
 * Byte sizes of a split ring's parts, including the EVENT_IDX fields.
 * @param size queue size
 * @returns the sizes of the descriptor table, available ring and used ring
 * (VIRTIO 1.2 §2.7)
 */
export function splitRingSizes(size: number): SplitRingSizes {
  return { desc: DESC_SIZE * size, avail: 6 + 2 * size, used: 6 + 8 * size };
}

/** Byte sizes of the three parts of a packed ring. */
export interface PackedRingSizes {
  /** descriptor ring: 16 * size */
  desc: number;
  /** driver event suppression structure */
  driverEvent: number;
  /** device event suppression structure */
  deviceEvent: number;
}

/**
 * Byte sizes of a packed ring's parts.
 * @param size queue size
 * @returns the sizes of the descriptor ring and the two event suppression structures
 * (VIRTIO 1.2 §2.8)
 */
export function packedRingSizes(size: number): PackedRingSizes {
  return { desc: DESC_SIZE * size, driverEvent: 4, deviceEvent: 4 };
}

/** Guest-physical placement of a split ring's parts. */
export interface SplitRingPlacement {
  /** descriptor table address */
  desc: number;
  /** available ring address */
  avail: number;
  /** used ring address */
  used: number;
  /** one past the last byte used */
  end: number;
}

/**
 * Place a split ring's parts one after the other from `base`, each at its required alignment
 * (or with the used ring on a `usedAlign` boundary, e.g. 4096 for the legacy layout).
 * @param base address of the descriptor table (rounded up to 16)
 * @param size queue size
 * @param usedAlign alignment of the used ring (default 4)
 * @returns the three addresses and the end of the ring
 * (VIRTIO 1.2 §2.7)
 */
export function splitRingPlacement(base: number, size: number, usedAlign = 4): SplitRingPlacement {
  const s = splitRingSizes(size);
  const desc = alignUp(base, SPLIT_DESC_ALIGN);
  const avail = alignUp(desc + s.desc, SPLIT_AVAIL_ALIGN);
  const used = alignUp(avail + s.avail, Math.max(SPLIT_USED_ALIGN, usedAlign));
  return { desc, avail, used, end: used + s.used };
}

/**
 * Round up to a multiple of `align`.
 * @param n a non-negative integer
 * @param align a positive integer
 * @returns the smallest multiple of `align` that is >= n
 */
export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/**
 * VIRTIO 1.2 §2.7.7.2 (`vring_need_event`): whether moving an index from `oldIdx` to `newIdx`
 * crosses the other side's event index, i.e. whether a notification is due.
 * @param eventIdx the event index the other side wrote (used_event or avail_event)
 * @param newIdx the index just published
 * @param oldIdx the index at the previous notification decision
 * @returns `(u16)(new - event - 1) < (u16)(new - old)`
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}
