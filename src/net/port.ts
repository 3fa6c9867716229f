/**
 * What the virtual switch sees: ports and frames. A vhost-user port ({@link VirtioNetDevice}),
 * a TAP uplink and a VXLAN uplink all implement {@link SwitchPort}; the switch never knows
 * which kind of port it talks to.
 *
 * Frames carry the offload metadata of the virtio-net header (VIRTIO 1.2 §5.1.6:
 * VIRTIO_NET_HDR_F_NEEDS_CSUM with csum_start / csum_offset, gso_type, gso_size, hdr_len) so a
 * TSO frame or a frame with a partial checksum can cross the switch unchanged when the
 * destination port accepts it; otherwise the switch completes it in software
 * (see `src/net/switch.ts`).
 *
 * Counters are named from the switch's point of view: `rx` = frames the switch received from
 * the port (for a vhost-user port: what the guest transmitted), `tx` = frames the switch handed
 * to the port and the port accepted (for a vhost-user port: what the guest received).
 */

/** GSO kinds a frame can carry (virtio-net gso_type without the ECN bit). */
export type GsoType = "tcpv4" | "tcpv6" | "udp";

/** Partial checksum to complete (VIRTIO_NET_HDR_F_NEEDS_CSUM). */
export interface CsumRequest {
  /** offset in the frame (Ethernet header included) where checksumming starts */
  start: number;
  /** offset from `start` of the 16-bit field that receives the checksum */
  offset: number;
}

/** Segmentation request (virtio-net gso_type != NONE). */
export interface GsoRequest {
  type: GsoType;
  /** payload bytes per segment (gso_size, the MSS for TCP) */
  size: number;
  /** length of the headers (Ethernet + IP + TCP/UDP) as the sender gave it (hdr_len; a hint) */
  hdrLen: number;
  /** VIRTIO_NET_HDR_GSO_ECN: the TCP stream uses ECN (CWR may be set) */
  ecn?: boolean;
}

/** Offload metadata of a frame. Absent fields mean "nothing to do". */
export interface FrameMeta {
  /** the L4 checksum is partial: the field holds the pseudo-header sum */
  needsCsum?: CsumRequest | undefined;
  /** the frame is larger than one segment and must be segmented before the wire */
  gso?: GsoRequest | undefined;
  /** the checksums are known to be good (VIRTIO_NET_HDR_F_DATA_VALID on receive) */
  dataValid?: boolean | undefined;
}

/**
 * A frame in flight through the switch.
 *
 * LIFETIME: `data` may be a view into a port's scratch buffer, valid only during the
 * {@link PortHost.receive} call that carries it: a port must copy what it keeps. The switch may
 * complete a partial checksum in `data` in place and clear `meta.needsCsum` (the frame stays
 * valid for every destination).
 */
export interface Frame {
  /** the Ethernet frame (destination MAC first), without any virtio-net header */
  data: Uint8Array;
  /** offload metadata */
  meta: FrameMeta;
}

/** What a port can take on delivery. A frame that needs more is fixed up by the switch. */
export interface PortOffloads {
  /** frames with a partial checksum (NEEDS_CSUM); for a guest: GUEST_CSUM */
  csum: boolean;
  /** TCP over IPv4 GSO frames; for a guest: GUEST_TSO4 */
  tso4: boolean;
  /** TCP over IPv6 GSO frames; for a guest: GUEST_TSO6 */
  tso6: boolean;
  /** GSO frames with the ECN bit; for a guest: GUEST_ECN */
  ecn: boolean;
  /** UDP fragmentation offload frames; for a guest: GUEST_UFO */
  ufo: boolean;
  /**
   * informational: the port can spread one frame over several receive buffers (for a guest:
   * MRG_RXBUF). The switch does not use it.
   */
  mrg: boolean;
}

/** Why a frame was dropped. */
export type DropReason =
  /** the destination had no free receive buffer */
  | "no-buffer"
  /** the port is down (not connected, or no ring started) */
  | "port-down"
  /** the frame or its virtio-net header was invalid */
  | "malformed"
  /** the ring was started but disabled (SET_VRING_ENABLE 0) */
  | "disabled"
  /** the port's receive filter refused it (promiscuous mode off, MAC table, VLAN filter) */
  | "filtered"
  /** larger than the receive buffers the port has (no MRG_RXBUF and no big buffers) */
  | "too-big"
  /** unicast to a MAC learned on the port it came from */
  | "hairpin"
  /** an offload the destination cannot take and the switch cannot do in software (UFO) */
  | "offload"
  /** a GSO frame that would need more than MAX_GSO_SEGMENTS software segments */
  | "gso-segments"
  /** flooded (broadcast, multicast, unknown unicast) while no other port was up */
  | "no-destination";

