/**
 * Host uplinks of the switch: the `--uplink` parser, the VXLAN header, a TAP uplink into a test
 * namespace, VXLAN against a Linux vxlan device in a namespace, and two switches joined by
 * VXLAN over loopback. Guests are vhostkit front-ends driven by hand-built frames.
 * The TAP and namespace tests need root (namespaces, /dev/net/tun) and are skipped without it;
 * the parser, header and loopback VXLAN tests run as any user.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createSocket } from "node:dgram";
import { randomInt } from "node:crypto";
import { readdirSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import fc from "fast-check";

import { Switch } from "../src/net/switch.js";
import {
  formatUplinkSpec,
  openUplink,
  parseUplinkSpec,
  UplinkSpecError,
} from "../src/net/uplink.js";
import type { UplinkSpec } from "../src/net/uplink.js";
import { openTapUplink, writeVnetHeader } from "../src/net/uplink-tap.js";
import {
  openVxlanUplink,
  readVxlanHeader,
  VxlanPort,
  writeVxlanHeader,
} from "../src/net/uplink-vxlan.js";
import { silentLogger } from "../src/backend/device.js";
import { native } from "../src/native.js";
import { createNetns, ifName, ip } from "./peers/netns.js";
import {
  arpReplyMac,
  arpRequest,
  attachTestGuest,
  icmpEcho,
  isEchoReply,
} from "./fixtures/switch-frames.js";

/** Why a test that needs root is skipped, or false when running as root. */
const skipUnlessRoot = process.getuid?.() !== 0 ? "needs root" : false;

/**
 * Open fds of this process, after the addon's per-environment epoll fd exists (it is created
 * by the first watcher and kept).
 */
function openFds(): number {
  const efd = native.eventfd(0);
  new native.FdWatcher(efd, () => undefined).close();
  native.close(efd);
  return readdirSync("/proc/self/fd").length;
}

// --- the spec parser ---------------------------------------------------------------------

test("uplink spec: tap and vxlan texts parse, with defaults", () => {
  assert.deepEqual(parseUplinkSpec("tap:tap0"), { kind: "tap", name: "tap0", vnetHdr: true });
  assert.deepEqual(parseUplinkSpec("tap:tap0,vnet_hdr=off"), {
    kind: "tap",
    name: "tap0",
    vnetHdr: false,
  });
  assert.deepEqual(parseUplinkSpec("vxlan:vni=42,local=198.51.100.1,remote=198.51.100.2"), {
    kind: "vxlan",
    vni: 42,
    local: "198.51.100.1",
    localPort: 4789,
    remotes: ["198.51.100.2"],
    remotePort: 4789,
    dev: undefined,
  });
  const any = parseUplinkSpec("vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,learn=any");
  assert.equal(any.kind === "vxlan" && any.learnRemotes, true);
  assert.equal(
    formatUplinkSpec(any),
    "vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,learn=any",
  );
  const rem = parseUplinkSpec("vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,learn=remotes");
  assert.equal(rem.kind === "vxlan" && rem.learnRemotes, undefined);
  assert.deepEqual(
    parseUplinkSpec(
      "vxlan:vni=16777215,local=fd00::1,remote=fd00::2,remote=fd00::3,port=5000,dstport=6000,dev=eth0",
    ),
    {
      kind: "vxlan",
      vni: 0xffffff,
      local: "fd00::1",
      localPort: 5000,
      remotes: ["fd00::2", "fd00::3"],
      remotePort: 6000,
      dev: "eth0",
    },
  );
});

