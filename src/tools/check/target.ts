/**
 * The back-end under check: how to get a fresh connection to it (connect to its socket, or
 * listen for a back-end in client mode), restarting it with a given command when it serves one
 * front-end and exits (libvhost-user devices such as virtiofsd), and what became of it.
 */
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { lstatSync, unlinkSync } from "node:fs";
import { isNativeError, native } from "../../native.js";
import { VhostUserFrontend } from "../../frontend/frontend.js";

/** How to reach the back-end. */
export interface TargetOptions {
  /** the back-end's socket (server-mode back-end), or null with `listen` */
  socket: string | null;
  /** listen here for a back-end in client mode instead */
  listen?: string | undefined;
  /** shell command that starts the back-end (again) when its socket does not answer */
  spawn?: string | undefined;
  /** give up on a connection after this long (ms, default 5000) */
  connectTimeoutMs?: number | undefined;
  /** reply timeout of each request (ms, default 3000) */
  requestTimeoutMs?: number | undefined;
}

/** How a spawned back-end ended. */
export interface PeerExit {
  code: number | null;
  signal: string | null;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function isSocket(path: string): boolean {
  try {
    return lstatSync(path).isSocket();
  } catch {
    return false;
  }
}

/**
 * Connections to one back-end. Each check opens its own and closes it; a back-end that serves
 * one front-end and exits is started again with the `spawn` command.
 */
export class CheckTarget {
  /** what is checked: the socket path, or `listen:PATH` */
  readonly name: string;
  readonly #opts: TargetOptions;
  #child: ChildProcess | null = null;
  /** every exit of a spawned back-end, in order */
  readonly exits: PeerExit[] = [];
  /** how many times the back-end was started with the spawn command */
  spawned = 0;
  #lastExit: PeerExit | null = null;

  /**
   * @param opts socket or listen path, spawn command, timeouts
   */
  constructor(opts: TargetOptions) {
    this.#opts = opts;
    this.name = opts.listen !== undefined ? `listen:${opts.listen}` : (opts.socket ?? "?");
  }

  /** @returns true when checks can open a connection more than once (always, but see spawn) */
  get restartable(): boolean {
    return this.#opts.spawn !== undefined;
  }

  /** @returns the request timeout to use */
  get requestTimeoutMs(): number {
    return this.#opts.requestTimeoutMs ?? 3000;
  }

  /**
   * The exit of the spawned back-end since the last call, if it ended (after a short wait).
   * @param waitMs how long to wait for it to end
   * @returns the exit, or null when it still runs or none was spawned
   */
  async takeExit(waitMs = 300): Promise<PeerExit | null> {
    const deadline = Date.now() + waitMs;
    while (this.#lastExit === null && this.#child !== null && Date.now() < deadline) {
      await sleep(20);
    }
    const e = this.#lastExit;
    this.#lastExit = null;
    return e;
  }

  #startPeer(): void {
    const cmd = this.#opts.spawn;
    if (cmd === undefined) return;
    const sock = this.#opts.socket;
    if (sock !== null && this.#opts.listen === undefined && isSocket(sock)) {
      try {
        unlinkSync(sock);
      } catch {
        // gone
      }
    }
    // Its own process group, so that stop() ends a pipeline the command may be.
    const child = spawn("/bin/sh", ["-c", cmd], { stdio: "ignore", detached: true });
    this.spawned++;
    this.#child = child;
    child.on("exit", (code, signal) => {
      // The rest of its group (e.g. the other side of a pipeline) goes with it.
      if (child.pid !== undefined) {
        try {
          process.kill(-child.pid, "SIGKILL");
        } catch {
          // gone
        }
      }
      const e = { code, signal };
      this.exits.push(e);
      this.#lastExit = e;
      if (this.#child === child) this.#child = null;
    });
  }

  async #connectOnce(timeoutMs: number): Promise<number> {
    const path = this.#opts.socket as string;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      // A back-end that serves one front-end may still be exiting: start the next one once
      // the last one is gone.
      if (this.#child === null && this.#opts.spawn !== undefined) this.#startPeer();
      try {
        return native.unixConnect(path);
      } catch (err) {
        const code = isNativeError(err) ? err.code : "";
        const retriable = code === "ENOENT" || code === "ECONNREFUSED" || code === "EAGAIN";
        if (!retriable || Date.now() > deadline) throw err;
        await sleep(20);
      }
    }
  }

  async #acceptOnce(timeoutMs: number): Promise<number> {
    const path = this.#opts.listen as string;
    if (isSocket(path)) unlinkSync(path);
    const lfd = native.unixListen(path, 1);
    try {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const fd = native.unixAccept(lfd);
        if (fd !== null) return fd;
        if (Date.now() > deadline) {
          throw new Error(`no back-end connected to ${path} within ${timeoutMs} ms`);
        }
        await sleep(10);
      }
    } finally {
      native.close(lfd);
      try {
        unlinkSync(path);
      } catch {
        // gone
      }
    }
  }

  /**
   * A connected socket fd to the back-end (the caller owns it). Starts the back-end with the
   * spawn command when it does not answer.
   * @returns the fd
   * @throws Error when no connection can be made in time
   */
  async openFd(): Promise<number> {
    const timeout = this.#opts.connectTimeoutMs ?? 5000;
    if (this.#opts.listen !== undefined) {
      if (this.#child === null && this.#opts.spawn !== undefined) this.#startPeer();
      return this.#acceptOnce(timeout);
    }
    return this.#connectOnce(this.#opts.spawn !== undefined ? timeout : Math.min(timeout, 2000));
  }

  /**
   * A front-end on a fresh connection that answered GET_FEATURES (a back-end that refuses a
   * second front-end while it still tears the last one down is asked again).
   * @returns the front-end; close it when done
   * @throws Error when the back-end does not answer
   */
  async open(): Promise<VhostUserFrontend> {
    let last: unknown = null;
    for (let attempt = 0; attempt < 20; attempt++) {
      const fd = await this.openFd();
      const fe = new VhostUserFrontend(fd, {
        name: this.name,
        requestTimeoutMs: this.requestTimeoutMs,
      });
      fe.on("error", () => undefined);
      try {
        await fe.getFeatures();
        return fe;
      } catch (err) {
        last = err;
        fe.close();
        if (this.#child !== null || this.#opts.spawn !== undefined) await this.takeExit(500);
        await sleep(50);
      }
    }
    throw new Error(`${this.name}: no GET_FEATURES answer on a fresh connection: ${String(last)}`);
  }

  /**
   * Close a front-end and let the back-end notice (a short pause, so that the next connection
   * is not refused as a second front-end).
   * @param fe the front-end
   */
  async done(fe: VhostUserFrontend | null): Promise<void> {
    if (fe === null) return;
    fe.close({ closeRam: true });
    await sleep(30);
  }

  /** Stop a spawned back-end. */
  async stop(): Promise<void> {
    const c = this.#child;
    if (c === null || c.pid === undefined) return;
    const group = -c.pid;
    const kill = (sig: NodeJS.Signals): void => {
      try {
        process.kill(group, sig);
      } catch {
        // the group is gone
      }
    };
    kill("SIGTERM");
    const deadline = Date.now() + 2000;
    while (this.#child === c && Date.now() < deadline) await sleep(20);
    kill("SIGKILL");
  }
}
