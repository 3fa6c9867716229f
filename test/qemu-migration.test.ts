/**
 * Real QEMU 7.2 live migration between two vhostkit switches: a TCG guest on switch A
 * pings a host in a test namespace (behind a TAP uplink of switch A) without pause; QEMU
 * migrates it live to a QEMU (-incoming) attached to switch B; A and B are joined by a VXLAN
 * uplink over loopback. The migration completes and the pings go on with at most a few lost;
 * with `guest_announce=off` QEMU sends SEND_RARP, switch B broadcasts a RARP, and switch A's
 * MAC table moves the guest's MAC to the uplink. QEMU's downtime is printed, next to the same
 * scenario with DPDK testpmd's vhost PMD (icmpecho) as the back-ends.
 *
 * Needs root (TAP, namespaces); skipped otherwise, as the other real-peer tests.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";

import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort } from "../src/net/virtio-net.js";
import { openUplink, parseUplinkSpec } from "../src/net/uplink.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, SwitchPort } from "../src/net/port.js";
import { formatMac } from "../src/net/frame.js";
import { createNetns, ifName, ip } from "./peers/netns.js";
import type { Netns } from "./peers/netns.js";
import type { Guest, MigrationInfo } from "./peers/qemu.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { Testpmd } from "./peers/testpmd.js";
import { joinOverVxlan, startMigrationPair, withRig } from "./fixtures/qemu-migration-rig.js";
import { LineLogger, sleep, until } from "./helpers.js";

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
const skipUnlessRoot = isRoot ? false : "needs root (CI runs as root)";

const GUEST_MAC = "52:54:00:12:34:01";
const GUEST_IP = "192.0.2.1/24";
const PEER_IP = "192.0.2.2";
/** The guest's NIC on both sides: QEMU sends SEND_RARP after the migration. */
const NIC = { guestAnnounceOff: true, guestAddrs: [GUEST_IP], mac: GUEST_MAC };
/** Pings lost across the migration that still count as "a few". */
const MAX_LOST = 5;

/** A passive switch port that records what is flooded to it (to see the RARP). */
class ObserverPort implements SwitchPort {
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  readonly frames: Uint8Array[] = [];
  constructor(readonly name: string) {}
  deliver(frame: Frame): boolean {
    if (this.frames.length < 1000) this.frames.push(frame.data.slice());
    return true;
  }
}

function isRarpFrom(f: Uint8Array, mac: string): boolean {
  return (
    f.length >= 42 &&
    (f[12] as number) * 256 + (f[13] as number) === 0x8035 &&
    formatMac(f.subarray(6, 12)) === mac &&
    formatMac(f.subarray(0, 6)) === "ff:ff:ff:ff:ff:ff"
  );
}

/** Parse busybox ping's summary and the sequence numbers it got replies for. */
function parsePing(out: string): { sent: number; received: number; seqs: number[] } {
  const m = /(\d+) packets transmitted, (\d+) packets received/.exec(out);
  const seqs = [...out.matchAll(/seq=(\d+)/g)].map((x) => Number(x[1]));
  return { sent: Number(m?.[1] ?? -1), received: Number(m?.[2] ?? -1), seqs };
}

/**
 * The common part: the source guest pings the peer in the background; migrate; the destination
 * keeps pinging; stop ping and return its output with QEMU's figures.
 */
async function migrateWhilePinging(
  src: Guest,
  dst: Guest,
  port: number,
): Promise<{ info: MigrationInfo; ping: ReturnType<typeof parsePing>; output: string }> {
  const first = await src.run(`ping -c 2 -W 5 ${PEER_IP}`, 20_000);
  assert.equal(first.status, 0, `the peer answers before the migration: ${first.output}`);
  const bg = await src.run(
    `ping -i 0.2 ${PEER_IP} > /tmp/ping.log 2>&1 & echo $! > /tmp/ping.pid`,
    10_000,
  );
  assert.equal(bg.status, 0, bg.output);
  await sleep(2000);
  const info = await src.migrate(`tcp:127.0.0.1:${port}`, 120_000);
  assert.equal(info.status, "completed", `migration: ${JSON.stringify(info)}`);
  await dst.waitStatus("running", 30_000);
  // Pings go on on the destination for a while.
  await sleep(4000);
  const r = await dst.run("kill -INT $(cat /tmp/ping.pid); sleep 1; cat /tmp/ping.log", 20_000);
  return { info, ping: parsePing(r.output), output: r.output };
}

/** Downtimes measured here, printed side by side by the last test. */
const downtimes: {
  backend: string;
  downtimeMs: number | undefined;
  totalMs: number | undefined;
  lost: number;
}[] = [];

