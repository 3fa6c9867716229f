/**
 * The vhost-user front-end (the VMM / driver side): connects to (or accepts) a back-end,
 * negotiates features in QEMU's order, shares guest RAM, sets up and drives virtqueues, stops
 * and restarts rings, and answers the back-end request channel. It drives any vhost-user
 * back-end: vhostkit's own, DPDK's vhost PMD, libvhost-user devices.
 *
 * Request order follows QEMU (`hw/virtio/vhost-user.c` `vhost_user_backend_init`, `hw/virtio/
 * vhost.c` `vhost_dev_init` / `vhost_dev_start` / `vhost_virtqueue_start`):
 * GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM (MQ),
 * GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), SET_BACKEND_REQ_FD (BACKEND_REQ), SET_OWNER; then at
 * start SET_FEATURES, SET_MEM_TABLE, and per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
 * SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR, SET_VRING_ENABLE.
 *
 * Requests without a reply body carry NEED_REPLY and wait for their ack when REPLY_ACK is
 * negotiated (a failed ack rejects with ERR_VHOST_REQUEST_FAILED naming the request); without
 * REPLY_ACK they are sent without waiting, and the steps that must be synchronous (memory-table
 * replacement) use a GET_FEATURES round trip, as QEMU's `vhost_user_write_sync` does.
 *
 * Every message goes through {@link Channel}, which publishes it on diagnostics_channel.
 */
import { EventEmitter } from "node:events";
import { lstatSync, unlinkSync } from "node:fs";
import { isNativeError, native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import { Channel } from "../channel.js";
import type {
  BackendMessage,
  ChannelLogger,
  ChannelReply,
  ChannelRequestPayload,
  RequestOptions,
} from "../channel.js";
import {
  BackendRequest,
  FrontendRequest,
  MAX_MEM_REGIONS,
  ProtocolFeature,
  VirtioFeature,
  VRING_F_LOG,
  featureMask,
  featureSet,
  hasFeature,
} from "../protocol/constants.js";
import {
  decodePackedVringBase,
  decodeSplitVringBase,
  encodePackedVringBase,
  encodeSplitVringBase,
} from "../protocol/codecs.js";
import type { ConfigSpace, MemoryRegion } from "../protocol/codecs.js";
import { VhostUserError } from "../protocol/errors.js";
import type { FrontendReplyPayloads, FrontendRequestPayloads } from "../protocol/table.js";
import type { Gpa } from "../memory/address.js";
import { alignUp, packedRingSizes, splitRingPlacement, splitRingSizes } from "../virtq/layout.js";
import type { QueueBase } from "../virtq/types.js";
import type { GuestRam } from "./guest-ram.js";
import { toWireRegion } from "./guest-ram.js";
import { DEFAULT_BUFFER_SIZE, FrontendQueue } from "./queue.js";
import type { DriverSnapshot, RingAddresses } from "./queue.js";

/** Protocol features this front-end implements (and asks for by default). */
export const FRONTEND_PROTOCOL_FEATURES = featureSet(
  ProtocolFeature.MQ,
  ProtocolFeature.LOG_SHMFD,
  ProtocolFeature.RARP,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.CONFIG,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.STATUS,
  ProtocolFeature.DEVICE_STATE,
);

/** Virtio features asked for by default: VERSION_1 (and F_PROTOCOL_FEATURES when offered). */
export const DEFAULT_FRONTEND_FEATURES = featureSet(VirtioFeature.VERSION_1);

/** Virtio device status bits (VIRTIO 1.2 §2.1). */
export const DeviceStatus = Object.freeze({
  ACKNOWLEDGE: 1,
  DRIVER: 2,
  DRIVER_OK: 4,
  FEATURES_OK: 8,
  DEVICE_NEEDS_RESET: 64,
  FAILED: 128,
});

/** Options shared by {@link VhostUserFrontend.connect}, {@link VhostUserFrontend.listen} and the constructor. */
export interface FrontendOptions {
  /** name for logs and diagnostics (default: the socket path or `frontend/fdN`) */
  name?: string;
  /** logger passed to the channels */
  logger?: ChannelLogger;
  /** reject a request (and close the connection) after this many ms without reply (default 10000) */
  requestTimeoutMs?: number;
  /** ask for an ack on every request without a reply body when REPLY_ACK is negotiated (default true) */
  useReplyAck?: boolean;
}

/** Options of {@link VhostUserFrontend.connect}. */
export interface ConnectOptions extends FrontendOptions {
  /** keep retrying while the back-end is not listening, for this long (default 5000 ms) */
  timeoutMs?: number;
  /** delay between attempts (default 10 ms, doubling up to 200 ms) */
  retryDelayMs?: number;
}

/** Options of {@link VhostUserFrontend.listen}. */
export interface ListenOptions extends FrontendOptions {
  /** give up when no back-end connected in this long (default: wait forever) */
  timeoutMs?: number;
  /** remove a stale socket file at the path first (default true) */
  unlinkStale?: boolean;
}

/** What {@link VhostUserFrontend.negotiate} asks for. */
export interface NegotiateOptions {
  /** virtio feature bits wanted (F_PROTOCOL_FEATURES is added when offered) */
  features?: bigint;
  /** protocol feature bits wanted (default {@link FRONTEND_PROTOCOL_FEATURES}) */
  protocolFeatures?: bigint;
  /** set up the back-end request channel when BACKEND_REQ is negotiated (default true) */
  backendReq?: boolean;
}

/** The outcome of {@link VhostUserFrontend.negotiate}. */
export interface Negotiated {
  /** GET_FEATURES */
  offeredFeatures: bigint;
  /** offered ∩ wanted (+ F_PROTOCOL_FEATURES when offered): what SET_FEATURES will ack */
  features: bigint;
  /** GET_PROTOCOL_FEATURES (0 when F_PROTOCOL_FEATURES is not offered) */
  offeredProtocolFeatures: bigint;
  /** the value sent with SET_PROTOCOL_FEATURES */
  protocolFeatures: bigint;
  /** GET_QUEUE_NUM, or null without MQ */
  queueNum: number | null;
  /** GET_MAX_MEM_SLOTS, or null without CONFIGURE_MEM_SLOTS */
  maxMemSlots: number | null;
}

/** Options of {@link VhostUserFrontend.setupQueue}. */
export interface QueueSetupOptions {
  /** number of descriptors (split: a power of 2) */
  size: number;
  /** packed ring (default: RING_PACKED in the acked features) */
  packed?: boolean;
  /** EVENT_IDX (default: RING_EVENT_IDX in the acked features) */
  eventIdx?: boolean;
  /** split only: indirect tables for multi-segment buffers (default false; needs INDIRECT_DESC) */
  indirect?: boolean;
  /** SET_VRING_BASE: a base, or the raw `num` (default 0 / packed 0 with both wrap counters 1) */
  base?: QueueBase | number;
  /** kick eventfd, or `"none"` to send the no-fd flag (the back-end polls) */
  kick?: "eventfd" | "none";
  /** call eventfd, or `"none"` (no-fd flag) */
  call?: "eventfd" | "none";
  /** err eventfd, or `"none"` (no-fd flag), or `"skip"` (no SET_VRING_ERR at all) */
  err?: "eventfd" | "none" | "skip";
  /** send SET_VRING_ENABLE 1 when F_PROTOCOL_FEATURES is acked (default true) */
  enable?: boolean;
  /** VHOST_VRING_F_LOG in SET_VRING_ADDR (default false) */
  log?: boolean;
  /** allocate the ring in this region (default: the first with room) */
  ringRegion?: number;
  /** allocate net-helper buffers in this region (default: the last region, else any) */
  bufferRegion?: number;
  /** bytes per net-helper buffer (default 2048) */
  bufferSize?: number;
  /**
   * Destination of a migration: rebuild the driver side from the source's snapshot at the
   * snapshot's ring addresses (size, format, event idx and buffer size come from it; nothing is
   * allocated). Give the device's position in `base`.
   */
  restore?: DriverSnapshot;
  /**
   * With REPLY_ACK: send the ring's requests back to back and wait for their acks together
   * (the same requests in the same order, one round trip for the ring instead of one per
   * request; a refused request is reported after the later ones were sent). Default false.
   */
  pipeline?: boolean;
}

/** Options of {@link VhostUserFrontend.setMemTable}. */
export interface MemTableOptions {
  /** SET_MEM_TABLE (default) or one ADD_MEM_REG per region (needs CONFIGURE_MEM_SLOTS) */
  method?: "set-mem-table" | "add-mem-reg";
  /** without REPLY_ACK, follow with a GET_FEATURES round trip (default false) */
  sync?: boolean;
}

/** Options of {@link VhostUserFrontend.replaceMemory}. */
export interface ReplaceMemoryOptions {
  /**
   * `"live"` (split rings only): rings keep running; every ring is moved to the new RAM and the
   * memory table switched; the device must be idle meanwhile. `"stop"`: every ring is stopped
   * (GET_VRING_BASE), moved, and restarted after the switch (packed rings restart at 0).
   */
  mode?: "live" | "stop";
  /** close the previous RAM after the switch (default false: the caller owns it) */
  closePrevious?: boolean;
}

type Reply = { kind: "reply" | "ack"; payload: unknown; fds: number[]; name: string };

const PF = ProtocolFeature;
const FR = FrontendRequest;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function usageError(step: string, field: string, value: unknown, what: string): VhostUserError {
  return new VhostUserError("ERR_VHOST_BAD_FIELD", what, {
    request: step,
    field,
    value,
    fatal: false,
  });
}

function removeStaleSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // does not exist
  }
}

