/**
 * Regression: "a direction stalls for good without busy polling", with VIRTIO_RING_F_EVENT_IDX.
 * DPDK 22.11's virtio_user never negotiates EVENT_IDX (test/switch-stall.test.ts runs the
 * testpmd loop without it), so this loop runs between two guests driven by vhostkit's own
 * front-end, each on one port of a switch: every frame a guest receives goes back out to the
 * other guest's MAC (testpmd's `mac` forwarding), primed with a burst of 32 frames per side.
 *
 * The guests run in a worker thread (test/fixtures/loop-guests-worker.ts), beside the switch in
 * this thread, so both sides touch the rings at the same time, and each transmitted frame is
 * published on its own, so publishes land while the switch works on the ring: a side that
 * stores its event index and does not look at the ring again loses a wake-up here. The guests
 * are event-driven, as a guest kernel's driver: they wait on their call eventfds and never
 * poll, honour the switch's avail_event (split) / device event structure (packed) before
 * kicking, and ask for calls with used_event / RING_EVENT_FLAGS_DESC at their next used
 * position when drained. A notification lost on either side (a kick the switch asked for and
 * did not get, a call the guest asked for and did not get) stops a direction for good.
 *
 * Split and packed rings, with and without MRG_RXBUF, with EVENT_IDX (and, for the same guests,
 * without it: flag-based suppression). Every 1 s interval of the run must see frames in both
 * directions, and the features read back from both sides must be the variant's.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Worker } from "node:worker_threads";

import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort } from "../src/net/virtio-net.js";
import { featureMask, VirtioFeature } from "../src/protocol/index.js";
import type {
  LoopGuestsInput,
  LoopGuestsReady,
  LoopGuestsReport,
} from "./fixtures/loop-guests-worker.js";
import { LineLogger } from "./helpers.js";

const MAC_A = "52:54:00:00:13:1a";
const MAC_B = "52:54:00:00:13:1b";
/** frames each guest sends to start the loop (testpmd's `start tx_first 32`) */
const PRIME = 32;
const RING_SIZE = 256;
const INTERVAL_MS = 1000;

interface Variant {
  packed: boolean;
  mrg: boolean;
  eventIdx: boolean;
  /** 1 s intervals checked */
  intervals: number;
}

const VARIANTS: readonly Variant[] = [false, true].flatMap((packed) =>
  [true, false].flatMap((mrg) => [
    { packed, mrg, eventIdx: true, intervals: 5 },
    { packed, mrg, eventIdx: false, intervals: 2 },
  ]),
);

function label(v: Variant): string {
  return (
    `${v.packed ? "packed" : "split"}, EVENT_IDX ${v.eventIdx ? "on" : "off"}, ` +
    `MRG_RXBUF ${v.mrg ? "on" : "off"}`
  );
}

const BIT = {
  eventIdx: featureMask(VirtioFeature.RING_EVENT_IDX),
  packed: featureMask(VirtioFeature.RING_PACKED),
  mrg: featureMask(VirtioFeature.MRG_RXBUF),
};

/** The worker's next message; rejects when it fails or exits first. */
function nextMessage<T>(worker: Worker, what: string, timeoutMs = 15_000): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const done = (): void => {
      clearTimeout(timer);
      worker.off("message", onMessage);
      worker.off("error", onError);
      worker.off("exit", onExit);
    };
    const onMessage = (m: unknown): void => {
      done();
      const e = (m as { error?: string }).error;
      if (e !== undefined) reject(new Error(`guests' worker, ${what}: ${e}`));
      else resolve(m as T);
    };
    const onError = (err: Error): void => {
      done();
      reject(err);
    };
    const onExit = (code: number): void => {
      done();
      reject(new Error(`guests' worker exited (${code}) before ${what}`));
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`guests' worker: timed out waiting for ${what}`));
    }, timeoutMs);
    worker.on("message", onMessage);
    worker.on("error", onError);
    worker.on("exit", onExit);
  });
}

