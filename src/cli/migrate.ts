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
 * lines and a final `done` (with the figures) or `error` (`message`, and for a failed migration
 * `sourceResumed`: whether the source took its device back); `{"cmd":"status"}` answered by one
 * `status` line. A malformed line or a field of the wrong type is answered by an `error` line.
 */
import { createConnection, createServer } from "node:net";
import type { Server, Socket } from "node:net";
import { lstatSync, unlinkSync } from "node:fs";
import { parseArgs } from "node:util";
import { VhostUserFrontend } from "../frontend/frontend.js";
import { GuestRam } from "../frontend/guest-ram.js";
import { migrateSource, receiveMigration } from "../orchestrator/index.js";
import { SeqTrafficGuest } from "../orchestrator/traffic.js";
import { MigrationError } from "../orchestrator/source.js";
import type { MigrationProgress, MigrationResult } from "../orchestrator/source.js";
import { ExitCode, UsageError, isUsageError, processIo } from "./common.js";
import type { CliIo } from "./common.js";

const USAGE = `usage:
  vhostkit migrate serve --socket PATH --control CTRL [--mem SIZE] [--queue-size N]
                         [--mac MAC] [--dst-mac MAC] [--burst N]
  vhostkit migrate incoming --listen HOST:PORT|unix:PATH --socket PATH [--control CTRL]
  vhostkit migrate --from CTRL --to HOST:PORT|unix:PATH [--max-iterations N]
                   [--stop-pages N] [--verify]

What it supports: a virtio-net device (one queue pair) whose traffic comes from the built-in
sequenced frame generator of "serve"; any vhost-user-net back-end on either side. To migrate
another device type, or a device whose traffic your program makes, call migrateSource() and
receiveMigration() from the library (docs/migration.md; examples/migrate-entropy-device.ts).
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

/**
 * Remove a stale Unix socket before listening at `path`: nothing there is fine; a socket nobody
 * accepts on is unlinked; a live socket (another process listens) or anything that is not a
 * socket is refused.
 * @throws Error naming the path otherwise
 */
async function clearStaleSocket(path: string, option: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return; // not there
  }
  if (!st.isSocket()) throw new Error(`${option}: ${path} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const c = createConnection({ path });
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
  if (live) throw new Error(`${option}: ${path} is in use (another process listens on it)`);
  unlinkSync(path);
}

/** Unlink our own socket after closing its server. */
function removeOwnSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // already gone
  }
}

/** Listen on a path or a TCP endpoint; rejects on EADDRINUSE, EACCES and the like. */
function listenOn(server: Server, ep: Endpoint): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once("error", onError);
    const ok = (): void => {
      server.off("error", onError);
      resolve();
    };
    if ("path" in ep) server.listen(ep.path, ok);
    else server.listen(ep.port, ep.host, ok);
  });
}

/** A control command, checked. */
type Command =
  | { cmd: "status" }
  | { cmd: "migrate"; to: string; maxIterations?: number; stopPages?: number; verify: boolean };

/**
 * Check a parsed control line.
 * @returns the command, or a message naming the bad field
 */
function checkCommand(v: unknown): Command | string {
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    return "malformed command: expected a JSON object";
  }
  const o = v as Record<string, unknown>;
  if (o.cmd === "status") return { cmd: "status" };
  if (o.cmd !== "migrate") return `unknown command ${JSON.stringify(o.cmd) ?? "undefined"}`;
  if (typeof o.to !== "string") return "migrate: field to must be a string";
  const count = (k: "maxIterations" | "stopPages"): number | undefined | string => {
    const x = o[k];
    if (x === undefined) return undefined;
    if (typeof x !== "number" || !Number.isSafeInteger(x) || x < 0) {
      return `migrate: field ${k} must be a non-negative integer (got ${JSON.stringify(x)})`;
    }
    return x;
  };
  const maxIterations = count("maxIterations");
  if (typeof maxIterations === "string") return maxIterations;
  const stopPages = count("stopPages");
  if (typeof stopPages === "string") return stopPages;
  if (o.verify !== undefined && typeof o.verify !== "boolean") {
    return `migrate: field verify must be a boolean (got ${JSON.stringify(o.verify)})`;
  }
  return {
    cmd: "migrate",
    to: o.to,
    ...(maxIterations !== undefined ? { maxIterations } : {}),
    ...(stopPages !== undefined ? { stopPages } : {}),
    verify: o.verify === true,
  };
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
    r.downtimeSteps.map((d) => `    ${d.step.padEnd(36)} ${d.ms.toFixed(2)} ms\n`).join("") +
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
  /** virtio-net device fields sent with the virtio state (the MAC) */
  deviceFields?: Uint8Array;
}

/**
 * Serve the control socket for a held device until it migrates away or a signal comes.
 * @returns the exit status
 */
