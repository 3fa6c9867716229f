/**
 * `vhostkit check` against vhostkit's own back-ends, each in its own process: the test device
 * (echo), the entropy example (profile rng) and `vhostkit switch`. Every check passes or does
 * not apply; a failure is a vhostkit bug, listed by name below until it is fixed. Also the
 * command line: exit statuses and the JSON shape.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { runChecks } from "../src/tools/check/run.js";
import { startChild } from "./helpers.js";
import type { CheckReport } from "../src/tools/check/types.js";
import { main } from "../src/cli.js";

const CHILD = fileURLToPath(new URL("./fixtures/check-backend-child.js", import.meta.url));
const BIN = fileURLToPath(new URL("../../bin/vhostkit.js", import.meta.url));

/**
 * vhostkit bugs the battery finds, by check id (each must still fail, so that a fix shows
 * here and the entry is removed).
 */
const KNOWN_SWITCH_BUGS: Readonly<Record<string, string>> = {};

function failures(r: CheckReport): string[] {
  return r.checks.filter((c) => c.result === "fail").map((c) => `${c.id}: ${c.detail}`);
}

function result(r: CheckReport, id: string): string {
  const c = r.checks.find((x) => x.id === id);
  assert.ok(c, `check ${id} in the report`);
  return c.result;
}

test("vhostkit check: the test device (echo) passes every check, fd count included", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "echo.sock");
  const child = await startChild(t, [CHILD, sock, "echo"], /ready/);
  const r = await runChecks({ socket: sock, pid: child.pid ?? null, connections: 100 });
  t.diagnostic(`${r.summary.pass} passed, ${r.summary.na} n/a`);
  assert.equal(r.profile, "net", "auto picks net from the MAC/STATUS bits");
  assert.deepEqual(failures(r), []);
  for (const id of [
    "rings.disabled-no-side-effects",
    "rings.start-on-kick",
    "rings.get-vring-base-split",
    "rings.get-vring-base-packed",
    "memory.replace-while-running",
    "memory.add-rem-reg",
    "dirty-log.marks-writes",
    "dirty-log.replace-and-off",
    "robustness.region-beyond-fd",
    "robustness.fd-count",
  ]) {
    assert.equal(result(r, id), "pass", id);
  }
  const fact = r.checks.find((c) => c.id === "rings.call-fd-at-get-vring-base");
  assert.match(fact?.detail ?? "", /keeps the call fd/);
});

test("vhostkit check: the entropy example passes with --profile rng", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "rng.sock");
  await startChild(t, [CHILD, sock, "rng"], /ready/);
  const r = await runChecks({ socket: sock, profile: "rng" });
  assert.deepEqual(failures(r), []);
  assert.equal(result(r, "rings.start-on-kick"), "pass");
  assert.equal(result(r, "rings.disabled-no-side-effects"), "pass");
  assert.equal(result(r, "dirty-log.marks-writes"), "pass");
});

test("vhostkit check: a back-end in client mode (--listen)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "client.sock");
  await startChild(t, [CHILD, sock, "echo", "client"], /ready/);
  const r = await runChecks({ socket: null, listen: sock, only: ["handshake", "rings", "memory"] });
  assert.equal(r.target, `listen:${sock}`);
  assert.deepEqual(failures(r), []);
  assert.equal(result(r, "rings.get-vring-base-split"), "pass");
});

test("vhostkit check: vhostkit switch passes every check but the known bugs", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const s1 = join(dir, "p1.sock");
  const s2 = join(dir, "p2.sock");
  const sw = await startChild(
    t,
    [BIN, "switch", "--socket", s1, "--socket", s2],
    /listening|serving|ready/i,
  );
  const r = await runChecks({
    socket: s1,
    pid: sw.pid ?? null,
    connections: 100,
    second: { socket: s2 },
  });
  const failed = r.checks.filter((c) => c.result === "fail").map((c) => c.id);
  for (const f of failures(r)) t.diagnostic(f);
  assert.deepEqual(failed.sort(), Object.keys(KNOWN_SWITCH_BUGS).sort());
  assert.equal(result(r, "device-state.save-load"), "pass");
  assert.equal(result(r, "migration.none-lost"), "pass");
  // Net ports do not offer PROTOCOL_F_CONFIG (QEMU's vhost-user-net takes its config from its
  // own command line and warns about a back-end that offers it).
  assert.equal(result(r, "handshake.config"), "n/a");
  assert.equal(result(r, "robustness.fd-count"), "pass");
});

test("vhostkit check (command line): exit statuses and the JSON shape", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const out: string[] = [];
  const err: string[] = [];
  const io = {
    stdout: (s: string) => void out.push(s),
    stderr: (s: string) => void err.push(s),
    env: {},
  };
  assert.equal(await main(["check"], io), 2, "no socket: usage error");
  assert.equal(await main(["check", "x.sock", "--profile", "disk"], io), 2, "bad profile");
  assert.equal(await main(["check", join(dir, "none.sock")], io), 2, "nothing listening");
  assert.match(err.join(""), /cannot check/);
  const sock = join(dir, "echo.sock");
  await startChild(t, [CHILD, sock, "echo"], /ready/);
  out.length = 0;
  assert.equal(await main(["check", sock, "--json", "--only", "handshake"], io), 0);
  const j = JSON.parse(out.join("")) as CheckReport;
  assert.equal(j.target, sock);
  assert.match(j.offered.features, /^0x[0-9a-f]+$/);
  assert.match(j.offered.protocolFeatures, /^0x[0-9a-f]+$/);
  assert.ok(j.checks.length >= 8);
  for (const c of j.checks) {
    assert.equal(typeof c.id, "string");
    assert.equal(c.section, "handshake");
    assert.ok(["pass", "fail", "n/a"].includes(c.result));
    assert.equal(typeof c.detail, "string");
  }
  out.length = 0;
  assert.equal(await main(["check", sock, "--only", "handshake"], io), 0);
  assert.match(out.join(""), /\d+ checks: \d+ passed, 0 failed, \d+ not applicable/);
});

test("regression: device-state.refused-while-running asked before any kick (rings not started)", async (t) => {
  // A ring starts at its first kick, not at SET_VRING_KICK (vhost-user "Ring states"): asked
  // before any kick, the switch rightly took SET_DEVICE_STATE_FD(SAVE, STOPPED) and the check
  // reported it as accepted while rings run. The check now kicks first; the switch refuses.
  const dir = mkdtempSync(join(tmpdir(), "vk-check-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const s1 = join(dir, "p1.sock");
  await startChild(t, [BIN, "switch", "--socket", s1], /listening|serving|ready/i);
  const r = await runChecks({ socket: s1, only: ["device-state.refused-while-running"] });
  const c = r.checks[0];
  assert.ok(c);
  assert.equal(c.result, "pass", c.detail);
  assert.match(c.detail, /8 of 8 buffers used, rings kicked: .* result [1-9]/);
});
