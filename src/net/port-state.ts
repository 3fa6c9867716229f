/**
 * The migration state of a switch port (a `VirtioNetDevice`, see {@link MigratablePort}): what SET_DEVICE_STATE_FD
 * carries from the source back-end to the destination back-end, as a versioned stream of named
 * stages (passt's `migrate.h` layout, `src/migration/stream.ts`).
 *
 * Version 1, in order:
 * - `features`: the negotiated virtio features (LOG_ALL left out) and the guest offloads in
 *   force (CTRL_GUEST_OFFLOADS_SET);
 * - `port`: queue pairs (must match the destination), active pairs (VQ_PAIRS_SET), MTU, the
 *   guest's MAC and where it came from, a pending GUEST_ANNOUNCE;
 * - `counters`: rx/tx packets and bytes, drops by reason (by name: unknown reasons are ignored);
 * - `macs`: the MACs the switch learned on this port.
 *
 * Version 2 (compat 1: a v1 target skips what v2 adds) appends:
 * - `rx-filter`: the receive filter the control queue programmed (modes, MAC tables, VLANs);
 * - `pair-counters`: frames per queue pair.
 *
 * A v2 target loads a v1 stream (it then keeps its own receive filter and pair counters).
 * Loading is all or nothing: every stage is validated against the destination first.
 * (vhost-user: "Migrating back-end state")
 */
import { featureMask, featureSet, VirtioFeature } from "../protocol/constants.js";
import { FRAMEWORK_FEATURES } from "../backend/session.js";
import { MigrationFormat } from "../migration/stream.js";
import type { LoadResult, MigrationStage, MigrationVersion } from "../migration/stream.js";
import { MigrationStreamError, MAC_LENGTH } from "../migration/state-codec.js";
import type { StageReader } from "../migration/state-codec.js";
import { MAC_TABLE_ENTRIES, newRxFilter } from "./ctrl.js";
import type { RxFilterState } from "./ctrl.js";
import { formatMac, macFromKey, macKey } from "./frame.js";
import { DROP_REASONS } from "./port.js";
import type { DropReason, PortCounters, PortHost } from "./port.js";

/** The newest port-state version this build writes. */
export const PORT_STATE_VERSION = 2;
/** Most learned MACs carried for one port. */
export const MAX_PORT_MACS = 16_384;
/** Largest port-state stream accepted (1 MiB: the MAC list dominates). */
export const MAX_PORT_STATE_BYTES = 1024 * 1024;

/** Where a port's MAC came from (as `NetPortState.macSource` in `virtio-net.ts`). */
export type PortMacSource = "config" | "guest" | "rarp" | "learned" | null;

/**
 * What the port-state stages read and write of a port: the members of `VirtioNetDevice` they
 * use (a structural type, so that `virtio-net.ts` can import this file without a cycle).
 */
export interface MigratablePort {
  /** port name in the switch */
  readonly name: string;
  /** the device's own feature bits (what it offers) */
  readonly features: bigint;
  /** queue pairs the device was created with */
  readonly queuePairs: number;
  /** the negotiated virtio features (0 before SET_FEATURES) */
  readonly negotiatedFeatures: bigint;
  /** port counters (mutable fields) */
  readonly counters: PortCounters;
  /** frames per queue pair (mutable fields) */
  readonly pairCounters: readonly { rxFrames: number; txFrames: number }[];
  /** the port's own state (mutable fields) */
  readonly state: {
    mac: number | null;
    macSource: PortMacSource;
    mtu: number;
    activePairs: number;
    announcePending: boolean;
    guestOffloads: number;
    filter: RxFilterState;
  };
  /** the switch the port is in, when the device exposes it */
  readonly host?: PortHost | null;
  /**
   * The MACs the switch had learned on the port when its link went down for the suspension
   * (the switch flushes a port's MACs when it goes down, and stopping every ring for the
   * migration does that), or null/absent: then the switch is asked at save time.
   */
  readonly suspendedMacs?: readonly { mac: string; ageMs: number }[] | null;
  /** SET_FEATURES as the session calls it */
  setFeatures(features: bigint): void;
  /** CTRL_GUEST_OFFLOADS_SET; false when not a subset of the negotiated offloads */
  setGuestOffloads(offloads: bigint): boolean;
  /** CTRL_MQ_VQ_PAIRS_SET; false when out of range */
  setActivePairs(pairs: number): boolean;
  /** NET_SET_MTU; throws RangeError outside 68..65535 */
  setMtu(mtu: number): void;
}

