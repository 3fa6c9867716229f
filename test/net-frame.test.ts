/**
 * Frame helpers of the switch (src/net/frame.ts, src/net/rarp.ts): MAC keys, parsing, checksum
 * completion (NEEDS_CSUM) and software TCP segmentation, checked against an independent
 * checksum written here (a plain word sum in BigInt), with fast-check properties.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";

import {
  BROADCAST_KEY,
  EtherType,
  FrameError,
  IpProto,
  TcpFlag,
  completeChecksum,
  fillL4Checksum,
  flowHash,
  formatMac,
  forEachTcpSegment,
  internetChecksum,
  macFromKey,
  macKey,
  parseFrame,
  parseMac,
  pseudoHeaderSum,
  fold16,
  segmentTcp,
  toMacBytes,
} from "../src/net/frame.js";
import { buildRarp } from "../src/net/rarp.js";

// --- an independent checksum -------------------------------------------------------------

/** One's-complement sum of 16-bit big-endian words, folded, computed with BigInt. */
function refSum(parts: Uint8Array[]): number {
  const all = Buffer.concat(parts);
  let s = 0n;
  for (let i = 0; i < all.length; i += 2) {
    const hi = all[i] as number;
    const lo = i + 1 < all.length ? (all[i + 1] as number) : 0;
    s += BigInt((hi << 8) | lo);
  }
  while (s > 0xffffn) s = (s & 0xffffn) + (s >> 16n);
  return Number(s);
}

function u16(n: number): Uint8Array {
  return Uint8Array.of(n >> 8, n & 0xff);
}

/** Pseudo-header bytes (RFC 793 §3.1 / RFC 8200 §8.1) of the IP packet at l3. */
function refPseudo(d: Uint8Array, l3: number, v6: boolean, proto: number, l4len: number) {
  if (v6) {
    const p = new Uint8Array(40);
    p.set(d.subarray(l3 + 8, l3 + 40), 0);
    new DataView(p.buffer).setUint32(32, l4len);
    p[39] = proto;
    return p;
  }
  const p = new Uint8Array(12);
  p.set(d.subarray(l3 + 12, l3 + 20), 0);
  p[9] = proto;
  p.set(u16(l4len), 10);
  return p;
}

/** True when the L4 checksum of the IP packet in `d` verifies (sum with pseudo = 0xffff). */
function l4ChecksumOk(d: Uint8Array): boolean {
  const l = parseFrame(d);
  const p = refPseudo(d, l.l3, l.ipVersion === 6, l.proto, l.end - l.l4);
  return refSum([p, d.subarray(l.l4, l.end)]) === 0xffff;
}

function ipv4HeaderOk(d: Uint8Array, l3 = 14): boolean {
  const ihl = ((d[l3] as number) & 15) * 4;
  return refSum([d.subarray(l3, l3 + ihl)]) === 0xffff;
}

// --- frame builders ----------------------------------------------------------------------

const MAC_A = parseMac("02:00:00:00:00:0a");
const MAC_B = parseMac("02:00:00:00:00:0b");

interface TcpOpts {
  v6?: boolean;
  payload: Uint8Array;
  seq?: number;
  flags?: number;
  options?: number; // TCP option bytes (multiple of 4)
  vlan?: boolean;
  id?: number;
}

