/**
 * The bounds a serving process sets on each connection (`stateTimeoutMs`, `requestBacklog`)
 * reach the session through `serveBackend` and `vhostkit switch`, are checked before any
 * socket is made, and hold against a front-end: a device-state LOAD on an fd that never
 * reaches end of file ends at the timeout, its fd closed.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  DeviceStateDirection,
  DeviceStatePhase,
  FrontendRequest,
} from "../src/protocol/constants.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { serveBackend } from "../src/backend/server.js";
import { parseSwitchArgs } from "../src/cli/switch.js";
import { UsageError } from "../src/cli/common.js";
import { VirtioNetDevice } from "../src/net/virtio-net.js";
import { SwitchProcess, sleep, until } from "./hardening-helpers.js";

test("serveBackend checks stateTimeoutMs and requestBacklog before it makes the socket", () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-hopt-"));
  try {
    const path = join(dir, "s.sock");
    const cases: [object, RegExp][] = [
      [{ stateTimeoutMs: 0 }, /stateTimeoutMs must be an integer in 1\.\.3600000, got 0/],
      [{ stateTimeoutMs: 1.5 }, /stateTimeoutMs .* got 1\.5/],
      [{ stateTimeoutMs: 3_600_001 }, /stateTimeoutMs .* got 3600001/],
      [
        { requestBacklog: { requests: 0, bytes: 1 << 20, fds: 256 } },
        /requestBacklog\.requests must be an integer >= 1, got 0/,
      ],
      [
        { requestBacklog: { requests: 8, bytes: 100, fds: 256 } },
        /requestBacklog\.bytes must be an integer >= 4096, got 100/,
      ],
      [
        { requestBacklog: { requests: 8, bytes: 1 << 20, fds: 2 } },
        /requestBacklog\.fds must be an integer >= 8, got 2/,
      ],
      [{ requestBacklog: { requests: 8, bytes: 1 << 20 } }, /requestBacklog\.fds .* undefined/],
    ];
    for (const [bad, re] of cases) {
      const device = new VirtioNetDevice({ name: "opt" });
      assert.throws(
        () => serveBackend(device, { path, ...bad }),
        (err: Error) => err instanceof RangeError && re.test(err.message),
        JSON.stringify(bad),
      );
      assert.equal(existsSync(path), false, `no socket made for ${JSON.stringify(bad)}`);
    }
    // in range: served
    const server = serveBackend(new VirtioNetDevice({ name: "opt" }), {
      path,
      stateTimeoutMs: 1,
      requestBacklog: { requests: 1, bytes: 4096, fds: 8 },
    });
    assert.equal(existsSync(path), true);
    server.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("vhostkit switch --state-timeout and --request-backlog: parsed, range-checked", () => {
  const o = parseSwitchArgs(["--state-timeout", "250", "--request-backlog", "16,65536,32"], {});
  assert.equal(o.stateTimeoutMs, 250);
  assert.deepEqual(o.requestBacklog, { requests: 16, bytes: 65536, fds: 32 });
  const d = parseSwitchArgs([], {});
  assert.equal(d.stateTimeoutMs, null);
  assert.equal(d.requestBacklog, null);
  const bad: [string[], RegExp][] = [
    [["--state-timeout", "0"], /--state-timeout must be an integer in 1\.\.3600000 .*got 0/],
    [["--state-timeout", "5s"], /--state-timeout .*got 5s/],
    [["--request-backlog", "16,65536"], /--request-backlog must be N,BYTES,FDS.*got 16,65536/],
    [["--request-backlog", "16,100,32"], /--request-backlog 16,100,32: bytes must be .* >= 4096/],
    [["--request-backlog", "0,65536,32"], /--request-backlog 0,65536,32: requests must be/],
  ];
  for (const [argv, re] of bad) {
    assert.throws(
      () => parseSwitchArgs(argv, {}),
      (err: Error) => err instanceof UsageError && re.test(err.message),
      argv.join(" "),
    );
  }
});

test("a device-state LOAD that never reaches end of file ends at --state-timeout: fd closed, CHECK_DEVICE_STATE fails", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-hopt-"));
  const path = join(dir, "p0.sock");
  const sw = new SwitchProcess(["--socket", path, "--state-timeout", "300"]);
  try {
    await sw.ready();
    const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000 });
    fe.on("error", () => undefined);
    try {
      await fe.negotiate({ features: 0n, backendReq: false });
      await fe.setFeatures();
      const base = sw.fdCount();
      const never = native.eventfd(0); // never reaches end of file
      const t0 = Date.now();
      try {
        const r = await fe.request(
          FrontendRequest.SET_DEVICE_STATE_FD,
          { direction: DeviceStateDirection.LOAD, phase: DeviceStatePhase.STOPPED },
          [never],
        );
        for (const fd of r.fds) native.close(fd);
      } finally {
        native.close(never);
      }
      assert.equal(sw.fdCount(), base + 1, "the switch holds the transfer's fd");
      // The transfer ends at the timeout (not at the 60 s default), its fd closed while the
      // connection stays open.
      await until(() => sw.fdCount() <= base, `the fds back to ${base}`, 5000);
      const took = Date.now() - t0;
      assert.ok(took >= 250, `the transfer ended after ${took} ms (timeout 300 ms)`);
      await until(() => /did not end within 300 ms/.test(sw.stderr), "the log line", 2000);
      const reply = await fe.request(FrontendRequest.CHECK_DEVICE_STATE, null);
      for (const fd of reply.fds) native.close(fd);
      assert.notEqual(reply.payload, 0n, "CHECK_DEVICE_STATE answers failure");
      // the connection goes on
      assert.equal(typeof (await fe.getFeatures()), "bigint");
      await sleep(50);
      assert.equal(sw.fdCount(), base, "no fd left behind");
    } finally {
      fe.close();
    }
    assert.equal(sw.alive, true);
  } finally {
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test("vhostkit switch --request-backlog bounds the requests waiting behind a stuck CHECK_DEVICE_STATE", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-hopt-"));
  const path = join(dir, "p0.sock");
  const sw = new SwitchProcess(["--socket", path, "--request-backlog", "4,4096,8"]);
  try {
    await sw.ready();
    const base = sw.fdCount();
    const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000 });
    fe.on("error", () => undefined);
    await fe.negotiate({ features: 0n, backendReq: false });
    await fe.setFeatures();
    const never = native.eventfd(0);
    try {
      await fe.request(
        FrontendRequest.SET_DEVICE_STATE_FD,
        { direction: DeviceStateDirection.LOAD, phase: DeviceStatePhase.STOPPED },
        [never],
      );
    } finally {
      native.close(never);
    }
    fe.send(FrontendRequest.CHECK_DEVICE_STATE, null);
    for (let i = 0; i < 10 && !fe.closed; i++) {
      const call = native.eventfd(0);
      try {
        fe.send(FrontendRequest.SET_VRING_CALL, { index: 0, noFd: false }, [call]);
      } catch {
        break; // closed by the switch
      } finally {
        native.close(call);
      }
    }
    await until(() => fe.closed, "the switch to close the connection", 5000);
    await until(() => /too many requests waiting .*at most 4, 4096, 8/.test(sw.stderr), "the log");
    await until(() => sw.fdCount() <= base, `the fds back to ${base}`, 2000);
    assert.equal(sw.alive, true);
  } finally {
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
