/**
 * Hostile front-ends against a `vhostkit switch` child process: each test names the failure it
 * guards against (a reconnect refused, a bad kick fd installed, a failure swallowed, fds piling
 * up behind a stuck state transfer, a peer that never reads its replies).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { native } from "../src/native.js";
import {
  DeviceStateDirection,
  DeviceStatePhase,
  FrontendRequest,
  ProtocolFeature,
  featureMask,
} from "../src/protocol/constants.js";
import { encodeRequest } from "../src/protocol/framing.js";
import { FRONTEND_PROTOCOL_FEATURES, VhostUserFrontend } from "../src/frontend/frontend.js";
import { SwitchProcess, connectGuest, forward, sleep, until } from "./hardening-helpers.js";
import type { TestGuest } from "./hardening-helpers.js";

const MAC_A = "52:54:00:00:02:0a";
const MAC_B = "52:54:00:00:02:0b";

async function withSwitch(
  ports: number,
  body: (sw: SwitchProcess, paths: string[]) => Promise<void>,
): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "vk-hard-"));
  const paths = Array.from({ length: ports }, (_, i) => join(dir, `p${i}.sock`));
  const sw = new SwitchProcess(paths.flatMap((p) => ["--socket", p]));
  try {
    await sw.ready();
    await body(sw, paths);
    assert.equal(sw.alive, true, "the switch is still running");
  } finally {
    await sw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

function closedPromise(fe: VhostUserFrontend): Promise<void> {
  return new Promise((resolve) => {
    if (fe.closed) resolve();
    else fe.once("close", () => resolve());
  });
}

test("reconnect right after a close is accepted (the old hang-up is processed first); a second live front-end is refused", async () => {
  await withSwitch(1, async (sw, [path]) => {
    for (let i = 0; i < 20; i++) {
      const fe = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
      fe.on("error", () => undefined);
      await fe.negotiate({ features: 0n, backendReq: false });
      fe.close();
    }
    assert.doesNotMatch(sw.stderr, /refusing a second front-end/);
    const a = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
    await a.negotiate({ features: 0n, backendReq: false });
    const b = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
    b.on("error", () => undefined);
    await closedPromise(b);
    await until(() => /refusing a second front-end/.test(sw.stderr), "the refusal");
    // the first one is untouched
    assert.equal(typeof (await a.getFeatures()), "bigint");
    a.close();
  });
});

test("a SET_VRING_KICK with an fd that cannot be watched is refused and the ring keeps its kick fd", async () => {
  await withSwitch(2, async (sw, [pa, pb]) => {
    const guests: TestGuest[] = [];
    try {
      const A = await connectGuest(pa!, "kick-a");
      guests.push(A);
      const B = await connectGuest(pb!, "kick-b");
      guests.push(B);
      assert.deepEqual(await forward(A, B, [MAC_A, MAC_B], 4), [0, 1, 2, 3]);
      const bad = native.memfdCreate("not-a-kick-fd");
      try {
        await assert.rejects(
          A.fe.request(FrontendRequest.SET_VRING_KICK, { index: 1, noFd: false }, [bad]),
          /SET_VRING_KICK/,
        );
      } finally {
        native.close(bad);
      }
      await until(() => /kick fd cannot be watched \(EPERM\)/.test(sw.stderr), "the log line");
      // The TX ring still answers kicks on its old fd.
      assert.deepEqual(
        await forward(A, B, [MAC_A, MAC_B], 40, 4),
        Array.from({ length: 40 }, (_, i) => 4 + i),
      );
    } finally {
      for (const g of guests) g.close();
    }
  });
});

test("a failure the front-end cannot be told of (no REPLY_ACK) closes the connection naming the request and value", async () => {
  await withSwitch(1, async (sw, [path]) => {
    const fe = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
    fe.on("error", () => undefined);
    const noAck = FRONTEND_PROTOCOL_FEATURES & ~featureMask(ProtocolFeature.REPLY_ACK);
    await fe.negotiate({ features: 0n, protocolFeatures: noAck, backendReq: false });
    await fe.setFeatures();
    const closed = closedPromise(fe);
    fe.send(FrontendRequest.SET_VRING_NUM, { index: 4000, num: 256 });
    await closed;
    await until(() => /closing the connection/.test(sw.stderr), "the log line");
    assert.match(sw.stderr, /SET_VRING_NUM: queue index out of range .*\(index=4000\)/);
    assert.match(sw.stderr, /SET_VRING_NUM failed and the front-end cannot be told/);
    // a new front-end is served
    const again = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
    await again.negotiate({ features: 0n, backendReq: false });
    again.close();
  });
});

test("fds do not pile up behind a device-state LOAD that never ends, and all are released at hang-up", async () => {
  await withSwitch(1, async (sw, [path]) => {
    const base = sw.fdCount();
    const fe = await VhostUserFrontend.connect(path!, { timeoutMs: 5000 });
    fe.on("error", () => undefined);
    await fe.negotiate({ features: 0n, backendReq: false });
    await fe.setFeatures();
    const never = native.eventfd(0); // never reaches end of file
    await fe.request(
      FrontendRequest.SET_DEVICE_STATE_FD,
      {
        direction: DeviceStateDirection.LOAD,
        phase: DeviceStatePhase.STOPPED,
      },
      [never],
    );
    native.close(never);
    const closed = closedPromise(fe);
    fe.send(FrontendRequest.CHECK_DEVICE_STATE, null);
    let peak = 0;
    for (let i = 0; i < 500 && !fe.closed; i++) {
      const call = native.eventfd(0);
      try {
        fe.send(FrontendRequest.SET_VRING_CALL, { index: 0, noFd: false }, [call]);
      } catch {
        break; // the switch closed the connection
      } finally {
        native.close(call);
      }
      if (i % 50 === 0) {
        await sleep(50);
        peak = Math.max(peak, sw.fdCount());
      }
    }
    await sleep(100);
    peak = Math.max(peak, sw.fdCount());
    assert.ok(peak - base <= 300, `the switch held ${peak - base} more fds (at most 300)`);
    fe.close();
    await closed;
    await until(() => sw.fdCount() <= base, `the fds back to ${base} (now ${sw.fdCount()})`, 2000);
    assert.match(sw.stderr, /too many requests waiting|device state transfer/);
  });
});

test("a peer that never reads its replies is disconnected", async () => {
  await withSwitch(1, async (sw, [path]) => {
    const base = sw.fdCount();
    const fd = native.unixConnect(path!);
    const one = encodeRequest("frontend", FrontendRequest.GET_FEATURES, null);
    const burst = new Uint8Array(one.length * 256);
    for (let i = 0; i < 256; i++) burst.set(one, i * one.length);
    let sent = 0;
    const deadline = Date.now() + 20_000;
    try {
      while (!/peer does not read/.test(sw.stderr) && Date.now() < deadline && sent < 200_000) {
        let n: number | null;
        try {
          n = native.write(fd, burst, 0, burst.length);
        } catch {
          break; // EPIPE / ECONNRESET: the switch closed it
        }
        if (n !== null) sent += Math.floor(n / one.length);
        // let the switch handle them (it bounds the requests waiting, too)
        await sleep(50);
      }
      await until(() => /peer does not read/.test(sw.stderr), "the disconnect", 10_000);
      await until(() => sw.fdCount() <= base, "the fds released", 2000);
    } finally {
      native.close(fd);
    }
  });
});
