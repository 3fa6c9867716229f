/**
 * vhost-user-net ports of the switch (src/net/virtio-net.ts) with vhostkit front-ends as the
 * guests, over real Unix sockets and memfd guest memory: learning and flooding with exact
 * counts and intact bytes on split and packed rings, MRG_RXBUF on and off, two queue pairs,
 * the control queue, offloads passed through or done in software, RARP, ports going up and
 * down, and misbehaving front-ends that only hurt their own port.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import fc from "fast-check";
import { join } from "node:path";

import { native } from "../src/native.js";
import { FrontendRequest, VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import type { Gpa } from "../src/memory/address.js";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from "../src/virtq/layout.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort, VhostUserPortOptions } from "../src/net/virtio-net.js";
import {
  EtherType,
  IpProto,
  fold16,
  formatMac,
  internetChecksum,
  parseFrame,
  parseMac,
  pseudoHeaderSum,
} from "../src/net/frame.js";
import {
  CTRL_MAX_COMMAND,
  CtrlClass,
  CtrlMac,
  CtrlMq,
  MAC_TABLE_ENTRIES,
} from "../src/net/ctrl.js";
import { LineLogger, openFds, sleep, until } from "./helpers.js";

const F = VirtioFeature;
const BASE = featureSet(F.VERSION_1, F.RING_EVENT_IDX, F.STATUS);
const BCAST = "ff:ff:ff:ff:ff:ff";

const mac = (n: number): string => `02:00:00:00:00:${n.toString(16).padStart(2, "0")}`;

/** An Ethernet frame with a sequence number at offset 14 and a pattern after it. */
function ethFrame(dst: string, src: string, seq: number, len = 60 + (seq % 200)): Uint8Array {
  const f = new Uint8Array(len);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  new DataView(f.buffer).setUint32(14, seq, true);
  for (let i = 18; i < len; i++) f[i] = (i * 7 + seq) & 0xff;
  return f;
}

/** UDP/IPv4 frame of flow `port` (the flow hash spreads them over queue pairs). */
function udpFrame(dst: string, src: string, port: number, seq: number): Uint8Array {
  const d = new Uint8Array(14 + 20 + 8 + 32);
  const dv = new DataView(d.buffer);
  d.set(parseMac(dst), 0);
  d.set(parseMac(src), 6);
  dv.setUint16(12, EtherType.IPV4);
  d[14] = 0x45;
  dv.setUint16(16, 20 + 8 + 32);
  d[22] = 64;
  d[23] = IpProto.UDP;
  d.set([198, 51, 100, 1, 198, 51, 100, 2], 26);
  dv.setUint16(24, internetChecksum(d, 14, 34));
  dv.setUint16(34, port);
  dv.setUint16(36, 9);
  dv.setUint16(38, 40);
  dv.setUint32(42, seq);
  return d;
}

/** TCP/IPv4 frame of `len` payload bytes with a partial checksum (what a guest sends for TSO). */
function tcpPartialFrame(dst: string, src: string, len: number): Uint8Array {
  const d = new Uint8Array(14 + 20 + 20 + len);
  const dv = new DataView(d.buffer);
  d.set(parseMac(dst), 0);
  d.set(parseMac(src), 6);
  dv.setUint16(12, EtherType.IPV4);
  d[14] = 0x45;
  dv.setUint16(16, 40 + len);
  dv.setUint16(18, 0x100);
  d[22] = 64;
  d[23] = IpProto.TCP;
  d.set([192, 0, 2, 1, 192, 0, 2, 2], 26);
  dv.setUint16(24, internetChecksum(d, 14, 34));
  dv.setUint16(34, 40000);
  dv.setUint16(36, 5201);
  dv.setUint32(38, 1_000_000);
  d[46] = 0x50;
  d[47] = 0x18;
  dv.setUint16(48, 512);
  for (let i = 0; i < len; i++) d[54 + i] = (i * 11 + 3) & 0xff;
  dv.setUint16(50, fold16(pseudoHeaderSum(d, 14, false, IpProto.TCP, 20 + len)));
  return d;
}

/** The IPv6 version of {@link tcpPartialFrame}. */
function tcp6PartialFrame(dst: string, src: string, len: number): Uint8Array {
  const d = new Uint8Array(14 + 40 + 20 + len);
  const dv = new DataView(d.buffer);
  d.set(parseMac(dst), 0);
  d.set(parseMac(src), 6);
  dv.setUint16(12, EtherType.IPV6);
  d[14] = 0x60;
  dv.setUint16(18, 20 + len);
  d[20] = IpProto.TCP;
  d[21] = 64;
  d[22] = 0xfd;
  d[37] = 1;
  d[38] = 0xfd;
  d[53] = 2;
  dv.setUint32(58, 7);
  d[66] = 0x50;
  d[67] = 0x10;
  for (let i = 0; i < len; i++) d[74 + i] = (i * 5 + 1) & 0xff;
  dv.setUint16(70, fold16(pseudoHeaderSum(d, 14, true, IpProto.TCP, 20 + len)));
  return d;
}

function tcpChecksumOk(d: Uint8Array): boolean {
  const l = parseFrame(d);
  const stored = (d[l.l4 + 16]! << 8) | d[l.l4 + 17]!;
  const c = d.slice();
  c[l.l4 + 16] = 0;
  c[l.l4 + 17] = 0;
  const want = internetChecksum(c, l.l4, l.end, pseudoHeaderSum(c, l.l3, false, 6, l.end - l.l4));
  return stored === want || (stored === 0xffff && want === 0);
}

function ipv4HeaderOk(d: Uint8Array): boolean {
  return internetChecksum(d, 14, 34) === 0;
}

function seqOf(f: Uint8Array): number {
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getUint32(14, true);
}

/** A received frame with its virtio-net header. */
interface Rx {
  hdr: Uint8Array;
  frame: Uint8Array;
}

interface GuestOptions {
  name: string;
  features?: bigint;
  pairs?: number;
  ctrl?: boolean;
  ringSize?: number;
  bufferSize?: number;
  ramSize?: number;
}

