/**
 * A harness for QEMU 7.2 guests (TCG) with vhost-user-net devices: start, wait for the guest's
 * ready marker, run shell commands in the guest over the serial console, talk QMP, migrate.
 *
 * The serial console is QEMU's stdio (`-serial stdio`); QMP is a Unix socket. The command
 * line uses `-nodefaults -display none` rather than `-nographic`: `-nographic` multiplexes the
 * HMP monitor into stdio (Ctrl-A escapes) and `-nodefaults` keeps QEMU from adding a default
 * NIC with user networking. See docs/testing-peers.md and test/peers/guest-image.ts.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, type WriteStream } from "node:fs";
import { lstat, mkdir, mkdtemp, rm } from "node:fs/promises";
import { connect, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { buildGuestImage, GUEST_READY_MARKER, type GuestImage } from "./guest-image.js";
import { checkTestAddress } from "./netns.js";
import { findExecutable, uniqueName } from "./testpmd.js";
import { sleep } from "../helpers.js";

/** One vhost-user-net device of the guest. */
export interface VhostUserNic {
  /** The vhost-user socket path. */
  readonly socketPath: string;
  /**
   * "client" (default): QEMU connects; the back-end must listen before QEMU starts.
   * "server": QEMU listens (`server=on,wait=off`) and still waits at start-up until the
   * back-end connects.
   */
  readonly mode?: "client" | "server";
  /** With mode "client": reconnect every N seconds after the back-end goes away. */
  readonly reconnectS?: number;
  /** Queue pairs; above 1 sets `queues=N` on the netdev and `mq=on` on the device. */
  readonly queues?: number;
  /** The MAC address, default 52:54:00:12:34:<index+1>. */
  readonly mac?: string;
  /** `guest_announce=off`: QEMU then sends SEND_RARP to the back-end after migration. */
  readonly guestAnnounceOff?: boolean;
  /** Address(es) of this interface in the guest, CIDR, e.g. ["192.0.2.1/24"]. */
  readonly guestAddrs?: readonly string[];
  /** Extra `-device virtio-net-pci` properties, e.g. ["rx_queue_size=1024"]. */
  readonly deviceProps?: readonly string[];
}

/** Options for {@link startGuest}. */
/**
 * KiB added to every guest's RAM by default. QEMU 7.2 (Debian 12) loses guest stores during a
 * live migration under TCG when a RAM block's size is a multiple of 256 KiB: the fast path of
 * `cpu_physical_memory_sync_dirty_bitmap()` clears dirty bits without bringing the TCG TLB up to
 * date, so later stores through the TLB set no dirty bit and the destination gets a stale page
 * (fixed upstream for QEMU 9.0, "physmem: Fix migration dirty bitmap coherency with TCG memory
 * access", Message-ID 20240219061731.232570-1-npiggin@gmail.com). Seen here as a differing guest
 * kernel stack page and a destination guest crash in test/qemu-migration-rx.test.ts. A size that
 * is not such a multiple takes the slow path, which resets the TLB.
 */
export const TCG_DIRTY_SYNC_SLACK_KIB = 8;

export interface GuestOptions {
  /** vhost-user-net devices (eth0, eth1, ... in this order); none for a guest without NIC. */
  readonly nics?: readonly VhostUserNic[];
  /** Guest memory in MiB, default 256. */
  readonly memMiB?: number;
  /**
   * KiB added to the guest RAM, default {@link TCG_DIRTY_SYNC_SLACK_KIB}: the workaround for
   * QEMU 7.2's lost TCG writes during a migration (see there). 0 gives exactly `memMiB`.
   */
  readonly ramSlackKiB?: number;
  /** vCPUs, default 1. */
  readonly smp?: number;
  /** `-incoming` URI for a migration destination, e.g. "tcp:127.0.0.1:4444" or "defer". */
  readonly incoming?: string;
  /** A prebuilt image, default {@link buildGuestImage}(). */
  readonly image?: GuestImage;
  /** Extra kernel command-line words. */
  readonly extraAppend?: readonly string[];
  /** Extra QEMU arguments. */
  readonly extraArgs?: readonly string[];
  /** Directory for the log and the QMP socket, default a fresh temp dir. */
  readonly workDir?: string;
  /** A label in file names. */
  readonly name?: string;
  /** The QEMU binary, default qemu-system-x86_64 on PATH, else /usr/bin/qemu-system-x86_64. */
  readonly binary?: string;
}

