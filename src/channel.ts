/**
 * A vhost-user connection over a native Unix socket: typed messages with their fds, replies
 * matched to requests in order, REPLY_ACK, a non-blocking write queue, and closing that releases
 * every fd the connection still holds.
 *
 * vhost-user: "Communication" (replies in order, REPLY_ACK, fds as ancillary data on the first
 * byte of a message), "Back-end communication" (the back-end request channel).
 */
import diagnostics_channel from "node:diagnostics_channel";
import { EventEmitter } from "node:events";
import {
  type FdWatcher,
  type NativeBinding,
  POLL_READABLE,
  POLL_WRITABLE,
  isNativeError,
  native,
} from "./native.js";
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  MAX_FDS,
  ProtocolFeature,
  hasFeature,
} from "./protocol/constants.js";
import { VhostUserError } from "./protocol/errors.js";
import {
  type AckMessageOf,
  type BackendReplyMessage,
  type BackendRequestMessage,
  type DecodedMessage,
  type FrontendReplyMessage,
  type FrontendRequestMessage,
  MessageDecoder,
  type ReplyMessageOf,
  type RequestIdMap,
  encodeAck,
  encodeReply,
  encodeRequest,
} from "./protocol/framing.js";
import {
  type BackendReplyPayloads,
  type BackendRequestPayloads,
  type FrontendReplyPayloads,
  type FrontendRequestPayloads,
  type ReplyContext,
  type TableName,
  hasExplicitReply,
  needsAck,
  requestSpec,
} from "./protocol/table.js";

/** Name of the diagnostics channel every message is published on. */
export const MESSAGE_DIAGNOSTICS_CHANNEL = "vhostkit:message";

/** What is published on {@link MESSAGE_DIAGNOSTICS_CHANNEL} for each message. */
export interface MessageDiagnostic {
  direction: "in" | "out";
  /** request name */
  name: string;
  /** request id */
  request: number;
  /** `request`, `reply` or `ack` */
  kind: "request" | "reply" | "ack";
  flags: number;
  /** payload size */
  size: number;
  /** number of fds */
  fds: number;
  /** the channel's name */
  channel: string;
}

/** Which side of the connection this channel is. */
export type ChannelRole = "frontend" | "backend";
/** The main channel, or the back-end request channel (SET_BACKEND_REQ_FD). */
export type ChannelKind = "main" | "backend-req";

/** Table carried by a channel kind: front-end requests on main, back-end requests on the other. */
export type TableOf<K extends ChannelKind> = K extends "main" ? "frontend" : "backend";

/** A decoded front-end request (a back-end's `message` event on the main channel). */
export type FrontendMessage = FrontendRequestMessage;
/** A decoded back-end request (a front-end's `message` event on the back-end channel). */
export type BackendMessage = BackendRequestMessage;

/** Request ids a channel of kind `K` carries. */
export type ChannelRequestId<K extends ChannelKind> = RequestIdMap[TableOf<K>];

type RequestPayloadFor<T extends TableName, Q> = T extends "frontend"
  ? Q extends FrontendRequest
    ? FrontendRequestPayloads[Q]
    : never
  : Q extends BackendRequest
    ? BackendRequestPayloads[Q]
    : never;

type ReplyPayloadFor<T extends TableName, Q> = T extends "frontend"
  ? Q extends FrontendRequest
    ? FrontendReplyPayloads[Q]
    : never
  : Q extends BackendRequest
    ? BackendReplyPayloads[Q]
    : never;

type ReplyFor<T extends TableName, Q> = T extends "frontend"
  ? Q extends FrontendRequest
    ? ReplyMessageOf<"frontend", Q, FrontendReplyPayloads[Q]> | AckMessageOf<"frontend", Q>
    : never
  : Q extends BackendRequest
    ? ReplyMessageOf<"backend", Q, BackendReplyPayloads[Q]> | AckMessageOf<"backend", Q>
    : never;

