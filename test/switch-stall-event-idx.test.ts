/**
 * Regression: "a direction stalls for good without busy polling", with VIRTIO_RING_F_EVENT_IDX.
 * DPDK 22.11's virtio_user never negotiates EVENT_IDX (test/switch-stall.test.ts runs the
 * testpmd loop without it), so this loop runs between two guests driven by vhostkit's own
 * front-end, each on one port of a switch: every frame a guest receives goes back out to the
 * other guest's MAC (testpmd's `mac` forwarding), primed with a burst of 32 frames per side.
 *
 * The guests are event-driven, as a guest kernel's driver: they wait on their call eventfds
 * and never poll, honour the switch's avail_event (split) / device event structure (packed)
 * before kicking, and ask for calls with used_event / RING_EVENT_FLAGS_DESC at their next used
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

import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { parseMac } from "../src/net/frame.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import type { VhostUserPort } from "../src/net/virtio-net.js";
import { featureMask, featureSet, VirtioFeature } from "../src/protocol/index.js";
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

/** One event-driven mac-forwarding guest on a switch port. */
interface LoopGuest {
  readonly name: string;
  readonly port: VhostUserPort;
  readonly fe: VhostUserFrontend;
  readonly rx: FrontendQueue;
  readonly tx: FrontendQueue;
  /** frames received so far */
  received: number;
  /** frames received and not yet in the transmit ring (it was full) */
  readonly backlog: Uint8Array[];
  /** Send `count` frames to the peer and start forwarding. */
  prime(count: number): void;
  close(): void;
}

async function attachLoopGuest(
  sw: Switch,
  dir: string,
  name: string,
  mac: string,
  peerMac: string,
  v: Variant,
  log: LineLogger,
): Promise<LoopGuest> {
  const port = addVhostUserPort(sw, {
    path: join(dir, `${name}.sock`),
    name,
    logger: log,
    mrgRxbuf: v.mrg,
  });
  let fe: VhostUserFrontend | null = null;
  let ram: GuestRam | null = null;
  try {
    fe = await VhostUserFrontend.connect(port.server.path, {
      timeoutMs: 3000,
      requestTimeoutMs: 5000,
    });
    let wanted = featureSet(VirtioFeature.VERSION_1);
    if (v.eventIdx) wanted |= BIT.eventIdx;
    if (v.packed) wanted |= BIT.packed;
    if (v.mrg) wanted |= BIT.mrg;
    await fe.negotiate({ features: wanted });
    ram = GuestRam.create({ size: 8 << 20, name: `vk-stall-${name}` });
    const [rx, tx] = (await fe.start(ram, [RING_SIZE, RING_SIZE])) as [
      FrontendQueue,
      FrontendQueue,
    ];
    const own = parseMac(mac);
    const peer = parseMac(peerMac);
    const backlog: Uint8Array[] = [];
    const pump = (): void => {
      let added = false;
      while (backlog.length > 0) {
        if (tx.addFrame(backlog[0] as Uint8Array) === null) break;
        backlog.shift();
        added = true;
      }
      // one kick per batch, only when the switch asked for it (avail_event / event structure)
      if (added) tx.kick();
    };
    const feRef = fe;
    const ramRef = ram;
    const g: LoopGuest = {
      name,
      port,
      fe,
      rx,
      tx,
      received: 0,
      backlog,
      prime(count: number): void {
        for (let i = 0; i < count; i++) {
          const f = new Uint8Array(60);
          f.set(peer, 0);
          f.set(own, 6);
          f.set([0x88, 0xb5, i], 12); // local experimental ethertype, sequence number
          backlog.push(f);
        }
        pump();
      },
      close(): void {
        feRef.close();
        port.close();
        ramRef.close();
      },
    };
    // Woken only by the call eventfds: a call that does not come stops this guest.
    rx.onCall(() => {
      const frames = rx.receiveFrames(); // drained: used_event / DESC set at the next one
      if (frames.length === 0) return;
      g.received += frames.length;
      for (const f of frames) {
        // `mac` forwarding: to the peer, from us (each frame is a copy out of guest RAM)
        f.set(peer, 0);
        f.set(own, 6);
        backlog.push(f);
      }
      pump();
      rx.postRxBuffers(rx.size - rx.outstanding);
    });
    tx.onCall(() => {
      tx.reclaim();
      pump();
    });
    rx.postRxBuffers(rx.size);
    return g;
  } catch (err) {
    fe?.close();
    port.close();
    ram?.close();
    throw err;
  }
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
    const guests: LoopGuest[] = [];
    try {
      const a = await attachLoopGuest(sw, dir, "a", MAC_A, MAC_B, v, log);
      guests.push(a);
      const b = await attachLoopGuest(sw, dir, "b", MAC_B, MAC_A, v, log);
      guests.push(b);
      await waitFor("both ports up", () => a.port.device.up && b.port.device.up);
      // the variant was negotiated as asked, read back from both sides
      for (const g of [a, b]) {
        const fe = g.fe.ackedFeatures ?? 0n;
        const sw = g.port.device.negotiatedFeatures;
        for (const [what, bit, want] of [
          ["EVENT_IDX", BIT.eventIdx, v.eventIdx],
          ["RING_PACKED", BIT.packed, v.packed],
          ["MRG_RXBUF", BIT.mrg, v.mrg],
        ] as const) {
          assert.equal((fe & bit) !== 0n, want, `${g.name}: front-end ${what}`);
          assert.equal((sw & bit) !== 0n, want, `${g.name}: switch ${what}`);
        }
        for (const q of [g.rx, g.tx]) {
          assert.equal(q.eventIdx, v.eventIdx, `${g.name}: queue ${q.index} EVENT_IDX`);
          assert.equal(q.packed, v.packed, `${g.name}: queue ${q.index} packed`);
        }
      }
      a.prime(PRIME);
      b.prime(PRIME);
      // frames received by B (A -> B) and by A (B -> A) per interval
      const deltas: [number, number][] = [];
      let prev = [b.received, a.received];
      for (let i = 0; i < v.intervals; i++) {
        await sleep(INTERVAL_MS);
        const cur = [b.received, a.received];
        deltas.push([cur[0]! - prev[0]!, cur[1]! - prev[1]!]);
        prev = cur;
      }
      const rings = guests.map((g) => ({
        guest: g.name,
        backlog: g.backlog.length,
        queues: [g.rx, g.tx].map((q) => {
          const s = g.port.server.session?.queue(q.index) as unknown as
            { kicks: number; calls: number } | undefined;
          return {
            index: q.index,
            outstanding: q.outstanding,
            fe: q.stats,
            sw: { kicks: s?.kicks, calls: s?.calls },
          };
        }),
        switch: g.port.device.counters,
      }));
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
      for (const g of guests) g.close();
      sw.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
