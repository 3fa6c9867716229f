/**
 * DPDK testpmd's virtio_user PMD (a real front-end) against a vhostkit back-end.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { BackendServer } from "../src/backend/server.js";
import type { Logger } from "../src/backend/device.js";

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

interface Case {
  name: string;
  packed: boolean;
  queues: number;
  count: number;
}

const cases: Case[] = [
  { name: "split ring", packed: false, queues: 1, count: 1000 },
  { name: "packed ring (packed_vq=1)", packed: true, queues: 1, count: 1000 },
  { name: "two queue pairs (queues=2)", packed: false, queues: 2, count: 640 },
];

for (const c of cases) {
  test(`testpmd virtio_user -> vhostkit sink: ${c.name}: N sent, N counted`, async () => {
    const dir = mkdtempSync(join(tmpdir(), "vk-dpdk-"));
    const path = join(dir, "sink.sock");
    const lines: string[] = [];
    const device = new NetTestDevice({ mode: "sink", queuePairs: c.queues });
    let server: BackendServer | null = null;
    const tp = await startTestpmd({
      vdev: { kind: "virtio_user", path, queues: c.queues, packed: c.packed, server: true },
      forwardMode: "io",
      name: "vu-sink",
    });
    try {
      await tp.listening();
      server = serveBackend(device, { path, client: true, logger: recordingLogger(lines) });
      await tp.ready();
      // Rounds no larger than the ring, so testpmd never finds its TX ring full.
      let expected = 0;
      for (let sentSoFar = 0; sentSoFar < c.count; sentSoFar += 200) {
        const sent = await tp.sendExactly(Math.min(200, c.count - sentSoFar));
        assert.equal(sent.txDropped, 0, "testpmd dropped nothing");
        // start tx_first sends on every TX queue: each queue pair gets the frames.
        expected += sent.txPackets;
      }
      assert.ok(expected >= c.count, `testpmd sent ${expected}`);
      await waitFor(`${expected} frames at the device`, () => device.totalTx >= expected);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(device.totalTx, expected, "every frame counted once");
      if (c.queues > 1) {
        for (const [i, counters] of device.counters.entries()) {
          assert.ok(counters.txPackets > 0, `queue pair ${i} carried traffic`);
        }
      }
      const s = server.session;
      assert.ok(s, "a session is connected");
      assert.equal(
        s.vrings.some((v) => v.broken),
        false,
        "no ring broken",
      );
      assert.ok(
        lines.some((l) => l.includes("features 0x")),
        "negotiation was logged",
      );
    } catch (err) {
      (err as Error).message +=
        `\n--- back-end log ---\n${lines.join("\n")}\n--- testpmd ---\n${tp.tail(30)}`;
      throw err;
    } finally {
      await tp.close();
      server?.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("testpmd virtio_user -> vhostkit echo: frames come back unaltered", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-dpdk-"));
  const path = join(dir, "echo.sock");
  const lines: string[] = [];
  const device = new NetTestDevice({ mode: "echo", keepFrames: true });
  let server: BackendServer | null = null;
  const tp = await startTestpmd({
    vdev: { kind: "virtio_user", path, server: true },
    forwardMode: "io",
    name: "vu-echo",
  });
  try {
    await tp.listening();
    server = serveBackend(device, { path, client: true, logger: recordingLogger(lines) });
    await tp.ready();
    await tp.clearStats();
    // io forwarding sends back what it receives, so the frames circulate between testpmd and
    // the echo device until testpmd stops; then every counter on both sides must agree.
    await tp.sendExactly(64);
    await new Promise((r) => setTimeout(r, 300));
    const st = await tp.port0();
    assert.ok(st.txPackets >= 64, `testpmd sent ${st.txPackets}`);
    assert.equal(device.totalTx, st.txPackets, "the device received every frame testpmd sent");
    // Echoes delivered after testpmd stopped polling stay in its RX ring (256 entries).
    const unread = device.totalRx - st.rxPackets;
    assert.ok(
      unread >= 0 && unread <= 256,
      `echoed ${device.totalRx}, testpmd read ${st.rxPackets}`,
    );
    assert.equal(st.rxErrors, 0);
    assert.ok(device.frames.length >= 64);
    const first = device.frames[0]!;
    assert.equal(first.length, 64, "64-byte frames");
    for (const f of device.frames)
      assert.deepEqual(f, first, "frames unaltered by the round trips");
  } catch (err) {
    (err as Error).message +=
      `\n--- back-end log ---\n${lines.join("\n")}\n--- testpmd ---\n${tp.tail(30)}`;
    throw err;
  } finally {
    await tp.close();
    server?.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
