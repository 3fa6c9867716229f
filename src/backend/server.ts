/**
 * Serving a device on a Unix socket: as a server (listening on a path) or as a client
 * (connecting to a front-end's socket, reconnecting with backoff). One front-end at a time per
 * device; after it leaves, a new one can connect and set the device up again.
 */
import { EventEmitter } from "node:events";
import { unlinkSync, lstatSync } from "node:fs";
import { native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import { Channel } from "../channel.js";
import { BackendSession, checkSessionLimits } from "./session.js";
import { silentLogger } from "./device.js";
import type { Logger, VhostUserDevice } from "./device.js";

/** Options of {@link serveBackend}. */
export interface ServeOptions {
  /** socket path */
  path: string;
  /** connect to the front-end's socket instead of listening (QEMU `server=on`) */
  client?: boolean;
  /** the application's logger */
  logger?: Logger;
  /** client mode: first and largest delay between connection attempts (ms) */
  reconnectDelayMs?: { min: number; max: number };
  /** server mode: remove a socket file left at `path` by a process that is gone first (default true); a socket another server listens on is refused */
  unlinkStale?: boolean;
  /**
   * Adaptive polling: event-loop turns a ring is polled (driver notifications suppressed)
   * after the last turn that found work; 0 (the default) disables it.
   */
  pollTurns?: number;
  /**
   * Busy polling: after a ring found work, keep polling it synchronously (driver
   * notifications suppressed) until it has been idle this many microseconds; 0 (the default)
   * disables it. Trades a core for the kick wake-up latency, as a DPDK PMD does.
   */
  busyPollMicros?: number;
  /**
   * GET_VRING_BASE: longest wait (ms) for chains a device still holds at a stop (default 1000;
   * see `BackendSessionOptions.stopTimeoutMs`)
   */
  stopTimeoutMs?: number;
  /** offer the back-end's own fd for device-state transfers (SET_DEVICE_STATE_FD reply) */
  ownStateChannel?: boolean;
  /** largest device state accepted on LOAD (bytes; default 64 MiB) */
  maxStateBytes?: number;
  /**
   * A device-state transfer (SET_DEVICE_STATE_FD) that has not ended after this many ms fails
   * and its fd is closed (default 60 000; 1..3 600 000; see
   * `BackendSessionOptions.stateTimeoutMs`)
   */
  stateTimeoutMs?: number;
  /**
   * Most requests waiting to be handled on a connection before it is closed: count, payload
   * bytes and fds (default `DEFAULT_REQUEST_BACKLOG`; ranges in
   * `BackendSessionOptions.requestBacklog`)
   */
  requestBacklog?: { requests: number; bytes: number; fds: number };
}

/**
 * A device served on one socket. Events: `session` (a front-end connected, with the
 * {@link BackendSession}), `disconnect`, `error` (a request failed, or the listening socket
 * failed), `close` (the server stopped serving: {@link close}, or a listening-socket error).
 */
export class BackendServer extends EventEmitter {
  /** the device served */
  readonly device: VhostUserDevice;
  /** the socket path */
  readonly path: string;
  /** true in client mode (connects to the front-end's socket) */
  readonly client: boolean;
  /** the application's logger (the silent logger when none was given) */
  readonly logger: Logger;
  #listenFd = -1;
  #listenWatcher: FdWatcher | null = null;
  #session: BackendSession | null = null;
  #closed = false;
  #createdSocket = false;
  #retryTimer: NodeJS.Timeout | null = null;
  #delay: number;
  readonly #delays: { min: number; max: number };
  readonly #pollTurns: number | undefined;
  readonly #busyPollMicros: number | undefined;
  readonly #stopTimeoutMs: number | undefined;
  readonly #ownStateChannel: boolean | undefined;
  readonly #maxStateBytes: number | undefined;
  readonly #stateTimeoutMs: number | undefined;
  readonly #requestBacklog: { requests: number; bytes: number; fds: number } | undefined;

  /**
   * Serve a device: listen on `options.path` (server mode) or connect to it (client mode).
   * @param device the device to serve
   * @param options socket path, mode, logger
   * @throws NativeError when the listening socket cannot be created; Error when a live server
   *   already listens on the path or the path is not a socket; RangeError naming the option
   *   when `pollTurns`, `busyPollMicros`, `stateTimeoutMs` or `requestBacklog` is out of range
   *   (before any socket is made)
   */
  constructor(device: VhostUserDevice, options: ServeOptions) {
    super();
    const turns = options.pollTurns ?? 0;
    if (!Number.isInteger(turns) || turns < 0) {
      throw new RangeError(`serveBackend: pollTurns must be an integer >= 0, got ${turns}`);
    }
    const busy = options.busyPollMicros ?? 0;
    if (!(busy >= 0 && busy <= 1000)) {
      throw new RangeError(`serveBackend: busyPollMicros must be in 0..1000, got ${busy}`);
    }
    checkSessionLimits("serveBackend", options);
    this.device = device;
    this.path = options.path;
    this.client = options.client ?? false;
    this.logger = options.logger ?? silentLogger;
    this.#delays = options.reconnectDelayMs ?? { min: 50, max: 2000 };
    this.#pollTurns = options.pollTurns;
    this.#busyPollMicros = options.busyPollMicros;
    this.#stopTimeoutMs = options.stopTimeoutMs;
    this.#ownStateChannel = options.ownStateChannel;
    this.#maxStateBytes = options.maxStateBytes;
    this.#stateTimeoutMs = options.stateTimeoutMs;
    this.#requestBacklog = options.requestBacklog && { ...options.requestBacklog };
    this.#delay = this.#delays.min;
    if (this.client) {
      this.#connect();
    } else {
      if (options.unlinkStale !== false) removeStaleSocket(this.path);
      this.#listenFd = native.unixListen(this.path, 16);
      this.#createdSocket = true;
      try {
        this.#listenWatcher = new native.FdWatcher(this.#listenFd, (_ev, err) => {
          if (err) {
            this.#listenFailed(err);
            return;
          }
          this.#accept();
        });
        this.#listenWatcher.start(POLL_READABLE);
      } catch (err) {
        this.close();
        throw err;
      }
      this.logger.info(`${this.path}: listening`);
    }
  }

  /**
   * The listening socket failed (its watcher has stopped): a server that silently stopped
   * accepting would look alive, so report it and stop serving.
   */
  #listenFailed(err: Error): void {
    this.logger.error(`${this.path}: listen socket error: ${err.message}; no longer accepting`);
    const error = new Error(`${this.path}: listen socket error: ${err.message}`, { cause: err });
    if (this.listenerCount("error") > 0) this.emit("error", error);
    this.close();
  }

  /** @returns true once the server stopped serving ({@link close} or a listen-socket error) */
  get closed(): boolean {
    return this.#closed;
  }

  /** @returns the current session, or null while no front-end is connected */
  get session(): BackendSession | null {
    return this.#session;
  }

  #accept(): void {
    for (;;) {
      let fd: number | null;
      try {
        fd = native.unixAccept(this.#listenFd);
      } catch (err) {
        this.logger.error(`${this.path}: accept failed: ${(err as Error).message}`);
        return;
      }
      if (fd === null) return;
      // ORDERING: a front-end that hung up and connected again at once has its hang-up still
      // queued on the old socket: process it before deciding that this is a second one.
      this.#session?.channel.pollHangup();
      if (this.#session) {
        this.logger.warn(`${this.path}: refusing a second front-end while one is connected`);
        native.close(fd);
        continue;
      }
      this.#startSession(fd);
    }
  }

  #connect(): void {
    if (this.#closed) return;
    let fd: number;
    try {
      fd = native.unixConnect(this.path);
    } catch (err) {
      const e = err as Error & { code?: string };
      this.logger.debug(
        `${this.path}: connect failed (${e.code ?? e.message}); retry in ${this.#delay} ms`,
      );
      this.#retryTimer = setTimeout(() => this.#connect(), this.#delay);
      this.#delay = Math.min(this.#delay * 2, this.#delays.max);
      return;
    }
    this.#delay = this.#delays.min;
    this.logger.info(`${this.path}: connected to front-end`);
    this.#startSession(fd);
  }

  #startSession(fd: number): void {
    let channel: Channel<"main">;
    let session: BackendSession;
    try {
      channel = new Channel(fd, { role: "backend", kind: "main", name: this.path });
    } catch (err) {
      // The channel closed fd; this connection is lost, the server goes on.
      this.logger.error(`${this.path}: cannot start a session: ${(err as Error).message}`);
      return;
    }
    try {
      session = new BackendSession(channel, this.device, {
        name: this.path,
        logger: this.logger,
        ...(this.#pollTurns !== undefined ? { pollTurns: this.#pollTurns } : {}),
        ...(this.#busyPollMicros !== undefined ? { busyPollMicros: this.#busyPollMicros } : {}),
        ...(this.#stopTimeoutMs !== undefined ? { stopTimeoutMs: this.#stopTimeoutMs } : {}),
        ...(this.#ownStateChannel !== undefined ? { ownStateChannel: this.#ownStateChannel } : {}),
        ...(this.#maxStateBytes !== undefined ? { maxStateBytes: this.#maxStateBytes } : {}),
        ...(this.#stateTimeoutMs !== undefined ? { stateTimeoutMs: this.#stateTimeoutMs } : {}),
        ...(this.#requestBacklog !== undefined ? { requestBacklog: this.#requestBacklog } : {}),
      });
    } catch (err) {
      this.logger.error(`${this.path}: cannot start a session: ${(err as Error).message}`);
      channel.close();
      return;
    }
    this.#session = session;
    this.logger.info(`${this.path}: front-end connected`);
    session.on("error", (err: Error) => {
      if (this.listenerCount("error") > 0) this.emit("error", err);
    });
    session.on("close", () => {
      if (this.#session === session) this.#session = null;
      this.emit("disconnect", session);
      if (this.client && !this.#closed) {
        this.#retryTimer = setTimeout(() => this.#connect(), this.#delay);
      }
    });
    this.emit("session", session);
  }

  /**
   * Stop serving: close the session and the socket, and remove the socket file it created.
   * Emits `close` once. Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#session?.close();
    this.#session = null;
    this.#listenWatcher?.close();
    this.#listenWatcher = null;
    if (this.#listenFd >= 0) native.close(this.#listenFd);
    this.#listenFd = -1;
    if (this.#createdSocket) {
      try {
        unlinkSync(this.path);
      } catch {
        // already gone
      }
    }
    this.emit("close");
  }
}

/**
 * Serve a device on a socket.
 * @param device the device
 * @param options socket path, client or server mode, logger
 * @returns the server; close it to stop
 * @throws NativeError when the socket cannot be created
 */
export function serveBackend(device: VhostUserDevice, options: ServeOptions): BackendServer {
  return new BackendServer(device, options);
}

/**
 * Remove a socket file left by a process that is gone; refuse one that is alive (another
 * server listens on it) or anything that is not a socket.
 */
function removeStaleSocket(path: string): void {
  try {
    if (!lstatSync(path).isSocket()) {
      throw new Error(`${path} exists and is not a socket`);
    }
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return;
    throw err;
  }
  let fd = -1;
  try {
    // A Unix stream connect completes at once: success means somebody listens there.
    fd = native.unixConnect(path);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code !== "ECONNREFUSED" && code !== "ENOENT") throw err;
  }
  if (fd >= 0) {
    native.close(fd);
    throw new Error(`${path} is in use (another server listens on it)`);
  }
  unlinkSync(path);
}
