/**
 * Soak: `node dist/bench/soak.js [cycles]` (default 10^4) connect / set-up / traffic /
 * disconnect cycles against a `vhostkit switch` child. Prints its fd count and RSS at start
 * (after 10 warm-up cycles) and end.
 */
import { runSoak } from "../test/hardening-fuzz.js";

const cycles = Number(process.argv[2] ?? 10_000);
const t0 = Date.now();
const f = await runSoak(cycles);
console.log(
  `soak: ${f.inputs} cycles, frames ${f.knownReceived}/${f.knownSent}, switch alive ${f.alive}, ` +
    `fds ${f.fds[0]} -> ${f.fds[1]}, RSS ${f.rssKiB[0]} -> ${f.rssKiB[1]} KiB, ` +
    `${((Date.now() - t0) / 1000).toFixed(1)} s`,
);
