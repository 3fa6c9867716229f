/**
 * `vhostkit trace` between DPDK testpmd's virtio_user (front-end) and DPDK testpmd's vhost PMD
 * (back-end): frames the front-end sends arrive at the back-end through the proxy, and the
 * trace shows DPDK's set-up sequence (memory table before the rings are kicked, rings enabled)
 * with the fds each message carried.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { TraceProxy, formatTraceEvent } from "../src/tools/trace/proxy.js";
import type { TraceEvent } from "../src/tools/trace/proxy.js";
import { startTestpmd } from "./peers/testpmd.js";
import type { Testpmd } from "./peers/testpmd.js";
import { sleep } from "./helpers.js";

test("vhostkit trace: DPDK virtio_user -> trace -> DPDK vhost PMD (regression: fds read with several messages go with the one holding the last byte)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-trace-dpdk-"));
  const tps: Testpmd[] = [];
  const events: TraceEvent[] = [];
  const be = join(dir, "vhost.sock");
  const px = join(dir, "trace.sock");
  const proxy = new TraceProxy({
    listen: px,
    connect: be,
    onEvent: (e) => events.push(e),
    onNote: (n) => t.diagnostic(n),
  });
  t.after(async () => {
    for (const tp of tps) await tp.close();
    proxy.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const vhost = await startTestpmd({
    vdev: { kind: "vhost", iface: be, queues: 1 },
    forwardMode: "rxonly",
    forwardLcore: 0,
    name: "trace-vhost",
  });
  tps.push(vhost);
  await vhost.ready();
  proxy.start();
  const user = await startTestpmd({
    vdev: { kind: "virtio_user", path: px, queues: 1 },
    forwardMode: "io",
    forwardLcore: 1,
    name: "trace-user",
  });
  tps.push(user);
  await user.ready();
  await Promise.all([vhost.waitLinkUp(), user.waitLinkUp()]);
  await vhost.clearStats();
  await vhost.start();
  const sent = await user.sendExactly(160);
  assert.equal(sent.txPackets, 160);
  const deadline = Date.now() + 8000;
  let rx = 0;
  while (rx < 160 && Date.now() < deadline) {
    rx = (await vhost.port0()).rxPackets;
    await sleep(50);
  }
  assert.equal(rx, 160, "every frame went through the proxy to the vhost PMD");

  const names = events.filter((e) => e.dir === "fe->be" && e.kind === "request").map((e) => e.name);
  t.diagnostic(`DPDK virtio_user set-up: ${names.join(" ")}`);
  for (const e of events.slice(0, 6)) t.diagnostic(formatTraceEvent(e));
  const mem = names.indexOf("SET_MEM_TABLE");
  const kick = names.indexOf("SET_VRING_KICK");
  // DPDK's virtio_user sends SET_OWNER before GET_FEATURES (QEMU sends it after negotiation).
  assert.deepEqual(names.slice(0, 4), [
    "SET_OWNER",
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
  ]);
  assert.ok(mem >= 0 && kick > mem, "SET_MEM_TABLE before the first SET_VRING_KICK");
  assert.ok(names.includes("SET_VRING_ENABLE") || names.includes("SET_FEATURES"));
  const memEv = events.find((e) => e.name === "SET_MEM_TABLE" && e.kind === "request");
  assert.ok((memEv?.fds ?? 0) >= 1, "SET_MEM_TABLE's fds passed through");
  assert.ok(
    events.some((e) => e.kind === "reply" && e.latencyMs !== undefined),
    "replies paired with their requests",
  );
  assert.equal(events.filter((e) => e.malformed !== undefined).length, 0);
});
