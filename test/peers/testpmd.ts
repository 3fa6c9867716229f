/**
 * A harness for DPDK 22.11 `dpdk-testpmd` as a real vhost-user peer: the virtio_user PMD (a
 * front-end without a VM) or the vhost PMD (a back-end), driven over stdin in interactive mode.
 *
 * Why interactive mode: it lets a test start and stop forwarding, read exact counters after a
 * stop, and send a bounded number of packets (`set burst B` + `start tx_first N` in `io` mode
 * sends exactly N*B packets per forwarding stream). `--stats-period` only prints rates on a
 * timer and cannot stop or count. testpmd writes its command output with stdio `printf`, which
 * is fully buffered when stdout is a pipe, while the `testpmd> ` prompt is written with
 * `write(2)`; the harness runs it under `stdbuf -o0 -e0` so output and prompts arrive in order
 * and "the next prompt" marks the end of a command's output.
 *
 * See docs/testing-peers.md.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import {
  accessSync,
  constants as fsConstants,
  createWriteStream,
  rmSync,
  type WriteStream,
} from "node:fs";
import { lstat, mkdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { sleep } from "../helpers.js";

/** testpmd forward modes that the harness knows how to use. */
export type ForwardMode = "txonly" | "rxonly" | "io" | "mac" | "icmpecho";

/** The virtio_user PMD: testpmd acts as a vhost-user front-end. */
export interface VirtioUserVdev {
  readonly kind: "virtio_user";
  /** The vhost-user socket path (`path=`). */
  readonly path: string;
  /** Queue pairs (`queues=`), default 1. */
  readonly queues?: number;
  /** Use packed virtqueues (`packed_vq=1`). */
  readonly packed?: boolean;
  /** testpmd listens on `path` and the back-end connects (`server=1`); reconnects after loss. */
  readonly server?: boolean;
  /** Ring size (`queue_size=`), default 256 in DPDK. */
  readonly queueSize?: number;
  /** The port's MAC address (`mac=`), e.g. "52:54:00:00:00:01". */
  readonly mac?: string;
  /** Offer MRG_RXBUF (`mrg_rxbuf=1`, DPDK's default) or not (`mrg_rxbuf=0`). */
  readonly mrgRxbuf?: boolean;
}

/** The vhost PMD: testpmd acts as a vhost-user back-end. */
export interface VhostVdev {
  readonly kind: "vhost";
  /** The vhost-user socket path (`iface=`). */
  readonly iface: string;
  /** Queue pairs (`queues=`), default 1. */
  readonly queues?: number;
  /** testpmd connects to `iface` (`client=1`) instead of listening on it. */
  readonly client?: boolean;
}

/** Options for {@link startTestpmd}. */
export interface TestpmdOptions {
  /** The one virtual device (port 0). */
  readonly vdev: VirtioUserVdev | VhostVdev;
  /** `--forward-mode`. */
  readonly forwardMode: ForwardMode;
  /** Frame length for txonly / tx_first (`--txpkts`), default 64. */
  readonly txPktLen?: number;
  /** Packets per burst (`--burst`), default testpmd's 32. */
  readonly burst?: number;
  /** `--nb-cores`, default 1. */
  readonly nbCores?: number;
  /** `--rxq`, default the vdev's queue count. */
  readonly rxq?: number;
  /** `--txq`, default the vdev's queue count. */
  readonly txq?: number;
  /**
   * The lcore that polls (the other of 0,1 is `--main-lcore`), default 0. Two testpmds that
   * run together must poll on different cores (two pollers on one core starve each other): give one 0 and the other 1.
   */
  readonly forwardLcore?: 0 | 1;
  /** `--total-num-mbufs`, default 16384 (needed with `--no-huge -m 512`). */
  readonly totalMbufs?: number;
  /** Directory for the log file, default `$TMPDIR/vhostkit-peers`. */
  readonly logDir?: string;
  /** A label used in the file prefix and the log file name. */
  readonly name?: string;
  /** Extra EAL arguments (before `--`). */
  readonly extraEalArgs?: readonly string[];
  /** Extra application arguments (after `--`). */
  readonly extraAppArgs?: readonly string[];
  /** The testpmd binary, default `dpdk-testpmd` on PATH, else /usr/bin/dpdk-testpmd. */
  readonly binary?: string;
}

