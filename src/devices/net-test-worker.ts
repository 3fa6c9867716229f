/**
 * The worker-thread handler of {@link NetTestDevice}'s queues (`workerQueues: true`): a sink
 * for a transmit queue, a source for a receive queue. Loaded by the back-end's queue worker
 * (`src/backend/queue-worker.ts`) through its `createQueueHandler` export.
 */
import type { BackendQueue } from "../backend/device.js";
import type { WorkerHandlerInit, WorkerQueueHandler } from "../backend/worker-queue.js";
import type { DescChain } from "../virtq/types.js";

/** virtio_net_hdr_v1 size (VIRTIO 1.2 §5.1.6). */
const NET_HDR_SIZE = 12;
/** Most chains handled per turn before the worker's event loop gets a turn. */
const BUDGET = 512;

/** Slots of the shared counters of one worker queue. */
export const WorkerCounter = Object.freeze({
  PACKETS: 0,
  BYTES: 1,
  DROPPED: 2,
  /** number of slots */
  COUNT: 3,
});

/** Options the device passes to a worker queue. */
export interface NetWorkerOptions {
  role: "sink" | "source";
  /** source: the frame to deliver (virtio-net header included) */
  frame?: Uint8Array;
  /** source: stop after this many frames (default: never) */
  frameLimit?: number;
}

function isOptions(o: unknown): o is NetWorkerOptions {
  const r = (o as { role?: unknown } | null)?.role;
  return r === "sink" || r === "source";
}

/**
 * Build the handler for one queue.
 * @param init queue index, options ({@link NetWorkerOptions}) and shared counters
 * @returns the handler
 * @throws TypeError when the options are not {@link NetWorkerOptions} or no counters are given
 */
export function createQueueHandler(init: WorkerHandlerInit): WorkerQueueHandler {
  const opts = init.options;
  if (!isOptions(opts)) {
    throw new TypeError(`net-test-worker: queue ${init.index}: bad options ${String(opts)}`);
  }
  const c = init.counters;
  if (c === null || c.length < WorkerCounter.COUNT) {
    throw new TypeError(`net-test-worker: queue ${init.index}: counters missing`);
  }
  if (opts.role === "sink") {
    // A scratch buffer each frame is copied into, as a real device (or DPDK's rxonly) would.
    const scratch = new Uint8Array(65562);
    return {
      process(queue: BackendQueue): boolean {
        let budget = BUDGET;
        let chain: DescChain | null;
        let packets = 0;
        let bytes = 0;
        let dropped = 0;
        while (budget > 0 && (chain = queue.pop()) !== null) {
          budget--;
          if (!queue.enabled) {
            dropped++;
          } else {
            packets++;
            bytes += chain.readableLength - NET_HDR_SIZE;
            queue.read(chain, scratch.subarray(0, Math.min(chain.readableLength, scratch.length)));
          }
          queue.pushUsed(chain, 0);
        }
        c[WorkerCounter.PACKETS] = (c[WorkerCounter.PACKETS] as number) + packets;
        c[WorkerCounter.BYTES] = (c[WorkerCounter.BYTES] as number) + bytes;
        c[WorkerCounter.DROPPED] = (c[WorkerCounter.DROPPED] as number) + dropped;
        return budget === 0;
      },
    };
  }
  const frame = opts.frame ?? new Uint8Array(NET_HDR_SIZE + 60);
  const limit = opts.frameLimit ?? Infinity;
  return {
    process(queue: BackendQueue): boolean {
      if (!queue.enabled) return false; // started but disabled: fill no buffer
      let budget = BUDGET;
      let packets = 0;
      let bytes = 0;
      let more = true;
      while (budget-- > 0) {
        if ((c[WorkerCounter.PACKETS] as number) + packets >= limit) {
          more = false;
          break;
        }
        const chain = queue.pop();
        if (chain === null) {
          more = false;
          break;
        }
        const written = queue.write(chain, frame);
        queue.pushUsed(chain, written);
        packets++;
        bytes += written - NET_HDR_SIZE;
      }
      c[WorkerCounter.PACKETS] = (c[WorkerCounter.PACKETS] as number) + packets;
      c[WorkerCounter.BYTES] = (c[WorkerCounter.BYTES] as number) + bytes;
      return more;
    },
  };
}
