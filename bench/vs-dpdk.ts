/**
 * vhostkit's back-end against DPDK's vhost PMD on the same traffic: DPDK virtio_user
 * `txonly` into each (64 and 1500-byte frames), and each transmitting into virtio_user
 * `rxonly`. One polling core each; runs alternate; prints the ratio vhostkit / DPDK.
 *
 * usage: node dist/bench/vs-dpdk.js [--seconds 3] [--sizes 64,1500] [--repeat 3]
 */
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { compareBackends, parseArgs } from "./dpdk-baseline.js";
import type { BackendCounters, BackendFactory } from "./dpdk-baseline.js";

const here = fileURLToPath(new URL(".", import.meta.url));

/** vhostkit's NetTestDevice in a child process pinned to core 0 (DPDK's vhost PMD polls there too). */
export const vhostkitBackend: BackendFactory = async (ctx) => {
  const socketPath = join(ctx.dir, "vhostkit.sock");
  const child = spawn(
    "taskset",
    [
      "-c",
      "0",
      process.execPath,
      join(here, "backend-process.js"),
      "--socket",
      socketPath,
      "--mode",
      ctx.role,
      "--frame-len",
      String(ctx.frameLen),
    ],
    { stdio: ["pipe", "pipe", "inherit"] },
  );
  const lines = createInterface({ input: child.stdout! });
  const waiters: Array<(line: string) => void> = [];
  lines.on("line", (line) => waiters.shift()?.(line));
  const nextLine = (): Promise<string> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("vhostkit back-end did not answer")), 10_000);
      waiters.push((l) => {
        clearTimeout(timer);
        resolve(l);
      });
    });
  const ready = await nextLine();
  if (ready !== "listening") throw new Error(`vhostkit back-end: unexpected ${ready}`);
  return {
    socketPath,
    stats: async (): Promise<BackendCounters> => {
      const answer = nextLine();
      child.stdin!.write("stats\n");
      return JSON.parse(await answer) as BackendCounters;
    },
    close: async () => {
      child.stdin!.end();
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => child.kill("SIGKILL"), 3000);
        child.once("exit", () => {
          clearTimeout(t);
          resolve();
        });
      });
    },
  };
};

async function main(): Promise<void> {
  const { seconds, sizes, repeat } = parseArgs(process.argv.slice(2));
  console.log(
    `vhostkit NetTestDevice vs DPDK vhost PMD; DPDK virtio_user on the other side; ` +
      `${seconds} s per run, ${repeat} alternated run(s), medians`,
  );
  const results = await compareBackends(vhostkitBackend, { frameLens: sizes, seconds, repeat });
  console.log("direction                 frame   DPDK Mpps  vhostkit Mpps  vhostkit/DPDK");
  for (const r of results) {
    const dir =
      r.direction === "tx-into-backend" ? "virtio_user -> back-end" : "back-end -> virtio_user";
    console.log(
      `${dir.padEnd(24)}  ${String(r.frameLen).padStart(5)}  ${r.baselineMpps.toFixed(2).padStart(9)}  ` +
        `${r.candidateMpps.toFixed(2).padStart(13)}  ${(r.ratio * 100).toFixed(1).padStart(12)} %`,
    );
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