/** Counters of one port from `show port stats all` (ethdev counters, cumulative). */
export interface PortStats {
  readonly port: number;
  readonly rxPackets: number;
  readonly rxBytes: number;
  readonly rxMissed: number;
  readonly rxErrors: number;
  readonly rxNombuf: number;
  readonly txPackets: number;
  readonly txBytes: number;
  readonly txErrors: number;
}

/** Counters of one port from the report that `stop` prints (forwarding engine, since start). */
export interface ForwardStats {
  readonly port: number;
  readonly rxPackets: number;
  /** Packets the engine received but dropped. */
  readonly rxDropped: number;
  readonly txPackets: number;
  /** Packets the engine tried to send but the ring had no room for (freed, not sent). */
  readonly txDropped: number;
}

/** A command with a fixed one-line answer, sent after each command to mark its end. */
const SENTINEL_CMD = "set verbose 0";
const SENTINEL_OUT = "Change verbose level from 0 to 0\n";
const DEFAULT_COMMAND_TIMEOUT_MS = 10_000;

/**
 * Find an executable on PATH, else at one of the fallback paths.
 * @param name the program name, e.g. "dpdk-testpmd"
 * @param fallbacks absolute paths to try after PATH
 * @returns the absolute path
 * @throws Error naming the program when it is found nowhere
 */
export function findExecutable(name: string, fallbacks: readonly string[] = []): string {
  const dirs = (process.env["PATH"] ?? "").split(delimiter).filter((d) => d !== "");
  for (const candidate of [...dirs.map((d) => join(d, name)), ...fallbacks]) {
    try {
      accessSync(candidate, fsConstants.X_OK);
      return candidate;
    } catch {
      // try the next one
    }
  }
  throw new Error(`executable ${name} not found on PATH or at ${fallbacks.join(", ")}`);
}

/**
 * A unique, short name for per-test resources (file prefixes, namespaces, sockets).
 * @param stem a readable stem, e.g. "vhost"
 * @returns `stem-<8 hex>`
 */
export function uniqueName(stem: string): string {
  return `${stem}-${randomBytes(4).toString("hex")}`;
}

function num(block: string, label: string, where: string): number {
  const m = new RegExp(`${label}:\\s+(\\d+)`).exec(block);
  if (m === null || m[1] === undefined) {
    throw new Error(`testpmd ${where}: field ${label} missing in ${JSON.stringify(block)}`);
  }
  return Number(m[1]);
}

/**
 * Parse the output of `show port stats all`.
 * @param text the command output
 * @returns one entry per "NIC statistics for port N" block, in output order
 * @throws Error naming the missing field
 */
export function parsePortStats(text: string): PortStats[] {
  const out: PortStats[] = [];
  const re = /NIC statistics for port (\d+)\s*#+([\s\S]*?)#{20,}/g;
  for (let m = re.exec(text); m !== null; m = re.exec(text)) {
    const b = m[2] ?? "";
    const w = "show port stats";
    out.push({
      port: Number(m[1]),
      rxPackets: num(b, "RX-packets", w),
      rxBytes: num(b, "RX-bytes", w),
      rxMissed: num(b, "RX-missed", w),
      rxErrors: num(b, "RX-errors", w),
      rxNombuf: num(b, "RX-nombuf", w),
      txPackets: num(b, "TX-packets", w),
      txBytes: num(b, "TX-bytes", w),
      txErrors: num(b, "TX-errors", w),
    });
  }
  return out;
}

/**
 * Parse the per-port forward statistics that `stop` prints.
 * @param text the output of `stop`
 * @returns one entry per "Forward statistics for port N" block (not the accumulated block)
 * @throws Error naming the missing field
 */
export function parseForwardStats(text: string): ForwardStats[] {
  const out: ForwardStats[] = [];
  const re = /Forward statistics for port (\d+)\s*-+([\s\S]*?)-{20,}/g;
  for (let m = re.exec(text); m !== null; m = re.exec(text)) {
    const b = m[2] ?? "";
    const w = "stop";
    out.push({
      port: Number(m[1]),
      rxPackets: num(b, "RX-packets", w),
      rxDropped: num(b, "RX-dropped", w),
      txPackets: num(b, "TX-packets", w),
      txDropped: num(b, "TX-dropped", w),
    });
  }
  return out;
}

