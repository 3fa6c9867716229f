/**
 * `vhostkit migrate`: a `serve` front-end process holding a device on back-end A, an
 * `incoming` destination on back-end B, and the client form `--from CTRL --to HOST:PORT`
 * printing progress and the figures (run in this process with captured output).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createConnection, createServer } from "node:net";
import type { AddressInfo } from "node:net";

import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { runMigrate } from "../src/cli/migrate.js";
import type { CliIo } from "../src/cli/common.js";
import { ProtocolFeature, featureMask } from "../src/protocol/constants.js";
import { until } from "./helpers.js";

/** A sink that offers SEND_RARP and records the MACs it was asked to announce. */
class RarpSink extends NetTestDevice {
  override readonly protocolFeatures =
    featureMask(ProtocolFeature.MQ) | featureMask(ProtocolFeature.RARP);
  readonly rarps: string[] = [];
  constructor() {
    super({ mode: "sink" });
  }
  sendRarp(mac: Uint8Array): void {
    this.rarps.push(Buffer.from(mac).toString("hex"));
  }
}

function capture(): CliIo & { out: string[]; err: string[] } {
  const out: string[] = [];
  const err: string[] = [];
  return { out, err, stdout: (t) => out.push(t), stderr: (t) => err.push(t), env: {} };
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

test("vhostkit migrate: serve, incoming, --from/--to with progress and figures", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-mig-cli-"));
  const devA = new NetTestDevice({ mode: "sink" });
  const devB = new RarpSink();
  const srvA = serveBackend(devA, { path: join(dir, "a.sock") });
  const srvB = serveBackend(devB, { path: join(dir, "b.sock") });
  const ctl = join(dir, "vm.ctl");
  const ctl2 = join(dir, "vm2.ctl");
  const port = await freePort();
  const ioS = capture();
  const ioD = capture();
  const ioC = capture();
  let serve: Promise<number> | null = null;
  let incoming: Promise<number> | null = null;
  try {
    serve = runMigrate(
      [
        "serve",
        "--socket",
        join(dir, "a.sock"),
        "--control",
        ctl,
        "--mem",
        "8M",
        "--mac",
        "02:00:00:00:00:42",
      ],
      ioS,
    );
    incoming = runMigrate(
      [
        "incoming",
        "--listen",
        `127.0.0.1:${port}`,
        "--socket",
        join(dir, "b.sock"),
        "--control",
        ctl2,
      ],
      ioD,
    );
    await until(() => existsSync(ctl), "control socket", 8000);
    await until(() => (devA.counters[0]?.txPackets ?? 0) > 200, "traffic on A", 8000);
    const code = await runMigrate(["--from", ctl, "--to", `127.0.0.1:${port}`, "--verify"], ioC);
    const out = ioC.out.join("");
    assert.equal(code, 0, `${out}\n${ioC.err.join("")}`);
    assert.match(out, /\[precopy\] iteration 1/);
    assert.match(out, /downtime\s+\d+\.\d ms/);
    // the downtime broken down per step, source stages then the destination's
    assert.match(out, /\n {4}source: stop\s+\d+\.\d\d ms\n/);
    assert.match(out, /\n {4}source: switchover\s+\d+\.\d\d ms\n/);
    assert.match(out, /\n {4}destination: enable\s+\d+\.\d\d ms\n/);
    assert.match(out, /iterations\s+\d+/);
    assert.match(out, /pages sent\s+\d+/);
    assert.match(out, /virtio state\s+\d+ bytes/);
    assert.equal(await serve, 0, "the source process ends after its device left");
    // serve's --mac went along in the virtio state: the destination announced it.
    assert.deepEqual(devB.rarps, ["020000000042"], "SEND_RARP with the serve --mac");
    assert.match(ioD.err.join(""), /RARP sent/);
    serve = null;
    const atB = devB.counters[0]?.txPackets ?? 0;
    await until(
      () => (devB.counters[0]?.txPackets ?? 0) > atB + 200,
      "traffic goes on through B",
      8000,
    );
    await until(() => existsSync(ctl2), "second control socket", 8000);
    // Bad arguments: usage error.
    const ioU = capture();
    assert.equal(await runMigrate(["--from", ctl2, "--to", "nowhere"], ioU), 2);
    assert.match(ioU.err.join(""), /--to: expected HOST:PORT/);
  } finally {
    process.emit("SIGINT");
    if (serve) await serve;
    if (incoming) await incoming;
    srvA.close();
    srvB.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

/** Send control lines and collect the answers until `count` lines came back. */
async function control(path: string, lines: string[], count: number): Promise<unknown[]> {
  return new Promise((resolve, reject) => {
    const out: unknown[] = [];
    let buf = "";
    const c = createConnection({ path }, () => c.write(lines.map((l) => `${l}\n`).join("")));
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error(`control: ${out.length} of ${count} answers`));
    }, 5000);
    c.on("error", reject);
    c.on("data", (d: Buffer) => {
      buf += d.toString("utf8");
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        out.push(JSON.parse(buf.slice(0, nl)));
        buf = buf.slice(nl + 1);
      }
      if (out.length >= count) {
        clearTimeout(timer);
        c.end();
        resolve(out);
      }
    });
  });
}

