/**
 * Smoke tests of the real-peer harness (test/peers/*): DPDK testpmd vhost PMD <-> testpmd
 * virtio_user PMD in both directions, bounded counts, packed rings and multiqueue; a QEMU guest
 * booting to its command loop, pinging testpmd's icmpecho through vhost-user, and migrating;
 * network namespaces. Needs root and the Debian packages of .ci/run.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { gunzipSync } from "node:zlib";

import {
  buildGuestImage,
  S_IFCHR,
  S_IFDIR,
  S_IFREG,
  VIRTIO_NET_MODULES,
  writeCpioNewc,
} from "./peers/guest-image.js";
import { addVethPair, checkTestAddress, ip, withNetns } from "./peers/netns.js";
import { freeTcpPort, parseInfoMigrate, startGuest, type Guest } from "./peers/qemu.js";
import {
  parseForwardStats,
  parsePortStats,
  startTestpmd,
  type Testpmd,
  type TestpmdOptions,
} from "./peers/testpmd.js";
import { sleep } from "./helpers.js";

const isRoot = process.getuid?.() === 0;
const skipUnlessRoot = isRoot ? false : "needs root (CI runs as root)";

/** Run `fn` with a temp dir; on failure add the peers' log paths to the error. */
async function withPeers(
  fn: (dir: string, peers: Array<Testpmd | Guest>) => Promise<void>,
): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "vk-peers-"));
  const peers: Array<Testpmd | Guest> = [];
  let ok = false;
  try {
    await fn(dir, peers);
    ok = true;
  } catch (e) {
    const logs = peers.map((p) => p.logPath).join(", ");
    if (e instanceof Error) e.message += `\n(peer logs: ${logs})`;
    throw e;
  } finally {
    for (const p of [...peers].reverse()) {
      await ("close" in p ? p.close() : p.kill()).catch(() => undefined);
    }
    await rm(dir, { recursive: true, force: true });
    // close() must have removed the DPDK runtime files; only report it when nothing else failed.
    const left = peers.flatMap((p) =>
      "filePrefix" in p && existsSync(join("/var/run/dpdk", p.filePrefix)) ? [p.filePrefix] : [],
    );
    for (const prefix of left) await rm(join("/var/run/dpdk", prefix), { recursive: true });
    // Logs are kept only when the test failed (their paths are in the error).
    if (ok) for (const p of peers) await rm(p.logPath, { force: true });
    if (ok) assert.deepEqual(left, [], "close() left /var/run/dpdk/<prefix> behind");
  }
}

/**
 * Start a vhost PMD (server) and a virtio_user PMD (client) on one socket, both ready with
 * link up. The vhost side polls on lcore 0, the virtio_user side on lcore 1.
 */
async function startPair(
  dir: string,
  peers: Array<Testpmd | Guest>,
  vhost: Partial<TestpmdOptions> & Pick<TestpmdOptions, "forwardMode">,
  virtio: Partial<TestpmdOptions> & Pick<TestpmdOptions, "forwardMode">,
  vdevExtra: { queues?: number; packed?: boolean; reverseServer?: boolean } = {},
): Promise<{ vh: Testpmd; vu: Testpmd }> {
  const sock = join(dir, "vhost.sock");
  const queues = vdevExtra.queues ?? 1;
  const reverse = vdevExtra.reverseServer === true;
  const mkVh = (): Promise<Testpmd> =>
    startTestpmd({
      ...vhost,
      vdev: { kind: "vhost", iface: sock, queues, client: reverse },
      forwardLcore: 0,
      name: "vh",
    });
  const mkVu = (): Promise<Testpmd> =>
    startTestpmd({
      ...virtio,
      vdev: {
        kind: "virtio_user",
        path: sock,
        queues,
        packed: vdevExtra.packed === true,
        server: reverse,
      },
      forwardLcore: 1,
      name: "vu",
    });
  let vh: Testpmd;
  let vu: Testpmd;
  if (reverse) {
    // virtio_user listens and blocks in its start-up until the vhost client connects.
    vu = await mkVu();
    peers.push(vu);
    await vu.listening();
    vh = await mkVh();
    peers.push(vh);
  } else {
    vh = await mkVh();
    peers.push(vh);
    await vh.ready();
    vu = await mkVu();
    peers.push(vu);
  }
  await Promise.all([vh.ready(), vu.ready()]);
  await vu.waitLinkUp();
  await vh.waitLinkUp();
  return { vh, vu };
}