/**
 * A vhost-user front-end on one connection.
 *
 * Events: `queue-error` (queue index: the err eventfd of a ring fired), `config-change`
 * (BACKEND_CONFIG_CHANGE_MSG), `backend-request` (a back-end request this class does not handle,
 * with the message; it is answered with a failure when an answer is due), `close` (the
 * connection ended, with the cause), `error` (a protocol error on a channel; only emitted when
 * someone listens).
 */
export class VhostUserFrontend extends EventEmitter {
  /** the main channel (front-end role) */
  readonly channel: Channel<"main">;
  /** name for logs */
  readonly name: string;
  readonly #timeoutMs: number;
  readonly #useReplyAck: boolean;
  readonly #logger: ChannelLogger | undefined;
  #negotiated: Negotiated | null = null;
  #ackedFeatures: bigint | null = null;
  #ram: GuestRam | null = null;
  #memSlots: MemoryRegion[] = [];
  readonly #queues = new Map<number, FrontendQueue>();
  /** rings whose SET_VRING_NUM was sent ahead by {@link prestageQueue}: index -> size */
  readonly #prestaged = new Map<number, number>();
  readonly #inflight = new Set<Promise<unknown>>();
  #backendChannel: Channel<"backend-req"> | null = null;
  #closed = false;

  /**
   * Wrap a connected socket (see {@link connect} and {@link listen}).
   * @param fd a connected, non-blocking Unix stream socket; owned from now on
   * @param options name, logger, request timeout, REPLY_ACK use
   */
  constructor(fd: number, options: FrontendOptions = {}) {
    super();
    this.name = options.name ?? `frontend/fd${fd}`;
    this.#timeoutMs = options.requestTimeoutMs ?? 10_000;
    this.#useReplyAck = options.useReplyAck ?? true;
    this.#logger = options.logger;
    const chOpts = { role: "frontend" as const, kind: "main" as const, name: this.name };
    this.channel = new Channel<"main">(
      fd,
      this.#logger ? { ...chOpts, logger: this.#logger } : chOpts,
    );
    this.channel.on("error", (err: Error) => {
      if (this.listenerCount("error") > 0) this.emit("error", err);
    });
    this.channel.on("close", (cause?: Error) => {
      this.#teardown();
      this.emit("close", cause);
    });
  }

  /**
   * Connect to a back-end listening on `path`, retrying while it is not listening yet.
   * @param path socket path
   * @param options retry budget and delay, name, logger, timeouts
   * @returns the connected front-end
   * @throws VhostUserError ERR_VHOST_TIMEOUT naming the path and the last errno when the budget
   *   runs out; the native error for any other connect failure
   */
  static async connect(path: string, options: ConnectOptions = {}): Promise<VhostUserFrontend> {
    const budget = options.timeoutMs ?? 5000;
    const deadline = Date.now() + budget;
    let delay = options.retryDelayMs ?? 10;
    for (;;) {
      let fd: number;
      try {
        fd = native.unixConnect(path);
      } catch (err) {
        const code = isNativeError(err) ? err.code : "";
        const retriable = code === "ENOENT" || code === "ECONNREFUSED" || code === "EAGAIN";
        if (!retriable) throw err;
        if (Date.now() + delay > deadline) {
          throw new VhostUserError(
            "ERR_VHOST_TIMEOUT",
            `no back-end listening after ${budget} ms`,
            {
              request: "connect",
              field: "path",
              value: `${path} (${code})`,
              cause: err,
            },
          );
        }
        await sleep(delay);
        delay = Math.min(delay * 2, 200);
        continue;
      }
      return new VhostUserFrontend(fd, { ...options, name: options.name ?? path });
    }
  }

