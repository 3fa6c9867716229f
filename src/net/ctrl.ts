/**
 * The virtio-net control virtqueue (VIRTIO 1.2 §5.1.6.5): command parsing, the receive filter
 * it programs (promiscuous / all-multicast / all-unicast / no-multicast / no-unicast /
 * no-broadcast, the unicast and multicast MAC tables, the VLAN filter), and the filter check
 * applied to every frame delivered to the guest, as QEMU's virtio-net `receive_filter` does.
 *
 * A command is `u8 class, u8 command, data..., u8 ack` (the ack in the device-writable part);
 * the device answers VIRTIO_NET_OK (0) or VIRTIO_NET_ERR (1).
 */
import { VirtioFeature, hasFeature } from "../protocol/constants.js";
import { BROADCAST_KEY, EtherType, macKey } from "./frame.js";

/** Ack values (VIRTIO 1.2 §5.1.6.5). */
export const VIRTIO_NET_OK = 0;
/** Ack value of a failed command. */
export const VIRTIO_NET_ERR = 1;

/** Control command classes and commands (VIRTIO 1.2 §5.1.6.5). */
export const CtrlClass = Object.freeze({
  RX: 0,
  MAC: 1,
  VLAN: 2,
  ANNOUNCE: 3,
  MQ: 4,
  GUEST_OFFLOADS: 5,
  NOTF_COAL: 6,
});

/** Commands of class RX (data: u8 on/off). */
export const CtrlRx = Object.freeze({
  PROMISC: 0,
  ALLMULTI: 1,
  ALLUNI: 2,
  NOMULTI: 3,
  NOUNI: 4,
  NOBCAST: 5,
});

/** Commands of class MAC. */
export const CtrlMac = Object.freeze({
  /** data: le32 n, n unicast MACs, le32 m, m multicast MACs */
  TABLE_SET: 0,
  /** data: 6-byte MAC */
  ADDR_SET: 1,
});

/** Commands of class VLAN (data: le16 vid). */
export const CtrlVlan = Object.freeze({ ADD: 0, DEL: 1 });
/** Commands of class ANNOUNCE. */
export const CtrlAnnounce = Object.freeze({ ACK: 0 });
/** Commands of class MQ. */
export const CtrlMq = Object.freeze({
  /** data: le16 virtqueue_pairs */
  VQ_PAIRS_SET: 0,
  RSS_CONFIG: 1,
  HASH_CONFIG: 2,
});
/** Commands of class GUEST_OFFLOADS (data: le64 offloads). */
export const CtrlGuestOffloads = Object.freeze({ SET: 0 });

/** Entries kept per MAC table kind; more set the overflow flag (QEMU: MAC_TABLE_ENTRIES). */
export const MAC_TABLE_ENTRIES = 64;
/**
 * Largest command accepted (64 KiB: a MAC TABLE_SET of about 10 900 entries; past
 * {@link MAC_TABLE_ENTRIES} only the overflow flag is kept). Larger ones get VIRTIO_NET_ERR.
 */
export const CTRL_MAX_COMMAND = 65536;
/** Size of the buffer a device reads commands into; larger commands get one of their own. */
export const CTRL_BUFFER = 4096;

/**
 * The receive filter state of a port (plain data, for stats and later serialisation).
 * MACs are keys from {@link macKey}.
 */
export interface RxFilterState {
  promisc: boolean;
  allmulti: boolean;
  alluni: boolean;
  nomulti: boolean;
  nouni: boolean;
  nobcast: boolean;
  /** extra unicast MACs (TABLE_SET) */
  unicast: number[];
  /** multicast MACs (TABLE_SET) */
  multicast: number[];
  /** more unicast MACs were given than kept: accept every unicast */
  unicastOverflow: boolean;
  /** more multicast MACs were given than kept: accept every multicast */
  multicastOverflow: boolean;
  /** VLAN filter bitmap, 4096 bits (bit set = VID accepted) */
  vlans: Uint32Array;
}

/**
 * The filter a device starts with (QEMU `virtio_net_reset`): promiscuous, no tables; every
 * VLAN accepted unless CTRL_VLAN is negotiated (then none until VLAN_ADD).
 * @param vlanFiltering true when VIRTIO_NET_F_CTRL_VLAN is negotiated
 * @returns the state
 */
export function newRxFilter(vlanFiltering = false): RxFilterState {
  return {
    promisc: true,
    allmulti: false,
    alluni: false,
    nomulti: false,
    nouni: false,
    nobcast: false,
    unicast: [],
    multicast: [],
    unicastOverflow: false,
    multicastOverflow: false,
    vlans: new Uint32Array(128).fill(vlanFiltering ? 0 : 0xffff_ffff),
  };
}

