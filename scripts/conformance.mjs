// Regenerate docs/conformance.md: run `vhostkit check` against every back-end on the machine
// (vhostkit's own, DPDK testpmd's vhost PMD, QEMU's virtiofsd and vhost-user-gpu) and write the
// reports, with a table of what each peer does differently. Run as root after a build:
//   npx tsc -p tsconfig.json && node scripts/conformance.mjs
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { runChecks } from "../dist/src/tools/check/run.js";

const root = fileURLToPath(new URL("..", import.meta.url));
const child = join(root, "dist/test/fixtures/check-backend-child.js");
const bin = join(root, "bin/vhostkit.js");
const dir = mkdtempSync(join(tmpdir(), "vk-conformance-"));

function version(cmd, args) {
  try {
    return execFileSync(cmd, args, { encoding: "utf8" }).split("\n")[0].trim();
  } catch {
    return "unknown";
  }
}

function dpkgVersion(pkg) {
  return version("dpkg-query", ["-W", "-f=${Version}", pkg]);
}

/** Start a long-running back-end for a run; resolves with the process once it printed `ready`. */
function startProcess(args, ready) {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, args, { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    const on = (b) => {
      out += b.toString();
      if (ready.test(out)) resolve(p);
    };
    p.stdout.on("data", on);
    p.stderr.on("data", on);
    p.once("exit", (code) => reject(new Error(`exited ${code}: ${out}`)));
  });
}

const share = join(dir, "share");
mkdirSync(share);
writeFileSync(join(share, "hello.txt"), "vhostkit check reads this file through virtio-fs\n");
const testpmd = "/usr/bin/dpdk-testpmd";

const peers = [
  {
    name: "vhostkit test device (echo)",
    version: "this tree",
    how: "node dist/test/fixtures/check-backend-child.js SOCK echo (checked with --second SOCK2: a second one)",
    async run() {
      const sock = join(dir, "echo.sock");
      const sock2 = join(dir, "echo2.sock");
      const p = await startProcess([child, sock, "echo"], /ready/);
      const p2 = await startProcess([child, sock2, "echo"], /ready/);
      try {
        return await runChecks({
          socket: sock,
          pid: p.pid,
          connections: 300,
          second: { socket: sock2 },
        });
      } finally {
        p.kill();
        p2.kill();
      }
    },
  },
  {
    name: "vhostkit switch",
    version: "this tree",
    how: "vhostkit switch --socket SOCK --socket SOCK2 (checked with --second SOCK2 --pid)",
    async run() {
      const s1 = join(dir, "sw1.sock");
      const s2 = join(dir, "sw2.sock");
      const p = await startProcess([bin, "switch", "--socket", s1, "--socket", s2], /listening/);
      try {
        return await runChecks({
          socket: s1,
          pid: p.pid,
          connections: 300,
          second: { socket: s2 },
        });
      } finally {
        p.kill();
      }
    },
  },
  {
    name: "vhostkit entropy example",
    version: "this tree",
    how: "node dist/test/fixtures/check-backend-child.js SOCK rng (profile rng, --second SOCK2: a second one)",
    async run() {
      const sock = join(dir, "rng.sock");
      const sock2 = join(dir, "rng2.sock");
      const p = await startProcess([child, sock, "rng"], /ready/);
      const p2 = await startProcess([child, sock2, "rng"], /ready/);
      try {
        return await runChecks({
          socket: sock,
          profile: "rng",
          pid: p.pid,
          connections: 300,
          second: { socket: sock2 },
        });
      } finally {
        p.kill();
        p2.kill();
      }
    },
  },
  {
    name: "DPDK testpmd vhost PMD",
    version: `dpdk ${dpkgVersion("dpdk")}`,
    how: "dpdk-testpmd --no-huge --vdev net_vhost0,iface=SOCK -- --forward-mode=io --auto-start (restarted with --spawn; --second: a second testpmd)",
    skip: !existsSync(testpmd),
    async run() {
      const sock = join(dir, "vhost.sock");
      const sock2 = join(dir, "vhost2.sock");
      const spawnCmd = (s, prefix) =>
        `exec ${testpmd} -l 0,1 --main-lcore 1 --no-huge -m 512 --no-pci --file-prefix=${prefix} ` +
        `--vdev 'net_vhost0,iface=${s},queues=1' -- --forward-mode=io --nb-cores=1 ` +
        `--total-num-mbufs=16384 --stats-period=1 --auto-start </dev/null >/dev/null 2>&1`;
      return runChecks({
        socket: sock,
        spawn: spawnCmd(sock, "vkconf"),
        connectTimeoutMs: 15000,
        second: { socket: sock2, spawn: spawnCmd(sock2, "vkconf2"), connectTimeoutMs: 15000 },
      });
    },
  },
  {
    name: "QEMU virtiofsd",
    version: `qemu-system-common ${dpkgVersion("qemu-system-common")}`,
    how: "/usr/lib/qemu/virtiofsd --socket-path=SOCK -o source=DIR -o cache=none (profile fs, restarted with --spawn; --second: a second virtiofsd on the same directory)",
    skip: !existsSync("/usr/lib/qemu/virtiofsd"),
    run() {
      const sock = join(dir, "fs.sock");
      const sock2 = join(dir, "fs2.sock");
      const fsd = (s) =>
        `exec /usr/lib/qemu/virtiofsd --socket-path=${s} -o source=${share} -o cache=none`;
      return runChecks({
        socket: sock,
        profile: "fs",
        spawn: fsd(sock),
        second: { socket: sock2, spawn: fsd(sock2) },
      });
    },
  },
  {
    name: "QEMU vhost-user-gpu",
    version: `qemu ${dpkgVersion("qemu-system-common")}`,
    how: "/usr/lib/qemu/vhost-user-gpu --socket-path=SOCK (profile generic, restarted with --spawn)",
    skip: !existsSync("/usr/lib/qemu/vhost-user-gpu"),
    run() {
      const sock = join(dir, "gpu.sock");
      return runChecks({
        socket: sock,
        spawn: `exec /usr/lib/qemu/vhost-user-gpu --socket-path=${sock}`,
      });
    },
  },
];

