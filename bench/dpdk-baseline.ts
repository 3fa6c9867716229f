/**
 * DPDK-to-DPDK baseline throughput over vhost-user, and the frame to compare another back-end
 * against it side by side.
 *
 *   node dist/bench/dpdk-baseline.js [--seconds N] [--sizes 64,1500] [--repeat R]
 *
 * Direction "tx into back-end": testpmd virtio_user `txonly` (front-end, lcore 1) sends into a
 * back-end that counts what it receives (DPDK: vhost PMD `rxonly`, lcore 0).
 * Direction "rx from back-end": the back-end sends (DPDK: vhost PMD `txonly`) into testpmd
 * virtio_user `rxonly`.
 * Rates are measured on the receiving side's counters over `seconds` after a warm-up. The
 * machine is shared and rates vary from run to run: compare back-ends as ratios of runs made
 * side by side ({@link compareBackends}), not against absolute numbers.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

import { startTestpmd, type Testpmd } from "../test/peers/testpmd.js";
import { sleep } from "../test/helpers.js";

/** Cumulative counters of a back-end under test (packets it received / sent on its port). */
export interface BackendCounters {
  readonly rxPackets: number;
  readonly rxBytes: number;
  readonly txPackets: number;
  readonly txBytes: number;
}

/** A back-end under test, started by a {@link BackendFactory}. */
export interface BackendHandle {
  /** The vhost-user socket it listens on (the harness's virtio_user connects to it). */
  readonly socketPath: string;
  /** Cumulative counters. */
  stats(): Promise<BackendCounters>;
  /** Start receiving / sending (called once the front-end is connected); optional. */
  start?(): Promise<void>;
  /** Stop sending / receiving; optional. */
  stop?(): Promise<void>;
  /** Stop and release everything (processes, sockets). */
  close(): Promise<void>;
  /** A log file the harness removes after a successful run; optional. */
  readonly logPath?: string;
}

/** What a factory gets: a private directory for its socket and the frame length. */
export interface BackendContext {
  /** A fresh temp directory, removed after the run. */
  readonly dir: string;
  /** Frame length a sending back-end must generate. */
  readonly frameLen: number;
  /** "sink": count what arrives; "source": generate frames of `frameLen`. */
  readonly role: "sink" | "source";
}

/** Starts a listening back-end. */
export type BackendFactory = (ctx: BackendContext) => Promise<BackendHandle>;

/** One throughput measurement. */
export interface Measurement {
  readonly direction: "tx-into-backend" | "rx-from-backend";
  readonly frameLen: number;
  readonly seconds: number;
  /** Packets received by the receiving side during the measured window. */
  readonly packets: number;
  /** Million packets per second. */
  readonly mpps: number;
  /** Gigabits per second of frame bytes (no preamble / IFG). */
  readonly gbps: number;
}

function testpmdCounters(t: Testpmd): () => Promise<BackendCounters> {
  return async () => {
    const p = await t.port0();
    return {
      rxPackets: p.rxPackets,
      rxBytes: p.rxBytes,
      txPackets: p.txPackets,
      txBytes: p.txBytes,
    };
  };
}

/**
 * The DPDK baseline back-end: testpmd's vhost PMD, `rxonly` as a sink or `txonly` as a
 * source, polling on lcore 0 (the harness's virtio_user polls on lcore 1).
 * @param ctx directory, frame length and role
 * @returns the running back-end, listening
 */
export const dpdkVhostBackend: BackendFactory = async (ctx) => {
  const socketPath = join(ctx.dir, "vhost.sock");
  const tp = await startTestpmd({
    vdev: { kind: "vhost", iface: socketPath },
    forwardMode: ctx.role === "sink" ? "rxonly" : "txonly",
    txPktLen: ctx.frameLen,
    forwardLcore: 0,
    name: `bench-vh-${ctx.role}`,
  });
  try {
    await tp.ready();
  } catch (e) {
    await tp.close();
    throw e;
  }
  return {
    socketPath,
    stats: testpmdCounters(tp),
    start: async () => {
      await tp.waitLinkUp();
      await tp.start();
    },
    stop: async () => {
      await tp.stop();
    },
    close: () => tp.close(),
    logPath: tp.logPath,
  };
};

