/**
 * Header and framing: encoders for whole messages (header + payload) and a streaming decoder
 * that accepts any chunking of the byte stream, validates each header before allocating its
 * body, and attaches the fds of each `recvmsg` to the right message.
 *
 * vhost-user: "Message specification" (header, flags), "Communication" (replies, fds).
 */
import {
  BackendRequest,
  FLAG_NEED_REPLY,
  FLAG_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  MAX_PAYLOAD_SIZE,
  RESERVED_FLAGS_MASK,
  VERSION_MASK,
  VHOST_USER_VERSION,
} from "./constants.js";
import { type Codec, type SizeRange, u64Codec } from "./codecs.js";
import { VhostUserError } from "./errors.js";
import {
  type AnyRequestSpec,
  type BackendReplyPayloads,
  type BackendRequestPayloads,
  type FrontendReplyPayloads,
  type FrontendRequestPayloads,
  type TableName,
  requestSpec,
} from "./table.js";

/** The 12-byte message header. */
export interface MessageHeader {
  /** request id (u32) */
  request: number;
  /** flags (u32): version bits 0-1, REPLY bit 2, NEED_REPLY bit 3 */
  flags: number;
  /** payload size in bytes (u32) */
  size: number;
}

/**
 * Encode a header (vhost-user: "Header").
 * @param header request, flags and size (each a u32)
 * @returns 12 bytes
 * @throws RangeError when a field is not a u32
 */
export function encodeHeader(header: MessageHeader): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE);
  writeHeader(out, header);
  return out;
}

function writeHeader(out: Uint8Array, header: MessageHeader): void {
  for (const key of ["request", "flags", "size"] as const) {
    const v = header[key];
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
      throw new RangeError(`header ${key} is not a u32 (${key}=${String(v)})`);
    }
  }
  const dv = new DataView(out.buffer, out.byteOffset, HEADER_SIZE);
  dv.setUint32(0, header.request, true);
  dv.setUint32(4, header.flags, true);
  dv.setUint32(8, header.size, true);
}

/**
 * Decode a header without validating it (vhost-user: "Header").
 * @param bytes at least 12 bytes from `offset`
 * @param offset where the header starts
 * @returns request, flags and size
 * @throws VhostUserError ERR_VHOST_TRUNCATED when fewer than 12 bytes are given
 */
export function decodeHeader(bytes: Uint8Array, offset = 0): MessageHeader {
  if (bytes.length - offset < HEADER_SIZE) {
    throw new VhostUserError("ERR_VHOST_TRUNCATED", "header shorter than 12 bytes", {
      request: "header",
      field: "length",
      value: bytes.length - offset,
    });
  }
  const dv = new DataView(bytes.buffer, bytes.byteOffset + offset, HEADER_SIZE);
  return {
    request: dv.getUint32(0, true),
    flags: dv.getUint32(4, true),
    size: dv.getUint32(8, true),
  };
}

/** Fields every decoded message has. */
interface MessageCommon {
  /** spec name of the request */
  name: string;
  /** header flags */
  flags: number;
  /** NEED_REPLY was set */
  needReply: boolean;
  /** payload size from the header */
  size: number;
  /** fds that arrived with the message; whoever receives the message owns them */
  fds: number[];
}

/** A decoded request of table `T` with id `K`. */
export type RequestMessageOf<T extends TableName, K extends number, P> = MessageCommon & {
  kind: "request";
  table: T;
  request: K;
  payload: P;
};

/** A decoded reply body of table `T` to request `K`. */
export type ReplyMessageOf<T extends TableName, K extends number, P> = MessageCommon & {
  kind: "reply";
  table: T;
  request: K;
  payload: P;
};

/** A decoded REPLY_ACK u64 (0 = success) to request `K`. */
export type AckMessageOf<T extends TableName, K extends number> = MessageCommon & {
  kind: "ack";
  table: T;
  request: K;
  payload: bigint;
};

/** A decoded front-end request (what a back-end receives on the main channel). */
export type FrontendRequestMessage = {
  [K in FrontendRequest]: RequestMessageOf<"frontend", K, FrontendRequestPayloads[K]>;
}[FrontendRequest];

