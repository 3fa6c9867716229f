/**
 * A vhost-user trace proxy: accepts a front-end on one socket, connects to the back-end on
 * another, and forwards every message both ways unchanged with its fds (SCM_RIGHTS passed
 * through), including the back-end request channel that SET_BACKEND_REQ_FD sets up (the
 * proxy puts a socket pair of its own in between, so those messages are traced too). Each
 * message is reported as a {@link TraceEvent}; replies are paired with their requests. When
 * either side goes away both connections are closed and the proxy waits for the next
 * front-end.
 *
 * vhost-user: "Header", "Communication", VHOST_USER_SET_BACKEND_REQ_FD.
 */
import { lstatSync, unlinkSync } from "node:fs";
import { native, POLL_READABLE } from "../../native.js";
import type { FdWatcher } from "../../native.js";
import {
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  ProtocolFeature,
  VirtioFeature,
  MAX_PAYLOAD_SIZE,
  VERSION_MASK,
  VHOST_USER_VERSION,
  RESERVED_FLAGS_MASK,
} from "../../protocol/constants.js";
import { formatValue } from "../../protocol/errors.js";
import { decodeHeader } from "../../protocol/framing.js";
import { requestSpec } from "../../protocol/table.js";
import type { TableName } from "../../protocol/table.js";

/** Which way a message went. */
export type TraceDirection = "fe->be" | "be->fe";

/** One message seen by the proxy. */
export interface TraceEvent {
  /** milliseconds since the proxy started */
  t: number;
  /** connection number (1 for the first front-end) */
  conn: number;
  /** main channel or back-end request channel */
  channel: "main" | "backend-req";
  dir: TraceDirection;
  /** request name (or `UNKNOWN(n)`) */
  name: string;
  request: number;
  flags: number;
  /** `request`, `reply` */
  kind: "request" | "reply";
  /** decoded payload fields, as printable strings; or the decode error */
  fields: Record<string, string>;
  /** payload bytes */
  size: number;
  fds: number;
  /** replies: milliseconds since the request they answer */
  latencyMs?: number;
  /** set when the message does not decode (it is forwarded or cut per the options) */
  malformed?: string;
}

/** Options of {@link TraceProxy}. */
export interface TraceOptions {
  /** where front-ends connect */
  listen: string;
  /** the back-end's socket */
  connect: string;
  /** the back-end is in client mode: wait for it on `connect` instead of connecting */
  client?: boolean;
  /** on a malformed message: forward it anyway (default) or cut the connection */
  onMalformed?: "forward" | "cut";
  /** called with every message */
  onEvent: (e: TraceEvent) => void;
  /** called with notes (connections, disconnections) */
  onNote?: (text: string) => void;
}

/** Requests whose u64 payload (or reply) is a feature set, with the enum naming its bits. */
const FEATURE_NAMES: Readonly<Record<string, Record<number, string>>> = Object.freeze({
  GET_FEATURES: VirtioFeature,
  SET_FEATURES: VirtioFeature,
  GET_PROTOCOL_FEATURES: ProtocolFeature,
  SET_PROTOCOL_FEATURES: ProtocolFeature,
});

function removeSocket(path: string): void {
  try {
    if (lstatSync(path).isSocket()) unlinkSync(path);
  } catch {
    // none
  }
}

function printable(v: unknown): string {
  if (v instanceof Uint8Array) return formatValue(v);
  if (typeof v === "bigint") return `0x${v.toString(16)}`;
  if (Array.isArray(v)) return `[${v.map((x) => printable(x)).join(" ")}]`;
  if (v !== null && typeof v === "object") {
    return `{${Object.entries(v)
      .map(([k, x]) => `${k}=${printable(x)}`)
      .join(" ")}}`;
  }
  return String(v);
}

/** Half of a relay: bytes from `from` cut into messages and written to `to` with their fds. */
class Pipe {
  readonly #buf = new Uint8Array(HEADER_SIZE + MAX_PAYLOAD_SIZE + 64);
  #have = 0;
  /**
   * fds received, with the buffer offset where the read that brought them ended: a stream
   * read stops right after the bytes that carried fds, so they belong to the message holding
   * the read's last byte (earlier messages may come in the same read without fds).
   */
  #fds: { end: number; fds: number[] }[] = [];
  #watcher: FdWatcher | null = null;
  constructor(
    readonly from: number,
    readonly to: number,
    readonly onMessage: (msg: Uint8Array, fds: number[]) => boolean,
    readonly onClose: (why: string) => void,
  ) {}