/** Every drop reason, in a fixed order (for stats). */
export const DROP_REASONS: readonly DropReason[] = Object.freeze([
  "no-buffer",
  "port-down",
  "malformed",
  "disabled",
  "filtered",
  "too-big",
  "hairpin",
  "offload",
  "gso-segments",
  "no-destination",
]);

/** Counters of one port (plain data: safe to serialise). */
export interface PortCounters {
  /** frames the switch received from the port */
  rxPackets: number;
  /** bytes of those frames (Ethernet frame, no virtio-net header) */
  rxBytes: number;
  /** frames the port accepted from the switch (a software-segmented frame counts per segment) */
  txPackets: number;
  /** bytes of those frames */
  txBytes: number;
  /** frames dropped, by reason, counted on the port where the drop happened */
  drops: Record<DropReason, number>;
}

/**
 * Fresh zeroed counters.
 * @returns counters with every drop reason at 0
 */
export function newPortCounters(): PortCounters {
  const drops = {} as Record<DropReason, number>;
  for (const r of DROP_REASONS) drops[r] = 0;
  return { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0, drops };
}

/**
 * Fresh offloads record.
 * @param all value of every flag (default false)
 * @returns the offloads
 */
export function newPortOffloads(all = false): PortOffloads {
  return { csum: all, tso4: all, tso6: all, ecn: all, ufo: all, mrg: all };
}

/**
 * The switch as a port sees it: where a port hands the frames it receives from its side.
 */
export interface PortHost {
  /**
   * A frame came in on `from`: learn its source, forward it. Synchronous: `frame.data` need
   * not outlive the call.
   * @param from the port it came from
   * @param frame the frame
   */
  receive(from: SwitchPort, frame: Frame): void;
  /**
   * A batch of {@link receive} calls from one port begins (optional; a port that takes a burst
   * from its ring calls it first and {@link flush} after the burst): the host may then read
   * its clock once for the batch.
   */
  beginBatch?(): void;
  /** Let every port that took frames since the last flush publish them (one call per batch). */
  flush(): void;
  /**
   * The port's `up` changed (a port going down has its learned MACs flushed).
   * @param port the port
   */
  linkChanged(port: SwitchPort): void;
  /**
   * The MACs currently learned on a port (aged ones left out), for saving a port's state.
   * @param portName the port's name
   * @returns one entry per MAC, with ms since it was last seen
   */
  macsOnPort(portName: string): { mac: string; ageMs: number }[];
  /**
   * Move a MAC to a port as if just seen there (what a RARP does), for restoring a port's state.
   * @param mac the MAC (text or 6 bytes)
   * @param portName the port's name
   * @param ageMs ms since the MAC was last seen (default 0), e.g. the age saved with the port
   * @throws RangeError for a malformed MAC or a negative age; Error when no port has that name
   */
  learnMac(mac: Uint8Array | string, portName: string, ageMs?: number): void;
}

/**
 * A port of the switch.
 *
 * Contract:
 * - `deliver` is called synchronously from inside {@link PortHost.receive}; it copies the frame
 *   (into a guest receive buffer, a socket, ...) before returning, and returns false when it
 *   dropped the frame, after counting the reason in `counters.drops`. It does not count `tx`:
 *   the switch does, for every `true`.
 * - When `up` changes, the port calls {@link PortHost.linkChanged}.
 * - `flush`, when present, is called once per batch after deliveries (to publish used ring
 *   entries and notify the guest once, or to send a batch of datagrams).
 * - `offloads` may change while the port lives (negotiation); the switch reads it per frame.
 */
export interface SwitchPort {
  /** unique name in the switch (e.g. the socket path, or `tap0`) */
  readonly name: string;
  /** what the port can take */
  readonly offloads: PortOffloads;
  /** true while the port can pass frames */
  readonly up: boolean;
  /** counters, updated by the switch (rx/tx) and by the port (its own drops) */
  readonly counters: PortCounters;
  /**
   * Take a frame from the switch.
   * @param frame the frame, with offloads this port accepts (see {@link offloads})
   * @returns true when taken; false when dropped (the port counted the reason)
   */
  deliver(frame: Frame): boolean;
  /** Publish what was delivered since the last flush (optional). */
  flush?(): void;
  /**
   * The port was added to a switch.
   * @param host the switch
   */
  attachHost?(host: PortHost): void;
  /** The port was removed from its switch. */
  detachHost?(): void;
}