async function serveControl(io: CliIo, control: string, held: Held): Promise<number> {
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
        handle(c, line).catch((err: unknown) => {
          send(c, { event: "error", message: err instanceof Error ? err.message : String(err) });
        });
      }
    });
  });
  const send = (c: Socket, v: unknown): void => {
    if (!c.destroyed) c.write(`${JSON.stringify(v)}\n`);
  };
  const handle = async (c: Socket, line: string): Promise<void> => {
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      send(c, { event: "error", message: "malformed command: not JSON" });
      return;
    }
    const cmd = checkCommand(parsed);
    if (typeof cmd === "string") {
      send(c, { event: "error", message: cmd });
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
        ...(held.deviceFields !== undefined ? { deviceFields: held.deviceFields } : {}),
        ...(cmd.maxIterations !== undefined ? { maxIterations: cmd.maxIterations } : {}),
        ...(cmd.stopPages !== undefined ? { stopPages: cmd.stopPages } : {}),
        verifyMemory: cmd.verify,
        onProgress: (p: MigrationProgress) => send(c, { event: "progress", ...p }),
      });
      migrated = true;
      held.guest.stop();
      io.stderr(`migrate: device moved to ${cmd.to} (downtime ${res.downtimeMs.toFixed(1)} ms)\n`);
      send(c, { event: "done", result: res });
      c.end();
      finish();
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      // A failure before migrateSource started (connecting) leaves the source untouched.
      const sourceResumed = err instanceof MigrationError ? err.sourceResumed : true;
      io.stderr(
        `migrate: ${message}; ${
          sourceResumed ? "running on" : "the source could NOT resume its device"
        }\n`,
      );
      send(c, { event: "error", message, sourceResumed });
    } finally {
      busy = false;
    }
  };
  try {
    await clearStaleSocket(control, "--control");
    await listenOn(server, { path: control });
  } catch (err) {
    held.guest.stop();
    held.fe.close();
    held.ram.close();
    throw err;
  }
  io.stderr(`migrate: control socket ${control}\n`);
  const sig = waitForSignal();
  await Promise.race([finished, sig.promise]);
  sig.dispose();
  server.close();
  removeOwnSocket(control);
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
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help === true) {
    io.stdout(USAGE);
    return ExitCode.OK;
  }
  if (values.socket === undefined) throw new UsageError("serve: --socket PATH is required");
  if (values.control === undefined) throw new UsageError("serve: --control CTRL is required");
  const mem = parseSize(values.mem ?? "64M", "--mem");
  const qsize = parseInt10(values["queue-size"], "--queue-size", 256);
  // Every option is parsed before anything is connected or mapped.
  const srcMac = parseMac(values.mac ?? "02:00:00:00:00:01", "--mac");
  const dstMac = parseMac(values["dst-mac"] ?? "ff:ff:ff:ff:ff:ff", "--dst-mac");
  const burst = parseInt10(values.burst, "--burst", 32);
  await clearStaleSocket(values.control, "--control");
  const fe = await VhostUserFrontend.connect(values.socket, { timeoutMs: 10_000 });
  let ram: GuestRam;
  try {
    ram = GuestRam.create({ size: mem });
  } catch (err) {
    fe.close();
    throw err;
  }
  let guest: SeqTrafficGuest;
  try {
    const neg = await fe.negotiate();
    io.stderr(
      `migrate: connected to ${values.socket}, features 0x${neg.features.toString(16)}, ` +
        `protocol features 0x${neg.protocolFeatures.toString(16)}\n`,
    );
    await fe.start(ram, [qsize, qsize]);
    guest = new SeqTrafficGuest(fe, { srcMac, dstMac, burst });
  } catch (err) {
    fe.close();
    ram.close();
    throw err;
  }
  guest.start();
  // The MAC travels in the virtio state: the destination announces it (SEND_RARP).
  return serveControl(io, values.control, { fe, ram, guest, deviceFields: srcMac });
}

async function runIncoming(io: CliIo, argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      listen: { type: "string" },
      socket: { type: "string" },
      control: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
    strict: true,
  });
  if (values.help === true) {
    io.stdout(USAGE);
    return ExitCode.OK;
  }
  if (values.listen === undefined) throw new UsageError("incoming: --listen HOST:PORT is required");
  if (values.socket === undefined) throw new UsageError("incoming: --socket PATH is required");
  const ep = parseEndpoint(values.listen, "--listen");
  const backend = values.socket;
  const server = createServer({ noDelay: true });
  if (values.control !== undefined) await clearStaleSocket(values.control, "--control");
  if ("path" in ep) await clearStaleSocket(ep.path, "--listen");
  await listenOn(server, ep);
  io.stderr(`migrate: waiting for a migration on ${values.listen}\n`);
  const sig = waitForSignal();
  const conn = await Promise.race([
    new Promise<Socket>((resolve) => server.once("connection", resolve)),
    sig.promise.then(() => null),
  ]);
  sig.dispose();
  server.close();
  if ("path" in ep) removeOwnSocket(ep.path);
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
  let guest: SeqTrafficGuest;
  try {
    guest =
      res.guestState !== null
        ? SeqTrafficGuest.restore(res.frontend, res.guestState)
        : new SeqTrafficGuest(res.frontend);
  } catch (err) {
    res.frontend.close();
    res.ram.close();
    throw err;
  }
  guest.start();
  if (values.control !== undefined) {
    const vs = res.virtioState;
    return serveControl(io, values.control, {
      fe: res.frontend,
      ram: res.ram,
      guest,
      ...(vs.deviceId === 1 && vs.device.length >= 6
        ? { deviceFields: vs.device.slice(0, 6) }
        : {}),
    });
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
        let ev: {
          event?: unknown;
          message?: string;
          sourceResumed?: boolean;
          result?: MigrationResult;
        } & Partial<MigrationProgress>;
        try {
          const v: unknown = JSON.parse(line);
          if (typeof v !== "object" || v === null) throw new Error("not an object");
          ev = v as typeof ev;
        } catch {
          io.stderr(`migrate: malformed line from ${values.from}: ${line.slice(0, 80)}\n`);
          continue;
        }
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
          const state =
            ev.sourceResumed === true
              ? " (the source runs on)"
              : ev.sourceResumed === false
                ? " (the source could NOT resume its device)"
                : "";
          io.stderr(`migrate: failed: ${String(ev.message ?? "?")}${state}\n`);
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
    if (isUsageError(err)) {
      io.stderr(`${(err as Error).message}\n${USAGE}`);
      return ExitCode.USAGE;
    }
    io.stderr(`migrate: ${(err as Error).message}\n`);
    return ExitCode.FAILURE;
  }
}
