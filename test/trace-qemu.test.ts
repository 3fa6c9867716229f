/**
 * `vhostkit trace` between a QEMU 7.2 guest and `vhostkit switch`: the guest, attached through
 * the proxy, pings a second guest attached directly; the trace shows QEMU's set-up sequence
 * (features, the back-end channel, ADD_MEM_REG, then per ring NUM, BASE, ADDR, KICK, CALL).
 * Needs root (QEMU with shared memory).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

import { TraceProxy } from "../src/tools/trace/proxy.js";
import type { TraceEvent } from "../src/tools/trace/proxy.js";
import { buildGuestImage } from "./peers/guest-image.js";
import { startGuest } from "./peers/qemu.js";
import type { Guest } from "./peers/qemu.js";

const CLI = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "bin", "vhostkit.js");

test("vhostkit trace: a QEMU guest through the proxy pings a second guest on vhostkit switch", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "vk-trace-qemu-"));
  const guests: Guest[] = [];
  const sockA = join(dir, "a.sock");
  const sockB = join(dir, "b.sock");
  const px = join(dir, "trace.sock");
  const sw = spawn(process.execPath, [CLI, "switch", "--socket", sockA, "--socket", sockB], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let swErr = "";
  sw.stderr?.on("data", (d: Buffer) => (swErr += d.toString()));
  const events: TraceEvent[] = [];
  const proxy = new TraceProxy({ listen: px, connect: sockA, onEvent: (e) => events.push(e) });
  t.after(async () => {
    for (const g of guests) await g.kill();
    proxy.close();
    sw.kill("SIGTERM");
    await rm(dir, { recursive: true, force: true });
  });
  const deadline = Date.now() + 15_000;
  while (!swErr.includes("vhostkit switch: ready")) {
    assert.ok(Date.now() < deadline, `switch not ready: ${swErr}`);
    await sleep(50);
  }
  proxy.start();
  const image = await buildGuestImage();
  const g1 = await startGuest({
    image,
    name: "trace-g1",
    nics: [{ socketPath: px, guestAddrs: ["192.0.2.1/25"] }],
  });
  guests.push(g1);
  const g2 = await startGuest({
    image,
    name: "trace-g2",
    nics: [{ socketPath: sockB, guestAddrs: ["192.0.2.2/25"], mac: "52:54:00:12:34:02" }],
  });
  guests.push(g2);
  await g1.ready(120_000);
  await g2.ready(120_000);
  const r = await g1.run("ping -c 5 -W 3 192.0.2.2", 30_000);
  assert.equal(r.status, 0, r.output);
  const rtt = /= [\d.]+\/([\d.]+)\//.exec(r.output);
  t.diagnostic(
    `ping through the proxy's port: avg ${rtt?.[1] ?? "?"} ms (data does not cross the proxy)`,
  );

  const names = events.filter((e) => e.dir === "fe->be" && e.kind === "request").map((e) => e.name);
  t.diagnostic(`QEMU set-up: ${names.join(" ")}`);
  const order = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "GET_MAX_MEM_SLOTS",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "SET_VRING_ENABLE",
    "SET_FEATURES",
    // QEMU 7.2 shares memory with ADD_MEM_REG once CONFIGURE_MEM_SLOTS is negotiated.
    "ADD_MEM_REG",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
  ];
  let at = -1;
  for (const n of order) {
    const i = names.indexOf(n, at + 1);
    assert.ok(i > at, `${n} after ${names[at] ?? "start"} in QEMU's sequence: ${names.join(" ")}`);
    at = i;
  }
  const mem = events.find((e) => e.name === "ADD_MEM_REG" && e.kind === "request");
  assert.equal(mem?.fds, 1, "ADD_MEM_REG's fd passed through");
  assert.equal(events.filter((e) => e.malformed !== undefined).length, 0);
});