async function waitFor(what: string, cond: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

for (const v of VARIANTS) {
  test(`switch stall: both directions of a front-end mac loop keep moving (${label(v)})`, async () => {
    const dir = mkdtempSync(join(tmpdir(), "vk-stall-evidx-"));
    const log = new LineLogger();
    const sw = new Switch({ logger: log });
    const ports: VhostUserPort[] = [];
    let worker: Worker | null = null;
    try {
      for (const name of ["a", "b"]) {
        const path = join(dir, `${name}.sock`);
        ports.push(addVhostUserPort(sw, { path, name, logger: log, mrgRxbuf: v.mrg }));
      }
      const [pa, pb] = ports as [VhostUserPort, VhostUserPort];
      const counts = new SharedArrayBuffer(8);
      const received = new Int32Array(counts); // [by A, by B]
      const input: LoopGuestsInput = {
        guests: [
          { name: "a", path: pa.server.path, mac: MAC_A, peerMac: MAC_B },
          { name: "b", path: pb.server.path, mac: MAC_B, peerMac: MAC_A },
        ],
        packed: v.packed,
        mrg: v.mrg,
        eventIdx: v.eventIdx,
        ringSize: RING_SIZE,
        prime: PRIME,
        received: counts,
      };
      worker = new Worker(new URL("./fixtures/loop-guests-worker.js", import.meta.url), {
        workerData: input,
      });
      const { ready } = await nextMessage<LoopGuestsReady>(worker, "the guests' start");
      await waitFor("both ports up", () => pa.device.up && pb.device.up);
      // the variant was negotiated as asked, read back from both sides
      ready.forEach((g, k) => {
        const fe = BigInt(g.features);
        const swf = (ports[k] as VhostUserPort).device.negotiatedFeatures;
        for (const [what, bit, want] of [
          ["EVENT_IDX", BIT.eventIdx, v.eventIdx],
          ["RING_PACKED", BIT.packed, v.packed],
          ["MRG_RXBUF", BIT.mrg, v.mrg],
        ] as const) {
          assert.equal((fe & bit) !== 0n, want, `${g.name}: front-end ${what}`);
          assert.equal((swf & bit) !== 0n, want, `${g.name}: switch ${what}`);
        }
        for (const q of g.queues) {
          assert.equal(q.eventIdx, v.eventIdx, `${g.name}: queue ${q.index} EVENT_IDX`);
          assert.equal(q.packed, v.packed, `${g.name}: queue ${q.index} packed`);
        }
      });
      worker.postMessage("prime");
      // frames received by B (A -> B) and by A (B -> A) per interval
      const now = (): number[] => [Atomics.load(received, 1), Atomics.load(received, 0)];
      const deltas: [number, number][] = [];
      let prev = now();
      for (let i = 0; i < v.intervals; i++) {
        await sleep(INTERVAL_MS);
        const cur = now();
        deltas.push([cur[0]! - prev[0]!, cur[1]! - prev[1]!]);
        prev = cur;
      }
      const stopped = nextMessage<LoopGuestsReport>(worker, "the report");
      worker.postMessage("stop");
      const { report } = await stopped;
      const rings = report.map((g, k) => {
        const p = ports[k] as VhostUserPort;
        return {
          ...g,
          switchRings: [0, 1].map((i) => {
            const s = p.server.session?.queue(i) as unknown as
              { kicks: number; calls: number } | undefined;
            return { index: i, kicks: s?.kicks, calls: s?.calls };
          }),
          switch: p.device.counters,
        };
      });
      const why =
        `frames per ${INTERVAL_MS} ms A->B/B->A: ` +
        `${deltas.map((d) => d.join("/")).join(" ")}\n${JSON.stringify(rings)}`;
      deltas.forEach(([ab, ba], i) => {
        assert.ok(ab > 0, `A -> B stalled in interval ${i + 1}: ${why}`);
        assert.ok(ba > 0, `B -> A stalled in interval ${i + 1}: ${why}`);
      });
    } catch (err) {
      (err as Error).message += `\n--- switch log ---\n${log.lines.slice(-30).join("\n")}`;
      throw err;
    } finally {
      if (worker) await worker.terminate();
      for (const p of ports) p.close();
      sw.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
