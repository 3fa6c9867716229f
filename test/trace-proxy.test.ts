/**
 * `vhostkit trace` between vhostkit's front-end and the test device (echo, in its own process):
 * frames go through unchanged, the set-up sequence is traced in the front-end's order with
 * fds counted, replies are paired with their requests, the back-end request channel of
 * SET_BACKEND_REQ_FD is proxied, a malformed message is printed as such, and the proxy serves
 * a front-end that reconnects. Connection set-up time with and without the proxy is reported.
 */
import { test } from "node:test";
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { native } from "../src/native.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { FrontendRequest } from "../src/protocol/constants.js";
import { encodeHeader } from "../src/protocol/framing.js";
import { TraceProxy, formatTraceEvent } from "../src/tools/trace/proxy.js";
import type { TraceEvent } from "../src/tools/trace/proxy.js";
import { sleep } from "./helpers.js";

const CHILD = fileURLToPath(new URL("./fixtures/check-backend-child.js", import.meta.url));

async function echoBackend(t: TestContext, sock: string): Promise<void> {
  const child = spawn(process.execPath, [CHILD, sock, "echo"], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  t.after(() => {
    child.stdin?.end();
    child.kill("SIGTERM");
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout?.once("data", () => resolve());
    child.once("exit", (c) => reject(new Error(`back-end exited ${c}`)));
  });
}

function frame(seq: number): Uint8Array {
  const f = new Uint8Array(64);
  f.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
  f[14] = seq;
  return f;
}

/** Start a device through `path`; returns the set-up time and whether frames came back. */
async function session(path: string): Promise<{ setupMs: number; echoed: number }> {
  const t0 = performance.now();
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000 });
  const ram = GuestRam.create({ size: 4 << 20 });
  try {
    await fe.negotiate();
    const [rx, tx] = await fe.start(ram, [128, 128]);
    const setupMs = performance.now() - t0;
    rx!.postRxBuffers(32);
    for (let i = 0; i < 8; i++) tx!.addFrame(frame(i));
    tx!.kick();
    let echoed = 0;
    const deadline = Date.now() + 3000;
    while (echoed < 8 && Date.now() < deadline) {
      echoed += rx!.receiveFrames().filter((f) => f[12] === 0x88 && f[13] === 0xb5).length;
      await sleep(5);
    }
    return { setupMs, echoed };
  } finally {
    fe.close();
    ram.close();
  }
}

test("vhostkit trace: forwards both ways with fds, traces set-up in order, pairs replies, survives a reconnect", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-trace-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const be = join(dir, "be.sock");
  const px = join(dir, "trace.sock");
  await echoBackend(t, be);
  const events: TraceEvent[] = [];
  const notes: string[] = [];
  const proxy = new TraceProxy({
    listen: px,
    connect: be,
    onEvent: (e) => events.push(e),
    onNote: (n) => notes.push(n),
  });
  proxy.start();
  t.after(() => proxy.close());

  await session(be); // warm up
  await sleep(50);
  const traced = await session(px);
  await sleep(50);
  const again = await session(px); // the front-end reconnects
  await sleep(50);
  const direct = await session(be);
  assert.equal(again.echoed, 8, "a reconnected front-end is served");
  assert.equal(direct.echoed, 8);
  assert.equal(traced.echoed, 8, "frames come back through the proxy");
  t.diagnostic(
    `set-up time: direct ${direct.setupMs.toFixed(1)} ms, through the proxy ${traced.setupMs.toFixed(1)} ms`,
  );

  const main = events.filter((e) => e.conn === 1 && e.channel === "main" && e.dir === "fe->be");
  const names = main.map((e) => e.name);
  const order = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "SET_BACKEND_REQ_FD",
    "SET_OWNER",
    "SET_FEATURES",
    "SET_MEM_TABLE",
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ENABLE",
  ];
  let at = -1;
  for (const n of order) {
    const i = names.indexOf(n, at + 1);
    assert.ok(i > at, `${n} after ${names[at] ?? "start"} (${names.join(",")})`);
    at = i;
  }
  const mem = main.find((e) => e.name === "SET_MEM_TABLE");
  assert.equal(mem?.fds, 2, "SET_MEM_TABLE carries one fd per region");
  const kick = main.find((e) => e.name === "SET_VRING_KICK");
  assert.equal(kick?.fds, 1);
  const feat = events.find((e) => e.conn === 1 && e.name === "GET_FEATURES" && e.kind === "reply");
  assert.match(feat?.fields.value ?? "", /^0x[0-9a-f]+$/);
  assert.match(feat?.fields.names ?? "", /VERSION_1/, "feature bits named");
  assert.ok(feat?.latencyMs !== undefined && feat.latencyMs >= 0, "reply paired with latency");
  const acks = events.filter(
    (e) => e.conn === 1 && e.kind === "reply" && e.name === "SET_VRING_ENABLE",
  );
  assert.ok(acks.length >= 2, "REPLY_ACK acks are traced and paired");
  assert.match(formatTraceEvent(mem!), /FE->BE SET_MEM_TABLE flags=0x9 size=\d+ regions=.* fds=2/);
  assert.ok(
    events.some((e) => e.conn === 2),
    "a second front-end served after the first left",
  );
  assert.ok(notes.some((n) => /connection 1 closed/.test(n)));

  // A malformed message (reserved flag bit) is printed as such and forwarded.
  const fd = native.unixConnect(px);
  const bad = encodeHeader({ request: FrontendRequest.GET_FEATURES, flags: 0x101, size: 0 });
  native.sendmsg(fd, bad, 0, bad.length, []);
  const deadline = Date.now() + 2000;
  while (!events.some((e) => e.malformed !== undefined) && Date.now() < deadline) await sleep(10);
  native.close(fd);
  const m = events.find((e) => e.malformed !== undefined);
  assert.equal(events.filter((e) => e.malformed !== undefined).length, 1, "only that one");
  assert.match(m?.malformed ?? "", /reserved flags/);
});
