/**
 * `vhostkit migrate`: live migration of a vhost-user device driven by vhostkit's front-end.
 *
 * Three forms:
 *
 *     vhostkit migrate serve --socket PATH --control CTRL [--mem SIZE] [--queue-size N]
 *                            [--mac MAC] [--dst-mac MAC] [--burst N]
 *         A front-end process holding a device: connects to the back-end at PATH, shares SIZE
 *         of guest RAM (default 64M) with it, drives a virtio-net device with a traffic
 *         generator (sequence-numbered frames) and takes commands on the Unix socket CTRL.
 *         It exits after its device migrated away.
 *
 *     vhostkit migrate incoming --listen HOST:PORT|unix:PATH --socket PATH [--control CTRL]
 *         A destination front-end process: waits for one migration stream, connects to its own
 *         back-end at PATH, starts the device from the migrated state and runs the generator
 *         on; with --control it can be migrated again.
 *
 *     vhostkit migrate --from CTRL --to HOST:PORT|unix:PATH [--max-iterations N]
 *                      [--stop-pages N] [--verify]
 *         Ask the front-end process at CTRL to migrate to the destination; prints progress
 *         while it runs, then downtime, total time, iterations, pages sent and state sizes.
 *
 * The control protocol is JSON lines: `{"cmd":"migrate","to":...}` answered by `progress`
 * lines and a final `done` (with the figures) or `error`; `{"cmd":"status"}` answered by one
 * `status` line.
 */
import { createConnection, createServer } from "node:net";
import type { Server, Socket } from "node:net";
import { unlinkSync } from "node:fs";
import { parseArgs } from "node:util";
import { VhostUserFrontend } from "../frontend/frontend.js";
import { GuestRam } from "../frontend/guest-ram.js";
import { migrateSource, receiveMigration } from "../orchestrator/index.js";
import { SeqTrafficGuest } from "../orchestrator/traffic.js";
import type { MigrationProgress, MigrationResult } from "../orchestrator/source.js";
import { ExitCode, UsageError, processIo } from "./common.js";
import type { CliIo } from "./common.js";

const USAGE = `usage:
  vhostkit migrate serve --socket PATH --control CTRL [--mem SIZE] [--queue-size N]
                         [--mac MAC] [--dst-mac MAC] [--burst N]
  vhostkit migrate incoming --listen HOST:PORT|unix:PATH --socket PATH [--control CTRL]
  vhostkit migrate --from CTRL --to HOST:PORT|unix:PATH [--max-iterations N]
                   [--stop-pages N] [--verify]
`;

/** Where a stream goes: TCP host and port, or a Unix socket path. */
type Endpoint = { host: string; port: number } | { path: string };

function parseEndpoint(text: string, option: string): Endpoint {
  if (text.startsWith("unix:")) return { path: text.slice(5) };
  const m = /^(.*):(\d+)$/.exec(text);
  if (!m) throw new UsageError(`${option}: expected HOST:PORT or unix:PATH (got ${text})`);
  const port = Number(m[2]);
  if (port <= 0 || port > 65535) throw new UsageError(`${option}: port out of range (got ${text})`);
  return { host: (m[1] as string).replace(/^\[|\]$/g, "") || "127.0.0.1", port };
}

function parseSize(text: string, option: string): number {
  const m = /^(\d+)([kKmMgG]?)$/.exec(text);
  if (!m) throw new UsageError(`${option}: expected a size like 64M or 1G (got ${text})`);
  const mult = { "": 1, k: 1 << 10, m: 1 << 20, g: 1 << 30 }[(m[2] as string).toLowerCase()] ?? 1;
  return Number(m[1]) * mult;
}

function parseInt10(text: string | undefined, option: string, dflt: number): number {
  if (text === undefined) return dflt;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0)
    throw new UsageError(`${option}: expected a number (got ${text})`);
  return n;
}