/** A vhostkit front-end playing a guest with a virtio-net driver. */
class Guest {
  readonly pending = new Map<number, { hdr: Uint8Array; parts: Uint8Array[]; want: number }>();
  readonly received: Rx[][];
  private constructor(
    readonly fe: VhostUserFrontend,
    readonly ram: GuestRam,
    readonly queues: FrontendQueue[],
    readonly pairs: number,
    readonly mrg: boolean,
  ) {
    this.received = Array.from({ length: pairs }, () => []);
  }

  static async attach(path: string, o: GuestOptions): Promise<Guest> {
    const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
    const ram = GuestRam.create({ size: o.ramSize ?? 8 << 20, name: `nd-${o.name}` });
    try {
      const pairs = o.pairs ?? 1;
      const wanted = (o.features ?? BASE) | (pairs > 1 ? featureSet(F.NET_MQ) : 0n);
      const n = await fe.negotiate({
        features: wanted | (o.ctrl ? featureSet(F.CTRL_VQ, F.CTRL_RX, F.GUEST_ANNOUNCE) : 0n),
      });
      const count = 2 * pairs + (o.ctrl ? 1 : 0);
      const specs = Array.from({ length: count }, () => ({
        size: o.ringSize ?? 256,
        bufferSize: o.bufferSize ?? 2048,
      }));
      const queues = await fe.start(ram, specs);
      return new Guest(fe, ram, queues, pairs, (n.features & featureSet(F.MRG_RXBUF)) !== 0n);
    } catch (err) {
      fe.close();
      ram.close();
      throw err;
    }
  }

  rxq(pair = 0): FrontendQueue {
    return this.queues[2 * pair] as FrontendQueue;
  }

  txq(pair = 0): FrontendQueue {
    return this.queues[2 * pair + 1] as FrontendQueue;
  }

  get ctrlq(): FrontendQueue {
    return this.queues[2 * this.pairs] as FrontendQueue;
  }

  /** Keep every receive ring full of buffers of `size` bytes. */
  refill(size?: number): void {
    for (let p = 0; p < this.pairs; p++) {
      const q = this.rxq(p);
      const room = q.size - q.outstanding;
      if (room > 0) q.postRxBuffers(room, size);
    }
  }

  /** Transmit frames on a pair (zero virtio-net header), reclaiming as needed. */
  async send(frames: Uint8Array[], pair = 0): Promise<void> {
    const q = this.txq(pair);
    let i = 0;
    const end = Date.now() + 5000;
    while (i < frames.length) {
      let added = 0;
      while (i < frames.length && q.addFrame(frames[i] as Uint8Array) !== null) {
        i++;
        added++;
      }
      if (added > 0) q.kick();
      if (i < frames.length) {
        if (Date.now() > end) throw new Error(`send: ${i} of ${frames.length} queued`);
        await sleep(1);
        q.reclaim();
      }
    }
  }

  /** Transmit one frame with the given virtio-net header. */
  sendWithHeader(hdr: Uint8Array, frame: Uint8Array, pair = 0): void {
    const buf = new Uint8Array(hdr.length + frame.length);
    buf.set(hdr);
    buf.set(frame, hdr.length);
    const at = this.ram.alloc(buf.length, 64);
    this.ram.write(at, buf);
    const q = this.txq(pair);
    assert.notEqual(q.add([{ gpa: at, len: buf.length, writable: false }]), null);
    q.kick();
  }

  /** Take what the device wrote into the receive rings (merging MRG_RXBUF buffers). */
  collect(): void {
    for (let p = 0; p < this.pairs; p++) {
      const q = this.rxq(p);
      for (let u = q.getUsed(); u !== null; u = q.getUsed()) {
        const data = u.data ?? new Uint8Array(0);
        let cur = this.pending.get(p);
        // A buffer given back unused (len 0) is dropped, as Linux's driver does.
        if (cur === undefined && data.length < 12) continue;
        if (cur === undefined) {
          const hdr = data.slice(0, 12);
          const want = this.mrg ? hdr[10]! | (hdr[11]! << 8) : 1;
          cur = { hdr, parts: [data.subarray(12)], want };
        } else {
          cur.parts.push(data);
        }
        if (cur.parts.length >= cur.want) {
          this.pending.delete(p);
          (this.received[p] as Rx[]).push({
            hdr: cur.hdr,
            frame: new Uint8Array(Buffer.concat(cur.parts)),
          });
        } else {
          this.pending.set(p, cur);
        }
      }
    }
  }

  /** Every frame received so far on every pair, in arrival order per pair. */
  frames(): Uint8Array[] {
    this.collect();
    return this.received.flat().map((r) => r.frame);
  }

  count(): number {
    this.collect();
    return this.received.reduce((n, r) => n + r.length, 0);
  }

  clear(): void {
    this.collect();
    for (const r of this.received) r.length = 0;
  }

  /** Send a control command and return its ack. */
  async control(bytes: Uint8Array): Promise<number> {
    const q = this.ctrlq;
    const cmd = this.ram.alloc(bytes.length, 16);
    this.ram.write(cmd, bytes);
    const ack = this.ram.alloc(1, 16);
    this.ram.write(ack, Uint8Array.of(0xee));
    assert.notEqual(
      q.add([
        { gpa: cmd, len: bytes.length, writable: false },
        { gpa: ack, len: 1, writable: true },
      ]),
      null,
    );
    q.kick();
    await q.waitForUsed(3000);
    const u = q.getUsed();
    assert.equal(u?.len, 1, "one ack byte written");
    return this.ram.read(ack, 1)[0] as number;
  }

  close(): void {
    this.fe.close();
    this.ram.close();
  }
}

interface Bench {
  dir: string;
  sw: Switch;
  log: LineLogger;
  ports: VhostUserPort[];
  guests: Guest[];
  add(name: string, opts?: Partial<VhostUserPortOptions>): VhostUserPort;
  close(): void;
}