/**
 * Whether the guest wants a frame (QEMU `receive_filter`, VIRTIO 1.2 §5.1.6.5.1-2).
 * @param f the filter
 * @param primary the port's own MAC as a key, or null when unknown
 * @param d the frame
 * @returns true when the frame passes
 */
export function rxFilterAccepts(f: RxFilterState, primary: number | null, d: Uint8Array): boolean {
  if (f.promisc) return true;
  if (d.length >= 18 && (((d[12] as number) << 8) | (d[13] as number)) === EtherType.VLAN) {
    const vid = (((d[14] as number) << 8) | (d[15] as number)) & 0xfff;
    if (((f.vlans[vid >> 5] as number) & (1 << (vid & 31))) === 0) return false;
  }
  const dst = macKey(d, 0);
  if (((d[0] as number) & 1) !== 0) {
    if (dst === BROADCAST_KEY) return !f.nobcast;
    if (f.nomulti) return false;
    if (f.allmulti || f.multicastOverflow) return true;
    return f.multicast.includes(dst);
  }
  if (f.nouni) return false;
  if (f.alluni || f.unicastOverflow) return true;
  if (primary !== null && dst === primary) return true;
  return f.unicast.includes(dst);
}

/** What a control command acts on: the device (see {@link handleCtrlCommand}). */
export interface CtrlTarget {
  /** negotiated virtio features */
  readonly negotiatedFeatures: bigint;
  /** the receive filter to program */
  readonly filter: RxFilterState;
  /**
   * MAC ADDR_SET.
   * @param mac six bytes
   */
  setPrimaryMac(mac: Uint8Array): void;
  /** ANNOUNCE ACK: clear VIRTIO_NET_S_ANNOUNCE. */
  announceAck(): void;
  /**
   * MQ VQ_PAIRS_SET.
   * @param pairs requested pairs
   * @returns false when out of range
   */
  setActivePairs(pairs: number): boolean;
  /**
   * GUEST_OFFLOADS SET.
   * @param offloads feature bits of the offloads to enable
   * @returns false when they are not a subset of the negotiated guest offloads
   */
  setGuestOffloads(offloads: bigint): boolean;
}

/** Result of {@link handleCtrlCommand}: the ack and, on ERR, why. */
export interface CtrlResult {
  ack: number;
  /** for logs: the command name and the reason when refused */
  what: string;
}

function le16(d: Uint8Array, o: number): number {
  return (d[o] as number) | ((d[o + 1] as number) << 8);
}

function le32(d: Uint8Array, o: number): number {
  return (
    ((d[o] as number) |
      ((d[o + 1] as number) << 8) |
      ((d[o + 2] as number) << 16) |
      ((d[o + 3] as number) << 24)) >>>
    0
  );
}

function parseMacList(
  d: Uint8Array,
  at: number,
  out: number[],
): { next: number; overflow: boolean } | null {
  if (at + 4 > d.length) return null;
  const n = le32(d, at);
  const start = at + 4;
  if (n > (d.length - start) / 6) return null;
  out.length = 0;
  const overflow = n > MAC_TABLE_ENTRIES;
  if (!overflow) for (let i = 0; i < n; i++) out.push(macKey(d, start + i * 6));
  return { next: start + n * 6, overflow };
}

const RX_FEATURE_EXTRA: readonly number[] = [
  CtrlRx.ALLUNI,
  CtrlRx.NOMULTI,
  CtrlRx.NOUNI,
  CtrlRx.NOBCAST,
];
const RX_FIELD: Record<
  number,
  "promisc" | "allmulti" | "alluni" | "nomulti" | "nouni" | "nobcast"
> = {
  [CtrlRx.PROMISC]: "promisc",
  [CtrlRx.ALLMULTI]: "allmulti",
  [CtrlRx.ALLUNI]: "alluni",
  [CtrlRx.NOMULTI]: "nomulti",
  [CtrlRx.NOUNI]: "nouni",
  [CtrlRx.NOBCAST]: "nobcast",
};

/**
 * Execute one control command (VIRTIO 1.2 §5.1.6.5). Commands of a class whose feature was
 * not negotiated are refused.
 * @param t the device
 * @param cmd the device-readable bytes: class, command, data
 * @returns the ack (VIRTIO_NET_OK / VIRTIO_NET_ERR) and a description
 */
