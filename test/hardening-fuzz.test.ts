/**
 * Bounded CI runs of the hostile-guest fuzz target (10^4 ring mutations against a switch child
 * while two other ports forward known traffic) and of the soak loop (connect / set up /
 * traffic / disconnect cycles: the switch's fd count stays flat). Long runs: bench/fuzz-guest.ts
 * and bench/soak.ts.
 */
import { test } from "node:test";
import assert from "node:assert/strict";

import { runFrontendFuzz, runGuestFuzz, runSoak } from "./hardening-fuzz.js";

test("hostile guest: 10^4 random ring writes and kicks; the switch survives and known traffic all arrives", async () => {
  const f = await runGuestFuzz(10_000, 0x5eed);
  assert.equal(f.inputs, 10_000);
  assert.equal(f.alive, true);
  assert.equal(f.knownReceived, f.knownSent);
  assert.ok(f.fds[1] <= f.fds[0] + 2, `fds ${f.fds[0]} -> ${f.fds[1]}`);
});

test("soak: 100 connect / set-up / traffic / disconnect cycles leave the switch's fds flat", async () => {
  const f = await runSoak(100);
  assert.equal(f.alive, true);
  assert.equal(f.knownReceived, f.knownSent);
  assert.ok(f.fds[1] <= f.fds[0], `fds ${f.fds[0]} -> ${f.fds[1]}`);
});

test("hostile front-end: 10^4 valid and mutated messages with fds; the switch survives and leaks no fd", async () => {
  const f = await runFrontendFuzz(10_000, 0xf00d);
  assert.equal(f.inputs, 10_000);
  assert.equal(f.alive, true);
  assert.ok(f.fds[1] <= f.fds[0], `fds ${f.fds[0]} -> ${f.fds[1]}`);
});