/** Build the `--vdev` argument for a vdev description. */
function vdevArg(v: VirtioUserVdev | VhostVdev): string {
  if (v.kind === "virtio_user") {
    const parts = [`net_virtio_user0`, `path=${v.path}`, `queues=${v.queues ?? 1}`];
    if (v.packed === true) parts.push("packed_vq=1");
    if (v.server === true) parts.push("server=1");
    if (v.queueSize !== undefined) parts.push(`queue_size=${v.queueSize}`);
    if (v.mac !== undefined) parts.push(`mac=${v.mac}`);
    if (v.mrgRxbuf !== undefined) parts.push(`mrg_rxbuf=${v.mrgRxbuf ? 1 : 0}`);
    return parts.join(",");
  }
  const parts = [`net_vhost0`, `iface=${v.iface}`, `queues=${v.queues ?? 1}`];
  if (v.client === true) parts.push("client=1");
  return parts.join(",");
}

/**
 * The full argument vector for testpmd (without the binary), exported for logs and docs.
 * @param opts the testpmd options
 * @param filePrefix the EAL `--file-prefix`
 * @returns the arguments
 */
export function testpmdArgs(opts: TestpmdOptions, filePrefix: string): string[] {
  const fwd = opts.forwardLcore ?? 0;
  const main = fwd === 0 ? 1 : 0;
  const queues = opts.vdev.queues ?? 1;
  const args = [
    "-l",
    "0,1",
    "--main-lcore",
    String(main),
    "--no-huge",
    "-m",
    "512",
    "--no-pci",
    `--file-prefix=${filePrefix}`,
    "--vdev",
    vdevArg(opts.vdev),
    ...(opts.extraEalArgs ?? []),
    "--",
    "-i",
    `--forward-mode=${opts.forwardMode}`,
    `--nb-cores=${opts.nbCores ?? 1}`,
    `--total-num-mbufs=${opts.totalMbufs ?? 16384}`,
    `--rxq=${opts.rxq ?? queues}`,
    `--txq=${opts.txq ?? queues}`,
    `--txpkts=${opts.txPktLen ?? 64}`,
  ];
  if (opts.burst !== undefined) args.push(`--burst=${opts.burst}`);
  args.push(...(opts.extraAppArgs ?? []));
  return args;
}

/** A running testpmd. Create with {@link startTestpmd}; always {@link Testpmd.close} it. */
export class Testpmd {
  /** The log file holding everything testpmd printed (stdout and stderr) and every command. */
  readonly logPath: string;
  /** The EAL file prefix; runtime files live under /var/run/dpdk/<filePrefix>. */
  readonly filePrefix: string;
  /** The command line, for logs. */
  readonly argv: readonly string[];
  /** The vhost-user socket path this testpmd uses. */
  readonly socketPath: string;

  private readonly child: ChildProcess;
  private readonly logFile: WriteStream;
  private readonly opts: TestpmdOptions;
  private out = "";
  private recent = "";
  private exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exitPromise: Promise<void>;
  private waiters: Array<() => void> = [];
  private queue: Promise<unknown> = Promise.resolve();
  private closed = false;
  /** Kills testpmd and removes its runtime dir if Node exits without close(). */
  private readonly onProcessExit = (): void => {
    if (this.exited === undefined) this.child.kill("SIGKILL");
    rmSync(join("/var/run/dpdk", this.filePrefix), { recursive: true, force: true });
  };

  /** @internal use {@link startTestpmd}. */
  constructor(opts: TestpmdOptions, binary: string, filePrefix: string, logPath: string) {
    this.opts = opts;
    this.filePrefix = filePrefix;
    this.logPath = logPath;
    this.socketPath = opts.vdev.kind === "vhost" ? opts.vdev.iface : opts.vdev.path;
    const stdbuf = findExecutable("stdbuf", ["/usr/bin/stdbuf"]);
    this.argv = [stdbuf, "-o0", "-e0", binary, ...testpmdArgs(opts, filePrefix)];
    this.logFile = createWriteStream(logPath);
    this.logFile.write(`$ ${this.argv.join(" ")}\n`);
    this.child = spawn(this.argv[0] ?? stdbuf, this.argv.slice(1), {
      stdio: ["pipe", "pipe", "pipe"],
    });
    // Commands are answered on stdout; stderr (testpmd's own error lines) goes to the log
    // and the tail only, so that it cannot split a sentinel.
    const onData = (isStdout: boolean) => (chunk: Buffer) => {
      const s = chunk.toString("utf8");
      if (isStdout) this.out += s;
      this.recent = (this.recent + s).slice(-16_000);
      this.logFile.write(s);
      this.wake();
    };
    this.child.stdout?.on("data", onData(true));
    this.child.stderr?.on("data", onData(false));
    // A write to a testpmd that died raises EPIPE on stdin; the exit is reported elsewhere.
    this.child.stdin?.on("error", () => undefined);
    process.on("exit", this.onProcessExit);
    this.exitPromise = new Promise((resolve) => {
      this.child.on("exit", (code, signal) => {
        this.exited = { code, signal };
        this.logFile.write(`\n[harness] testpmd exited code=${code} signal=${signal}\n`);
        this.wake();
        resolve();
      });
      this.child.on("error", (err) => {
        this.exited = { code: null, signal: null };
        this.logFile.write(`\n[harness] spawn error: ${err.message}\n`);
        this.wake();
        resolve();
      });
    });
  }

