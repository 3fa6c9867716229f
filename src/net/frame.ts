/**
 * Ethernet / IPv4 / IPv6 / TCP / UDP helpers for the switch: MAC addresses as numbers, the
 * Internet checksum (RFC 1071) with the TCP/UDP pseudo-header (RFC 793 §3.1, RFC 768,
 * RFC 8200 §8.1), completion of a partial checksum as virtio-net's NEEDS_CSUM describes it
 * (VIRTIO 1.2 §5.1.6.2), software TCP segmentation of a GSO frame, and a symmetric flow hash.
 *
 * Everything reads bytes with explicit big-endian arithmetic (network order) and bounds-checks
 * against the frame length: frames come from guests and are not trusted.
 */

/** Ethernet header length without VLAN tags. */
export const ETH_HLEN = 14;
/** Ethernet minimum frame length without FCS. */
export const ETH_ZLEN = 60;
/** Ethertypes used here. */
export const EtherType = Object.freeze({
  IPV4: 0x0800,
  ARP: 0x0806,
  RARP: 0x8035,
  VLAN: 0x8100,
  QINQ: 0x88a8,
  IPV6: 0x86dd,
});
/** IP protocol numbers used here. */
export const IpProto = Object.freeze({
  HOPOPTS: 0,
  TCP: 6,
  UDP: 17,
  ROUTING: 43,
  FRAGMENT: 44,
  DSTOPTS: 60,
});
/** TCP flag bits (byte 13 of the TCP header). */
export const TcpFlag = Object.freeze({
  FIN: 0x01,
  SYN: 0x02,
  RST: 0x04,
  PSH: 0x08,
  ACK: 0x10,
  URG: 0x20,
  ECE: 0x40,
  CWR: 0x80,
});

/**
 * A frame that cannot be parsed or processed; names the field and the value.
 *
 * Shaped like `VhostUserError` (`code`, `field`, `value`, `fatal`) without deriving from
 * it: its code is not in the closed `VhostErrorCode` union of src/protocol/errors.ts.
 */
export class FrameError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOST_FRAME" as const;
  /** never fatal: one frame is dropped, the port goes on */
  readonly fatal = false as const;
  /** the field that was wrong, e.g. `"ipv4.ihl"` */
  readonly field: string;
  /** the offending value */
  readonly value: number;

  /**
   * @param field the field
   * @param value its value
   * @param message what is wrong
   */
  constructor(field: string, value: number, message: string) {
    super(`frame: ${message} (${field}=${value})`);
    this.name = "FrameError";
    this.field = field;
    this.value = value;
  }
}

// --- MAC addresses -----------------------------------------------------------------------

/**
 * A MAC address as a number (48 bits fit a double exactly), for map keys.
 * @param b bytes
 * @param off offset of the first MAC byte
 * @returns the key
 */
export function macKey(b: Uint8Array, off = 0): number {
  return (
    ((b[off] as number) * 256 + (b[off + 1] as number)) * 4294967296 +
    ((((b[off + 2] as number) << 24) |
      ((b[off + 3] as number) << 16) |
      ((b[off + 4] as number) << 8) |
      (b[off + 5] as number)) >>>
      0)
  );
}

/**
 * The six bytes of a MAC key.
 * @param key a value from {@link macKey}
 * @returns the bytes
 */
export function macFromKey(key: number): Uint8Array {
  const hi = Math.floor(key / 4294967296);
  const lo = key >>> 0;
  return Uint8Array.of(
    hi >>> 8,
    hi & 0xff,
    lo >>> 24,
    (lo >>> 16) & 0xff,
    (lo >>> 8) & 0xff,
    lo & 0xff,
  );
}

/**
 * Format a MAC address as `52:54:00:12:34:56`.
 * @param mac six bytes, or a key from {@link macKey}
 * @returns the text
 */