/** A decoded reply to a front-end request (what a front-end receives on the main channel). */
export type FrontendReplyMessage =
  | {
      [K in FrontendRequest]: ReplyMessageOf<"frontend", K, FrontendReplyPayloads[K]>;
    }[FrontendRequest]
  | AckMessageOf<"frontend", FrontendRequest>;

/** A decoded back-end request (what a front-end receives on the back-end channel). */
export type BackendRequestMessage = {
  [K in BackendRequest]: RequestMessageOf<"backend", K, BackendRequestPayloads[K]>;
}[BackendRequest];

/** A decoded reply to a back-end request (what a back-end receives on the back-end channel). */
export type BackendReplyMessage =
  | {
      [K in BackendRequest]: ReplyMessageOf<"backend", K, BackendReplyPayloads[K]>;
    }[BackendRequest]
  | AckMessageOf<"backend", BackendRequest>;

/** What a decoder expects: requests or replies. */
export type Expect = "request" | "reply";

/** The decoded message type for a table and an expectation. */
export type DecodedMessageOf<T extends TableName, E extends Expect> = T extends "frontend"
  ? E extends "request"
    ? FrontendRequestMessage
    : FrontendReplyMessage
  : E extends "request"
    ? BackendRequestMessage
    : BackendReplyMessage;

/** Any decoded message. */
export type DecodedMessage =
  FrontendRequestMessage | FrontendReplyMessage | BackendRequestMessage | BackendReplyMessage;

/** Request ids of a table. */
export interface RequestIdMap {
  frontend: FrontendRequest;
  backend: BackendRequest;
}
/** Request payload types of a table. */
export interface RequestPayloadMap {
  frontend: FrontendRequestPayloads;
  backend: BackendRequestPayloads;
}
/** Reply payload types of a table. */
export interface ReplyPayloadMap {
  frontend: FrontendReplyPayloads;
  backend: BackendReplyPayloads;
}

/** Options of request encoders. */
export interface EncodeRequestOptions {
  /** set NEED_REPLY (REPLY_ACK) */
  needReply?: boolean;
}

function specOrThrow(table: TableName, request: number): AnyRequestSpec {
  const spec = requestSpec(table, request);
  if (!spec) {
    throw new VhostUserError("ERR_VHOST_UNKNOWN_REQUEST", `unknown ${table} request`, {
      request: "header",
      field: "request",
      value: request,
    });
  }
  return spec;
}

function checkRange(range: SizeRange, size: number, request: string, what: string): void {
  if (size < range.min || size > range.max) {
    throw new VhostUserError(
      "ERR_VHOST_BAD_PAYLOAD_SIZE",
      `${what} must be ${range.min === range.max ? range.min : `${range.min}..${range.max}`} bytes`,
      { request, field: "size", value: size },
    );
  }
}

function frame(request: number, flags: number, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + body.length);
  writeHeader(out, { request, flags, size: body.length });
  out.set(body, HEADER_SIZE);
  return out;
}

/**
 * Encode a whole request (header + payload) of either table.
 * @param table which table
 * @param request request id
 * @param payload payload matching the table's codec
 * @param options NEED_REPLY
 * @returns the wire bytes
 * @throws VhostUserError for an unknown id or a payload field out of range
 */
export function encodeRequest<T extends TableName, K extends RequestIdMap[T]>(
  table: T,
  request: K,
  payload: RequestPayloadMap[T][K & keyof RequestPayloadMap[T]],
  options: EncodeRequestOptions = {},
): Uint8Array {
  const spec = specOrThrow(table, request);
  const body = (spec.codec as Codec<unknown>).encode(payload, spec.name);
  checkRange(spec.size, body.length, spec.name, "request payload");
  const flags = VHOST_USER_VERSION | (options.needReply ? FLAG_NEED_REPLY : 0);
  return frame(request, flags, body);
}

/**
 * Encode a whole reply body (header with REPLY set + payload) of either table.
 * @param table which table
 * @param request id of the request answered
 * @param payload reply payload matching the table's reply codec
 * @returns the wire bytes
 * @throws VhostUserError when the request has no reply body or a field is out of range
 */
