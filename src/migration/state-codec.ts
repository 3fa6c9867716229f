/**
 * The pieces a migration stage uses to encode its state: the coded error, CRC-32, and the
 * big-endian (network order, as passt) {@link StageWriter} and {@link StageReader}.
 *
 * Readers treat their bytes as untrusted: every read is bounds-checked, every count and length
 * is checked against a caller-given maximum before anything is allocated, and every failure is
 * a {@link MigrationStreamError} naming the stage, the field and the offending value.
 */
import zlib from "node:zlib";
import { formatValue } from "../protocol/errors.js";
import { parseMac } from "../net/frame.js";

/** The one stable code of {@link MigrationStreamError}. */
export const ERR_VHOST_MIGRATION_STREAM = "ERR_VHOST_MIGRATION_STREAM";

/**
 * What went wrong, finer than the code:
 * - `BAD_MAGIC`: the header's magic is not 0xB1BB1D1B0BB1D1B0;
 * - `BAD_HEADER`: version or compat_version is 0, or compat_version > version;
 * - `NO_COMPATIBLE_VERSION`: no local version lies in the source's [compat_version, version];
 * - `TRUNCATED`: the stream, or a stage's section, ended before a field;
 * - `CRC_MISMATCH`: a section's (or the whole stream's) CRC-32 does not match;
 * - `UNEXPECTED_STAGE`: a section arrived out of order, or the end came early or late;
 * - `TOO_LARGE`: a length, count or total exceeds its cap (checked before allocating);
 * - `TRAILING_BYTES`: bytes left after the end record, or in a section after its target read;
 * - `BAD_VALUE`: a field's value is out of range (reader), or cannot be encoded (writer);
 * - `BAD_DEFINITION`: the version/stage tables are malformed (a programming error);
 * - `STAGE_FAILED`: a stage's own source or target callback threw (the error is the `cause`);
 * - `APPLY_FAILED`: an apply closure threw during commit (earlier stages were applied);
 * - `ALREADY_COMMITTED`: commit() was called twice;
 * - `IO`: reading or writing the transfer fd failed (the native error is the `cause`);
 * - `ABORTED`: the caller's AbortSignal fired.
 */
export type MigrationStreamReason =
  | "BAD_MAGIC"
  | "BAD_HEADER"
  | "NO_COMPATIBLE_VERSION"
  | "TRUNCATED"
  | "CRC_MISMATCH"
  | "UNEXPECTED_STAGE"
  | "TOO_LARGE"
  | "TRAILING_BYTES"
  | "BAD_VALUE"
  | "BAD_DEFINITION"
  | "STAGE_FAILED"
  | "APPLY_FAILED"
  | "ALREADY_COMMITTED"
  | "IO"
  | "ABORTED";

/** Options of {@link MigrationStreamError}. */
export interface MigrationStreamErrorOptions {
  /** the stage being read or written, when there is one */
  stage?: string;
  /** the offending field */
  field?: string;
  /** the offending value */
  value?: unknown;
  /** the underlying error */
  cause?: unknown;
}

/**
 * An error in the migration stream or its transport. The message reads
 * `migration stage "<stage>": <what> (<field>=<value>)`.
 *
 * Shaped like `VhostUserError` (`code`, `field`, `value`, `fatal`) without deriving from
 * it: its code is not in the closed `VhostErrorCode` union of src/protocol/errors.ts.
 */
export class MigrationStreamError extends Error {
  /** always `"ERR_VHOST_MIGRATION_STREAM"` */
  readonly code: typeof ERR_VHOST_MIGRATION_STREAM = ERR_VHOST_MIGRATION_STREAM;
  /**
   * never fatal to the vhost-user connection: the transfer fails (the front-end's
   * CHECK_DEVICE_STATE reports it) and the channel goes on
   */
  readonly fatal = false as const;
  /** what went wrong, see {@link MigrationStreamReason} */
  readonly reason: MigrationStreamReason;
  /** the stage being read or written, when there is one */
  readonly stage: string | undefined;
  /** the offending field, when there is one */
  readonly field: string | undefined;
  /** the offending value, when there is one */
  readonly value: unknown;