export function formatMac(mac: Uint8Array | number): string {
  const b = typeof mac === "number" ? macFromKey(mac) : mac;
  let s = "";
  for (let i = 0; i < 6; i++) {
    if (i > 0) s += ":";
    s += (b[i] ?? 0).toString(16).padStart(2, "0");
  }
  return s;
}

/**
 * Parse `52:54:00:12:34:56` (or with `-`).
 * @param text the address
 * @returns six bytes
 * @throws RangeError naming the value when it is not six hex bytes
 */
export function parseMac(text: string): Uint8Array {
  const parts = text.split(/[:-]/);
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{1,2}$/.test(p))) {
    throw new RangeError(`malformed MAC address (mac=${text})`);
  }
  return Uint8Array.from(parts, (p) => parseInt(p, 16));
}

/**
 * A MAC given as text, bytes or key, as bytes.
 * @param mac the address
 * @returns six bytes (a copy)
 * @throws RangeError for a malformed address
 */
export function toMacBytes(mac: string | Uint8Array | number): Uint8Array {
  if (typeof mac === "string") return parseMac(mac);
  if (typeof mac === "number") return macFromKey(mac);
  if (mac.length !== 6) throw new RangeError(`MAC address must be 6 bytes (length=${mac.length})`);
  return Uint8Array.from(mac);
}

/** Key of ff:ff:ff:ff:ff:ff. */
export const BROADCAST_KEY = 0xffff_ffff_ffff;

// --- checksums ---------------------------------------------------------------------------

/**
 * The 16-bit one's-complement sum of bytes [start, end) (big-endian words; an odd last byte is
 * padded with zero), not folded. RFC 1071.
 * @param d bytes
 * @param start first byte
 * @param end one past the last byte
 * @param initial a sum to add (e.g. the pseudo-header)
 * @returns the unfolded sum (a non-negative number below 2^53)
 */
export function sum16(d: Uint8Array, start: number, end: number, initial = 0): number {
  let s = initial;
  let i = start;
  const even = end - ((end - start) & 1);
  // Four words per turn: fewer loop iterations for large frames.
  for (; i + 8 <= even; i += 8) {
    s +=
      (((d[i] as number) << 8) | (d[i + 1] as number)) +
      (((d[i + 2] as number) << 8) | (d[i + 3] as number)) +
      (((d[i + 4] as number) << 8) | (d[i + 5] as number)) +
      (((d[i + 6] as number) << 8) | (d[i + 7] as number));
  }
  for (; i < even; i += 2) s += ((d[i] as number) << 8) | (d[i + 1] as number);
  if (i < end) s += (d[i] as number) << 8;
  return s;
}

/**
 * Fold a sum to 16 bits (end-around carry).
 * @param sum an unfolded sum from {@link sum16}
 * @returns the folded sum, 0..0xffff
 */
export function fold16(sum: number): number {
  let s = sum;
  while (s > 0xffff) s = (s % 65536) + Math.floor(s / 65536);
  return s;
}

/**
 * The Internet checksum of bytes [start, end): the one's complement of the folded sum.
 * @param d bytes
 * @param start first byte
 * @param end one past the last byte
 * @param initial a sum to add first
 * @returns the checksum to store, 0..0xffff
 */
export function internetChecksum(d: Uint8Array, start: number, end: number, initial = 0): number {
  return ~fold16(sum16(d, start, end, initial)) & 0xffff;
}

function rd16(d: Uint8Array, o: number): number {
  return ((d[o] as number) << 8) | (d[o + 1] as number);
}

function wr16(d: Uint8Array, o: number, v: number): void {
  d[o] = (v >>> 8) & 0xff;
  d[o + 1] = v & 0xff;
}

function rd32(d: Uint8Array, o: number): number {
  return (
    (((d[o] as number) << 24) |
      ((d[o + 1] as number) << 16) |
      ((d[o + 2] as number) << 8) |
      (d[o + 3] as number)) >>>
    0
  );
}