/** An Ethernet + IPv4/IPv6 + TCP frame with a correct TCP checksum. */
function tcpFrame(o: TcpOpts): Uint8Array {
  const v6 = o.v6 ?? false;
  const eth = o.vlan ? 18 : 14;
  const ipLen = v6 ? 40 : 20;
  const tcpLen = 20 + (o.options ?? 0);
  const d = new Uint8Array(eth + ipLen + tcpLen + o.payload.length);
  const dv = new DataView(d.buffer);
  d.set(MAC_B, 0);
  d.set(MAC_A, 6);
  if (o.vlan) {
    dv.setUint16(12, EtherType.VLAN);
    dv.setUint16(14, 42);
  }
  dv.setUint16(eth - 2, v6 ? EtherType.IPV6 : EtherType.IPV4);
  const l3 = eth;
  if (v6) {
    d[l3] = 0x60;
    dv.setUint16(l3 + 4, tcpLen + o.payload.length);
    d[l3 + 6] = IpProto.TCP;
    d[l3 + 7] = 64;
    d.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], l3 + 8);
    d.set([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], l3 + 24);
  } else {
    d[l3] = 0x45;
    dv.setUint16(l3 + 2, ipLen + tcpLen + o.payload.length);
    dv.setUint16(l3 + 4, o.id ?? 0x1234);
    dv.setUint16(l3 + 6, 0x4000); // DF
    d[l3 + 8] = 64;
    d[l3 + 9] = IpProto.TCP;
    d.set([192, 0, 2, 1, 192, 0, 2, 2], l3 + 12);
    dv.setUint16(l3 + 10, internetChecksum(d, l3, l3 + 20));
  }
  const l4 = l3 + ipLen;
  dv.setUint16(l4, 40000);
  dv.setUint16(l4 + 2, 5201);
  dv.setUint32(l4 + 4, o.seq ?? 1000);
  dv.setUint32(l4 + 8, 77);
  d[l4 + 12] = (tcpLen / 4) << 4;
  d[l4 + 13] = o.flags ?? TcpFlag.ACK;
  dv.setUint16(l4 + 14, 65535);
  for (let i = 20; i < tcpLen; i++) d[l4 + i] = 1; // NOPs
  d.set(o.payload, l4 + tcpLen);
  fillL4Checksum(d);
  return d;
}

/** An Ethernet + IPv4/IPv6 + UDP frame with a correct checksum. */
function udpFrame(payload: Uint8Array, v6 = false): Uint8Array {
  const ipLen = v6 ? 40 : 20;
  const d = new Uint8Array(14 + ipLen + 8 + payload.length);
  const dv = new DataView(d.buffer);
  d.set(MAC_B, 0);
  d.set(MAC_A, 6);
  dv.setUint16(12, v6 ? EtherType.IPV6 : EtherType.IPV4);
  if (v6) {
    d[14] = 0x60;
    dv.setUint16(18, 8 + payload.length);
    d[20] = IpProto.UDP;
    d[21] = 64;
    d[22] = 0xfd;
    d[37] = 1;
    d[38] = 0xfd;
    d[53] = 2;
  } else {
    d[14] = 0x45;
    dv.setUint16(16, 28 + payload.length);
    d[22] = 64;
    d[23] = IpProto.UDP;
    d.set([198, 51, 100, 1, 198, 51, 100, 2], 26);
    dv.setUint16(24, internetChecksum(d, 14, 34));
  }
  const l4 = 14 + ipLen;
  dv.setUint16(l4, 5353);
  dv.setUint16(l4 + 2, 5354);
  dv.setUint16(l4 + 4, 8 + payload.length);
  d.set(payload, l4 + 8);
  fillL4Checksum(d);
  return d;
}

/** Turn a full checksum into a NEEDS_CSUM partial one, as Linux does before transmitting. */
function makePartial(d: Uint8Array): { start: number; offset: number } {
  const l = parseFrame(d);
  const off = l.proto === IpProto.TCP ? 16 : 6;
  const pseudo = fold16(pseudoHeaderSum(d, l.l3, l.ipVersion === 6, l.proto, l.end - l.l4));
  d[l.l4 + off] = pseudo >> 8;
  d[l.l4 + off + 1] = pseudo & 0xff;
  return { start: l.l4, offset: off };
}

// --- MACs ----------------------------------------------------------------------------------

