/**
 * `vhostkit migrate`: a `serve` front-end process holding a device on back-end A, an
 * `incoming` destination on back-end B, and the client form `--from CTRL --to HOST:PORT`
 * printing progress and the figures (run in this process with captured output).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createServer } from "node:net";
import type { AddressInfo } from "node:net";

import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import { runMigrate } from "../src/cli/migrate.js";
import type { CliIo } from "../src/cli/common.js";

function capture(): CliIo & { out: string[]; err: string[] } {
  const out: string[] = [];
  const err: string[] = [];
  return { out, err, stdout: (t) => out.push(t), stderr: (t) => err.push(t), env: {} };
}

async function until(what: string, cond: () => boolean, ms = 8000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
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
  const devB = new NetTestDevice({ mode: "sink" });
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
      ["serve", "--socket", join(dir, "a.sock"), "--control", ctl, "--mem", "8M"],
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
    await until("control socket", () => existsSync(ctl));
    await until("traffic on A", () => (devA.counters[0]?.txPackets ?? 0) > 200);
    const code = await runMigrate(["--from", ctl, "--to", `127.0.0.1:${port}`, "--verify"], ioC);
    const out = ioC.out.join("");
    assert.equal(code, 0, `${out}\n${ioC.err.join("")}`);
    assert.match(out, /\[precopy\] iteration 1/);
    assert.match(out, /downtime\s+\d+\.\d ms/);
    assert.match(out, /iterations\s+\d+/);
    assert.match(out, /pages sent\s+\d+/);
    assert.match(out, /virtio state\s+\d+ bytes/);
    assert.equal(await serve, 0, "the source process ends after its device left");
    serve = null;
    const atB = devB.counters[0]?.txPackets ?? 0;
    await until("traffic goes on through B", () => (devB.counters[0]?.txPackets ?? 0) > atB + 200);
    await until("second control socket", () => existsSync(ctl2));
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