test("vhostkit migrate: --help, bad options before connecting, control sockets, bad commands", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-mig-cli-"));
  const devA = new NetTestDevice({ mode: "sink" });
  const srvA = serveBackend(devA, { path: join(dir, "a.sock") });
  const ctl = join(dir, "vm.ctl");
  let serve: Promise<number> | null = null;
  try {
    for (const sub of ["serve", "incoming"]) {
      const io = capture();
      assert.equal(await runMigrate([sub, "--help"], io), 0, `${sub} --help`);
      assert.match(io.out.join(""), /usage:/);
      assert.equal(io.err.join(""), "");
    }
    // A bad --mac is refused before the back-end is connected.
    const ioM = capture();
    const sock = join(dir, "a.sock");
    const bad = ["serve", "--socket", sock, "--control", ctl, "--mac", "zz"];
    assert.equal(await runMigrate(bad, ioM), 2);
    assert.match(ioM.err.join(""), /--mac: malformed MAC/);
    assert.equal(srvA.session, null, "no session was opened");
    // A regular file at --control is not removed; a live socket is refused.
    const file = join(dir, "not-a-socket");
    writeFileSync(file, "keep me");
    const ioF = capture();
    assert.equal(await runMigrate(["serve", "--socket", sock, "--control", file], ioF), 1);
    assert.match(ioF.err.join(""), /not-a-socket exists and is not a socket/);
    assert.ok(existsSync(file), "the file is still there");
    const live = createServer();
    const livePath = join(dir, "live.sock");
    await new Promise<void>((r) => live.listen(livePath, r));
    try {
      const ioL = capture();
      assert.equal(await runMigrate(["serve", "--socket", sock, "--control", livePath], ioL), 1);
      assert.match(ioL.err.join(""), /live\.sock is in use/);
      const ioI = capture();
      const args = ["incoming", "--listen", `unix:${livePath}`, "--socket", sock];
      assert.equal(await runMigrate(args, ioI), 1);
      assert.match(ioI.err.join(""), /--listen: .*live\.sock is in use/);
    } finally {
      live.close();
    }
    // Malformed control lines are answered, and the process holding the device goes on.
    const ioS = capture();
    serve = runMigrate(["serve", "--socket", sock, "--control", ctl, "--mem", "8M"], ioS);
    await until(() => existsSync(ctl), "control socket", 8000);
    const answers = await control(
      ctl,
      [
        "null",
        "[1]",
        "{not json",
        '{"cmd":"migrate","to":"127.0.0.1:1","maxIterations":"5"}',
        '{"cmd":"migrate","to":"127.0.0.1:1","verify":"yes"}',
        '{"cmd":"migrate","to":5}',
        '{"cmd":"reboot"}',
        '{"cmd":"status"}',
      ],
      8,
    );
    const msgs = answers.map((a) => a as { event: string; message?: string });
    assert.deepEqual(
      msgs.map((m) => m.event),
      ["error", "error", "error", "error", "error", "error", "error", "status"],
      JSON.stringify(msgs),
    );
    assert.match(msgs[3]?.message ?? "", /maxIterations/);
    assert.match(msgs[4]?.message ?? "", /verify/);
    assert.match(msgs[5]?.message ?? "", /field to/);
    // A migration that cannot connect: reported, and the source says it runs on.
    const port = await freePort();
    const ioC = capture();
    assert.equal(await runMigrate(["--from", ctl, "--to", `127.0.0.1:${port}`], ioC), 1);
    assert.match(ioC.err.join(""), /failed: .*\(the source runs on\)/);
  } finally {
    process.emit("SIGINT");
    if (serve) assert.equal(await serve, 0);
    srvA.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