test("frame: MAC keys, text and bytes round-trip", () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 6, maxLength: 6 }), (b) => {
      const k = macKey(b);
      assert.ok(k >= 0 && k <= 0xffff_ffff_ffff);
      assert.deepEqual(macFromKey(k), b);
      assert.deepEqual(parseMac(formatMac(b)), b);
      assert.deepEqual(toMacBytes(formatMac(k)), b);
    }),
  );
  assert.equal(macKey(parseMac("ff:ff:ff:ff:ff:ff")), BROADCAST_KEY);
  assert.equal(formatMac(parseMac("52-54-00-AB-cd-0f")), "52:54:00:ab:cd:0f");
  assert.throws(() => parseMac("52:54:00:12:34"), /mac=52:54:00:12:34/);
  assert.throws(() => parseMac("52:54:00:12:34:zz"), RangeError);
  assert.throws(() => toMacBytes(new Uint8Array(5)), /length=5/);
});

test("frame: RARP announcement is QEMU's 60-byte broadcast", () => {
  const f = buildRarp("52:54:00:12:34:56");
  assert.equal(f.length, 60);
  assert.deepEqual([...f.subarray(0, 6)], [255, 255, 255, 255, 255, 255]);
  assert.equal(formatMac(f.subarray(6, 12)), "52:54:00:12:34:56");
  assert.equal((f[12]! << 8) | f[13]!, EtherType.RARP);
  assert.deepEqual([...f.subarray(14, 22)], [0, 1, 8, 0, 6, 4, 0, 3]);
  assert.equal(formatMac(f.subarray(22, 28)), "52:54:00:12:34:56");
  assert.equal(formatMac(f.subarray(32, 38)), "52:54:00:12:34:56");
  assert.ok(f.subarray(38).every((b) => b === 0));
});

// --- parsing -------------------------------------------------------------------------------

test("frame: parseFrame finds the layers of IPv4, IPv6, VLAN-tagged and non-IP frames", () => {
  const v4 = tcpFrame({ payload: new Uint8Array(10) });
  const l4 = parseFrame(v4);
  assert.deepEqual(
    { ...l4 },
    {
      etherType: 0x0800,
      l3: 14,
      ipVersion: 4,
      proto: 6,
      l4: 34,
      end: 14 + 20 + 20 + 10,
      fragment: false,
    },
  );
  const v6 = tcpFrame({ payload: new Uint8Array(3), v6: true, vlan: true });
  const l6 = parseFrame(v6);
  assert.equal(l6.l3, 18);
  assert.equal(l6.ipVersion, 6);
  assert.equal(l6.l4, 58);
  assert.equal(l6.end, v6.length);
  // Ethernet padding past the IP length is not part of the packet
  const padded = new Uint8Array(v4.length + 6);
  padded.set(v4);
  assert.equal(parseFrame(padded).end, v4.length);
  const arp = new Uint8Array(60);
  arp[12] = 0x08;
  arp[13] = 0x06;
  assert.equal(parseFrame(arp).ipVersion, 0);
  // fragments
  const frag = v4.slice();
  frag[14 + 6] = 0x20; // MF
  assert.equal(parseFrame(frag).fragment, true);
});

test("frame: parseFrame rejects truncated and inconsistent headers with a FrameError", () => {
  const v4 = tcpFrame({ payload: new Uint8Array(0) });
  assert.throws(() => parseFrame(v4.subarray(0, 10)), FrameError);
  assert.throws(() => parseFrame(v4.subarray(0, 30)), /ipv4=16/);
  const badIhl = v4.slice();
  badIhl[14] = 0x44;
  assert.throws(
    () => parseFrame(badIhl),
    (e: FrameError) => e.field === "ipv4.ihl" && e.code === "ERR_VHOST_FRAME" && !e.fatal,
  );
  const badVer = v4.slice();
  badVer[14] = 0x55;
  assert.throws(
    () => parseFrame(badVer),
    (e: FrameError) => e.field === "ipv4.version",
  );
  const v6 = tcpFrame({ payload: new Uint8Array(0), v6: true });
  assert.throws(
    () => parseFrame(v6.subarray(0, 40)),
    (e: FrameError) => e.field === "ipv6",
  );
  // random bytes: parseFrame returns or throws FrameError, never anything else
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 120 }), fc.boolean(), (b, ip6) => {
      if (b.length >= 14) {
        b[12] = ip6 ? 0x86 : 0x08;
        b[13] = ip6 ? 0xdd : 0x00;
      }
      try {
        const l = parseFrame(b);
        assert.ok(l.end <= b.length);
        assert.ok(l.l4 <= l.end);
      } catch (e) {
        assert.ok(e instanceof FrameError, String(e));
      }
    }),
  );
});

