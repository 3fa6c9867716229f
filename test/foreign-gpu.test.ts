/**
 * vhostkit's front-end against QEMU 7.2's vhost-user-gpu (libvhost-user; Debian package
 * qemu-system-gui), a back-end vhostkit did not write: negotiation, ring set-up and GET_CONFIG,
 * including its failure answer. The spec's failure answer to GET_CONFIG is an empty payload;
 * vhost-user-gpu sends it for a request larger than its config space (struct virtio_gpu_config,
 * 16 bytes). It must reach the caller as a non-fatal ERR_VHOST_REQUEST_FAILED and leave the
 * connection usable.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import diagnostics_channel from "node:diagnostics_channel";

import { MESSAGE_DIAGNOSTICS_CHANNEL } from "../src/channel.js";
import type { MessageDiagnostic } from "../src/channel.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserError } from "../src/protocol/errors.js";
import {
  ProtocolFeature,
  VirtioFeature,
  featureSet,
  hasFeature,
} from "../src/protocol/constants.js";
import { startVhostUserGpu } from "./peers/libvhost-user.js";

/** sizeof(struct virtio_gpu_config): events_read, events_clear, num_scanouts, num_capsets */
const GPU_CONFIG_SIZE = 16;

test("vhost-user-gpu: negotiation, ring set-up, GET_CONFIG", async () => {
  const peer = await startVhostUserGpu();
  const fe = await VhostUserFrontend.connect(peer.socketPath, { timeoutMs: 5000 });
  const ram = GuestRam.create({ size: 4 << 20, name: "gpu-guest" });
  try {
    const neg = await fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
    assert.ok(hasFeature(neg.protocolFeatures, ProtocolFeature.CONFIG), "CONFIG negotiated");
    const cfg = await fe.getConfig(0, GPU_CONFIG_SIZE);
    assert.equal(cfg.length, GPU_CONFIG_SIZE);
    assert.deepEqual(await fe.getConfig(0, GPU_CONFIG_SIZE), cfg, "the same bytes again");
    assert.deepEqual(await fe.getConfig(8, 4), cfg.slice(8, 12), "a part at an offset");
    // control queue and cursor queue
    const queues = await fe.start(ram, [64, 16]);
    assert.equal(queues.length, 2);
    peer.assertRunning();
  } finally {
    fe.close();
    ram.close();
    await peer.stop();
  }
});

test("regression: an empty GET_CONFIG reply (vhost-user-gpu, oversize request) is a non-fatal failure; the connection stays usable", async () => {
  const peer = await startVhostUserGpu();
  const fe = await VhostUserFrontend.connect(peer.socketPath, { timeoutMs: 5000 });
  try {
    await fe.negotiate({ features: featureSet(VirtioFeature.VERSION_1) });
    const replies: number[] = [];
    const onMsg = (m: unknown): void => {
      const d = m as MessageDiagnostic;
      if (d.direction === "in" && d.name === "GET_CONFIG") replies.push(d.size);
    };
    diagnostics_channel.subscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg);
    const err = await fe
      .getConfig(0, GPU_CONFIG_SIZE + 8)
      .then(
        () => null,
        (e: unknown) => e,
      )
      .finally(() => diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, onMsg));
    assert.deepEqual(replies, [0], "vhost-user-gpu answered with an empty payload");
    assert.ok(err instanceof VhostUserError, String(err));
    assert.equal(err.code, "ERR_VHOST_REQUEST_FAILED");
    assert.equal(err.request, "GET_CONFIG");
    assert.equal(err.fatal, false);
    assert.equal(fe.closed, false, "the connection is still open");
    // the same connection goes on serving
    const cfg = await fe.getConfig(0, GPU_CONFIG_SIZE);
    assert.equal(cfg.length, GPU_CONFIG_SIZE);
    assert.ok((await fe.getFeatures()) > 0n);
    peer.assertRunning();
  } finally {
    fe.close();
    await peer.stop();
  }
});