/** The result of {@link Guest.run}. */
export interface RunResult {
  /** stdout and stderr of the command, "\r" removed. */
  readonly output: string;
  /** The exit status (137 when the guest-side timeout killed it). */
  readonly status: number;
}

/** The state of a migration from `query-migrate`. */
export interface MigrationInfo {
  readonly status: string;
  /** Total time in ms (when completed). */
  readonly totalTimeMs?: number;
  /** Downtime in ms (when completed). */
  readonly downtimeMs?: number;
  readonly setupTimeMs?: number;
  /** RAM bytes transferred. */
  readonly ramTransferred?: number;
  readonly errorDesc?: string;
}

/** A JSON value as returned by QMP. */
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** An event QEMU sent on QMP. */
export interface QmpEvent {
  readonly event: string;
  readonly data?: Json;
}

function isObj(v: Json | undefined): v is { [k: string]: Json } {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A minimal QMP client over a Unix socket: capabilities negotiation, commands, events. */
export class QmpClient {
  private buf = "";
  private pending: Array<{ resolve: (v: Json) => void; reject: (e: Error) => void }> = [];
  private closedErr: Error | undefined;
  /** Events received so far (the harness never drops them). */
  readonly events: QmpEvent[] = [];

  private constructor(private readonly sock: Socket) {
    sock.setEncoding("utf8");
    sock.on("data", (d: string) => this.onData(d));
    const fail = (e: Error): void => {
      this.closedErr = e;
      for (const p of this.pending.splice(0)) p.reject(e);
    };
    sock.on("error", fail);
    sock.on("close", () => fail(new Error("QMP connection closed")));
  }

  /**
   * Connect, read the greeting and negotiate capabilities, retrying until `timeoutMs`.
   * @param path the QMP socket path
   * @param timeoutMs the bound
   * @returns a ready client
   * @throws Error naming the socket on timeout
   */
  static async connect(path: string, timeoutMs: number): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    let lastErr: Error | undefined;
    while (Date.now() < deadline) {
      let c: QmpClient | undefined;
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once("connect", () => resolve(s));
          s.once("error", reject);
        });
        c = new QmpClient(sock);
        const greeting = c.nextMessage();
        await Promise.race([
          greeting,
          sleep(Math.max(1, deadline - Date.now())).then(() => {
            throw new Error(`QMP ${path}: no greeting`);
          }),
        ]);
        await c.execute("qmp_capabilities");
        return c;
      } catch (e) {
        c?.close();
        lastErr = e as Error;
        await sleep(100);
      }
    }
    throw new Error(`QMP ${path}: cannot connect within ${timeoutMs} ms: ${lastErr?.message}`);
  }

  private greetingWaiter: ((v: Json) => void) | undefined;

  private nextMessage(): Promise<Json> {
    return new Promise((resolve) => {
      this.greetingWaiter = resolve;
    });
  }

  private onData(d: string): void {
    this.buf += d;
    for (let i = this.buf.indexOf("\n"); i >= 0; i = this.buf.indexOf("\n")) {
      const line = this.buf.slice(0, i).trim();
      this.buf = this.buf.slice(i + 1);
      if (line === "") continue;
      let msg: Json;
      try {
        msg = JSON.parse(line) as Json;
      } catch {
        continue;
      }
      if (!isObj(msg)) continue;
      if ("QMP" in msg) {
        const w = this.greetingWaiter;
        this.greetingWaiter = undefined;
        w?.(msg);
      } else if ("event" in msg) {
        const ev = msg["event"];
        this.events.push({ event: typeof ev === "string" ? ev : "?", data: msg["data"] ?? null });
      } else if ("return" in msg || "error" in msg) {
        const p = this.pending.shift();
        if (p === undefined) continue;
        if ("error" in msg) {
          const err = msg["error"];
          const desc = isObj(err) ? String(err["desc"]) : JSON.stringify(err);
          p.reject(new Error(desc));
        } else {
          p.resolve(msg["return"] ?? null);
        }
      }
    }
  }

  /**
   * Execute one QMP command.
   * @param command e.g. "query-status"
   * @param args the command's arguments
   * @returns the "return" value
   * @throws Error with QEMU's error description
   */
  execute(command: string, args?: { [k: string]: Json }): Promise<Json> {
    if (this.closedErr !== undefined) return Promise.reject(this.closedErr);
    return new Promise((resolve, reject) => {
      this.pending.push({
        resolve,
        reject: (e) => reject(new Error(`QMP ${command}: ${e.message}`)),
      });
      const msg: { [k: string]: Json } = { execute: command };
      if (args !== undefined) msg["arguments"] = args;
      this.sock.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Close the connection. */
  close(): void {
    this.sock.destroy();
  }
}

/** A running QEMU guest. Create with {@link startGuest}; always {@link Guest.kill} it. */
export class Guest {
  /** Log of QEMU's stderr, the serial console and every command sent. */
  readonly logPath: string;
  /** The QMP socket path. */
  readonly qmpPath: string;
  /** The QEMU command line. */
  readonly argv: readonly string[];

  private readonly child: ChildProcess;
  private readonly logFile: WriteStream;
  private console = "";
  private stderrText = "";
  private nextId = 1;
  private waiters: Array<() => void> = [];
  private queue: Promise<unknown> = Promise.resolve();
  private exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exitPromise: Promise<void>;
  private qmpClient: QmpClient | undefined;
  private killed = false;
  /** Kills QEMU if Node exits without kill() (QEMU does not exit when its stdin closes). */
  private readonly onProcessExit = (): void => {
    if (this.exited === undefined) this.child.kill("SIGKILL");
  };

  /** @internal use {@link startGuest}. */
  constructor(
    argv: readonly string[],
    logPath: string,
    qmpPath: string,
    private readonly workDir: string,
    private readonly ownsWorkDir: boolean,
    private readonly serverSockets: readonly string[] = [],
  ) {
    this.argv = argv;
    this.logPath = logPath;
    this.qmpPath = qmpPath;
    this.logFile = createWriteStream(logPath);
    this.logFile.write(`$ ${argv.join(" ")}\n`);
    this.child = spawn(argv[0] ?? "qemu-system-x86_64", argv.slice(1), {
      stdio: ["pipe", "pipe", "pipe"],
    });
    this.child.stdin?.on("error", () => undefined);
    this.child.stdout?.on("data", (d: Buffer) => {
      const s = d.toString("utf8");
      this.console += s;
      this.logFile.write(s);
      this.wake();
    });
    this.child.stderr?.on("data", (d: Buffer) => {
      const t = d.toString("utf8");
      this.stderrText = (this.stderrText + t).slice(-4000);
      this.logFile.write(`[qemu stderr] ${t}`);
    });
    process.on("exit", this.onProcessExit);
    this.exitPromise = new Promise((resolve) => {
      this.child.on("exit", (code, signal) => {
        this.exited = { code, signal };
        this.logFile.write(`\n[harness] qemu exited code=${code} signal=${signal}\n`);
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

  /** The QEMU process id. */
  get pid(): number | undefined {
    return this.child.pid;
  }

  /** Everything the guest wrote on its serial console so far. */
  get consoleOutput(): string {
    return this.console;
  }

  /** True once QEMU has exited. */
  get hasExited(): boolean {
    return this.exited !== undefined;
  }

  /**
   * The last lines of the console, for failure messages.
   * @param lines how many, default 40
   * @returns the tail
   */
  tail(lines = 40): string {
    const con = this.console.split("\n").slice(-lines).join("\n");
    return this.stderrText === "" ? con : `${con}\n[qemu stderr]\n${this.stderrText}`;
  }

  private wake(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w();
  }

  private async waitFor(pred: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!pred()) {
      if (this.exited !== undefined) {
        throw new Error(
          `qemu exited (code=${this.exited.code} signal=${this.exited.signal}) while waiting for ${what}; log ${this.logPath}\n${this.tail()}`,
        );
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `qemu: timeout after ${timeoutMs} ms waiting for ${what}; log ${this.logPath}\n${this.tail()}`,
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

  /**
   * Wait until QEMU listens on the socket of every NIC in "server" mode, so that a back-end
   * in client mode can be started (QEMU waits for it before it runs the guest).
   * @param timeoutMs the bound, default 10 s
   * @throws Error naming the socket on timeout or exit
   */
  async listening(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (const path of this.serverSockets) {
      for (;;) {
        const st = await lstat(path).catch(() => undefined);
        if (st?.isSocket() === true) break;
        if (this.exited !== undefined || Date.now() > deadline) {
          throw new Error(
            `qemu: vhost-user socket ${path} not listening after ${timeoutMs} ms; log ${this.logPath}`,
          );
        }
        await sleep(50);
      }
    }
  }

  /**
   * Wait for the guest's ready marker (modules loaded, addresses set, command loop running).
   * @param timeoutMs the bound, default 30 s (a TCG boot takes about 4 s)
   * @returns the interface names the guest listed with the marker
   * @throws Error with the console tail on timeout or exit
   */
  async ready(timeoutMs = 30_000): Promise<string[]> {
    await this.waitFor(
      () => new RegExp(`${GUEST_READY_MARKER}[^\\n]*\\n`).test(this.console),
      timeoutMs,
      "the guest ready marker",
    );
    const m = new RegExp(`${GUEST_READY_MARKER}([^\\n]*)\\n`).exec(this.console);
    return (m?.[1] ?? "")
      .trim()
      .split(/\s+/)
      .filter((x) => x !== "");
  }

  /**
   * Run a shell command in the guest (busybox `sh -c`) through the serial console. Commands
   * are serialised. The guest kills the command after `timeoutMs` (rounded up to seconds).
   * The guest must be ready ({@link Guest.ready}); after an incoming migration, the
   * destination's console continues the source's command loop.
   * @param cmd one line of shell, at most 3000 characters
   * @param timeoutMs the bound, default 15 s
   * @returns the output and exit status
   * @throws Error when the command has a newline, is too long, or no answer comes in time
   */
  run(cmd: string, timeoutMs = 15_000): Promise<RunResult> {
    if (cmd.includes("\n") || cmd.includes("\r")) {
      return Promise.reject(
        new Error(`guest.run: the command must be one line, got ${JSON.stringify(cmd)}`),
      );
    }
    if (cmd.length > 3000) {
      return Promise.reject(
        new Error(`guest.run: command too long for the tty line (${cmd.length} chars)`),
      );
    }
    const job = async (): Promise<RunResult> => {
      const id = this.nextId++;
      const guestTimeoutS = Math.max(1, Math.ceil(timeoutMs / 1000));
      const start = this.console.length;
      const begin = `@@VK-BEGIN ${id}\n`;
      const endRe = new RegExp(`@@VK-END ${id} (\\d+)\\r?\\n`);
      this.logFile.write(`\n[harness] run #${id}: ${cmd}\n`);
      this.child.stdin?.write(`${id}:${guestTimeoutS}:${cmd}\n`);
      const seg = (): string => this.console.slice(start).replace(/\r/g, "");
      await this.waitFor(() => endRe.test(seg()), timeoutMs + 5_000, `the answer to "${cmd}"`);
      const s = seg();
      const b = s.indexOf(begin);
      const e = endRe.exec(s);
      if (b < 0 || e === null) {
        throw new Error(`guest.run: malformed answer to "${cmd}": ${JSON.stringify(s)}`);
      }
      return { output: s.slice(b + begin.length, e.index), status: Number(e[1]) };
    };
    const p = this.queue.then(job, job);
    this.queue = p.catch(() => undefined);
    return p;
  }

  /**
   * Wait for text on the console (e.g. a kernel message).
   * @param re the pattern
   * @param timeoutMs the bound
   */
  async waitConsole(re: RegExp, timeoutMs: number): Promise<void> {
    await this.waitFor(() => re.test(this.console), timeoutMs, `console ${re}`);
  }

  /** The QMP client, connected on first use. */
  private async qmpc(): Promise<QmpClient> {
    if (this.qmpClient === undefined)
      this.qmpClient = await QmpClient.connect(this.qmpPath, 10_000);
    return this.qmpClient;
  }

  /**
   * Execute a QMP command.
   * @param command e.g. "query-status"
   * @param args its arguments
   * @returns the "return" value
   * @throws Error with QEMU's description
   */
  async qmp(command: string, args?: { [k: string]: Json }): Promise<Json> {
    return (await this.qmpc()).execute(command, args);
  }

  /** The QMP events received so far (connect first with any {@link Guest.qmp} call). */
  async qmpEvents(): Promise<readonly QmpEvent[]> {
    return (await this.qmpc()).events;
  }

  /**
   * Run an HMP command through QMP (`human-monitor-command`).
   * @param commandLine e.g. "info migrate"
   * @returns the text QEMU printed
   */
  async hmp(commandLine: string): Promise<string> {
    const r = await this.qmp("human-monitor-command", { "command-line": commandLine });
    return typeof r === "string" ? r : JSON.stringify(r);
  }

  /**
   * The migration state (`query-migrate`).
   * @returns status, total time, downtime
   */
  async migrationInfo(): Promise<MigrationInfo> {
    const r = await this.qmp("query-migrate");
    if (!isObj(r)) return { status: "none" };
    const n = (v: Json | undefined): number | undefined => (typeof v === "number" ? v : undefined);
    const ram = r["ram"];
    return {
      status: typeof r["status"] === "string" ? r["status"] : "none",
      totalTimeMs: n(r["total-time"]),
      downtimeMs: n(r["downtime"]),
      setupTimeMs: n(r["setup-time"]),
      ramTransferred: isObj(ram) ? n(ram["transferred"]) : undefined,
      errorDesc: typeof r["error-desc"] === "string" ? r["error-desc"] : undefined,
    };
  }

  /**
   * Migrate this (source) guest to `uri` and wait until the migration ends.
   * @param uri e.g. "tcp:127.0.0.1:4444" (the destination runs with `incoming`)
   * @param timeoutMs the bound, default 60 s
   * @returns the final migration info (status "completed" on success)
   * @throws Error when it fails, is cancelled, or does not end in time
   */
  async migrate(uri: string, timeoutMs = 60_000): Promise<MigrationInfo> {
    await this.qmp("migrate", { uri });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.migrationInfo();
      if (info.status === "completed") return info;
      if (info.status === "failed" || info.status === "cancelled") {
        throw new Error(`migrate to ${uri}: ${info.status}: ${info.errorDesc ?? "no description"}`);
      }
      if (Date.now() > deadline) {
        throw new Error(`migrate to ${uri}: still ${info.status} after ${timeoutMs} ms`);
      }
      await sleep(100);
    }
  }

  /**
   * Wait until QMP `query-status` reports `status` (e.g. "running" on a migration destination).
   * @param status the run state
   * @param timeoutMs the bound
   */
  async waitStatus(status: string, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = await this.qmp("query-status");
      if (isObj(r) && r["status"] === status) return;
      if (Date.now() > deadline) {
        throw new Error(
          `qemu: status still ${JSON.stringify(r)} after ${timeoutMs} ms, want ${status}`,
        );
      }
      await sleep(100);
    }
  }

  /**
   * Stop QEMU: QMP `quit`, then SIGTERM, then SIGKILL, each after `timeoutMs`; removes the
   * work directory if the harness created it. Safe to call twice.
   * @param timeoutMs the wait at each step, default 3 s
   */
  async kill(timeoutMs = 3_000): Promise<void> {
    if (this.killed) return;
    this.killed = true;
    process.off("exit", this.onProcessExit);
    const waitExit = (ms: number): Promise<boolean> =>
      Promise.race([this.exitPromise.then(() => true), sleep(ms).then(() => false)]);
    if (this.exited === undefined) {
      if (this.qmpClient !== undefined) {
        this.qmpClient.execute("quit").catch(() => undefined);
      } else {
        this.child.kill("SIGTERM");
      }
      if (!(await waitExit(timeoutMs))) {
        this.child.kill("SIGTERM");
        if (!(await waitExit(timeoutMs))) {
          this.child.kill("SIGKILL");
          await waitExit(timeoutMs);
        }
      }
    }
    this.qmpClient?.close();
    this.child.stdin?.destroy();
    await new Promise<void>((resolve) => this.logFile.end(resolve));
    if (this.ownsWorkDir) {
      // Keep the log (it lives beside the work dir) but drop sockets.
      await rm(this.workDir, { recursive: true, force: true });
    }
  }
}

/**
 * Parse the text of HMP `info migrate` (status, total time, downtime, setup, transferred RAM).
 * @param text the HMP output
 * @returns the fields found; status "none" when there is no "Migration status" line
 */
export function parseInfoMigrate(text: string): MigrationInfo {
  const field = (re: RegExp): number | undefined => {
    const m = re.exec(text);
    return m?.[1] === undefined ? undefined : Number(m[1]);
  };
  const kbytes = field(/transferred ram:\s*(\d+) kbytes/);
  return {
    status: /Migration status:\s*(\S+)/.exec(text)?.[1] ?? "none",
    totalTimeMs: field(/total time:\s*(\d+) ms/),
    downtimeMs: field(/downtime:\s*(\d+) ms/),
    setupTimeMs: field(/setup:\s*(\d+) ms/),
    ramTransferred: kbytes === undefined ? undefined : kbytes * 1024,
  };
}

/**
 * A TCP port on 127.0.0.1 that was free a moment ago (for `-incoming tcp:127.0.0.1:PORT`).
 * @returns the port number
 */
export function freeTcpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const a = srv.address();
      const port = typeof a === "object" && a !== null ? a.port : 0;
      srv.close(() => (port > 0 ? resolve(port) : reject(new Error("freeTcpPort: no port"))));
    });
  });
}

/**
 * Build the QEMU command line (exported for logs and docs).
 * @param opts the guest options
 * @param image kernel and initrd
 * @param qmpPath the QMP socket
 * @param binary the QEMU binary
 * @returns argv, binary first
 */
export function qemuArgs(
  opts: GuestOptions,
  image: GuestImage,
  qmpPath: string,
  binary: string,
): string[] {
  const memKiB = (opts.memMiB ?? 256) * 1024 + (opts.ramSlackKiB ?? TCG_DIRTY_SYNC_SLACK_KIB);
  const nics = opts.nics ?? [];
  // Every guest address must be in a documentation or unique-local range (netns.ts).
  const ips = nics.map(
    (n) =>
      (n.guestAddrs ?? [])
        .map((a) => {
          checkTestAddress(a);
          return a;
        })
        .join("+") || "-",
  );
  const append = [
    "console=ttyS0",
    "loglevel=1",
    "panic=-1",
    "nokaslr",
    ...(nics.length > 0 ? [`vk.ip=${ips.join(",")}`] : []),
    ...(opts.extraAppend ?? []),
  ];
  const argv = [
    binary,
    "-accel",
    "tcg",
    "-m",
    `${memKiB}K`,
    "-smp",
    String(opts.smp ?? 1),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    image.kernel,
    "-initrd",
    image.initrd,
    "-append",
    append.join(" "),
    "-object",
    `memory-backend-memfd,id=mem,size=${memKiB}K,share=on`,
    "-numa",
    "node,memdev=mem",
    "-serial",
    "stdio",
    "-qmp",
    `unix:${qmpPath},server=on,wait=off`,
  ];
  nics.forEach((n, i) => {
    const q = n.queues ?? 1;
    let chardev = `socket,id=vkc${i},path=${n.socketPath}`;
    if (n.mode === "server") chardev += ",server=on,wait=off";
    else if (n.reconnectS !== undefined) chardev += `,reconnect=${n.reconnectS}`;
    const mac = n.mac ?? `52:54:00:12:34:${(i + 1).toString(16).padStart(2, "0")}`;
    const dev = [`virtio-net-pci`, `netdev=vkn${i}`, `mac=${mac}`, `vectors=0`];
    if (q > 1) dev.push("mq=on");
    if (n.guestAnnounceOff === true) dev.push("guest_announce=off");
    dev.push(...(n.deviceProps ?? []));
    argv.push(
      "-chardev",
      chardev,
      "-netdev",
      `vhost-user,id=vkn${i},chardev=vkc${i}${q > 1 ? `,queues=${q}` : ""}`,
      "-device",
      dev.join(","),
    );
  });
  if (opts.incoming !== undefined) argv.push("-incoming", opts.incoming);
  argv.push(...(opts.extraArgs ?? []));
  return argv;
}

/**
 * Start a QEMU guest (TCG) with the harness's tiny Linux image and the given vhost-user NICs.
 * Await {@link Guest.ready} (not on an `incoming` destination: it continues the source's
 * console), and always {@link Guest.kill} it in a finally.
 * @param opts NICs, memory, incoming migration, extra arguments
 * @returns the running guest
 * @throws Error when qemu-system-x86_64 or the guest image cannot be found
 */
export async function startGuest(opts: GuestOptions = {}): Promise<Guest> {
  const binary =
    opts.binary ?? findExecutable("qemu-system-x86_64", ["/usr/bin/qemu-system-x86_64"]);
  const image = opts.image ?? (await buildGuestImage());
  const name = uniqueName(`vk-${opts.name ?? "guest"}`);
  const logDir = join(tmpdir(), "vhostkit-peers");
  await mkdir(logDir, { recursive: true });
  const ownsWorkDir = opts.workDir === undefined;
  const workDir = opts.workDir ?? (await mkdtemp(join(tmpdir(), `${name}-`)));
  const qmpPath = join(workDir, `${name}.qmp`);
  const argv = qemuArgs(opts, image, qmpPath, binary);
  const serverSockets = (opts.nics ?? [])
    .filter((n) => n.mode === "server")
    .map((n) => n.socketPath);
  return new Guest(
    argv,
    join(logDir, `qemu-${name}.log`),
    qmpPath,
    workDir,
    ownsWorkDir,
    serverSockets,
  );
}