  /**
   * Build an error.
   * @param reason what went wrong
   * @param what what was wrong, in a few words
   * @param options stage, field, value, cause
   */
  constructor(
    reason: MigrationStreamReason,
    what: string,
    options: MigrationStreamErrorOptions = {},
  ) {
    const prefix =
      options.stage !== undefined ? `migration stage "${options.stage}"` : "migration stream";
    const detail =
      options.field !== undefined ? ` (${options.field}=${formatValue(options.value)})` : "";
    super(
      `${prefix}: ${what}${detail}`,
      options.cause !== undefined ? { cause: options.cause } : undefined,
    );
    this.name = "MigrationStreamError";
    this.reason = reason;
    this.stage = options.stage;
    this.field = options.field;
    this.value = options.value;
  }
}

/**
 * Type guard for {@link MigrationStreamError}, optionally of one reason.
 * @param err any thrown value
 * @param reason the reason to match, if any
 * @returns true when `err` is a MigrationStreamError (with that reason)
 */
export function isMigrationStreamError(
  err: unknown,
  reason?: MigrationStreamReason,
): err is MigrationStreamError {
  return err instanceof MigrationStreamError && (reason === undefined || err.reason === reason);
}

// --- CRC-32 ---------------------------------------------------------------------------------

/** CRC-32 (IEEE 802.3, reflected, the zlib one) with the previous value to continue from. */
type Crc32Fn = (data: Uint8Array, previous?: number) => number;