function parseMac(text: string, option: string): Uint8Array {
  const parts = text.split(":");
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-f]{1,2}$/i.test(p))) {
    throw new UsageError(`${option}: malformed MAC (got ${text})`);
  }
  return Uint8Array.from(parts, (p) => parseInt(p, 16));
}

function connectTo(ep: Endpoint): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s =
      "path" in ep
        ? createConnection({ path: ep.path }, () => resolve(s))
        : createConnection({ host: ep.host, port: ep.port, noDelay: true }, () => resolve(s));
    s.once("error", reject);
  });
}

function removeSocket(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // not there
  }
}

function waitForSignal(): { promise: Promise<void>; dispose: () => void } {
  let resolve: () => void = () => undefined;
  const promise = new Promise<void>((r) => {
    resolve = r;
  });
  const on = (): void => resolve();
  process.once("SIGINT", on);
  process.once("SIGTERM", on);
  return {
    promise,
    dispose: () => {
      process.off("SIGINT", on);
      process.off("SIGTERM", on);
    },
  };
}

function formatResult(r: MigrationResult): string {
  return (
    `migration completed\n` +
    `  downtime        ${r.downtimeMs.toFixed(1)} ms\n` +
    `  total time      ${r.totalMs.toFixed(1)} ms\n` +
    `  iterations      ${r.iterations}\n` +
    `  pages sent      ${r.pagesSent} (${r.zeroPages} zero, ${r.finalPages} after the stop)\n` +
    `  virtio state    ${r.virtioStateBytes} bytes\n` +
    `  back-end state  ${r.deviceStateTransferred ? `${r.backendStateBytes} bytes` : "not transferred"}\n` +
    `  stream          ${r.bytesSent} bytes\n`
  );
}

/** A device held by this process, migratable through its control socket. */
interface Held {
  fe: VhostUserFrontend;
  ram: GuestRam;
  guest: SeqTrafficGuest;
}

/**
 * Serve the control socket for a held device until it migrates away or a signal comes.
 * @returns the exit status
 */
async function serveControl(io: CliIo, control: string, held: Held): Promise<number> {
  removeSocket(control);
  let migrated = false;
  let busy = false;
  let finish: () => void = () => undefined;
  const finished = new Promise<void>((r) => {
    finish = r;
  });
  const server: Server = createServer((c) => {
    let buf = "";
    c.on("error", () => undefined);
    c.on("data", (d: Buffer) => {
      buf += d.toString("utf8");
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        void handle(c, line);
      }
    });
  });
  const send = (c: Socket, v: unknown): void => {
    if (!c.destroyed) c.write(`${JSON.stringify(v)}\n`);
  };
  const handle = async (c: Socket, line: string): Promise<void> => {
    let cmd: {
      cmd?: string;
      to?: string;
      maxIterations?: number;
      stopPages?: number;
      verify?: boolean;
    };
    try {
      cmd = JSON.parse(line) as typeof cmd;
    } catch {
      send(c, { event: "error", message: "malformed command" });
      return;
    }
    if (cmd.cmd === "status") {
      send(c, {
        event: "status",
        sent: held.guest.nextSeq,
        completed: held.guest.completed,
        received: held.guest.received,
        migrated,
      });
      return;
    }
    if (cmd.cmd !== "migrate" || typeof cmd.to !== "string") {
      send(c, { event: "error", message: `unknown command ${String(cmd.cmd)}` });
      return;
    }
    if (busy || migrated) {
      send(c, {
        event: "error",
        message: migrated ? "already migrated" : "a migration is running",
      });
      return;
    }
    busy = true;
    try {
      const stream = await connectTo(parseEndpoint(cmd.to, "to"));
      const res = await migrateSource({
        frontend: held.fe,
        stream,
        guest: held.guest,
        ...(cmd.maxIterations !== undefined ? { maxIterations: cmd.maxIterations } : {}),
        ...(cmd.stopPages !== undefined ? { stopPages: cmd.stopPages } : {}),
        verifyMemory: cmd.verify === true,
        onProgress: (p: MigrationProgress) => send(c, { event: "progress", ...p }),
      });
      migrated = true;
      held.guest.stop();
      io.stderr(`migrate: device moved to ${cmd.to} (downtime ${res.downtimeMs.toFixed(1)} ms)\n`);
      send(c, { event: "done", result: res });
      c.end();
      finish();
    } catch (err) {
      io.stderr(`migrate: ${(err as Error).message}; running on\n`);
      send(c, { event: "error", message: (err as Error).message });
    } finally {
      busy = false;
    }
  };
  await new Promise<void>((resolve) => server.listen(control, resolve));
  io.stderr(`migrate: control socket ${control}\n`);
  const sig = waitForSignal();
  await Promise.race([finished, sig.promise]);
  sig.dispose();
  server.close();
  removeSocket(control);
  held.guest.stop();
  held.fe.close();
  held.ram.close();
  return ExitCode.OK;
}

