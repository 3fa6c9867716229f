/**
 * `vhostkit switch`: a virtual Ethernet switch whose ports are vhost-user-net sockets (one VM
 * each) and host uplinks (TAP, VXLAN), with a control socket serving statistics.
 *
 * It logs to stderr who connected, what was negotiated and why a port failed; once every port
 * is serving it writes the line `vhostkit switch: ready`. SIGINT and SIGTERM close every port
 * and uplink and remove the sockets it created.
 */
import { lstatSync, unlinkSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import type { Server } from "node:net";
import { dirname } from "node:path";
import { parseArgs } from "node:util";
import type { Logger } from "../backend/device.js";
import {
  checkSessionLimits,
  DEFAULT_REQUEST_BACKLOG,
  MAX_STATE_TIMEOUT_MS,
} from "../backend/session.js";
import { MAX_FDS, MAX_PAYLOAD_SIZE } from "../protocol/constants.js";
import { Switch } from "../net/switch.js";
import { addVhostUserPort, describeNetFeatures, MAX_QUEUE_PAIRS } from "../net/virtio-net.js";
import type { VhostUserPort } from "../net/virtio-net.js";
import { formatMac, parseMac } from "../net/frame.js";
import { openUplink, parseUplinkSpec } from "../net/uplink.js";
import type { UplinkSpec } from "../net/uplink.js";
import {
  ExitCode,
  UsageError,
  isUsageError,
  reportUsageError,
  controlPathFor,
  defaultSocketPath,
  ensurePrivateDir,
  stderrLogger,
} from "./common.js";
import type { CliIo, StatsSnapshot } from "./common.js";

/** The line written to stderr once every port is serving (tests wait for it). */
export const READY_LINE = "vhostkit switch: ready";

/** Usage text of `vhostkit switch`. */
export const SWITCH_USAGE = `usage: vhostkit switch [options]

Serve a virtual Ethernet switch: each --socket is a vhost-user-net port for one VM.
With no --socket it serves one port at $XDG_RUNTIME_DIR/vhostkit/vm0.sock (or
/tmp/vhostkit/vm0.sock) and prints the QEMU command line that attaches a VM to it.

options:
  --socket PATH     serve a vhost-user port on PATH (repeatable, one port each)
  --client          connect to the sockets (QEMU -chardev ...,server=on) instead of
                    listening; reconnect when QEMU goes away
  --queues N        queue pairs per port, 1..${MAX_QUEUE_PAIRS} (default 1; QEMU: queues=N, mq=on)
  --mac MAC         the guest MAC of each port, in --socket order (repeatable, optional)
  --mtu N           offer VIRTIO_NET_F_MTU with this MTU, 68..65535 (QEMU: host_mtu=N)
  --uplink SPEC     tap:NAME, or vxlan:vni=N,local=ADDR,remote=ADDR[,remote=...][,port=P]
                    [,dstport=P][,dev=IFNAME][,learn=remotes|any] (repeatable; learn=any
                    learns VTEPs from any sender, not only the remotes)
  --control PATH    statistics socket for \`vhostkit stats\` (default: <first socket>.ctl)
  --ageing SECONDS  forget a MAC not seen for this long (default 300)
  --busy-poll US    keep polling a port's rings until idle for US microseconds, 1..1000,
                    instead of waiting for kicks (spends a core for latency; default off)
  --state-timeout MS
                    a device-state transfer (migration) not ended after MS milliseconds
                    fails and its fd is closed, 1..${MAX_STATE_TIMEOUT_MS} (default 60000)
  --request-backlog N,BYTES,FDS
                    close a connection with more requests waiting than N, more
                    than BYTES of payload or FDS fds (default ${DEFAULT_REQUEST_BACKLOG.requests},${DEFAULT_REQUEST_BACKLOG.bytes},${DEFAULT_REQUEST_BACKLOG.fds};
                    at least 1,${MAX_PAYLOAD_SIZE},${MAX_FDS})
  --print-qemu      print the QEMU command line for every port
  --verbose         debug logs
  --help            this text
`;

/** What the command line of `vhostkit switch` asks for. */
export interface SwitchCommandOptions {
  sockets: string[];
  /** true when no --socket was given (the default port) */
  defaultPort: boolean;
  client: boolean;
  queues: number;
  /** one per socket, or fewer (the rest have none) */
  macs: string[];
  /** the MTU offered to the guests, or null (no VIRTIO_NET_F_MTU) */
  mtu: number | null;
  uplinks: string[];
  control: string;
  ageingMs: number;
  /** busy polling of every port (microseconds), or 0 (off) */
  busyPollMicros: number;
  /** device-state transfer timeout (ms), or null (the default) */
  stateTimeoutMs: number | null;
  /** the bounds of the requests waiting on a connection, or null (the default) */
  requestBacklog: { requests: number; bytes: number; fds: number } | null;
  printQemu: boolean;
  verbose: boolean;
  help: boolean;
}

/**
 * Parse the arguments of `vhostkit switch`.
 * @param argv the arguments after `switch`
 * @param env the environment (for the default socket path)
 * @returns the options
 * @throws UsageError naming the option and the value
 */
export function parseSwitchArgs(
  argv: string[],
  env: Readonly<Record<string, string | undefined>>,
): SwitchCommandOptions {
  let v;
  try {
    v = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        socket: { type: "string", multiple: true },
        client: { type: "boolean" },
        queues: { type: "string" },
        mac: { type: "string", multiple: true },
        mtu: { type: "string" },
        uplink: { type: "string", multiple: true },
        control: { type: "string" },
        ageing: { type: "string" },
        "busy-poll": { type: "string" },
        "state-timeout": { type: "string" },
        "request-backlog": { type: "string" },
        "print-qemu": { type: "boolean" },
        verbose: { type: "boolean", short: "v" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
  } catch (err) {
    if (isUsageError(err)) throw new UsageError((err as Error).message);
    throw err;
  }
  const given = v.socket ?? [];
  for (const s of given) if (s === "") throw new UsageError("--socket: empty path");
  const dup = given.find((s, i) => given.indexOf(s) !== i);
  if (dup !== undefined) throw new UsageError(`--socket ${dup} given twice`);
  const sockets = given.length > 0 ? given : [defaultSocketPath(env)];
  const qText = v.queues ?? "1";
  if (!/^\d+$/.test(qText) || Number(qText) < 1 || Number(qText) > MAX_QUEUE_PAIRS) {
    throw new UsageError(`--queues must be an integer in 1..${MAX_QUEUE_PAIRS} (got ${qText})`);
  }
  const macs = v.mac ?? [];
  if (macs.length > sockets.length) {
    throw new UsageError(`${macs.length} --mac for ${sockets.length} --socket`);
  }
  for (const m of macs) {
    let bytes: Uint8Array;
    try {
      bytes = parseMac(m);
    } catch {
      throw new UsageError(`--mac ${m}: not a MAC address (like 52:54:00:12:34:56)`);
    }
    if (((bytes[0] as number) & 1) !== 0) throw new UsageError(`--mac ${m}: a multicast MAC`);
  }
  const mText = v.mtu;
  if (
    mText !== undefined &&
    (!/^\d+$/.test(mText) || Number(mText) < 68 || Number(mText) > 65535)
  ) {
    throw new UsageError(`--mtu must be an integer in 68..65535 (got ${mText})`);
  }
  const aText = v.ageing ?? "300";
  if (!/^\d+(\.\d+)?$/.test(aText) || !(Number(aText) >= 0.001)) {
    throw new UsageError(`--ageing must be a number of seconds >= 0.001 (got ${aText})`);
  }
  const bText = v["busy-poll"] ?? "0";
  if (
    !/^\d+$/.test(bText) ||
    (v["busy-poll"] !== undefined && (Number(bText) < 1 || Number(bText) > 1000))
  ) {
    throw new UsageError(`--busy-poll must be an integer in 1..1000 microseconds (got ${bText})`);
  }
  const tText = v["state-timeout"];
  if (
    tText !== undefined &&
    (!/^\d+$/.test(tText) || Number(tText) < 1 || Number(tText) > MAX_STATE_TIMEOUT_MS)
  ) {
    throw new UsageError(
      `--state-timeout must be an integer in 1..${MAX_STATE_TIMEOUT_MS} milliseconds (got ${tText})`,
    );
  }
  const rText = v["request-backlog"];
  let requestBacklog: { requests: number; bytes: number; fds: number } | null = null;
  if (rText !== undefined) {
    const m = /^(\d+),(\d+),(\d+)$/.exec(rText);
    const least = `${1},${MAX_PAYLOAD_SIZE},${MAX_FDS}`;
    if (!m) {
      throw new UsageError(
        `--request-backlog must be N,BYTES,FDS, at least ${least} (got ${rText})`,
      );
    }
    requestBacklog = { requests: Number(m[1]), bytes: Number(m[2]), fds: Number(m[3]) };
    try {
      checkSessionLimits("--request-backlog", { requestBacklog });
    } catch (err) {
      throw new UsageError(
        `--request-backlog ${rText}: ${(err as Error).message.replace(/^[^:]*: requestBacklog\./, "")}`,
      );
    }
  }
  if (v.control === "") throw new UsageError("--control: empty path");
  return {
    sockets,
    defaultPort: given.length === 0,
    client: v.client ?? false,
    queues: Number(qText),
    macs: macs.map((m) => formatMac(parseMac(m))),
    mtu: mText === undefined ? null : Number(mText),
    uplinks: v.uplink ?? [],
    control: v.control ?? controlPathFor(sockets[0] as string),
    ageingMs: Math.round(Number(aText) * 1000),
    busyPollMicros: Number(bText),
    stateTimeoutMs: tText === undefined ? null : Number(tText),
    requestBacklog,
    printQemu: v["print-qemu"] ?? false,
    verbose: v.verbose ?? false,
    help: v.help ?? false,
  };
}

/**
 * The QEMU command line that attaches a VM to a port: guest RAM in a shared memfd (vhost-user
 * needs the back-end to map it), a socket chardev, a vhost-user netdev and a virtio-net-pci
 * device (with `mq=on` and enough vectors for several queue pairs).
 * @param o the port's socket, mode (client: QEMU must listen), queue pairs and MAC; `id`
 *   numbers the QEMU objects
 * @returns the command line, one option per line
 */
export function qemuCommandLine(o: {
  socket: string;
  client: boolean;
  queues: number;
  mac: string;
  id?: number;
  mtu?: number | null;
}): string {
  const n = o.id ?? 0;
  // `reconnect=1` (seconds) is the spelling of QEMU 7.2, the version tested here; newer QEMU
  // (9.2 on) deprecates it for `reconnect-ms=1000`.
  const chardev = o.client
    ? `socket,id=chr${n},path=${o.socket},server=on,wait=off`
    : `socket,id=chr${n},path=${o.socket},reconnect=1`;
  const mq =
    (o.queues > 1 ? `,mq=on,vectors=${2 * o.queues + 2}` : "") +
    (o.mtu !== undefined && o.mtu !== null ? `,host_mtu=${o.mtu}` : "");
  return [
    "qemu-system-x86_64 -machine q35,accel=kvm:tcg -cpu max -smp 2 -m 1G",
    `  -object memory-backend-memfd,id=mem${n},size=1G,share=on -numa node,memdev=mem${n}`,
    `  -chardev ${chardev}`,
    `  -netdev vhost-user,id=net${n},chardev=chr${n},queues=${o.queues}`,
    `  -device virtio-net-pci,netdev=net${n},mac=${o.mac}${mq}`,
    "  -drive file=DISK.img,if=virtio -nographic",
  ].join(" \\\n");
}

/** Remove a socket file nobody listens on any more; refuse one that is alive. */
async function removeStaleSocket(path: string, what: string): Promise<void> {
  try {
    if (!lstatSync(path).isSocket()) throw new Error(`${what} ${path} exists and is not a socket`);
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return;
    throw err;
  }
  const alive = await new Promise<boolean>((resolve) => {
    const c = createConnection(path);
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
  if (alive) throw new Error(`${what} ${path} is in use (is another switch running?)`);
  unlinkSync(path);
}

async function listenControl(
  path: string,
  snapshot: () => StatsSnapshot,
  log: Logger,
): Promise<Server> {
  await removeStaleSocket(path, "control socket");
  const srv = createServer((c) => {
    c.on("error", (err) => log.debug(`control: ${err.message}`));
    let text: string;
    try {
      text = JSON.stringify(snapshot()) + "\n";
    } catch (err) {
      text = JSON.stringify({ error: (err as Error).message }) + "\n";
    }
    c.end(text);
  });
  await new Promise<void>((resolve, reject) => {
    srv.once("error", reject);
    srv.listen(path, () => {
      srv.off("error", reject);
      resolve();
    });
  });
  srv.on("error", (err) => log.warn(`control socket ${path}: ${err.message}`));
  return srv;
}

function waitForStop(
  log: Logger,
  signal: AbortSignal | undefined,
  stop: AbortController,
): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = (why: string | null): void => {
      process.off("SIGINT", onInt);
      process.off("SIGTERM", onTerm);
      signal?.removeEventListener("abort", onAbort);
      stop.signal.removeEventListener("abort", onStop);
      if (why !== null) log.info(`${why}: shutting down`);
      if (!stop.signal.aborted) stop.abort();
      resolve();
    };
    const onInt = (): void => done("SIGINT");
    const onTerm = (): void => done("SIGTERM");
    const onAbort = (): void => done("stop requested");
    const onStop = (): void => done(null);
    process.on("SIGINT", onInt);
    process.on("SIGTERM", onTerm);
    stop.signal.addEventListener("abort", onStop);
    if (signal?.aborted) onAbort();
    else signal?.addEventListener("abort", onAbort);
  });
}

/** A port's logger: every line names the port (ring errors, say, do not by themselves). */
function portLogger(log: Logger, path: string): Logger {
  const tag = (m: string): string => (m.startsWith(path) ? m : `${path}: ${m}`);
  return {
    debug: (m) => log.debug(tag(m)),
    info: (m) => log.info(tag(m)),
    warn: (m) => log.warn(tag(m)),
    error: (m) => log.error(tag(m)),
  };
}

interface OpenUplink {
  name: string;
  close(): void;
}

/**
 * Run `vhostkit switch` until SIGINT, SIGTERM or `signal`.
 * @param argv the arguments after `switch`
 * @param io output streams and environment
 * @param signal stops the switch when aborted (for embedding; the CLI uses signals)
 * @returns the exit status: 0 after a clean shutdown, 1 when it could not start, 2 for a bad
 *   command line
 */
export async function runSwitch(argv: string[], io: CliIo, signal?: AbortSignal): Promise<number> {
  let o: SwitchCommandOptions;
  try {
    o = parseSwitchArgs(argv, io.env);
  } catch (err) {
    if (!isUsageError(err)) throw err;
    return reportUsageError(io, "switch", err);
  }
  if (o.help) {
    io.stdout(SWITCH_USAGE);
    return ExitCode.OK;
  }
  const log = stderrLogger(io, "vhostkit switch", o.verbose);

  // Uplinks are parsed before anything is opened, so a bad spec is a usage error.
  const specs: UplinkSpec[] = [];
  for (const text of o.uplinks) {
    try {
      specs.push(parseUplinkSpec(text));
    } catch (err) {
      io.stderr(`vhostkit switch: --uplink ${text}: ${(err as Error).message}\n`);
      return ExitCode.USAGE;
    }
  }
  // Signals are taken from here on, so one during start-up still removes what was created.
  const stop = new AbortController();
  const stopped = waitForStop(log, signal, stop);

  const started = Date.now();
  const sw = new Switch({ logger: log, ageingMs: o.ageingMs });
  const ports: VhostUserPort[] = [];
  const uplinks: OpenUplink[] = [];
  let control: Server | null = null;
  const snapshot = (): StatsSnapshot => ({
    version: 1,
    pid: process.pid,
    uptimeMs: Date.now() - started,
    switch: sw.stats(),
    macTable: sw.macTable(),
    vhostPorts: ports.map((p) => ({
      name: p.device.name,
      socket: p.server.path,
      mode: p.server.client ? "client" : "server",
      connected: p.device.connected,
      mac: p.device.mac,
      queuePairs: p.device.queuePairs,
      activePairs: p.device.state.activePairs,
      features: `0x${p.device.negotiatedFeatures.toString(16)}`,
      featureNames: describeNetFeatures(p.device.negotiatedFeatures),
      pairCounters: p.device.pairCounters.map((c) => ({ ...c })),
    })),
    uplinks: uplinks.map((u) => u.name),
  });
  const closeAll = (): void => {
    if (control !== null) {
      control.close();
      try {
        unlinkSync(o.control);
      } catch {
        // already removed by close()
      }
      control = null;
    }
    for (const u of uplinks.splice(0)) {
      try {
        u.close();
      } catch (err) {
        log.warn(`uplink ${u.name}: close: ${(err as Error).message}`);
      }
    }
    for (const p of ports.splice(0)) p.close();
    sw.close();
  };

  try {
    if (o.defaultPort) ensurePrivateDir(dirname(o.sockets[0] as string));
    o.sockets.forEach((path, i) => {
      if (stop.signal.aborted) return;
      const mac = o.macs[i];
      let port: VhostUserPort;
      try {
        port = addVhostUserPort(sw, {
          path,
          client: o.client,
          queuePairs: o.queues,
          logger: portLogger(log, path),
          ...(mac !== undefined ? { mac } : {}),
          ...(o.mtu !== null ? { mtu: o.mtu } : {}),
          ...(o.busyPollMicros > 0 ? { busyPollMicros: o.busyPollMicros } : {}),
          ...(o.stateTimeoutMs !== null ? { stateTimeoutMs: o.stateTimeoutMs } : {}),
          ...(o.requestBacklog !== null ? { requestBacklog: o.requestBacklog } : {}),
        });
      } catch (err) {
        throw new Error(`port ${path}: ${(err as Error).message}`, { cause: err });
      }
      ports.push(port);
      log.info(
        `port ${path}: ${o.client ? "connecting to" : "listening on"} ${path} ` +
          `(${o.queues} queue pair(s)${mac !== undefined ? `, mac ${mac}` : ""})`,
      );
    });
    for (const spec of specs) {
      if (stop.signal.aborted) break;
      const u = await openUplink(sw, spec, log);
      uplinks.push(u);
      log.info(`uplink ${u.name}: open`);
    }
    if (!stop.signal.aborted) control = await listenControl(o.control, snapshot, log);
    log.info(`statistics on ${o.control} (vhostkit stats --control ${o.control})`);
  } catch (err) {
    log.error(`cannot start: ${(err as Error).message}`);
    stop.abort();
    await stopped;
    closeAll();
    return ExitCode.FAILURE;
  }

  if (o.defaultPort || o.printQemu) {
    io.stdout(
      o.sockets
        .map(
          (s, i) =>
            `# attach a VM to ${s}:\n` +
            qemuCommandLine({
              socket: s,
              client: o.client,
              queues: o.queues,
              mac:
                o.macs[i] ?? `52:54:00:12:34:${((0x56 + i) & 0xff).toString(16).padStart(2, "0")}`,
              id: i,
              mtu: o.mtu,
            }) +
            "\n",
        )
        .join(""),
    );
  }
  if (!stop.signal.aborted) io.stderr(`${READY_LINE}\n`);
  await stopped;
  closeAll();
  return ExitCode.OK;
}
