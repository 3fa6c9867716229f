/**
 * Device-state transfer (SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE) with a back-end that reads
 * and writes the state in one blocking loop right after its reply, as QEMU 10's libvhost-user
 * back-ends and rust-vmm's vhost-user-backend (virtiofsd-rs) do: QEMU hands them a blocking pipe
 * end, and they treat EAGAIN as a failure. See test/peers/blocking-state-backend.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";

import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { loadBackendState, saveBackendState } from "../src/frontend/migration.js";
import { native } from "../src/native.js";
import { ProtocolFeature, VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { BlockingStateBackend } from "./peers/blocking-state-backend.js";

/** A state larger than a pipe's buffer (64 KiB by default, 1 MiB at most unprivileged). */
function bigState(bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let x = 99;
  for (let i = 0; i < bytes; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

function sha(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

async function pair(
  state: Uint8Array,
): Promise<{ fe: VhostUserFrontend; be: BlockingStateBackend }> {
  const [a, b] = native.socketpair();
  const be = new BlockingStateBackend(a, state);
  const fe = new VhostUserFrontend(b, { name: "fe-blocking", requestTimeoutMs: 20_000 });
  await fe.negotiate({
    features: featureSet(VirtioFeature.VERSION_1),
    protocolFeatures: featureSet(
      ProtocolFeature.LOG_SHMFD,
      ProtocolFeature.RARP,
      ProtocolFeature.REPLY_ACK,
      ProtocolFeature.DEVICE_STATE,
    ),
  });
  return { fe, be };
}

test("regression: SAVE of 4 MiB + 1 to a back-end that writes in one blocking loop (it got EAGAIN on a non-blocking pipe end)", async () => {
  const state = bigState((4 << 20) + 1);
  const { fe, be } = await pair(state);
  try {
    const got = await saveBackendState(fe, { timeoutMs: 20_000 });
    assert.deepEqual(
      be.transfers.map((t) => [t.ok, t.code]),
      [[true, undefined]],
    );
    assert.equal(got.length, state.length);
    assert.equal(sha(got), sha(state), "the state came across byte for byte");
  } finally {
    fe.close();
    be.close();
  }
});

test("regression: LOAD of 4 MiB + 1 to a back-end that reads in one blocking loop", async () => {
  const state = bigState((4 << 20) + 1);
  const { fe, be } = await pair(new Uint8Array(0));
  try {
    await loadBackendState(fe, state);
    assert.deepEqual(
      be.transfers.map((t) => [t.ok, t.code]),
      [[true, undefined]],
    );
    assert.ok(be.loaded);
    assert.equal(sha(be.loaded), sha(state), "the back-end read the state byte for byte");
  } finally {
    fe.close();
    be.close();
  }
});
