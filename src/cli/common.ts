/**
 * What the `vhostkit` commands share: usage errors (exit status 2), the stderr logger, default
 * paths (computed when a command runs, never at import time) and the statistics snapshot that
 * the switch serves on its control socket and `vhostkit stats` prints.
 */
import { lstatSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "../backend/device.js";
import type { MacTableEntry, SwitchStats } from "../net/switch.js";

/** A command line that cannot be run as given; the command exits with status 2. */
export class UsageError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOSTKIT_USAGE" as const;
  /**
   * @param message what is wrong, naming the option and the value
   */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/**
 * Whether an error is the command line's fault: a {@link UsageError} or an error of
 * `node:util` `parseArgs` (unknown option, missing value).
 * @param err what was thrown while parsing
 * @returns true when the command should exit with status 2
 */
export function isUsageError(err: unknown): boolean {
  if (err instanceof UsageError) return true;
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" && code.startsWith("ERR_PARSE_ARGS");
}

/**
 * Report a usage error of one command on stderr, with the hint to its `--help`.
 * @param io where to write
 * @param command the command's name (`stats`, `trace`, ...)
 * @param err the usage error (see {@link isUsageError})
 * @returns {@link ExitCode.USAGE}
 */
export function reportUsageError(io: CliIo, command: string, err: unknown): number {
  io.stderr(`vhostkit ${command}: ${(err as Error).message}\nTry 'vhostkit ${command} --help'.\n`);
  return ExitCode.USAGE;
}

/** Exit statuses of the commands. */
export const ExitCode = Object.freeze({ OK: 0, FAILURE: 1, USAGE: 2 });

/** Where a command writes (the process's streams, or a test's buffers). */
export interface CliIo {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  /** the environment to read defaults from (XDG_RUNTIME_DIR) */
  env: Readonly<Record<string, string | undefined>>;
}

/**
 * The process's own streams and environment.
 * @returns an io writing to stdout / stderr
 */
export function processIo(): CliIo {
  return {
    stdout: (t) => void process.stdout.write(t),
    stderr: (t) => void process.stderr.write(t),
    env: process.env,
  };
}

/**
 * A logger writing `PREFIX: message` lines to stderr (`warning:` / `error:` marked), debug lines
 * only when verbose.
 * @param io where to write
 * @param prefix e.g. `vhostkit switch`
 * @param verbose include debug lines
 * @returns the logger
 */
export function stderrLogger(io: CliIo, prefix: string, verbose: boolean): Logger {
  return {
    debug: (m) => {
      if (verbose) io.stderr(`${prefix}: debug: ${m}\n`);
    },
    info: (m) => io.stderr(`${prefix}: ${m}\n`),
    warn: (m) => io.stderr(`${prefix}: warning: ${m}\n`),
    error: (m) => io.stderr(`${prefix}: error: ${m}\n`),
  };
}

/**
 * The directory vhostkit puts its default sockets in: `$XDG_RUNTIME_DIR/vhostkit`, else
 * `/tmp/vhostkit`.
 * @param env the environment
 * @returns the directory (not created here)
 */
export function defaultRuntimeDir(env: Readonly<Record<string, string | undefined>>): string {
  const xdg = env.XDG_RUNTIME_DIR;
  return join(xdg !== undefined && xdg !== "" ? xdg : "/tmp", "vhostkit");
}

/**
 * Create a directory only this user may enter (mode 0700), or check that an existing one is
 * that: a directory, not a symlink, owned by this user, with no group or other permissions.
 * A shared directory such as `/tmp/vhostkit` made by someone else could otherwise hand them
 * the sockets (and, through them, the guests' memory).
 * @param dir the directory
 * @throws Error naming the directory and what is wrong with it
 */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const st = lstatSync(dir);
  if (!st.isDirectory()) throw new Error(`${dir} is not a directory`);
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw new Error(`${dir} belongs to uid ${st.uid}, not to this user (uid ${uid})`);
  }
  if ((st.mode & 0o077) !== 0) {
    throw new Error(`${dir} is open to other users (mode 0${(st.mode & 0o777).toString(8)})`);
  }
}

/**
 * The socket `vhostkit switch` serves when given none.
 * @param env the environment
 * @returns `<runtime dir>/vm0.sock`
 */
export function defaultSocketPath(env: Readonly<Record<string, string | undefined>>): string {
  return join(defaultRuntimeDir(env), "vm0.sock");
}

/**
 * The control (statistics) socket of a switch whose first port is `firstSocket`.
 * @param firstSocket the first port's socket path
 * @returns `<firstSocket>.ctl`
 */
