/**
 * vhostkit's back-end against DPDK's vhost PMD on the same traffic: DPDK virtio_user
 * `txonly` into each (64 and 1500-byte frames), and each transmitting into virtio_user
 * `rxonly`. One polling core each; runs alternate; prints the ratio vhostkit / DPDK.
 *
 * usage: node dist/bench/vs-dpdk.js [--seconds 3] [--sizes 64,1500] [--repeat 3]
 *        [--variants main,busy,worker]
 *
 * `--variants`: `main` (default) processes the rings on the Node main thread; `busy` does too,
 * with busy polling (`busyPollMicros` 50: the core spins while traffic flows, as DPDK's vhost
 * PMD always does); `worker` runs the data queue (TX in the sink, RX in the source) in a
 * worker thread (NetTestDevice `workerQueues`). The back-end process is pinned to core 0
 * whichever it is.
 */
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { compareBackends, parseArgs } from "./dpdk-baseline.js";
import type { BackendCounters, BackendFactory } from "./dpdk-baseline.js";

const here = fileURLToPath(new URL(".", import.meta.url));

/** The ways the vhostkit back-end can run its data path. */
export type Variant = "main" | "busy" | "worker";

/** busyPollMicros of the `busy` variant. */
const BUSY_POLL_MICROS = 50;

/**
 * vhostkit's NetTestDevice in a child process pinned to core 0 (DPDK's vhost PMD polls there
 * too).
 * @param variant main-thread rings, or the data queue in a worker thread
 * @param nodeArgs extra arguments for node (e.g. `--cpu-prof`)
 * @param scriptArgs extra arguments for backend-process.js (e.g. `--poll-turns 0`)
 * @returns the factory
 */
export const vhostkitBackend =
  (
    variant: Variant = "main",
    nodeArgs: readonly string[] = [],
    scriptArgs: readonly string[] = [],
  ): BackendFactory =>
  async (ctx) => {
    const socketPath = join(ctx.dir, "vhostkit.sock");
    const child = spawn(
      "taskset",
      [
        "-c",
        "0",
        process.execPath,
        ...nodeArgs,
        join(here, "backend-process.js"),
        "--socket",
        socketPath,
        "--mode",
        ctx.role,
        "--frame-len",
        String(ctx.frameLen),
        ...(variant === "worker" ? ["--worker"] : []),
        ...(variant === "busy" ? ["--busy-poll", String(BUSY_POLL_MICROS)] : []),
        ...scriptArgs,
      ],
      { stdio: ["pipe", "pipe", "inherit"] },
    );
    const lines = createInterface({ input: child.stdout! });
    const waiters: Array<(line: string) => void> = [];
    lines.on("line", (line) => waiters.shift()?.(line));
    const nextLine = (): Promise<string> =>
      new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error("vhostkit back-end did not answer")),
          10_000,
        );
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

/**
 * Take `--variants a,b` out of argv.
 * @param argv the arguments after the script
 * @returns the variants and the remaining arguments
 * @throws Error naming an unknown variant
 */
function takeVariants(argv: readonly string[]): { variants: Variant[]; rest: string[] } {
  const rest = [...argv];
  const i = rest.indexOf("--variants");
  if (i < 0) return { variants: ["main"], rest };
  const v = rest[i + 1] ?? "";
  rest.splice(i, 2);
  const variants = v.split(",").map((x) => {
    if (x !== "main" && x !== "busy" && x !== "worker") {
      throw new Error(`--variants: unknown variant ${JSON.stringify(x)} (main, busy, worker)`);
    }
    return x;
  });
  return { variants, rest };
}

async function main(): Promise<void> {
  const { variants, rest } = takeVariants(process.argv.slice(2));
  const { seconds, sizes, repeat } = parseArgs(rest);
  console.log(
    `vhostkit NetTestDevice vs DPDK vhost PMD; DPDK virtio_user on the other side; ` +
      `${seconds} s per run, ${repeat} alternated run(s), medians`,
  );
  for (const variant of variants) {
    const results = await compareBackends(vhostkitBackend(variant), {
      frameLens: sizes,
      seconds,
      repeat,
    });
    console.log(
      `\nvariant ${variant}: ${
        variant === "worker"
          ? "the data ring in a worker thread"
          : variant === "busy"
            ? `rings on the main thread, busy polling ${BUSY_POLL_MICROS} us`
            : "rings on the main thread"
      }`,
    );
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
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