/** What the stages work on: the device and the switch it is a port of. */
export interface PortStateContext {
  /** the port */
  readonly dev: MigratablePort;
  /** source side: the learned MACs to save, when not the switch's current table */
  readonly macs?: readonly { mac: string; ageMs: number }[] | null;
  /** its switch (learned MACs live there), or null when the port is in none */
  readonly host: PortHost | null;
}

/** Options of {@link savePortState} and {@link loadPortState}. */
export interface PortStateOptions {
  /** the port's switch (default: the one the device was attached to, when it exposes it) */
  host?: PortHost | null;
  /** the format (default {@link PORT_STATE_FORMAT}; tests pass a single-version one) */
  format?: MigrationFormat<PortStateContext>;
}

/** Options of {@link savePortState}. */
export interface SavePortStateOptions extends PortStateOptions {
  /** the learned MACs to save (default: `dev.suspendedMacs`, else the switch's table) */
  macs?: readonly { mac: string; ageMs: number }[];
  /** the version to write (default: the newest of the format) */
  version?: number;
}

const GUEST_OFFLOAD_MASK = featureSet(
  VirtioFeature.GUEST_CSUM,
  VirtioFeature.GUEST_TSO4,
  VirtioFeature.GUEST_TSO6,
  VirtioFeature.GUEST_ECN,
  VirtioFeature.GUEST_UFO,
);
const LOG_ALL = featureMask(VirtioFeature.LOG_ALL);
const MAC_SOURCES: readonly PortMacSource[] = [null, "config", "guest", "rarp", "learned"];
const U64_SAFE = Number.MAX_SAFE_INTEGER;

function bad(stage: string, field: string, value: unknown, what: string): MigrationStreamError {
  return new MigrationStreamError("BAD_VALUE", what, { stage, field, value });
}

function readMacKey(r: StageReader, field: string, unicast: boolean): number {
  const b = r.mac(field);
  if (unicast && ((b[0] as number) & 1) !== 0) {
    throw bad(r.stage, field, formatMac(b), "not a unicast MAC");
  }
  return macKey(b);
}

/**
 * The switch a device is attached to: its public `host`, when it has one.
 * @param dev the port
 * @returns the switch, or null
 */
function hostOf(dev: MigratablePort): PortHost | null {
  return dev.host ?? null;
}

// --- stages ---------------------------------------------------------------------------

const featuresStage: MigrationStage<PortStateContext> = {
  name: "features",
  maxBytes: 16,
  save({ dev }, w) {
    w.u64("features", dev.negotiatedFeatures & ~LOG_ALL);
    w.u64("guest_offloads", BigInt(dev.state.guestOffloads));
  },
  load({ dev }, r) {
    const features = r.u64("features") & ~LOG_ALL;
    const offloads = r.u64("guest_offloads");
    const unknown = features & ~(dev.features | FRAMEWORK_FEATURES);
    if (unknown !== 0n) {
      throw bad(r.stage, "features", unknown, "features this destination port does not offer");
    }
    const current = dev.negotiatedFeatures & ~LOG_ALL;
    if (current !== 0n && current !== features) {
      throw bad(
        r.stage,
        "features",
        features,
        `negotiated features differ: destination has 0x${current.toString(16)}`,
      );
    }
    if ((offloads & ~(features & GUEST_OFFLOAD_MASK)) !== 0n) {
      throw bad(r.stage, "guest_offloads", offloads, "guest offloads not in the features");
    }
    return () => {
      if (current === 0n) dev.setFeatures(features);
      if (!dev.setGuestOffloads(offloads)) {
        throw new Error(`guest offloads 0x${offloads.toString(16)} refused`);
      }
    };
  },
};

const portStage: MigrationStage<PortStateContext> = {
  name: "port",
  maxBytes: 32,
  save({ dev }, w) {
    const st = dev.state;
    w.u16("queue_pairs", dev.queuePairs);
    w.u16("active_pairs", st.activePairs);
    w.u16("mtu", st.mtu);
    w.bool("mac_present", st.mac !== null);
    w.mac("mac", st.mac === null ? new Uint8Array(MAC_LENGTH) : macFromKey(st.mac));
    w.u8("mac_source", MAC_SOURCES.indexOf(st.macSource));
    w.bool("announce_pending", st.announcePending);
  },
  load({ dev }, r) {
    const pairs = r.u16("queue_pairs");
    if (pairs !== dev.queuePairs) {
      throw bad(
        r.stage,
        "queue_pairs",
        pairs,
        `destination port has ${dev.queuePairs} queue pair(s)`,
      );
    }
    const active = r.u16("active_pairs", { min: 1, max: pairs });
    const mtu = r.u16("mtu", { min: 68, max: 65535 });
    const present = r.bool("mac_present");
    const mac = readMacKey(r, "mac", true);
    const source = MAC_SOURCES[r.u8("mac_source", { max: MAC_SOURCES.length - 1 })] ?? null;
    const announce = r.bool("announce_pending");
    if (present !== (source !== null)) {
      throw bad(r.stage, "mac_source", source, "MAC presence and source disagree");
    }
    return () => {
      if (!dev.setActivePairs(active)) throw new Error(`active pairs ${active} refused`);
      dev.setMtu(mtu);
      dev.state.mac = present ? mac : null;
      dev.state.macSource = source;
      dev.state.announcePending = announce;
    };
  },
};

