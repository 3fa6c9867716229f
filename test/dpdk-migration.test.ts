/**
 * Live migration with DPDK testpmd's vhost PMD as the back-end on both ends (dirty log only:
 * DPDK 22.11 has no DEVICE_STATE): a vhostkit front-end sends sequence-numbered frames that
 * testpmd A echoes back (io forwarding, loop topology), migrates to testpmd B over TCP while
 * traffic runs, and goes on there. Checks: every transmit descriptor completes exactly once
 * across both sides, no echoed frame arrives twice, guest RAM (written by DPDK through the
 * receive ring, tracked by its dirty log) hashes equal on both sides, SEND_RARP sent.
 */
import { test } from "node:test";
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { SeqTrafficGuest, migrateSource, receiveMigration } from "../src/orchestrator/index.js";
import type { IncomingResult } from "../src/orchestrator/index.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { Testpmd } from "./peers/testpmd.js";
import { until } from "./helpers.js";

const F_MAC = new Uint8Array([2, 0, 0, 0, 0, 0x33]);

function connect(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
    s.once("error", reject);
  });
}

test(
  "migration between two DPDK vhost PMD back-ends (dirty log only)",
  { skip: process.getuid?.() !== 0 ? "needs root" : false },
  async (t: TestContext) => {
    const dir = mkdtempSync(join(tmpdir(), "vk-dpdk-mig-"));
    const tps: Testpmd[] = [];
    let fe: VhostUserFrontend | null = null;
    let ram: GuestRam | null = null;
    let dst: IncomingResult | null = null;
    let server: Server | null = null;
    const gens: SeqTrafficGuest[] = [];
    try {
      const common = { forwardMode: "io" as const, extraAppArgs: ["--port-topology=loop"] };
      const [tpA, tpB] = await Promise.all([
        startTestpmd({
          ...common,
          vdev: { kind: "vhost", iface: join(dir, "a.sock"), queues: 1 },
          forwardLcore: 0,
          name: "mig-a",
        }),
        startTestpmd({
          ...common,
          vdev: { kind: "vhost", iface: join(dir, "b.sock"), queues: 1 },
          forwardLcore: 1,
          name: "mig-b",
        }),
      ]);
      tps.push(tpA, tpB);
      await Promise.all([tpA.ready(), tpB.ready()]);
      fe = await VhostUserFrontend.connect(join(dir, "a.sock"), { timeoutMs: 5000 });
      const neg = await fe.negotiate();
      t.diagnostic(
        `DPDK offers 0x${neg.offeredFeatures.toString(16)}, protocol 0x${neg.offeredProtocolFeatures.toString(16)}`,
      );
      ram = GuestRam.create({ size: 8 << 20, name: "dpdk-mig" });
      await fe.start(ram, [256, 256]);
      const filler = ram.alloc(1 << 20, 4096);
      ram.write(
        filler,
        Uint8Array.from({ length: 1 << 20 }, (_, i) => (i * 7 + 3) & 0xff),
      );
      await tpA.waitLinkUp();
      await tpA.start();
      // No limit: the source sends until it is paused at the stop, however long pre-copy
      // takes, so that the destination always has frames left to send.
      const gen = new SeqTrafficGuest(fe, { srcMac: F_MAC, burst: 16, record: true });
      gens.push(gen);
      gen.start();
      await until(() => gen.received > 300, "echoes from testpmd A", 8000);

      let incoming: Promise<IncomingResult> | null = null;
      server = createServer({ noDelay: true }, (s) => {
        incoming = receiveMigration({
          stream: s,
          connectBackend: () => VhostUserFrontend.connect(join(dir, "b.sock"), { timeoutMs: 5000 }),
        });
      });
      await new Promise<void>((r) => (server as Server).listen(0, "127.0.0.1", r));
      const port = (server.address() as AddressInfo).port;
      const res = await migrateSource({
        frontend: fe,
        stream: await connect(port),
        guest: gen,
        deviceFields: F_MAC,
        verifyMemory: true,
      });
      gen.stop();
      dst = await (incoming as unknown as Promise<IncomingResult>);
      t.diagnostic(
        `downtime ${res.downtimeMs.toFixed(1)} ms, total ${res.totalMs.toFixed(1)} ms, ` +
          `${res.iterations} iterations, ${res.pagesSent} pages`,
      );
      assert.equal(res.deviceStateTransferred, false, "DPDK has no DEVICE_STATE");
      assert.equal(dst.memoryVerified, true, "RAM identical on both sides at switch-over");
      assert.equal(dst.rarpSent, true, "DPDK offers RARP and the driver lacks GUEST_ANNOUNCE");
      assert.ok(res.iterations >= 2);
      await tpB.waitLinkUp();
      await tpB.start();
      assert.ok(dst.guestState !== null);
      const gen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState);
      gens.push(gen2);
      gen2.start();
      const target = gen.nextSeq + 2000;
      await until(() => gen2.completed > 0 && gen2.nextSeq >= target, "B sent 2000 more", 10_000);
      gen2.stop();
      await until(() => gen2.drain() === 0, "drained", 8000);
      const total = gen2.nextSeq;
      await until(() => gen.received + gen2.received >= total - 512, "echoes from B", 5000);
      const tx = [...gen.completedSeqs, ...gen2.completedSeqs].sort((a, b) => a - b);
      assert.equal(tx.length, total, "every TX descriptor completed");
      tx.forEach((s, i) => assert.equal(s, i, `TX sequence ${i} exactly once`));
      assert.ok(gen2.completedSeqs.length > 0);
      const rx = [...gen.receivedSeqs, ...gen2.receivedSeqs];
      assert.equal(new Set(rx).size, rx.length, "no echo delivered twice");
      assert.ok(gen2.received > 0, "testpmd B echoes");
      const [b] = await tpB.stats();
      assert.ok((b?.rxPackets ?? 0) > 0, "testpmd B received frames after the switch-over");
    } catch (err) {
      if (err instanceof Error) {
        for (const tp of tps) err.message += `\n--- testpmd ---\n${tp.tail(30)}`;
      }
      throw err;
    } finally {
      for (const g of gens) g.stop();
      server?.close();
      fe?.close();
      dst?.frontend.close();
      dst?.ram.close();
      for (const tp of tps) await tp.close();
      ram?.close();
      rmSync(dir, { recursive: true, force: true });
    }
  },
);
