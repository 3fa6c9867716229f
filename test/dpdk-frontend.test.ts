/**
 * vhostkit's front-end (VhostUserFrontend) driving DPDK testpmd's vhost PMD as its back-end:
 * negotiation completes, frames the front-end transmits are counted exactly by testpmd
 * (rxonly), frames testpmd sends (io + tx_first: a bounded count) are received exactly, and
 * frames echoed by io forwarding come back unaltered. Split and packed rings; testpmd
 * listening (vhost PMD server mode) and connecting (`client=1`).
 */
import { test } from "node:test";
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import {
  ProtocolFeature,
  VirtioFeature,
  featureSet,
  hasFeature,
} from "../src/protocol/constants.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { Testpmd } from "./peers/testpmd.js";
import { sleep } from "./helpers.js";

/** A 64-byte broadcast frame carrying `seq` at offset 14. */
function frame(seq: number, len = 64): Uint8Array {
  const f = new Uint8Array(len);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 3, 0x88, 0xb5]);
  new DataView(f.buffer).setUint32(14, seq, true);
  for (let i = 18; i < len; i++) f[i] = (i * 13 + seq) & 0xff;
  return f;
}

function seqOf(f: Uint8Array): number {
  return new DataView(f.buffer, f.byteOffset, f.byteLength).getUint32(14, true);
}

/** Transmit `frames` through `tx`, kicking once per batch and reclaiming used buffers. */
async function transmit(tx: FrontendQueue, frames: Uint8Array[], timeoutMs = 8000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let next = 0;
  while (next < frames.length) {
    if (Date.now() > deadline) throw new Error(`transmit: ${next} of ${frames.length} added`);
    let added = 0;
    while (next < frames.length && tx.addFrame(frames[next]!) !== null) {
      next++;
      added++;
    }
    if (added > 0) tx.kick();
    else await sleep(2);
    tx.reclaim();
  }
}

/** Collect frames from `rx` until `count` arrived (re-posting buffers), or time out. */
async function receive(rx: FrontendQueue, count: number, timeoutMs = 8000): Promise<Uint8Array[]> {
  const got: Uint8Array[] = [];
  const deadline = Date.now() + timeoutMs;
  while (got.length < count) {
    if (Date.now() > deadline) throw new Error(`receive: ${got.length} of ${count} frames`);
    const room = rx.size - rx.outstanding;
    if (room > 0) rx.postRxBuffers(room);
    try {
      await rx.waitForUsed(100);
    } catch {
      // poll again
    }
    got.push(...rx.receiveFrames());
  }
  return got;
}

/** Wait until testpmd's port 0 counters satisfy `cond`. */
async function waitStats(
  tp: Testpmd,
  what: string,
  cond: (rx: number, tx: number) => boolean,
  timeoutMs = 8000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await tp.port0();
    if (cond(s.rxPackets, s.txPackets)) return;
    if (Date.now() > deadline) {
      throw new Error(`testpmd: ${what}: rx=${s.rxPackets} tx=${s.txPackets}`);
    }
    await sleep(50);
  }
}

/** Names of the bits set in `mask`, from a numeric enum (bit number -> name). */
function bitNames(mask: bigint, names: Record<number, string>): string {
  const out: string[] = [];
  for (let b = 0; b < 64; b++) {
    if ((mask >> BigInt(b)) & 1n) out.push(names[b] ?? `bit${b}`);
  }
  return out.join(",");
}

const WANTED = featureSet(
  VirtioFeature.VERSION_1,
  VirtioFeature.RING_EVENT_IDX,
  VirtioFeature.MAC,
  VirtioFeature.STATUS,
);

interface Case {
  packed: boolean;
  /** testpmd connects to our listening front-end (vhost PMD `client=1`) */
  client: boolean;
}

const cases: Case[] = [
  { packed: false, client: false },
  { packed: true, client: false },
  { packed: false, client: true },
];