const mark = (c) =>
  c === undefined ? "" : c.result === "pass" ? (c.fact ? "fact" : "pass") : c.result;
const esc = (s) => s.replace(/\|/g, "\\|");

const results = [];
for (const p of peers) {
  if (p.skip) {
    console.log(`${p.name}: not installed, skipped`);
    continue;
  }
  console.log(`${p.name}...`);
  results.push({ peer: p, report: await p.run() });
}
rmSync(dir, { recursive: true, force: true });

const out = [];
out.push("# Conformance of vhost-user back-ends");
out.push("");
out.push(
  "Generated by `node scripts/conformance.mjs` (do not edit by hand) from real runs of " +
    "`vhostkit check` against every back-end on the machine. A failing check about a foreign " +
    "back-end is a finding about that back-end; `fact` marks a behaviour reported without a verdict.",
);
out.push("");
out.push("## What each back-end does differently");
out.push("");
out.push(`| check | ${results.map((r) => r.peer.name).join(" | ")} |`);
out.push(`|---|${results.map(() => "---").join("|")}|`);
const ids = results[0]?.report.checks.map((c) => c.id) ?? [];
for (const id of ids) {
  const cells = results.map((r) => mark(r.report.checks.find((c) => c.id === id)));
  out.push(`| \`${id}\` | ${cells.join(" | ")} |`);
}
out.push("");
out.push("Where they differ (details from the reports below):");
out.push("");
for (const id of ids) {
  const rows = results.map((r) => ({
    name: r.peer.name,
    c: r.report.checks.find((c) => c.id === id),
  }));
  const kinds = new Set(rows.map((x) => `${mark(x.c)}`));
  const facts = new Set(rows.filter((x) => x.c?.fact).map((x) => x.c.detail)).size > 1;
  if (kinds.size <= 1 && !facts) continue;
  const lines = rows
    .filter((x) => x.c && (x.c.result === "fail" || x.c.fact))
    .map((x) => `  - ${x.name}: ${mark(x.c)}: ${x.c.detail}`);
  if (lines.length === 0) continue;
  out.push(`- \`${id}\`:`);
  out.push(...lines);
}
for (const { peer, report } of results) {
  out.push("");
  out.push(`## ${peer.name}`);
  out.push("");
  out.push(`- version: ${peer.version}`);
  out.push(`- run: \`${peer.how}\``);
  out.push(`- profile: ${report.profile}`);
  out.push(
    `- features: \`${report.offered.features}\` (${report.offeredNames.features.join(", ")})`,
  );
  out.push(
    `- protocol features: \`${report.offered.protocolFeatures}\` (${report.offeredNames.protocolFeatures.join(", ")})`,
  );
  for (const n of report.notes) out.push(`- ${n.replace(/\/tmp\/[^ ]*/g, "SOCK")}`);
  out.push(
    `- summary: ${report.summary.pass} passed, ${report.summary.fail} failed, ${report.summary.na} not applicable`,
  );
  out.push("");
  out.push("| result | check | detail |");
  out.push("|---|---|---|");
  for (const c of report.checks) {
    const detail = c.detail
      .replace(/\/tmp\/vk-conformance-[^ ,;)]*/g, "SOCK")
      .replace(/pid \d+/g, "pid N");
    out.push(`| ${mark(c)} | \`${c.id}\` | ${esc(detail)} |`);
  }
}
const target = join(root, "docs/conformance.md");
writeFileSync(target, out.join("\n") + "\n");
console.log(`wrote ${target}`);
