/**
 * Long run of the hostile-front-end fuzz target: `node dist/bench/fuzz-frontend.js [inputs]
 * [seed]` (default 10^6). Prints the counts, the switch's fds and RSS at start and end.
 */
import { runFrontendFuzz } from "../test/hardening-fuzz.js";

const inputs = Number(process.argv[2] ?? 1_000_000);
const seed = Number(process.argv[3] ?? 1);
const t0 = Date.now();
const f = await runFrontendFuzz(inputs, seed);
console.log(
  `fuzz-frontend: ${f.inputs} messages, seed ${seed}, ${f.reconnects} connections, switch alive ` +
    `${f.alive}, fds ${f.fds[0]} -> ${f.fds[1]}, RSS ${f.rssKiB[0]} -> ${f.rssKiB[1]} KiB, ` +
    `${((Date.now() - t0) / 1000).toFixed(1)} s`,
);