for (const c of cases) {
  const label = `${c.packed ? "packed" : "split"} ring, testpmd ${c.client ? "client=1" : "listening"}`;
  test(`vhostkit front-end -> testpmd vhost PMD (${label}): negotiation and frames both ways`, async (t: TestContext) => {
    const dir = mkdtempSync(join(tmpdir(), "vk-dpdk-fe-"));
    const sock = join(dir, "vhost.sock");
    const tp = await startTestpmd({
      vdev: { kind: "vhost", iface: sock, queues: 1, client: c.client },
      forwardMode: "rxonly",
      txPktLen: 64,
      name: "fe-vhost",
    });
    let fe: VhostUserFrontend | null = null;
    let ram: GuestRam | null = null;
    try {
      if (c.client) {
        const listening = VhostUserFrontend.listen(sock, { timeoutMs: 15_000 });
        await tp.ready();
        fe = await listening;
      } else {
        await tp.ready();
        fe = await VhostUserFrontend.connect(sock, { timeoutMs: 5000, requestTimeoutMs: 5000 });
      }
      const wanted = WANTED | (c.packed ? featureSet(VirtioFeature.RING_PACKED) : 0n);
      const neg = await fe.negotiate({ features: wanted });
      t.diagnostic(
        `DPDK vhost PMD offered features 0x${neg.offeredFeatures.toString(16)}, ` +
          `protocol 0x${neg.offeredProtocolFeatures.toString(16)}; negotiated 0x${neg.features.toString(16)}, ` +
          `protocol 0x${neg.protocolFeatures.toString(16)}` +
          ` (${bitNames(neg.features, VirtioFeature)}; ${bitNames(neg.protocolFeatures, ProtocolFeature)})`,
      );
      assert.ok(hasFeature(neg.features, VirtioFeature.VERSION_1), "VERSION_1 negotiated");
      assert.ok(hasFeature(neg.features, VirtioFeature.PROTOCOL_FEATURES), "F_PROTOCOL_FEATURES");
      assert.equal(
        hasFeature(neg.features, VirtioFeature.RING_PACKED),
        c.packed,
        "ring format as asked",
      );
      assert.notEqual(neg.protocolFeatures, 0n, "protocol features negotiated");

      ram = GuestRam.create({ size: 8 << 20, name: "dpdk-fe" });
      const [rx, tx] = await fe.start(ram, [256, 256]);
      assert.ok(rx && tx);
      assert.equal(rx.packed, c.packed);
      await tp.waitLinkUp();

      // 1. front-end -> testpmd rxonly: exactly N counted.
      const n = 1000;
      await tp.clearStats();
      await tp.start();
      const sent = Array.from({ length: n }, (_, i) => frame(i));
      await transmit(tx, sent);
      await waitStats(tp, `${n} frames received`, (r) => r >= n);
      await sleep(200);
      await tp.stop();
      const afterTx = await tp.port0();
      assert.equal(afterTx.rxPackets, n, "testpmd counted every frame once");
      assert.equal(afterTx.rxBytes, n * 64, "64 bytes each");
      assert.equal(afterTx.txPackets, 0, "rxonly sent nothing");
      tx.reclaim();

      // 2. testpmd -> front-end: a bounded count (io + tx_first), received exactly.
      rx.postRxBuffers(rx.size - rx.outstanding);
      await tp.clearStats();
      const m = 200;
      const fromDpdk = await tp.sendExactly(m);
      assert.equal(fromDpdk.txDropped, 0, "testpmd found room for every frame");
      assert.equal(fromDpdk.txPackets, m);
      const got = await receive(rx, m);
      await sleep(200);
      got.push(...rx.receiveFrames());
      assert.equal(got.length, m, "every frame testpmd sent arrived once");
      for (const f of got) assert.equal(f.length, 64, "64-byte frames from txonly's generator");

      // 3. io forwarding: our frames come back unaltered.
      await tp.clearStats();
      await tp.setForwardMode("io");
      // Room for every echo before testpmd forwards (it drops what finds the ring full).
      rx.postRxBuffers(rx.size - rx.outstanding);
      assert.ok(rx.outstanding >= 100, `${rx.outstanding} receive buffers posted`);
      await tp.start();
      const k = 100;
      const echo = Array.from({ length: k }, (_, i) => frame(100_000 + i, 60 + (i % 200)));
      await transmit(tx, echo);
      const back = await receive(rx, k);
      const [echoStats] = await tp.stop();
      assert.equal(echoStats?.txDropped, 0, "our RX ring had room for every echo");
      assert.equal(back.length, k, "every frame echoed once");
      back.sort((a, b) => seqOf(a) - seqOf(b));
      for (let i = 0; i < k; i++) {
        assert.deepEqual(back[i], echo[i], `echoed frame ${i} unaltered`);
      }
      const st = await tp.port0();
      assert.equal(st.rxPackets, k);
      assert.equal(st.txPackets, k);

      // 4. ring stop: GET_VRING_BASE from DPDK returns the position we reached.
      const base = await fe.stopQueue(1);
      if (!c.packed) {
        assert.equal(base.availIdx, (n + k) & 0xffff, "DPDK's next avail index on TX");
      } else {
        assert.equal(base.availIdx, (n + k) % 256, "packed TX position");
      }
    } catch (err) {
      (err as Error).message += `\n--- testpmd ---\n${tp.tail(40)}`;
      throw err;
    } finally {
      fe?.close();
      await tp.close();
      ram?.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