function wr32(d: Uint8Array, o: number, v: number): void {
  d[o] = (v >>> 24) & 0xff;
  d[o + 1] = (v >>> 16) & 0xff;
  d[o + 2] = (v >>> 8) & 0xff;
  d[o + 3] = v & 0xff;
}

/**
 * Complete a partial checksum as virtio-net's NEEDS_CSUM asks: the one's-complement sum of
 * bytes [csumStart, end of frame), the field at csumStart + csumOffset included (it holds the
 * pseudo-header sum), is complemented and stored in that field; 0 is stored as 0xffff (the
 * UDP rule, harmless for TCP). VIRTIO 1.2 §5.1.6.2.
 * @param d the frame
 * @param csumStart csum_start
 * @param csumOffset csum_offset
 * @param end one past the last byte covered (default: the frame's end)
 * @throws FrameError when the field lies outside the frame
 */
export function completeChecksum(
  d: Uint8Array,
  csumStart: number,
  csumOffset: number,
  end = d.length,
): void {
  const at = csumStart + csumOffset;
  if (csumStart < 0 || at + 2 > end || end > d.length) {
    throw new FrameError(
      "csum_start",
      csumStart,
      `checksum field at ${at} outside the frame of ${end} bytes`,
    );
  }
  const c = internetChecksum(d, csumStart, end);
  wr16(d, at, c === 0 ? 0xffff : c);
}

/**
 * The pseudo-header sum of an IPv4 or IPv6 packet (RFC 793 §3.1, RFC 8200 §8.1), unfolded.
 * @param d the frame
 * @param l3 offset of the IP header
 * @param v6 true for IPv6
 * @param proto upper-layer protocol
 * @param l4len upper-layer length (header + payload)
 * @returns the sum
 */
export function pseudoHeaderSum(
  d: Uint8Array,
  l3: number,
  v6: boolean,
  proto: number,
  l4len: number,
): number {
  if (v6) {
    return sum16(d, l3 + 8, l3 + 40) + Math.floor(l4len / 65536) + (l4len & 0xffff) + proto;
  }
  return sum16(d, l3 + 12, l3 + 20) + proto + l4len;
}

/**
 * Compute and store the IPv4 header checksum.
 * @param d the frame
 * @param l3 offset of the IPv4 header
 */
export function fillIpv4HeaderChecksum(d: Uint8Array, l3: number): void {
  const ihl = ((d[l3] as number) & 0x0f) * 4;
  wr16(d, l3 + 10, 0);
  wr16(d, l3 + 10, internetChecksum(d, l3, l3 + ihl));
}

// --- parsing -----------------------------------------------------------------------------

/** Where the layers of a frame start (see {@link parseFrame}). */
export interface FrameLayout {
  /** ethertype after any VLAN tags */
  etherType: number;
  /** offset of the L3 header */
  l3: number;
  /** 4, 6, or 0 when not IP */
  ipVersion: 0 | 4 | 6;
  /** IP protocol / IPv6 upper-layer next header (-1 when not IP or unknown) */
  proto: number;
  /** offset of the L4 header (-1 when not IP) */
  l4: number;
  /** end of the IP packet (from the IP length field, bounded by the frame), or the frame length */
  end: number;
  /** true for an IP fragment (IPv4 MF/offset, IPv6 fragment header) */
  fragment: boolean;
}

/**
 * Parse the Ethernet, VLAN (up to two tags) and IP headers of a frame.
 * @param d the frame
 * @returns the layout
 * @throws FrameError naming the field for a truncated or inconsistent header
 */
