/**
 * Overhead of `vhostkit trace`: the back-end (vhostkit's echo test device) and the proxy
 * (`vhostkit trace`, printing every message to /dev/null) each run in their own process; the
 * front-end runs here. Measured with and without the proxy, side by side:
 * - connection set-up: connect, GET_FEATURES, protocol features, SET_FEATURES, SET_MEM_TABLE,
 *   two rings set up and enabled, up to the last reply (median of 20 runs);
 * - a request/reply round trip: GET_FEATURES on an open connection (median of 2000).
 * Guest traffic (frames through the rings) never passes through the proxy: it goes through
 * shared memory and eventfds, so a frame's round trip is the same with and without it.
 * Prints, asserts nothing.
 *
 * Run: node dist/bench/trace-overhead.js
 */
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import { sleep } from "../test/helpers.js";

const CHILD = fileURLToPath(new URL("../test/fixtures/check-backend-child.js", import.meta.url));
const BIN = fileURLToPath(new URL("../../bin/vhostkit.js", import.meta.url));
const SETUPS = 20;
const ROUND_TRIPS = 2000;

async function waitSocket(path: string): Promise<void> {
  const end = Date.now() + 10_000;
  while (!existsSync(path)) {
    if (Date.now() > end) throw new Error(`${path} did not appear`);
    await sleep(20);
  }
  await sleep(100);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? NaN;
}

/** One connection set up as QEMU does for a net device; ms to the last reply. */
async function setupOnce(path: string): Promise<number> {
  const ram = GuestRam.create({ size: 4 << 20, name: "trace-bench" });
  const t0 = performance.now();
  const fe = await VhostUserFrontend.connect(path);
  try {
    await fe.negotiate();
    await fe.start(ram, [256, 256]);
    await fe.barrier();
    return performance.now() - t0;
  } finally {
    fe.close({ closeRam: true });
    if (!ram.closed) ram.close();
    await sleep(30);
  }
}

/** GET_FEATURES round trips on one open connection; per-request ms. */
async function roundTrips(path: string): Promise<number[]> {
  const fe = await VhostUserFrontend.connect(path);
  try {
    const out: number[] = [];
    for (let i = 0; i < ROUND_TRIPS; i++) {
      const t0 = performance.now();
      await fe.getFeatures();
      out.push(performance.now() - t0);
    }
    return out;
  } finally {
    fe.close();
    await sleep(30);
  }
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "vk-trace-bench-"));
  const procs: ChildProcess[] = [];
  try {
    const be = join(dir, "be.sock");
    const px = join(dir, "trace.sock");
    procs.push(
      spawn(process.execPath, [CHILD, be, "echo"], { stdio: ["pipe", "ignore", "ignore"] }),
    );
    await waitSocket(be);
    procs.push(
      spawn(process.execPath, [BIN, "trace", "--listen", px, "--connect", be], {
        stdio: ["ignore", "ignore", "ignore"],
      }),
    );
    await waitSocket(px);
    const rows: [string, number, number][] = [];
    // Interleaved, so that drifts of the shared machine hit both sides alike.
    const direct: number[] = [];
    const traced: number[] = [];
    for (let i = 0; i < SETUPS; i++) {
      direct.push(await setupOnce(be));
      traced.push(await setupOnce(px));
    }
    rows.push(["connection set-up (ms, median of 20)", median(direct), median(traced)]);
    const rtD = await roundTrips(be);
    const rtT = await roundTrips(px);
    rows.push([
      "GET_FEATURES round trip (us, median of 2000)",
      median(rtD) * 1000,
      median(rtT) * 1000,
    ]);
    console.log("what                                            direct    traced   ratio");
    for (const [what, d, t] of rows) {
      console.log(
        `${what.padEnd(46)} ${d.toFixed(1).padStart(8)}  ${t.toFixed(1).padStart(8)}  ${(t / d).toFixed(2).padStart(6)}`,
      );
    }
    console.log("frames through a ring: not through the proxy (shared memory and eventfds)");
  } finally {
    for (const p of procs) {
      p.stdin?.end();
      p.kill("SIGTERM");
    }
    await sleep(100);
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