function makeCrc32Table(): Uint32Array {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

/**
 * CRC-32 in JavaScript, for Node versions without `zlib.crc32` (added in 20.15 / 22.2).
 * @param data the bytes
 * @param previous the CRC of the bytes before `data` (0 to start)
 * @returns the CRC-32 of everything so far, as an unsigned 32-bit number
 */
export function crc32Table(data: Uint8Array, previous = 0): number {
  const table = CRC32_TABLE;
  let c = ~previous >>> 0;
  for (let i = 0; i < data.length; i++) {
    c = (table[(c ^ (data[i] as number)) & 0xff] as number) ^ (c >>> 8);
  }
  return ~c >>> 0;
}

// Constant tables, filled once at load and never written afterwards.
const CRC32_TABLE = makeCrc32Table();
const ZLIB_CRC32 = (zlib as { crc32?: Crc32Fn }).crc32;

/**
 * CRC-32 (the zlib polynomial) of `data`, continuing from `previous`; uses `zlib.crc32` when
 * this Node has it.
 * @param data the bytes
 * @param previous the CRC of the bytes before `data` (0 to start)
 * @returns the CRC-32 as an unsigned 32-bit number
 */
export function crc32(data: Uint8Array, previous = 0): number {
  return typeof ZLIB_CRC32 === "function" ? ZLIB_CRC32(data, previous) : crc32Table(data, previous);
}

// --- MAC addresses --------------------------------------------------------------------------

/** Length of a MAC address in the stream. */
export const MAC_LENGTH = 6;

/** A MAC as its 6 bytes (frame.ts's parser), or BAD_VALUE naming the stage and field. */
function macBytes(stage: string, field: string, mac: Uint8Array | string): Uint8Array {
  if (typeof mac !== "string" && mac.length !== MAC_LENGTH) {
    throw new MigrationStreamError("BAD_VALUE", "a MAC address is 6 bytes", {
      stage,
      field: `${field}.length`,
      value: mac.length,
    });
  }
  try {
    return typeof mac === "string" ? parseMac(mac) : mac;
  } catch {
    throw new MigrationStreamError("BAD_VALUE", "malformed MAC address", {
      stage,
      field,
      value: mac,
    });
  }
}

// --- Writer ---------------------------------------------------------------------------------

/** Options of {@link StageWriter}. */
export interface StageWriterOptions {
  /** largest section the writer may produce, in bytes (default: no limit but 4 GiB - 1) */
  maxBytes?: number;
  /** the stage has no section (source-only): every write throws BAD_DEFINITION */
  noSection?: boolean;
}

const U32_MAX = 0xffff_ffff;
const U64_MAX = 0xffff_ffff_ffff_ffffn;
const INITIAL_CAPACITY = 256;

/**
 * Builds one stage's section, big-endian (network order). Every method names its field, which
 * appears in errors. Values out of range throw `BAD_VALUE`; growing past the cap throws
 * `TOO_LARGE`.
 *
 * Spec: vhost-user "Migrating back-end state" (the state format is the back-end's own; this is
 * vhostkit's, modelled on passt's migrate.c).
 */
export class StageWriter {
  /** the stage this writer belongs to */
  readonly stage: string;
  readonly #maxBytes: number;
  readonly #noSection: boolean;
  #buf = new Uint8Array(INITIAL_CAPACITY);
  #view = new DataView(this.#buf.buffer);
  #len = 0;

  /**
   * Create a writer for one stage.
   * @param stage the stage name (for errors)
   * @param options the cap, and whether the stage may write at all
   */
  constructor(stage: string, options: StageWriterOptions = {}) {
    this.stage = stage;
    this.#maxBytes = Math.min(options.maxBytes ?? U32_MAX, U32_MAX);
    this.#noSection = options.noSection ?? false;
  }

  /** Bytes written so far. */
  get length(): number {
    return this.#len;
  }

  /**
   * The section written so far (a view; the writer must not be used afterwards).
   * @returns the bytes
   */
  finish(): Uint8Array {
    return this.#buf.subarray(0, this.#len);
  }

  #reserve(field: string, n: number): number {
    if (this.#noSection) {
      throw new MigrationStreamError(
        "BAD_DEFINITION",
        "a stage without a target side has no section and cannot write",
        { stage: this.stage, field, value: n },
      );
    }
    const end = this.#len + n;
    if (end > this.#maxBytes) {
      throw new MigrationStreamError("TOO_LARGE", `section exceeds ${this.#maxBytes} bytes`, {
        stage: this.stage,
        field,
        value: end,
      });
    }
    if (end > this.#buf.length) {
      let cap = this.#buf.length * 2;
      while (cap < end) cap *= 2;
      const next = new Uint8Array(Math.max(end, Math.min(cap, this.#maxBytes)));
      next.set(this.#buf.subarray(0, this.#len));
      this.#buf = next;
      this.#view = new DataView(next.buffer);
    }
    const at = this.#len;
    this.#len = end;
    return at;
  }

  #checkInt(field: string, value: number, max: number): void {
    if (!Number.isInteger(value) || value < 0 || value > max) {
      throw new MigrationStreamError("BAD_VALUE", `value out of range [0, ${max}]`, {
        stage: this.stage,
        field,
        value,
      });
    }
  }

  // Every write reserves before touching #buf / #view: reserving may replace them.

  /**
   * Write an unsigned 8-bit integer.
   * @param field field name for errors
   * @param value 0..255
   * @throws MigrationStreamError BAD_VALUE when out of range
   */
  u8(field: string, value: number): void {
    this.#checkInt(field, value, 0xff);
    const at = this.#reserve(field, 1);
    this.#view.setUint8(at, value);
  }

  /**
   * Write an unsigned 16-bit integer, big-endian.
   * @param field field name for errors
   * @param value 0..65535
   * @throws MigrationStreamError BAD_VALUE when out of range
   */
  u16(field: string, value: number): void {
    this.#checkInt(field, value, 0xffff);
    const at = this.#reserve(field, 2);
    this.#view.setUint16(at, value, false);
  }

  /**
   * Write an unsigned 32-bit integer, big-endian.
   * @param field field name for errors
   * @param value 0..2^32-1
   * @throws MigrationStreamError BAD_VALUE when out of range
   */
  u32(field: string, value: number): void {
    this.#checkInt(field, value, U32_MAX);
    const at = this.#reserve(field, 4);
    this.#view.setUint32(at, value, false);
  }

  /**
   * Write an unsigned 64-bit integer, big-endian.
   * @param field field name for errors
   * @param value 0..2^64-1, as a bigint or a safe integer
   * @throws MigrationStreamError BAD_VALUE when out of range
   */
  u64(field: string, value: bigint | number): void {
    if (typeof value === "number") this.#checkInt(field, value, Number.MAX_SAFE_INTEGER);
    const v = BigInt(value);
    if (v < 0n || v > U64_MAX) {
      throw new MigrationStreamError("BAD_VALUE", "value out of range [0, 2^64-1]", {
        stage: this.stage,
        field,
        value: v,
      });
    }
    const at = this.#reserve(field, 8);
    this.#view.setBigUint64(at, v, false);
  }

  /**
   * Write a boolean as one byte (0 or 1).
   * @param field field name for errors
   * @param value the flag
   */
  bool(field: string, value: boolean): void {
    this.u8(field, value ? 1 : 0);
  }

  /**
   * Write bytes as they are, without a length (the reader must know the length).
   * @param field field name for errors
   * @param data the bytes
   * @param length the length the reader expects, checked when given
   * @throws MigrationStreamError BAD_VALUE when `data` has another length
   */
  fixed(field: string, data: Uint8Array, length?: number): void {
    if (length !== undefined && data.length !== length) {
      throw new MigrationStreamError("BAD_VALUE", `expected ${length} bytes`, {
        stage: this.stage,
        field: `${field}.length`,
        value: data.length,
      });
    }
    // Reserve first: it may replace #buf with a bigger one.
    const at = this.#reserve(field, data.length);
    this.#buf.set(data, at);
  }

  /**
   * Write bytes preceded by their u32 length.
   * @param field field name for errors
   * @param data the bytes
   * @param maxLength the reader's maximum, checked when given
   * @throws MigrationStreamError TOO_LARGE when longer than `maxLength`
   */
  bytes(field: string, data: Uint8Array, maxLength?: number): void {
    if (maxLength !== undefined && data.length > maxLength) {
      throw new MigrationStreamError("TOO_LARGE", `longer than ${maxLength} bytes`, {
        stage: this.stage,
        field: `${field}.length`,
        value: data.length,
      });
    }
    this.u32(`${field}.length`, data.length);
    const at = this.#reserve(field, data.length);
    this.#buf.set(data, at);
  }

  /**
   * Write a string as UTF-8 preceded by its u32 byte length.
   * @param field field name for errors
   * @param value the string
   * @param maxBytes the reader's maximum byte length, checked when given
   * @throws MigrationStreamError TOO_LARGE when longer than `maxBytes`
   */
  string(field: string, value: string, maxBytes?: number): void {
    this.bytes(field, new TextEncoder().encode(value), maxBytes);
  }

  /**
   * Write a MAC address as its 6 bytes.
   * @param field field name for errors
   * @param mac 6 bytes, or text such as `52:54:00:12:34:56`
   * @throws MigrationStreamError BAD_VALUE for a malformed MAC
   */
  mac(field: string, mac: Uint8Array | string): void {
    this.fixed(field, macBytes(this.stage, field, mac));
  }

  /**
   * Write an array: a u32 count, then each item by `writeItem`.
   * @param field field name for errors
   * @param items the items
   * @param max the reader's maximum count
   * @param writeItem writes one item
   * @throws MigrationStreamError TOO_LARGE when there are more than `max` items
   */
  array<T>(
    field: string,
    items: readonly T[],
    max: number,
    writeItem: (w: StageWriter, item: T, index: number) => void,
  ): void {
    if (items.length > max) {
      throw new MigrationStreamError("TOO_LARGE", `more than ${max} items`, {
        stage: this.stage,
        field: `${field}.count`,
        value: items.length,
      });
    }
    this.u32(`${field}.count`, items.length);
    items.forEach((item, i) => writeItem(this, item, i));
  }
}

// --- Reader ---------------------------------------------------------------------------------

/** Bounds for a numeric field read by {@link StageReader}. */
export interface NumberRange {
  /** smallest allowed value (inclusive) */
  min?: number;
  /** largest allowed value (inclusive) */
  max?: number;
}

/** Bounds for a u64 field read by {@link StageReader.u64}. */
export interface BigIntRange {
  /** smallest allowed value (inclusive) */
  min?: bigint;
  /** largest allowed value (inclusive) */
  max?: bigint;
}

/**
 * Reads one stage's section, big-endian (network order). The bytes are untrusted: truncation
 * throws `TRUNCATED`, an out-of-range value `BAD_VALUE`, a length or count above its maximum
 * `TOO_LARGE` (before allocating), and every error names the stage and the field (inside
 * {@link StageReader.array} as `field[index].item`).
 *
 * Spec: vhost-user "Migrating back-end state" (the state format is vhostkit's own).
 */
export class StageReader {
  /** the stage this reader belongs to */
  readonly stage: string;
  readonly #data: Uint8Array;
  readonly #view: DataView;
  #off = 0;
  #prefix = "";

  /**
   * Create a reader over one section's bytes.
   * @param stage the stage name (for errors)
   * @param data the section (not copied; must not change while read)
   */
  constructor(stage: string, data: Uint8Array) {
    this.stage = stage;
    this.#data = data;
    this.#view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  }

  /** Bytes not read yet. */
  get remaining(): number {
    return this.#data.length - this.#off;
  }

  /** Bytes read so far. */
  get offset(): number {
    return this.#off;
  }

  #error(reason: MigrationStreamReason, what: string, field: string, value: unknown): never {
    throw new MigrationStreamError(reason, what, {
      stage: this.stage,
      field: this.#prefix + field,
      value,
    });
  }

  #take(field: string, n: number): number {
    if (n > this.remaining) {
      this.#error(
        "TRUNCATED",
        `section ends ${n - this.remaining} byte(s) short at offset ${this.#off}`,
        field,
        n,
      );
    }
    const at = this.#off;
    this.#off += n;
    return at;
  }

  #range(field: string, value: number, range: NumberRange | undefined): number {
    if (range === undefined) return value;
    const lo = range.min ?? -Infinity;
    const hi = range.max ?? Infinity;
    if (value < lo || value > hi) {
      this.#error("BAD_VALUE", `value out of range [${lo}, ${hi}]`, field, value);
    }
    return value;
  }

  /**
   * Read an unsigned 8-bit integer.
   * @param field field name for errors
   * @param range allowed values, when restricted
   * @returns the value
   * @throws MigrationStreamError TRUNCATED, or BAD_VALUE outside `range`
   */
  u8(field: string, range?: NumberRange): number {
    return this.#range(field, this.#view.getUint8(this.#take(field, 1)), range);
  }

  /**
   * Read an unsigned 16-bit big-endian integer.
   * @param field field name for errors
   * @param range allowed values, when restricted
   * @returns the value
   * @throws MigrationStreamError TRUNCATED, or BAD_VALUE outside `range`
   */
  u16(field: string, range?: NumberRange): number {
    return this.#range(field, this.#view.getUint16(this.#take(field, 2), false), range);
  }

  /**
   * Read an unsigned 32-bit big-endian integer.
   * @param field field name for errors
   * @param range allowed values, when restricted
   * @returns the value
   * @throws MigrationStreamError TRUNCATED, or BAD_VALUE outside `range`
   */
  u32(field: string, range?: NumberRange): number {
    return this.#range(field, this.#view.getUint32(this.#take(field, 4), false), range);
  }

  /**
   * Read an unsigned 64-bit big-endian integer.
   * @param field field name for errors
   * @param range allowed values, when restricted
   * @returns the value as a bigint
   * @throws MigrationStreamError TRUNCATED, or BAD_VALUE outside `range`
   */
  u64(field: string, range?: BigIntRange): bigint {
    const value = this.#view.getBigUint64(this.#take(field, 8), false);
    if (range !== undefined) {
      if (
        (range.min !== undefined && value < range.min) ||
        (range.max !== undefined && value > range.max)
      ) {
        this.#error(
          "BAD_VALUE",
          `value out of range [${range.min ?? 0n}, ${range.max ?? U64_MAX}]`,
          field,
          value,
        );
      }
    }
    return value;
  }

  /**
   * Read an unsigned 64-bit big-endian integer that must be a safe JavaScript integer (an
   * address or a size, see docs/architecture.md "Numbers").
   * @param field field name for errors
   * @param range allowed values, when restricted
   * @returns the value as a number
   * @throws MigrationStreamError TRUNCATED, or BAD_VALUE above 2^53-1 or outside `range`
   */
  u64Number(field: string, range?: NumberRange): number {
    const value = this.u64(field, { max: BigInt(Number.MAX_SAFE_INTEGER) });
    return this.#range(field, Number(value), range);
  }

  /**
   * Read a boolean byte (0 or 1; anything else is BAD_VALUE).
   * @param field field name for errors
   * @returns the flag
   */
  bool(field: string): boolean {
    return this.u8(field, { max: 1 }) === 1;
  }

  /**
   * Read `length` bytes without a length prefix.
   * @param field field name for errors
   * @param length how many bytes
   * @returns a copy of the bytes
   * @throws MigrationStreamError TRUNCATED
   */
  fixed(field: string, length: number): Uint8Array {
    const at = this.#take(field, length);
    return this.#data.slice(at, at + length);
  }

  /**
   * Read bytes preceded by a u32 length, checked against `maxLength` before copying.
   * @param field field name for errors
   * @param maxLength the largest acceptable length
   * @returns a copy of the bytes
   * @throws MigrationStreamError TRUNCATED, or TOO_LARGE above `maxLength`
   */
  bytes(field: string, maxLength: number): Uint8Array {
    const length = this.u32(`${field}.length`);
    if (length > maxLength) {
      this.#error("TOO_LARGE", `longer than ${maxLength} bytes`, `${field}.length`, length);
    }
    return this.fixed(field, length);
  }

  /**
   * Read a UTF-8 string preceded by its u32 byte length.
   * @param field field name for errors
   * @param maxBytes the largest acceptable byte length
   * @returns the string
   * @throws MigrationStreamError TRUNCATED, TOO_LARGE, or BAD_VALUE for invalid UTF-8
   */
  string(field: string, maxBytes: number): string {
    const bytes = this.bytes(field, maxBytes);
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      return this.#error("BAD_VALUE", "invalid UTF-8", field, bytes);
    }
  }

  /**
   * Read a MAC address (6 bytes).
   * @param field field name for errors
   * @returns a copy of the 6 bytes
   * @throws MigrationStreamError TRUNCATED
   */
  mac(field: string): Uint8Array {
    return this.fixed(field, MAC_LENGTH);
  }

  /**
   * Read an array: a u32 count (checked against `max` before anything is allocated), then each
   * item by `readItem`. Errors inside an item name the field `field[index].item`.
   * @param field field name for errors
   * @param max the largest acceptable count
   * @param readItem reads one item
   * @returns the items
   * @throws MigrationStreamError TOO_LARGE above `max`, or what `readItem` throws
   */
  array<T>(field: string, max: number, readItem: (r: StageReader, index: number) => T): T[] {
    const count = this.u32(`${field}.count`);
    if (count > max) this.#error("TOO_LARGE", `more than ${max} items`, `${field}.count`, count);
    const items: T[] = [];
    const outer = this.#prefix;
    try {
      for (let i = 0; i < count; i++) {
        this.#prefix = `${outer}${field}[${i}].`;
        items.push(readItem(this, i));
      }
    } finally {
      this.#prefix = outer;
    }
    return items;
  }

  /**
   * Check that the whole section was read (the stream engine also checks this after each
   * target callback).
   * @throws MigrationStreamError TRAILING_BYTES when bytes are left
   */
  end(): void {
    if (this.remaining !== 0) {
      throw new MigrationStreamError(
        "TRAILING_BYTES",
        `${this.remaining} unread byte(s) at the end of the section`,
        { stage: this.stage, field: "end", value: this.#off },
      );
    }
  }
}
