/**
 * A minimal virtio-net device for tests and benchmarks: a sink that counts the frames the
 * driver transmits, an echo that sends them back, or a source that fills every receive buffer
 * with a frame. Queues come in pairs: 2k receives (device to driver), 2k+1 transmits.
 */
import { featureMask, VirtioFeature, ProtocolFeature } from "../protocol/constants.js";
import type {
  BackendQueue,
  DeviceContext,
  VhostUserDevice,
  WorkerQueueSpec,
} from "../backend/device.js";
import type { DescChain } from "../virtq/types.js";
import { WorkerCounter } from "./net-test-worker.js";
import type { NetWorkerOptions } from "./net-test-worker.js";

/** virtio_net_hdr_v1 size (VIRTIO 1.2 §5.1.6: 12 bytes once VERSION_1 is negotiated). */
export const NET_HDR_SIZE = 12;

/** Most chains handled per queue per turn before yielding to the event loop. */
const BUDGET = 512;
/** Largest chain accepted on TX: a 64 KiB frame plus header and slack. Larger ones are dropped. */
const MAX_CHAIN_BYTES = 65_536 + 512;
/** Echo frames kept for a driver that posts no receive buffers; more are dropped. */
const MAX_PENDING = 4096;

/** What the device does with transmitted frames. */
export type NetTestMode = "sink" | "echo" | "source";

/** Options of {@link NetTestDevice}. */
export interface NetTestDeviceOptions {
  mode: NetTestMode;
  /** queue pairs (default 1) */
  queuePairs?: number;
  /** source mode: frame length without the virtio-net header (default 64) */
  frameLength?: number;
  /** source mode: stop after this many frames (default: never) */
  frameLimit?: number;
  /** largest queue size (default 1024) */
  maxQueueSize?: number;
  /** keep a copy of every received frame (tests only; default false) */
  keepFrames?: boolean;
  /**
   * Run the data queues in worker threads (`src/devices/net-test-worker.ts`): in sink mode
   * every transmit queue, in source mode every receive queue. Not available in echo mode nor
   * with `keepFrames`. The back-end then offers no dirty logging (no live migration).
   */
  workerQueues?: boolean;
}

/** Counters per queue pair. */
export interface NetTestCounters {
  /** frames written into the receive queue */
  rxPackets: number;
  /** bytes of those frames (without the virtio-net header) */
  rxBytes: number;
  /** frames taken from the transmit queue */
  txPackets: number;
  /** bytes of those frames (without the virtio-net header) */
  txBytes: number;
  /** frames dropped because the ring was started but disabled, or no RX buffer was free */
  dropped: number;
}

/**
 * The test device. Counters are per queue pair; `frames` holds copies when `keepFrames` is set.
 */
export class NetTestDevice implements VhostUserDevice {
  /** virtio device id: network (VIRTIO 1.2 §5) */
  readonly deviceId = 1;
  /** device feature bits offered (MAC, STATUS; NET_MQ and CTRL_VQ with several pairs) */
  readonly features: bigint;
  /** protocol features of the device itself (MQ) */
  readonly protocolFeatures = featureMask(ProtocolFeature.MQ);
  /** number of queues: two per queue pair (RX 2k, TX 2k+1) */
  readonly queueCount: number;
  /** queue pairs, reported by GET_QUEUE_NUM */
  readonly queueNum: number;
  /** largest queue size accepted by SET_VRING_NUM */
  readonly maxQueueSize: number;
  /** what the device does with frames */
  readonly mode: NetTestMode;
  /** counters per queue pair */
  readonly counters: NetTestCounters[];
  /** copies of the frames received (only with `keepFrames`) */
  readonly frames: Uint8Array[] = [];
  /** true when data queues run in worker threads (`workerQueues`) */
  readonly hasWorkerQueues: boolean;
  /** per queue pair, the counters shared with the worker of its data queue */
  readonly #shared: Float64Array[];
  #ctx: DeviceContext | null = null;
  #frame: Uint8Array;
  #frameLimit: number;
  #keep: boolean;
  #pending: Uint8Array[][];
  #scheduled = new Set<number>();
  /** scratch buffer the sink copies each frame into, as a real device (or DPDK's rxonly) would */
  #scratch = new Uint8Array(MAX_CHAIN_BYTES);