// --- checksums -----------------------------------------------------------------------------

test("frame: internetChecksum agrees with an independent word sum", () => {
  fc.assert(
    fc.property(fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.nat(0xffff), (b, init) => {
      const c = internetChecksum(b, 0, b.length, init);
      assert.equal(c, ~refSum([u16(init), b]) & 0xffff);
    }),
  );
  // RFC 1071 §3 example: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d
  assert.equal(
    internetChecksum(Uint8Array.of(0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0xf7), 0, 8),
    0x220d,
  );
});

test("frame: completeChecksum finishes a NEEDS_CSUM partial checksum (TCP/UDP, v4/v6)", () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ minLength: 0, maxLength: 1500 }),
      fc.boolean(),
      fc.boolean(),
      (payload, v6, udp) => {
        const d = udp ? udpFrame(payload, v6) : tcpFrame({ payload, v6 });
        const full = d.slice();
        const cs = makePartial(d);
        assert.ok(l4ChecksumOk(full), "the builder's frame verifies");
        completeChecksum(d, cs.start, cs.offset);
        assert.ok(l4ChecksumOk(d), "verifies independently");
        // equal to the checksum computed from scratch (modulo 0 / 0xffff)
        const a = (d[cs.start + cs.offset]! << 8) | d[cs.start + cs.offset + 1]!;
        const b = (full[cs.start + cs.offset]! << 8) | full[cs.start + cs.offset + 1]!;
        assert.ok(a === b || (a === 0xffff && b === 0) || (a === 0 && b === 0xffff));
      },
    ),
  );
  const d = tcpFrame({ payload: new Uint8Array(4) });
  assert.throws(
    () => completeChecksum(d, 34, d.length),
    (e: FrameError) => e.field === "csum_start",
  );
  assert.throws(() => completeChecksum(d, -1, 0), FrameError);
});

test("frame: fillL4Checksum refuses fragments and non-TCP/UDP", () => {
  const d = tcpFrame({ payload: new Uint8Array(8) });
  d[14 + 6] = 0x20;
  assert.throws(
    () => fillL4Checksum(d),
    (e: FrameError) => e.field === "ip.fragment",
  );
  const icmp = tcpFrame({ payload: new Uint8Array(8) });
  icmp[14 + 9] = 1;
  assert.throws(
    () => fillL4Checksum(icmp),
    (e: FrameError) => e.field === "ip.proto",
  );
});

// --- segmentation --------------------------------------------------------------------------

function reassemble(segs: Uint8Array[]): { payload: Buffer; seqs: number[] } {
  const parts: Uint8Array[] = [];
  const seqs: number[] = [];
  for (const s of segs) {
    const l = parseFrame(s);
    const doff = (s[l.l4 + 12]! >> 4) * 4;
    parts.push(s.subarray(l.l4 + doff, l.end));
    seqs.push(new DataView(s.buffer, s.byteOffset).getUint32(l.l4 + 4));
  }
  return { payload: Buffer.concat(parts), seqs };
}