/** Request payload of `Q` on a channel of kind `K`. */
export type ChannelRequestPayload<K extends ChannelKind, Q> = RequestPayloadFor<TableOf<K>, Q>;

/** Reply body payload of `Q` on a channel of kind `K`. */
export type ChannelReplyPayload<K extends ChannelKind, Q> = ReplyPayloadFor<TableOf<K>, Q>;

/** What {@link Channel.request} resolves with: the reply body, or a zero ack. */
export type ChannelReply<K extends ChannelKind, Q> = ReplyFor<TableOf<K>, Q>;

/** The incoming requests a channel of kind `K` emits as `message`. */
export type ChannelIncoming<K extends ChannelKind> = K extends "main"
  ? FrontendRequestMessage
  : BackendRequestMessage;

/** Logger the application passes in; the library has no global logger. */
export interface ChannelLogger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

/** The native calls the channel uses (injectable for tests). */
export type ChannelIo = Pick<NativeBinding, "sendmsg" | "recvmsg" | "close" | "dup" | "FdWatcher">;

/** Options of {@link Channel}. */
export interface ChannelOptions<K extends ChannelKind> {
  /** which side this is */
  role: ChannelRole;
  /** main channel or back-end request channel */
  kind: K;
  /** for logs and diagnostics */
  name?: string;
  /** optional logger */
  logger?: ChannelLogger;
  /** size of the receive buffer (default 64 KiB) */
  receiveBufferSize?: number;
  /** native calls (default: the addon) */
  io?: ChannelIo;
  /**
   * Largest write queue (messages the peer has not read yet) before the channel closes: a peer
   * that never reads its replies cannot make this process hold them forever. Default
   * {@link DEFAULT_WRITE_QUEUE_LIMIT}.
   */
  writeQueueLimit?: { messages: number; bytes: number };
}

/** Default {@link ChannelOptions.writeQueueLimit}: 1024 messages or 1 MiB, whichever first. */
export const DEFAULT_WRITE_QUEUE_LIMIT = Object.freeze({ messages: 1024, bytes: 1 << 20 });

/** Options of {@link Channel.request}. */
export interface RequestOptions {
  /** set NEED_REPLY even when the request has a reply body (harmless; one reply comes) */
  needReply?: boolean;
  /** reject with ERR_VHOST_TIMEOUT (and close the channel) after this many milliseconds */
  timeoutMs?: number;
  /**
   * Override what reply to wait for: `body` (e.g. SET_MEM_TABLE while postcopy is set up) or
   * `ack` (a peer that answers NEED_REPLY without REPLY_ACK).
   */
  replyKind?: "body" | "ack";
  /** postcopy state for the reply rules */
  context?: ReplyContext;
}

/** Options of {@link Channel.send}. */
export interface SendOptions {
  /** set NEED_REPLY; the ack is then consumed and a failure is logged */
  needReply?: boolean;
}

interface Pending {
  request: number;
  name: string;
  expect: "body" | "ack";
  resolve: (message: DecodedMessage) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout> | null;
}

interface Outgoing {
  data: Uint8Array;
  offset: number;
  /** fds still to send (dups the channel owns), empty once the first byte went out */
  fds: number[];
}

const READ_BURST = 64;

/**
 * A vhost-user connection. It owns the socket fd it is given and closes it on {@link close}.
 *
 * Who decodes what:
 * - main channel: a back-end receives front-end requests (`message` events) and answers with
 *   {@link reply}/{@link ack}; a front-end sends with {@link request}/{@link send} and gets the
 *   replies as resolved promises;
 * - back-end request channel: the roles flip (the back-end sends, the front-end answers).
 *
 * Events: `message` (an incoming request; the listener owns its fds), `error` (a
 * {@link VhostUserError} found in a received message, emitted only when someone listens; the
 * channel then closes), `drain` (the write queue emptied after EAGAIN), `close` (once, with the
 * error that caused it, if any).
 *
 * A protocol error closes only this connection: the socket, the watcher, every fd received and
 * not yet handed to a listener, and every queued fd; pending requests reject with
 * ERR_VHOST_CLOSED.
 */