  start(): void {
    this.#watcher = new native.FdWatcher(this.from, (_ev, err) => {
      if (err) {
        this.onClose(err.message);
        return;
      }
      this.#read();
    });
    this.#watcher.start(POLL_READABLE);
  }

  #read(): void {
    for (;;) {
      let r;
      try {
        r = native.recvmsg(this.from, this.#buf, this.#have, this.#buf.length - this.#have);
      } catch (err) {
        this.onClose((err as Error).message);
        return;
      }
      if (r === null) return;
      if (r.bytes === 0) {
        for (const f of r.fds) native.close(f);
        this.onClose("hung up");
        return;
      }
      this.#have += r.bytes;
      if (r.fds.length > 0) this.#fds.push({ end: this.#have, fds: r.fds });
      while (this.#have >= HEADER_SIZE) {
        const h = decodeHeader(this.#buf);
        const total = HEADER_SIZE + Math.min(h.size, MAX_PAYLOAD_SIZE + 64);
        if (h.size > MAX_PAYLOAD_SIZE + 64 - HEADER_SIZE) {
          // ORDERING: an oversize message cannot be buffered: forward what is here as is.
          if (!this.onMessage(this.#buf.slice(0, this.#have), this.#take(this.#have))) return;
          this.#have = 0;
          break;
        }
        if (this.#have < total) break;
        const msg = this.#buf.slice(0, total);
        this.#buf.copyWithin(0, total, this.#have);
        this.#have -= total;
        if (!this.onMessage(msg, this.#take(total))) return;
      }
    }
  }

  /** The fds of the message made of the first `len` buffered bytes; later ones move down. */
  #take(len: number): number[] {
    const out: number[] = [];
    const keep: { end: number; fds: number[] }[] = [];
    for (const e of this.#fds) {
      if (e.end <= len) out.push(...e.fds);
      else keep.push({ end: e.end - len, fds: e.fds });
    }
    this.#fds = keep;
    return out;
  }

  stop(): void {
    this.#watcher?.close();
    this.#watcher = null;
    for (const f of this.#take(Number.MAX_SAFE_INTEGER)) native.close(f);
  }
}

/** A request waiting for its reply. */
interface PendingReply {
  request: number;
  at: number;
}

/** One front-end / back-end pair of connections (plus their back-end request channel). */
class Session {
  readonly #pipes: Pipe[] = [];
  readonly #fds: number[] = [];
  readonly #pending = new Map<string, PendingReply[]>();
  #closed = false;

  constructor(
    readonly proxy: TraceProxy,
    readonly conn: number,
    fe: number,
    be: number,
    readonly onEnd: () => void,
  ) {
    this.#relay("main", fe, be);
  }

  #relay(channel: "main" | "backend-req", fe: number, be: number): void {
    this.#fds.push(fe, be);
    // Main channel: the front-end sends requests. Back-end channel: the back-end does.
    const table: TableName = channel === "main" ? "frontend" : "backend";
    const mk = (dir: TraceDirection, from: number, to: number): Pipe =>
      new Pipe(
        from,
        to,
        (msg, fds) => this.#forward(channel, table, dir, msg, fds, to),
        (why) => this.close(`${channel} ${dir === "fe->be" ? "front-end" : "back-end"} ${why}`),
      );
    const a = mk("fe->be", fe, be);
    const b = mk("be->fe", be, fe);
    this.#pipes.push(a, b);
    a.start();
    b.start();
  }

  #forward(
    channel: "main" | "backend-req",
    table: TableName,
    dir: TraceDirection,
    msg: Uint8Array,
    fds: number[],
    to: number,
  ): boolean {
    const h = decodeHeader(msg);
    const isReply = (h.flags & FLAG_REPLY) !== 0;
    const spec = requestSpec(table, h.request);
    const ev: TraceEvent = {
      t: this.proxy.elapsed(),
      conn: this.conn,
      channel,
      dir,
      name: spec?.name ?? `UNKNOWN(${h.request})`,
      request: h.request,
      flags: h.flags,
      kind: isReply ? "reply" : "request",
      fields: {},
      size: h.size,
      fds: fds.length,
    };
    const payload = msg.subarray(HEADER_SIZE);
    let problem: string | null = null;
    if ((h.flags & VERSION_MASK) !== VHOST_USER_VERSION)
      problem = `version ${h.flags & VERSION_MASK}`;
    else if ((h.flags & RESERVED_FLAGS_MASK) !== 0)
      problem = `reserved flags 0x${h.flags.toString(16)}`;
    else if (spec === undefined) problem = "unknown request";
    else if (payload.length !== h.size) problem = `payload ${payload.length} of ${h.size} bytes`;
    if (problem === null && spec !== undefined) {
      // A reply to a request without an "always" reply body is a u64 ack (REPLY_ACK).
      const codec = isReply ? (spec.reply === "always" ? spec.replyCodec : null) : spec.codec;
      try {
        if (codec !== null && (h.size > 0 || !isReply)) {
          const v = codec.decode(payload, spec.name);
          if (v !== null && typeof v === "object" && !(v instanceof Uint8Array)) {
            for (const [k, x] of Object.entries(v)) ev.fields[k] = printable(x);
          } else if (v !== null) {
            ev.fields.value = printable(v);
          }
        } else if (isReply && h.size === 8) {
          ev.fields.value = printable(
            new DataView(payload.buffer, payload.byteOffset).getBigUint64(0, true),
          );
        }
      } catch (err) {
        problem = (err as Error).message;
      }
    }
    if (problem !== null) ev.malformed = problem;
    // u64 feature sets: their bit names too.
    const names = FEATURE_NAMES[ev.name];
    const value = ev.fields.value;
    if (names !== undefined && value !== undefined && !(isReply && spec?.reply !== "always")) {
      const v = BigInt(value);
      const set: string[] = [];
      for (let b = 0; b < 64; b++) if ((v >> BigInt(b)) & 1n) set.push(names[b] ?? `bit${b}`);
      ev.fields.names = set.join(",");
    }
    // Pair replies with requests (per channel and direction, oldest first).
    const key = `${channel}:${h.request}`;
    if (isReply) {
      const q = this.#pending.get(key);
      const p = q?.shift();
      if (p) ev.latencyMs = Math.round((this.proxy.elapsed() - p.at) * 1000) / 1000;
    } else if (
      spec !== undefined &&
      (spec.replyCodec !== null || (h.flags & FLAG_NEED_REPLY) !== 0)
    ) {
      const q = this.#pending.get(key) ?? [];
      q.push({ request: h.request, at: ev.t });
      this.#pending.set(key, q);
    }
    this.proxy.emitEvent(ev);
    if (problem !== null && this.proxy.cutMalformed) {
      for (const f of fds) native.close(f);
      this.close(`cut after a malformed message (${problem})`);
      return false;
    }
    let out = fds;
    if (
      channel === "main" &&
      !isReply &&
      h.request === FrontendRequest.SET_BACKEND_REQ_FD &&
      fds.length === 1
    ) {
      // LIFETIME: the front-end's end stays with the proxy; the back-end gets one end of a pair
      // the proxy relays, so the back-end channel's messages are traced too.
      const [ours, theirs] = native.socketpair();
      this.#relay("backend-req", fds[0] as number, ours);
      out = [theirs];
    }
    let sent = 0;
    try {
      while (sent < msg.length) {
        const n = native.sendmsg(to, msg, sent, msg.length - sent, sent === 0 ? out : []);
        if (n === null) continue; // ORDERING: a full socket: retry until the message is out
        sent += n;
      }
    } catch (err) {
      this.close(`send failed: ${(err as Error).message}`);
      return false;
    } finally {
      // The receiver has its own copies now; the proxy's are closed (except a relayed end).
      for (const f of out) native.close(f);
    }
    return !this.#closed;
  }

  close(why: string): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#pipes) p.stop();
    for (const f of this.#fds) native.close(f);
    this.proxy.note(`connection ${this.conn} closed: ${why}`);
    this.onEnd();
  }
}

/**
 * The proxy. {@link start} it; {@link close} it.
 */
export class TraceProxy {
  readonly #opts: TraceOptions;
  readonly #t0 = process.hrtime.bigint();
  #lfd = -1;
  #watcher: FdWatcher | null = null;
  #session: Session | null = null;
  #conns = 0;
  #closed = false;

  /**
   * @param opts listen and connect paths, mode, malformed handling, callbacks
   */
  constructor(opts: TraceOptions) {
    this.#opts = opts;
  }

  /** @returns milliseconds since the proxy was made */
  elapsed(): number {
    return Number(process.hrtime.bigint() - this.#t0) / 1e6;
  }

  /** @returns true when a malformed message cuts the connection */
  get cutMalformed(): boolean {
    return this.#opts.onMalformed === "cut";
  }

  /**
   * Report an event to the callback.
   * @param e the event
   */
  emitEvent(e: TraceEvent): void {
    this.#opts.onEvent(e);
  }

  /**
   * Report a note.
   * @param text the note
   */
  note(text: string): void {
    this.#opts.onNote?.(text);
  }

  /** Listen for front-ends. */
  start(): void {
    removeSocket(this.#opts.listen);
    this.#lfd = native.unixListen(this.#opts.listen, 4);
    this.#watcher = new native.FdWatcher(this.#lfd, () => void this.#accept());
    this.#watcher.start(POLL_READABLE);
  }

  async #backend(): Promise<number> {
    const path = this.#opts.connect;
    const deadline = Date.now() + 10_000;
    if (this.#opts.client === true) {
      removeSocket(path);
      const l = native.unixListen(path, 1);
      try {
        for (;;) {
          const fd = native.unixAccept(l);
          if (fd !== null) return fd;
          if (Date.now() > deadline) throw new Error(`no back-end connected to ${path}`);
          await new Promise((r) => setTimeout(r, 10));
        }
      } finally {
        native.close(l);
        removeSocket(path);
      }
    }
    for (;;) {
      try {
        return native.unixConnect(path);
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  async #accept(): Promise<void> {
    for (;;) {
      let fe: number | null;
      try {
        fe = native.unixAccept(this.#lfd);
      } catch {
        return;
      }
      if (fe === null) return;
      if (this.#session !== null) {
        this.note("a second front-end refused while one is connected");
        native.close(fe);
        continue;
      }
      const conn = ++this.#conns;
      let be: number;
      try {
        be = await this.#backend();
      } catch (err) {
        this.note(`connection ${conn}: back-end unreachable: ${(err as Error).message}`);
        native.close(fe);
        continue;
      }
      if (this.#closed) {
        native.close(fe);
        native.close(be);
        return;
      }
      this.note(`connection ${conn}: front-end connected, back-end connected`);
      const s: Session = new Session(this, conn, fe, be, () => {
        if (this.#session === s) this.#session = null;
      });
      this.#session = s;
    }
  }

  /** Stop: close the connections and the listening socket. */
  close(): void {
    this.#closed = true;
    this.#session?.close("proxy closed");
    this.#watcher?.close();
    if (this.#lfd >= 0) native.close(this.#lfd);
    this.#lfd = -1;
    removeSocket(this.#opts.listen);
  }
}

/**
 * Render an event as one line: time, connection, direction, name, flags, fields, fds, latency.
 * @param e the event
 * @returns the line (no newline)
 */
export function formatTraceEvent(e: TraceEvent): string {
  const arrow = e.dir === "fe->be" ? "FE->BE" : "BE->FE";
  const ch = e.channel === "main" ? "" : " [backend-req]";
  const fields = Object.entries(e.fields)
    .map(([k, v]) => `${k}=${v}`)
    .join(" ");
  const lat = e.latencyMs !== undefined ? ` (${e.latencyMs.toFixed(3)} ms)` : "";
  const bad = e.malformed !== undefined ? ` MALFORMED: ${e.malformed}` : "";
  return (
    `${(e.t / 1000).toFixed(6)} #${e.conn} ${arrow}${ch} ${e.kind === "reply" ? "reply " : ""}${e.name} ` +
    `flags=0x${e.flags.toString(16)} size=${e.size}${fields ? ` ${fields}` : ""} fds=${e.fds}${lat}${bad}`
  );
}
