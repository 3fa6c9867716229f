/**
 * Coded protocol errors.
 *
 * Every error names the request, what was wrong, and the offending field and value:
 * `${REQUEST_NAME}: <what> (<field>=<value>)`.
 *
 * `fatal` says whether the byte stream can go on after the error:
 * - fatal (the stream cannot be resynchronised, or the reply order is lost): BAD_VERSION,
 *   RESERVED_FLAGS, UNKNOWN_REQUEST, PAYLOAD_TOO_LARGE, BAD_PAYLOAD_SIZE (rejected from the
 *   header, before the body is read), TRUNCATED, UNEXPECTED_REPLY, CLOSED, TIMEOUT;
 * - non-fatal (the message boundary is intact; a handler may answer with a failed ack):
 *   BAD_FIELD, UNEXPECTED_FDS, MISSING_FDS, NOT_NEGOTIATED, REQUEST_FAILED.
 *
 * {@link Channel} closes the connection on every error found in a received message, fatal or
 * not: a peer that breaks the syntax is not trusted further. `fatal` matters to code that
 * raises errors itself (an engine rejecting a request after its semantic checks).
 */

/** Stable error codes. */
export type VhostErrorCode =
  | "ERR_VHOST_BAD_VERSION"
  | "ERR_VHOST_RESERVED_FLAGS"
  | "ERR_VHOST_UNKNOWN_REQUEST"
  | "ERR_VHOST_PAYLOAD_TOO_LARGE"
  | "ERR_VHOST_BAD_PAYLOAD_SIZE"
  | "ERR_VHOST_BAD_FIELD"
  | "ERR_VHOST_UNEXPECTED_FDS"
  | "ERR_VHOST_MISSING_FDS"
  | "ERR_VHOST_TRUNCATED"
  | "ERR_VHOST_UNEXPECTED_REPLY"
  | "ERR_VHOST_NOT_NEGOTIATED"
  | "ERR_VHOST_CLOSED"
  | "ERR_VHOST_REQUEST_FAILED"
  | "ERR_VHOST_TIMEOUT";

/** Whether each code is fatal to the stream unless the thrower says otherwise. */
export const FATAL_BY_DEFAULT: Readonly<Record<VhostErrorCode, boolean>> = Object.freeze({
  ERR_VHOST_BAD_VERSION: true,
  ERR_VHOST_RESERVED_FLAGS: true,
  ERR_VHOST_UNKNOWN_REQUEST: true,
  ERR_VHOST_PAYLOAD_TOO_LARGE: true,
  ERR_VHOST_BAD_PAYLOAD_SIZE: true,
  ERR_VHOST_BAD_FIELD: false,
  ERR_VHOST_UNEXPECTED_FDS: false,
  ERR_VHOST_MISSING_FDS: false,
  ERR_VHOST_TRUNCATED: true,
  ERR_VHOST_UNEXPECTED_REPLY: true,
  ERR_VHOST_NOT_NEGOTIATED: false,
  ERR_VHOST_CLOSED: true,
  ERR_VHOST_REQUEST_FAILED: false,
  ERR_VHOST_TIMEOUT: true,
});

/** Options of {@link VhostUserError}. */
export interface VhostUserErrorOptions {
  /** request name, e.g. `"SET_VRING_ADDR"`; `"header"` for header errors before the id is known */
  request?: string;
  /** the offending field */
  field?: string;
  /** the offending value */
  value?: unknown;
  /** override the code's default {@link FATAL_BY_DEFAULT} */
  fatal?: boolean;
  /** the underlying error */
  cause?: unknown;
}

/**
 * Render a field value for an error message: bigints in hex, byte arrays in hex, the rest as
 * strings.
 * @param value any value
 * @returns a short printable form
 */
export function formatValue(value: unknown): string {
  if (typeof value === "bigint") return `0x${value.toString(16)}`;
  if (value instanceof Uint8Array) {
    const shown = Array.from(value.subarray(0, 32), (b) => b.toString(16).padStart(2, "0"));
    return shown.join("") + (value.length > 32 ? "..." : "");
  }
  if (Array.isArray(value)) return `[${value.map(formatValue).join(",")}]`;
  return String(value);
}

/**
 * A vhost-user protocol error with a stable code (vhost-user spec throughout; see the module
 * comment for which codes are fatal).
 */
export class VhostUserError extends Error {
  /** stable code, e.g. `"ERR_VHOST_BAD_FIELD"` */
  readonly code: VhostErrorCode;
  /** request name when there is one */
  readonly request: string | undefined;
  /** offending field when there is one */
  readonly field: string | undefined;
  /** offending value when there is one */
  readonly value: unknown;
  /** true when the connection cannot go on */
  readonly fatal: boolean;

  /**
   * Build an error.
   * @param code stable code
   * @param what what was wrong, in a few words
   * @param options request, field, value, fatal override, cause
   */
  constructor(code: VhostErrorCode, what: string, options: VhostUserErrorOptions = {}) {
    const prefix = options.request ?? "vhost-user";
    const detail =
      options.field !== undefined ? ` (${options.field}=${formatValue(options.value)})` : "";
    super(
      `${prefix}: ${what}${detail}`,
      options.cause !== undefined ? { cause: options.cause } : undefined,
    );
    this.name = "VhostUserError";
    this.code = code;
    this.request = options.request;
    this.field = options.field;
    this.value = options.value;
    this.fatal = options.fatal ?? FATAL_BY_DEFAULT[code];
  }
}

/**
 * Type guard for {@link VhostUserError}, optionally of one code.
 * @param err any thrown value
 * @param code the code to match, if any
 * @returns true when `err` is a VhostUserError (with that code)
 */
export function isVhostUserError(err: unknown, code?: VhostErrorCode): err is VhostUserError {
  return err instanceof VhostUserError && (code === undefined || err.code === code);
}