function bench(): Bench {
  const dir = mkdtempSync(join(tmpdir(), "vk-netdev-"));
  const log = new LineLogger();
  const sw = new Switch({ logger: log });
  const b: Bench = {
    dir,
    sw,
    log,
    ports: [],
    guests: [],
    add(name, opts = {}) {
      const p = addVhostUserPort(sw, { path: join(dir, `${name}.sock`), logger: log, ...opts });
      b.ports.push(p);
      return p;
    },
    close() {
      for (const g of b.guests) g.close();
      for (const p of b.ports) p.close();
      sw.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return b;
}

async function attach(b: Bench, port: VhostUserPort, o: GuestOptions): Promise<Guest> {
  const g = await Guest.attach(port.server.path, o);
  b.guests.push(g);
  return g;
}

/** Wait until `g` has `n` frames, then a little more to see that no extra arrives. */
async function expectCount(g: Guest, n: number, what: string, refill = true): Promise<void> {
  await until(() => {
    if (refill) g.refill();
    return g.count() >= n;
  }, `${what}: ${n} frames (have ${g.count()})`);
  await sleep(20);
  assert.equal(g.count(), n, what);
}

/** Send in chunks no larger than a receive ring, waiting until every receiver has each chunk. */
async function transfer(
  from: Guest,
  to: Guest[],
  frames: Uint8Array[],
  chunk = 100,
): Promise<void> {
  const base = to.map((g) => g.count());
  for (let i = 0; i < frames.length; i += chunk) {
    await from.send(frames.slice(i, i + chunk));
    const want = Math.min(i + chunk, frames.length);
    for (const [k, g] of to.entries()) {
      await until(
        () => {
          g.refill();
          return g.count() >= (base[k] as number) + want;
        },
        `${want} of ${frames.length} frames (have ${g.count() - (base[k] as number)})`,
      );
    }
  }
}

function assertSame(got: Uint8Array[], sent: Uint8Array[], what: string): void {
  assert.equal(got.length, sent.length, `${what}: count`);
  for (let i = 0; i < sent.length; i++) {
    if (Buffer.compare(got[i] as Uint8Array, sent[i] as Uint8Array) !== 0) {
      assert.fail(`${what}: frame ${i} differs (seq ${seqOf(got[i]!)} vs ${seqOf(sent[i]!)})`);
    }
  }
}

const FDS_AT_START = openFds();

// --- forwarding ----------------------------------------------------------------------------

for (const packed of [false, true]) {
  for (const mrg of [true, false]) {
    test(`device: learning and flooding, exact counts (${packed ? "packed" : "split"}, MRG_RXBUF ${mrg ? "on" : "off"})`, async () => {
      const b = bench();
      try {
        const feats =
          BASE | (packed ? featureSet(F.RING_PACKED) : 0n) | (mrg ? featureSet(F.MRG_RXBUF) : 0n);
        const [pa, pb, pc] = ["a", "b", "c"].map((n) => b.add(n)) as [
          VhostUserPort,
          VhostUserPort,
          VhostUserPort,
        ];
        const A = await attach(b, pa, { name: "a", features: feats });
        const B = await attach(b, pb, { name: "b", features: feats });
        const C = await attach(b, pc, { name: "c", features: feats });
        assert.equal(A.txq().packed, packed);
        for (const g of [A, B, C]) g.refill();
        await until(() => [pa, pb, pc].every((p) => p.device.up), "ports up");
        assert.equal(pa.device.offloads.mrg, mrg);

        // broadcast from each: floods to the two others
        const hello = [
          ethFrame(BCAST, mac(0xa), 1),
          ethFrame(BCAST, mac(0xb), 2),
          ethFrame(BCAST, mac(0xc), 3),
        ];
        await A.send([hello[0]!]);
        await expectCount(B, 1, "B got A's broadcast");
        await B.send([hello[1]!]);
        await C.send([hello[2]!]);
        await expectCount(A, 2, "A got B's and C's broadcasts");
        await expectCount(B, 2, "B got A's and C's");
        await expectCount(C, 2, "C got A's and B's");
        assertSame(A.frames(), [hello[1]!, hello[2]!], "A's broadcasts");
        for (const g of [A, B, C]) g.clear();

        // unicast after learning: only its port, bytes intact
        const frames = Array.from({ length: 300 }, (_, i) =>
          ethFrame(mac(0xb), mac(0xa), 100 + i, 60 + ((i * 37) % 1450)),
        );
        await transfer(A, [B], frames);
        await expectCount(B, 300, "B got A's unicast");
        assertSame(B.frames(), frames, "A -> B unicast");
        assert.equal(C.count(), 0, "C saw none of A -> B");
        assert.equal(A.count(), 0);
        const bytes = frames.reduce((n, f) => n + f.length, 0);
        assert.equal(pa.device.counters.rxPackets, 301);
        assert.equal(pa.device.counters.rxBytes, hello[0]!.length + bytes);
        assert.equal(pb.device.counters.txPackets, 2 + 300);
        assert.equal(pb.device.counters.txBytes, hello[0]!.length + hello[2]!.length + bytes);
        assert.equal(pc.device.counters.txPackets, 2);
        for (const p of [pa, pb, pc])
          assert.deepEqual(
            Object.values(p.device.counters.drops).reduce((x, y) => x + y),
            0,
          );

        // frames larger than one receive buffer: merged with MRG_RXBUF, dropped without it
        B.clear();
        const q = B.rxq();
        // drain the posted 2048-byte buffers, then post 512-byte ones
        const fill = Array.from({ length: q.outstanding }, (_, i) =>
          ethFrame(mac(0xb), mac(0xa), 5000 + i, 60),
        );
        await A.send(fill);
        await expectCount(B, fill.length, "B's ring drained", false);
        B.clear();
        q.postRxBuffers(64, 512);
        const big = Array.from({ length: 8 }, (_, i) =>
          ethFrame(mac(0xb), mac(0xa), 9000 + i, 1514),
        );
        await A.send(big);
        if (mrg) {
          await until(() => B.count() >= 8, "big frames merged");
          assertSame(B.frames(), big, "1514-byte frames over 512-byte buffers");
          assert.ok(
            B.received[0]!.every((r) => r.hdr[10] === 3),
            "num_buffers = 3 (1526 bytes in 512-byte buffers)",
          );
        } else {
          await until(() => pb.device.counters.drops["too-big"] >= 8, "too-big drops");
          assert.equal(B.count(), 0);
          // a frame that fits is still delivered into the same held buffer
          const small = ethFrame(mac(0xb), mac(0xa), 1, 400);
          await A.send([small]);
          await until(() => B.count() >= 1, "small frame after the big ones");
          assertSame(B.frames(), [small], "small frame");
        }
      } finally {
        b.close();
      }
    });
  }
}

test("device: ports with busy polling forward every frame once and stop polling when idle", async () => {
  const b = bench();
  try {
    const [pa, pb] = ["a", "b"].map((n) => b.add(n, { busyPollMicros: 200 })) as [
      VhostUserPort,
      VhostUserPort,
    ];
    const A = await attach(b, pa, { name: "a", features: BASE });
    const B = await attach(b, pb, { name: "b", features: BASE });
    for (const g of [A, B]) g.refill();
    await until(() => [pa, pb].every((p) => p.device.up), "ports up");
    await B.send([ethFrame(BCAST, mac(0xb), 1)]);
    await expectCount(A, 1, "A got B's broadcast");
    A.clear();
    const frames = Array.from({ length: 500 }, (_, i) =>
      ethFrame(mac(0xb), mac(0xa), 100 + i, 60 + ((i * 37) % 1450)),
    );
    await transfer(A, [B], frames);
    await expectCount(B, 500, "B got A's unicast");
    assertSame(B.frames(), frames, "A -> B unicast under busy polling");
    await sleep(20);
    const rings = [pa, pb].flatMap((p) => p.server.session?.vrings ?? []);
    assert.ok(
      rings.every((v) => !v.busyPolling),
      "every ring asked for kicks again once idle",
    );
  } finally {
    b.close();
  }
});

test("device: two queue pairs (MQ): flows use both pairs; VQ_PAIRS_SET over the control queue", async () => {
  const b = bench();
  try {
    const pa = b.add("a", { queuePairs: 2 });
    const pb = b.add("b", { queuePairs: 2 });
    const pc = b.add("c", { queuePairs: 2, offerConfig: true });
    // A and B: QEMU style (no control queue: every pair active)
    const A = await attach(b, pa, { name: "a", pairs: 2 });
    const B = await attach(b, pb, { name: "b", pairs: 2 });
    // C: with the control queue: one pair until VQ_PAIRS_SET
    const C = await attach(b, pc, { name: "c", pairs: 2, ctrl: true });
    for (const g of [A, B, C]) g.refill();
    await until(() => [pa, pb, pc].every((p) => p.device.up), "ports up");
    assert.equal(pa.device.state.activePairs, 2);
    assert.equal(pc.device.state.activePairs, 1);
    assert.equal(await A.fe.getQueueNum(), 2);
    await B.send([ethFrame(BCAST, mac(0xb), 0)]);
    await C.send([ethFrame(BCAST, mac(0xc), 0)]);
    await expectCount(A, 2, "A learned B and C");
    A.clear();

    // 64 flows from A to B, alternating A's two transmit queues
    const toB = Array.from({ length: 64 }, (_, i) => udpFrame(mac(0xb), mac(0xa), 1000 + i, i));
    await A.send(
      toB.filter((_, i) => i % 2 === 0),
      0,
    );
    await A.send(
      toB.filter((_, i) => i % 2 === 1),
      1,
    );
    await expectCount(B, 64 + 1, "B got all 64 (and C's hello)");
    assert.ok(
      B.received[0]!.length > 1 && B.received[1]!.length > 0,
      `both RX pairs used (${B.received[0]!.length}/${B.received[1]!.length})`,
    );
    assert.deepEqual(
      pa.device.pairCounters.map((p) => p.txFrames > 0),
      [true, true],
    );
    assert.deepEqual(
      pb.device.pairCounters.map((p) => p.rxFrames > 0),
      [true, true],
    );
    const got = B.frames()
      .filter((f) => f.length === toB[0]!.length)
      .map((f) => new DataView(f.buffer, f.byteOffset).getUint32(42));
    assert.deepEqual(
      got.sort((x, y) => x - y),
      toB.map((_, i) => i),
      "every flow's frame once",
    );

    // C: only pair 0 receives, then the driver asks for 2 pairs
    const toC = (base: number) =>
      Array.from({ length: 64 }, (_, i) => udpFrame(mac(0xc), mac(0xa), 2000 + i, base + i));
    await A.send(toC(0));
    await expectCount(C, 64 + 1, "C got 64 (and B's hello)");
    assert.equal(C.received[1]!.length, 0, "pair 1 inactive before VQ_PAIRS_SET");
    assert.equal(await C.control(Uint8Array.of(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, 2, 0)), 0);
    assert.equal(pc.device.state.activePairs, 2);
    assert.equal(await C.control(Uint8Array.of(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, 9, 0)), 1, "ERR");
    C.clear();
    await A.send(toC(100));
    await expectCount(C, 64, "C got 64 more");
    assert.ok(C.received[1]!.length > 0, "pair 1 used after VQ_PAIRS_SET 2");

    // announce: the status bit and a config-change notification; ANNOUNCE ACK clears it
    const changed = new Promise<void>((r) => C.fe.once("config-change", () => r()));
    assert.equal(pc.device.announce(), "guest");
    await changed;
    const status = await C.fe.getConfig(6, 2);
    assert.equal(status[0]! & 2, 2, "VIRTIO_NET_S_ANNOUNCE");
    assert.equal(await C.control(Uint8Array.of(CtrlClass.ANNOUNCE, 0)), 0);
    assert.equal(((await C.fe.getConfig(6, 2))[0] as number) & 2, 0);
  } finally {
    b.close();
  }
});

// --- offloads ------------------------------------------------------------------------------

function gsoHeader(o: {
  csum?: boolean;
  gso?: number;
  hdrLen?: number;
  gsoSize?: number;
  start?: number;
  offset?: number;
}): Uint8Array {
  const h = new Uint8Array(12);
  const dv = new DataView(h.buffer);
  h[0] = o.csum ? 1 : 0;
  h[1] = o.gso ?? 0;
  dv.setUint16(2, o.hdrLen ?? 0, true);
  dv.setUint16(4, o.gsoSize ?? 0, true);
  dv.setUint16(6, o.start ?? 0, true);
  dv.setUint16(8, o.offset ?? 0, true);
  return h;
}

test("device: offloads pass as they are to a port that negotiated them, done in software for others", async () => {
  const b = bench();
  try {
    const pa = b.add("a");
    const pb = b.add("b");
    const pc = b.add("c");
    const pd = b.add("d");
    const A = await attach(b, pa, {
      name: "a",
      features: BASE | featureSet(F.NET_F_CSUM, F.HOST_TSO4),
    });
    const B = await attach(b, pb, {
      name: "b",
      features: BASE | featureSet(F.GUEST_CSUM, F.GUEST_TSO4, F.MRG_RXBUF),
    });
    const C = await attach(b, pc, { name: "c", features: BASE | featureSet(F.MRG_RXBUF) });
    // D: TSO without MRG_RXBUF: big receive buffers ("big packets" mode)
    const D = await attach(b, pd, {
      name: "d",
      features: BASE | featureSet(F.GUEST_CSUM, F.GUEST_TSO4),
      ringSize: 16,
      bufferSize: 70_000,
      ramSize: 16 << 20,
    });
    for (const g of [A, B, C, D]) g.refill();
    await until(() => [pa, pb, pc, pd].every((p) => p.device.up), "ports up");
    assert.deepEqual(
      { ...pb.device.offloads },
      { csum: true, tso4: true, tso6: false, ecn: false, ufo: false, mrg: true },
    );
    assert.equal(pc.device.offloads.csum, false);

    // 1. a partial checksum (NEEDS_CSUM), broadcast
    const small = tcpPartialFrame(BCAST, mac(0xa), 300);
    A.sendWithHeader(gsoHeader({ csum: true, start: 34, offset: 16 }), small);
    for (const g of [B, C, D]) await expectCount(g, 1, "partial-checksum frame");
    const rb = B.received[0]![0]!;
    assert.equal(rb.hdr[0], 1, "B: NEEDS_CSUM kept");
    assert.deepEqual([rb.hdr[6], rb.hdr[8]], [34, 16]);
    assert.deepEqual(rb.frame, small, "B: bytes as sent");
    const rc = C.received[0]![0]!;
    assert.equal(rc.hdr[0]! & 1, 0, "C: no NEEDS_CSUM");
    assert.ok(tcpChecksumOk(rc.frame), "C: checksum completed");
    assert.deepEqual(rc.frame.subarray(54), small.subarray(54), "C: payload intact");
    for (const g of [B, C, D]) g.clear();

    // 2. a TSO frame of 8000 bytes, MSS 1448
    const payload = 8000;
    const big = tcpPartialFrame(BCAST, mac(0xa), payload);
    A.sendWithHeader(
      gsoHeader({ csum: true, gso: 1, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16 }),
      big,
    );
    await expectCount(B, 1, "B: one GSO frame");
    await expectCount(D, 1, "D: one GSO frame in a big buffer");
    for (const g of [B, D]) {
      const r = g.received[0]![0]!;
      const dv = new DataView(r.hdr.buffer, r.hdr.byteOffset);
      assert.deepEqual(
        {
          flags: r.hdr[0],
          gso: r.hdr[1],
          hdrLen: dv.getUint16(2, true),
          size: dv.getUint16(4, true),
          start: dv.getUint16(6, true),
          off: dv.getUint16(8, true),
        },
        { flags: 1, gso: 1, hdrLen: 54, size: 1448, start: 34, off: 16 },
      );
      assert.deepEqual(r.frame, big, "the GSO frame as sent");
    }
    assert.ok(B.received[0]![0]!.hdr[10]! >= 4, "B: spread over several merged buffers");
    const segs = Math.ceil(payload / 1448);
    await expectCount(C, segs, "C: segments");
    const parts: Uint8Array[] = [];
    C.received[0]!.forEach((r, i) => {
      assert.ok(ipv4HeaderOk(r.frame), `segment ${i}: IPv4 header checksum`);
      assert.ok(tcpChecksumOk(r.frame), `segment ${i}: TCP checksum`);
      assert.ok(r.frame.length <= 54 + 1448);
      assert.equal(
        new DataView(r.frame.buffer, r.frame.byteOffset).getUint32(38),
        1_000_000 + i * 1448,
      );
      assert.equal(r.hdr[1], 0, "no GSO type");
      parts.push(r.frame.subarray(54));
    });
    assert.deepEqual(new Uint8Array(Buffer.concat(parts)), big.subarray(54), "payload reassembles");
    assert.equal(pc.device.counters.txPackets, 1 + segs);
    assert.equal(b.sw.stats().softwareGso.segments, segs);

    // 3. a GSO type the sender did not negotiate is malformed (TSO6 not acked by A)
    A.sendWithHeader(
      gsoHeader({ csum: true, gso: 4, hdrLen: 74, gsoSize: 1000, start: 54, offset: 16 }),
      big,
    );
    await until(() => pa.device.counters.drops.malformed === 1, "malformed drop");
  } finally {
    b.close();
  }
});

// --- RARP, port up / down ------------------------------------------------------------------

test("device: a GSO frame with the ECN bit but no HOST_ECN negotiated is malformed", async () => {
  const b = bench();
  try {
    const pa = b.add("a");
    const pb = b.add("b");
    const A = await attach(b, pa, {
      name: "a",
      features: BASE | featureSet(F.NET_F_CSUM, F.HOST_TSO4),
    });
    const B = await attach(b, pb, { name: "b" });
    for (const g of [A, B]) g.refill();
    await until(() => [pa, pb].every((p) => p.device.up), "ports up");
    const big = tcpPartialFrame(BCAST, mac(0xa), 4000);
    const tso = { csum: true, hdrLen: 54, gsoSize: 1448, start: 34, offset: 16 };
    // VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, then ECN alone on a plain frame
    A.sendWithHeader(gsoHeader({ ...tso, gso: 0x81 }), big);
    A.sendWithHeader(gsoHeader({ gso: 0x80 }), ethFrame(BCAST, mac(0xa), 1));
    await until(() => pa.device.counters.drops.malformed === 2, "two malformed drops");
    // the same TSO frame without the ECN bit goes through (segmented for B)
    A.sendWithHeader(gsoHeader({ ...tso, gso: 1 }), big);
    await until(() => {
      B.refill();
      return B.count() >= 3;
    }, "segments of the valid TSO frame");
    assert.equal(pa.device.counters.drops.malformed, 2);
    assert.equal(pa.device.counters.rxPackets, 1, "only the valid frame entered the switch");
  } finally {
    b.close();
  }
});

function macTableSet(unicast: number, multicast: number): Uint8Array {
  const size = 2 + 4 + unicast * 6 + 4 + multicast * 6;
  const c = new Uint8Array(size);
  const dv = new DataView(c.buffer);
  c[0] = CtrlClass.MAC;
  c[1] = CtrlMac.TABLE_SET;
  dv.setUint32(2, unicast, true);
  for (let i = 0; i < unicast; i++) c.set([0x02, 0, 0, 1, (i >> 8) & 0xff, i & 0xff], 6 + i * 6);
  const m = 6 + unicast * 6;
  dv.setUint32(m, multicast, true);
  for (let i = 0; i < multicast; i++) {
    c.set([0x01, 0x00, 0x5e, 0x00, (i >> 8) & 0x7f, i & 0xff], m + 4 + i * 6);
  }
  return c;
}

test("device: a MAC TABLE_SET past 4 KiB is taken and sets the overflow flag; past 64 KiB it gets VIRTIO_NET_ERR", async () => {
  const b = bench();
  try {
    const pa = b.add("a");
    const A = await attach(b, pa, { name: "a", ctrl: true, ramSize: 16 << 20 });
    await until(() => pa.device.negotiatedFeatures !== 0n, "features set");
    const f = (): { uc: number; mc: number; ucOver: boolean; mcOver: boolean } => ({
      uc: pa.device.state.filter.unicast.length,
      mc: pa.device.state.filter.multicast.length,
      ucOver: pa.device.state.filter.unicastOverflow,
      mcOver: pa.device.state.filter.multicastOverflow,
    });
    assert.equal(await A.control(macTableSet(3, 2)), 0);
    assert.deepEqual(f(), { uc: 3, mc: 2, ucOver: false, mcOver: false });
    const big = macTableSet(700, MAC_TABLE_ENTRIES + 1);
    assert.ok(big.length > 4096 && big.length <= CTRL_MAX_COMMAND, `${big.length} bytes`);
    assert.equal(await A.control(big), 0, "VIRTIO_NET_OK");
    assert.deepEqual(f(), { uc: 0, mc: 0, ucOver: true, mcOver: true });
    // a table that fits clears the overflow again
    assert.equal(await A.control(macTableSet(1, 0)), 0);
    assert.deepEqual(f(), { uc: 1, mc: 0, ucOver: false, mcOver: false });
    const huge = macTableSet(11_000, 0);
    assert.ok(huge.length > CTRL_MAX_COMMAND);
    assert.equal(await A.control(huge), 1, "VIRTIO_NET_ERR written");
    assert.deepEqual(f(), { uc: 1, mc: 0, ucOver: false, mcOver: false }, "filter unchanged");
  } finally {
    b.close();
  }
});

test("device: SEND_RARP broadcasts a RARP on every other port and moves the MAC", async () => {
  const b = bench();
  try {
    const [pa, pb, pc] = ["a", "b", "c"].map((n) => b.add(n)) as [
      VhostUserPort,
      VhostUserPort,
      VhostUserPort,
    ];
    const A = await attach(b, pa, { name: "a" });
    const B = await attach(b, pb, { name: "b" });
    const C = await attach(b, pc, { name: "c" });
    for (const g of [A, B, C]) g.refill();
    await until(() => [pa, pb, pc].every((p) => p.device.up), "ports up");
    const vm = mac(0x77);
    // the VM's MAC is first seen on C (the source of a migration, say)
    await C.send([ethFrame(BCAST, vm, 1)]);
    await expectCount(A, 1, "A got C's frame");
    assert.equal(b.sw.macTable().find((r) => r.mac === vm)?.port, pc.device.name);
    A.clear();
    B.clear();
    await A.fe.sendRarp(vm);
    await expectCount(B, 1, "B got the RARP");
    await expectCount(C, 1, "C got the RARP");
    assert.equal(A.count(), 0, "not back to A");
    const rarp = B.frames()[0]!;
    assert.equal(rarp.length, 60);
    assert.equal((rarp[12]! << 8) | rarp[13]!, EtherType.RARP);
    assert.equal(formatMac(rarp.subarray(6, 12)), vm);
    assert.deepEqual(
      b.sw.macsOnPort(pa.device.name).map((m) => m.mac),
      [vm],
    );
    assert.equal(pa.device.mac, vm);
    // unicast to the VM now goes to A only
    C.clear();
    await B.send([ethFrame(vm, mac(0xb), 2)]);
    await expectCount(A, 1, "A got the unicast");
    assert.equal(C.count(), 0);
  } finally {
    b.close();
  }
});

test("device: a port goes down when its front-end leaves and up when one comes back", async () => {
  const b = bench();
  try {
    const pa = b.add("a");
    const pb = b.add("b");
    const A = await attach(b, pa, { name: "a" });
    assert.equal(pb.device.up, false);
    assert.equal(b.sw.stats().ports.find((p) => p.name === pb.device.name)?.up, false);
    let B = await attach(b, pb, { name: "b1" });
    A.refill();
    B.refill();
    await until(() => pb.device.up && pa.device.up, "both up");
    await B.send([ethFrame(BCAST, mac(0xb), 1)]);
    await expectCount(A, 1, "A got B's hello");
    assert.equal(b.sw.macsOnPort(pb.device.name).length, 1);
    B.close();
    b.guests.splice(b.guests.indexOf(B), 1);
    await until(() => !pb.device.up, "B's port down");
    assert.equal(b.sw.macsOnPort(pb.device.name).length, 0, "its MACs flushed");
    assert.ok(b.log.has(/b\.sock: link down/));
    await A.send([ethFrame(mac(0xb), mac(0xa), 2)]);
    await until(
      () => pb.device.counters.drops["port-down"] + pb.device.counters.txPackets >= 0,
      "sent",
    );
    await sleep(20);
    // a new front-end on the same port
    B = await attach(b, pb, { name: "b2" });
    B.refill();
    await until(() => pb.device.up, "B's port up again");
    const f = Array.from({ length: 20 }, (_, i) => ethFrame(BCAST, mac(0xa), 10 + i));
    await A.send(f);
    await expectCount(B, 20, "the new B gets traffic");
    assertSame(B.frames(), f, "after reconnection");
  } finally {
    b.close();
  }
});

// --- misbehaving front-ends ----------------------------------------------------------------

test("device: a misbehaving front-end only hurts its own port", async () => {
  const b = bench();
  try {
    const [pb, pc, pm, pd] = ["b", "c", "m", "d"].map((n) => b.add(n)) as [
      VhostUserPort,
      VhostUserPort,
      VhostUserPort,
      VhostUserPort,
    ];
    const B = await attach(b, pb, { name: "b" });
    const C = await attach(b, pc, { name: "c" });
    const M = await attach(b, pm, { name: "m" });
    const D = await attach(b, pd, { name: "d" });
    for (const g of [B, C, D]) g.refill();
    let seq = 0;
    const round = async (what: string): Promise<void> => {
      C.clear();
      const f = Array.from({ length: 50 }, () => ethFrame(mac(0xc), mac(0xb), seq++));
      await B.send(f);
      await expectCount(C, 50, what);
      assertSame(C.frames(), f, what);
    };
    await until(() => pb.device.up && pc.device.up && pd.device.up, "ports up");
    await C.send([ethFrame(BCAST, mac(0xc), 0)]);
    await expectCount(B, 1, "B learned C");
    await round("before");

    // 1. ring addresses outside guest memory: refused, the port and the others go on
    await M.fe.request(FrontendRequest.SET_VRING_NUM, { index: 2, num: 64 });
    await assert.rejects(
      M.fe.request(FrontendRequest.SET_VRING_ADDR, {
        index: 2,
        flags: 0,
        descUserAddr: 0x1000n,
        usedUserAddr: 0x2000n,
        availUserAddr: 0x3000n,
        logGuestAddr: 0n,
      }),
      /SET_VRING_ADDR/,
    );
    await round("after a bad ring address");

    // 2. a receive buffer outside guest memory: the ring breaks when the switch delivers to it
    const mem = M.ram.memory;
    const rx = M.rxq();
    const writeDesc = (
      q: FrontendQueue,
      i: number,
      addr: number,
      len: number,
      flags: number,
      next: number,
    ): void => {
      const v = mem.gpaToView((q.ring.desc + i * 16) as Gpa, 16);
      const dv = new DataView(v.buffer, v.byteOffset, 16);
      dv.setBigUint64(0, BigInt(addr), true);
      dv.setUint32(8, len, true);
      dv.setUint16(12, flags, true);
      dv.setUint16(14, next, true);
    };
    const publish = (q: FrontendQueue, head: number): void => {
      const v = mem.gpaToView(q.ring.avail, 4 + 2 * q.size);
      const av = new DataView(v.buffer, v.byteOffset, v.byteLength);
      const idx = av.getUint16(2, true);
      av.setUint16(4 + 2 * (idx % q.size), head, true);
      // ORDERING: the entry before the index, as a driver publishes.
      av.setUint16(2, (idx + 1) & 0xffff, true);
      q.forceKick();
    };
    const rxBroken = new Promise<number>((r) => M.fe.once("queue-error", r));
    writeDesc(rx, 0, 0x4000_0000, 2048, VIRTQ_DESC_F_WRITE, 0);
    publish(rx, 0);
    await until(() => pm.device.up, "M up (its receive ring started)");
    B.clear();
    D.clear();
    await C.send([ethFrame(BCAST, mac(0xc), 1)]);
    assert.equal(await rxBroken, 0, "M's receive queue reported broken");
    await expectCount(B, 1, "B got the broadcast");
    await expectCount(D, 1, "D got the broadcast");
    assert.ok(b.log.has(/queue 0: broken: .*outside guest memory/));
    await round("after M's receive ring broke");

    // 3. a kick storm on M's transmit ring
    const tx = M.txq();
    const storm = async (): Promise<void> => {
      for (let i = 0; i < 200; i++) {
        for (let j = 0; j < 100; j++) native.eventfdWrite(tx.kickFd, 1);
        await sleep(0);
      }
    };
    await Promise.all([storm(), round("during a kick storm")]);

    // 4. a descriptor loop in M's transmit ring
    const txBroken = new Promise<number>((r) => M.fe.once("queue-error", r));
    const buf = M.ram.alloc(64);
    writeDesc(tx, 0, buf, 64, VIRTQ_DESC_F_NEXT, 1);
    writeDesc(tx, 1, buf, 64, VIRTQ_DESC_F_NEXT, 0);
    publish(tx, 0);
    assert.equal(await txBroken, 1, "M's transmit queue reported broken");
    await round("after M's transmit ring broke");

    // 5. D disconnects in the middle of a flood
    C.clear();
    B.clear();
    const flood = Array.from({ length: 400 }, (_, i) => ethFrame(BCAST, mac(0xb), 10_000 + i));
    await transfer(B, [C], flood.slice(0, 100));
    const rest = transfer(B, [C], flood.slice(100));
    D.close();
    b.guests.splice(b.guests.indexOf(D), 1);
    await rest;
    await expectCount(C, 400, "C got the whole flood");
    assertSame(C.frames(), flood, "flood");
    await until(() => !pd.device.up, "D's port down");
    assert.equal(pb.device.counters.rxPackets >= 400, true);
    await round("after D left");
    // the misbehaving ports' errors are their own: B and C dropped nothing
    for (const p of [pb, pc]) {
      assert.equal(
        Object.values(p.device.counters.drops).reduce((x, y) => x + y),
        0,
        `${p.device.name} drops`,
      );
    }
  } finally {
    b.close();
  }
});

test("device: random virtio-net headers and frames from a guest never hurt the switch", async () => {
  const b = bench();
  try {
    const [pe, pb, pc] = ["e", "b", "c"].map((n) => b.add(n)) as [
      VhostUserPort,
      VhostUserPort,
      VhostUserPort,
    ];
    const E = await attach(b, pe, {
      name: "e",
      features: BASE | featureSet(F.NET_F_CSUM, F.HOST_TSO4, F.HOST_TSO6, F.HOST_ECN),
      ramSize: 16 << 20,
    });
    const B = await attach(b, pb, { name: "b", features: BASE | featureSet(F.MRG_RXBUF) });
    const C = await attach(b, pc, { name: "c", features: BASE | featureSet(F.GUEST_CSUM) });
    for (const g of [B, C]) g.refill();
    await until(() => pb.device.up && pc.device.up, "ports up");
    const samples = fc.sample(
      fc.record({
        hdr: fc.uint8Array({ minLength: 12, maxLength: 12 }),
        len: fc.integer({ min: 0, max: 3000 }),
        corrupt: fc.array(fc.tuple(fc.nat(3100), fc.nat(255)), { maxLength: 3 }),
        gso: fc.constantFrom(0, 1, 3, 4, 0x81, 0x84, 7),
        csum: fc.boolean(),
        gsoSize: fc.integer({ min: 0, max: 2000 }),
        v6: fc.boolean(),
      }),
      { numRuns: 300, seed: 42 },
    );
    const tx = E.txq();
    let sent = 0;
    for (const s of samples) {
      // a TCP segment over IPv4/IPv6 with a partial checksum, then a few bytes corrupted
      const f = s.v6
        ? tcp6PartialFrame(BCAST, mac(0xe), s.len)
        : tcpPartialFrame(BCAST, mac(0xe), s.len);
      for (const [at, v] of s.corrupt) if (at >= 12 && at < f.length) f[at] = v;
      const l4 = s.v6 ? 54 : 34;
      const h = s.hdr;
      h[0] = s.csum ? 1 : h[0]! & 3;
      h[1] = s.gso;
      h[2] = l4 + 20;
      h[3] = 0;
      h[4] = s.gsoSize & 0xff;
      h[5] = s.gsoSize >> 8;
      if (s.csum) {
        h[6] = l4;
        h[7] = 0;
        h[8] = 16;
        h[9] = 0;
      }
      while (tx.outstanding >= tx.size - 1) {
        await sleep(1);
        tx.reclaim();
        for (const g of [B, C]) g.clear();
        for (const g of [B, C]) g.refill();
      }
      E.sendWithHeader(s.hdr, f);
      sent++;
    }
    await until(() => {
      tx.reclaim();
      return tx.outstanding === 0;
    }, "every chain returned to E");
    assert.equal(sent, 300);
    assert.ok(pe.device.counters.drops.malformed > 0, "malformed headers were counted");
    const st = b.sw.stats();
    assert.ok(
      st.softwareCsum > 0 && st.softwareGso.frames > 0,
      `software offload paths exercised (${JSON.stringify(st.softwareGso)}, csum ${st.softwareCsum})`,
    );
    // the switch and the other ports are fine: exact unicast B -> C
    B.clear();
    C.clear();
    await B.send([ethFrame(BCAST, mac(0xb), 0)]);
    await C.send([ethFrame(BCAST, mac(0xc), 0)]);
    await expectCount(B, 1, "B got C's hello");
    C.clear();
    const f = Array.from({ length: 100 }, (_, i) => ethFrame(mac(0xc), mac(0xb), i));
    await B.send(f);
    await expectCount(C, 100, "B -> C after the fuzz");
    assertSame(C.frames(), f, "B -> C after the fuzz");
  } finally {
    b.close();
  }
});

// --- migration hooks -----------------------------------------------------------------------

test("device: a suspended port keeps its learned MACs; saveState/loadState carry the port to another switch", async () => {
  const b = bench();
  const b2 = bench();
  try {
    const pa = b.add("a", { queuePairs: 2 });
    const pb = b.add("b");
    const A = await attach(b, pa, {
      name: "a",
      pairs: 2,
      features: BASE | featureSet(F.GUEST_CSUM),
    });
    const B = await attach(b, pb, { name: "b" });
    for (const g of [A, B]) g.refill();
    await until(() => pa.device.up && pb.device.up, "ports up");
    await A.send([ethFrame(BCAST, mac(0xa), 1), ethFrame(BCAST, mac(0xa1), 2)]);
    await expectCount(B, 2, "B got A's frames");
    assert.deepEqual(
      b.sw
        .macsOnPort(pa.device.name)
        .map((m) => m.mac)
        .sort(),
      [mac(0xa), mac(0xa1)],
    );
    // the front-end stops every ring (as QEMU before saving the device state): the port goes
    // down and the switch forgets its MACs, but the device kept them for the state
    for (let i = 0; i < 4; i++) await A.fe.stopQueue(i);
    await until(() => !pa.device.up, "A's port down");
    assert.equal(b.sw.macsOnPort(pa.device.name).length, 0);
    assert.deepEqual(pa.device.suspendedMacs?.map((m) => m.mac).sort(), [mac(0xa), mac(0xa1)]);
    const state = pa.device.saveState();
    assert.ok(state.length > 16);

    // the destination: a port of another switch with a front-end that set up the same features
    const pd = b2.add("d", { queuePairs: 2 });
    const D = await attach(b2, pd, {
      name: "d",
      pairs: 2,
      features: BASE | featureSet(F.GUEST_CSUM),
    });
    pd.device.loadState(state);
    assert.equal(pd.device.counters.rxPackets, 2);
    assert.equal(pd.device.counters.rxBytes, pa.device.counters.rxBytes);
    assert.deepEqual(pd.device.pairCounters, pa.device.pairCounters);
    assert.deepEqual(
      b2.sw
        .macsOnPort(pd.device.name)
        .map((m) => m.mac)
        .sort(),
      [mac(0xa), mac(0xa1)],
      "the MACs are learned on the destination port",
    );
    assert.equal(pd.device.mac, mac(0xa));
    // a corrupted state is refused and changes nothing
    const bad = state.slice();
    bad[bad.length - 1]! ^= 0xff;
    const before = { ...pd.device.counters };
    assert.throws(() => pd.device.loadState(bad));
    assert.equal(pd.device.counters.rxPackets, before.rxPackets);
    D.refill();
    await until(() => pd.device.up, "D up");
  } finally {
    b.close();
    b2.close();
  }
});

test("device: every fd is released once the ports and guests are closed", async () => {
  await sleep(50);
  const leaked = [...openFds()]
    .filter((fd) => !FDS_AT_START.has(fd))
    .map((fd) => {
      try {
        return `${fd} -> ${readlinkSync(`/proc/self/fd/${fd}`)}`;
      } catch {
        return fd;
      }
    });
  assert.deepEqual(leaked, []);
});
