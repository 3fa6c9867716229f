/**
 * The switch's counters stay exact at full rate: `vhostkit switch` (a child process) between
 * the two net_virtio_user ports of one testpmd in DPDK's mac loopback, run flat out for 2 s in
 * busy mode; then testpmd's ethdev counters and `vhostkit stats --json` agree frame for frame
 * and byte for byte, and every frame the switch took is accounted for (delivered or dropped
 * with a reason).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { startTestpmd } from "./peers/testpmd.js";
import type { PortStats, Testpmd } from "./peers/testpmd.js";
import { sleep } from "./helpers.js";

const here = fileURLToPath(new URL(".", import.meta.url));
const BIN = join(here, "..", "..", "bin", "vhostkit.js");
const MAC_0 = "52:54:00:00:13:20";
const MAC_1 = "52:54:00:00:13:21";

interface Counters {
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
  drops: Record<string, number>;
}

function switchStats(control: string): Map<string, Counters> {
  const r = spawnSync(process.execPath, [BIN, "stats", "--json", "--control", control], {
    encoding: "utf8",
    timeout: 15_000,
  });
  assert.equal(r.status, 0, r.stderr);
  const snap = JSON.parse(r.stdout) as {
    switch: { ports: { name: string; counters: Counters }[] };
  };
  return new Map(snap.switch.ports.map((p) => [p.name, p.counters]));
}

const dropSum = (c: Counters): number => Object.values(c.drops).reduce((x, y) => x + y, 0);

test("switch counters equal testpmd's after a full-rate mac loopback (vhostkit stats)", async () => {
  const dir = mkdtempSync(join(tmpdir(), "vk-swcnt-"));
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  const control = join(dir, "ctl.sock");
  const child = spawn(
    process.execPath,
    [BIN, "switch", "--socket", a, "--socket", b, "--control", control, "--busy-poll", "50"],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  let tp: Testpmd | null = null;
  try {
    const deadline = Date.now() + 15_000;
    while (!stderr.includes("vhostkit switch: ready")) {
      assert.ok(Date.now() < deadline && child.exitCode === null, `switch not ready: ${stderr}`);
      await sleep(20);
    }
    tp = await startTestpmd({
      vdev: { kind: "virtio_user", path: a, mac: MAC_0 },
      extraEalArgs: ["--vdev", `net_virtio_user1,path=${b},queues=1,mac=${MAC_1}`],
      forwardMode: "mac",
      forwardLcore: 1,
      name: "swcnt",
      extraAppArgs: [`--eth-peer=0,${MAC_1}`, `--eth-peer=1,${MAC_0}`],
    });
    await tp.ready();
    await tp.waitLinkUp();
    await tp.clearStats();
    assert.match(await tp.command("start tx_first 32"), /forwarding - ports=/);
    await sleep(2000);
    await tp.stop();
    // Frames the switch already wrote into testpmd's receive rings: take them (rxonly sends
    // nothing), so both sides have seen every frame.
    await tp.setForwardMode("rxonly");
    await tp.start();
    await sleep(500);
    await tp.stop();
    const st = await tp.stats();
    const p0 = st.find((p) => p.port === 0) as PortStats;
    const p1 = st.find((p) => p.port === 1) as PortStats;
    const sw = switchStats(control);
    const ca = sw.get(a) as Counters;
    const cb = sw.get(b) as Counters;
    const report = JSON.stringify({ p0, p1, ca, cb });
    assert.ok(p0.txPackets > 10_000, `the loop ran at rate: ${report}`);
    // testpmd port 0 -> switch port A -> switch port B -> testpmd port 1, and back
    assert.equal(ca.rxPackets, p0.txPackets, `A took every frame port 0 sent: ${report}`);
    assert.equal(ca.rxBytes, p0.txBytes, `bytes: ${report}`);
    assert.equal(cb.rxPackets, p1.txPackets, `B took every frame port 1 sent: ${report}`);
    assert.equal(cb.rxBytes, p1.txBytes, `bytes: ${report}`);
    assert.equal(cb.txPackets, p1.rxPackets, `port 1 received what B delivered: ${report}`);
    assert.equal(cb.txBytes, p1.rxBytes, `bytes: ${report}`);
    assert.equal(ca.txPackets, p0.rxPackets, `port 0 received what A delivered: ${report}`);
    assert.equal(ca.txBytes, p0.rxBytes, `bytes: ${report}`);
    // every frame in is a frame out or a counted drop at the destination
    assert.equal(ca.rxPackets, cb.txPackets + dropSum(cb), `A -> B conserved: ${report}`);
    assert.equal(cb.rxPackets, ca.txPackets + dropSum(ca), `B -> A conserved: ${report}`);
  } catch (err) {
    (err as Error).message +=
      `\n--- switch ---\n${stderr.slice(-3000)}` + (tp ? `\n--- testpmd ---\n${tp.tail(30)}` : "");
    throw err;
  } finally {
    if (tp) await tp.close();
    child.kill("SIGTERM");
    const t = setTimeout(() => child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(t);
    rmSync(dir, { recursive: true, force: true });
  }
});
