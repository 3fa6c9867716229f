/**
 * What a `vhostkit switch` port offers a net front-end: not PROTOCOL_F_CONFIG. QEMU's
 * vhost-user-net (7.2 and 10.2) takes the config from its own command line and printed
 * "vhost-user backend supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not." for every
 * port; DPDK 22.11's vhost library offers 0x10cbf for a net device (no CONFIG, bit 9). A port
 * made with `offerConfig: true` still offers it, for a front-end that reads the config over
 * vhost-user.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { Switch } from "../src/net/switch.js";
import { addVhostUserPort } from "../src/net/virtio-net.js";
import { silentLogger } from "../src/backend/device.js";
import { ProtocolFeature, featureSet, hasFeature } from "../src/protocol/constants.js";

async function offered(offerConfig?: boolean): Promise<bigint> {
  const dir = mkdtempSync(join(tmpdir(), "vk-net-offer-"));
  const sw = new Switch({ logger: silentLogger });
  const path = join(dir, "p.sock");
  const port = addVhostUserPort(sw, {
    path,
    logger: silentLogger,
    ...(offerConfig === undefined ? {} : { offerConfig }),
  });
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 3000 });
  try {
    return (await fe.negotiate()).offeredProtocolFeatures;
  } finally {
    fe.close();
    port.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

test("regression: a switch port does not offer PROTOCOL_F_CONFIG to a net front-end (QEMU warned)", async () => {
  const pf = await offered();
  assert.equal(hasFeature(pf, ProtocolFeature.CONFIG), false, `offered 0x${pf.toString(16)}`);
  // what a net front-end uses is still there
  const wanted = featureSet(
    ProtocolFeature.MQ,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.RARP,
    ProtocolFeature.REPLY_ACK,
  );
  assert.equal(pf & wanted, wanted);
});

test("a switch port made with offerConfig offers PROTOCOL_F_CONFIG", async () => {
  assert.equal(hasFeature(await offered(true), ProtocolFeature.CONFIG), true);
});