test(
  "QEMU live migration between two vhostkit switches: pings go on, RARP moves the MAC",
  { skip: skipUnlessRoot, timeout: 240_000 },
  () =>
    withRig("vk-qmig-", async (rig) => {
      const log = new LineLogger();
      const swA = new Switch({ logger: log });
      const swB = new Switch({ logger: log });
      rig.cleanups.push(
        () => swA.close(),
        () => swB.close(),
      );
      // Uplink A <-> B: VXLAN over loopback.
      const [vxA] = await joinOverVxlan(rig, swA, swB, 42, log);
      // The peer: a host in a test namespace behind a TAP uplink of switch A.
      const tapName = ifName("vkmt");
      const tap = await openUplink(swA, parseUplinkSpec(`tap:${tapName}`), log);
      rig.cleanups.push(() => tap.close());
      const ns: Netns = await createNetns("vkmig");
      rig.cleanups.push(() => ns.delete());
      await ip(["link", "set", tapName, "netns", ns.name]);
      await ns.addAddress(tapName, `${PEER_IP}/24`);
      const observer = new ObserverPort("observer");
      swA.addPort(observer);
      // The guest's ports.
      const sockA = join(rig.dir, "a.sock");
      const sockB = join(rig.dir, "b.sock");
      const portA: VhostUserPort = addVhostUserPort(swA, {
        path: sockA,
        name: "vm-a",
        logger: log,
      });
      const portB: VhostUserPort = addVhostUserPort(swB, {
        path: sockB,
        name: "vm-b",
        logger: log,
      });
      rig.cleanups.push(
        () => portA.close(),
        () => portB.close(),
      );
      const { src, dst, port } = await startMigrationPair(rig, {
        names: ["mig-src", "mig-dst"],
        srcSocket: sockA,
        dstSocket: sockB,
        nic: NIC,
      });
      try {
        const { info, ping, output } = await migrateWhilePinging(src, dst, port);
        const lost = ping.sent - ping.received;
        downtimes.push({
          backend: "vhostkit switch",
          downtimeMs: info.downtimeMs,
          totalMs: info.totalTimeMs,
          lost,
        });
        console.log(
          `vhostkit: QEMU migration downtime ${info.downtimeMs} ms, total ${info.totalTimeMs} ms, ` +
            `pings ${ping.received}/${ping.sent} (${lost} lost)`,
        );
        assert.ok(ping.sent >= 20, `ping ran across the migration: ${output}`);
        assert.ok(lost <= MAX_LOST, `at most ${MAX_LOST} pings lost: ${output}`);
        const lastSeq = Math.max(...ping.seqs);
        assert.ok(lastSeq >= ping.sent - 3, "replies keep coming after the migration");
        // SEND_RARP on B: port B broadcasts a RARP for the guest's MAC, which crosses the
        // uplink to A...
        await until(
          () => log.lines.some((l) => l.includes(`vm-b: RARP for ${GUEST_MAC}`)),
          "SEND_RARP from the destination QEMU",
          15_000,
        );
        await until(
          () => observer.frames.some((f) => isRarpFrom(f, GUEST_MAC)),
          "the RARP from switch B on switch A",
          15_000,
        );
        // ...and switch A now sends the guest's MAC to the uplink.
        await until(
          () => swA.macTable().find((e) => e.mac === GUEST_MAC)?.port === vxA.name,
          "switch A's MAC table to point the guest's MAC at the uplink",
          15_000,
        );
        assert.equal(swB.macTable().find((e) => e.mac === GUEST_MAC)?.port, "vm-b");
        // The source back-end logged its writes for QEMU while the RAM was copied.
        assert.ok(
          log.lines.some((l) => l.includes(sockA) && /dirty log of \d+ bytes/.test(l)),
          "SET_LOG_BASE on the source",
        );
        assert.ok(
          log.lines.some((l) => l.includes(sockA) && /dirty logging on/.test(l)),
          "VHOST_F_LOG_ALL on the source",
        );
        assert.equal(portA.device.up, false, "the source port is down after the switch-over");
        assert.equal(portB.device.up, true);
      } catch (e) {
        if (e instanceof Error)
          e.message += `\n(switch log tail:\n${log.lines.slice(-40).join("\n")})`;
        throw e;
      }
    }),
);

test(
  "the same migration with DPDK testpmd's vhost PMD (icmpecho) as the back-ends; downtimes side by side",
  { skip: skipUnlessRoot, timeout: 240_000 },
  () =>
    withRig("vk-qmig-", async (rig) => {
      const sockA = join(rig.dir, "tpa.sock");
      const sockB = join(rig.dir, "tpb.sock");
      const tps: Testpmd[] = [];
      rig.cleanups.push(async () => {
        for (const t of tps) await t.close();
      });
      for (const [sock, name] of [
        [sockA, "mig-a"],
        [sockB, "mig-b"],
      ] as const) {
        const tp = await startTestpmd({
          vdev: { kind: "vhost", iface: sock },
          forwardMode: "icmpecho",
          forwardLcore: 1,
          name,
        });
        tps.push(tp);
        await tp.ready();
        await tp.start();
      }
      const { src, dst, port } = await startMigrationPair(rig, {
        names: ["tp-src", "tp-dst"],
        srcSocket: sockA,
        dstSocket: sockB,
        nic: NIC,
      });
      const { info, ping, output } = await migrateWhilePinging(src, dst, port);
      const lost = ping.sent - ping.received;
      downtimes.push({
        backend: "DPDK vhost PMD",
        downtimeMs: info.downtimeMs,
        totalMs: info.totalTimeMs,
        lost,
      });
      assert.ok(ping.sent >= 20, `ping ran across the migration: ${output}`);
      assert.ok(lost <= MAX_LOST, `at most ${MAX_LOST} pings lost: ${output}`);
      console.log("QEMU 7.2 live migration, downtime as QEMU reports it:");
      for (const d of downtimes) {
        console.log(
          `  ${d.backend.padEnd(16)} downtime ${String(d.downtimeMs).padStart(5)} ms  ` +
            `total ${String(d.totalMs).padStart(6)} ms  pings lost ${d.lost}`,
        );
      }
    }),
);