export function parseFrame(d: Uint8Array): FrameLayout {
  if (d.length < ETH_HLEN)
    throw new FrameError("length", d.length, "shorter than an Ethernet header");
  let off = 12;
  let et = rd16(d, off);
  for (let tags = 0; (et === EtherType.VLAN || et === EtherType.QINQ) && tags < 2; tags++) {
    off += 4;
    if (off + 2 > d.length) throw new FrameError("vlan", d.length, "truncated VLAN tag");
    et = rd16(d, off);
  }
  const l3 = off + 2;
  const out: FrameLayout = {
    etherType: et,
    l3,
    ipVersion: 0,
    proto: -1,
    l4: -1,
    end: d.length,
    fragment: false,
  };
  if (et === EtherType.IPV4) {
    if (l3 + 20 > d.length) throw new FrameError("ipv4", d.length - l3, "truncated IPv4 header");
    const vihl = d[l3] as number;
    const ihl = (vihl & 0x0f) * 4;
    if (vihl >> 4 !== 4) throw new FrameError("ipv4.version", vihl >> 4, "not IPv4");
    if (ihl < 20 || l3 + ihl > d.length)
      throw new FrameError("ipv4.ihl", ihl, "bad IPv4 header length");
    const tot = rd16(d, l3 + 2);
    // A total length of 0 (GSO frames beyond 64 KiB) or past the frame: use the frame.
    if (tot >= ihl && l3 + tot <= d.length) out.end = l3 + tot;
    const frag = rd16(d, l3 + 6);
    out.fragment = (frag & 0x3fff) !== 0;
    out.ipVersion = 4;
    out.proto = d[l3 + 9] as number;
    out.l4 = l3 + ihl;
  } else if (et === EtherType.IPV6) {
    if (l3 + 40 > d.length) throw new FrameError("ipv6", d.length - l3, "truncated IPv6 header");
    if ((d[l3] as number) >> 4 !== 6)
      throw new FrameError("ipv6.version", (d[l3] as number) >> 4, "not IPv6");
    const plen = rd16(d, l3 + 4);
    if (plen > 0 && l3 + 40 + plen <= d.length) out.end = l3 + 40 + plen;
    let nh = d[l3 + 6] as number;
    let at = l3 + 40;
    for (let n = 0; n < 8; n++) {
      if (nh === IpProto.HOPOPTS || nh === IpProto.ROUTING || nh === IpProto.DSTOPTS) {
        if (at + 8 > out.end) throw new FrameError("ipv6.ext", nh, "truncated extension header");
        const len = ((d[at + 1] as number) + 1) * 8;
        nh = d[at] as number;
        at += len;
      } else if (nh === IpProto.FRAGMENT) {
        if (at + 8 > out.end) throw new FrameError("ipv6.frag", nh, "truncated fragment header");
        out.fragment = true;
        nh = d[at] as number;
        at += 8;
      } else {
        break;
      }
    }
    if (at > out.end) throw new FrameError("ipv6.ext", at, "extension headers past the packet");
    out.ipVersion = 6;
    out.proto = nh;
    out.l4 = at;
  }
  return out;
}

/**
 * Compute and store the TCP or UDP checksum of an IP packet from scratch (pseudo-header
 * included). UDP over IPv4 with a computed 0 stores 0xffff.
 * @param d the frame
 * @returns the layout that was used
 * @throws FrameError when the frame is not TCP/UDP over IP, or is a fragment, or is truncated
 */
export function fillL4Checksum(d: Uint8Array): FrameLayout {
  const l = parseFrame(d);
  if (l.ipVersion === 0) throw new FrameError("ethertype", l.etherType, "not IP");
  if (l.fragment) throw new FrameError("ip.fragment", 1, "cannot checksum a fragment");
  const at = l.proto === IpProto.TCP ? 16 : l.proto === IpProto.UDP ? 6 : -1;
  if (at < 0) throw new FrameError("ip.proto", l.proto, "not TCP or UDP");
  const l4len = l.end - l.l4;
  if (l4len < (l.proto === IpProto.TCP ? 20 : 8))
    throw new FrameError("l4.length", l4len, "truncated L4 header");
  wr16(d, l.l4 + at, 0);
  const c = internetChecksum(
    d,
    l.l4,
    l.end,
    pseudoHeaderSum(d, l.l3, l.ipVersion === 6, l.proto, l4len),
  );
  wr16(d, l.l4 + at, c === 0 && l.proto === IpProto.UDP ? 0xffff : c);
  return l;
}