async function runServe(io: CliIo, argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      socket: { type: "string" },
      control: { type: "string" },
      mem: { type: "string" },
      "queue-size": { type: "string" },
      mac: { type: "string" },
      "dst-mac": { type: "string" },
      burst: { type: "string" },
    },
    strict: true,
  });
  if (values.socket === undefined) throw new UsageError("serve: --socket PATH is required");
  if (values.control === undefined) throw new UsageError("serve: --control CTRL is required");
  const mem = parseSize(values.mem ?? "64M", "--mem");
  const qsize = parseInt10(values["queue-size"], "--queue-size", 256);
  const fe = await VhostUserFrontend.connect(values.socket, { timeoutMs: 10_000 });
  const ram = GuestRam.create({ size: mem });
  try {
    const neg = await fe.negotiate();
    io.stderr(
      `migrate: connected to ${values.socket}, features 0x${neg.features.toString(16)}, ` +
        `protocol features 0x${neg.protocolFeatures.toString(16)}\n`,
    );
    await fe.start(ram, [qsize, qsize]);
  } catch (err) {
    fe.close();
    ram.close();
    throw err;
  }
  const guest = new SeqTrafficGuest(fe, {
    srcMac: parseMac(values.mac ?? "02:00:00:00:00:01", "--mac"),
    dstMac: parseMac(values["dst-mac"] ?? "ff:ff:ff:ff:ff:ff", "--dst-mac"),
    burst: parseInt10(values.burst, "--burst", 32),
  });
  guest.start();
  return serveControl(io, values.control, { fe, ram, guest });
}

async function runIncoming(io: CliIo, argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      socket: { type: "string" },
      control: { type: "string" },
    },
    strict: true,
  });
  if (values.listen === undefined) throw new UsageError("incoming: --listen HOST:PORT is required");
  if (values.socket === undefined) throw new UsageError("incoming: --socket PATH is required");
  const ep = parseEndpoint(values.listen, "--listen");
  const backend = values.socket;
  const server = createServer({ noDelay: true });
  if ("path" in ep) removeSocket(ep.path);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    if ("path" in ep) server.listen(ep.path, resolve);
    else server.listen(ep.port, ep.host, resolve);
  });
  io.stderr(`migrate: waiting for a migration on ${values.listen}\n`);
  const sig = waitForSignal();
  const conn = await Promise.race([
    new Promise<Socket>((resolve) => server.once("connection", resolve)),
    sig.promise.then(() => null),
  ]);
  sig.dispose();
  server.close();
  if ("path" in ep) removeSocket(ep.path);
  if (conn === null) return ExitCode.OK;
  conn.setNoDelay(true);
  const res = await receiveMigration({
    stream: conn,
    connectBackend: () => VhostUserFrontend.connect(backend, { timeoutMs: 10_000 }),
    onProgress: (p) => {
      if (p.section !== "PAGES")
        io.stderr(`migrate: incoming ${p.section} (${p.pagesReceived} pages)\n`);
    },
  });
  io.stderr(
    `migrate: device running on ${backend} (${res.pagesReceived} pages, back-end state ` +
      `${res.backendStateBytes} bytes, RARP ${res.rarpSent ? "sent" : "not sent"})\n`,
  );
  const guest =
    res.guestState !== null
      ? SeqTrafficGuest.restore(res.frontend, res.guestState)
      : new SeqTrafficGuest(res.frontend);
  guest.start();
  if (values.control !== undefined) {
    return serveControl(io, values.control, { fe: res.frontend, ram: res.ram, guest });
  }
  const s2 = waitForSignal();
  await s2.promise;
  s2.dispose();
  guest.stop();
  res.frontend.close();
  res.ram.close();
  return ExitCode.OK;
}