export function handleCtrlCommand(t: CtrlTarget, cmd: Uint8Array): CtrlResult {
  const err = (what: string): CtrlResult => ({ ack: VIRTIO_NET_ERR, what });
  const ok = (what: string): CtrlResult => ({ ack: VIRTIO_NET_OK, what });
  if (cmd.length < 2) return err(`command of ${cmd.length} bytes`);
  const cls = cmd[0] as number;
  const op = cmd[1] as number;
  const data = cmd.subarray(2);
  const f = t.negotiatedFeatures;
  const has = (bit: VirtioFeature): boolean => hasFeature(f, bit);
  switch (cls) {
    case CtrlClass.RX: {
      const field = RX_FIELD[op];
      if (field === undefined) return err(`RX command ${op} unknown`);
      if (!has(VirtioFeature.CTRL_RX)) return err("RX: CTRL_RX not negotiated");
      if (RX_FEATURE_EXTRA.includes(op) && !has(VirtioFeature.CTRL_RX_EXTRA)) {
        return err(`RX ${field}: CTRL_RX_EXTRA not negotiated`);
      }
      if (data.length !== 1) return err(`RX ${field}: data of ${data.length} bytes`);
      t.filter[field] = data[0] !== 0;
      return ok(`RX ${field} ${data[0] !== 0 ? "on" : "off"}`);
    }
    case CtrlClass.MAC: {
      if (op === CtrlMac.ADDR_SET) {
        if (!has(VirtioFeature.CTRL_MAC_ADDR))
          return err("MAC ADDR_SET: CTRL_MAC_ADDR not negotiated");
        if (data.length !== 6) return err(`MAC ADDR_SET: data of ${data.length} bytes`);
        t.setPrimaryMac(data.slice(0, 6));
        return ok("MAC ADDR_SET");
      }
      if (op === CtrlMac.TABLE_SET) {
        if (!has(VirtioFeature.CTRL_RX)) return err("MAC TABLE_SET: CTRL_RX not negotiated");
        const uc: number[] = [];
        const mc: number[] = [];
        const a = parseMacList(data, 0, uc);
        const b = a === null ? null : parseMacList(data, a.next, mc);
        if (a === null || b === null || b.next !== data.length) {
          return err(`MAC TABLE_SET: malformed tables (${data.length} bytes)`);
        }
        const flt = t.filter;
        flt.unicast = uc;
        flt.multicast = mc;
        flt.unicastOverflow = a.overflow;
        flt.multicastOverflow = b.overflow;
        return ok(`MAC TABLE_SET ${uc.length} unicast, ${mc.length} multicast`);
      }
      return err(`MAC command ${op} unknown`);
    }
    case CtrlClass.VLAN: {
      if (!has(VirtioFeature.CTRL_VLAN)) return err("VLAN: CTRL_VLAN not negotiated");
      if (op !== CtrlVlan.ADD && op !== CtrlVlan.DEL) return err(`VLAN command ${op} unknown`);
      if (data.length !== 2) return err(`VLAN: data of ${data.length} bytes`);
      const vid = le16(data, 0);
      if (vid >= 4096) return err(`VLAN: vid ${vid} out of range`);
      const v = t.filter.vlans;
      if (op === CtrlVlan.ADD) v[vid >> 5] = ((v[vid >> 5] as number) | (1 << (vid & 31))) >>> 0;
      else v[vid >> 5] = ((v[vid >> 5] as number) & ~(1 << (vid & 31))) >>> 0;
      return ok(`VLAN ${op === CtrlVlan.ADD ? "ADD" : "DEL"} ${vid}`);
    }
    case CtrlClass.ANNOUNCE: {
      if (!has(VirtioFeature.GUEST_ANNOUNCE)) return err("ANNOUNCE: GUEST_ANNOUNCE not negotiated");
      if (op !== CtrlAnnounce.ACK) return err(`ANNOUNCE command ${op} unknown`);
      t.announceAck();
      return ok("ANNOUNCE ACK");
    }
    case CtrlClass.MQ: {
      if (!has(VirtioFeature.NET_MQ)) return err("MQ: MQ not negotiated");
      if (op !== CtrlMq.VQ_PAIRS_SET) return err(`MQ command ${op} not supported`);
      if (data.length !== 2) return err(`MQ VQ_PAIRS_SET: data of ${data.length} bytes`);
      const pairs = le16(data, 0);
      if (!t.setActivePairs(pairs)) return err(`MQ VQ_PAIRS_SET: ${pairs} pairs out of range`);
      return ok(`MQ VQ_PAIRS_SET ${pairs}`);
    }
    case CtrlClass.GUEST_OFFLOADS: {
      if (!has(VirtioFeature.CTRL_GUEST_OFFLOADS)) {
        return err("GUEST_OFFLOADS: CTRL_GUEST_OFFLOADS not negotiated");
      }
      if (op !== CtrlGuestOffloads.SET) return err(`GUEST_OFFLOADS command ${op} unknown`);
      if (data.length !== 8) return err(`GUEST_OFFLOADS SET: data of ${data.length} bytes`);
      const bits = BigInt(le32(data, 0)) | (BigInt(le32(data, 4)) << 32n);
      if (!t.setGuestOffloads(bits))
        return err(`GUEST_OFFLOADS SET: 0x${bits.toString(16)} not negotiated`);
      return ok(`GUEST_OFFLOADS SET 0x${bits.toString(16)}`);
    }
    default:
      return err(`class ${cls} command ${op} not supported`);
  }
}
