/**
 * The destination pre-stages its back-end during pre-copy: connected, negotiated, features, the
 * memory table and each ring's SET_VRING_NUM are sent before the source stops; after the stop
 * only each ring's SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL and
 * SET_VRING_ERR (in QEMU's vhost_virtqueue_start order, ring by ring), then SET_VRING_ENABLE
 * and SEND_RARP. Seen on the wire through the trace proxy between the destination's front-end
 * and a vhostkit back-end; a second proxy on the source's side sees its stop written as one
 * batch (each ring's SET_VRING_ENABLE 0 and GET_VRING_BASE, then GET_STATUS).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Server, Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { serveBackend } from "../src/backend/server.js";
import type { BackendServer } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { SeqTrafficGuest, migrateSource, receiveMigration } from "../src/orchestrator/index.js";
import type { IncomingResult } from "../src/orchestrator/index.js";
import { TraceProxy } from "../src/tools/trace/proxy.js";
import { sleep } from "./helpers.js";

const F_MAC = new Uint8Array([2, 0, 0, 0, 0, 0x11]);
const R_MAC = new Uint8Array([2, 0, 0, 0, 0, 0x22]);

test("destination request order: rings' sizes before the stop, bases, addresses and fds after it", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-prestage-"));
  const servers: BackendServer[] = [];
  const fes: VhostUserFrontend[] = [];
  const rams: GuestRam[] = [];
  let server: Server | null = null;
  let gen: SeqTrafficGuest | null = null;
  const sent: string[] = [];
  let stopMark = -1;
  const proxy = new TraceProxy({
    listen: join(dir, "traced.sock"),
    connect: join(dir, "b.sock"),
    onEvent: (e) => {
      if (e.channel === "main" && e.dir === "fe->be" && e.kind === "request") {
        sent.push(e.name === "SET_VRING_NUM" ? `${e.name} ${e.fields.index}` : e.name);
      }
    },
  });
  // The source's side: every request and answer, in the order the proxy saw them.
  const srcSeen: string[] = [];
  const srcProxy = new TraceProxy({
    listen: join(dir, "traced-a.sock"),
    connect: join(dir, "a.sock"),
    onEvent: (e) => {
      if (e.channel !== "main") return;
      if (e.dir === "fe->be" && e.kind === "request") srcSeen.push(`-> ${e.name}`);
      if (e.dir === "be->fe") srcSeen.push(`<- ${e.name}`);
    },
  });
  try {
    servers.push(serveBackend(new NetTestDevice({ mode: "sink" }), { path: join(dir, "a.sock") }));
    servers.push(serveBackend(new NetTestDevice({ mode: "sink" }), { path: join(dir, "b.sock") }));
    proxy.start();
    srcProxy.start();
    const fe = await VhostUserFrontend.connect(join(dir, "traced-a.sock"));
    fes.push(fe);
    await fe.negotiate();
    const ram = GuestRam.create({ size: 4 << 20 });
    rams.push(ram);
    await fe.start(ram, [256, 128]);
    gen = new SeqTrafficGuest(fe, { dstMac: R_MAC, srcMac: F_MAC, burst: 16 });
    gen.start();
    await sleep(50);

    let incoming: Promise<IncomingResult> | null = null;
    server = createServer({ noDelay: true }, (s: Socket) => {
      incoming = receiveMigration({
        stream: s,
        connectBackend: () => VhostUserFrontend.connect(join(dir, "traced.sock")),
        onProgress: (p) => {
          // The first state section comes after the source stopped its rings.
          if (p.section === "VIRTIO_STATE" && stopMark < 0) stopMark = sent.length;
        },
      });
    });
    await new Promise<void>((resolve) => server?.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    const stream = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection({ host: "127.0.0.1", port, noDelay: true }, () => resolve(s));
      s.once("error", reject);
    });
    const res = await migrateSource({ frontend: fe, stream, guest: gen, deviceFields: F_MAC });
    gen.stop();
    assert.ok(incoming !== null);
    const dst = await (incoming as Promise<IncomingResult>);
    fes.push(dst.frontend);
    rams.push(dst.ram);
    assert.ok(res.downtimeMs > 0);
    assert.ok(stopMark > 0, "the destination saw the state sections");

    const before = sent.slice(0, stopMark);
    const after = sent.slice(stopMark);
    // Before the stop: negotiated, features, memory table, each ring's size, nothing that
    // places or starts a ring.
    for (const name of ["SET_OWNER", "SET_FEATURES", "SET_MEM_TABLE"]) {
      assert.ok(before.includes(name), `${name} before the stop: ${before.join(" ")}`);
    }
    const nums = before.filter((n) => n.startsWith("SET_VRING_NUM"));
    assert.deepEqual(nums, ["SET_VRING_NUM 0", "SET_VRING_NUM 1"]);
    assert.ok(
      before.indexOf("SET_MEM_TABLE") < before.indexOf("SET_VRING_NUM 0"),
      "the sizes follow the memory table",
    );
    for (const name of [
      "SET_VRING_BASE",
      "SET_VRING_ADDR",
      "SET_VRING_KICK",
      "SET_VRING_CALL",
      "SET_VRING_ERR",
      "SET_VRING_ENABLE",
    ]) {
      assert.ok(!before.includes(name), `${name} not before the stop: ${before.join(" ")}`);
    }
    // After the stop: ring by ring in vhost_virtqueue_start's order without the size, then
    // enable each ring, then RARP (the driver lacks GUEST_ANNOUNCE).
    const ring = ["SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"];
    const expected = [
      ...ring,
      "SET_VRING_ERR",
      ...ring,
      "SET_VRING_ERR",
      "SET_VRING_ENABLE",
      "SET_VRING_ENABLE",
    ];
    const filtered = after.filter((n) => n !== "SET_STATUS" && n !== "GET_FEATURES");
    assert.deepEqual(filtered.slice(0, expected.length), expected, after.join(" "));
    assert.ok(!after.some((n) => n.startsWith("SET_VRING_NUM")), "no size sent again");
    assert.equal(dst.rarpSent, after.includes("SEND_RARP"));
    assert.ok(!after.includes("SET_MEM_TABLE") && !after.includes("SET_FEATURES"));

    // The source's stop: per ring ENABLE 0 then GET_VRING_BASE, then GET_STATUS, all written
    // before the first answer comes back (one round trip for the whole stop).
    const first = srcSeen.lastIndexOf("-> GET_VRING_BASE") - 3;
    assert.deepEqual(
      srcSeen.slice(first, first + 6),
      [
        "-> SET_VRING_ENABLE",
        "-> GET_VRING_BASE",
        "-> SET_VRING_ENABLE",
        "-> GET_VRING_BASE",
        "-> GET_STATUS",
        "<- SET_VRING_ENABLE",
      ],
      srcSeen.slice(first - 2, first + 12).join(", "),
    );
  } finally {
    gen?.stop();
    server?.close();
    for (const f of fes) f.close();
    for (const r of rams) r.close();
    proxy.close();
    srcProxy.close();
    for (const s of servers) s.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