/** Start the harness's virtio_user front-end against a listening back-end. */
async function startFrontEnd(
  socketPath: string,
  mode: "txonly" | "rxonly",
  frameLen: number,
): Promise<Testpmd> {
  const vu = await startTestpmd({
    vdev: { kind: "virtio_user", path: socketPath },
    forwardMode: mode,
    txPktLen: frameLen,
    forwardLcore: 1,
    name: `bench-vu-${mode}`,
  });
  try {
    await vu.ready();
    await vu.waitLinkUp();
  } catch (e) {
    await vu.close();
    throw e;
  }
  return vu;
}

/** Measure the receive rate of `counters` over `seconds` after `warmupMs`. */
async function window(
  counters: () => Promise<BackendCounters>,
  seconds: number,
  warmupMs: number,
): Promise<{ packets: number; bytes: number; elapsed: number }> {
  await sleep(warmupMs);
  const a = await counters();
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  const b = await counters();
  const t1 = process.hrtime.bigint();
  return {
    packets: b.rxPackets - a.rxPackets,
    bytes: b.rxBytes - a.rxBytes,
    elapsed: Number(t1 - t0) / 1e9,
  };
}

function measurement(
  direction: Measurement["direction"],
  frameLen: number,
  w: { packets: number; bytes: number; elapsed: number },
): Measurement {
  return {
    direction,
    frameLen,
    seconds: w.elapsed,
    packets: w.packets,
    mpps: w.packets / w.elapsed / 1e6,
    gbps: (w.bytes * 8) / w.elapsed / 1e9,
  };
}

/**
 * Throughput of testpmd virtio_user `txonly` sending into a back-end (the back-end receives).
 * @param factory starts the back-end under test as a sink (e.g. {@link dpdkVhostBackend})
 * @param frameLen frame length in bytes (64..1518)
 * @param seconds measured window, after a 0.5 s warm-up
 * @returns the rate seen on the back-end's receive counters
 */
export async function measureTxInto(
  factory: BackendFactory,
  frameLen: number,
  seconds: number,
): Promise<Measurement> {
  const dir = await mkdtemp(join(tmpdir(), "vk-bench-"));
  let backend: BackendHandle | undefined;
  let vu: Testpmd | undefined;
  let ok = false;
  try {
    backend = await factory({ dir, frameLen, role: "sink" });
    vu = await startFrontEnd(backend.socketPath, "txonly", frameLen);
    await backend.start?.();
    await vu.start();
    const w = await window(backend.stats.bind(backend), seconds, 500);
    await vu.stop();
    await backend.stop?.();
    ok = true;
    return measurement("tx-into-backend", frameLen, w);
  } finally {
    await vu?.close();
    await backend?.close();
    await rm(dir, { recursive: true, force: true });
    if (ok) {
      for (const p of [vu?.logPath, backend?.logPath])
        if (p !== undefined) await rm(p, { force: true });
    }
  }
}

/**
 * Throughput of a back-end sending into testpmd virtio_user `rxonly`.
 * @param factory starts the back-end under test as a source
 * @param frameLen frame length in bytes
 * @param seconds measured window, after a 0.5 s warm-up
 * @returns the rate seen on virtio_user's receive counters
 */
export async function measureRxFrom(
  factory: BackendFactory,
  frameLen: number,
  seconds: number,
): Promise<Measurement> {
  const dir = await mkdtemp(join(tmpdir(), "vk-bench-"));
  let backend: BackendHandle | undefined;
  let vu: Testpmd | undefined;
  let ok = false;
  try {
    backend = await factory({ dir, frameLen, role: "source" });
    vu = await startFrontEnd(backend.socketPath, "rxonly", frameLen);
    await vu.start();
    await backend.start?.();
    const w = await window(testpmdCounters(vu), seconds, 500);
    await backend.stop?.();
    await vu.stop();
    ok = true;
    return measurement("rx-from-backend", frameLen, w);
  } finally {
    await vu?.close();
    await backend?.close();
    await rm(dir, { recursive: true, force: true });
    if (ok) {
      for (const p of [vu?.logPath, backend?.logPath])
        if (p !== undefined) await rm(p, { force: true });
    }
  }
}