test("uplink spec: errors name the bad field and value", () => {
  const bad: [string, string][] = [
    ["tun:x", "kind"],
    ["tap", "name"],
    ["tap:", "name"],
    ["tap:this-name-is-too-long", "name"],
    ["tap:a/b", "name"],
    ["tap:t0,vnet_hdr=maybe", "vnet_hdr"],
    ["tap:t0,queues=2", "queues"],
    ["vxlan:local=198.51.100.1,remote=198.51.100.2", "vni"],
    ["vxlan:vni=16777216,local=198.51.100.1,remote=198.51.100.2", "vni"],
    ["vxlan:vni=x,local=198.51.100.1,remote=198.51.100.2", "vni"],
    ["vxlan:vni=1,remote=198.51.100.2", "local"],
    ["vxlan:vni=1,local=198.51.100.300,remote=198.51.100.2", "local"],
    ["vxlan:vni=1,local=198.51.100.1", "remote"],
    ["vxlan:vni=1,local=198.51.100.1,remote=fd00::2", "remote"],
    ["vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,port=0", "port"],
    ["vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,dstport=70000", "dstport"],
    ["vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,ttl=3", "ttl"],
    ["vxlan:vni=1,vni=2,local=198.51.100.1,remote=198.51.100.2", "vni"],
    ["vxlan:vni=1,local=198.51.100.1,remote", "vxlan"],
    ["vxlan:vni=1,local=198.51.100.1,remote=198.51.100.2,learn=all", "learn"],
  ];
  for (const [text, field] of bad) {
    assert.throws(
      () => parseUplinkSpec(text),
      (e: unknown) =>
        e instanceof UplinkSpecError &&
        e.code === "ERR_VHOST_UPLINK_SPEC" &&
        e.fatal === false &&
        e.field === field &&
        e.message.includes(field),
      text,
    );
  }
});

test("uplink spec: format and parse round-trip (property)", () => {
  const octet = fc.integer({ min: 0, max: 255 });
  const addr = fc.tuple(octet, octet).map(([a, b]) => `198.51.${a}.${b}`);
  const spec: fc.Arbitrary<UplinkSpec> = fc.oneof(
    fc
      .stringMatching(/^[a-z][a-z0-9_-]{0,14}$/)
      .chain((name) => fc.boolean().map((vnetHdr): UplinkSpec => ({ kind: "tap", name, vnetHdr }))),
    fc
      .record({
        vni: fc.integer({ min: 0, max: 0xffffff }),
        local: addr,
        localPort: fc.integer({ min: 1, max: 65535 }),
        remotes: fc.array(addr, { minLength: 1, maxLength: 4 }),
        remotePort: fc.integer({ min: 1, max: 65535 }),
        dev: fc.option(fc.constantFrom("eth0", "veth1"), { nil: undefined }),
      })
      .map((r): UplinkSpec => ({ kind: "vxlan", ...r })),
  );
  fc.assert(
    fc.property(spec, (s) => {
      assert.deepEqual(parseUplinkSpec(formatUplinkSpec(s)), s);
    }),
  );
});