// ---- parsers, with fixtures cut from DPDK 22.11 / QEMU 7.2 output ----

const PORT_STATS = `
  ######################## NIC statistics for port 0  ########################
  RX-packets: 21         RX-missed: 0          RX-bytes:  1344
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 7          TX-errors: 0          TX-bytes:  448

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
`;

const STOP_OUTPUT = `Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 52079732       TX-dropped: 12395696      TX-total: 64475428
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 52079732       TX-dropped: 12395696      TX-total: 64475428
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.
`;

test("parsePortStats reads every counter of a port block", () => {
  assert.deepEqual(parsePortStats(PORT_STATS), [
    {
      port: 0,
      rxPackets: 21,
      rxBytes: 1344,
      rxMissed: 0,
      rxErrors: 0,
      rxNombuf: 0,
      txPackets: 7,
      txBytes: 448,
      txErrors: 0,
    },
  ]);
  assert.deepEqual(parsePortStats("Packet forwarding not started"), []);
  assert.throws(() => parsePortStats(PORT_STATS.replace("TX-bytes", "TX-b")), /TX-bytes/);
});

test("parseForwardStats reads the per-port block, not the accumulated one", () => {
  assert.deepEqual(parseForwardStats(STOP_OUTPUT), [
    { port: 0, rxPackets: 0, rxDropped: 0, txPackets: 52079732, txDropped: 12395696 },
  ]);
  assert.deepEqual(parseForwardStats("Packet forwarding not started\n"), []);
});

test("parseInfoMigrate reads status, times and transferred RAM", () => {
  const info = parseInfoMigrate(
    "Migration status: completed\ntotal time: 1093 ms\ndowntime: 2 ms\nsetup: 0 ms\ntransferred ram: 73589 kbytes\n",
  );
  assert.deepEqual(info, {
    status: "completed",
    totalTimeMs: 1093,
    downtimeMs: 2,
    setupTimeMs: 0,
    ramTransferred: 73589 * 1024,
  });
  assert.equal(parseInfoMigrate("").status, "none");
});

test("writeCpioNewc writes newc headers, 4-byte alignment, devices and the trailer", () => {
  const a = writeCpioNewc([
    { name: "dev", mode: S_IFDIR | 0o755 },
    { name: "dev/console", mode: S_IFCHR | 0o600, rdev: [5, 1] },
    { name: "init", mode: S_IFREG | 0o755, data: Buffer.from("abcde") },
  ]);
  assert.equal(a.length % 4, 0);
  const s = a.toString("latin1");
  // Every record starts with the magic at a 4-byte aligned offset.
  const offs = [...s.matchAll(/070701/g)].map((m) => m.index ?? -1);
  assert.equal(offs.length, 4);
  for (const o of offs) assert.equal(o % 4, 0);
  // console: mode 0o20600, rdevmajor 5, rdevminor 1
  const con = offs[1] ?? 0;
  assert.equal(s.slice(con + 14, con + 22), (S_IFCHR | 0o600).toString(16).padStart(8, "0"));
  assert.equal(s.slice(con + 78, con + 86), "00000005");
  assert.equal(s.slice(con + 86, con + 94), "00000001");
  // init: filesize 5, data follows the padded name
  const ini = offs[2] ?? 0;
  assert.equal(s.slice(ini + 54, ini + 62), "00000005");
  assert.ok(s.includes("init\0\0abcde") || s.includes("init\0abcde"));
  assert.ok(s.includes("TRAILER!!!\0"));
});