export function encodeReply<T extends TableName, K extends RequestIdMap[T]>(
  table: T,
  request: K,
  payload: ReplyPayloadMap[T][K & keyof ReplyPayloadMap[T]],
): Uint8Array {
  const spec = specOrThrow(table, request);
  if (spec.replyCodec === null || spec.replySize === null) {
    throw new VhostUserError(
      "ERR_VHOST_UNEXPECTED_REPLY",
      "request has no reply body (use an ack)",
      {
        request: spec.name,
      },
    );
  }
  const body = (spec.replyCodec as Codec<unknown>).encode(payload, spec.name);
  checkRange(spec.replySize, body.length, spec.name, "reply payload");
  return frame(request, VHOST_USER_VERSION | FLAG_REPLY, body);
}

/**
 * Encode a REPLY_ACK reply: a u64, 0 for success (vhost-user: VHOST_USER_PROTOCOL_F_REPLY_ACK).
 * @param table which table the answered request belongs to
 * @param request id of the request answered
 * @param result `true` (0), `false` (1), or the u64 to send
 * @returns the wire bytes
 */
export function encodeAck(table: TableName, request: number, result: boolean | bigint): Uint8Array {
  const spec = specOrThrow(table, request);
  const value = typeof result === "bigint" ? result : result ? 0n : 1n;
  return frame(request, VHOST_USER_VERSION | FLAG_REPLY, u64Codec.encode(value, spec.name));
}

/**
 * Encode a front-end request (vhost-user: "Front-end message types").
 * @param request request id
 * @param payload its payload type
 * @param options NEED_REPLY
 * @returns header + payload
 */
export function encodeFrontendRequest<K extends FrontendRequest>(
  request: K,
  payload: FrontendRequestPayloads[K],
  options: EncodeRequestOptions = {},
): Uint8Array {
  return encodeRequest("frontend", request, payload, options);
}

/**
 * Encode a back-end's reply body to a front-end request.
 * @param request id of the request answered
 * @param payload its reply payload type
 * @returns header (REPLY set) + payload
 */
export function encodeFrontendReply<K extends FrontendRequest>(
  request: K,
  payload: FrontendReplyPayloads[K],
): Uint8Array {
  return encodeReply("frontend", request, payload);
}

/**
 * Encode a back-end request (vhost-user: "Back-end message types").
 * @param request request id
 * @param payload its payload type
 * @param options NEED_REPLY
 * @returns header + payload
 */
export function encodeBackendRequest<K extends BackendRequest>(
  request: K,
  payload: BackendRequestPayloads[K],
  options: EncodeRequestOptions = {},
): Uint8Array {
  return encodeRequest("backend", request, payload, options);
}

/**
 * Encode a front-end's reply body to a back-end request.
 * @param request id of the request answered
 * @param payload its reply payload type
 * @returns header (REPLY set) + payload
 */
export function encodeBackendReply<K extends BackendRequest>(
  request: K,
  payload: BackendReplyPayloads[K],
): Uint8Array {
  return encodeReply("backend", request, payload);
}

/** Options of {@link MessageDecoder}. */
export interface MessageDecoderOptions<T extends TableName, E extends Expect> {
  /** which request table the stream carries */
  table: T;
  /** requests (REPLY flag must be clear) or replies (REPLY flag must be set) */
  expect: E;
  /** largest payload accepted (default {@link MAX_PAYLOAD_SIZE}) */
  maxPayload?: number;
  /**
   * For a reply decoder: whether the reply to `request` is a body or a u64 ack. Called when the
   * reply is decoded, in stream order. Default: a body when the table has a reply body that
   * does not depend on postcopy, an ack otherwise.
   */
  replyKind?: (request: number) => "body" | "ack";
}

interface Holder {
  header: MessageHeader | null;
  spec: AnyRequestSpec | null;
  body: Uint8Array | null;
  fill: number;
  fds: number[];
  error: VhostUserError | null;
}

function newHolder(): Holder {
  return { header: null, spec: null, body: null, fill: 0, fds: [], error: null };
}

const ACK_RANGE: SizeRange = Object.freeze({ min: 8, max: 8 });

/** The default reply kind: a body when the table always has one, else an ack. */
function defaultReplyKind(spec: AnyRequestSpec): "body" | "ack" {
  return spec.reply === "always" && spec.replyCodec !== null ? "body" : "ack";
}

/** Size range a reply header may claim: body range, ack, or both when either may come. */
function replyHeaderRange(spec: AnyRequestSpec): SizeRange {
  const body = spec.replySize;
  if (body === null) return ACK_RANGE;
  if (spec.reply === "always" && spec.replyFeature === null) return body;
  return { min: Math.min(body.min, 8), max: Math.max(body.max, 8) };
}

