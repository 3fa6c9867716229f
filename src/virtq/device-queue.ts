/**
 * The one way the back-end builds a device-side queue, on the main thread and in worker
 * threads alike, for a ring that starts or is rebuilt (vhost-user: "Starting and stopping
 * rings", SET_VRING_ADDR, memory-table changes). Both ring formats get the same inputs,
 * including the chains in flight that a rebuild carries over.
 */
import type { Gpa } from "../memory/address.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { PackedDeviceQueue } from "./packed.js";
import { SplitDeviceQueue } from "./split.js";
import type { DeviceQueue, InFlight, QueueBase, UsedLogOptions } from "./types.js";

/** What a ring needs to be built. */
export interface DeviceQueueSpec {
  /** queue index (named in errors) */
  index: number;
  /** queue size */
  size: number;
  /** VIRTIO_F_RING_PACKED negotiated */
  packed: boolean;
  /** VIRTIO_F_EVENT_IDX negotiated */
  eventIdx: boolean;
  /** VIRTIO_F_INDIRECT_DESC negotiated */
  indirect: boolean;
  /** guest-physical addresses: descriptors, avail (packed: driver event), used (packed: device event) */
  ring: { desc: number; avail: number; used: number };
  /** position to start from (SET_VRING_BASE, the last GET_VRING_BASE, or the replaced queue's) */
  base: QueueBase;
  /** VHOST_VRING_F_LOG: log the used ring at this address; null: at the ring */
  usedLog: UsedLogOptions | null;
  /** chains in flight taken over from the queue object being replaced, or none */
  inFlight?: InFlight;
}

/**
 * Build the device side of a split or packed ring.
 * @param mem guest memory holding the ring
 * @param spec format, addresses, base, log address and the chains in flight
 * @returns the queue
 * @throws VirtqueueError naming the ring part or base field that is invalid
 */
export function createDeviceQueue(mem: GuestMemory, spec: DeviceQueueSpec): DeviceQueue {
  const { base, ring } = spec;
  if (spec.packed) {
    return new PackedDeviceQueue(mem, {
      size: spec.size,
      desc: ring.desc as Gpa,
      driverEvent: ring.avail as Gpa,
      deviceEvent: ring.used as Gpa,
      eventIdx: spec.eventIdx,
      indirect: spec.indirect,
      base: {
        availIdx: base.availIdx,
        availWrap: base.availWrap ?? true,
        usedIdx: base.usedIdx ?? base.availIdx,
        usedWrap: base.usedWrap ?? base.availWrap ?? true,
      },
      usedLog: spec.usedLog,
      index: spec.index,
      ...(spec.inFlight ? { inFlight: spec.inFlight } : {}),
    });
  }
  return new SplitDeviceQueue(mem, {
    size: spec.size,
    desc: ring.desc as Gpa,
    avail: ring.avail as Gpa,
    used: ring.used as Gpa,
    eventIdx: spec.eventIdx,
    indirect: spec.indirect,
    lastAvailIdx: base.availIdx,
    usedLog: spec.usedLog,
    index: spec.index,
    ...(spec.inFlight ? { inFlight: spec.inFlight } : {}),
  });
}