test("checkTestAddress accepts only 192.0.2.0/24, 198.51.100.0/24 and fd00::/8", () => {
  assert.equal(checkTestAddress("192.0.2.7/24"), "192.0.2.7");
  assert.equal(checkTestAddress("198.51.100.1"), "198.51.100.1");
  assert.equal(checkTestAddress("fd00::1/64"), "fd00::1");
  for (const bad of ["10.0.0.1/24", "192.0.2.1/16", "8.8.8.8", "2001:db8::1/64", "fe80::1", "x"]) {
    assert.throws(() => checkTestAddress(bad), RangeError, bad);
  }
});

// ---- DPDK against DPDK ----

test(
  "virtio_user txonly -> vhost rxonly, 64-byte frames: counters move and match",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const { vh, vu } = await startPair(
        dir,
        peers,
        { forwardMode: "rxonly" },
        { forwardMode: "txonly", txPktLen: 64 },
      );
      await vh.start();
      await vu.start();
      await sleep(1000);
      const mid = await vh.port0();
      assert.ok(mid.rxPackets > 10_000, `vhost received only ${mid.rxPackets} packets in 1 s`);
      const fwdTx = await vu.stop();
      await sleep(200); // let the receiver drain the ring
      await vh.stop();
      const tx = await vu.port0();
      const rx = await vh.port0();
      assert.equal(fwdTx[0]?.txPackets, tx.txPackets);
      assert.equal(rx.rxPackets, tx.txPackets, "vhost received what virtio_user sent");
      assert.equal(rx.rxBytes, tx.txBytes);
      assert.equal(rx.rxBytes, rx.rxPackets * 64);
      assert.equal(rx.txPackets, 0);
    }),
);

test(
  "vhost txonly -> virtio_user rxonly, 64-byte frames: counters move and match",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const { vh, vu } = await startPair(
        dir,
        peers,
        { forwardMode: "txonly", txPktLen: 64 },
        { forwardMode: "rxonly" },
      );
      await vu.start();
      await vh.start();
      await sleep(1000);
      await vh.stop();
      await sleep(200);
      await vu.stop();
      const tx = await vh.port0();
      const rx = await vu.port0();
      assert.ok(tx.txPackets > 10_000, `vhost sent only ${tx.txPackets} packets in 1 s`);
      assert.equal(rx.rxPackets, tx.txPackets, "virtio_user received what vhost sent");
      assert.equal(rx.rxBytes, rx.rxPackets * 64);
    }),
);

test(
  "bounded count: exactly 100 packets (3 bursts of 32 + 1 of 4) arrive, no more",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const { vh, vu } = await startPair(
        dir,
        peers,
        { forwardMode: "rxonly" },
        { forwardMode: "txonly", txPktLen: 64 },
      );
      await vh.start();
      const sent = await vu.sendExactly(100);
      assert.deepEqual(sent, { txPackets: 100, txDropped: 0 });
      await sleep(300); // nothing else must arrive
      await vh.stop();
      const rx = await vh.port0();
      assert.equal(rx.rxPackets, 100);
      assert.equal(rx.rxBytes, 6400);
      const tx = await vu.port0();
      assert.equal(tx.txPackets, 100);
    }),
);