// --- segmentation ------------------------------------------------------------------------

/**
 * Most segments one GSO frame may be cut into in software: a 64 KiB frame at an MSS of 256
 * bytes. A frame that would need more (a degenerate gso_size) is refused, so one guest frame
 * costs the event loop a bounded amount of work (Linux likewise bounds GSO at 64 KiB and drops
 * packets whose gso_size is too small).
 */
export const MAX_GSO_SEGMENTS = 256;

/**
 * Segment a TCP GSO frame (TCP over IPv4 or IPv6) in software, as a NIC's TSO would: the
 * payload is cut into `gsoSize`-byte pieces; each segment gets the headers with the IP length
 * fixed, the IPv4 id incremented per segment and its header checksum recomputed, the TCP
 * sequence number advanced, FIN and PSH kept only on the last segment, CWR only on the first,
 * and a full TCP checksum. Each segment is built in `out` and passed to `emit` before the next
 * one overwrites it.
 * @param d the GSO frame (its checksum fields may be partial or anything: they are recomputed)
 * @param gsoSize payload bytes per segment (> 0)
 * @param out scratch buffer, at least headers + gsoSize bytes
 * @param emit called with each segment (a view into `out`, valid until the call returns)
 * @returns the number of segments
 * @throws FrameError field `gso_segments` when more than {@link MAX_GSO_SEGMENTS} are needed
 * @throws FrameError when the frame is not TCP over IP, is a fragment, or the sizes are wrong
 */
export function forEachTcpSegment(
  d: Uint8Array,
  gsoSize: number,
  out: Uint8Array,
  emit: (segment: Uint8Array) => void,
): number {
  if (!Number.isInteger(gsoSize) || gsoSize <= 0)
    throw new FrameError("gso_size", gsoSize, "must be positive");
  const l = parseFrame(d);
  if (l.ipVersion === 0) throw new FrameError("ethertype", l.etherType, "TSO frame is not IP");
  if (l.proto !== IpProto.TCP) throw new FrameError("ip.proto", l.proto, "TSO frame is not TCP");
  if (l.fragment) throw new FrameError("ip.fragment", 1, "TSO frame is a fragment");
  if (l.l4 + 20 > l.end) throw new FrameError("tcp", l.end - l.l4, "truncated TCP header");
  const doff = ((d[l.l4 + 12] as number) >> 4) * 4;
  if (doff < 20 || l.l4 + doff > l.end)
    throw new FrameError("tcp.doff", doff, "bad TCP header length");
  const hdrLen = l.l4 + doff;
  const payload = l.end - hdrLen;
  if (hdrLen + Math.min(gsoSize, Math.max(payload, 0)) > out.length) {
    throw new FrameError(
      "gso_size",
      gsoSize,
      `segment larger than the ${out.length}-byte scratch buffer`,
    );
  }
  const v6 = l.ipVersion === 6;
  const seq0 = rd32(d, l.l4 + 4);
  const id0 = v6 ? 0 : rd16(d, l.l3 + 4);
  const flags0 = d[l.l4 + 13] as number;
  const count = payload <= 0 ? 1 : Math.ceil(payload / gsoSize);
  if (count > MAX_GSO_SEGMENTS) {
    // A guest-chosen gso_size of 1 would cost tens of thousands of segments for one frame.
    throw new FrameError(
      "gso_segments",
      count,
      `gso_size ${gsoSize} would cut ${payload} bytes into more than ${MAX_GSO_SEGMENTS} segments`,
    );
  }
  out.set(d.subarray(0, hdrLen), 0);
  for (let i = 0; i < count; i++) {
    const pos = i * gsoSize;
    const n = Math.max(0, Math.min(gsoSize, payload - pos));
    if (n > 0) out.set(d.subarray(hdrLen + pos, hdrLen + pos + n), hdrLen);
    const segLen = hdrLen + n;
    if (v6) {
      wr16(out, l.l3 + 4, segLen - l.l3 - 40);
    } else {
      wr16(out, l.l3 + 2, segLen - l.l3);
      wr16(out, l.l3 + 4, (id0 + i) & 0xffff);
      fillIpv4HeaderChecksum(out, l.l3);
    }
    wr32(out, l.l4 + 4, (seq0 + pos) >>> 0);
    let flags = flags0;
    if (i < count - 1) flags &= ~(TcpFlag.FIN | TcpFlag.PSH);
    if (i > 0) flags &= ~TcpFlag.CWR;
    out[l.l4 + 13] = flags;
    wr16(out, l.l4 + 16, 0);
    const l4len = segLen - l.l4;
    wr16(
      out,
      l.l4 + 16,
      internetChecksum(out, l.l4, segLen, pseudoHeaderSum(out, l.l3, v6, IpProto.TCP, l4len)),
    );
    emit(out.subarray(0, segLen));
  }
  return count;
}

