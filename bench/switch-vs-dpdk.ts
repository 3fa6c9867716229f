/**
 * Port-to-port forwarding: `vhostkit switch` against DPDK testpmd `io` forwarding between two
 * vhost PMD ports, on DPDK's virtio-user loopback. One testpmd (the traffic source and sink,
 * polling on core 1) has two net_virtio_user ports in `mac` forwarding with `--eth-peer` set
 * so each port sends to the other's MAC, primed with `start tx_first 32`; the frames then
 * circulate through whatever sits between its two ports:
 * - DPDK: testpmd with two `net_vhost` ports in `io` forwarding, its forwarding lcore on core 0;
 * - vhostkit: `vhostkit switch --socket a --socket b` pinned to core 0 (`taskset -c 0`), in
 *   event mode (kicks) or busy mode (`--busy-poll 50`).
 * The rate is the frames the source testpmd received on both ports per second (every frame
 * crossed the middle once). Runs alternate DPDK and vhostkit; the ratio is taken per run.
 *
 * usage: node dist/bench/switch-vs-dpdk.js [--seconds 3] [--sizes 64,1500] [--repeat 3]
 *        [--queues 1,2] [--modes event,busy] [--cpu-prof DIR]
 *
 * `--cpu-prof DIR` runs the switch under `node --cpu-prof --cpu-prof-dir DIR`.
 */
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { startTestpmd } from "../test/peers/testpmd.js";
import type { Testpmd } from "../test/peers/testpmd.js";
import { sleep } from "../test/helpers.js";

const here = fileURLToPath(new URL(".", import.meta.url));
const CLI = join(here, "..", "..", "bin", "vhostkit.js");

const MAC_0 = "52:54:00:00:77:00";
const MAC_1 = "52:54:00:00:77:01";
/** `--busy-poll` of the busy mode (microseconds). */
const BUSY_POLL_MICROS = 50;
const WARMUP_MS = 1000;

/** What sits between the two virtio_user ports. */
type Middle = "dpdk" | "event" | "busy";

interface Options {
  seconds: number;
  sizes: number[];
  repeat: number;
  queues: number[];
  modes: Array<"event" | "busy">;
  cpuProfDir: string | null;
}

/**
 * Parse the command line.
 * @param argv the arguments after the script
 * @returns the options
 * @throws Error naming the option and the value when one is out of range
 */
function parseOptions(argv: readonly string[]): Options {
  const o: Options = {
    seconds: 3,
    sizes: [64, 1500],
    repeat: 3,
    queues: [1, 2],
    modes: ["event", "busy"],
    cpuProfDir: null,
  };
  const list = (v: string): number[] => v.split(",").map(Number);
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i];
    const v = argv[i + 1] ?? "";
    if (k === "--seconds") o.seconds = Number(v);
    else if (k === "--sizes") o.sizes = list(v);
    else if (k === "--repeat") o.repeat = Number(v);
    else if (k === "--queues") o.queues = list(v);
    else if (k === "--modes") o.modes = v.split(",") as Options["modes"];
    else if (k === "--cpu-prof") o.cpuProfDir = v;
    else throw new Error(`unknown option ${k}`);
  }
  if (!(o.seconds > 0 && o.seconds <= 60)) throw new Error(`--seconds ${o.seconds}: 0..60`);
  if (!Number.isInteger(o.repeat) || o.repeat < 1) throw new Error(`--repeat ${o.repeat}`);
  for (const s of o.sizes) {
    if (!Number.isInteger(s) || s < 60 || s > 1514) throw new Error(`--sizes ${s}: 60..1514`);
  }
  for (const q of o.queues) if (q !== 1 && q !== 2) throw new Error(`--queues ${q}: 1 or 2`);
  for (const m of o.modes) {
    if (m !== "event" && m !== "busy") throw new Error(`--modes ${String(m)}: event, busy`);
  }
  return o;
}

/** A running middle: its two socket paths and how to stop it. */
export interface MiddleHandle {
  sockets: [string, string];
  close(): Promise<void>;
}

async function startDpdkMiddle(dir: string, queues: number): Promise<MiddleHandle> {
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  const tp = await startTestpmd({
    vdev: { kind: "vhost", iface: a, queues },
    extraEalArgs: ["--vdev", `net_vhost1,iface=${b},queues=${queues}`],
    forwardMode: "io",
    forwardLcore: 0,
    name: "swb-vhost",
  });
  try {
    await tp.ready();
    await tp.start();
  } catch (err) {
    await tp.close();
    throw err;
  }
  return { sockets: [a, b], close: () => tp.close() };
}

/**
 * `vhostkit switch` with two ports (`a.sock`, `b.sock` in `dir`), pinned to core 0.
 * @param dir where the sockets go
 * @param queues queue pairs per port
 * @param busy busy polling (`--busy-poll`) or event mode
 * @param cpuProfDir run under `node --cpu-prof` into this directory, or null
 * @returns the sockets and how to stop the switch
 */