/**
 * A streaming decoder of one direction of a vhost-user stream.
 *
 * - `feed(chunk, fds)` frames bytes; each header is validated as soon as its 12 bytes are in
 *   (version 1, reserved flag bits clear, REPLY flag as expected, known request id, size within
 *   the cap and the request's bounds) before its body is allocated.
 * - fds of one `recvmsg` attach to the last message that started in that chunk, or, if none
 *   started in it, to the message in progress.
 * - `next()` returns complete messages in order: fd counts are checked against the table, the
 *   payload is decoded and the table's semantic check runs. Errors are thrown in stream order
 *   (messages before a bad header are returned first).
 * - After a fatal error the decoder is poisoned: it throws that error again. It never closes an
 *   fd: those of failed or abandoned messages go to {@link MessageDecoder.drainFds}.
 */
export class MessageDecoder<T extends TableName = TableName, E extends Expect = Expect> {
  /** which request table */
  readonly table: T;
  /** requests or replies */
  readonly expect: E;
  private readonly maxPayload: number;
  private readonly replyKind: ((request: number) => "body" | "ack") | undefined;
  private readonly headerBuf = new Uint8Array(HEADER_SIZE);
  private headerFill = 0;
  private current: Holder | null = null;
  private readonly ready: Holder[] = [];
  private pool: number[] = [];
  private failed: VhostUserError | null = null;
  private stopped = false;
  private largest = 0;

  /**
   * Create a decoder.
   * @param options table, expectation, cap and reply-kind resolver
   */
  constructor(options: MessageDecoderOptions<T, E>) {
    this.table = options.table;
    this.expect = options.expect;
    this.maxPayload = options.maxPayload ?? MAX_PAYLOAD_SIZE;
    this.replyKind = options.replyKind;
  }

  /** Bytes of the message in progress (header and body) held so far; 0 between messages. */
  get pendingBytes(): number {
    if (!this.current) return 0;
    return this.current.header ? HEADER_SIZE + this.current.fill : this.headerFill;
  }

  /** Complete messages framed but not yet returned by {@link next}. */
  get pendingMessages(): number {
    return this.ready.length;
  }

  /** Largest body buffer allocated so far (never above the cap). */
  get largestAllocation(): number {
    return this.largest;
  }

  /**
   * Frame a chunk of the stream (one `recvmsg`) and the fds that came with it.
   * @param chunk bytes; copied, so the caller may reuse its buffer
   * @param fds fds received with these bytes; the decoder holds them until they are returned
   *   with a message or drained
   * @throws VhostUserError the fatal error of an earlier call (the decoder is poisoned)
   */
  feed(chunk: Uint8Array, fds: readonly number[] = []): void {
    if (this.failed) {
      this.pool.push(...fds);
      throw this.failed;
    }
    if (this.stopped) {
      // A header error is queued: bytes after it cannot be framed.
      this.pool.push(...fds);
      return;
    }
    const atStart = this.current;
    let lastStarted: Holder | null = null;
    let pos = 0;
    while (pos < chunk.length) {
      let cur = this.current;
      if (cur === null) {
        cur = newHolder();
        this.current = cur;
        this.headerFill = 0;
        lastStarted = cur;
      }
      if (cur.header === null) {
        const n = Math.min(HEADER_SIZE - this.headerFill, chunk.length - pos);
        this.headerBuf.set(chunk.subarray(pos, pos + n), this.headerFill);
        this.headerFill += n;
        pos += n;
        if (this.headerFill < HEADER_SIZE) break;
        const header = decodeHeader(this.headerBuf);
        try {
          cur.spec = this.validateHeader(header);
        } catch (err) {
          cur.error = err as VhostUserError;
          this.ready.push(cur);
          this.current = null;
          this.stopped = true;
          break;
        }
        cur.header = header;
        // Allocation happens only after the header passed every check above.
        cur.body = new Uint8Array(header.size);
        if (header.size > this.largest) this.largest = header.size;
      }
      const body = cur.body as Uint8Array;
      const n = Math.min(body.length - cur.fill, chunk.length - pos);
      body.set(chunk.subarray(pos, pos + n), cur.fill);
      cur.fill += n;
      pos += n;
      if (cur.fill === body.length) {
        this.ready.push(cur);
        this.current = null;
      }
    }
    if (fds.length > 0) {
      const target = lastStarted ?? atStart;
      if (target) {
        target.fds.push(...fds);
      } else {
        const stray = newHolder();
        stray.fds.push(...fds);
        stray.error = new VhostUserError(
          "ERR_VHOST_UNEXPECTED_FDS",
          "fds arrived without message bytes",
          {
            request: "stream",
            field: "fds",
            value: fds.length,
          },
        );
        this.ready.push(stray);
      }
    }
  }