/**
 * Segment a TCP GSO frame into new arrays (see {@link forEachTcpSegment}).
 * @param d the GSO frame
 * @param gsoSize payload bytes per segment
 * @returns the segments
 * @throws FrameError as {@link forEachTcpSegment}
 */
export function segmentTcp(d: Uint8Array, gsoSize: number): Uint8Array[] {
  const segs: Uint8Array[] = [];
  const out = new Uint8Array(Math.min(d.length, 65536 + 256) + gsoSize);
  forEachTcpSegment(d, gsoSize, out, (s) => segs.push(Uint8Array.from(s)));
  return segs;
}

// --- flow hash ---------------------------------------------------------------------------

function mix32(h: number): number {
  let x = h | 0;
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
}

/**
 * A symmetric hash of a frame's flow (both directions of a connection hash alike): IP
 * addresses, protocol and TCP/UDP ports for IP, the MAC pair otherwise. No allocation.
 * @param d the frame
 * @returns a 32-bit hash
 */
export function flowHash(d: Uint8Array): number {
  const len = d.length;
  if (len < ETH_HLEN) return 0;
  let off = 12;
  let et = rd16(d, off);
  for (
    let tags = 0;
    (et === EtherType.VLAN || et === EtherType.QINQ) && tags < 2 && off + 6 <= len;
    tags++
  ) {
    off += 4;
    et = rd16(d, off);
  }
  const l3 = off + 2;
  let h = 0;
  let proto = -1;
  let l4 = -1;
  if (et === EtherType.IPV4 && l3 + 20 <= len) {
    h = rd32(d, l3 + 12) ^ rd32(d, l3 + 16);
    proto = d[l3 + 9] as number;
    if ((rd16(d, l3 + 6) & 0x3fff) === 0) l4 = l3 + ((d[l3] as number) & 0x0f) * 4;
  } else if (et === EtherType.IPV6 && l3 + 40 <= len) {
    for (let i = 0; i < 16; i += 4) h ^= rd32(d, l3 + 8 + i) ^ rd32(d, l3 + 24 + i);
    proto = d[l3 + 6] as number;
    l4 = l3 + 40;
  } else {
    h = rd32(d, 0) ^ rd32(d, 6) ^ rd16(d, 4) ^ rd16(d, 10);
    return mix32(h ^ et);
  }
  if ((proto === IpProto.TCP || proto === IpProto.UDP) && l4 >= 0 && l4 + 4 <= len) {
    h ^= Math.imul(rd16(d, l4) ^ rd16(d, l4 + 2), 0x9e3779b1);
  }
  return mix32(h ^ (proto << 24));
}
