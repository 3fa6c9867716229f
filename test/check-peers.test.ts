/**
 * `vhostkit check` against the foreign back-ends on the machine: QEMU's virtiofsd (profile fs,
 * restarted per connection with --spawn: it serves one front-end and exits), vhost-user-gpu
 * (generic) and DPDK testpmd's vhost PMD (net). A peer's failing check is a finding, not a
 * test failure: each test asserts that the report is produced and that the facts known about
 * the peer are reported.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { runChecks } from "../src/tools/check/run.js";
import type { CheckReport, CheckReportEntry } from "../src/tools/check/types.js";
import { findExecutable, testpmdArgs, uniqueName } from "./peers/testpmd.js";

const VIRTIOFSD = "/usr/lib/qemu/virtiofsd";
const GPU = "/usr/lib/qemu/vhost-user-gpu";

function entry(r: CheckReport, id: string): CheckReportEntry {
  const c = r.checks.find((x) => x.id === id);
  assert.ok(c, `check ${id} in the report`);
  return c;
}

test("vhostkit check: QEMU virtiofsd (profile fs, restarted with --spawn)", async (t) => {
  assert.ok(existsSync(VIRTIOFSD), `${VIRTIOFSD} (qemu-system-common) is installed`);
  const dir = mkdtempSync(join(tmpdir(), "vk-check-fs-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const share = join(dir, "share");
  mkdirSync(share);
  const text = "vhostkit check reads this file through virtio-fs\n";
  writeFileSync(join(share, "hello.txt"), text);
  const sock = join(dir, "fs.sock");
  const r = await runChecks({
    socket: sock,
    profile: "fs",
    spawn: `${VIRTIOFSD} --socket-path=${sock} -o source=${share} -o cache=none`,
  });
  for (const c of r.checks) if (c.result === "fail") t.diagnostic(`finding: ${c.id}: ${c.detail}`);
  assert.equal(r.offered.features, "0x175000000", "the features the environment notes say");
  const fuse = entry(r, "fs.fuse-init-lookup-read");
  assert.equal(fuse.result, "pass", fuse.detail);
  assert.match(fuse.detail, /FUSE_INIT 7\.36/);
  assert.match(fuse.detail, new RegExp(`READ 4096 -> error 0, ${text.length} byte\\(s\\)`));
  assert.match(
    entry(r, "rings.call-fd-at-get-vring-base").detail,
    /closes the call fd at GET_VRING_BASE/,
    "the known libvhost-user behaviour is reported",
  );
  assert.equal(entry(r, "rings.get-vring-base-split").result, "pass");
  assert.equal(entry(r, "dirty-log.marks-writes").result, "pass");
  assert.ok(
    r.notes.some((n) => /started \d+ time\(s\)/.test(n)),
    "restarts are reported",
  );
});

test("vhostkit check: QEMU vhost-user-gpu (generic)", async (t) => {
  assert.ok(existsSync(GPU), `${GPU} is installed`);
  const dir = mkdtempSync(join(tmpdir(), "vk-check-gpu-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "gpu.sock");
  const r = await runChecks({ socket: sock, spawn: `${GPU} --socket-path=${sock}` });
  for (const c of r.checks) if (c.result === "fail") t.diagnostic(`finding: ${c.id}: ${c.detail}`);
  assert.equal(r.profile, "generic");
  const cfg = entry(r, "handshake.config");
  assert.equal(cfg.result, "pass", cfg.detail);
  assert.match(
    cfg.detail,
    /GET_CONFIG\(0, 256\): an empty payload \(failure form\); connection kept/,
  );
  assert.equal(entry(r, "memory.add-rem-reg").result, "pass");
  assert.equal(entry(r, "robustness.unknown-request").result, "pass");
});

test("vhostkit check: DPDK testpmd vhost PMD (net, restarted with --spawn)", async (t) => {
  const bin = findExecutable("dpdk-testpmd", ["/usr/bin/dpdk-testpmd"]);
  const dir = mkdtempSync(join(tmpdir(), "vk-check-dpdk-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, "vhost.sock");
  const args = testpmdArgs(
    { vdev: { kind: "vhost", iface: sock, queues: 1 }, forwardMode: "io" },
    uniqueName("check"),
  )
    .filter((a) => a !== "-i")
    .map((a) => `'${a}'`);
  // Not interactive: forwarding starts by itself; the process runs until it is stopped.
  const spawn = `exec ${bin} ${args.join(" ")} --stats-period=1 --auto-start </dev/null >/dev/null 2>&1`;
  const r = await runChecks({ socket: sock, spawn, connectTimeoutMs: 15_000 });
  for (const c of r.checks) if (c.result === "fail") t.diagnostic(`finding: ${c.id}: ${c.detail}`);
  assert.equal(r.profile, "net");
  assert.equal(entry(r, "rings.start-on-kick").result, "pass");
  assert.match(entry(r, "rings.start-on-kick").detail, /32 frame\(s\) came back on RX/);
  assert.equal(entry(r, "rings.get-vring-base-split").result, "pass");
  assert.equal(entry(r, "dirty-log.marks-writes").result, "pass");
  assert.match(
    entry(r, "rings.call-fd-at-get-vring-base").detail,
    /drops the call fd at GET_VRING_BASE/,
  );
  // DPDK 22.11 answers GET_VRING_BASE on a packed ring with the avail half only.
  assert.match(entry(r, "rings.get-vring-base-packed").detail, /used 0 wrap 0/);
  // A memory region larger than its fd, with a ring beyond the fd's end, ends the process.
  const region = entry(r, "robustness.region-beyond-fd");
  assert.equal(region.result, "fail", region.detail);
  assert.match(region.detail, /killed by/);
  assert.equal(
    entry(r, "robustness.truncated-hang-up").result,
    "pass",
    "restarted after the crash",
  );
});