const countersStage: MigrationStage<PortStateContext> = {
  name: "counters",
  maxBytes: 4096,
  save({ dev }, w) {
    const c = dev.counters;
    w.u64("rx_packets", c.rxPackets);
    w.u64("rx_bytes", c.rxBytes);
    w.u64("tx_packets", c.txPackets);
    w.u64("tx_bytes", c.txBytes);
    w.array("drops", DROP_REASONS, 64, (w2, reason) => {
      w2.string("reason", reason, 32);
      w2.u64("count", c.drops[reason]);
    });
  },
  load({ dev }, r) {
    const rxPackets = r.u64Number("rx_packets");
    const rxBytes = r.u64Number("rx_bytes");
    const txPackets = r.u64Number("tx_packets");
    const txBytes = r.u64Number("tx_bytes");
    const drops = r.array("drops", 64, (r2) => ({
      reason: r2.string("reason", 32),
      count: r2.u64Number("count", { max: U64_SAFE }),
    }));
    return () => {
      const c = dev.counters;
      c.rxPackets = rxPackets;
      c.rxBytes = rxBytes;
      c.txPackets = txPackets;
      c.txBytes = txBytes;
      for (const d of drops) {
        // A reason this build does not count is dropped (counters are informational).
        if ((DROP_REASONS as readonly string[]).includes(d.reason)) {
          c.drops[d.reason as DropReason] = d.count;
        }
      }
    };
  },
};

const macsStage: MigrationStage<PortStateContext> = {
  name: "macs",
  maxBytes: 8 + MAX_PORT_MACS * 10,
  save({ dev, host, macs: given }, w) {
    const macs = given ?? (host === null ? [] : host.macsOnPort(dev.name));
    w.array("macs", macs, MAX_PORT_MACS, (w2, m) => {
      w2.mac("mac", m.mac);
      w2.u32("age_ms", Math.min(Math.max(0, Math.round(m.ageMs)), 0xffff_ffff));
    });
  },
  load({ dev, host }, r) {
    const macs = r.array("macs", MAX_PORT_MACS, (r2) => ({
      mac: readMacKey(r2, "mac", true),
      ageMs: r2.u32("age_ms"),
    }));
    if (macs.length > 0 && host === null) {
      throw bad(r.stage, "macs.count", macs.length, `port ${dev.name} is not in a switch`);
    }
    return () => {
      for (const m of macs) host?.learnMac(macFromKey(m.mac), dev.name, m.ageMs);
    };
  },
};

const rxFilterStage: MigrationStage<PortStateContext> = {
  name: "rx-filter",
  maxBytes: 2048,
  save({ dev }, w) {
    const f = dev.state.filter;
    for (const k of ["promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"] as const) {
      w.bool(k, f[k]);
    }
    w.bool("unicast_overflow", f.unicastOverflow);
    w.bool("multicast_overflow", f.multicastOverflow);
    w.array("unicast", f.unicast, MAC_TABLE_ENTRIES, (w2, m) => w2.mac("mac", macFromKey(m)));
    w.array("multicast", f.multicast, MAC_TABLE_ENTRIES, (w2, m) => w2.mac("mac", macFromKey(m)));
    for (let i = 0; i < f.vlans.length; i++) w.u32(`vlans[${i}]`, f.vlans[i] as number);
  },
  load(_ctx, r) {
    const f: RxFilterState = newRxFilter(false);
    f.promisc = r.bool("promisc");
    f.allmulti = r.bool("allmulti");
    f.alluni = r.bool("alluni");
    f.nomulti = r.bool("nomulti");
    f.nouni = r.bool("nouni");
    f.nobcast = r.bool("nobcast");
    f.unicastOverflow = r.bool("unicast_overflow");
    f.multicastOverflow = r.bool("multicast_overflow");
    f.unicast = r.array("unicast", MAC_TABLE_ENTRIES, (r2) => readMacKey(r2, "mac", true));
    f.multicast = r.array("multicast", MAC_TABLE_ENTRIES, (r2) => {
      const key = readMacKey(r2, "mac", false);
      if ((Math.floor(key / 2 ** 40) & 1) === 0) {
        throw bad(r2.stage, "mac", formatMac(key), "not a multicast MAC");
      }
      return key;
    });
    for (let i = 0; i < f.vlans.length; i++) f.vlans[i] = r.u32(`vlans[${i}]`);
    return () => {
      _ctx.dev.state.filter = f;
    };
  },
};

