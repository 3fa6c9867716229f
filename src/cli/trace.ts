/**
 * `vhostkit trace`: a proxy between a front-end and a back-end that prints every message both
 * ways (one line each, or JSON lines), replies paired with their requests.
 */
import { parseArgs } from "node:util";
import { ExitCode, UsageError, isUsageError, reportUsageError } from "./common.js";
import type { CliIo } from "./common.js";
import { TraceProxy, formatTraceEvent } from "../tools/trace/proxy.js";

/** Usage text of `vhostkit trace`. */
export const TRACE_USAGE = `usage: vhostkit trace --listen PATH --connect PATH [options]

Sit between a vhost-user front-end and back-end: accept the front-end on --listen, connect to
the back-end on --connect, forward every message both ways unchanged with its fds (the
back-end request channel of SET_BACKEND_REQ_FD too) and print one line per message: time,
connection, direction, request, flags, decoded fields, fds; replies with their latency.

options:
  --listen PATH     where the front-end connects
  --connect PATH    the back-end's socket
  --client          the back-end is in client mode: wait for it on the --connect path
  --json            print JSON lines
  --malformed M     forward (default) or cut: what to do with a malformed message
  --help            this text
`;

/**
 * Run `vhostkit trace` until SIGINT / SIGTERM (or the abort signal).
 * @param argv the arguments after `trace`
 * @param io output streams
 * @param signal stops the proxy (tests)
 * @returns the exit status: 0 after a stop, 2 for a bad command line
 */
export async function runTrace(argv: string[], io: CliIo, signal?: AbortSignal): Promise<number> {
  let values;
  try {
    values = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        listen: { type: "string" },
        connect: { type: "string" },
        client: { type: "boolean" },
        json: { type: "boolean" },
        malformed: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
    if (values.help !== true) {
      if (!values.listen) throw new UsageError("--listen PATH is required");
      if (!values.connect) throw new UsageError("--connect PATH is required");
      if (values.malformed !== undefined && !["forward", "cut"].includes(values.malformed)) {
        throw new UsageError(
          `--malformed: ${JSON.stringify(values.malformed)} is not forward or cut`,
        );
      }
    }
  } catch (err) {
    if (isUsageError(err)) return reportUsageError(io, "trace", err);
    throw err;
  }
  if (values.help === true) {
    io.stdout(TRACE_USAGE);
    return ExitCode.OK;
  }
  const json = values.json === true;
  const proxy = new TraceProxy({
    listen: values.listen as string,
    connect: values.connect as string,
    client: values.client === true,
    onMalformed: values.malformed === "cut" ? "cut" : "forward",
    onEvent: (e) => io.stdout(`${json ? JSON.stringify(e) : formatTraceEvent(e)}\n`),
    onNote: (n) => io.stderr(`vhostkit trace: ${n}\n`),
  });
  proxy.start();
  io.stderr(`vhostkit trace: listening on ${values.listen as string}\n`);
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off("SIGINT", stop);
      process.off("SIGTERM", stop);
      resolve();
    };
    process.on("SIGINT", stop);
    process.on("SIGTERM", stop);
    signal?.addEventListener("abort", stop, { once: true });
  });
  proxy.close();
  return ExitCode.OK;
}