export function controlPathFor(firstSocket: string): string {
  return `${firstSocket}.ctl`;
}

/** One vhost-user port in a {@link StatsSnapshot}. */
export interface VhostPortInfo {
  /** port name (the socket path) */
  name: string;
  socket: string;
  /** "server" (the switch listens) or "client" (it connects to QEMU's socket) */
  mode: "server" | "client";
  /** a front-end is connected */
  connected: boolean;
  /** the guest's MAC, when known */
  mac: string | null;
  queuePairs: number;
  activePairs: number;
  /** negotiated virtio features, hex */
  features: string;
  /** negotiated virtio features, by name */
  featureNames: string;
  /** frames per queue pair (rx: written into the guest's receive queue; tx: taken from it) */
  pairCounters: { rxFrames: number; txFrames: number }[];
}

/** What the control socket serves (JSON, one object, then the connection closes). */
export interface StatsSnapshot {
  /** format version of this object */
  version: 1;
  pid: number;
  uptimeMs: number;
  switch: SwitchStats;
  macTable: MacTableEntry[];
  vhostPorts: VhostPortInfo[];
  uplinks: string[];
}

function pad(s: string, n: number): string {
  return s.length >= n ? s : s + " ".repeat(n - s.length);
}

function padLeft(s: string, n: number): string {
  return s.length >= n ? s : " ".repeat(n - s.length) + s;
}

/**
 * Render a snapshot as the text `vhostkit stats` prints: one line per port (link, packets,
 * bytes, drops), the drop reasons that are not zero, the vhost-user details, the MAC table.
 * @param s the snapshot
 * @returns the text
 */
export function formatStats(s: StatsSnapshot): string {
  const out: string[] = [];
  const nameW = Math.max(4, ...s.switch.ports.map((p) => p.name.length));
  out.push(
    `switch pid ${s.pid}, up ${(s.uptimeMs / 1000).toFixed(1)} s, ${s.switch.ports.length} port(s), ` +
      `${s.switch.macs} MAC(s)`,
  );
  out.push(
    `${pad("PORT", nameW)}  LINK  ${padLeft("RX-PKTS", 10)} ${padLeft("RX-BYTES", 12)} ` +
      `${padLeft("TX-PKTS", 10)} ${padLeft("TX-BYTES", 12)} ${padLeft("DROPS", 8)}`,
  );
  for (const p of s.switch.ports) {
    const c = p.counters;
    const drops = Object.values(c.drops).reduce((a, b) => a + b, 0);
    out.push(
      `${pad(p.name, nameW)}  ${pad(p.up ? "up" : "down", 4)}  ${padLeft(String(c.rxPackets), 10)} ` +
        `${padLeft(String(c.rxBytes), 12)} ${padLeft(String(c.txPackets), 10)} ` +
        `${padLeft(String(c.txBytes), 12)} ${padLeft(String(drops), 8)}`,
    );
    const reasons = Object.entries(c.drops)
      .filter(([, n]) => n > 0)
      .map(([r, n]) => `${r}=${n}`);
    if (reasons.length > 0) out.push(`${pad("", nameW)}  drops: ${reasons.join(" ")}`);
    const v = s.vhostPorts.find((x) => x.name === p.name);
    if (v !== undefined) {
      out.push(
        `${pad("", nameW)}  ${v.mode}, ${v.connected ? "connected" : "not connected"}, ` +
          `mac ${v.mac ?? "unknown"}, pairs ${v.activePairs}/${v.queuePairs}, ` +
          `features ${v.features}`,
      );
    }
  }
  out.push(
    `software offloads: ${s.switch.softwareCsum} checksum(s) completed, ` +
      `${s.switch.softwareGso.frames} GSO frame(s) segmented into ` +
      `${s.switch.softwareGso.segments}; ${s.switch.learnOverflows} MAC(s) not learned (table full)`,
  );
  out.push("");
  out.push(`MAC TABLE (${s.macTable.length})`);
  const macPortW = Math.max(4, ...s.macTable.map((m) => m.port.length));
  out.push(`MAC                ${pad("PORT", macPortW)}  AGE`);
  const rows = [...s.macTable].sort(
    (a, b) => a.port.localeCompare(b.port) || a.mac.localeCompare(b.mac),
  );
  for (const m of rows) {
    out.push(`${m.mac}  ${pad(m.port, macPortW)}  ${(m.age / 1000).toFixed(1)}s`);
  }
  return out.join("\n") + "\n";
}