async function runClient(io: CliIo, argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      from: { type: "string" },
      to: { type: "string" },
      "max-iterations": { type: "string" },
      "stop-pages": { type: "string" },
      verify: { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help === true) {
    io.stdout(USAGE);
    return ExitCode.OK;
  }
  if (values.from === undefined) throw new UsageError("migrate: --from CTRL is required");
  if (values.to === undefined) throw new UsageError("migrate: --to HOST:PORT is required");
  parseEndpoint(values.to, "--to");
  const cmd = {
    cmd: "migrate",
    to: values.to,
    maxIterations: parseInt10(values["max-iterations"], "--max-iterations", 30),
    stopPages: parseInt10(values["stop-pages"], "--stop-pages", 256),
    verify: values.verify === true,
  };
  const c = await connectTo({ path: values.from });
  c.write(`${JSON.stringify(cmd)}\n`);
  return new Promise<number>((resolve) => {
    let buf = "";
    let status: number = ExitCode.FAILURE;
    c.on("data", (d: Buffer) => {
      buf += d.toString("utf8");
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const ev = JSON.parse(line) as {
          event: string;
          message?: string;
          result?: MigrationResult;
        } & Partial<MigrationProgress>;
        if (ev.event === "progress") {
          io.stdout(
            `[${ev.phase ?? "?"}] iteration ${ev.iteration ?? 0}, dirty ${ev.dirtyPages ?? 0} pages, ` +
              `sent ${ev.pagesSent ?? 0} pages (${((ev.bytesSent ?? 0) / 1048576).toFixed(1)} MiB)\n`,
          );
        } else if (ev.event === "done" && ev.result) {
          io.stdout(formatResult(ev.result));
          status = ExitCode.OK;
          c.end();
        } else if (ev.event === "error") {
          io.stderr(`migrate: failed: ${ev.message ?? "?"} (the source runs on)\n`);
          c.end();
        }
      }
    });
    c.on("error", (e: Error) => io.stderr(`migrate: control socket: ${e.message}\n`));
    c.on("close", () => resolve(status));
  });
}

/**
 * Run `vhostkit migrate` with the arguments after `migrate`.
 * @param argv the arguments (e.g. `["--from", "/run/vm.ctl", "--to", "10.0.0.2:4444"]`)
 * @param io where to write (default: the process's streams)
 * @returns the exit status (0 success, 1 failure, 2 usage error)
 */
export async function runMigrate(argv: string[], io: CliIo = processIo()): Promise<number> {
  try {
    const [sub, ...rest] = argv;
    if (sub === "serve") return await runServe(io, rest);
    if (sub === "incoming") return await runIncoming(io, rest);
    if (sub === "help" || sub === "--help" || sub === "-h") {
      io.stdout(USAGE);
      return ExitCode.OK;
    }
    return await runClient(io, argv);
  } catch (err) {
    if (
      err instanceof UsageError ||
      (err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")
    ) {
      io.stderr(`${(err as Error).message}\n${USAGE}`);
      return ExitCode.USAGE;
    }
    io.stderr(`migrate: ${(err as Error).message}\n`);
    return ExitCode.FAILURE;
  }
}
