/**
 * The vhost-user-net device (VIRTIO 1.2 §5.1) as a port of the virtual switch: what the guest
 * transmits goes to the switch, what the switch routes to this port is written into the guest's
 * receive buffers.
 *
 * Queues: for N pairs, 2k = receiveq (device → driver), 2k+1 = transmitq, and the control queue
 * at 2N when VIRTIO_NET_F_CTRL_VQ is negotiated (index 2 without VIRTIO_NET_F_MQ).
 * GET_QUEUE_NUM reports N, as QEMU's vhost-user-net expects. QEMU keeps the control queue for
 * itself (it never negotiates CTRL_VQ with a back-end): pairs are then switched by
 * SET_VRING_ENABLE; other front-ends may pass the control queue here.
 *
 * Data path: a TX kick pops chains (at most a budget per turn), gathers each frame into one
 * scratch buffer (no allocation per frame), parses the virtio-net header (§5.1.6) into the
 * frame's offload metadata and hands the frame to the switch. Delivery takes receive chains (with
 * MRG_RXBUF as many as the frame needs, num_buffers in the first header; without it one chain
 * that holds the whole frame), writes header + frame through `queue.write` (which marks the
 * dirty log) and returns them; used entries are published and the guest notified once per
 * batch ({@link VirtioNetDevice.flush}).
 */
import { featureMask, featureSet, ProtocolFeature, VirtioFeature } from "../protocol/constants.js";
import type { BackendQueue, DeviceContext, Logger, VhostUserDevice } from "../backend/device.js";
import { silentLogger } from "../backend/device.js";
import { serveBackend } from "../backend/server.js";
import type { BackendServer, ServeOptions } from "../backend/server.js";
import type { DescChain, Segment } from "../virtq/types.js";
import {
  CTRL_BUFFER,
  CTRL_MAX_COMMAND,
  MAC_TABLE_ENTRIES,
  VIRTIO_NET_ERR,
  handleCtrlCommand,
  newRxFilter,
  rxFilterAccepts,
} from "./ctrl.js";
import type { CtrlTarget, RxFilterState } from "./ctrl.js";
import { ETH_HLEN, flowHash, formatMac, macKey, toMacBytes } from "./frame.js";
import { DROP_REASONS, newPortCounters, newPortOffloads } from "./port.js";
import type {
  CsumRequest,
  Frame,
  GsoRequest,
  PortCounters,
  PortHost,
  PortOffloads,
  SwitchPort,
} from "./port.js";
import { buildRarp } from "./rarp.js";
import { loadPortState, savePortState } from "./port-state.js";
import type { Switch } from "./switch.js";

/** virtio_net_hdr flags (VIRTIO 1.2 §5.1.6). */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
/** The checksum is known good (device → driver). */
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
/** virtio_net_hdr gso_type values. */
export const VirtioNetGso = Object.freeze({ NONE: 0, TCPV4: 1, UDP: 3, TCPV6: 4, ECN: 0x80 });
/** Config space status bits (VIRTIO 1.2 §5.1.4). */
export const VIRTIO_NET_S_LINK_UP = 1;
/** The driver should announce itself (GUEST_ANNOUNCE). */
export const VIRTIO_NET_S_ANNOUNCE = 2;
/** Size of the config fields this device fills: mac, status, max_virtqueue_pairs, mtu. */
export const NET_CONFIG_SIZE = 12;
/** Largest number of queue pairs a device may be created with. */
export const MAX_QUEUE_PAIRS = 64;
/**
 * Largest frame (without virtio-net header) accepted on TX or delivered on RX: a 64 KiB GSO
 * packet plus Ethernet and two VLAN tags, with room to spare.
 */
export const MAX_FRAME = 65_536 + 256;

/** Chains handled per TX queue per turn before yielding to the event loop. */
const DEFAULT_TX_BUDGET = 256;
/** Receive chains held for a frame that did not fit are returned after this long unused. */
const HELD_RELEASE_MS = 50;

/** Options of {@link VirtioNetDevice}. */
export interface VirtioNetOptions {
  /** port name in the switch (e.g. the socket path) */
  name: string;
  /** queue pairs (default 1; MQ is offered when > 1) */
  queuePairs?: number;
  /** MAC for the config space (VIRTIO_NET_F_MAC is offered when set) */
  mac?: string | Uint8Array;
  /** MTU for the config space (VIRTIO_NET_F_MTU is offered when set; 68..65535) */
  mtu?: number;
  /** largest queue size accepted (default 1024) */
  maxQueueSize?: number;
  /** offer MRG_RXBUF (default true) */
  mrgRxbuf?: boolean;
  /** offer CSUM and HOST_TSO4/6 (default true) */
  hostOffloads?: boolean;
  /** offer GUEST_CSUM and GUEST_TSO4/6 (default true) */
  guestOffloads?: boolean;
  /** offer HOST_ECN / GUEST_ECN along with the TSO bits (default true) */
  ecn?: boolean;
  /** offer the control queue and its features (default true) */
  ctrl?: boolean;
  /**
   * offer PROTOCOL_F_CONFIG (default false): QEMU's vhost-user-net takes its config from its
   * own command line and warns about a back-end that offers CONFIG, and DPDK's vhost library
   * does not offer it for a net device. A front-end that reads the config space over
   * vhost-user (GET_CONFIG, BACKEND_CONFIG_CHANGE_MSG for an announce) asks for it with true.
   */
  offerConfig?: boolean;
  /** TX chains handled per queue per turn (default 256) */
  txBudget?: number;
  /** the application's logger */
  logger?: Logger;
}

/** Counters of one queue pair (frames, from the guest's point of view). */
export interface PairCounters {
  /** frames written into this pair's receive queue */
  rxFrames: number;
  /** frames taken from this pair's transmit queue */
  txFrames: number;
}

/**
 * The port's own state, kept in plain fields so it can be saved and restored later
 * (learned MACs live in the switch).
 */
export interface NetPortState {
  /** the guest's MAC as a key (config, ADDR_SET, RARP, or the first source seen), or null */
  mac: number | null;
  /** where `mac` came from */
  macSource: "config" | "guest" | "rarp" | "learned" | null;
  /** the MTU in the config space (NET_SET_MTU may change it) */
  mtu: number;
  /** queue pairs the driver enabled with VQ_PAIRS_SET (all when there is no control queue) */
  activePairs: number;
  /** VIRTIO_NET_S_ANNOUNCE is set */
  announcePending: boolean;
  /** guest offload feature bits in force (negotiated, then CTRL_GUEST_OFFLOADS_SET) */
  guestOffloads: number;
  /** the receive filter */
  filter: RxFilterState;
}

