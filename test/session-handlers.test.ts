/**
 * The back-end's handler table (BackendSession.#handlers): each handler's reply rule agrees
 * with the request table, and a request without a handler is refused over a live connection,
 * naming the request and its id, with its fds closed and the connection still serving.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
} from "../src/protocol/constants.js";
import { VhostUserError } from "../src/protocol/errors.js";
import { FRONTEND_REQUEST_SPECS, frontendRequestSpec } from "../src/protocol/table.js";
import { BackendSession } from "../src/backend/session.js";
import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { LineLogger, openFds } from "./helpers.js";

test("session handlers: each handler's reply rule agrees with the request table's reply kind", () => {
  assert.ok(BackendSession.handledRequests.size > 0);
  for (const [id, rule] of BackendSession.handledRequests) {
    const spec = frontendRequestSpec(id);
    assert.ok(spec, `request ${id} is in the request table`);
    // A request with a reply body is answered with one (by the dispatcher or the handler);
    // any other one with a REPLY_ACK or nothing. SET_MEM_TABLE and ADD_MEM_REG have a body
    // only during postcopy, which this back-end does not offer.
    const body = rule === "body" || rule === "self";
    assert.equal(
      body,
      spec.reply === "always",
      `${spec.name}: reply rule "${rule}", table "${spec.reply}"`,
    );
  }
});

/** The test device offering every feature that gates a request the back-end does not handle. */
class EveryGateDevice extends NetTestDevice {
  override readonly features =
    featureMask(VirtioFeature.MAC) | featureMask(VirtioFeature.ACCESS_PLATFORM);
  override readonly protocolFeatures = featureSet(
    ProtocolFeature.MQ,
    ProtocolFeature.CROSS_ENDIAN,
    ProtocolFeature.CRYPTO_SESSION,
    ProtocolFeature.PAGEFAULT,
    ProtocolFeature.INFLIGHT_SHMFD,
    ProtocolFeature.SHARED_OBJECT,
  );
}

test("session handlers: a request without a handler is refused naming it, its fds closed, and the connection goes on", async () => {
  const path = join(tmpdir(), `vhostkit-handlers-${process.pid}.sock`);
  const device = new EveryGateDevice({ mode: "sink" });
  const logger = new LineLogger();
  const server = serveBackend(device, { path, logger });
  const errors: VhostUserError[] = [];
  server.on("error", (e: VhostUserError) => errors.push(e));
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000, requestTimeoutMs: 5000 });
  fe.on("error", () => undefined);
  const efd = native.eventfd(0);
  try {
    const gates = featureSet(
      ProtocolFeature.REPLY_ACK,
      ProtocolFeature.CROSS_ENDIAN,
      ProtocolFeature.CRYPTO_SESSION,
      ProtocolFeature.PAGEFAULT,
      ProtocolFeature.INFLIGHT_SHMFD,
      ProtocolFeature.SHARED_OBJECT,
    );
    const negotiated = await fe.negotiate({
      features: featureSet(VirtioFeature.VERSION_1, VirtioFeature.ACCESS_PLATFORM),
      protocolFeatures: gates,
      backendReq: false,
    });
    assert.equal(negotiated.protocolFeatures, gates);
    await fe.setFeatures();
    const before = openFds();

    const unhandled = FRONTEND_REQUEST_SPECS.filter(
      (s) => !BackendSession.handledRequests.has(s.id),
    );
    assert.ok(unhandled.length > 0);
    for (const spec of unhandled) {
      const bytes = new Uint8Array(spec.size.min);
      if (spec.name === "IOTLB_MSG") bytes[25] = 3; // IOTLB_INVALIDATE
      const payload = spec.codec.decode(bytes, spec.name);
      const fds = Array.from({ length: spec.fds.min }, () => efd);
      // A request with a reply body gets the failure body, any other one a failed REPLY_ACK.
      await fe
        .request(spec.id as FrontendRequest, payload as never, fds, { timeoutMs: 3000 })
        .catch((e: unknown) => {
          assert.ok(
            e instanceof VhostUserError && e.code === "ERR_VHOST_REQUEST_FAILED",
            spec.name,
          );
        });
      const error = errors.find((e) => e.request === spec.name);
      assert.ok(error, `${spec.name} reported`);
      assert.equal(error.code, "ERR_VHOST_REQUEST_FAILED", spec.name);
      assert.match(error.message, /request not supported by this back-end/, spec.name);
      assert.equal(error.field, "request", spec.name);
      assert.equal(error.value, spec.id, spec.name);
    }
    assert.deepEqual(
      errors.map((e) => e.request),
      unhandled.map((s) => s.name),
      "one error per refused request, in order",
    );
    // the fds that came with the refused requests are closed
    assert.deepEqual(
      [...openFds()].filter((fd) => !before.has(fd)),
      [],
    );
    // the connection still serves
    assert.equal(fe.channel.closed, false);
    assert.ok((await fe.request(FrontendRequest.GET_FEATURES, null)).payload > 0n);
  } finally {
    native.close(efd);
    fe.close();
    server.close();
  }
});
