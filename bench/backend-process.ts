/**
 * A vhostkit back-end in its own process for benchmarks: serves a NetTestDevice on a socket
 * and answers `stats` on stdin with one JSON line of counters. Prints `listening` when ready.
 *
 * usage: node dist/bench/backend-process.js --socket PATH --mode sink|source|echo
 *        [--frame-len N] [--queue-pairs N] [--worker] [--poll-turns N] [--busy-poll US]
 *        [--state-bytes N]
 *
 * `--worker`: the data queues run in worker threads (NetTestDevice `workerQueues`).
 * `--busy-poll US`: busy polling on the main thread (`busyPollMicros`).
 * `--state-bytes N`: the device saves a fixed N-byte state (SET_DEVICE_STATE_FD SAVE) and
 * accepts a state of that size (LOAD).
 */
import { createInterface } from "node:readline";
import { serveBackend } from "../src/backend/server.js";
import { NetTestDevice } from "../src/devices/net-test-device.js";
import type { NetTestMode } from "../src/devices/net-test-device.js";

function arg(name: string, fallback?: string): string {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? process.argv[i + 1] : fallback;
  if (v === undefined) throw new Error(`backend-process: --${name} is required`);
  return v;
}

const device = new NetTestDevice({
  mode: arg("mode", "sink") as NetTestMode,
  frameLength: Number(arg("frame-len", "64")),
  queuePairs: Number(arg("queue-pairs", "1")),
  workerQueues: process.argv.includes("--worker"),
});
const pollTurns = process.argv.includes("--poll-turns") ? Number(arg("poll-turns")) : undefined;
const busyPoll = process.argv.includes("--busy-poll") ? Number(arg("busy-poll")) : undefined;
const stateBytes = process.argv.includes("--state-bytes") ? Number(arg("state-bytes")) : 0;
if (stateBytes > 0) {
  const blob = new Uint8Array(stateBytes).fill(0x5a);
  Object.assign(device, {
    saveState: (): Uint8Array => blob,
    loadState: (data: Uint8Array): void => {
      if (data.length !== stateBytes) throw new RangeError(`state of ${data.length} bytes`);
    },
  });
}
const server = serveBackend(device, {
  path: arg("socket"),
  ...(stateBytes > 0 ? { maxStateBytes: stateBytes } : {}),
  ...(pollTurns !== undefined ? { pollTurns } : {}),
  ...(busyPoll !== undefined ? { busyPollMicros: busyPoll } : {}),
});
process.stdout.write("listening\n");
const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (line.trim() === "stats") {
    const c = device.counters.reduce(
      (a, x) => ({
        // The device's TX queue is the driver's transmit: what the back-end receives.
        rxPackets: a.rxPackets + x.txPackets,
        rxBytes: a.rxBytes + x.txBytes,
        txPackets: a.txPackets + x.rxPackets,
        txBytes: a.txBytes + x.rxBytes,
      }),
      { rxPackets: 0, rxBytes: 0, txPackets: 0, txBytes: 0 },
    );
    process.stdout.write(`${JSON.stringify(c)}\n`);
  }
});
rl.on("close", () => {
  server.close();
  process.exit(0);
});
for (const sig of ["SIGINT", "SIGTERM"] as const) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