/** Negotiated features decoded once (the data path reads booleans, not bigints). */
interface Negotiated {
  version1: boolean;
  mrg: boolean;
  csum: boolean;
  guestCsum: boolean;
  hostTso4: boolean;
  hostTso6: boolean;
  hostEcn: boolean;
  mq: boolean;
  ctrlVq: boolean;
  ctrlVlan: boolean;
  guestAnnounce: boolean;
}

const F = VirtioFeature;
const GUEST_OFFLOAD_MASK = featureSet(
  F.GUEST_CSUM,
  F.GUEST_TSO4,
  F.GUEST_TSO6,
  F.GUEST_ECN,
  F.GUEST_UFO,
);

/**
 * The names of the virtio feature bits set in `features` (for logs).
 * @param features a feature set
 * @returns e.g. `VERSION_1 MRG_RXBUF NET_F_CSUM ...`
 */
export function describeNetFeatures(features: bigint): string {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if ((features & (1n << BigInt(bit))) === 0n) continue;
    names.push((VirtioFeature as unknown as Record<number, string>)[bit] ?? `bit${bit}`);
  }
  return names.length === 0 ? "(none)" : names.join(" ");
}

function decode(f: bigint): Negotiated {
  const has = (bit: number): boolean => (f & featureMask(bit)) !== 0n;
  return {
    version1: has(F.VERSION_1),
    mrg: has(F.MRG_RXBUF),
    csum: has(F.NET_F_CSUM),
    guestCsum: has(F.GUEST_CSUM),
    hostTso4: has(F.HOST_TSO4),
    hostTso6: has(F.HOST_TSO6),
    hostEcn: has(F.HOST_ECN),
    mq: has(F.NET_MQ),
    ctrlVq: has(F.CTRL_VQ),
    ctrlVlan: has(F.CTRL_VLAN),
    guestAnnounce: has(F.GUEST_ANNOUNCE),
  };
}

/**
 * A vhost-user-net device that is also a {@link SwitchPort}. Serve it with `serveBackend` and
 * add it to a {@link Switch} (or use {@link addVhostUserPort}).
 */
export class VirtioNetDevice implements VhostUserDevice, SwitchPort, CtrlTarget {
  readonly deviceId = 1;
  readonly features: bigint;
  readonly protocolFeatures: bigint;
  /** whether PROTOCOL_F_CONFIG is offered (see {@link VirtioNetOptions.offerConfig}) */
  readonly offerConfig: boolean;
  readonly queueCount: number;
  readonly queueNum: number;
  readonly maxQueueSize: number;
  readonly name: string;
  readonly queuePairs: number;
  readonly offloads: PortOffloads = newPortOffloads(false);
  readonly counters: PortCounters = newPortCounters();
  /** per queue pair */
  readonly pairCounters: PairCounters[];
  /** the port state (see {@link NetPortState}) */
  readonly state: NetPortState;
  readonly logger: Logger;

  readonly #configMac: number | null;
  readonly #configMtu: number;
  readonly #txBudget: number;
  #ctx: DeviceContext | null = null;
  #host: PortHost | null = null;
  #features = 0n;
  #neg: Negotiated = decode(0n);
  #hdrLen = 12;
  #up = false;
  /** pairs that can receive now, and their RX queues */
  #rxPairs: number[] = [];
  #rxQueues: BackendQueue[] = [];
  /** why nothing can be delivered when #rxPairs is empty */
  #rxBlocked: "disabled" | "no-buffer" = "no-buffer";
  /** receive chains popped but not yet used, per pair */
  readonly #held: DescChain[][];
  readonly #heldBytes: number[];
  #heldTimer: NodeJS.Timeout | null = null;
  readonly #rxDirty: boolean[];
  #anyRxDirty = false;
  readonly #scheduled = new Set<number>();
  #pendingRarp: Uint8Array | null = null;
  #suspendedMacs: { mac: string; ageMs: number }[] | null = null;
  // Scratch buffers and the reused frame (no allocation per frame on the data path).
  readonly #txBuf = new Uint8Array(MAX_FRAME + 12);
  readonly #rxBuf = new Uint8Array(MAX_FRAME + 12);
  /** the virtio-net header of a received frame (12 bytes), and its 10-byte legacy form */
  readonly #rxHdr = new Uint8Array(12);
  readonly #rxHdr10 = this.#rxHdr.subarray(0, 10);
  readonly #ctrlBuf = new Uint8Array(CTRL_BUFFER);
  readonly #txCsum: CsumRequest = { start: 0, offset: 0 };
  readonly #txGso: GsoRequest = { type: "tcpv4", size: 0, hdrLen: 0, ecn: false };
  readonly #txFrame: Frame = { data: new Uint8Array(0), meta: {} };

  /**
   * @param options name, queue pairs, MAC, MTU, feature choices, logger
   * @throws RangeError naming the option when it is out of range
   */
  constructor(options: VirtioNetOptions) {
    const pairs = options.queuePairs ?? 1;
    if (!Number.isInteger(pairs) || pairs < 1 || pairs > MAX_QUEUE_PAIRS) {
      throw new RangeError(
        `VirtioNetDevice: queuePairs must be 1..${MAX_QUEUE_PAIRS} (queuePairs=${pairs})`,
      );
    }
    const mtu = options.mtu;
    if (mtu !== undefined && (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535)) {
      throw new RangeError(`VirtioNetDevice: mtu must be 68..65535 (mtu=${mtu})`);
    }
    this.name = options.name;
    this.queuePairs = pairs;
    this.queueCount = 2 * pairs + 1;
    this.queueNum = pairs;
    this.maxQueueSize = options.maxQueueSize ?? 1024;
    this.#txBudget = options.txBudget ?? DEFAULT_TX_BUDGET;
    this.logger = options.logger ?? silentLogger;
    this.#configMac = options.mac === undefined ? null : macKey(toMacBytes(options.mac));
    this.#configMtu = mtu ?? 1500;
    const ecn = options.ecn ?? true;
    let f = featureSet(F.STATUS);
    if (options.mrgRxbuf ?? true) f |= featureMask(F.MRG_RXBUF);
    if (options.hostOffloads ?? true) {
      f |= featureSet(F.NET_F_CSUM, F.HOST_TSO4, F.HOST_TSO6);
      if (ecn) f |= featureMask(F.HOST_ECN);
    }
    if (options.guestOffloads ?? true) {
      f |= featureSet(F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6);
      if (ecn) f |= featureMask(F.GUEST_ECN);
    }
    if (options.ctrl ?? true) {
      f |= featureSet(
        F.CTRL_VQ,
        F.CTRL_RX,
        F.CTRL_RX_EXTRA,
        F.CTRL_VLAN,
        F.CTRL_MAC_ADDR,
        F.GUEST_ANNOUNCE,
        F.CTRL_GUEST_OFFLOADS,
      );
    }
    if (pairs > 1) f |= featureMask(F.NET_MQ);
    if (mtu !== undefined) f |= featureMask(F.MTU);
    if (this.#configMac !== null) f |= featureMask(F.MAC);
    this.features = f;
    this.protocolFeatures = featureSet(
      ProtocolFeature.MQ,
      ProtocolFeature.RARP,
      ProtocolFeature.MTU,
    );
    this.offerConfig = options.offerConfig ?? false;
    this.pairCounters = Array.from({ length: pairs }, () => ({ rxFrames: 0, txFrames: 0 }));
    this.#held = Array.from({ length: pairs }, () => []);
    this.#heldBytes = new Array<number>(pairs).fill(0);
    this.#rxDirty = new Array<boolean>(pairs).fill(false);
    this.state = this.#freshState();
  }

  #freshState(): NetPortState {
    return {
      mac: this.#configMac,
      macSource: this.#configMac !== null ? "config" : null,
      mtu: this.#configMtu,
      activePairs: this.queuePairs,
      announcePending: false,
      guestOffloads: 0,
      filter: newRxFilter(false),
    };
  }