  /**
   * Listen on `path` and wait for a back-end in client mode to connect; the listening socket
   * is closed and its file removed once one has connected.
   * @param path socket path
   * @param options timeout, stale-socket removal, name, logger
   * @returns the connected front-end
   * @throws VhostUserError ERR_VHOST_TIMEOUT when nobody connects in time; NativeError when the
   *   socket cannot be created
   */
  static listen(path: string, options: ListenOptions = {}): Promise<VhostUserFrontend> {
    if (options.unlinkStale !== false) removeStaleSocket(path);
    const lfd = native.unixListen(path, 1);
    return new Promise<VhostUserFrontend>((resolve, reject) => {
      let timer: NodeJS.Timeout | null = null;
      let watcher: FdWatcher | null = null;
      let done = false;
      const finish = (): void => {
        done = true;
        if (timer) clearTimeout(timer);
        watcher?.close();
        native.close(lfd);
        try {
          unlinkSync(path);
        } catch {
          // already gone
        }
      };
      try {
        watcher = new native.FdWatcher(lfd, (_ev, err) => {
          if (done) return;
          if (err) {
            finish();
            reject(err);
            return;
          }
          let fd: number | null;
          try {
            fd = native.unixAccept(lfd);
          } catch (e) {
            finish();
            reject(e as Error);
            return;
          }
          if (fd === null) return;
          finish();
          resolve(new VhostUserFrontend(fd, { ...options, name: options.name ?? path }));
        });
        watcher.start(POLL_READABLE);
      } catch (err) {
        // No watcher: release the listening fd and the socket file now.
        finish();
        reject(err as Error);
        return;
      }
      if (options.timeoutMs !== undefined) {
        const ms = options.timeoutMs;
        timer = setTimeout(() => {
          if (done) return;
          finish();
          reject(
            new VhostUserError("ERR_VHOST_TIMEOUT", `no back-end connected within ${ms} ms`, {
              request: "listen",
              field: "path",
              value: path,
            }),
          );
        }, ms);
      }
    });
  }

  // --- state ---------------------------------------------------------------------------

  /** @returns the outcome of {@link negotiate}, or null before */
  get negotiated(): Negotiated | null {
    return this.#negotiated;
  }

  /** @returns the features SET_FEATURES will ack (or acked), 0 before negotiation */
  get features(): bigint {
    return this.#ackedFeatures ?? this.#negotiated?.features ?? 0n;
  }

  /** @returns the features last sent with SET_FEATURES, or null */
  get ackedFeatures(): bigint | null {
    return this.#ackedFeatures;
  }

  /** @returns the negotiated protocol features (0 before negotiation) */
  get protocolFeatures(): bigint {
    return this.channel.protocolFeatures;
  }

  /** @returns the guest RAM last shared with the back-end, or null */
  get ram(): GuestRam | null {
    return this.#ram;
  }

  /** @returns the back-end request channel, or null */
  get backendChannel(): Channel<"backend-req"> | null {
    return this.#backendChannel;
  }

  /** @returns true once closed */
  get closed(): boolean {
    return this.#closed;
  }

  /**
   * The queue set up with this index.
   * @param index queue index
   * @returns the queue, or undefined
   */
  queue(index: number): FrontendQueue | undefined {
    return this.#queues.get(index);
  }

  /** @returns every queue set up, by index */
  get queues(): ReadonlyMap<number, FrontendQueue> {
    return this.#queues;
  }