export async function startSwitchMiddle(
  dir: string,
  queues: number,
  busy: boolean,
  cpuProfDir: string | null,
): Promise<MiddleHandle> {
  const a = join(dir, "a.sock");
  const b = join(dir, "b.sock");
  const nodeArgs = cpuProfDir !== null ? ["--cpu-prof", "--cpu-prof-dir", cpuProfDir] : [];
  const args = [
    "-c",
    "0",
    process.execPath,
    ...nodeArgs,
    CLI,
    "switch",
    "--socket",
    a,
    "--socket",
    b,
    "--queues",
    String(queues),
    "--control",
    join(dir, "ctl.sock"),
    ...(busy ? ["--busy-poll", String(BUSY_POLL_MICROS)] : []),
  ];
  const child: ChildProcess = spawn("taskset", args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`vhostkit switch not ready:\n${err}`)), 10_000);
    child.stderr!.on("data", (d: Buffer) => {
      err = (err + d.toString()).slice(-4000);
      if (err.includes("vhostkit switch: ready")) {
        clearTimeout(t);
        resolve();
      }
    });
    child.once("exit", (code) => reject(new Error(`vhostkit switch exited ${code}:\n${err}`)));
  });
  return {
    sockets: [a, b],
    close: async () => {
      const exited = new Promise<void>((r) => child.once("exit", () => r()));
      child.kill("SIGINT");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
  };
}

/**
 * One measurement: the loop through `middle`.
 * @returns frames per second through the middle
 */
async function run(middle: Middle, frameLen: number, queues: number, o: Options): Promise<number> {
  const dir = await mkdtemp(join(tmpdir(), "vk-swb-"));
  let mid: MiddleHandle | null = null;
  let front: Testpmd | null = null;
  try {
    mid =
      middle === "dpdk"
        ? await startDpdkMiddle(dir, queues)
        : await startSwitchMiddle(dir, queues, middle === "busy", o.cpuProfDir);
    const [a, b] = mid.sockets;
    front = await startTestpmd({
      vdev: { kind: "virtio_user", path: a, mac: MAC_0, queues },
      extraEalArgs: ["--vdev", `net_virtio_user1,path=${b},queues=${queues},mac=${MAC_1}`],
      forwardMode: "mac",
      forwardLcore: 1,
      txPktLen: frameLen,
      name: "swb-front",
      extraAppArgs: [`--eth-peer=0,${MAC_1}`, `--eth-peer=1,${MAC_0}`],
    });
    await front.ready();
    const o1 = await front.command("start tx_first 32");
    if (!/forwarding - ports=/.test(o1)) throw new Error(`start tx_first failed: ${o1}`);
    await sleep(WARMUP_MS);
    const rx = async (): Promise<number> =>
      (await front!.stats()).reduce((s, p) => s + p.rxPackets, 0);
    const t0 = performance.now();
    const r0 = await rx();
    await sleep(o.seconds * 1000);
    const r1 = await rx();
    const t1 = performance.now();
    await front.stop();
    return ((r1 - r0) * 1000) / (t1 - t0);
  } finally {
    if (front) await front.close();
    if (mid) await mid.close();
    await rm(dir, { recursive: true, force: true });
  }
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.floor(s.length / 2)] ?? 0;
};

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  console.log(
    `DPDK virtio-user loopback through vhostkit switch (core 0) vs testpmd io between two ` +
      `vhost PMD ports (core 0); ${o.seconds} s per run, ${o.repeat} alternated run(s)`,
  );
  const rows: string[] = [];
  for (const queues of o.queues) {
    for (const size of o.sizes) {
      const ratios: Record<string, number[]> = { event: [], busy: [] };
      const rates: Record<string, number[]> = { dpdk: [], event: [], busy: [] };
      for (let r = 0; r < o.repeat; r++) {
        const d = await run("dpdk", size, queues, o);
        rates["dpdk"]!.push(d);
        const line = [`run ${r + 1}: ${queues}q ${size} B: DPDK ${(d / 1e6).toFixed(2)} M/s`];
        for (const m of o.modes) {
          const v = await run(m, size, queues, o);
          rates[m]!.push(v);
          ratios[m]!.push(v / d);
          line.push(`${m} ${(v / 1e6).toFixed(2)} M/s (${((100 * v) / d).toFixed(1)} %)`);
        }
        console.log(line.join(", "));
      }
      for (const m of o.modes) {
        rows.push(
          `${String(queues).padStart(6)}  ${String(size).padStart(5)}  ${m.padEnd(5)}  ` +
            `${(median(rates["dpdk"]!) / 1e6).toFixed(2).padStart(9)}  ` +
            `${(median(rates[m]!) / 1e6).toFixed(2).padStart(9)}  ` +
            `${(100 * median(ratios[m]!)).toFixed(1).padStart(6)} %  ` +
            `[${ratios[m]!.map((x) => (100 * x).toFixed(1)).join(", ")}]`,
        );
      }
    }
  }
  console.log("\nqueues  frame  mode   DPDK M/s  vhostkit M/s  median ratio  [per run]");
  for (const r of rows) console.log(r);
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