export class Channel<K extends ChannelKind = ChannelKind> extends EventEmitter {
  /** which side this is */
  readonly role: ChannelRole;
  /** main or back-end request channel */
  readonly kind: K;
  /** name used in logs and diagnostics */
  readonly name: string;
  /** the request table this channel carries */
  readonly table: TableName;
  /** true when this side sends requests (front-end on main, back-end on backend-req) */
  readonly isRequester: boolean;
  readonly #fd: number;
  readonly #io: ChannelIo;
  readonly #logger: ChannelLogger | undefined;
  readonly #watcher: FdWatcher;
  readonly #decoder: MessageDecoder;
  readonly #recvBuffer: Uint8Array;
  readonly #pending: Pending[] = [];
  readonly #writeQueue: Outgoing[] = [];
  #writeQueueBytes = 0;
  readonly #writeQueueLimit: { messages: number; bytes: number };
  readonly #diag = diagnostics_channel.channel(MESSAGE_DIAGNOSTICS_CHANNEL);
  #protocolFeatures = 0n;
  #watching = 0;
  #closed = false;
  #delivering = false;

  /**
   * Wrap a connected, non-blocking Unix stream socket.
   * @param fd the socket; the channel owns it from now on
   * @param options role, kind, name, logger
   * @throws NativeError when the fd cannot be watched
   */
  constructor(fd: number, options: ChannelOptions<K>) {
    super();
    this.#fd = fd;
    this.role = options.role;
    this.kind = options.kind;
    this.name = options.name ?? `${options.role}/${options.kind}/fd${fd}`;
    this.#logger = options.logger;
    this.#io = options.io ?? native;
    this.table = options.kind === "main" ? "frontend" : "backend";
    this.isRequester = (options.kind === "main") === (options.role === "frontend");
    this.#recvBuffer = new Uint8Array(options.receiveBufferSize ?? 64 * 1024);
    // The side that answers (a back-end on the main channel) bounds its queue by default: what
    // it queues is replies the peer asked for and does not read.
    this.#writeQueueLimit =
      options.writeQueueLimit ??
      (this.isRequester
        ? { messages: Number.POSITIVE_INFINITY, bytes: Number.POSITIVE_INFINITY }
        : DEFAULT_WRITE_QUEUE_LIMIT);
    this.#decoder = new MessageDecoder({
      table: this.table,
      expect: this.isRequester ? "reply" : "request",
      replyKind: (request) => this.#replyKindFor(request),
    });
    let watcher: FdWatcher | null = null;
    try {
      watcher = new this.#io.FdWatcher(fd, (events, error) => this.#onPoll(events, error));
      this.#watcher = watcher;
      this.#watch(POLL_READABLE);
    } catch (err) {
      // LIFETIME: the channel owns fd from the start; a channel that cannot watch it closes it.
      watcher?.close();
      this.#io.close(fd);
      throw err;
    }
  }

  /** True once the channel is closed. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Requests sent and still waiting for their reply. */
  get pendingRequests(): number {
    return this.#pending.length;
  }

  /** Messages queued because the socket buffer was full. */
  get writeQueueLength(): number {
    return this.#writeQueue.length;
  }

  /**
   * Read what the socket holds now, as the watcher would (bounded: at most a few bursts), so a
   * hang-up already queued in the socket closes the channel before the caller decides
   * anything (e.g. whether a new connection is a second front-end).
   * @returns true when the channel is closed afterwards
   */
  pollHangup(): boolean {
    for (let i = 0; i < 4 && !this.#closed; i++) this.#read();
    return this.#closed;
  }

  /** Protocol features negotiated on this connection (see {@link setNegotiatedProtocolFeatures}). */
  get protocolFeatures(): bigint {
    return this.#protocolFeatures;
  }

  /** True when REPLY_ACK is negotiated. */
  get replyAck(): boolean {
    return hasFeature(this.#protocolFeatures, ProtocolFeature.REPLY_ACK);
  }

  /**
   * Record the negotiated protocol features (after SET_PROTOCOL_FEATURES), so the channel knows
   * whether REPLY_ACK is on and which replies exist (vhost-user: "Protocol features").
   * @param bits the negotiated protocol feature set
   */
  setNegotiatedProtocolFeatures(bits: bigint): void {
    this.#protocolFeatures = bits;
  }

  /**
   * Whether an incoming request must be answered with a u64 ack (REPLY_ACK rules).
   * @param message an incoming request
   * @param context postcopy state
   * @returns true when {@link ack} must be called
   */
  needsAck(message: { request: number; flags: number }, context: ReplyContext = {}): boolean {
    const spec = requestSpec(this.table, message.request);
    return spec !== undefined && needsAck(spec, message.flags, this.#protocolFeatures, context);
  }

  /**
   * Send a request without waiting for its reply. If a reply or ack follows (the request has a
   * reply body, or `needReply`), it is still consumed in order; a failure is logged.
   * The channel never takes ownership of `fds`: they may be closed as soon as this returns.
   * @param request request id of this channel's table
   * @param payload its payload
   * @param fds fds to attach (at most 8)
   * @param options NEED_REPLY
   * @throws VhostUserError ERR_VHOST_CLOSED when closed; ERR_VHOST_BAD_FIELD when the payload
   *   does not encode. TypeError when this side does not send requests on this channel
   */
  send<Q extends ChannelRequestId<K>>(
    request: Q,
    payload: ChannelRequestPayload<K, Q>,
    fds: readonly number[] = [],
    options: SendOptions = {},
  ): void {
    this.#checkCanSend("send", request);
    const spec = this.#spec(request);
    const expect = hasExplicitReply(spec, this.#protocolFeatures)
      ? "body"
      : options.needReply
        ? "ack"
        : null;
    if (expect !== null) {
      this.#sendRequest(request, payload, fds, expect, options.needReply === true, undefined).then(
        // Nobody awaits this reply: release the fds it carried.
        (reply) => reply.fds.forEach((fd) => this.#closeFd(fd)),
        (err: Error) =>
          this.#emit("warn", `${spec.name}: reply to an unawaited request: ${err.message}`),
      );
      return;
    }
    const data = encodeRequest(this.table, request as never, payload as never, {});
    this.#enqueue(data, fds, "request");
  }

  /**
   * Send a request and wait for its reply (replies come in request order). A request without a
   * reply body gets NEED_REPLY and waits for the u64 ack when REPLY_ACK is negotiated; a
   * non-zero ack rejects with ERR_VHOST_REQUEST_FAILED.
   * The channel never takes ownership of `fds`.
   * @param request request id of this channel's table
   * @param payload its payload
   * @param fds fds to attach (at most 8)
   * @param options NEED_REPLY, timeout, reply-kind override
   * @returns the reply body message, or the zero ack; its fds belong to the caller
   * @throws VhostUserError (as a rejection) ERR_VHOST_NOT_NEGOTIATED when no reply can come
   *   (no reply body and no REPLY_ACK), ERR_VHOST_REQUEST_FAILED, ERR_VHOST_TIMEOUT,
   *   ERR_VHOST_CLOSED, or the protocol error that closed the channel
   */
  request<Q extends ChannelRequestId<K>>(
    request: Q,
    payload: ChannelRequestPayload<K, Q>,
    fds: readonly number[] = [],
    options: RequestOptions = {},
  ): Promise<ChannelReply<K, Q>> {
    try {
      this.#checkCanSend("request", request);
      const spec = this.#spec(request);
      const explicit = hasExplicitReply(spec, this.#protocolFeatures, options.context);
      const expect = options.replyKind ?? (explicit ? "body" : this.replyAck ? "ack" : null);
      if (expect === null) {
        throw new VhostUserError(
          "ERR_VHOST_NOT_NEGOTIATED",
          "request has no reply and REPLY_ACK is not negotiated (use send)",
          { request: spec.name, field: "protocolFeatures", value: this.#protocolFeatures },
        );
      }
      const needReply = expect === "ack" || options.needReply === true;
      return this.#sendRequest(
        request,
        payload,
        fds,
        expect,
        needReply,
        options.timeoutMs,
      ) as Promise<ChannelReply<K, Q>>;
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Answer an incoming request with its reply body (vhost-user: "Communication").
   * The channel never takes ownership of `fds`.
   * @param to the request id answered, or the request message
   * @param payload the reply body
   * @param fds fds to attach
   * @throws VhostUserError ERR_VHOST_CLOSED when closed; ERR_VHOST_UNEXPECTED_REPLY when the
   *   request has no reply body. TypeError when this side does not answer on this channel
   */
  reply<Q extends ChannelRequestId<K>>(
    to: Q | { request: Q },
    payload: ChannelReplyPayload<K, Q>,
    fds: readonly number[] = [],
  ): void {
    const request = typeof to === "object" ? to.request : to;
    this.#checkCanAnswer("reply", request);
    const data = encodeReply(this.table, request as never, payload as never);
    this.#enqueue(data, fds, "reply");
  }

  /**
   * Answer an incoming request with a REPLY_ACK u64: 0 for success, 1 (or `result`) for failure.
   * @param to the request id answered, or the request message
   * @param ok true for success, false for failure, or the u64 to send
   * @throws VhostUserError ERR_VHOST_CLOSED when closed. TypeError when this side does not
   *   answer on this channel
   */
  ack<Q extends ChannelRequestId<K>>(to: Q | { request: Q }, ok: boolean | bigint): void {
    const request = typeof to === "object" ? to.request : to;
    this.#checkCanAnswer("ack", request);
    this.#enqueue(encodeAck(this.table, request, ok), [], "ack");
  }

  /**
   * Close the connection: the socket, the watcher, every fd received and not handed to a
   * listener, every queued fd; pending requests reject with ERR_VHOST_CLOSED. Idempotent.
   * (vhost-user: "Communication"; a back-end treats the hang-up as the end of the session.)
   * @param cause the error that caused the close, passed to `close` listeners
   */
  close(cause?: Error): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#watcher.close();
    } catch (err) {
      this.#emit("warn", `closing the watcher failed: ${(err as Error).message}`);
    }
    this.#closeFd(this.#fd);
    for (const fd of this.#decoder.drainFds()) this.#closeFd(fd);
    for (const out of this.#writeQueue) for (const fd of out.fds) this.#closeFd(fd);
    this.#writeQueue.length = 0;
    this.#writeQueueBytes = 0;
    const pending = this.#pending.splice(0);
    for (const p of pending) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(
        new VhostUserError("ERR_VHOST_CLOSED", "connection closed before the reply", {
          request: p.name,
          cause,
        }),
      );
    }
    this.#emit("debug", cause ? `closed: ${cause.message}` : "closed");
    this.emit("close", cause);
  }

  // --- sending --------------------------------------------------------------------------

  #spec(request: number) {
    const spec = requestSpec(this.table, request);
    if (!spec) {
      throw new VhostUserError("ERR_VHOST_UNKNOWN_REQUEST", `unknown ${this.table} request`, {
        request: this.name,
        field: "request",
        value: request,
      });
    }
    return spec;
  }

  #checkCanSend(what: string, request: number): void {
    if (this.#closed) {
      throw new VhostUserError("ERR_VHOST_CLOSED", `${what} on a closed channel`, {
        request: requestSpec(this.table, request)?.name ?? this.name,
      });
    }
    if (!this.isRequester) {
      throw new TypeError(
        `${this.name}: a ${this.role} does not send requests on the ${this.kind} channel ` +
          `(request=${requestSpec(this.table, request)?.name ?? request})`,
      );
    }
  }

  #checkCanAnswer(what: string, request: number): void {
    if (this.#closed) {
      throw new VhostUserError("ERR_VHOST_CLOSED", `${what} on a closed channel`, {
        request: requestSpec(this.table, request)?.name ?? this.name,
      });
    }
    if (this.isRequester) {
      throw new TypeError(
        `${this.name}: a ${this.role} does not answer requests on the ${this.kind} channel ` +
          `(request=${requestSpec(this.table, request)?.name ?? request})`,
      );
    }
  }

  #sendRequest(
    request: number,
    payload: unknown,
    fds: readonly number[],
    expect: "body" | "ack",
    needReply: boolean,
    timeoutMs: number | undefined,
  ): Promise<DecodedMessage> {
    const spec = this.#spec(request);
    const data = encodeRequest(this.table, request as never, payload as never, { needReply });
    return new Promise<DecodedMessage>((resolve, reject) => {
      const entry: Pending = { request, name: spec.name, expect, resolve, reject, timer: null };
      this.#pending.push(entry);
      if (timeoutMs !== undefined) {
        entry.timer = setTimeout(() => {
          entry.timer = null;
          const index = this.#pending.indexOf(entry);
          if (index >= 0) this.#pending.splice(index, 1);
          const error = new VhostUserError("ERR_VHOST_TIMEOUT", "no reply in time", {
            request: spec.name,
            field: "timeoutMs",
            value: timeoutMs,
          });
          reject(error);
          // The reply order is lost: a late reply would be matched to the next request.
          this.close(error);
        }, timeoutMs);
      }
      try {
        this.#enqueue(data, fds, "request");
      } catch (err) {
        const index = this.#pending.indexOf(entry);
        if (index >= 0) this.#pending.splice(index, 1);
        if (entry.timer) clearTimeout(entry.timer);
        reject(err as Error);
      }
    });
  }

  #enqueue(data: Uint8Array, fds: readonly number[], kind: "request" | "reply" | "ack"): void {
    if (this.#closed) {
      throw new VhostUserError("ERR_VHOST_CLOSED", "write on a closed channel", {
        request: this.name,
      });
    }
    if (fds.length > MAX_FDS) {
      throw new VhostUserError("ERR_VHOST_UNEXPECTED_FDS", `at most ${MAX_FDS} fds per message`, {
        request: this.#nameOf(data),
        field: "fds",
        value: fds.length,
      });
    }
    this.#publishOut(data, fds.length, kind);
    if (this.#writeQueue.length === 0) {
      let sent: number | null;
      try {
        sent = this.#io.sendmsg(this.#fd, data, 0, data.length, [...fds]);
      } catch (err) {
        this.#onWriteError(err);
        return;
      }
      if (sent === data.length) return;
      // Partial write: the fds went with the first bytes. EAGAIN: nothing went, fds included.
      this.#writeQueue.push({
        data,
        offset: sent ?? 0,
        fds: sent === null ? this.#dupAll(fds) : [],
      });
      this.#writeQueueBytes += data.length;
      this.#watch(POLL_READABLE | POLL_WRITABLE);
      return;
    }
    if (
      this.#writeQueue.length >= this.#writeQueueLimit.messages ||
      this.#writeQueueBytes + data.length > this.#writeQueueLimit.bytes
    ) {
      // The peer does not read what it is sent: drop the connection rather than queue forever.
      this.close(
        new VhostUserError(
          "ERR_VHOST_CLOSED",
          `peer does not read: ${this.#writeQueue.length} messages (${this.#writeQueueBytes} bytes) queued`,
          { request: this.#nameOf(data), field: "write queue", value: this.#writeQueue.length },
        ),
      );
      return;
    }
    this.#writeQueue.push({ data, offset: 0, fds: this.#dupAll(fds) });
    this.#writeQueueBytes += data.length;
  }

  #dupAll(fds: readonly number[]): number[] {
    const out: number[] = [];
    try {
      for (const fd of fds) out.push(this.#io.dup(fd));
    } catch (err) {
      for (const fd of out) this.#closeFd(fd);
      throw err;
    }
    return out;
  }

  #flush(): void {
    while (this.#writeQueue.length > 0 && !this.#closed) {
      const out = this.#writeQueue[0] as Outgoing;
      let sent: number | null;
      try {
        sent = this.#io.sendmsg(
          this.#fd,
          out.data,
          out.offset,
          out.data.length - out.offset,
          out.fds,
        );
      } catch (err) {
        this.#onWriteError(err);
        return;
      }
      if (sent === null) return;
      if (out.fds.length > 0) {
        // LIFETIME: the kernel holds its own references now; drop our dups.
        for (const fd of out.fds) this.#closeFd(fd);
        out.fds = [];
      }
      out.offset += sent;
      if (out.offset >= out.data.length) {
        this.#writeQueue.shift();
        this.#writeQueueBytes -= out.data.length;
      }
    }
    if (!this.#closed) {
      this.#watch(POLL_READABLE);
      this.emit("drain");
    }
  }

  #onWriteError(err: unknown): void {
    const code = isNativeError(err) ? err.code : "";
    const hangup = code === "EPIPE" || code === "ECONNRESET";
    const error = new VhostUserError(
      "ERR_VHOST_CLOSED",
      hangup ? "peer closed the connection" : "write failed",
      { request: this.name, field: "errno", value: code || String(err), cause: err },
    );
    this.close(error);
  }

  // --- receiving ------------------------------------------------------------------------

  #replyKindFor(request: number): "body" | "ack" {
    const head = this.#pending[0];
    if (!head || head.request !== request) {
      const spec = requestSpec(this.table, request);
      throw new VhostUserError(
        "ERR_VHOST_UNEXPECTED_REPLY",
        head
          ? `reply does not match the oldest pending request ${head.name}`
          : "reply without a pending request",
        { request: spec?.name ?? "header", field: "request", value: request },
      );
    }
    return head.expect;
  }

  #onPoll(events: number, error: Error | null): void {
    if (this.#closed) return;
    if (error) {
      this.close(
        new VhostUserError("ERR_VHOST_CLOSED", "socket poll failed", {
          request: this.name,
          cause: error,
        }),
      );
      return;
    }
    if (events & POLL_WRITABLE) this.#flush();
    if (events & POLL_READABLE && !this.#closed) this.#read();
  }

  #read(): void {
    for (let i = 0; i < READ_BURST && !this.#closed; i++) {
      let result;
      try {
        result = this.#io.recvmsg(this.#fd, this.#recvBuffer, 0, this.#recvBuffer.length);
      } catch (err) {
        if (isNativeError(err) && err.code === "ECONNRESET") {
          this.#onHangup();
        } else {
          this.close(
            new VhostUserError("ERR_VHOST_CLOSED", "read failed", {
              request: this.name,
              cause: err,
            }),
          );
        }
        return;
      }
      if (result === null) return;
      if (result.bytes === 0) {
        for (const fd of result.fds) this.#closeFd(fd);
        this.#onHangup();
        return;
      }
      try {
        this.#decoder.feed(this.#recvBuffer.subarray(0, result.bytes), result.fds);
      } catch (err) {
        this.#fail(err);
        return;
      }
      if (result.fdsTruncated) {
        this.#deliver();
        this.#fail(
          new VhostUserError(
            "ERR_VHOST_UNEXPECTED_FDS",
            `more than ${MAX_FDS} fds, or truncated ancillary data`,
            { request: this.name, field: "fds", value: result.fds.length },
          ),
        );
        return;
      }
      this.#deliver();
    }
  }

  #onHangup(): void {
    this.#deliver();
    if (this.#closed) return;
    const truncated = this.#decoder.finish();
    if (truncated) {
      this.#fail(truncated);
      return;
    }
    this.close(
      this.#pending.length > 0
        ? new VhostUserError("ERR_VHOST_CLOSED", "peer closed the connection", {
            request: this.name,
          })
        : undefined,
    );
  }

  #deliver(): void {
    if (this.#delivering) return;
    this.#delivering = true;
    try {
      while (!this.#closed) {
        let message: DecodedMessage | undefined;
        try {
          message = this.#decoder.next() as DecodedMessage | undefined;
        } catch (err) {
          this.#fail(err);
          return;
        }
        if (message === undefined) return;
        this.#publishIn(message);
        if (message.kind === "request") this.#emitMessage(message);
        else this.#resolveReply(message);
      }
    } finally {
      this.#delivering = false;
    }
  }

  #emitMessage(message: FrontendRequestMessage | BackendRequestMessage): void {
    if (this.listenerCount("message") === 0) {
      this.#emit("warn", `${message.name}: no message listener; request dropped`);
      for (const fd of message.fds) this.#closeFd(fd);
      return;
    }
    try {
      this.emit("message", message);
    } catch (err) {
      this.#emit("error", `${message.name}: message listener threw: ${(err as Error).message}`);
      this.close(err instanceof Error ? err : new Error(String(err)));
    }
  }

  #resolveReply(message: FrontendReplyMessage | BackendReplyMessage): void {
    // #replyKindFor already checked that the head of the FIFO is this request.
    const entry = this.#pending.shift() as Pending;
    if (entry.timer) clearTimeout(entry.timer);
    if (message.kind === "ack" && message.payload !== 0n) {
      entry.reject(
        new VhostUserError("ERR_VHOST_REQUEST_FAILED", "peer answered with a failure ack", {
          request: entry.name,
          field: "ack",
          value: message.payload,
        }),
      );
      return;
    }
    entry.resolve(message);
  }

  #fail(err: unknown): void {
    const error =
      err instanceof VhostUserError
        ? err
        : new VhostUserError("ERR_VHOST_CLOSED", "unexpected failure", {
            request: this.name,
            cause: err,
          });
    this.#emit("warn", error.message);
    if (this.listenerCount("error") > 0) this.emit("error", error);
    this.close(error);
  }

  // --- helpers --------------------------------------------------------------------------

  #watch(events: number): void {
    if (this.#closed || this.#watching === events) return;
    this.#watching = events;
    this.#watcher.start(events);
  }

  #closeFd(fd: number): void {
    try {
      this.#io.close(fd);
    } catch (err) {
      this.#emit("warn", `close(${fd}) failed: ${(err as Error).message}`);
    }
  }

  #nameOf(data: Uint8Array): string {
    const request = new DataView(data.buffer, data.byteOffset, HEADER_SIZE).getUint32(0, true);
    return requestSpec(this.table, request)?.name ?? String(request);
  }

  #publishOut(data: Uint8Array, fds: number, kind: "request" | "reply" | "ack"): void {
    if (!this.#diag.hasSubscribers && !this.#logger) return;
    const dv = new DataView(data.buffer, data.byteOffset, HEADER_SIZE);
    const request = dv.getUint32(0, true);
    const flags = dv.getUint32(4, true);
    const info: MessageDiagnostic = {
      direction: "out",
      name: requestSpec(this.table, request)?.name ?? String(request),
      request,
      kind: (flags & FLAG_REPLY) !== 0 ? kind : "request",
      flags,
      size: dv.getUint32(8, true),
      fds,
      channel: this.name,
    };
    this.#diag.publish(info);
    this.#emit(
      "debug",
      `-> ${info.name} flags=0x${flags.toString(16)} size=${info.size} fds=${fds}`,
    );
  }

  #publishIn(message: DecodedMessage): void {
    if (!this.#diag.hasSubscribers && !this.#logger) return;
    const info: MessageDiagnostic = {
      direction: "in",
      name: message.name,
      request: message.request,
      kind: message.kind,
      flags: message.flags,
      size: message.size,
      fds: message.fds.length,
      channel: this.name,
    };
    this.#diag.publish(info);
    this.#emit(
      "debug",
      `<- ${info.name} flags=0x${info.flags.toString(16)} size=${info.size} fds=${info.fds}` +
        ((message.flags & FLAG_NEED_REPLY) !== 0 ? " need-reply" : ""),
    );
  }

  #emit(level: keyof ChannelLogger, message: string): void {
    this.#logger?.[level](`${this.name}: ${message}`);
  }
}
