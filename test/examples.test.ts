/**
 * The README's example device works end to end: vhostkit's front-end posts buffers on the
 * entropy device's queue over a real socket and memfd memory, and gets them back filled.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { EntropyDevice } from "../examples/entropy-device.js";
import { serveBackend } from "../src/backend/server.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import * as api from "../src/index.js";

test("example: the entropy device fills every posted buffer with random bytes", async () => {
  const path = join(tmpdir(), `vhostkit-example-${process.pid}.sock`);
  const device = new EntropyDevice();
  const server = serveBackend(device, { path });
  const ram = GuestRam.create({ size: 1 << 20, name: "example-rng" });
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000 });
  try {
    await fe.negotiate();
    const [q] = await fe.start(ram, [64]);
    assert.ok(q);
    assert.equal(q.postRxBuffers(8, 256), 8);
    await q.waitForUsed(5000, 8);
    const got: Uint8Array[] = [];
    for (let u = q.getUsed(); u !== null; u = q.getUsed()) {
      assert.equal(u.len, 256, "the whole buffer is written");
      assert.ok(u.data);
      got.push(u.data.slice(0, u.len));
    }
    assert.equal(got.length, 8);
    assert.equal(device.bytesServed, 8 * 256);
    // random: no buffer is all zeros and no two buffers are equal
    for (const b of got) assert.ok(b.some((x) => x !== 0));
    assert.equal(new Set(got.map((b) => Buffer.from(b).toString("hex"))).size, 8);
  } finally {
    fe.close();
    server.close();
    ram.close();
  }
});

test("package entry point exports the engines, the switch and the migration API", () => {
  for (const name of [
    "serveBackend",
    "BackendSession",
    "VhostUserFrontend",
    "GuestRam",
    "Switch",
    "VirtioNetDevice",
    "addVhostUserPort",
    "MigrationFormat",
    "Channel",
    "MessageDecoder",
    "GuestMemory",
    "DirtyLog",
    "SplitDeviceQueue",
    "PackedDeviceQueue",
    "MockGuest",
    "isNativeError",
    "migrateSource",
    "receiveMigration",
  ]) {
    assert.equal(typeof (api as Record<string, unknown>)[name], "function", name);
  }
});

test("example: a virtio-rng device migrates live between two back-ends and serves on the destination", async () => {
  const { migrateEntropyDevice } = await import("../examples/migrate-entropy-device.js");
  const m = await migrateEntropyDevice();
  assert.ok(m.bytesBefore >= 64 << 10, "random bytes before the migration");
  assert.ok(m.bytesAfter >= 64 << 10, "random bytes on the destination");
  assert.equal(m.memoryVerified, true, "guest RAM identical");
  assert.equal(m.result.deviceStateTransferred, false, "the entropy device has no state");
});