  // --- SwitchPort ----------------------------------------------------------------------

  /** @returns true while a front-end is connected and at least one data ring is started */
  get up(): boolean {
    return this.#up;
  }

  /** @returns the negotiated virtio features (0 before SET_FEATURES) */
  get negotiatedFeatures(): bigint {
    return this.#features;
  }

  /** @returns the receive filter the control queue programs (CtrlTarget) */
  get filter(): RxFilterState {
    return this.state.filter;
  }

  /** @returns the guest's MAC as text, or null when unknown */
  get mac(): string | null {
    return this.state.mac === null ? null : formatMac(this.state.mac);
  }

  /** @returns the switch this port is attached to, or null */
  get host(): PortHost | null {
    return this.#host;
  }

  /**
   * @returns the MACs the switch had learned on this port when its rings were stopped with the
   *   front-end still connected (a suspended device, e.g. for migration), or null
   */
  get suspendedMacs(): readonly { mac: string; ageMs: number }[] | null {
    return this.#suspendedMacs;
  }

  /**
   * Serialise the port's state for a migration (SET_DEVICE_STATE_FD, SAVE): negotiated
   * features and offloads, queue settings, MAC, counters, learned MACs, receive filter.
   * @returns the versioned state stream (see `src/net/port-state.ts`)
   * (vhost-user: "Migrating back-end state")
   */
  saveState(): Uint8Array {
    return savePortState(this);
  }

  /**
   * Load a state saved by {@link saveState} on the source (SET_DEVICE_STATE_FD, LOAD); all or
   * nothing.
   * @param data the state stream (untrusted)
   * @throws MigrationStreamError naming the stage, field and value; the port is then unchanged
   * (vhost-user: "Migrating back-end state")
   */
  loadState(data: Uint8Array): void {
    loadPortState(this, data);
  }

  /** @returns true while a front-end is connected */
  get connected(): boolean {
    return this.#ctx !== null;
  }

  /**
   * Set the guest's MAC (restoring a saved port; SET_CONFIG and ADDR_SET do the same).
   * @param mac the MAC (text or 6 bytes), or null to forget it
   * @param source where it came from (default "guest")
   * @throws RangeError for a malformed MAC
   */
  setMac(mac: string | Uint8Array | null, source: NetPortState["macSource"] = "guest"): void {
    if (mac === null) {
      this.state.mac = null;
      this.state.macSource = null;
      return;
    }
    this.state.mac = macKey(toMacBytes(mac));
    this.state.macSource = source ?? "guest";
  }

  /**
   * A deep copy of the port's own state (MAC, MTU, active pairs, guest offloads, receive
   * filter), for saving; learned MACs live in the switch ({@link PortHost.macsOnPort}).
   * @returns the copy
   */
  exportPortState(): NetPortState {
    const s = this.state;
    return {
      ...s,
      filter: {
        ...s.filter,
        unicast: [...s.filter.unicast],
        multicast: [...s.filter.multicast],
        vlans: Uint32Array.from(s.filter.vlans),
      },
    };
  }

  /**
   * Replace the port's own state with a saved one (migration destination). Everything is
   * checked before anything changes; the offloads offered to the switch and the receive pairs
   * follow the new state.
   * @param saved a state from {@link exportPortState} (untrusted)
   * @throws RangeError naming the field and the value when the state does not fit this port
   */
  importPortState(saved: NetPortState): void {
    const bad = (field: string, value: unknown, what: string): RangeError =>
      new RangeError(`${this.name}: port state ${field}=${String(value)}: ${what}`);
    const isMacKey = (k: unknown): boolean =>
      typeof k === "number" && Number.isInteger(k) && k >= 0 && k <= 0xffff_ffff_ffff;
    if (saved.mac !== null && !isMacKey(saved.mac)) throw bad("mac", saved.mac, "not a MAC");
    const sources = ["config", "guest", "rarp", "learned", null];
    if (!sources.includes(saved.macSource)) throw bad("macSource", saved.macSource, "unknown");
    if (!Number.isInteger(saved.mtu) || saved.mtu < 68 || saved.mtu > 65535)
      throw bad("mtu", saved.mtu, "outside 68..65535");
    if (
      !Number.isInteger(saved.activePairs) ||
      saved.activePairs < 1 ||
      saved.activePairs > this.queuePairs
    ) {
      throw bad("activePairs", saved.activePairs, `outside 1..${this.queuePairs}`);
    }
    const allowed = Number(GUEST_OFFLOAD_MASK);
    if (
      !Number.isInteger(saved.guestOffloads) ||
      saved.guestOffloads < 0 ||
      (saved.guestOffloads & ~allowed) !== 0
    ) {
      throw bad("guestOffloads", saved.guestOffloads, "not guest offload bits");
    }
    const f = saved.filter;
    if (!(f.vlans instanceof Uint32Array) || f.vlans.length !== 128)
      throw bad("filter.vlans", f.vlans?.length, "must be 128 words");
    for (const [field, list] of [
      ["filter.unicast", f.unicast],
      ["filter.multicast", f.multicast],
    ] as const) {
      if (!Array.isArray(list) || list.length > MAC_TABLE_ENTRIES || !list.every(isMacKey))
        throw bad(field, list?.length, `must be at most ${MAC_TABLE_ENTRIES} MACs`);
    }
    this.state.mac = saved.mac;
    this.state.macSource = saved.macSource;
    this.state.mtu = saved.mtu;
    this.state.activePairs = saved.activePairs;
    this.state.announcePending = saved.announcePending === true;
    this.state.guestOffloads = saved.guestOffloads;
    this.state.filter = {
      promisc: f.promisc === true,
      allmulti: f.allmulti === true,
      alluni: f.alluni === true,
      nomulti: f.nomulti === true,
      nouni: f.nouni === true,
      nobcast: f.nobcast === true,
      unicast: [...f.unicast],
      multicast: [...f.multicast],
      unicastOverflow: f.unicastOverflow === true,
      multicastOverflow: f.multicastOverflow === true,
      vlans: Uint32Array.from(f.vlans),
    };
    this.#applyOffloads();
    this.#recomputeRx();
  }