test(
  "packed_vq=1, queues=2, virtio_user server=1 / vhost client=1: both queues carry traffic",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const { vh, vu } = await startPair(
        dir,
        peers,
        { forwardMode: "rxonly" },
        { forwardMode: "txonly", txPktLen: 64 },
        { queues: 2, packed: true, reverseServer: true },
      );
      assert.match(vu.argv.join(" "), /packed_vq=1,server=1/);
      await vh.start();
      // 2 bursts of 32 on each of the 2 streams (one per queue).
      const fwd = await vu.sendBursts(2, 32);
      assert.equal(fwd[0]?.txPackets, 128);
      await sleep(200);
      await vh.stop();
      assert.equal((await vh.port0()).rxPackets, 128);
      // Per-queue counters: each RX queue of the vhost port got 64.
      const xs = await vh.command("show port xstats 0");
      for (const q of [0, 1]) {
        const m = new RegExp(`rx_q${q}_(?:good_)?packets:\\s+(\\d+)`).exec(xs);
        assert.ok(m !== null, `no rx_q${q} packets in xstats:\n${xs}`);
        assert.equal(Number(m[1]), 64, `rx queue ${q}`);
      }
      // Sustained traffic in packed mode too.
      await vh.clearStats();
      await vu.clearStats();
      await vu.setForwardMode("txonly");
      await vh.start();
      await vu.start();
      await sleep(500);
      await vu.stop();
      await sleep(200);
      await vh.stop();
      const rx = await vh.port0();
      assert.ok(rx.rxPackets > 10_000);
      assert.equal(rx.rxPackets, (await vu.port0()).txPackets);
    }),
);

test(
  "split rings, queues=2, 1500-byte frames from vhost to virtio_user",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const { vh, vu } = await startPair(
        dir,
        peers,
        { forwardMode: "txonly", txPktLen: 1500 },
        { forwardMode: "rxonly" },
        { queues: 2 },
      );
      await vu.start();
      const fwd = await vh.sendBursts(1, 16);
      assert.equal(fwd[0]?.txPackets, 32); // 16 per queue
      await sleep(200);
      await vu.stop();
      const rx = await vu.port0();
      assert.equal(rx.rxPackets, 32);
      assert.equal(rx.rxBytes, 32 * 1500);
    }),
);

// ---- QEMU ----

test(
  "a QEMU guest without NIC boots to the ready marker and runs commands with their status",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (_dir, peers) => {
      const image = await buildGuestImage();
      assert.deepEqual(image.modules, VIRTIO_NET_MODULES);
      const init = gunzipSync(await readFile(image.initrd));
      assert.ok(init.includes(Buffer.from("lib/modules/virtio_net.ko")));
      const g = await startGuest({ image, name: "boot" });
      peers.push(g);
      assert.deepEqual(await g.ready(), ["lo"]);
      assert.deepEqual(await g.run("echo hi"), { output: "hi\n", status: 0 });
      assert.equal((await g.run("exit 3")).status, 3);
      const mods = await g.run("lsmod");
      for (const m of VIRTIO_NET_MODULES) assert.match(mods.output, new RegExp(`^${m} `, "m"));
      const killed = await g.run("sleep 10", 1000);
      assert.equal(killed.status, 137, "the guest-side timeout kills a stuck command");
      const st = await g.qmp("query-status");
      assert.deepEqual(st, { status: "running", singlestep: false, running: true });
    }),
);

test(
  "a QEMU guest pings testpmd's icmpecho through vhost-user (testpmd vhost PMD as back-end)",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const sock = join(dir, "echo.sock");
      const tp = await startTestpmd({
        vdev: { kind: "vhost", iface: sock },
        forwardMode: "icmpecho",
        forwardLcore: 1,
        name: "echo",
      });
      peers.push(tp);
      await tp.ready();
      await tp.start();
      const g = await startGuest({
        name: "ping",
        nics: [{ socketPath: sock, guestAddrs: ["192.0.2.1/24"] }],
      });
      peers.push(g);
      assert.deepEqual(await g.ready(), ["eth0", "lo"]);
      assert.doesNotMatch(g.consoleOutput, /VK-NO-CARRIER|VK-INSMOD-FAILED/);
      const r = await g.run("ping -c 3 -W 2 192.0.2.2", 15_000);
      assert.equal(r.status, 0, r.output);
      assert.match(r.output, /3 packets transmitted, 3 packets received/);
      const s = await tp.port0();
      assert.ok(s.rxPackets >= 4, `testpmd saw ${s.rxPackets} packets (ARP + 3 echo requests)`);
      assert.ok(s.txPackets >= 4, `testpmd sent ${s.txPackets} packets (ARP + 3 echo replies)`);
    }),
);