test("frame: TCP segmentation then reassembly gives the payload back; every segment is valid", () => {
  fc.assert(
    fc.property(
      fc.record({
        len: fc.integer({ min: 0, max: 12000 }),
        mss: fc.integer({ min: 47, max: 9000 }), // 12000 bytes in at most MAX_GSO_SEGMENTS (256) segments
        v6: fc.boolean(),
        vlan: fc.boolean(),
        options: fc.constantFrom(0, 12, 40),
        seq: fc.nat(0xffff_ffff),
        id: fc.nat(0xffff),
        fin: fc.boolean(),
        cwr: fc.boolean(),
        seed: fc.nat(255),
      }),
      (p) => {
        fc.pre(p.len / p.mss < 400);
        const payload = Uint8Array.from({ length: p.len }, (_, i) => (i * 31 + p.seed) & 0xff);
        const flags =
          TcpFlag.ACK | TcpFlag.PSH | (p.fin ? TcpFlag.FIN : 0) | (p.cwr ? TcpFlag.CWR : 0);
        const d = tcpFrame({ ...p, payload, flags });
        makePartial(d); // GSO frames come with a partial checksum
        const segs = segmentTcp(d, p.mss);
        const expected = Math.max(1, Math.ceil(p.len / p.mss));
        assert.equal(segs.length, expected);
        const r = reassemble(segs);
        assert.equal(Buffer.compare(r.payload, Buffer.from(payload)), 0, "payload");
        const hdr = d.length - p.len;
        segs.forEach((s, i) => {
          const l = parseFrame(s);
          assert.equal(l.end, s.length, "IP length covers the segment");
          assert.ok(s.length - hdr <= p.mss, "no segment above the MSS");
          assert.ok(l4ChecksumOk(s), `segment ${i}: TCP checksum`);
          if (!p.v6) {
            assert.ok(ipv4HeaderOk(s, l.l3), `segment ${i}: IPv4 header checksum`);
            assert.equal(new DataView(s.buffer).getUint16(l.l3 + 4), (p.id + i) & 0xffff);
          }
          assert.equal(r.seqs[i], (p.seq + i * p.mss) >>> 0, `segment ${i}: seq`);
          const f = s[l.l4 + 13]!;
          const last = i === segs.length - 1;
          assert.equal((f & TcpFlag.FIN) !== 0, p.fin && last, "FIN only on the last");
          assert.equal((f & TcpFlag.PSH) !== 0, last, "PSH only on the last");
          assert.equal((f & TcpFlag.CWR) !== 0, p.cwr && i === 0, "CWR only on the first");
          assert.deepEqual(s.subarray(0, 12), d.subarray(0, 12), "MACs kept");
        });
      },
    ),
    { numRuns: 150 },
  );
});

test("frame: forEachTcpSegment reuses its buffer and refuses what it cannot segment", () => {
  const d = tcpFrame({ payload: new Uint8Array(3000).fill(7) });
  const out = new Uint8Array(2000);
  const views: Uint8Array[] = [];
  const n = forEachTcpSegment(d, 1448, out, (s) => views.push(s));
  assert.equal(n, 3);
  assert.ok(
    views.every((v) => v.buffer === out.buffer),
    "segments are views into `out`",
  );
  assert.throws(
    () => forEachTcpSegment(d, 0, out, () => {}),
    (e: FrameError) => e.field === "gso_size",
  );
  assert.throws(() => forEachTcpSegment(d, 4000, new Uint8Array(100), () => {}), /scratch/);
  assert.throws(
    () => forEachTcpSegment(udpFrame(new Uint8Array(100)), 10, out, () => {}),
    (e: FrameError) => e.field === "ip.proto",
  );
  const badDoff = d.slice();
  badDoff[34 + 12] = 0x40;
  assert.throws(() => forEachTcpSegment(badDoff, 100, out, () => {}), /tcp.doff/);
});

// --- flow hash -----------------------------------------------------------------------------

test("frame: flowHash is symmetric and tells flows apart", () => {
  const a = udpFrame(new Uint8Array(20));
  const b = a.slice();
  // swap addresses and ports
  b.set(a.subarray(30, 34), 26);
  b.set(a.subarray(26, 30), 30);
  b.set(a.subarray(36, 38), 34);
  b.set(a.subarray(34, 36), 36);
  assert.equal(flowHash(a), flowHash(b));
  const hashes = new Set<number>();
  for (let port = 1000; port < 1064; port++) {
    const f = a.slice();
    new DataView(f.buffer).setUint16(34, port);
    hashes.add(flowHash(f) % 2);
  }
  assert.equal(hashes.size, 2, "64 flows land on both of two queues");
  assert.equal(flowHash(new Uint8Array(5)), 0);
});
