/**
 * `vhostkit stats`: read a running switch's statistics from its control socket and print
 * them (per-port counters with drop reasons, the vhost-user ports, the MAC table), or the raw
 * JSON with `--json`.
 */
import { createConnection } from "node:net";
import { parseArgs } from "node:util";
import {
  ExitCode,
  UsageError,
  controlPathFor,
  defaultSocketPath,
  formatStats,
  isUsageError,
  reportUsageError,
} from "./common.js";
import type { CliIo, StatsSnapshot } from "./common.js";

/** Usage text of `vhostkit stats`. */
export const STATS_USAGE = `usage: vhostkit stats [options]

Print the counters and the MAC table of a running \`vhostkit switch\`.

options:
  --control PATH   the switch's control socket (default: <first socket>.ctl of the
                   default port, $XDG_RUNTIME_DIR/vhostkit/vm0.sock.ctl)
  --json           print the raw JSON snapshot
  --help           this text
`;

/**
 * Fetch a statistics snapshot from a switch's control socket.
 * @param path the control socket
 * @param timeoutMs give up after this long (default 5000)
 * @returns the snapshot
 * @throws Error naming the path when the socket cannot be reached or the answer is not a
 *   snapshot
 */
export function fetchStats(path: string, timeoutMs = 5000): Promise<StatsSnapshot> {
  return new Promise<StatsSnapshot>((resolve, reject) => {
    const chunks: Buffer[] = [];
    const c = createConnection(path);
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error(`control socket ${path}: no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    c.on("data", (b: Buffer) => chunks.push(b));
    c.once("error", (err: Error & { code?: string }) => {
      clearTimeout(timer);
      reject(
        new Error(
          `cannot reach the control socket ${path} (${err.code ?? err.message}): ` +
            "is `vhostkit switch` running?",
        ),
      );
    });
    c.once("end", () => {
      clearTimeout(timer);
      const text = Buffer.concat(chunks).toString("utf8");
      let v: unknown;
      try {
        v = JSON.parse(text);
      } catch {
        reject(new Error(`control socket ${path}: not JSON (${text.length} bytes)`));
        return;
      }
      const s = v as Partial<StatsSnapshot> | null;
      if (s === null || typeof s !== "object" || s.version !== 1 || s.switch === undefined) {
        reject(new Error(`control socket ${path}: not a vhostkit statistics snapshot`));
        return;
      }
      resolve(s as StatsSnapshot);
    });
  });
}

/**
 * Run `vhostkit stats`.
 * @param argv the arguments after `stats`
 * @param io output streams and environment
 * @returns the exit status: 0, 1 when the switch cannot be reached, 2 for a bad command line
 */
export async function runStats(argv: string[], io: CliIo): Promise<number> {
  let values: {
    control?: string | undefined;
    json?: boolean | undefined;
    help?: boolean | undefined;
  };
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        control: { type: "string" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
    if (values.control === "") throw new UsageError("--control: empty path");
  } catch (err) {
    if (isUsageError(err)) return reportUsageError(io, "stats", err);
    throw err;
  }
  if (values.help === true) {
    io.stdout(STATS_USAGE);
    return ExitCode.OK;
  }
  const path = values.control ?? controlPathFor(defaultSocketPath(io.env));
  let snap: StatsSnapshot;
  try {
    snap = await fetchStats(path);
  } catch (err) {
    io.stderr(`vhostkit stats: ${(err as Error).message}\n`);
    return ExitCode.FAILURE;
  }
  io.stdout(values.json === true ? JSON.stringify(snap, null, 2) + "\n" : formatStats(snap));
  return ExitCode.OK;
}
