/**
 * Two DPDK testpmd virtio_user ports (real front-ends) attached to vhostkit's switch: a
 * bounded burst sent by one (`io` forwarding with `tx_first`) reaches the other (`rxonly`)
 * through the switch with no frame lost or altered, counted on both sides: testpmd's ethdev
 * counters and the switch's port counters agree exactly, in both directions. A third,
 * in-process port records what the switch floods, to check the bytes.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import type { Logger } from "../src/backend/device.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort } from "../src/net/virtio-net.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, SwitchPort } from "../src/net/port.js";
import { formatMac } from "../src/net/frame.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { Testpmd } from "./peers/testpmd.js";

function recordingLogger(lines: string[]): Logger {
  const push = (level: string) => (m: string) => void lines.push(`${level} ${m}`);
  return { debug: push("D"), info: push("I"), warn: push("W"), error: push("E") };
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A port that keeps a copy of every frame the switch gives it. */
class RecordingPort implements SwitchPort {
  readonly name = "recorder";
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  readonly frames: Uint8Array[] = [];
  deliver(frame: Frame): boolean {
    this.frames.push(frame.data.slice());
    return true;
  }
}

const MAC_A = "52:54:00:00:00:0a";
const MAC_B = "52:54:00:00:00:0b";

test(
  "testpmd virtio_user x2 through the switch: bounded bursts, none lost or altered, counters agree",
  { skip: process.getuid?.() !== 0 ? "needs root" : false },
  async () => {
    const dir = mkdtempSync(join(tmpdir(), "vk-dpdk-sw-"));
    const lines: string[] = [];
    const log = recordingLogger(lines);
    const sw = new Switch({ logger: log });
    const rec = new RecordingPort();
    sw.addPort(rec);
    const ports: VhostUserPort[] = [];
    const tps: Testpmd[] = [];
    try {
      const pa = addVhostUserPort(sw, { path: join(dir, "a.sock"), logger: log });
      const pb = addVhostUserPort(sw, { path: join(dir, "b.sock"), logger: log });
      ports.push(pa, pb);
      // the two testpmds poll on different cores
      const ta = await startTestpmd({
        vdev: { kind: "virtio_user", path: pa.server.path, mac: MAC_A },
        forwardMode: "io",
        forwardLcore: 1,
        name: "sw-a",
      });
      tps.push(ta);
      const tb = await startTestpmd({
        vdev: { kind: "virtio_user", path: pb.server.path, mac: MAC_B },
        forwardMode: "rxonly",
        forwardLcore: 0,
        name: "sw-b",
      });
      tps.push(tb);
      await Promise.all([ta.ready(), tb.ready()]);
      await Promise.all([ta.waitLinkUp(), tb.waitLinkUp()]);
      await waitFor("both ports up", () => pa.device.up && pb.device.up);
      await ta.clearStats();
      await tb.clearStats();

      // A -> B: 4 rounds of 160 frames (each round within the 256-entry rings)
      await tb.start();
      let sentA = 0;
      for (let round = 0; round < 4; round++) {
        const s = await ta.sendExactly(160);
        assert.equal(s.txDropped, 0, "testpmd A dropped nothing");
        sentA += s.txPackets;
      }
      assert.equal(sentA, 640);
      await waitFor(
        `${sentA} frames through the switch`,
        () => pb.device.counters.txPackets >= sentA,
      );
      await new Promise((r) => setTimeout(r, 300));
      await tb.stop();
      const [a1] = await ta.stats();
      const [b1] = await tb.stats();
      assert.ok(a1 && b1);
      assert.equal(a1.txPackets, sentA, "testpmd A's ethdev tx counter");
      assert.equal(pa.device.counters.rxPackets, sentA, "the switch received every frame from A");
      assert.equal(pb.device.counters.txPackets, sentA, "the switch delivered every frame to B");
      assert.equal(b1.rxPackets, sentA, "testpmd B received every frame");
      assert.equal(
        pa.device.counters.rxBytes,
        a1.txBytes,
        "bytes out of A = bytes into the switch",
      );
      assert.equal(
        pb.device.counters.txBytes,
        b1.rxBytes,
        "bytes out of the switch = bytes into B",
      );
      assert.equal(pa.device.counters.rxBytes, pb.device.counters.txBytes);
      assert.equal(b1.rxErrors + b1.rxMissed + b1.rxNombuf, 0);
      for (const p of [pa, pb]) {
        assert.equal(
          Object.values(p.device.counters.drops).reduce((x, y) => x + y),
          0,
          `${p.device.name}: no drops`,
        );
      }
      // what the switch forwarded is testpmd's txonly frame, unaltered: same bytes every time
      assert.equal(rec.frames.length, sentA);
      const first = rec.frames[0] as Uint8Array;
      assert.equal(first.length, 64);
      assert.equal(formatMac(first.subarray(6, 12)), MAC_A, "source MAC of testpmd A");
      for (const f of rec.frames) assert.deepEqual(f, first);
      assert.equal(
        sw.macTable().find((r) => r.mac === MAC_A)?.port,
        pa.device.name,
        "A's MAC learned on its port",
      );

      // B -> A: the other way round
      await ta.setForwardMode("rxonly");
      await ta.clearStats();
      await tb.clearStats();
      await ta.start();
      const rxA0 = pa.device.counters.txPackets;
      const s = await tb.sendExactly(200);
      assert.equal(s.txDropped, 0);
      await waitFor("B's frames at A", () => pa.device.counters.txPackets - rxA0 >= s.txPackets);
      await new Promise((r) => setTimeout(r, 300));
      await ta.stop();
      const [a2] = await ta.stats();
      const [b2] = await tb.stats();
      assert.ok(a2 && b2);
      assert.equal(b2.txPackets, 200);
      assert.equal(pb.device.counters.rxPackets, 200);
      assert.equal(pa.device.counters.txPackets - rxA0, 200);
      assert.equal(a2.rxPackets, 200, "testpmd A received every frame from B");
      assert.equal(rec.frames.length, sentA + 200);
    } catch (err) {
      (err as Error).message +=
        `\n--- switch log ---\n${lines.slice(-40).join("\n")}` +
        tps.map((t) => `\n--- testpmd ${t.filePrefix} ---\n${t.tail(20)}`).join("");
      throw err;
    } finally {
      for (const t of tps) await t.close();
      for (const p of ports) p.close();
      sw.close();
      rmSync(dir, { recursive: true, force: true });
    }
  },
);