  /**
   * Return the next complete message.
   * @returns the message (its fds now belong to the caller), or undefined when none is complete
   * @throws VhostUserError for the next bad message in stream order
   */
  next(): DecodedMessageOf<T, E> | undefined {
    if (this.failed) throw this.failed;
    const holder = this.ready.shift();
    if (!holder) return undefined;
    try {
      if (holder.error) throw holder.error;
      return this.decodeHolder(holder);
    } catch (err) {
      this.pool.push(...holder.fds);
      holder.fds = [];
      const error =
        err instanceof VhostUserError
          ? err
          : new VhostUserError("ERR_VHOST_BAD_FIELD", "payload could not be decoded", {
              request: holder.spec?.name ?? "header",
              cause: err,
              fatal: true,
            });
      if (error.fatal) this.poison(error);
      throw error;
    }
  }

  /**
   * Frame a chunk and return every message it completes.
   * All-or-nothing: on error the messages decoded in this call are discarded and their fds go to
   * {@link drainFds}. Use {@link feed} and {@link next} to get the messages before an error.
   * @param chunk bytes
   * @param fds fds received with them
   * @returns the complete messages, in order
   * @throws VhostUserError for the first bad message
   */
  push(chunk: Uint8Array, fds: readonly number[] = []): DecodedMessageOf<T, E>[] {
    this.feed(chunk, fds);
    const out: DecodedMessageOf<T, E>[] = [];
    try {
      for (let m = this.next(); m !== undefined; m = this.next()) out.push(m);
    } catch (err) {
      for (const m of out) this.pool.push(...m.fds);
      throw err;
    }
    return out;
  }

  /**
   * The error to report when the stream ends now, or null at a message boundary. The fds of the
   * unfinished message move to {@link drainFds}.
   * @returns ERR_VHOST_TRUNCATED naming the request and the missing byte count, or null
   */
  finish(): VhostUserError | null {
    const cur = this.current;
    if (!cur) return null;
    this.current = null;
    this.pool.push(...cur.fds);
    cur.fds = [];
    let error: VhostUserError;
    if (cur.header && cur.spec) {
      const missing = cur.header.size - cur.fill;
      error = new VhostUserError(
        "ERR_VHOST_TRUNCATED",
        `peer hung up mid-message, ${missing} of ${cur.header.size} payload bytes missing`,
        { request: cur.spec.name, field: "missing", value: missing },
      );
    } else {
      const missing = HEADER_SIZE - this.headerFill;
      error = new VhostUserError(
        "ERR_VHOST_TRUNCATED",
        `peer hung up mid-header, ${missing} of ${HEADER_SIZE} header bytes missing`,
        { request: "header", field: "missing", value: missing },
      );
    }
    this.poison(error);
    return error;
  }

  /**
   * Take every fd the decoder still holds: those of failed messages, of the message in progress
   * and of complete messages not yet returned. The decoder is unusable afterwards (it is meant
   * for closing a connection); the caller must close the fds.
   * @returns the fds
   */
  drainFds(): number[] {
    if (!this.failed) {
      this.poison(new VhostUserError("ERR_VHOST_CLOSED", "decoder drained", { request: "stream" }));
    }
    const fds = this.pool;
    this.pool = [];
    return fds;
  }

  private poison(error: VhostUserError): void {
    this.failed = error;
    for (const h of this.ready) this.pool.push(...h.fds);
    this.ready.length = 0;
    if (this.current) this.pool.push(...this.current.fds);
    this.current = null;
  }

