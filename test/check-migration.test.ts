/**
 * The migration section of `vhostkit check` against vhostkit's own back-ends, each in its own
 * process: two echo test devices (profile net), two entropy devices (profile rng) and the two
 * ports of one `vhostkit switch` as source and destination. Every migration check passes;
 * without `--second` the section does not apply and says why.
 */
import { test } from "node:test";
import type { TestContext } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { runChecks } from "../src/tools/check/run.js";
import { startChild } from "./helpers.js";
import type { CheckReport } from "../src/tools/check/types.js";
import { findExecutable, testpmdArgs, uniqueName } from "./peers/testpmd.js";

const CHILD = fileURLToPath(new URL("./fixtures/check-backend-child.js", import.meta.url));
const BIN = fileURLToPath(new URL("../../bin/vhostkit.js", import.meta.url));
const IDS = [
  "migration.none-lost",
  "migration.none-duplicated",
  "migration.memory-equal",
  "migration.destination-serves",
];

function tmp(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-mig-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function assertMigrationPasses(t: TestContext, r: CheckReport): void {
  for (const id of IDS) {
    const c = r.checks.find((x) => x.id === id);
    assert.ok(c, `${id} in the report`);
    t.diagnostic(`${id}: ${c.result}: ${c.detail}`);
    assert.equal(c.result, "pass", `${id}: ${c.detail}`);
    assert.equal(c.section, "migration");
  }
}

test("vhostkit check --second: two echo devices migrate with none lost or duplicated", async (t) => {
  const dir = tmp(t);
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  await startChild(t, [CHILD, a, "echo"], /ready/);
  await startChild(t, [CHILD, b, "echo"], /ready/);
  const r = await runChecks({ socket: a, second: { socket: b }, only: ["migration"] });
  assert.equal(r.profile, "net");
  assertMigrationPasses(t, r);
  const lost = r.checks.find((c) => c.id === "migration.none-lost");
  assert.match(lost?.detail ?? "", /seq 0\.\.\d+ sent, \d+ used before switch-over, \d+ after/);
  assert.match(lost?.detail ?? "", /device state not transferred/, "the echo device has none");
  assert.match(lost?.detail ?? "", /came back on RX/);
});

test("vhostkit check --second: two entropy devices (profile rng) migrate", async (t) => {
  const dir = tmp(t);
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  await startChild(t, [CHILD, a, "rng"], /ready/);
  await startChild(t, [CHILD, b, "rng"], /ready/);
  const r = await runChecks({
    socket: a,
    second: { socket: b },
    profile: "rng",
    only: ["migration"],
  });
  assertMigrationPasses(t, r);
});

test("vhostkit check --second: two ports of vhostkit switch migrate", async (t) => {
  const dir = tmp(t);
  const s1 = join(dir, "p1.sock");
  const s2 = join(dir, "p2.sock");
  await startChild(t, [BIN, "switch", "--socket", s1, "--socket", s2], /listening|serving|ready/i);
  const r = await runChecks({ socket: s1, second: { socket: s2 }, only: ["migration"] });
  assertMigrationPasses(t, r);
  const lost = r.checks.find((c) => c.id === "migration.none-lost");
  assert.match(lost?.detail ?? "", /device state \d+ byte\(s\)/, "ports offer DEVICE_STATE");
  assert.match(lost?.detail ?? "", /SEND_RARP sent and accepted/, "ports offer RARP");
});

test("vhostkit check without --second: the migration section is n/a with the reason", async (t) => {
  const dir = tmp(t);
  const a = join(dir, "a.sock");
  await startChild(t, [CHILD, a, "echo"], /ready/);
  const r = await runChecks({ socket: a, only: ["migration"] });
  assert.equal(r.checks.length, IDS.length);
  for (const c of r.checks) {
    assert.equal(c.result, "n/a", c.id);
    assert.match(c.detail, /no --second/);
  }
});

test("vhostkit check --second: a DPDK testpmd vhost PMD pair (a failing check is a finding)", async (t) => {
  const bin = findExecutable("dpdk-testpmd", ["/usr/bin/dpdk-testpmd"]);
  const dir = tmp(t);
  const spawnFor = (sock: string, prefix: string): string => {
    const args = testpmdArgs(
      { vdev: { kind: "vhost", iface: sock, queues: 1 }, forwardMode: "io" },
      uniqueName(prefix),
    )
      .filter((a) => a !== "-i")
      .map((a) => `'${a}'`);
    return `exec ${bin} ${args.join(" ")} --stats-period=1 --auto-start </dev/null >/dev/null 2>&1`;
  };
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  const r = await runChecks({
    socket: a,
    spawn: spawnFor(a, "mig-a"),
    second: { socket: b, spawn: spawnFor(b, "mig-b"), connectTimeoutMs: 15_000 },
    connectTimeoutMs: 15_000,
    only: ["migration"],
  });
  assert.equal(r.profile, "net");
  assert.equal(r.checks.length, IDS.length);
  for (const c of r.checks) {
    t.diagnostic(`${c.id}: ${c.result}: ${c.detail}`);
    assert.notEqual(c.result, "n/a", `${c.id} runs against testpmd: ${c.detail}`);
  }
  // testpmd in io mode forwards TX to RX: the numbered frames come back.
  const lost = r.checks.find((c) => c.id === "migration.none-lost");
  assert.match(lost?.detail ?? "", /seq 0\.\.\d+ sent/);
});

test("vhostkit check --second: a destination that does not serve the work fails the section", async (t) => {
  // Entropy device to a net echo device (profile rng): the echo device writes nothing into
  // the buffers of its queue 0 (its RX ring) unless frames come on TX.
  const dir = tmp(t);
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  await startChild(t, [CHILD, a, "rng"], /ready/);
  await startChild(t, [CHILD, b, "echo"], /ready/);
  const r = await runChecks({
    socket: a,
    second: { socket: b },
    profile: "rng",
    only: ["migration"],
  });
  for (const c of r.checks) t.diagnostic(`${c.id}: ${c.result}: ${c.detail}`);
  const serves = r.checks.find((c) => c.id === "migration.destination-serves");
  assert.equal(serves?.result, "fail", serves?.detail);
  const lost = r.checks.find((c) => c.id === "migration.none-lost");
  assert.equal(lost?.result, "fail", lost?.detail);
  assert.match(lost?.detail ?? "", /lost: \d+ \(/);
});
