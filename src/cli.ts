/**
 * Entry point of the `vhostkit` command.
 * @param argv arguments after the program name
 * @returns the process exit code
 */
export async function main(argv: string[]): Promise<number> {
  if (argv.length === 0 || argv[0] === "--help" || argv[0] === "-h" || argv[0] === "help") {
    process.stdout.write(HELP);
    return 0;
  }
  process.stderr.write(`vhostkit: unknown command ${JSON.stringify(argv[0])}\n${HELP}`);
  return 2;
}

const HELP = `usage: vhostkit <command> [options]

commands:
  help            show this help
`;