  private validateHeader(header: MessageHeader): AnyRequestSpec {
    const { flags, request, size } = header;
    if ((flags & VERSION_MASK) !== VHOST_USER_VERSION) {
      throw new VhostUserError("ERR_VHOST_BAD_VERSION", "unsupported protocol version", {
        request: "header",
        field: "version",
        value: flags & VERSION_MASK,
      });
    }
    if ((flags & RESERVED_FLAGS_MASK) !== 0) {
      throw new VhostUserError("ERR_VHOST_RESERVED_FLAGS", "reserved flag bits set", {
        request: "header",
        field: "flags",
        value: `0x${(flags >>> 0).toString(16)}`,
      });
    }
    const isReply = (flags & FLAG_REPLY) !== 0;
    const spec = requestSpec(this.table, request);
    const name = spec?.name ?? "header";
    if (this.expect === "request" && isReply) {
      throw new VhostUserError("ERR_VHOST_UNEXPECTED_REPLY", "reply flag set on a request", {
        request: name,
        field: "flags",
        value: `0x${flags.toString(16)}`,
      });
    }
    if (this.expect === "reply" && !isReply) {
      throw new VhostUserError("ERR_VHOST_BAD_FIELD", "reply flag missing on a reply", {
        request: name,
        field: "flags",
        value: `0x${flags.toString(16)}`,
        fatal: true,
      });
    }
    if (!spec) {
      throw new VhostUserError("ERR_VHOST_UNKNOWN_REQUEST", `unknown ${this.table} request`, {
        request: "header",
        field: "request",
        value: request,
      });
    }
    if (size > this.maxPayload) {
      throw new VhostUserError(
        "ERR_VHOST_PAYLOAD_TOO_LARGE",
        `payload above the ${this.maxPayload}-byte cap`,
        { request: spec.name, field: "size", value: size },
      );
    }
    const range = this.expect === "request" ? spec.size : replyHeaderRange(spec);
    checkRange(
      range,
      size,
      spec.name,
      this.expect === "request" ? "request payload" : "reply payload",
    );
    return spec;
  }

  private decodeHolder(holder: Holder): DecodedMessageOf<T, E> {
    const header = holder.header as MessageHeader;
    const spec = holder.spec as AnyRequestSpec;
    const body = holder.body as Uint8Array;
    const name = spec.name;
    let kind: "request" | "reply" | "ack";
    let codec: Codec<unknown>;
    let fdRange: SizeRange;
    let check: ((payload: unknown, fds: readonly number[], request: string) => void) | undefined;
    if (this.expect === "request") {
      kind = "request";
      codec = spec.codec;
      fdRange = spec.fds;
      check = spec.check?.bind(spec);
    } else {
      const wanted = this.replyKind ? this.replyKind(header.request) : defaultReplyKind(spec);
      if (wanted === "body" && spec.replyCodec !== null) {
        kind = "reply";
        codec = spec.replyCodec;
        fdRange = spec.replyFds;
        check = spec.replyCheck?.bind(spec);
      } else {
        kind = "ack";
        codec = u64Codec;
        fdRange = { min: 0, max: 0 };
      }
    }
    const sizeRange =
      kind === "ack" ? ACK_RANGE : kind === "reply" ? (spec.replySize as SizeRange) : spec.size;
    if (body.length < sizeRange.min || body.length > sizeRange.max) {
      throw new VhostUserError(
        "ERR_VHOST_BAD_PAYLOAD_SIZE",
        `${kind} payload must be ${sizeRange.min === sizeRange.max ? sizeRange.min : `${sizeRange.min}..${sizeRange.max}`} bytes`,
        { request: name, field: "size", value: body.length, fatal: false },
      );
    }
    const fds = holder.fds;
    if (fds.length > fdRange.max) {
      throw new VhostUserError("ERR_VHOST_UNEXPECTED_FDS", `at most ${fdRange.max} fds expected`, {
        request: name,
        field: "fds",
        value: fds.length,
      });
    }
    if (fds.length < fdRange.min) {
      throw new VhostUserError("ERR_VHOST_MISSING_FDS", `at least ${fdRange.min} fds expected`, {
        request: name,
        field: "fds",
        value: fds.length,
      });
    }
    const payload = codec.decode(body, name);
    check?.(payload, fds, name);
    holder.fds = [];
    const message = {
      kind,
      table: this.table,
      request: header.request,
      name,
      flags: header.flags,
      needReply: (header.flags & FLAG_NEED_REPLY) !== 0,
      size: header.size,
      payload,
      fds,
    };
    return message as unknown as DecodedMessageOf<T, E>;
  }
}