  /** The process id, or undefined if the spawn failed. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Everything testpmd printed on stdout so far. */
  get output(): string {
    return this.out;
  }

  /**
   * The last lines of the output, for failure messages.
   * @param lines how many lines, default 40
   * @returns the tail of the output
   */
  tail(lines = 40): string {
    return this.recent.split("\n").slice(-lines).join("\n");
  }

  private wake(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w();
  }

  /**
   * Wait until `pred()` holds, re-checking on each output chunk and on exit.
   * @throws Error naming `what` on timeout or when testpmd exits first
   */
  private async waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      if (this.exited !== undefined) {
        throw new Error(
          `testpmd ${this.filePrefix} exited (code=${this.exited.code} signal=${this.exited.signal}) while waiting for ${what}; log ${this.logPath}\n${this.tail()}`,
        );
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `testpmd ${this.filePrefix}: timeout after ${timeoutMs} ms waiting for ${what}; log ${this.logPath}\n${this.tail()}`,
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** True when testpmd is the listening side of the vhost-user socket. */
  get listens(): boolean {
    const v = this.opts.vdev;
    return v.kind === "vhost" ? v.client !== true : v.server === true;
  }

  /**
   * Wait until the listening socket exists (vhost PMD server mode, virtio_user `server=1`).
   * A virtio_user in server mode blocks in start-up until a back-end connects, so start the
   * back-end after this resolves, then await {@link Testpmd.ready} on both.
   * @param timeoutMs the bound, default 15 s
   * @throws Error when testpmd does not listen, exits, or the socket never appears
   */
  async listening(timeoutMs = 15_000): Promise<void> {
    if (!this.listens) {
      throw new Error(`testpmd ${this.filePrefix}: not the listening side of ${this.socketPath}`);
    }
    let isSock = false;
    const deadline = Date.now() + timeoutMs;
    while (!isSock) {
      const st = await lstat(this.socketPath).catch(() => undefined);
      isSock = st?.isSocket() === true;
      if (isSock) break;
      if (this.exited !== undefined || Date.now() > deadline) {
        throw new Error(
          `testpmd ${this.filePrefix}: socket ${this.socketPath} never appeared; log ${this.logPath}\n${this.tail()}`,
        );
      }
      await sleep(50);
    }
  }

  /**
   * Wait until testpmd has configured its port and reads commands (and, when it listens, its
   * socket exists). A virtio_user with `server=1` reads commands only after a back-end has
   * connected.
   * @param timeoutMs the bound, default 15 s
   * @throws Error with the log tail on timeout or exit
   */
  async ready(timeoutMs = 15_000): Promise<void> {
    if (this.listens) await this.listening(timeoutMs);
    await this.command("", timeoutMs);
  }

  /**
   * Run one interactive command and return its output. Commands are serialised.
   *
   * The end of a command's output is found with a sentinel, not with the prompt: the prompt
   * and the echo of the input are written one character at a time, so log lines of other
   * threads (vhost messages, link events) can land inside them, while a `printf` line is one
   * write. The harness sends `set verbose 0` after each command and waits for its answer
   * "Change verbose level from 0 to 0".
   * @param cmd the command, e.g. "show port stats all" ("" only waits for the sentinel)
   * @param timeoutMs the bound, default 10 s
   * @returns everything testpmd printed on stdout from the command to the sentinel (the
   *   echo and prompts included)
   * @throws Error with the log tail on timeout or exit
   */
  command(cmd: string, timeoutMs = DEFAULT_COMMAND_TIMEOUT_MS): Promise<string> {
    if (cmd.includes("\n")) {
      return Promise.reject(
        new Error(`testpmd: command must be one line, got ${JSON.stringify(cmd)}`),
      );
    }
    const run = async (): Promise<string> => {
      if (this.exited !== undefined || this.child.stdin === null) {
        throw new Error(`testpmd ${this.filePrefix}: cannot send "${cmd}": process exited`);
      }
      const start = this.out.length;
      this.logFile.write(`\n[harness] command: ${cmd}\n`);
      this.child.stdin.write(cmd === "" ? `${SENTINEL_CMD}\n` : `${cmd}\n${SENTINEL_CMD}\n`);
      await this.waitFor(
        () => this.out.indexOf(SENTINEL_OUT, start) >= 0,
        timeoutMs,
        `the end of "${cmd}"`,
      );
      const end = this.out.indexOf(SENTINEL_OUT, start);
      return this.out.slice(start, end);
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /**
   * Wait until port 0 reports "Link status: up" (the peer connected and set DRIVER_OK).
   * @param timeoutMs the bound, default 15 s
   * @throws Error on timeout
   */
  async waitLinkUp(timeoutMs = 15_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.command("show port info 0");
      if (/Link status:\s*up/.test(info)) return;
      if (Date.now() > deadline) {
        throw new Error(
          `testpmd ${this.filePrefix}: link of port 0 still down after ${timeoutMs} ms; log ${this.logPath}`,
        );
      }
      await sleep(100);
    }
  }

  /**
   * Start forwarding in the configured mode (`start`).
   * @throws Error when testpmd rejects it
   */
  async start(): Promise<void> {
    const o = await this.command("start");
    if (!/forwarding - ports=/.test(o)) {
      throw new Error(`testpmd ${this.filePrefix}: start failed: ${o.trim()}`);
    }
  }

  /**
   * Stop forwarding and return the forward statistics it prints.
   * @returns per-port forward counters (empty if forwarding was not started)
   */
  async stop(): Promise<ForwardStats[]> {
    const o = await this.command("stop");
    return parseForwardStats(o);
  }

  /**
   * Read the ethdev counters of every port (`show port stats all`).
   * @returns one entry per port, port 0 first
   * @throws Error when no port block could be parsed
   */
  async stats(): Promise<PortStats[]> {
    const o = await this.command("show port stats all");
    const s = parsePortStats(o);
    if (s.length === 0) {
      throw new Error(`testpmd ${this.filePrefix}: no port stats in ${JSON.stringify(o)}`);
    }
    return s;
  }

  /** Port 0's counters (see {@link Testpmd.stats}). */
  async port0(): Promise<PortStats> {
    const s = await this.stats();
    const p = s.find((x) => x.port === 0);
    if (p === undefined) throw new Error(`testpmd ${this.filePrefix}: no stats for port 0`);
    return p;
  }

  /** Reset the ethdev counters (`clear port stats all`). */
  async clearStats(): Promise<void> {
    await this.command("clear port stats all");
  }

  /**
   * Change the forward mode (`set fwd MODE`); forwarding must be stopped.
   * @param mode the new mode
   */
  async setForwardMode(mode: ForwardMode): Promise<void> {
    const o = await this.command(`set fwd ${mode}`);
    if (!o.includes(`Set ${mode} packet forwarding mode`)) {
      throw new Error(`testpmd ${this.filePrefix}: set fwd ${mode} failed: ${o.trim()}`);
    }
  }

  /**
   * Send exactly `bursts * burst` packets of `txPktLen` bytes on every forwarding stream:
   * switches to `io` mode, `set burst`, `start tx_first bursts`, waits, then stops. In `io`
   * mode nothing else is sent unless the peer sends packets back (io forwards them); against a
   * sink (rxonly) the count is exact as long as the ring has room: keep `bursts * burst` at or
   * below the ring size (256 by default) unless the receiver is draining.
   * Forwarding must be stopped before the call; it is stopped after.
   * @param bursts number of bursts per stream (`start tx_first N`), 1..
   * @param burst packets per burst (`set burst`), 1..512
   * @param settleMs how long to let the bursts leave before `stop`, default 300 ms
   * @returns the forward statistics of the run (txPackets + txDropped = bursts*burst*streams)
   */
  async sendBursts(bursts: number, burst: number, settleMs = 300): Promise<ForwardStats[]> {
    if (!Number.isInteger(bursts) || bursts < 1) {
      throw new RangeError(`sendBursts: bursts must be a positive integer, got ${bursts}`);
    }
    if (!Number.isInteger(burst) || burst < 1 || burst > 512) {
      throw new RangeError(`sendBursts: burst must be in 1..512, got ${burst}`);
    }
    await this.setForwardMode("io");
    const b = await this.command(`set burst ${burst}`);
    if (!b.includes(`set to ${burst}`)) {
      throw new Error(`testpmd ${this.filePrefix}: set burst ${burst} failed: ${b.trim()}`);
    }
    const o = await this.command(`start tx_first ${bursts}`);
    if (!/forwarding - ports/.test(o)) {
      throw new Error(`testpmd ${this.filePrefix}: start tx_first failed: ${o.trim()}`);
    }
    await sleep(settleMs);
    return this.stop();
  }

  /**
   * Send exactly `n` packets on a single-stream port (one queue): `n = q*burst + r` is sent
   * as `q` bursts of `burst` and then one burst of `r`. See {@link Testpmd.sendBursts}.
   * @param n packet count, 1..
   * @param burst the burst size, default 32
   * @returns total packets sent and dropped (ring full) over all the runs
   */
  async sendExactly(n: number, burst = 32): Promise<{ txPackets: number; txDropped: number }> {
    if (!Number.isInteger(n) || n < 1) {
      throw new RangeError(`sendExactly: n must be a positive integer, got ${n}`);
    }
    const runs: Array<[number, number]> = [];
    const q = Math.floor(n / burst);
    const r = n % burst;
    if (q > 0) runs.push([q, burst]);
    if (r > 0) runs.push([1, r]);
    let txPackets = 0;
    let txDropped = 0;
    for (const [bursts, size] of runs) {
      for (const s of await this.sendBursts(bursts, size)) {
        txPackets += s.txPackets;
        txDropped += s.txDropped;
      }
    }
    return { txPackets, txDropped };
  }

  /**
   * Stop testpmd: `quit` (it stops forwarding and closes the port), then SIGTERM, then
   * SIGKILL, each after `timeoutMs`; finally remove /var/run/dpdk/<prefix> and, if testpmd
   * was the listening side, a socket file it left behind. Safe to call twice.
   * @param timeoutMs the wait at each step, default 3 s
   */
  async close(timeoutMs = 3_000): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    process.off("exit", this.onProcessExit);
    const waitExit = (ms: number): Promise<boolean> =>
      Promise.race([this.exitPromise.then(() => true), sleep(ms).then(() => false)]);
    if (this.exited === undefined) {
      try {
        this.child.stdin?.write("quit\n");
        this.child.stdin?.end();
      } catch {
        // stdin already gone: fall through to signals
      }
      if (!(await waitExit(timeoutMs))) {
        this.child.kill("SIGTERM");
        if (!(await waitExit(timeoutMs))) {
          this.child.kill("SIGKILL");
          await waitExit(timeoutMs);
        }
      }
    }
    await rm(join("/var/run/dpdk", this.filePrefix), { recursive: true, force: true });
    if (this.listens) {
      const st = await lstat(this.socketPath).catch(() => undefined);
      if (st?.isSocket() === true) await rm(this.socketPath, { force: true });
    }
    await new Promise<void>((resolve) => this.logFile.end(resolve));
  }
}

/**
 * Start `dpdk-testpmd` with one vhost-user vdev, in interactive mode, output to a log file.
 * Await {@link Testpmd.ready} before use and always {@link Testpmd.close} it (in a finally).
 * @param opts the vdev, forward mode and tuning
 * @returns the running testpmd
 * @throws Error when dpdk-testpmd or stdbuf cannot be found
 */
export async function startTestpmd(opts: TestpmdOptions): Promise<Testpmd> {
  const binary =
    opts.binary ??
    findExecutable("dpdk-testpmd", ["/usr/bin/dpdk-testpmd", "/usr/local/bin/dpdk-testpmd"]);
  const filePrefix = uniqueName(`vk-${opts.name ?? opts.vdev.kind}`);
  const logDir = opts.logDir ?? join(tmpdir(), "vhostkit-peers");
  await mkdir(logDir, { recursive: true });
  return new Testpmd(opts, binary, filePrefix, join(logDir, `testpmd-${filePrefix}.log`));
}

/**
 * Read a log file for a failure message, bounded in size.
 * @param path the log path
 * @param maxChars keep the last this many characters, default 8000
 * @returns the tail of the file, or a note when it cannot be read
 */
export async function readLogTail(path: string, maxChars = 8000): Promise<string> {
  try {
    const s = await readFile(path, "utf8");
    return s.slice(-maxChars);
  } catch (e) {
    return `(cannot read ${path}: ${(e as Error).message})`;
  }
}