test("vxlan header: I flag and VNI as RFC 7348 §5 lays them out", () => {
  const h = new Uint8Array(8 + 14);
  writeVxlanHeader(h, 0x123456);
  assert.deepEqual([...h.subarray(0, 8)], [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
  assert.equal(readVxlanHeader(h), 0x123456);
  assert.equal(readVxlanHeader(h.subarray(0, 21)), "short");
  h[0] = 0;
  assert.equal(readVxlanHeader(h), "flags");
  h[0] = 0xff; // reserved flag bits are ignored on receipt
  assert.equal(readVxlanHeader(h), 0x123456);
});

test("tap vnet header: offload metadata encoded as VIRTIO 1.2 §5.1.6 lays it out", () => {
  const b = new Uint8Array(12).fill(0xee);
  writeVnetHeader(b, {
    data: new Uint8Array(0),
    meta: {
      needsCsum: { start: 34, offset: 16 },
      gso: { type: "tcpv4", size: 1448, hdrLen: 66, ecn: true },
    },
  });
  assert.deepEqual([...b], [1, 0x81, 66, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0]);
  writeVnetHeader(b, { data: new Uint8Array(0), meta: { dataValid: true } });
  assert.deepEqual([...b], [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  writeVnetHeader(b, {
    data: new Uint8Array(0),
    meta: { gso: { type: "tcpv6", size: 1000, hdrLen: 86 } },
  });
  assert.deepEqual([...b.subarray(0, 6)], [0, 4, 86, 0, 0xe8, 0x03]);
});

// --- TAP ---------------------------------------------------------------------------------

test(
  "tap uplink: clear errors for a non-TAP interface and an invalid name",
  { skip: skipUnlessRoot },
  async () => {
    const sw = new Switch();
    try {
      await assert.rejects(
        openTapUplink(sw, { name: "lo" }, silentLogger),
        (e: Error) => e.message.includes('"lo"') && /not a TAP|busy/.test(e.message),
      );
      await assert.rejects(
        openTapUplink(sw, { name: "x".repeat(16) }, silentLogger),
        /name must be 1 to 15 UTF-8 bytes/,
      );
      assert.equal(sw.ports.length, 0);
    } finally {
      sw.close();
    }
  },
);

test(
  "tap uplink: frames to an interface that is down are counted as port-down drops",
  { skip: skipUnlessRoot },
  async () => {
    const sw = new Switch();
    const dev = ifName("vktd");
    const up = await openTapUplink(sw, { name: dev }, silentLogger);
    const guest = await attachTestGuest(sw, "52:54:00:00:0d:02");
    try {
      // a new TAP interface is administratively down: write(2) fails with EIO
      guest.send(arpRequest(guest.mac, "192.0.2.2", "192.0.2.1"));
      const deadline = Date.now() + 3000;
      while (up.port.counters.drops["port-down"] === 0 && Date.now() < deadline) await sleep(10);
      assert.equal(up.port.counters.drops["port-down"], 1);
      assert.equal(up.port.counters.txPackets, 0);
      assert.equal(up.port.stats.writeErrors, 0, "EIO is a drop, not a write error");
      // brought up, the same frame goes through
      await ip(["link", "set", dev, "up"]);
      guest.send(arpRequest(guest.mac, "192.0.2.2", "192.0.2.1"));
      const deadline2 = Date.now() + 3000;
      while (up.port.counters.txPackets === 0 && Date.now() < deadline2) await sleep(10);
      assert.equal(up.port.counters.txPackets, 1);
    } finally {
      guest.close();
      up.close();
      sw.close();
    }
  },
);

for (const vnetHdr of [false, true]) {
  test(
    `tap uplink (vnet_hdr=${vnetHdr ? "on" : "off"}): a guest ARPs and pings a namespace address`,
    { skip: skipUnlessRoot },
    async () => {
      const fdsBefore = openFds();
      const ns = await createNetns("vkup");
      const sw = new Switch();
      const dev = ifName("vkt");
      const up = await openUplink(sw, { kind: "tap", name: dev, vnetHdr }, silentLogger);
      const guest = await attachTestGuest(sw, "52:54:00:00:0a:02");
      try {
        assert.equal(up.name, `tap:${dev}`);
        // The TAP stays attached to our fd when the interface moves into the namespace.
        await ip(["link", "set", dev, "netns", ns.name]);
        await ns.ip(["link", "set", dev, "address", "52:54:00:00:0a:01"]);
        await ns.addAddress(dev, "192.0.2.1/24");

        const nsMac = await pingNamespace(guest, { id: 0x4242, payload: (seq) => 56 + seq * 100 });
        assert.deepEqual([...nsMac], [0x52, 0x54, 0, 0, 0x0a, 0x01]);
        const tap = sw.stats().ports.find((p) => p.name === up.name);
        assert.ok(tap !== undefined);
        assert.ok(
          tap.counters.txPackets >= 4,
          `frames written to the TAP: ${tap.counters.txPackets}`,
        );
        assert.ok(
          tap.counters.rxPackets >= 4,
          `frames read from the TAP: ${tap.counters.rxPackets}`,
        );
        // the namespace's MAC was learned on the TAP port
        assert.ok(sw.macTable().some((r) => r.mac === "52:54:00:00:0a:01" && r.port === up.name));
      } finally {
        guest.close();
        up.close();
        up.close(); // idempotent
        sw.close();
        await ns.delete();
      }
      assert.equal(sw.ports.length, 0);
      await sleep(20);
      assert.equal(openFds(), fdsBefore, "fds after closing the TAP uplink and the guest");
    },
  );
}

// --- VXLAN -------------------------------------------------------------------------------

test(
  "vxlan uplink: a guest pings a Linux vxlan device in a namespace (RFC 7348 interop)",
  { skip: skipUnlessRoot },
  async () => {
    const ns = await createNetns("vkvx");
    const hostDev = ifName("vkvh");
    const nsDev = ifName("vkvn");
    // /32 addresses with a peer route, so the host's other routes are not disturbed.
    const n = randomInt(10, 120);
    const hostIp = `198.51.100.${n * 2}`;
    const nsIp = `198.51.100.${n * 2 + 1}`;
    const sw = new Switch();
    let up: { name: string; close(): void } | null = null;
    let guest: Awaited<ReturnType<typeof attachTestGuest>> | null = null;
    try {
      await ip(["link", "add", hostDev, "type", "veth", "peer", "name", nsDev, "netns", ns.name]);
      await ip(["addr", "add", hostIp, "peer", nsIp, "dev", hostDev]);
      await ip(["link", "set", hostDev, "up"]);
      await ns.ip(["addr", "add", nsIp, "peer", hostIp, "dev", nsDev]);
      await ns.ip(["link", "set", nsDev, "up"]);
      const vx = await ns.addVxlan({
        vni: 42,
        local: nsIp,
        remote: hostIp,
        dev: nsDev,
        addr: "192.0.2.1/24",
      });
      await ns.ip(["link", "set", vx, "address", "52:54:00:00:0b:01"]);

      up = await openUplink(
        sw,
        parseUplinkSpec(`vxlan:vni=42,local=${hostIp},remote=${nsIp},dev=${hostDev}`),
        silentLogger,
      );
      assert.equal(up.name, "vxlan:42");
      guest = await attachTestGuest(sw, "52:54:00:00:0b:02");

      const nsMac = await pingNamespace(guest, { id: 0x77, arpTimeoutMs: 8000 });
      assert.deepEqual([...nsMac], [0x52, 0x54, 0, 0, 0x0b, 0x01]);
      const port = sw.port("vxlan:42") as VxlanPort;
      assert.ok(port instanceof VxlanPort);
      // the Linux VTEP was learned for the namespace's MAC; unicast went to it directly
      assert.ok(
        port.vtepTable().some((e) => e.mac === "52:54:00:00:0b:01" && e.address === nsIp),
        JSON.stringify(port.vtepTable()),
      );
      assert.ok(port.stats.txUnicast >= 3, `unicast frames: ${port.stats.txUnicast}`);
      // Linux's FDB learned our VTEP for the guest's MAC
      const fdb = await ns.exec(["bridge", "fdb", "show", "dev", vx]);
      assert.match(fdb.stdout, new RegExp(`52:54:00:00:0b:02 dst ${hostIp.replace(/\./g, "\\.")}`));
    } finally {
      guest?.close();
      up?.close();
      sw.close();
      await ns.delete();
      await ip(["link", "del", hostDev]).catch(() => undefined);
    }
  },
);

test("vxlan uplink: bind errors name the address", async () => {
  const sw = new Switch();
  try {
    await assert.rejects(
      openUplink(
        sw,
        parseUplinkSpec("vxlan:vni=1,local=192.0.2.254,remote=192.0.2.253"),
        silentLogger,
      ),
      (e: Error) => e.message.includes("local=192.0.2.254") && e.message.includes("not configured"),
    );
    await assert.rejects(
      openUplink(
        sw,
        parseUplinkSpec("vxlan:vni=1,local=127.0.0.1,remote=127.0.0.2,dev=lo-nope"),
        silentLogger,
      ),
      /dev="lo-nope": no such interface/,
    );
    assert.equal(sw.ports.length, 0);
  } finally {
    sw.close();
  }
});

/**
 * From a test guest at 192.0.2.2: ARP for 192.0.2.1 (an address in a test namespace), then
 * three echo requests, each answered.
 * @returns the MAC that answered the ARP
 */
async function pingNamespace(
  guest: Awaited<ReturnType<typeof attachTestGuest>>,
  o: { id: number; payload?: (seq: number) => number; arpTimeoutMs?: number },
): Promise<Uint8Array> {
  guest.send(arpRequest(guest.mac, "192.0.2.2", "192.0.2.1"));
  const arp = await guest.waitFor(
    (f) => arpReplyMac(f, "192.0.2.1") !== null,
    "ARP reply",
    ...(o.arpTimeoutMs !== undefined ? [o.arpTimeoutMs] : []),
  );
  const nsMac = arpReplyMac(arp, "192.0.2.1") as Uint8Array;
  for (let seq = 1; seq <= 3; seq++) {
    guest.send(
      icmpEcho({
        srcMac: guest.mac,
        dstMac: nsMac,
        srcIp: "192.0.2.2",
        dstIp: "192.0.2.1",
        id: o.id,
        seq,
        ...(o.payload ? { payload: o.payload(seq) } : {}),
      }),
    );
    await guest.waitFor((f) => isEchoReply(f, "192.0.2.1", o.id, seq), `echo reply ${seq}`);
  }
  return nsMac;
}

async function freeUdpPort(address: string): Promise<number> {
  const s = createSocket(address.includes(":") ? "udp6" : "udp4");
  await new Promise<void>((resolve) => s.bind(0, address, resolve));
  const port = s.address().port;
  await new Promise<void>((resolve) => s.close(resolve));
  return port;
}

for (const family of ["IPv4", "IPv6"] as const) {
  test(`vxlan uplink: two switches joined over ${family} loopback carry frames between their guests`, async () => {
    const fdsBefore = openFds();
    const v6 = family === "IPv6";
    const a = v6 ? "::1" : `127.${randomInt(1, 250)}.${randomInt(1, 250)}.${randomInt(1, 250)}`;
    const b = v6 ? "::1" : `127.${randomInt(1, 250)}.${randomInt(1, 250)}.${randomInt(1, 250)}`;
    const portA = await freeUdpPort(a);
    const portB = await freeUdpPort(b);
    const sw1 = new Switch();
    const sw2 = new Switch();
    const up1 = await openVxlanUplink(
      sw1,
      { vni: 7, local: a, localPort: portA, remotes: [b], remotePort: portB },
      silentLogger,
    );
    const up2 = await openVxlanUplink(
      sw2,
      { vni: 7, local: b, localPort: portB, remotes: [a], remotePort: portA },
      silentLogger,
    );
    const g1 = await attachTestGuest(sw1, "52:54:00:00:0c:01");
    const g2 = await attachTestGuest(sw2, "52:54:00:00:0c:02");
    const stray = createSocket(v6 ? "udp6" : "udp4");
    try {
      // broadcast from g1 floods over VXLAN to g2
      const req = arpRequest(g1.mac, "192.0.2.11", "192.0.2.12");
      g1.send(req);
      const got = await g2.waitFor((f) => f[12] === 0x08 && f[13] === 0x06, "flooded ARP");
      assert.deepEqual(got, req);
      assert.equal(up1.port.stats.txFlooded, 1);
      // unicast back, then both directions learned: unicast to the learned VTEP
      for (let seq = 1; seq <= 5; seq++) {
        const f2 = icmpEcho({
          srcMac: g2.mac,
          dstMac: g1.mac,
          srcIp: "192.0.2.12",
          dstIp: "192.0.2.11",
          id: 9,
          seq,
        });
        g2.send(f2);
        assert.deepEqual(
          await g1.waitFor((f) => f[34] === 8 && f[41] === seq, `g2->g1 ${seq}`),
          f2,
        );
        const f1 = icmpEcho({
          srcMac: g1.mac,
          dstMac: g2.mac,
          srcIp: "192.0.2.11",
          dstIp: "192.0.2.12",
          id: 9,
          seq,
        });
        g1.send(f1);
        assert.deepEqual(
          await g2.waitFor((f) => f[34] === 8 && f[41] === seq, `g1->g2 ${seq}`),
          f1,
        );
      }
      assert.equal(up1.port.stats.txUnicast, 5);
      assert.equal(up2.port.stats.txUnicast, 5);
      assert.ok(sw1.macTable().some((r) => r.mac === g2.mac && r.port === "vxlan:7"));

      // a datagram for another VNI, one without the I flag and a short one are dropped, counted
      const inner = icmpEcho({
        srcMac: "52:54:00:00:0c:09",
        dstMac: "ff:ff:ff:ff:ff:ff",
        srcIp: "192.0.2.19",
        dstIp: "192.0.2.12",
        id: 1,
        seq: 99,
      });
      const wrong = new Uint8Array(8 + inner.length);
      writeVxlanHeader(wrong, 8);
      wrong.set(inner, 8);
      const noI = Uint8Array.from(wrong);
      writeVxlanHeader(noI, 7);
      noI[0] = 0;
      await new Promise<void>((resolve) => stray.bind(0, a, resolve));
      for (const d of [wrong, noI, wrong.subarray(0, 10)]) {
        await new Promise<void>((resolve, reject) =>
          stray.send(d, portB, b, (err) => (err ? reject(err) : resolve())),
        );
      }
      const deadline = Date.now() + 3000;
      while (up2.port.stats.rxDatagrams < 9 && Date.now() < deadline) await sleep(10);
      assert.equal(up2.port.stats.rxWrongVni, 1);
      assert.equal(up2.port.stats.rxBadFlags, 1);
      assert.equal(up2.port.stats.rxShort, 1);
      await sleep(50);
      assert.equal(
        g2.inbox.filter((f) => f[41] === 99).length,
        0,
        "a dropped datagram reached the guest",
      );
    } finally {
      stray.close();
      g1.close();
      g2.close();
      up1.close();
      up2.close();
      sw1.close();
      sw2.close();
    }
    await sleep(50);
    assert.equal(openFds(), fdsBefore, "fds after closing both switches");
  });
}

function rand127(): string {
  return `127.${randomInt(1, 250)}.${randomInt(1, 250)}.${randomInt(1, 250)}`;
}

async function boundUdp(address: string): Promise<ReturnType<typeof createSocket>> {
  const s = createSocket("udp4");
  await new Promise<void>((resolve) => s.bind(0, address, resolve));
  return s;
}

function vxlanDatagram(vni: number, srcMac: string, seq: number): Uint8Array {
  const inner = icmpEcho({
    srcMac,
    dstMac: "ff:ff:ff:ff:ff:ff",
    srcIp: "192.0.2.21",
    dstIp: "192.0.2.22",
    id: 3,
    seq,
  });
  const d = new Uint8Array(8 + inner.length);
  writeVxlanHeader(d, vni);
  d.set(inner, 8);
  return d;
}

for (const learnRemotes of [false, true]) {
  test(`vxlan uplink (learnRemotes=${learnRemotes}): who is learned; the VTEP table is capped and swept`, async () => {
    const local = rand127();
    const remote = await boundUdp(rand127());
    const stray = await boundUdp(rand127());
    let now = 1000;
    const sw = new Switch();
    const up = await openVxlanUplink(
      sw,
      {
        vni: 5,
        local,
        localPort: 0,
        remotes: [remote.address().address],
        remotePort: remote.address().port,
        maxVteps: 2,
        ageingMs: 10_000,
        sweepIntervalMs: 0,
        learnRemotes,
        clock: () => now,
      },
      silentLogger,
    );
    const to = up.port.address();
    const send = (s: typeof remote, d: Uint8Array): Promise<void> =>
      new Promise<void>((resolve, reject) =>
        s.send(d, to.port, to.address, (err) => (err ? reject(err) : resolve())),
      );
    const waitRx = async (n: number): Promise<void> => {
      const deadline = Date.now() + 3000;
      while (up.port.stats.rxDatagrams < n && Date.now() < deadline) await sleep(5);
      assert.equal(up.port.stats.rxDatagrams, n, "datagrams received");
    };
    try {
      // a sender that is not a configured remote
      await send(stray, vxlanDatagram(5, "52:54:00:00:0d:01", 1));
      await waitRx(1);
      assert.equal(up.port.stats.rxUnknownRemote, 1);
      const strayLearned = up.port.vtepTable().some((e) => e.mac === "52:54:00:00:0d:01");
      assert.equal(strayLearned, learnRemotes, JSON.stringify(up.port.vtepTable()));
      // the configured remote: learned up to the cap, the rest counted
      for (let i = 2; i <= 5; i++) await send(remote, vxlanDatagram(5, `52:54:00:00:0d:0${i}`, i));
      await waitRx(5);
      assert.equal(up.port.vtepCount, 2, "the cap holds");
      assert.equal(up.port.stats.learnOverflows, learnRemotes ? 3 : 2);
      assert.ok(
        up.port.vtepTable().every((e) => e.address === remote.address().address) || learnRemotes,
      );
      // aged entries are swept (by expire(), which the timer calls)
      now += 10_000;
      assert.equal(up.port.expire(), 2);
      assert.equal(up.port.vtepCount, 0);
    } finally {
      up.close();
      sw.close();
      remote.close();
      stray.close();
    }
  });
}

test("vxlan uplink: the outer UDP source port is a per-flow hash in 49152..65535 (RFC 7348 §5)", async () => {
  const local = rand127();
  const remote = await boundUdp(rand127());
  const sw = new Switch();
  const up = await openVxlanUplink(
    sw,
    {
      vni: 6,
      local,
      localPort: 0,
      remotes: [remote.address().address],
      remotePort: remote.address().port,
    },
    silentLogger,
  );
  const seen: { port: number; flow: number }[] = [];
  remote.on("message", (msg, rinfo) => {
    seen.push({ port: rinfo.port, flow: msg[8 + 14 + 15] as number });
  });
  try {
    const flows = 32;
    for (let round = 0; round < 2; round++) {
      for (let i = 1; i <= flows; i++) {
        const f = icmpEcho({
          srcMac: "52:54:00:00:0e:01",
          dstMac: "52:54:00:00:0e:02",
          srcIp: `192.0.2.${i}`,
          dstIp: "192.0.2.200",
          id: 1,
          seq: round,
        });
        assert.ok(up.port.deliver({ data: f, meta: {} }));
      }
    }
    const deadline = Date.now() + 3000;
    while (seen.length < flows * 2 && Date.now() < deadline) await sleep(5);
    assert.equal(seen.length, flows * 2);
    const byFlow = new Map<number, Set<number>>();
    for (const s of seen) {
      assert.ok(s.port >= 49152 && s.port <= 65535, `source port ${s.port}`);
      assert.notEqual(s.port, up.port.address().port, "not the receiving port");
      const set = byFlow.get(s.flow) ?? new Set<number>();
      set.add(s.port);
      byFlow.set(s.flow, set);
    }
    for (const [flow, ports] of byFlow) assert.equal(ports.size, 1, `flow ${flow}: one port`);
    const distinct = new Set(seen.map((s) => s.port));
    assert.ok(distinct.size > 1, `flows spread over ${distinct.size} source ports`);
  } finally {
    up.close();
    sw.close();
    remote.close();
  }
});