test(
  "QEMU listening (server=on), testpmd vhost client=1, queues=2 + mq=on: the guest pings",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (dir, peers) => {
      const sock = join(dir, "mq.sock");
      // Linux uses min(queue pairs, vCPUs) queue pairs: two vCPUs to use both.
      const g = await startGuest({
        name: "mq",
        smp: 2,
        nics: [{ socketPath: sock, mode: "server", queues: 2, guestAddrs: ["198.51.100.1/24"] }],
      });
      peers.push(g);
      assert.match(g.argv.join(" "), /server=on,wait=off .*queues=2 .*mq=on/);
      await g.listening();
      const tp = await startTestpmd({
        vdev: { kind: "vhost", iface: sock, client: true, queues: 2 },
        forwardMode: "icmpecho",
        forwardLcore: 1,
        name: "echo-mq",
      });
      peers.push(tp);
      await tp.ready();
      await tp.start();
      await g.ready();
      const q = await g.run("ls /sys/class/net/eth0/queues");
      assert.equal(q.output.trim().split(/\s+/).sort().join(" "), "rx-0 rx-1 tx-0 tx-1");
      const r = await g.run("ping -c 2 -W 2 198.51.100.2", 15_000);
      assert.equal(r.status, 0, r.output);
      assert.match(r.output, /2 packets transmitted, 2 packets received/);
    }),
);

test(
  "a QEMU guest migrates to an -incoming destination and keeps its state",
  { skip: skipUnlessRoot, timeout: 30_000 },
  () =>
    withPeers(async (_dir, peers) => {
      const image = await buildGuestImage();
      const src = await startGuest({ image, name: "src" });
      peers.push(src);
      await src.ready();
      await src.run("echo before > /tmp/state");
      const port = await freeTcpPort();
      const dst = await startGuest({ image, name: "dst", incoming: `tcp:127.0.0.1:${port}` });
      peers.push(dst);
      await dst.waitStatus("inmigrate");
      const info = await src.migrate(`tcp:127.0.0.1:${port}`);
      assert.equal(info.status, "completed");
      assert.ok((info.totalTimeMs ?? 0) > 0 && info.downtimeMs !== undefined);
      const hmp = parseInfoMigrate(await src.hmp("info migrate"));
      assert.equal(hmp.status, "completed");
      assert.equal(hmp.totalTimeMs, info.totalTimeMs);
      await dst.waitStatus("running");
      assert.deepEqual(await dst.run("cat /tmp/state"), { output: "before\n", status: 0 });
    }),
);

// ---- network namespaces ----

test(
  "netns: veth between two namespaces pings; tap and vxlan are created; all removed after",
  { skip: skipUnlessRoot, timeout: 20_000 },
  async () => {
    let names: string[] = [];
    await withNetns(2, async ([a, b]) => {
      assert.ok(a !== undefined && b !== undefined);
      names = [a.name, b.name];
      const { devA } = await addVethPair(a, b, { addrA: "192.0.2.1/24", addrB: "192.0.2.2/24" });
      const r = await a.exec(["busybox", "ping", "-c", "1", "-W", "2", "192.0.2.2"]);
      assert.equal(r.status, 0, r.stderr + r.stdout);
      const tap = await a.addTap({ addr: "198.51.100.1/24" });
      const vx = await a.addVxlan({
        vni: 42,
        local: "192.0.2.1",
        remote: "192.0.2.2",
        dev: devA,
        addr: "fd00::1/64",
      });
      const links = await a.ip(["-br", "link"]);
      assert.match(links, new RegExp(`^${tap}\\s`, "m"));
      assert.match(links, new RegExp(`^${vx}\\s`, "m"));
      await assert.rejects(a.addAddress(tap, "10.1.1.1/24"), RangeError);
    });
    const list = await ip(["netns", "list"]);
    for (const n of names) assert.doesNotMatch(list, new RegExp(`\\b${n}\\b`));
  },
);