/** A side-by-side comparison for one direction and frame length. */
export interface Comparison {
  readonly direction: Measurement["direction"];
  readonly frameLen: number;
  readonly baselineMpps: number;
  readonly candidateMpps: number;
  /** candidate / baseline. */
  readonly ratio: number;
}

/**
 * Run the DPDK baseline and a candidate back-end alternately (baseline, candidate, baseline,
 * ...) and report the ratio of their median rates: the fair comparison on a shared machine.
 * @param candidate the back-end under test
 * @param opts frame lengths, seconds per run, repetitions, directions
 * @returns one comparison per direction and frame length
 */
export async function compareBackends(
  candidate: BackendFactory,
  opts: {
    frameLens?: readonly number[];
    seconds?: number;
    repeat?: number;
    directions?: ReadonlyArray<Measurement["direction"]>;
  } = {},
): Promise<Comparison[]> {
  const out: Comparison[] = [];
  const median = (xs: number[]): number => {
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.floor(s.length / 2)] ?? 0;
  };
  for (const direction of opts.directions ?? ["tx-into-backend", "rx-from-backend"]) {
    const run = direction === "tx-into-backend" ? measureTxInto : measureRxFrom;
    for (const frameLen of opts.frameLens ?? [64, 1500]) {
      const base: number[] = [];
      const cand: number[] = [];
      for (let i = 0; i < (opts.repeat ?? 3); i++) {
        base.push((await run(dpdkVhostBackend, frameLen, opts.seconds ?? 3)).mpps);
        cand.push((await run(candidate, frameLen, opts.seconds ?? 3)).mpps);
      }
      const b = median(base);
      const c = median(cand);
      out.push({
        direction,
        frameLen,
        baselineMpps: b,
        candidateMpps: c,
        ratio: b > 0 ? c / b : 0,
      });
    }
  }
  return out;
}

/**
 * Parse `--seconds N --sizes 64,1500 --repeat R` from argv.
 * @param argv the arguments after the script
 * @returns the settings
 * @throws Error naming an unknown or malformed option
 */
export function parseArgs(argv: readonly string[]): {
  seconds: number;
  sizes: number[];
  repeat: number;
} {
  let seconds = 3;
  let sizes = [64, 1500];
  let repeat = 1;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = argv[i + 1];
    if (a === "--seconds" && v !== undefined) seconds = Number(v);
    else if (a === "--sizes" && v !== undefined) sizes = v.split(",").map(Number);
    else if (a === "--repeat" && v !== undefined) repeat = Number(v);
    else throw new Error(`dpdk-baseline: unknown or incomplete option ${JSON.stringify(a)}`);
    i++;
  }
  if (!(seconds > 0 && seconds <= 60))
    throw new Error(`--seconds must be in (0, 60], got ${seconds}`);
  if (!(Number.isInteger(repeat) && repeat >= 1 && repeat <= 20)) {
    throw new Error(`--repeat must be 1..20, got ${repeat}`);
  }
  for (const s of sizes) {
    if (!(Number.isInteger(s) && s >= 64 && s <= 9000)) throw new Error(`bad frame size ${s}`);
  }
  return { seconds, sizes, repeat };
}

/** The command-line entry: print the DPDK-to-DPDK rates in both directions. */
async function main(): Promise<void> {
  const { seconds, sizes, repeat } = parseArgs(process.argv.slice(2));
  console.log(`DPDK virtio_user <-> DPDK vhost PMD, ${seconds} s per run, ${repeat} run(s)`);
  console.log("direction            frame   Mpps     Gbit/s");
  for (const [label, run] of [
    ["virtio_user -> vhost", measureTxInto],
    ["vhost -> virtio_user", measureRxFrom],
  ] as const) {
    for (const len of sizes) {
      for (let i = 0; i < repeat; i++) {
        const m = await run(dpdkVhostBackend, len, seconds);
        console.log(
          `${label}  ${String(len).padStart(5)}  ${m.mpps.toFixed(2).padStart(6)}  ${m.gbps.toFixed(2).padStart(8)}`,
        );
      }
    }
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  });
}