  /**
   * Replace the port's counters (restoring a saved port).
   * @param counters port counters (copied)
   * @param pairs per-pair counters (copied; pairs beyond this port's are ignored)
   * @throws RangeError naming the field when a value is not a non-negative integer
   */
  restoreCounters(counters: PortCounters, pairs: readonly PairCounters[] = []): void {
    const check = (field: string, v: unknown): number => {
      if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0)
        throw new RangeError(`${this.name}: counters ${field}=${String(v)}: not a count`);
      return v;
    };
    const next = newPortCounters();
    next.rxPackets = check("rxPackets", counters.rxPackets);
    next.rxBytes = check("rxBytes", counters.rxBytes);
    next.txPackets = check("txPackets", counters.txPackets);
    next.txBytes = check("txBytes", counters.txBytes);
    for (const r of DROP_REASONS) next.drops[r] = check(`drops.${r}`, counters.drops?.[r] ?? 0);
    const pc = pairs.slice(0, this.queuePairs).map((p, i) => ({
      rxFrames: check(`pairs[${i}].rxFrames`, p.rxFrames),
      txFrames: check(`pairs[${i}].txFrames`, p.txFrames),
    }));
    Object.assign(this.counters, { ...next, drops: this.counters.drops });
    Object.assign(this.counters.drops, next.drops);
    pc.forEach((p, i) => Object.assign(this.pairCounters[i] as PairCounters, p));
  }

  /**
   * The port was added to a switch.
   * @param host the switch
   */
  attachHost(host: PortHost): void {
    this.#host = host;
  }

  /** The port was removed from its switch. */
  detachHost(): void {
    this.#host = null;
  }

  /**
   * Write a frame into the guest's receive queue (the pair chosen by flow hash among the
   * enabled ones), applying the receive filter.
   * @param frame the frame, with offloads this port accepts
   * @returns false when dropped (reason counted)
   * (VIRTIO 1.2 §5.1.6.3, §5.1.6.4)
   */
  deliver(frame: Frame): boolean {
    const drops = this.counters.drops;
    if (!this.#up) {
      drops["port-down"]++;
      return false;
    }
    const d = frame.data;
    const st = this.state;
    if (!st.filter.promisc && !rxFilterAccepts(st.filter, st.mac, d)) {
      drops.filtered++;
      return false;
    }
    const n = this.#rxPairs.length;
    if (n === 0) {
      drops[this.#rxBlocked]++;
      return false;
    }
    const i = n === 1 ? 0 : flowHash(d) % n;
    const pair = this.#rxPairs[i] as number;
    try {
      return this.#writeRx(this.#rxQueues[i] as BackendQueue, pair, frame);
    } catch (err) {
      // The guest's memory or log failed under us: drop the frame and the chains taken for
      // it; the sender and the other ports are not affected.
      (this.#held[pair] as DescChain[]).length = 0;
      this.#heldBytes[pair] = 0;
      drops["port-down"]++;
      this.logger.warn(
        `${this.name}: receive queue ${2 * pair}: ${err instanceof Error ? err.message : String(err)}`,
      );
      return false;
    }
  }

  /** Publish the receive entries written since the last flush and notify the guest once. */
  flush(): void {
    if (!this.#anyRxDirty) return;
    this.#anyRxDirty = false;
    const ctx = this.#ctx;
    for (let p = 0; p < this.queuePairs; p++) {
      if (!this.#rxDirty[p]) continue;
      this.#rxDirty[p] = false;
      ctx?.queue(2 * p)?.flush();
    }
  }

  // --- VhostUserDevice -----------------------------------------------------------------

  /**
   * A front-end connected (or reset the device): start from a fresh state.
   * @param ctx the session
   */
  attach(ctx: DeviceContext): void {
    this.#ctx = ctx;
    this.#suspendedMacs = null;
    this.#resetRuntime();
    this.#updateLink();
  }

  /** The front-end left or reset the device: the port goes down. */
  detach(): void {
    this.#ctx = null;
    this.#resetRuntime();
    this.#updateLink();
  }

  #resetRuntime(): void {
    for (const h of this.#held) h.length = 0;
    this.#heldBytes.fill(0);
    this.#rxDirty.fill(false);
    this.#anyRxDirty = false;
    if (this.#heldTimer) clearTimeout(this.#heldTimer);
    this.#heldTimer = null;
    this.#features = 0n;
    this.#neg = decode(0n);
    this.#hdrLen = 12;
    const s = this.#freshState();
    // The MAC and MTU a guest set stay with the port across reconnections.
    s.mac = this.state.mac;
    s.macSource = this.state.macSource;
    s.mtu = this.state.mtu;
    Object.assign(this.state, s);
    this.#applyOffloads();
    this.#recomputeRx();
  }

  /**
   * SET_FEATURES: decode the negotiated bits. The filter and active pairs are reset only when
   * the device-visible bits change (not when LOG_ALL is toggled for migration).
   * @param features the negotiated features
   */
  setFeatures(features: bigint): void {
    const mask = ~featureMask(F.LOG_ALL);
    const changed = (features & mask) !== (this.#features & mask);
    this.#features = features;
    this.#neg = decode(features);
    this.#hdrLen = this.#neg.version1 || this.#neg.mrg ? 12 : 10;
    if (changed) {
      this.logger.info(`${this.name}: negotiated ${describeNetFeatures(features)}`);
      this.state.guestOffloads = Number(features & GUEST_OFFLOAD_MASK);
      this.state.filter = newRxFilter(this.#neg.ctrlVlan);
      this.state.activePairs = this.#neg.mq && this.#neg.ctrlVq ? 1 : this.queuePairs;
      this.state.announcePending = false;
    }
    this.#applyOffloads();
    this.#recomputeRx();
  }

  #applyOffloads(): void {
    const g = this.state.guestOffloads;
    const bit = (b: number): boolean => (g & (2 ** b)) !== 0;
    const o = this.offloads;
    o.csum = bit(F.GUEST_CSUM);
    o.tso4 = o.csum && bit(F.GUEST_TSO4);
    o.tso6 = o.csum && bit(F.GUEST_TSO6);
    o.ecn = o.csum && bit(F.GUEST_ECN);
    o.ufo = o.csum && bit(F.GUEST_UFO);
    o.mrg = this.#neg.mrg;
  }

  /** @returns the control queue index, or -1 when CTRL_VQ is not negotiated */
  get ctrlQueueIndex(): number {
    if (!this.#neg.ctrlVq) return -1;
    return this.#neg.mq ? 2 * this.queuePairs : 2;
  }

  #usablePairs(): number {
    return this.#neg.mq ? this.queuePairs : 1;
  }

  /**
   * A queue has work (kick, start, enable).
   * @param queue the queue
   */
  processQueue(queue: BackendQueue): void {
    const idx = queue.index;
    if (idx === this.ctrlQueueIndex) {
      this.#control(queue);
      return;
    }
    const pair = idx >> 1;
    if (pair >= this.#usablePairs()) return;
    if ((idx & 1) === 1) this.#transmit(queue, pair);
    else if (!queue.enabled && this.#held[pair]!.length > 0) this.#releaseHeld(pair, queue, true);
    // An RX kick only means new buffers: frames are written when the switch delivers.
  }

  /**
   * A queue started, stopped, or was enabled / disabled: recompute the receive pairs and the
   * link state; a receive queue being disabled gives back the chains it held.
   * @param queue the queue
   */
  queueStateChanged(queue: BackendQueue): void {
    const idx = queue.index;
    if (idx !== this.ctrlQueueIndex && (idx & 1) === 0) {
      const pair = idx >> 1;
      const held = this.#held[pair];
      if (held !== undefined && held.length > 0) {
        // Disabled (a stop begins with it): the chains were never written, cancel them.
        if (queue.started && !queue.enabled) this.#releaseHeld(pair, queue, true);
        else if (!queue.started) {
          // The ring stopped: its chains are gone with it (its base was saved already).
          held.length = 0;
          this.#heldBytes[pair] = 0;
        }
      }
    }
    this.#recomputeRx();
    this.#updateLink();
  }

  /**
   * The ring is being stopped (GET_VRING_BASE): a receive queue gives back the chains it holds
   * for a frame that did not fit, at once. They were never written, so they are cancelled
   * (the avail position is rewound over them: the guest's buffers are taken again after a
   * restart or on the migration's destination); chains that are not the last ones taken are
   * returned empty instead. The stop then costs no wait for the held-chain timer.
   * @param queue the queue being stopped
   */
  stopQueue(queue: BackendQueue): void {
    const idx = queue.index;
    if (idx === this.ctrlQueueIndex || (idx & 1) !== 0) return;
    const pair = idx >> 1;
    const held = this.#held[pair];
    if (held === undefined || held.length === 0) return;
    const chains = held.splice(0);
    this.#heldBytes[pair] = 0;
    if (!queue.cancel(chains)) for (const c of chains) queue.pushUsed(c, 0);
    this.logger.debug(
      `${this.name}: queue ${idx}: ${chains.length} held receive buffer(s) given back at the stop`,
    );
  }

  #recomputeRx(): void {
    const ctx = this.#ctx;
    this.#rxPairs = [];
    this.#rxQueues = [];
    this.#rxBlocked = "no-buffer";
    if (ctx === null) return;
    const n = Math.min(this.state.activePairs, this.#usablePairs());
    for (let p = 0; p < n; p++) {
      const q = ctx.queue(2 * p);
      if (q === undefined || !q.started) continue;
      if (!q.enabled) {
        this.#rxBlocked = "disabled";
        continue;
      }
      this.#rxPairs.push(p);
      this.#rxQueues.push(q);
    }
  }

  #updateLink(): void {
    const ctx = this.#ctx;
    let up = false;
    if (ctx !== null) {
      for (let i = 0; i < 2 * this.queuePairs && !up; i++) up = ctx.queue(i)?.started ?? false;
    }
    if (up === this.#up) return;
    this.#up = up;
    // The switch forgets a port's MACs when it goes down. When the rings were stopped with the
    // front-end still there (a migration suspends the device), keep what was learned so the
    // port's state can be saved.
    if (up) this.#suspendedMacs = null;
    else this.#suspendedMacs = ctx !== null ? (this.#host?.macsOnPort(this.name) ?? null) : null;
    this.logger.info(`${this.name}: link ${up ? "up" : "down"}`);
    this.#host?.linkChanged(this);
    if (up && this.#pendingRarp !== null) {
      const mac = this.#pendingRarp;
      this.#pendingRarp = null;
      this.sendRarp(mac);
    }
  }

  // --- transmit ------------------------------------------------------------------------

  #transmit(queue: BackendQueue, pair: number): void {
    const enabled = queue.enabled;
    const drops = this.counters.drops;
    const buf = this.#txBuf;
    let budget = this.#txBudget;
    let chain: DescChain | null;
    // One clock reading for the burst; the host's flush below ends the batch.
    this.#host?.beginBatch?.();
    while (budget > 0 && (chain = queue.pop()) !== null) {
      budget--;
      if (!enabled) {
        // Started but disabled: consume without side effects.
        drops.disabled++;
      } else if (chain.readableLength > buf.length) {
        drops["too-big"]++;
      } else {
        // One readable segment in one region (DPDK and Linux put the header in front of the
        // frame): the frame goes to the switch as a view of guest memory, copied only into
        // the destination's receive buffer. Otherwise it is gathered into the scratch buffer.
        const segs = chain.readable;
        const s0 = segs.length === 1 ? (segs[0] as Segment) : null;
        const r = s0 !== null ? queue.memory.tryRegionFor(s0.gpa, s0.len) : null;
        if (r !== null)
          this.#txOne(r.bytes, (s0 as Segment).gpa - r.gpa, (s0 as Segment).len, pair);
        else this.#txOne(buf, 0, queue.read(chain, buf), pair);
      }
      queue.pushUsed(chain, 0);
    }
    // ORDERING: the transmit chains go back to the driver before the frames taken from them
    // show up in the destinations' receive rings. A peer that forwards what it receives into
    // this same transmit ring (DPDK's virtio-user loopback, testpmd `mac`/`io` forwarding)
    // must find the ring's room again by then: published the other way round, a whole ring
    // of frames met a full transmit ring, was dropped, and that direction stopped for good.
    queue.flush();
    this.#host?.flush();
    if (budget === 0) this.#reschedule(queue.index);
  }

  /**
   * Parse the virtio-net header of the frame at `b[off, off + len)` (the TX scratch buffer, or
   * a view of guest memory) and hand the frame to the switch.
   * LIFETIME: a view of guest memory is used only during the switch's synchronous receive,
   * before the chain is returned to the driver.
   */
  #txOne(b: Uint8Array, off: number, len: number, pair: number): void {
    const hl = this.#hdrLen;
    const drops = this.counters.drops;
    if (len < hl + ETH_HLEN) {
      drops.malformed++;
      return;
    }
    if (b !== this.#txBuf && ((b[off] as number) & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) {
      // The switch may complete the checksum in place: never in the driver's buffer.
      this.#txBuf.set(b.subarray(off, off + len));
      b = this.#txBuf;
      off = 0;
    }
    const frameLen = len - hl;
    const meta = this.#txFrame.meta;
    meta.needsCsum = undefined;
    meta.gso = undefined;
    meta.dataValid = undefined;
    const flags = b[off + 0] as number;
    const gsoType = b[off + 1] as number;
    const neg = this.#neg;
    if ((flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) {
      const start = (b[off + 6] as number) | ((b[off + 7] as number) << 8);
      const offset = (b[off + 8] as number) | ((b[off + 9] as number) << 8);
      if (!neg.csum || start + offset + 2 > frameLen) {
        drops.malformed++;
        return;
      }
      this.#txCsum.start = start;
      this.#txCsum.offset = offset;
      meta.needsCsum = this.#txCsum;
    }
    const gt = gsoType & ~VirtioNetGso.ECN;
    // VIRTIO 1.2 §5.1.6.2: the driver sets VIRTIO_NET_HDR_GSO_ECN only with HOST_ECN
    // negotiated, and only on a GSO frame.
    if ((gsoType & VirtioNetGso.ECN) !== 0 && (!neg.hostEcn || gt === VirtioNetGso.NONE)) {
      drops.malformed++;
      return;
    }
    if (gt !== VirtioNetGso.NONE) {
      const size = (b[off + 4] as number) | ((b[off + 5] as number) << 8);
      const g = this.#txGso;
      if (gt === VirtioNetGso.TCPV4 && neg.hostTso4) g.type = "tcpv4";
      else if (gt === VirtioNetGso.TCPV6 && neg.hostTso6) g.type = "tcpv6";
      else {
        drops.malformed++;
        return;
      }
      if (size === 0) {
        drops.malformed++;
        return;
      }
      g.size = size;
      g.hdrLen = (b[off + 2] as number) | ((b[off + 3] as number) << 8);
      g.ecn = (gsoType & VirtioNetGso.ECN) !== 0;
      meta.gso = g;
    }
    const frame = this.#txFrame;
    // A view of the driver's buffer, built from the ArrayBuffer directly: `subarray` looks up
    // the species constructor per call (28 ns against 18 ns measured), and copying a 64-byte
    // frame into a scratch buffer with a byte loop cost 105 ns (a DataView word loop 30 ns).
    frame.data = new Uint8Array(b.buffer, b.byteOffset + off + hl, frameLen);
    this.pairCounters[pair]!.txFrames++;
    const st = this.state;
    if (st.mac === null && ((b[off + hl + 6] as number) & 1) === 0) {
      st.mac = macKey(b, off + hl + 6);
      st.macSource = "learned";
    }
    const host = this.#host;
    if (host === null) {
      drops["port-down"]++;
      return;
    }
    host.receive(this, frame);
  }

  /** More TX work is left: come back after other events had their turn. */
  #reschedule(index: number): void {
    if (this.#scheduled.has(index)) return;
    this.#scheduled.add(index);
    setImmediate(() => {
      this.#scheduled.delete(index);
      const q = this.#ctx?.queue(index);
      if (q?.started && q.broken === null) {
        try {
          this.processQueue(q);
        } catch (err) {
          // Outside the framework's guarded call: a failure breaks this ring, never the process.
          q.markBroken(`device error: ${err instanceof Error ? err.message : String(err)}`);
          return;
        }
        q.flush();
      }
    });
  }

  // --- receive -------------------------------------------------------------------------

  /** Header + frame into receive chains of `queue` (pair `pair`). */
  #writeRx(queue: BackendQueue, pair: number, frame: Frame): boolean {
    const drops = this.counters.drops;
    const d = frame.data;
    const hl = this.#hdrLen;
    const total = hl + d.length;
    if (d.length > MAX_FRAME) {
      drops["too-big"]++;
      return false;
    }
    const held = this.#held[pair] as DescChain[];
    let bytes = this.#heldBytes[pair] as number;
    let count: number;
    if (this.#neg.mrg) {
      // Take chains until the frame fits; keep them for the next frame when it does not.
      while (bytes < total) {
        const c = queue.pop();
        if (c === null) break;
        if (c.writableLength === 0) {
          queue.pushUsed(c, 0); // a receive buffer the device cannot write: give it back
          continue;
        }
        held.push(c);
        bytes += c.writableLength;
      }
      this.#heldBytes[pair] = bytes;
      if (bytes < total) {
        drops["no-buffer"]++;
        if (held.length > 0) this.#armHeldRelease();
        return false;
      }
      count = 0;
      for (let sum = 0; sum < total; count++) sum += (held[count] as DescChain).writableLength;
    } else {
      if (held.length === 0) {
        const c = queue.pop();
        if (c === null) {
          drops["no-buffer"]++;
          return false;
        }
        held.push(c);
        this.#heldBytes[pair] = c.writableLength;
      }
      if ((held[0] as DescChain).writableLength < total) {
        // Without MRG_RXBUF one buffer must hold the whole frame; keep it for a smaller one.
        drops["too-big"]++;
        this.#armHeldRelease();
        return false;
      }
      count = 1;
    }
    if (count === 1) {
      // One receive chain: header, then the frame straight from the sender's buffer (the
      // frame's only copy).
      const c = held[0] as DescChain;
      const h = this.#rxHdr;
      this.#buildHeader(h, frame, 1);
      const w =
        queue.writeFrame !== undefined
          ? queue.writeFrame(c, h, hl, d)
          : queue.write(c, hl === 12 ? h : this.#rxHdr10) + queue.write(c, d, hl);
      queue.pushUsed(c, w);
      this.#heldBytes[pair] = (this.#heldBytes[pair] as number) - c.writableLength;
      if (held.length === 1) held.pop();
      else held.shift();
      this.pairCounters[pair]!.rxFrames++;
      this.#rxDirty[pair] = true;
      this.#anyRxDirty = true;
      return true;
    }
    const b = this.#rxBuf;
    this.#buildHeader(b, frame, count);
    b.set(d, hl);
    let off = 0;
    for (let i = 0; i < count; i++) {
      const c = held[i] as DescChain;
      const n = Math.min(c.writableLength, total - off);
      const w = queue.write(c, b.subarray(off, off + n));
      queue.pushUsed(c, w);
      off += n;
      this.#heldBytes[pair] = (this.#heldBytes[pair] as number) - c.writableLength;
    }
    if (count === held.length) held.length = 0;
    else held.splice(0, count);
    this.pairCounters[pair]!.rxFrames++;
    this.#rxDirty[pair] = true;
    this.#anyRxDirty = true;
    return true;
  }

  /** virtio_net_hdr_v1 for a frame (VIRTIO 1.2 §5.1.6.4). */
  #buildHeader(b: Uint8Array, frame: Frame, numBuffers: number): void {
    writeVnetHeader(b, frame, this.offloads.csum, this.#hdrLen === 12 ? numBuffers : null);
  }

  #armHeldRelease(): void {
    if (this.#heldTimer !== null) return;
    this.#heldTimer = setTimeout(() => {
      this.#heldTimer = null;
      const ctx = this.#ctx;
      if (ctx === null) return;
      for (let p = 0; p < this.queuePairs; p++) {
        const q = ctx.queue(2 * p);
        if (q === undefined || !q.started || this.#held[p]!.length === 0) continue;
        try {
          this.#releaseHeld(p, q);
        } catch (err) {
          q.markBroken(`device error: ${err instanceof Error ? err.message : String(err)}`);
        }
      }
    }, HELD_RELEASE_MS);
    this.#heldTimer.unref();
  }

  /**
   * Give back receive chains that were taken for a frame that did not fit, as empty buffers
   * (the driver drops a buffer shorter than a header), so no buffer stays in flight when the
   * ring stops. With `cancel` (the queue is disabled or stopping) they are cancelled instead
   * when they are the last chains taken: the avail position is rewound over them.
   */
  #releaseHeld(pair: number, queue: BackendQueue, cancel = false): void {
    const held = this.#held[pair] as DescChain[];
    if (!cancel || !queue.cancel(held)) for (const c of held) queue.pushUsed(c, 0);
    this.logger.debug(
      `${this.name}: queue ${queue.index}: ${held.length} unused receive buffer(s) returned`,
    );
    held.length = 0;
    this.#heldBytes[pair] = 0;
    queue.flush();
  }

  // --- control queue -------------------------------------------------------------------

  #control(queue: BackendQueue): void {
    const buf = this.#ctrlBuf;
    const ack = new Uint8Array(1);
    let chain: DescChain | null;
    while ((chain = queue.pop()) !== null) {
      if (!queue.enabled) {
        queue.pushUsed(chain, 0);
        continue;
      }
      if (chain.writableLength < 1) {
        // No room for the ack (VIRTIO 1.2 §5.1.6.5): nothing can be answered.
        this.logger.warn(
          `${this.name}: control command with ${chain.readableLength} readable and ` +
            `no writable byte ignored`,
        );
        queue.pushUsed(chain, 0);
        continue;
      }
      if (chain.readableLength > CTRL_MAX_COMMAND) {
        this.logger.warn(
          `${this.name}: control command refused: ${chain.readableLength} bytes ` +
            `(more than ${CTRL_MAX_COMMAND})`,
        );
        ack[0] = VIRTIO_NET_ERR;
        queue.pushUsed(chain, queue.write(chain, ack));
        continue;
      }
      // Most commands are a few bytes; a MAC TABLE_SET past the 4 KiB buffer (QEMU takes any
      // size, and sets the overflow flag past MAC_TABLE_ENTRIES) gets a buffer of its own.
      const dst = chain.readableLength > buf.length ? new Uint8Array(chain.readableLength) : buf;
      const n = queue.read(chain, dst);
      const r = handleCtrlCommand(this, dst.subarray(0, n));
      if (r.ack === 0) this.logger.debug(`${this.name}: control: ${r.what}`);
      else this.logger.warn(`${this.name}: control command refused: ${r.what}`);
      ack[0] = r.ack;
      queue.pushUsed(chain, queue.write(chain, ack));
    }
  }

  /**
   * CtrlTarget: MAC ADDR_SET.
   * @param mac six bytes
   */
  setPrimaryMac(mac: Uint8Array): void {
    this.state.mac = macKey(mac);
    this.state.macSource = "guest";
  }

  /** CtrlTarget: ANNOUNCE ACK clears VIRTIO_NET_S_ANNOUNCE. */
  announceAck(): void {
    this.state.announcePending = false;
  }

  /**
   * CtrlTarget: MQ VQ_PAIRS_SET.
   * @param pairs 1..queuePairs
   * @returns false when out of range
   */
  setActivePairs(pairs: number): boolean {
    if (pairs < 1 || pairs > this.queuePairs) return false;
    this.state.activePairs = pairs;
    this.#recomputeRx();
    return true;
  }

  /**
   * CtrlTarget: GUEST_OFFLOADS SET.
   * @param offloads feature bits
   * @returns false when not a subset of the negotiated guest offloads
   */
  setGuestOffloads(offloads: bigint): boolean {
    const allowed = this.#features & GUEST_OFFLOAD_MASK;
    if ((offloads & ~allowed) !== 0n) return false;
    this.state.guestOffloads = Number(offloads);
    this.#applyOffloads();
    return true;
  }

  // --- config space, RARP, MTU, announce -----------------------------------------------

  /**
   * GET_CONFIG: mac[6], status u16, max_virtqueue_pairs u16, mtu u16 (VIRTIO 1.2 §5.1.4);
   * bytes past them read as 0.
   * @param offset offset in the config space
   * @param size bytes wanted
   * @returns `size` bytes
   */
  getConfig(offset: number, size: number): Uint8Array {
    const cfg = new Uint8Array(Math.max(NET_CONFIG_SIZE, offset + size));
    const st = this.state;
    if (st.mac !== null) {
      const key = st.mac;
      const hi = Math.floor(key / 4294967296);
      cfg.set(
        [hi >>> 8, hi & 0xff, key >>> 24, (key >>> 16) & 0xff, (key >>> 8) & 0xff, key & 0xff],
        0,
      );
    }
    const status = VIRTIO_NET_S_LINK_UP | (st.announcePending ? VIRTIO_NET_S_ANNOUNCE : 0);
    cfg[6] = status & 0xff;
    cfg[7] = status >>> 8;
    cfg[8] = this.queuePairs & 0xff;
    cfg[9] = this.queuePairs >>> 8;
    cfg[10] = st.mtu & 0xff;
    cfg[11] = st.mtu >>> 8;
    return cfg.slice(offset, offset + size);
  }

  /**
   * SET_CONFIG: only the MAC field is writable (legacy drivers, migration).
   * @param offset offset in the config space
   * @param data bytes
   * @throws RangeError naming the offset when the write goes past the MAC
   */
  setConfig(offset: number, data: Uint8Array): void {
    if (offset < 0 || offset + data.length > 6) {
      throw new RangeError(
        `SET_CONFIG: only mac (bytes 0..5) is writable (offset=${offset}, size=${data.length})`,
      );
    }
    const mac = this.getConfig(0, 6);
    mac.set(data, offset);
    this.state.mac = macKey(mac);
    this.state.macSource = "guest";
  }

  /**
   * NET_SET_MTU.
   * @param mtu the MTU
   * @throws RangeError naming the value when outside 68..65535
   */
  setMtu(mtu: number): void {
    if (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535) {
      throw new RangeError(`NET_SET_MTU: mtu must be 68..65535 (mtu=${mtu})`);
    }
    this.state.mtu = mtu;
  }

  /**
   * SEND_RARP: broadcast a RARP announcement for `mac` as if the guest had sent it, so every
   * other port and uplink learns where the MAC lives. Sent when the port comes up if it is
   * down now.
   * @param mac the guest MAC (6 bytes or text)
   * (vhost-user: VHOST_USER_SEND_RARP)
   */
  sendRarp(mac: Uint8Array | string): void {
    const bytes = toMacBytes(mac);
    if (this.state.mac === null || this.state.macSource === "learned") {
      this.state.mac = macKey(bytes);
      this.state.macSource = "rarp";
    }
    const host = this.#host;
    if (!this.#up || host === null) {
      this.#pendingRarp = bytes;
      return;
    }
    this.logger.info(`${this.name}: RARP for ${formatMac(bytes)}`);
    host.receive(this, { data: buildRarp(bytes), meta: {} });
    host.flush();
  }

  /**
   * Ask the guest to announce itself: with GUEST_ANNOUNCE (and the control queue) negotiated,
   * set VIRTIO_NET_S_ANNOUNCE and send a config-change notification (the driver answers with
   * ANNOUNCE ACK); otherwise broadcast a RARP for the guest's MAC when it is known.
   * @returns how the announcement was made
   * (VIRTIO 1.2 §5.1.6.5.4)
   */
  announce(): "guest" | "rarp" | "none" {
    if (this.#neg.guestAnnounce && this.#neg.ctrlVq && this.#ctx !== null) {
      this.state.announcePending = true;
      this.#ctx.notifyConfigChange();
      return "guest";
    }
    if (this.state.mac !== null) {
      this.sendRarp(formatMac(this.state.mac));
      return "rarp";
    }
    return "none";
  }
}

/**
 * Write a virtio-net header (VIRTIO 1.2 §5.1.6) for a frame going to a driver or the kernel:
 * NEEDS_CSUM with csum_start/offset, or DATA_VALID (only when `csum`); the GSO type (with ECN),
 * hdr_len and gso_size; num_buffers when the header has the field.
 * @param b destination (at least 10 bytes, 12 when `numBuffers` is not null)
 * @param frame the frame whose metadata is encoded
 * @param csum the receiver takes checksum offload (else no checksum flag is set)
 * @param numBuffers num_buffers (MRG_RXBUF or VERSION_1 headers), or null for a 10-byte header
 */
export function writeVnetHeader(
  b: Uint8Array,
  frame: Frame,
  csum = true,
  numBuffers: number | null = 0,
): void {
  const meta = frame.meta;
  const cs = meta.needsCsum;
  let flags = 0;
  let start = 0;
  let offset = 0;
  if (cs !== undefined && csum) {
    flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    start = cs.start;
    offset = cs.offset;
  } else if (meta.dataValid === true && csum) {
    flags = VIRTIO_NET_HDR_F_DATA_VALID;
  }
  let gsoType: number = VirtioNetGso.NONE;
  let hdrLen = 0;
  let size = 0;
  const g = meta.gso;
  if (g !== undefined) {
    gsoType =
      g.type === "tcpv4"
        ? VirtioNetGso.TCPV4
        : g.type === "tcpv6"
          ? VirtioNetGso.TCPV6
          : VirtioNetGso.UDP;
    if (g.ecn === true) gsoType |= VirtioNetGso.ECN;
    hdrLen = g.hdrLen;
    size = g.size;
  }
  b[0] = flags;
  b[1] = gsoType;
  b[2] = hdrLen & 0xff;
  b[3] = hdrLen >>> 8;
  b[4] = size & 0xff;
  b[5] = size >>> 8;
  b[6] = start & 0xff;
  b[7] = start >>> 8;
  b[8] = offset & 0xff;
  b[9] = offset >>> 8;
  if (numBuffers !== null) {
    b[10] = numBuffers & 0xff;
    b[11] = numBuffers >>> 8;
  }
}

/** Options of {@link addVhostUserPort}. */
export interface VhostUserPortOptions extends Omit<VirtioNetOptions, "name"> {
  /** socket path */
  path: string;
  /** port name (default: the path) */
  name?: string;
  /** connect to the front-end's socket instead of listening (QEMU `server=on`) */
  client?: boolean;
  /** client mode: first and largest delay between connection attempts (ms) */
  reconnectDelayMs?: { min: number; max: number };
  /** busy polling of the port's rings (see `ServeOptions.busyPollMicros`; default 0: off) */
  busyPollMicros?: number;
  /** device-state transfer timeout (see `ServeOptions.stateTimeoutMs`) */
  stateTimeoutMs?: number;
  /** requests waiting on a connection (see `ServeOptions.requestBacklog`) */
  requestBacklog?: { requests: number; bytes: number; fds: number };
}

/** A vhost-user port served on a socket and attached to a switch. */
export interface VhostUserPort {
  readonly device: VirtioNetDevice;
  readonly server: BackendServer;
  /** Remove the port from the switch and stop serving (the socket file is removed). */
  close(): void;
}

/**
 * Create a vhost-user-net device, add it to a switch and serve it on a socket.
 * @param sw the switch
 * @param options socket path, mode, queue pairs, MAC, MTU, logger
 * @returns the port; `close()` removes it
 * @throws Error when the name is taken in the switch; NativeError when the socket fails;
 *   RangeError naming a serving option out of range (see {@link serveBackend})
 */
export function addVhostUserPort(sw: Switch, options: VhostUserPortOptions): VhostUserPort {
  const {
    path,
    client,
    reconnectDelayMs,
    name,
    busyPollMicros,
    stateTimeoutMs,
    requestBacklog,
    ...rest
  } = options;
  const device = new VirtioNetDevice({ ...rest, name: name ?? path });
  sw.addPort(device);
  let server: BackendServer;
  try {
    const so: ServeOptions = { path, client: client ?? false };
    if (options.logger !== undefined) so.logger = options.logger;
    if (reconnectDelayMs !== undefined) so.reconnectDelayMs = reconnectDelayMs;
    if (busyPollMicros !== undefined) so.busyPollMicros = busyPollMicros;
    if (stateTimeoutMs !== undefined) so.stateTimeoutMs = stateTimeoutMs;
    if (requestBacklog !== undefined) so.requestBacklog = requestBacklog;
    server = serveBackend(device, so);
  } catch (err) {
    sw.removePort(device);
    throw err;
  }
  server.on("error", (err: Error) => device.logger.warn(`${device.name}: ${err.message}`));
  return {
    device,
    server,
    close(): void {
      server.close();
      sw.removePort(device);
    },
  };
}
