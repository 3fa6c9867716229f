/**
 * The `vhostkit` command: dispatch to the sub-commands in `src/cli/`.
 */
import { runCheck } from "./cli/check.js";
import { ExitCode, processIo } from "./cli/common.js";
import type { CliIo } from "./cli/common.js";
import { runMigrate } from "./cli/migrate.js";
import { runStats } from "./cli/stats.js";
import { runSwitch } from "./cli/switch.js";
import { runTrace } from "./cli/trace.js";

/** Top-level usage text. */
export const HELP = `usage: vhostkit <command> [options]

commands:
  switch          serve a virtual switch whose ports are vhost-user-net sockets
                  (vhostkit switch --socket /run/vm1.sock --socket /run/vm2.sock)
  stats           print the counters and MAC table of a running switch
  migrate         live-migrate a device driven by vhostkit's front-end to another back-end
                  (vhostkit migrate --from CTRL --to HOST:PORT)
  check           check a vhost-user back-end against the spec and print a report
                  (vhostkit check /run/backend.sock --profile net)
  trace           a proxy printing every message between a front-end and a back-end
                  (vhostkit trace --listen /run/trace.sock --connect /run/backend.sock)
  help            show this help

Run 'vhostkit <command> --help' for the options of a command.
`;

/**
 * Entry point of the `vhostkit` command.
 * @param argv arguments after the program name
 * @param io where to write (default: the process's stdout / stderr and environment)
 * @returns the process exit code (0 ok, 1 failure, 2 bad command line)
 */
export async function main(argv: string[], io: CliIo = processIo()): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === undefined || cmd === "help" || cmd === "--help" || cmd === "-h") {
    io.stdout(HELP);
    return ExitCode.OK;
  }
  switch (cmd) {
    case "switch":
      return runSwitch(rest, io);
    case "stats":
      return runStats(rest, io);
    case "migrate":
      return runMigrate(rest, io);
    case "check":
      return runCheck(rest, io);
    case "trace":
      return runTrace(rest, io);
    default:
      io.stderr(`vhostkit: unknown command ${JSON.stringify(cmd)}\n\n${HELP}`);
      return ExitCode.USAGE;
  }
}