  /**
   * A virtio-net test device (VIRTIO 1.2 §5.1) in sink, source or echo mode.
   * @param options mode, queue pairs, frame length
   * @throws RangeError when `workerQueues` is combined with echo mode or `keepFrames`
   */
  constructor(options: NetTestDeviceOptions) {
    const pairs = options.queuePairs ?? 1;
    this.mode = options.mode;
    this.queueCount = pairs * 2;
    this.queueNum = pairs;
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    this.features =
      featureMask(VirtioFeature.MAC) |
      featureMask(VirtioFeature.STATUS) |
      (pairs > 1 ? featureMask(VirtioFeature.NET_MQ) | featureMask(VirtioFeature.CTRL_VQ) : 0n);
    this.hasWorkerQueues = options.workerQueues ?? false;
    if (this.hasWorkerQueues && (this.mode === "echo" || options.keepFrames === true)) {
      throw new RangeError(
        `NetTestDevice: workerQueues is not available in ${this.mode} mode with keepFrames=${String(options.keepFrames ?? false)}`,
      );
    }
    this.#shared = Array.from(
      { length: this.hasWorkerQueues ? pairs : 0 },
      () =>
        new Float64Array(
          new SharedArrayBuffer(WorkerCounter.COUNT * Float64Array.BYTES_PER_ELEMENT),
        ),
    );
    this.counters = Array.from({ length: pairs }, (_, i) => {
      const c: NetTestCounters = { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0, dropped: 0 };
      const shared = this.#shared[i];
      if (shared) {
        // The worker is the only writer of its direction's counters: read them live.
        const [packets, bytes] =
          this.mode === "sink" ? ["txPackets", "txBytes"] : ["rxPackets", "rxBytes"];
        Object.defineProperty(c, packets, {
          get: () => shared[WorkerCounter.PACKETS],
          enumerable: true,
        });
        Object.defineProperty(c, bytes, {
          get: () => shared[WorkerCounter.BYTES],
          enumerable: true,
        });
        Object.defineProperty(c, "dropped", {
          get: () => shared[WorkerCounter.DROPPED],
          enumerable: true,
        });
      }
      return c;
    });
    this.#pending = Array.from({ length: pairs }, () => []);
    const len = options.frameLength ?? 64;
    this.#frame = new Uint8Array(NET_HDR_SIZE + len);
    // Ethernet broadcast frame from a locally administered MAC, payload of a counting pattern.
    this.#frame.set(
      [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5],
      NET_HDR_SIZE,
    );
    for (let i = NET_HDR_SIZE + 14; i < this.#frame.length; i++) this.#frame[i] = i & 0xff;
    this.#frameLimit = options.frameLimit ?? Infinity;
    this.#keep = options.keepFrames ?? false;
  }

  /**
   * The worker handler of a data queue when `workerQueues` is set: sink mode runs the transmit
   * queues (2k+1), source mode the receive queues (2k) in workers.
   * @param index queue index
   * @returns the spec, or null for a queue processed on the main thread
   */
  workerQueue(index: number): WorkerQueueSpec | null {
    const shared = this.#shared[index >> 1];
    if (!shared) return null;
    const tx = (index & 1) === 1;
    if (this.mode === "sink" && tx) {
      const options: NetWorkerOptions = { role: "sink" };
      return {
        module: new URL("./net-test-worker.js", import.meta.url).href,
        options,
        counters: shared,
      };
    }
    if (this.mode === "source" && !tx) {
      const options: NetWorkerOptions = {
        role: "source",
        frame: this.#frame,
        ...(Number.isFinite(this.#frameLimit) ? { frameLimit: this.#frameLimit } : {}),
      };
      return {
        module: new URL("./net-test-worker.js", import.meta.url).href,
        options,
        counters: shared,
      };
    }
    return null;
  }

  /** @inheritdoc */
  attach(ctx: DeviceContext): void {
    this.#ctx = ctx;
  }

  /** @inheritdoc */
  detach(): void {
    this.#ctx = null;
    for (const p of this.#pending) p.length = 0;
  }

  /** @returns total frames received from the driver (all pairs) */
  get totalTx(): number {
    return this.counters.reduce((s, c) => s + c.txPackets, 0);
  }

  /** @returns total frames delivered to the driver (all pairs) */
  get totalRx(): number {
    return this.counters.reduce((s, c) => s + c.rxPackets, 0);
  }

  /** @inheritdoc */
  processQueue(queue: BackendQueue): void {
    const pair = queue.index >> 1;
    if (queue.index & 1) this.#transmit(queue, pair);
    else this.#receive(queue, pair);
  }

  /** Driver transmitted: count, and echo or drop. */
  #transmit(queue: BackendQueue, pair: number): void {
    const c = this.counters[pair]!;
    let budget = BUDGET;
    let chain: DescChain | null;
    while (budget-- > 0 && (chain = queue.pop()) !== null) {
      const len = Math.max(0, chain.readableLength - NET_HDR_SIZE);
      const echoFull = this.mode === "echo" && this.#pending[pair]!.length >= MAX_PENDING;
      if (!queue.enabled || chain.readableLength > MAX_CHAIN_BYTES || echoFull) {
        // disabled ring, a chain larger than any frame (a guest can make one of up to 4 GiB
        // by reusing one buffer), or an echo backlog the driver does not drain: drop
        c.dropped++;
      } else {
        c.txPackets++;
        c.txBytes += len;
        if (this.mode === "sink" && !this.#keep) {
          // The whole chain fits (checked above): no subarray per frame.
          queue.read(chain, this.#scratch);
        } else {
          const copy = new Uint8Array(chain.readableLength);
          queue.read(chain, copy);
          if (this.#keep) this.frames.push(copy.subarray(NET_HDR_SIZE));
          if (this.mode === "echo") this.#pending[pair]!.push(copy);
        }
      }
      queue.pushUsed(chain, 0);
    }
    if (budget < 0) this.#reschedule(queue);
    if (this.mode === "echo") {
      const rx = this.#ctx?.queue(pair * 2);
      if (rx?.started) {
        this.#receive(rx, pair);
        rx.flush();
      }
    }
  }

  /** Fill receive buffers: echoed frames, or generated frames in source mode. */
  #receive(queue: BackendQueue, pair: number): void {
    if (!queue.enabled) return; // started but disabled: fill no RX buffer
    const c = this.counters[pair]!;
    const pending = this.#pending[pair]!;
    let budget = BUDGET;
    while (budget-- > 0) {
      let frame: Uint8Array | undefined;
      if (this.mode === "source") {
        if (c.rxPackets >= this.#frameLimit) return;
        frame = this.#frame;
      } else {
        frame = pending[0];
        if (!frame) return;
      }
      const chain = queue.pop();
      if (!chain) return;
      const written = queue.write(chain, frame);
      queue.pushUsed(chain, written);
      if (this.mode !== "source") pending.shift();
      c.rxPackets++;
      c.rxBytes += written - NET_HDR_SIZE;
    }
    this.#reschedule(queue);
  }

  /** More work is left: come back after other events had their turn. */
  #reschedule(queue: BackendQueue): void {
    if (this.#scheduled.has(queue.index)) return;
    this.#scheduled.add(queue.index);
    setImmediate(() => {
      this.#scheduled.delete(queue.index);
      const q = this.#ctx?.queue(queue.index);
      if (q?.started && q.broken === null) {
        try {
          this.processQueue(q);
        } catch (err) {
          q.markBroken(`device error: ${err instanceof Error ? err.message : String(err)}`);
          return;
        }
        q.flush();
      }
    });
  }
}
