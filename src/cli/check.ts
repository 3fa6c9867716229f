/**
 * `vhostkit check`: run the conformance battery against any vhost-user back-end and print the
 * report (a table grouped by section, or JSON). Exit status 0 when no check failed, 1 when one
 * did, 2 when the back-end could not be checked or the command line is wrong.
 */
import { parseArgs } from "node:util";
import { ExitCode, UsageError, isUsageError, reportUsageError } from "./common.js";
import type { CliIo } from "./common.js";
import { PROFILE_NAMES } from "../tools/check/profiles.js";
import type { ProfileName } from "../tools/check/profiles.js";
import { CheckRunError, formatReport, runChecks } from "../tools/check/run.js";
import type { RunChecksOptions } from "../tools/check/run.js";

/** Usage text of `vhostkit check`. */
export const CHECK_USAGE = `usage: vhostkit check SOCKET [options]
       vhostkit check --listen PATH [options]

Check a vhost-user back-end against the spec: handshake and features, ring lifecycle, memory,
dirty log, device state, virtio-fs (FUSE) and robustness against malformed messages. Every
check opens its own connection; the robustness checks run last.

options:
  --profile P      how to make the device work: auto (default), net, fs, rng, generic
  --listen PATH    the back-end is in client mode: listen on PATH for it
  --second SOCKET  a second back-end: device state is loaded into it, and the device is
                   migrated live to it under traffic (the migration section)
  --pid PID        the back-end's pid: its fd count is checked after many connections
  --connections N  connections for the fd-count check (default 300)
  --spawn CMD      shell command that starts the back-end whenever its socket does not answer
                   (back-ends that serve one front-end and exit, e.g. virtiofsd)
  --only PREFIX    run only the checks whose id starts with PREFIX (repeatable)
  --json           print the report as JSON
  --help           this text

exit status: 0 no check failed, 1 a check failed, 2 the back-end could not be checked
`;

interface CheckArgs {
  profile?: string | undefined;
  listen?: string | undefined;
  second?: string | undefined;
  pid?: string | undefined;
  connections?: string | undefined;
  spawn?: string | undefined;
  only?: string[] | undefined;
  json?: boolean | undefined;
  help?: boolean | undefined;
}

function parse(argv: string[]): { values: CheckArgs; socket: string | null } {
  const { values, positionals } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: true,
    options: {
      profile: { type: "string" },
      listen: { type: "string" },
      second: { type: "string" },
      pid: { type: "string" },
      connections: { type: "string" },
      spawn: { type: "string" },
      only: { type: "string", multiple: true },
      json: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (positionals.length > 1)
    throw new UsageError(`one SOCKET expected, got ${positionals.length}`);
  const socket = positionals[0] ?? null;
  if (values.help !== true && socket === null && values.listen === undefined) {
    throw new UsageError("SOCKET (or --listen PATH) is required");
  }
  if (socket !== null && values.listen !== undefined) {
    throw new UsageError("give SOCKET or --listen PATH, not both");
  }
  if (
    values.profile !== undefined &&
    !(PROFILE_NAMES as readonly string[]).includes(values.profile)
  ) {
    throw new UsageError(
      `--profile: ${JSON.stringify(values.profile)} is not one of ${PROFILE_NAMES.join(", ")}`,
    );
  }
  for (const k of ["pid", "connections"] as const) {
    const v = values[k];
    if (v !== undefined && !/^[1-9][0-9]{0,8}$/.test(v)) {
      throw new UsageError(`--${k}: ${JSON.stringify(v)} is not a positive integer`);
    }
  }
  return { values, socket };
}

/**
 * Run `vhostkit check`.
 * @param argv the arguments after `check`
 * @param io output streams
 * @returns the exit status: 0 all passed, 1 a check failed, 2 not checkable / bad command line
 */
export async function runCheck(argv: string[], io: CliIo): Promise<number> {
  let parsed: { values: CheckArgs; socket: string | null };
  try {
    parsed = parse(argv);
  } catch (err) {
    if (isUsageError(err)) return reportUsageError(io, "check", err);
    throw err;
  }
  const { values, socket } = parsed;
  if (values.help === true) {
    io.stdout(CHECK_USAGE);
    return ExitCode.OK;
  }
  const opts: RunChecksOptions = {
    socket,
    listen: values.listen,
    spawn: values.spawn,
    profile: (values.profile ?? "auto") as ProfileName,
    pid: values.pid !== undefined ? Number(values.pid) : null,
    second: values.second !== undefined ? { socket: values.second } : null,
    connections: values.connections !== undefined ? Number(values.connections) : 300,
  };
  if (values.only !== undefined) opts.only = values.only;
  try {
    const report = await runChecks(opts);
    io.stdout(values.json === true ? JSON.stringify(report, null, 2) + "\n" : formatReport(report));
    return report.summary.fail > 0 ? ExitCode.FAILURE : ExitCode.OK;
  } catch (err) {
    if (err instanceof CheckRunError) {
      io.stderr(`vhostkit check: ${err.message}\n`);
      return ExitCode.USAGE;
    }
    throw err;
  }
}