  #hasProtocol(bit: ProtocolFeature): boolean {
    return hasFeature(this.channel.protocolFeatures, bit);
  }

  #requireProtocol(step: string, bit: ProtocolFeature): void {
    if (!this.#hasProtocol(bit)) {
      throw new VhostUserError("ERR_VHOST_NOT_NEGOTIATED", "protocol feature not negotiated", {
        request: step,
        field: "protocol feature",
        value: ProtocolFeature[bit],
      });
    }
  }

  #protocolFeaturesAcked(): boolean {
    const f = this.#ackedFeatures ?? this.#negotiated?.features ?? 0n;
    return hasFeature(f, VirtioFeature.PROTOCOL_FEATURES);
  }

  // --- generic requests ----------------------------------------------------------------

  #track<T>(p: Promise<T>): Promise<T> {
    this.#inflight.add(p);
    const done = (): void => {
      this.#inflight.delete(p);
    };
    p.then(done, done);
    return p;
  }

  /**
   * Send any front-end request and wait for its reply (conformance tests). A request without
   * a reply body waits for its ack, which needs REPLY_ACK (see {@link send} otherwise).
   * @param request request id
   * @param payload its payload
   * @param fds fds to attach (not taken over)
   * @param options NEED_REPLY, timeout, reply-kind override
   * @returns the reply body or the zero ack; its fds belong to the caller
   * @throws VhostUserError as {@link Channel.request}
   */
  request<Q extends FrontendRequest>(
    request: Q,
    payload: FrontendRequestPayloads[Q],
    fds: readonly number[] = [],
    options: RequestOptions = {},
  ): Promise<ChannelReply<"main", Q>> {
    return this.#track(
      this.channel.request(request, payload as ChannelRequestPayload<"main", Q>, fds, {
        timeoutMs: this.#timeoutMs,
        ...options,
      }),
    );
  }

  /**
   * Send any front-end request without waiting (a reply that comes is consumed in order).
   * @param request request id
   * @param payload its payload
   * @param fds fds to attach (not taken over)
   * @param needReply set NEED_REPLY
   * @throws VhostUserError ERR_VHOST_CLOSED when the connection is closed
   */
  send<Q extends FrontendRequest>(
    request: Q,
    payload: FrontendRequestPayloads[Q],
    fds: readonly number[] = [],
    needReply = false,
  ): void {
    this.channel.send(request, payload as ChannelRequestPayload<"main", Q>, fds, { needReply });
  }

  /** A request with a reply body: its payload. */
  async #ask<Q extends FrontendRequest>(
    request: Q,
    payload: FrontendRequestPayloads[Q],
  ): Promise<FrontendReplyPayloads[Q]> {
    const msg = (await this.request(request, payload)) as unknown as Reply;
    for (const fd of msg.fds) native.close(fd);
    if (msg.kind !== "reply") {
      throw new VhostUserError("ERR_VHOST_UNEXPECTED_REPLY", "expected a reply body, got an ack", {
        request: msg.name,
      });
    }
    return msg.payload as FrontendReplyPayloads[Q];
  }

  /**
   * A request without a reply body: acked when REPLY_ACK is negotiated, else sent without
   * waiting (and followed by a GET_FEATURES round trip when `sync`).
   */
  async #call<Q extends FrontendRequest>(
    request: Q,
    payload: FrontendRequestPayloads[Q],
    fds: readonly number[] = [],
    sync = false,
  ): Promise<void> {
    if (this.#useReplyAck && this.channel.replyAck) {
      await this.request(request, payload, fds);
      return;
    }
    this.send(request, payload, fds);
    if (sync) await this.#roundTrip();
  }

  async #roundTrip(): Promise<void> {
    await this.#ask(FR.GET_FEATURES, null);
  }

  /**
   * Make sure the back-end has processed every request sent so far: with REPLY_ACK, wait for
   * every outstanding reply and ack; without it, a GET_FEATURES round trip (replies come in
   * order), as QEMU's `vhost_user_write_sync`.
   * @returns when the back-end caught up
   * @throws VhostUserError when the round trip fails or the connection closes
   */
  async barrier(): Promise<void> {
    if (this.#useReplyAck && this.channel.replyAck) {
      await Promise.allSettled([...this.#inflight]);
      return;
    }
    await this.#roundTrip();
  }

  // --- negotiation ---------------------------------------------------------------------

  /**
   * Negotiate features, in QEMU's order: GET_FEATURES; GET_PROTOCOL_FEATURES and
   * SET_PROTOCOL_FEATURES (offered ∩ wanted) when F_PROTOCOL_FEATURES is offered;
   * GET_QUEUE_NUM with MQ; GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS; SET_BACKEND_REQ_FD with
   * BACKEND_REQ; SET_OWNER. SET_FEATURES comes later ({@link setFeatures} / {@link start}).
   * @param options wanted virtio and protocol features, back-end channel
   * @returns the negotiated sets
   * @throws VhostUserError when a request fails
   * (vhost-user: "Feature negotiation", "Protocol features")
   */
  async negotiate(options: NegotiateOptions = {}): Promise<Negotiated> {
    const wanted = options.features ?? DEFAULT_FRONTEND_FEATURES;
    const wantedPf = options.protocolFeatures ?? FRONTEND_PROTOCOL_FEATURES;
    const offered = await this.#ask(FR.GET_FEATURES, null);
    const pfBit = featureMask(VirtioFeature.PROTOCOL_FEATURES);
    const result: Negotiated = {
      offeredFeatures: offered,
      features: (offered & wanted) | (offered & pfBit),
      offeredProtocolFeatures: 0n,
      protocolFeatures: 0n,
      queueNum: null,
      maxMemSlots: null,
    };
    if ((offered & pfBit) !== 0n) {
      result.offeredProtocolFeatures = await this.#ask(FR.GET_PROTOCOL_FEATURES, null);
      result.protocolFeatures = result.offeredProtocolFeatures & wantedPf;
      // Sent before REPLY_ACK is in force: no ack requested (as QEMU).
      this.send(FR.SET_PROTOCOL_FEATURES, result.protocolFeatures);
      this.channel.setNegotiatedProtocolFeatures(result.protocolFeatures);
      if (this.#hasProtocol(PF.MQ)) {
        result.queueNum = Number(await this.#ask(FR.GET_QUEUE_NUM, null));
      }
      if (this.#hasProtocol(PF.CONFIGURE_MEM_SLOTS)) {
        result.maxMemSlots = Number(await this.#ask(FR.GET_MAX_MEM_SLOTS, null));
      }
    }
    this.#negotiated = result;
    if (this.#hasProtocol(PF.BACKEND_REQ) && options.backendReq !== false) {
      await this.setBackendReqFd();
    }
    await this.#call(FR.SET_OWNER, null);
    return result;
  }

  /**
   * SET_FEATURES.
   * @param features the bits to ack (default: the negotiated intersection)
   * @throws VhostUserError when the back-end refuses (with REPLY_ACK)
   * (vhost-user: VHOST_USER_SET_FEATURES)
   */
  async setFeatures(features?: bigint): Promise<void> {
    const f = features ?? this.#negotiated?.features ?? DEFAULT_FRONTEND_FEATURES;
    await this.#call(FR.SET_FEATURES, f);
    this.#ackedFeatures = f;
  }

  /**
   * GET_FEATURES.
   * @returns the features the back-end offers
   */
  getFeatures(): Promise<bigint> {
    return this.#ask(FR.GET_FEATURES, null);
  }

  /**
   * GET_QUEUE_NUM (needs MQ).
   * @returns the number the back-end reports (queue pairs for net back-ends)
   */
  async getQueueNum(): Promise<number> {
    this.#requireProtocol("GET_QUEUE_NUM", PF.MQ);
    return Number(await this.#ask(FR.GET_QUEUE_NUM, null));
  }

  /**
   * GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS).
   * @returns the number of memory slots the back-end supports
   */
  async getMaxMemSlots(): Promise<number> {
    this.#requireProtocol("GET_MAX_MEM_SLOTS", PF.CONFIGURE_MEM_SLOTS);
    return Number(await this.#ask(FR.GET_MAX_MEM_SLOTS, null));
  }

  /**
   * SET_STATUS (needs STATUS).
   * @param status virtio device status byte ({@link DeviceStatus})
   */
  async setStatus(status: number): Promise<void> {
    this.#requireProtocol("SET_STATUS", PF.STATUS);
    await this.#call(FR.SET_STATUS, BigInt(status));
  }

  /**
   * GET_STATUS (needs STATUS).
   * @returns the virtio device status byte
   */
  async getStatus(): Promise<number> {
    this.#requireProtocol("GET_STATUS", PF.STATUS);
    return Number(await this.#ask(FR.GET_STATUS, null));
  }

  /**
   * GET_CONFIG (needs CONFIG).
   * @param offset offset in the config space
   * @param size bytes to read (<= 256)
   * @param flags config flags (0 = front-end)
   * @returns the bytes
   * @throws VhostUserError ERR_VHOST_REQUEST_FAILED (not fatal: the connection stays usable)
   *   when the reply's size differs; an empty reply, or one of size 0, is the back-end's failure
   *   answer (vhost-user: VHOST_USER_GET_CONFIG)
   */
  async getConfig(offset: number, size: number, flags = 0): Promise<Uint8Array> {
    this.#requireProtocol("GET_CONFIG", PF.CONFIG);
    const r: ConfigSpace = await this.#ask(FR.GET_CONFIG, {
      offset,
      size,
      flags,
      payload: new Uint8Array(size),
    });
    if (r.size !== size) {
      throw new VhostUserError(
        "ERR_VHOST_REQUEST_FAILED",
        r.size === 0
          ? `the back-end failed the request (empty reply; asked ${size} bytes at ${offset})`
          : `reply of ${r.size} bytes, asked ${size}`,
        { request: "GET_CONFIG", field: "size", value: r.size, fatal: false },
      );
    }
    return r.payload;
  }

  /**
   * SET_CONFIG (needs CONFIG).
   * @param offset offset in the config space
   * @param data bytes to write (<= 256)
   * @param flags config flags (0 = front-end, 1 = migration)
   */
  async setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    this.#requireProtocol("SET_CONFIG", PF.CONFIG);
    await this.#call(FR.SET_CONFIG, { offset, size: data.length, flags, payload: data });
  }

  /**
   * SEND_RARP (needs RARP).
   * @param mac the guest MAC: 6 bytes, or `"52:54:00:12:34:56"`
   * @throws RangeError for a malformed MAC
   */
  async sendRarp(mac: Uint8Array | string): Promise<void> {
    this.#requireProtocol("SEND_RARP", PF.RARP);
    let bytes: Uint8Array;
    if (typeof mac === "string") {
      const parts = mac.split(":");
      if (parts.length !== 6 || parts.some((p) => !/^[0-9a-f]{1,2}$/i.test(p))) {
        throw new RangeError(`SEND_RARP: malformed MAC (mac=${mac})`);
      }
      bytes = Uint8Array.from(parts, (p) => parseInt(p, 16));
    } else {
      bytes = mac;
    }
    await this.#call(FR.SEND_RARP, { mac: bytes });
  }

  /**
   * RESET_DEVICE (needs RESET_DEVICE). RESET_OWNER, which the spec no longer uses and which some
   * back-ends do not handle (a libvhost-user or rust-vmm back-end may end the process on a
   * request it does not know), goes out only when asked for with `allowResetOwner`, as QEMU
   * 7.2's `vhost_user_reset_device` falls back to it. The front-end forgets its queues (their
   * eventfds are closed) and the acked features.
   * @param options `allowResetOwner`: send RESET_OWNER when RESET_DEVICE is not negotiated
   *   (default false)
   * @throws VhostUserError ERR_VHOST_NOT_NEGOTIATED when RESET_DEVICE is not negotiated and
   *   RESET_OWNER is not allowed (nothing is sent)
   * (vhost-user: VHOST_USER_RESET_DEVICE, VHOST_USER_RESET_OWNER)
   */
  async resetDevice(options: { allowResetOwner?: boolean } = {}): Promise<void> {
    if (this.#hasProtocol(PF.RESET_DEVICE)) await this.#call(FR.RESET_DEVICE, null);
    else if (options.allowResetOwner === true) await this.#call(FR.RESET_OWNER, null);
    else this.#requireProtocol("RESET_DEVICE", PF.RESET_DEVICE);
    for (const q of this.#queues.values()) q.dispose();
    this.#queues.clear();
    this.#ackedFeatures = null;
  }

  /**
   * SET_VRING_ENABLE (needs F_PROTOCOL_FEATURES).
   * @param index queue index
   * @param enabled enable (true) or disable
   */
  async setVringEnable(index: number, enabled: boolean): Promise<void> {
    await this.#call(FR.SET_VRING_ENABLE, { index, num: enabled ? 1 : 0 });
    const q = this.#queues.get(index);
    if (q !== undefined) q.enabled = enabled;
  }

  /**
   * Set up the back-end request channel: a socketpair, one end sent with SET_BACKEND_REQ_FD, the
   * other wrapped in a {@link Channel} that answers CONFIG_CHANGE_MSG (event `config-change`),
   * VRING_CALL and VRING_ERR (in-band notifications), and refuses the rest.
   * @throws VhostUserError when BACKEND_REQ is not negotiated or the back-end refuses
   * (vhost-user: VHOST_USER_SET_BACKEND_REQ_FD, "Back-end message types")
   */
  async setBackendReqFd(): Promise<void> {
    this.#requireProtocol("SET_BACKEND_REQ_FD", PF.BACKEND_REQ);
    const [ours, theirs] = native.socketpair();
    let ch: Channel<"backend-req">;
    try {
      const chOpts = {
        role: "frontend" as const,
        kind: "backend-req" as const,
        name: `${this.name}/backend-req`,
      };
      ch = new Channel<"backend-req">(
        ours,
        this.#logger ? { ...chOpts, logger: this.#logger } : chOpts,
      );
    } catch (err) {
      native.close(ours);
      native.close(theirs);
      throw err;
    }
    ch.setNegotiatedProtocolFeatures(this.channel.protocolFeatures);
    ch.on("message", (msg: BackendMessage) => this.#onBackendMessage(ch, msg));
    ch.on("error", (err: Error) => {
      if (this.listenerCount("error") > 0) this.emit("error", err);
    });
    try {
      await this.#call(FR.SET_BACKEND_REQ_FD, null, [theirs]);
    } catch (err) {
      // The back-end did not take it: keep the channel it has, drop the new one.
      ch.close();
      throw err;
    } finally {
      native.close(theirs);
    }
    this.#backendChannel?.close();
    this.#backendChannel = ch;
  }

  #onBackendMessage(ch: Channel<"backend-req">, msg: BackendMessage): void {
    for (const fd of msg.fds) native.close(fd);
    let ok = true;
    switch (msg.request) {
      case BackendRequest.CONFIG_CHANGE_MSG:
        this.emit("config-change");
        break;
      case BackendRequest.VRING_CALL: {
        const q = this.#queues.get(msg.payload.index);
        if (q) q.emit("call", q.index);
        else ok = false;
        break;
      }
      case BackendRequest.VRING_ERR: {
        const q = this.#queues.get(msg.payload.index);
        if (q) {
          q.stats.errors++;
          q.emit("queue-error", q.index);
        } else ok = false;
        break;
      }
      default:
        ok = false;
        this.emit("backend-request", msg);
    }
    if (ch.closed) return;
    if (msg.request === BackendRequest.SHARED_OBJECT_LOOKUP) {
      ch.reply(msg.request, 1n);
    } else if (ch.needsAck(msg)) {
      ch.ack(msg, ok);
    }
  }

  // --- memory --------------------------------------------------------------------------

  /**
   * Share guest RAM with the back-end: SET_MEM_TABLE with one fd per region, or one
   * ADD_MEM_REG per region (CONFIGURE_MEM_SLOTS).
   * @param ram the guest RAM
   * @param options method, sync
   * @throws VhostUserError for more than 8 regions with SET_MEM_TABLE, or a failed ack
   * (vhost-user: VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG)
   */
  async setMemTable(ram: GuestRam, options: MemTableOptions = {}): Promise<void> {
    const method = options.method ?? "set-mem-table";
    if (method === "add-mem-reg") {
      this.#requireProtocol("ADD_MEM_REG", PF.CONFIGURE_MEM_SLOTS);
      for (const r of ram.regions) {
        const wire = toWireRegion(r.info);
        await this.#call(FR.ADD_MEM_REG, wire, [r.fd]);
        this.#memSlots.push(wire);
      }
      if (options.sync) await this.barrier();
    } else {
      if (ram.regions.length > MAX_MEM_REGIONS) {
        throw usageError(
          "SET_MEM_TABLE",
          "nregions",
          ram.regions.length,
          `more than ${MAX_MEM_REGIONS} regions`,
        );
      }
      await this.#call(
        FR.SET_MEM_TABLE,
        { regions: ram.memoryTable() },
        ram.regionFds,
        options.sync,
      );
      this.#memSlots = ram.memoryTable();
    }
    this.#ram = ram;
  }

  /**
   * ADD_MEM_REG for one region of a guest RAM (CONFIGURE_MEM_SLOTS).
   * @param ram the RAM
   * @param regionIndex which region
   */
  async addMemRegion(ram: GuestRam, regionIndex: number): Promise<void> {
    this.#requireProtocol("ADD_MEM_REG", PF.CONFIGURE_MEM_SLOTS);
    const r = ram.regions[regionIndex];
    if (!r) throw usageError("ADD_MEM_REG", "regionIndex", regionIndex, "no such region");
    const wire = toWireRegion(r.info);
    await this.#call(FR.ADD_MEM_REG, wire, [r.fd]);
    this.#memSlots.push(wire);
  }

  /**
   * REM_MEM_REG (CONFIGURE_MEM_SLOTS).
   * @param region the region as the back-end knows it (GPA, size, uaddr)
   * @param fd attach this fd (the spec lets back-ends accept and close one; default none)
   */
  async removeMemRegion(region: MemoryRegion, fd?: number): Promise<void> {
    this.#requireProtocol("REM_MEM_REG", PF.CONFIGURE_MEM_SLOTS);
    await this.#call(FR.REM_MEM_REG, region, fd === undefined ? [] : [fd]);
    this.#memSlots = this.#memSlots.filter(
      (m) => !(m.guestPhysAddr === region.guestPhysAddr && m.memorySize === region.memorySize),
    );
  }

  /** @returns the memory table the back-end was last given (wire form) */
  get memoryTable(): readonly MemoryRegion[] {
    return this.#memSlots;
  }

  /**
   * Replace guest RAM with another one of the same layout (e.g. {@link GuestRam.duplicate}):
   * every queue moves to the new RAM, then SET_MEM_TABLE switches the back-end. See
   * {@link ReplaceMemoryOptions.mode}.
   * @param ram the new RAM
   * @param options mode, whether to close the previous RAM
   * @returns the previous RAM (closed when `closePrevious`)
   * @throws VhostUserError when no RAM was shared yet, the layouts differ, or `live` is asked
   *   with a packed ring
   */
  async replaceMemory(ram: GuestRam, options: ReplaceMemoryOptions = {}): Promise<GuestRam> {
    const old = this.#ram;
    if (old === null) throw usageError("replaceMemory", "ram", null, "no guest RAM shared yet");
    const same =
      old.regions.length === ram.regions.length &&
      old.regions.every((r, i) => {
        const n = ram.regions[i]?.info;
        return (
          n !== undefined &&
          n.gpa === r.info.gpa &&
          n.size === r.info.size &&
          n.uaddr === r.info.uaddr
        );
      });
    if (!same)
      throw usageError("replaceMemory", "ram", ram.name, "layout differs from the current RAM");
    const mode = options.mode ?? "live";
    const queues = [...this.#queues.values()];
    if (mode === "live") {
      const packed = queues.find((q) => q.packed);
      if (packed) {
        throw usageError(
          "replaceMemory",
          "queue",
          packed.index,
          "live mode needs split rings (use mode stop)",
        );
      }
      for (const q of queues) q.rebind(ram);
      await this.setMemTable(ram, { sync: true });
      for (const q of queues) if (q.outstanding > 0) q.forceKick();
    } else {
      const bases = await this.stopQueues(queues.map((q) => q.index));
      for (const q of queues) {
        const b = bases.get(q.index) as QueueBase;
        q.rebind(ram, q.packed ? 0 : b.availIdx);
        if (q.packed)
          bases.set(q.index, { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true });
      }
      await this.setMemTable(ram, { sync: true });
      for (const q of queues) await this.restartQueue(q.index, bases.get(q.index));
    }
    if (options.closePrevious) old.close();
    return old;
  }

  // --- queues --------------------------------------------------------------------------

  #ringAddr(
    q: FrontendQueue,
    log: boolean,
  ): FrontendRequestPayloads[FrontendRequest.SET_VRING_ADDR] {
    const ram = q.ram;
    const sizes = q.packed
      ? (() => {
          const p = packedRingSizes(q.size);
          return { desc: p.desc, avail: p.driverEvent, used: p.deviceEvent };
        })()
      : splitRingSizes(q.size);
    return {
      index: q.index,
      flags: log ? VRING_F_LOG : 0,
      descUserAddr: BigInt(ram.gpaToUaddr(q.ring.desc, sizes.desc)),
      usedUserAddr: BigInt(ram.gpaToUaddr(q.ring.used, sizes.used)),
      availUserAddr: BigInt(ram.gpaToUaddr(q.ring.avail, sizes.avail)),
      logGuestAddr: BigInt(q.ring.used),
    };
  }

  #encodeBase(packed: boolean, base: QueueBase | number | undefined, step: string): number {
    if (typeof base === "number") return base;
    if (packed) {
      return encodePackedVringBase(
        {
          availIdx: base?.availIdx ?? 0,
          availWrap: base?.availWrap ?? true,
          usedIdx: base?.usedIdx ?? base?.availIdx ?? 0,
          usedWrap: base?.usedWrap ?? base?.availWrap ?? true,
        },
        step,
      );
    }
    return encodeSplitVringBase({ availIdx: base?.availIdx ?? 0 }, step);
  }

  #allocRing(ram: GuestRam, bytes: number, region: number | undefined): Gpa {
    if (region !== undefined) return ram.alloc(bytes, 4096, region);
    try {
      return ram.alloc(bytes, 4096, 0);
    } catch {
      return ram.alloc(bytes, 4096);
    }
  }

  /**
   * Send a ring's SET_VRING_NUM ahead of its {@link setupQueue} (as QEMU's vhost_dev_start
   * sends the size before each ring's base): a later setupQueue of the same index and size
   * skips SET_VRING_NUM, so the back-end still sees NUM, BASE, ADDR, KICK, CALL, ERR, ENABLE
   * in that order. Nothing starts the ring: it starts at its first kick after SET_VRING_KICK.
   * @param index queue index
   * @param size ring size
   * @throws VhostUserError when no RAM was shared, the ring is set up already, or the request
   *   fails
   * (vhost-user: VHOST_USER_SET_VRING_NUM, "Starting and stopping rings")
   */
  async prestageQueue(index: number, size: number): Promise<void> {
    if (this.#ram === null) {
      throw usageError("prestageQueue", "ram", null, "call setMemTable first");
    }
    if (this.#queues.has(index)) {
      throw usageError("prestageQueue", "index", index, "queue already set up");
    }
    this.#prestaged.delete(index);
    await this.#call(FR.SET_VRING_NUM, { index, num: size });
    this.#prestaged.set(index, size);
  }

  /**
   * Set up a ring: allocate it in guest RAM, create its eventfds, then SET_VRING_NUM (unless
   * {@link prestageQueue} sent the same size ahead), SET_VRING_BASE, SET_VRING_ADDR (front-end virtual addresses), SET_VRING_KICK,
   * SET_VRING_CALL, SET_VRING_ERR and SET_VRING_ENABLE 1 (when F_PROTOCOL_FEATURES is acked).
   * @param index queue index
   * @param options size, format, base, fd modes, regions, buffer size
   * @returns the queue
   * @throws VhostUserError when no RAM was shared, the index is taken, or a request fails
   * (vhost-user: "Starting and stopping rings"; VIRTIO 1.2 §2.7, §2.8)
   */
  async setupQueue(index: number, options: QueueSetupOptions): Promise<FrontendQueue> {
    const ram = this.#ram;
    if (ram === null) throw usageError("setupQueue", "ram", null, "call setMemTable first");
    if (this.#queues.has(index)) {
      throw usageError(
        "setupQueue",
        "index",
        index,
        "queue already set up (stopQueue/restartQueue)",
      );
    }
    const f = this.features;
    const snap = options.restore;
    const packed = snap?.packed ?? options.packed ?? hasFeature(f, VirtioFeature.RING_PACKED);
    const eventIdx =
      snap?.eventIdx ?? options.eventIdx ?? hasFeature(f, VirtioFeature.RING_EVENT_IDX);
    const indirect = snap?.indirect ?? (!packed && (options.indirect ?? false));
    const size = snap?.size ?? options.size;
    let ring: RingAddresses;
    if (snap !== undefined) {
      ring = {
        desc: snap.ring.desc as Gpa,
        avail: snap.ring.avail as Gpa,
        used: snap.ring.used as Gpa,
        indirectTable: snap.ring.indirectTable as Gpa | null,
      };
    } else if (packed) {
      const p = packedRingSizes(size);
      const at = this.#allocRing(ram, p.desc + p.driverEvent + p.deviceEvent, options.ringRegion);
      ring = {
        desc: at,
        avail: (at + p.desc) as Gpa,
        used: (at + p.desc + p.driverEvent) as Gpa,
        indirectTable: null,
      };
    } else {
      const probe = splitRingPlacement(0, size);
      const at = this.#allocRing(ram, probe.end, options.ringRegion);
      const pl = splitRingPlacement(at, size);
      ring = {
        desc: pl.desc as Gpa,
        avail: pl.avail as Gpa,
        used: pl.used as Gpa,
        indirectTable: indirect ? ram.alloc(alignUp(size * 16 * 16, 16), 16) : null,
      };
    }
    const base = options.base;
    const startIdx =
      snap !== undefined
        ? packed
          ? 0
          : snap.lastUsedIdx
        : !packed && base !== undefined
          ? typeof base === "number"
            ? base & 0xffff
            : base.availIdx
          : 0;
    const kickFd = options.kick === "none" ? -1 : native.eventfd(0);
    const callFd = options.call === "none" ? -1 : native.eventfd(0);
    const errMode = options.err ?? "eventfd";
    const errFd = errMode === "eventfd" ? native.eventfd(0) : -1;
    let q: FrontendQueue;
    try {
      q = new FrontendQueue({
        index,
        size,
        packed,
        eventIdx,
        indirect,
        ram,
        ring,
        kickFd,
        callFd,
        errFd,
        bufferSize: snap?.bufferSize ?? options.bufferSize ?? DEFAULT_BUFFER_SIZE,
        bufferRegion: options.bufferRegion ?? ram.regions.length - 1,
        startIdx,
      });
      if (snap !== undefined) q.restoreSnapshot(snap);
    } catch (err) {
      for (const fd of [kickFd, callFd, errFd]) if (fd >= 0) native.close(fd);
      throw err;
    }
    this.#queues.set(index, q);
    q.on("queue-error", (i: number) => this.emit("queue-error", i));
    // ORDERING: a size sent ahead by prestageQueue stands; any other is sent here, first.
    const numSent = this.#prestaged.get(index) === size;
    this.#prestaged.delete(index);
    const pf = this.#protocolFeaturesAcked();
    const sends: (() => Promise<void>)[] = [];
    if (!numSent) sends.push(() => this.#call(FR.SET_VRING_NUM, { index, num: size }));
    sends.push(
      () =>
        this.#call(FR.SET_VRING_BASE, {
          index,
          num: this.#encodeBase(packed, base, "SET_VRING_BASE"),
        }),
      () => this.#call(FR.SET_VRING_ADDR, this.#ringAddr(q, options.log ?? false)),
      () => this.#sendVringFd(FR.SET_VRING_KICK, index, kickFd),
      () => this.#sendVringFd(FR.SET_VRING_CALL, index, callFd),
    );
    if (errMode !== "skip") sends.push(() => this.#sendVringFd(FR.SET_VRING_ERR, index, errFd));
    if (options.enable !== false && pf) sends.push(() => this.setVringEnable(index, true));
    try {
      if (options.pipeline === true) {
        // ORDERING: each call writes its request before its first await, so `map` puts them on
        // the wire in this order, back to back, before this method first waits; the acks are
        // awaited together.
        const settled = await Promise.allSettled(sends.map((send) => send()));
        for (const r of settled) if (r.status === "rejected") throw r.reason;
      } else {
        for (const send of sends) await send();
      }
      if (errMode !== "skip") q.sentErr = true;
      if (options.enable === false && pf) q.enabled = false;
    } catch (err) {
      this.#queues.delete(index);
      q.dispose();
      throw err;
    }
    return q;
  }

  async #sendVringFd(
    request:
      | FrontendRequest.SET_VRING_KICK
      | FrontendRequest.SET_VRING_CALL
      | FrontendRequest.SET_VRING_ERR,
    index: number,
    fd: number,
  ): Promise<void> {
    await this.#call(request, { index, noFd: fd < 0 }, fd < 0 ? [] : [fd]);
  }

  #queueOrThrow(step: string, index: number): FrontendQueue {
    const q = this.#queues.get(index);
    if (!q) throw usageError(step, "index", index, "queue not set up");
    return q;
  }

  /**
   * Stop a ring: SET_VRING_ENABLE 0 (when F_PROTOCOL_FEATURES is acked, as QEMU >= 7.2), then
   * GET_VRING_BASE.
   * @param index queue index
   * @returns the base the back-end returned (split: next avail index; packed: both indices and
   *   wrap counters); also kept in `queue.stoppedBase`
   * @throws VhostUserError when the reply names another queue or a request fails
   * (vhost-user: VHOST_USER_GET_VRING_BASE, "Starting and stopping rings")
   */
  async stopQueue(index: number): Promise<QueueBase> {
    return (await this.stopQueues([index])).get(index) as QueueBase;
  }

  /**
   * Stop several rings with the requests {@link stopQueue} sends for each, ring after ring in
   * the given order, written back to back: the back-end sees the same requests in the same
   * order as from one `stopQueue` after another, and the replies are awaited together (one
   * round trip instead of two per ring, which is what the migration's stop costs).
   * @param indices queue indices, in the order to stop them
   * @returns the base of each ring, by index (also kept in each `queue.stoppedBase`)
   * @throws VhostUserError the first failure, once every reply is in; the rings whose
   *   GET_VRING_BASE succeeded are marked stopped all the same, so a rollback restarts them
   * (vhost-user: VHOST_USER_GET_VRING_BASE, "Starting and stopping rings")
   */
  async stopQueues(indices: Iterable<number>): Promise<Map<number, QueueBase>> {
    const queues = [...indices].map((index) => this.#queueOrThrow("stopQueue", index));
    const pf = this.#protocolFeaturesAcked();
    // ORDERING: each call below writes its request before its first await, so the loop puts
    // them on the wire in this order (per ring: ENABLE 0, then GET_VRING_BASE).
    const pending = queues.map((q) => {
      const index = q.index;
      const disabled = pf ? this.#call(FR.SET_VRING_ENABLE, { index, num: 0 }) : Promise.resolve();
      const reply = this.#ask(FR.GET_VRING_BASE, { index, num: 0 });
      return { q, disabled, reply };
    });
    const bases = new Map<number, QueueBase>();
    let failure: unknown = null;
    for (const { q, disabled, reply } of pending) {
      const [d, r] = await Promise.allSettled([disabled, reply]);
      // The driver's choice survives the stop (a migration saves it): `q.enabled` is untouched.
      try {
        if (r.status === "rejected") throw r.reason;
        const got = r.value;
        if (got.index !== q.index) {
          throw new VhostUserError("ERR_VHOST_BAD_FIELD", `reply names queue ${got.index}`, {
            request: "GET_VRING_BASE",
            field: "index",
            value: got.index,
          });
        }
        const base: QueueBase = q.packed
          ? decodePackedVringBase(got.num, "GET_VRING_BASE")
          : decodeSplitVringBase(got.num, "GET_VRING_BASE");
        q.stoppedBase = base;
        q.stopped = true;
        bases.set(q.index, base);
        // A refused ENABLE 0 fails the stop, but the ring is stopped (GET_VRING_BASE answered).
        if (d.status === "rejected") throw d.reason;
      } catch (err) {
        failure ??= err;
      }
    }
    if (failure !== null) throw failure;
    return bases;
  }

  /**
   * Restart a stopped ring with its indices preserved: SET_VRING_NUM, SET_VRING_BASE (the given
   * base, else the one GET_VRING_BASE returned), SET_VRING_ADDR, SET_VRING_KICK with a new kick
   * eventfd, SET_VRING_CALL and SET_VRING_ERR with the ring's call and err eventfds again (a
   * back-end may have closed its copies at GET_VRING_BASE), SET_VRING_ENABLE 1; then one kick
   * so that buffers made available meanwhile are seen. The order is QEMU's
   * `vhost_virtqueue_start`.
   * @param index queue index
   * @param base base to restart from (default: `queue.stoppedBase`)
   * @param log VHOST_VRING_F_LOG in SET_VRING_ADDR (default false)
   * @param resendFds send SET_VRING_CALL and SET_VRING_ERR again (default true, as QEMU does;
   * false only to probe whether a back-end keeps its call fd across a stop, as `vhostkit check`
   * does: a libvhost-user back-end then fails at its next notification)
   * @throws VhostUserError when the ring was never stopped and no base is given
   * (vhost-user: "Starting and stopping rings")
   */
  async restartQueue(
    index: number,
    base?: QueueBase | number,
    log = false,
    resendFds = true,
  ): Promise<void> {
    const q = this.#queueOrThrow("restartQueue", index);
    const b = base ?? q.stoppedBase;
    if (b === null)
      throw usageError("restartQueue", "base", null, "queue was not stopped and no base given");
    await this.#call(FR.SET_VRING_NUM, { index, num: q.size });
    await this.#call(FR.SET_VRING_BASE, {
      index,
      num: this.#encodeBase(q.packed, b, "SET_VRING_BASE"),
    });
    await this.#call(FR.SET_VRING_ADDR, this.#ringAddr(q, log));
    const hadKick = q.kickFd >= 0;
    const kickFd = hadKick ? native.eventfd(0) : -1;
    q.replaceKickFd(kickFd);
    await this.#sendVringFd(FR.SET_VRING_KICK, index, kickFd);
    // LIFETIME: a back-end may close its copies of the call and err fds on GET_VRING_BASE
    // (libvhost-user's `vu_get_vring_base_exec` does, and panics at its next notification
    // without a new one): every start sends them again, as QEMU's `vhost_virtqueue_start`
    // sends the call fd after the kick fd. Ours stay open and watched.
    if (resendFds) {
      await this.#sendVringFd(FR.SET_VRING_CALL, index, q.callFd);
      if (q.errFd >= 0 || q.sentErr) await this.#sendVringFd(FR.SET_VRING_ERR, index, q.errFd);
    }
    if (this.#protocolFeaturesAcked()) await this.setVringEnable(index, true);
    q.stoppedBase = null;
    q.stopped = false;
    q.forceKick();
  }

  /**
   * SET_VRING_ADDR again for a ring that is set up, with or without VHOST_VRING_F_LOG (used-ring
   * writes logged at log_guest_addr) - the migration source turns it on and off this way.
   * @param index queue index
   * @param log set VHOST_VRING_F_LOG
   * @throws VhostUserError when the queue is not set up or the back-end refuses
   * (vhost-user: VHOST_USER_SET_VRING_ADDR, "Migration")
   */
  async setVringLog(index: number, log: boolean): Promise<void> {
    const q = this.#queueOrThrow("setVringLog", index);
    await this.#call(FR.SET_VRING_ADDR, this.#ringAddr(q, log));
  }

  /**
   * The usual start sequence: SET_FEATURES, SET_STATUS(ACKNOWLEDGE|DRIVER|FEATURES_OK) with
   * STATUS, SET_MEM_TABLE, every ring, SET_STATUS(+DRIVER_OK) with STATUS.
   * @param ram guest RAM to share
   * @param queues one setup per queue index 0..n-1, or just queue sizes
   * @param features bits for SET_FEATURES (default: the negotiated intersection)
   * @returns the queues, by index
   * (vhost-user: "Starting and stopping rings"; QEMU `vhost_dev_start`)
   */
  async start(
    ram: GuestRam,
    queues: (QueueSetupOptions | number)[],
    features?: bigint,
  ): Promise<FrontendQueue[]> {
    await this.setFeatures(features);
    const status = this.#hasProtocol(PF.STATUS);
    const s0 = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK;
    if (status) await this.setStatus(s0);
    await this.setMemTable(ram);
    const out: FrontendQueue[] = [];
    for (let i = 0; i < queues.length; i++) {
      const spec = queues[i] as QueueSetupOptions | number;
      out.push(await this.setupQueue(i, typeof spec === "number" ? { size: spec } : spec));
    }
    if (status) await this.setStatus(s0 | DeviceStatus.DRIVER_OK);
    return out;
  }

  // --- net helpers ---------------------------------------------------------------------

  #resolveQueue(step: string, queue: FrontendQueue | number): FrontendQueue {
    return typeof queue === "number" ? this.#queueOrThrow(step, queue) : queue;
  }

  /**
   * Transmit one frame (12-byte zero virtio-net header + frame) and kick.
   * @param queue a TX queue (2k+1) or its index
   * @param frame the Ethernet frame
   * @returns the buffer id, or null when the ring or its pool is full
   */
  sendFrame(queue: FrontendQueue | number, frame: Uint8Array): number | null {
    return this.#resolveQueue("sendFrame", queue).sendFrame(frame);
  }

  /**
   * Post receive buffers (header + frame room each) and kick once.
   * @param queue an RX queue (2k) or its index
   * @param count how many
   * @param size bytes per buffer (default 2048)
   * @returns how many were posted
   */
  postRxBuffers(queue: FrontendQueue | number, count: number, size?: number): number {
    return this.#resolveQueue("postRxBuffers", queue).postRxBuffers(count, size);
  }

  /**
   * Take the frames received on an RX queue.
   * @param queue an RX queue or its index
   * @returns the frames without their virtio-net header
   */
  receiveFrames(queue: FrontendQueue | number): Uint8Array[] {
    return this.#resolveQueue("receiveFrames", queue).receiveFrames();
  }

  // --- closing -------------------------------------------------------------------------

  #teardown(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const q of this.#queues.values()) q.dispose();
    this.#backendChannel?.close();
    this.#backendChannel = null;
  }

  /**
   * Close the connection, the back-end request channel and every queue's eventfds.
   * @param options `closeRam`: also close the guest RAM last shared (default false)
   */
  close(options: { closeRam?: boolean } = {}): void {
    this.#teardown();
    this.channel.close();
    if (options.closeRam) this.#ram?.close();
  }
}
