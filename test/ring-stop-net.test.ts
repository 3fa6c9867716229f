/**
 * The virtio-net port at a ring stop (vhost-user: "the back-end stops the ring on
 * GET_VRING_BASE"): receive chains it holds for a frame that did not fit are given back at
 * once by a cancel (the avail position rewound over them), not after the held-chain timer, so
 * a migration's GET_VRING_BASE does not wait for them and the guest's buffers are taken again
 * after the restart. Split and packed rings.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { serveBackend } from "../src/backend/server.js";
import type { BackendSession } from "../src/backend/session.js";
import { silentLogger } from "../src/backend/device.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { Switch } from "../src/net/switch.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { newPortCounters, newPortOffloads } from "../src/net/port.js";
import type { Frame, SwitchPort } from "../src/net/port.js";
import { until } from "./helpers.js";

const GUEST_MAC = "52:54:00:12:34:56";

/** Another port on the switch (the frames' source). */
class PeerPort implements SwitchPort {
  readonly offloads = newPortOffloads(false);
  readonly counters = newPortCounters();
  readonly up = true;
  constructor(readonly name: string) {}
  deliver(_frame: Frame): boolean {
    return true;
  }
}

/** A broadcast frame of `len` bytes with `seq` in its payload. */
function frame(seq: number, len: number): Uint8Array {
  const f = new Uint8Array(len);
  f.fill(0xff, 0, 6);
  f.set([2, 0, 0, 0, 0, 0x99], 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  f[14] = seq;
  return f;
}

let sockets = 0;
for (const packed of [false, true]) {
  test(`GET_VRING_BASE on a receive queue holding chains for a frame that did not fit cancels them: nothing used, base before them, the buffers taken again after the restart (${packed ? "packed" : "split"})`, async () => {
    sockets++;
    const path = join(tmpdir(), `vk-rs-net-${process.pid}-${sockets}.sock`);
    const sw = new Switch();
    const peer = new PeerPort("peer");
    sw.addPort(peer);
    const dev = new VirtioNetDevice({ name: "guest", mac: GUEST_MAC });
    sw.addPort(dev);
    const server = serveBackend(dev, { path, logger: silentLogger });
    const errors: Error[] = [];
    server.on("error", (e: Error) => errors.push(e));
    const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
    const ram = GuestRam.create({ size: 2 << 20, name: `vk-rs-net-${sockets}` });
    try {
      await until(() => server.session !== null, "the session", 3000);
      const session = server.session as BackendSession;
      await fe.negotiate({
        features: featureSet(
          VirtioFeature.VERSION_1,
          VirtioFeature.MRG_RXBUF,
          VirtioFeature.MAC,
          VirtioFeature.STATUS,
          ...(packed ? [VirtioFeature.RING_PACKED] : []),
        ),
      });
      const [rx] = await fe.start(ram, [64, 64]);
      assert.ok(rx);
      // Two 64-byte receive buffers: a 1000-byte frame does not fit, the port holds both.
      rx.postRxBuffers(2, 64);
      rx.kick();
      await until(() => session.vrings[0]!.started, "the receive ring runs", 3000);
      sw.receive(peer, { data: frame(1, 1000), meta: {} });
      sw.flush();
      assert.equal(session.vrings[0]!.inFlight, 2, "the port holds both chains");
      const base = await fe.stopQueue(0);
      assert.equal(rx.getUsed(), null, "nothing used");
      assert.equal(base.availIdx, 0, "the position is before the held chains");
      assert.equal(session.vrings[0]!.inFlight, 0);
      // After the restart the same buffers are taken again: a frame that fits arrives.
      await fe.restartQueue(0);
      await until(() => session.vrings[0]!.started, "the receive ring runs again", 3000);
      sw.receive(peer, { data: frame(2, 60), meta: {} });
      sw.flush();
      await until(() => rx.readyCount > 0 || rx.getUsed() !== null, "a frame received", 2000);
      assert.deepEqual(errors, []);
    } finally {
      fe.close();
      server.close();
      ram.close();
      sw.close();
    }
  });
}