const pairCountersStage: MigrationStage<PortStateContext> = {
  name: "pair-counters",
  maxBytes: 8 + 64 * 16,
  save({ dev }, w) {
    w.array("pairs", dev.pairCounters, 64, (w2, p) => {
      w2.u64("rx_frames", p.rxFrames);
      w2.u64("tx_frames", p.txFrames);
    });
  },
  load({ dev }, r) {
    const pairs = r.array("pairs", 64, (r2) => ({
      rxFrames: r2.u64Number("rx_frames"),
      txFrames: r2.u64Number("tx_frames"),
    }));
    if (pairs.length !== dev.pairCounters.length) {
      throw bad(
        r.stage,
        "pairs.count",
        pairs.length,
        `destination port has ${dev.pairCounters.length} queue pair(s)`,
      );
    }
    return () => {
      pairs.forEach((p, i) => Object.assign(dev.pairCounters[i] as object, p));
    };
  },
};

/** The port-state versions (see the module comment); frozen, never changed at run time. */
export const PORT_STATE_VERSIONS: readonly MigrationVersion<PortStateContext>[] = Object.freeze(
  [
    { id: 1, stages: [featuresStage, portStage, countersStage, macsStage] },
    {
      id: 2,
      compat: 1,
      stages: [
        featuresStage,
        portStage,
        countersStage,
        macsStage,
        rxFilterStage,
        pairCountersStage,
      ],
    },
  ].map((v) => {
    v.stages.forEach((s) => Object.freeze(s));
    return Object.freeze({ ...v, stages: Object.freeze(v.stages) });
  }),
);

/**
 * The port-state format restricted to some versions (to play an older or newer peer in tests).
 * @param versions the version ids to keep (default: all)
 * @returns the format
 * @throws MigrationStreamError BAD_DEFINITION when none is left
 */
export function portStateFormat(versions?: readonly number[]): MigrationFormat<PortStateContext> {
  const keep =
    versions === undefined
      ? PORT_STATE_VERSIONS
      : PORT_STATE_VERSIONS.filter((v) => versions.includes(v.id));
  return new MigrationFormat(keep, { name: "virtio-net port", maxBytes: MAX_PORT_STATE_BYTES });
}

/** The port-state format with every version (v1 and v2). */
export const PORT_STATE_FORMAT: MigrationFormat<PortStateContext> = portStateFormat();

/**
 * Serialise a port's state for migration: negotiated features and offloads, queue settings,
 * MAC, counters, the MACs its switch learned on it, the receive filter. The device is not
 * changed.
 * @param dev the port (suspended: all rings stopped)
 * @param options the switch (default: the device's), the format and version
 * @returns the state stream
 * @throws MigrationStreamError when a value cannot be encoded
 * (vhost-user: "Migrating back-end state", SAVE; passt `migrate.h` layout)
 */
export function savePortState(dev: MigratablePort, options: SavePortStateOptions = {}): Uint8Array {
  const format = options.format ?? PORT_STATE_FORMAT;
  const ctx: PortStateContext = {
    dev,
    host: options.host ?? hostOf(dev),
    macs: options.macs ?? dev.suspendedMacs ?? null,
  };
  return format.saveStream(ctx, options.version !== undefined ? { version: options.version } : {});
}

/**
 * Load a port's state saved by {@link savePortState} on the source. The stream is untrusted:
 * it is parsed and checked against this port whole (CRC, versions, queue pairs, features,
 * values) before anything changes; a defect throws and leaves the port as it was.
 * @param dev the port (suspended)
 * @param data the state stream
 * @param options the switch (default: the device's) and the format
 * @returns the versions used and the stages loaded and skipped
 * @throws MigrationStreamError naming the stage, field and value
 * (vhost-user: "Migrating back-end state", LOAD; passt `migrate.h` layout)
 */
export function loadPortState(
  dev: MigratablePort,
  data: Uint8Array,
  options: PortStateOptions = {},
): LoadResult {
  const format = options.format ?? PORT_STATE_FORMAT;
  const ctx: PortStateContext = { dev, host: options.host ?? hostOf(dev) };
  return format.loadStream(ctx, data);
}
