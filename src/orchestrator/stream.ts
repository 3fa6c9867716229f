/**
 * The migration stream between the source and the destination front-end (TCP or a Unix
 * socket): a 16-byte versioned header, then sections, each length-prefixed and checksummed.
 *
 * Header (network byte order): u32 magic 0x56484b4d ("VHKM"), u16 version, u16 compat_version
 * (the oldest version a reader must understand to load this stream), u64 reserved (0).
 *
 * Section: u8 type, u8 flags (0), u16 reserved (0), u32 payload length, the payload, then u32
 * CRC-32 (zlib polynomial) of the 8 header bytes and the payload. Sections from the source are
 * {@link SectionType} values below 0x80; the destination answers on the same connection with
 * types from 0x80 (HELLO, DONE, FAIL) and no header.
 */
import type { Duplex } from "node:stream";
import { crc32 } from "../migration/state-codec.js";
import { VhostUserError } from "../protocol/errors.js";

/** "VHKM" */
export const STREAM_MAGIC = 0x56484b4d;
/** version this code writes */
export const STREAM_VERSION = 1;
/** oldest version this code reads */
export const STREAM_COMPAT_VERSION = 1;
/** header bytes */
export const STREAM_HEADER_SIZE = 16;
/** largest section payload accepted (the back-end state blob is the largest) */
export const MAX_SECTION_SIZE = 512 << 20;
/** a SectionReader pauses its socket while more than this many bytes wait to be read */
export const READER_HIGH_WATER = 8 << 20;

/** Section types. */
export enum SectionType {
  /** JSON: memory layout, features, queue count (source → destination, first) */
  SETUP = 0x01,
  /** guest pages of one iteration (binary, see the source) */
  PAGES = 0x02,
  /** u32 iteration, u32 pages sent in it */
  ITERATION_END = 0x03,
  /** the virtio device state (binary, layered with subsections) */
  VIRTIO_STATE = 0x04,
  /** the back-end's state blob from SET_DEVICE_STATE_FD (SAVE) */
  BACKEND_STATE = 0x05,
  /** JSON: the driver side of each ring and the allocator (the guest's own state) */
  DRIVER_STATE = 0x06,
  /** opaque guest application state (a VM's CPU state) */
  GUEST_STATE = 0x07,
  /** end of stream: u8 hash present, then a 32-byte SHA-256 of guest RAM */
  END = 0x0f,
  /** JSON: destination back-end's offer (destination → source) */
  HELLO = 0x81,
  /** JSON: the destination runs (destination → source); switch-over */
  DONE = 0x82,
  /** JSON: the destination failed and released everything (destination → source) */
  FAIL = 0x83,
  /** u32 iteration: the destination applied every page of that iteration */
  ITERATION_ACK = 0x84,
}

/** A section read from the stream. */
export interface Section {
  type: SectionType;
  payload: Uint8Array;
}

/**
 * A stream format error.
 */
export class MigrationStreamFormatError extends VhostUserError {
  /**
   * @param field the field that is wrong
   * @param value its value
   * @param message what is wrong
   */
  constructor(field: string, value: unknown, message: string) {
    super("ERR_VHOST_BAD_FIELD", message, {
      request: "migration stream",
      field,
      value,
      fatal: true,
    });
  }
}

/**
 * Encode the stream header.
 * @param version version written (default {@link STREAM_VERSION})
 * @param compat oldest version a reader needs (default {@link STREAM_COMPAT_VERSION})
 * @returns 16 bytes
 */
export function encodeHeader(version = STREAM_VERSION, compat = STREAM_COMPAT_VERSION): Buffer {
  const b = Buffer.alloc(STREAM_HEADER_SIZE);
  b.writeUInt32BE(STREAM_MAGIC, 0);
  b.writeUInt16BE(version, 4);
  b.writeUInt16BE(compat, 6);
  return b;
}

/**
 * Check a stream header.
 * @param b 16 bytes
 * @returns the version the stream was written with
 * @throws MigrationStreamFormatError for a wrong magic, a version range this code cannot read or
 *   a non-zero reserved field
 */
export function decodeHeader(b: Uint8Array): number {
  const v = Buffer.from(b.buffer, b.byteOffset, b.length);
  const magic = v.readUInt32BE(0);
  if (magic !== STREAM_MAGIC) {
    throw new MigrationStreamFormatError(
      "magic",
      `0x${magic.toString(16)}`,
      "not a migration stream",
    );
  }
  const version = v.readUInt16BE(4);
  const compat = v.readUInt16BE(6);
  if (compat > STREAM_VERSION || version < STREAM_COMPAT_VERSION || compat > version) {
    throw new MigrationStreamFormatError(
      "version",
      `${version} (compat ${compat})`,
      `stream versions [${compat}, ${version}] do not meet this reader's [${STREAM_COMPAT_VERSION}, ${STREAM_VERSION}]`,
    );
  }
  const reserved = v.readBigUInt64BE(8);
  if (reserved !== 0n) {
    throw new MigrationStreamFormatError(
      "reserved",
      `0x${reserved.toString(16)}`,
      "header reserved field must be 0",
    );
  }
  return version;
}

/**
 * Encode one section.
 * @param type section type
 * @param payload the payload
 * @returns header, payload and CRC
 * @throws MigrationStreamFormatError (field `length`) when the payload exceeds
 *   {@link MAX_SECTION_SIZE}
 */
export function encodeSection(type: SectionType, payload: Uint8Array): Buffer {
  if (payload.length > MAX_SECTION_SIZE) {
    throw new MigrationStreamFormatError("length", payload.length, "section too large");
  }
  const out = Buffer.alloc(8 + payload.length + 4);
  out.writeUInt8(type, 0);
  out.writeUInt32BE(payload.length, 4);
  out.set(payload, 8);
  const c = crc32(out.subarray(0, 8 + payload.length));
  out.writeUInt32BE(c, 8 + payload.length);
  return out;
}

/**
 * Encode a JSON section (bigints as decimal strings).
 * @param type section type
 * @param value the value
 * @returns the section bytes
 * @throws MigrationStreamFormatError (field `length`) when the JSON text is too large
 */
export function encodeJsonSection(type: SectionType, value: unknown): Buffer {
  const text = JSON.stringify(value, (_k, v: unknown) =>
    typeof v === "bigint" ? v.toString() : v,
  );
  return encodeSection(type, Buffer.from(text, "utf8"));
}

/**
 * Parse a JSON payload.
 * @param s the section
 * @returns the parsed value
 * @throws MigrationStreamFormatError naming the section type when it is not JSON
 */
export function parseJson(s: Section): unknown {
  try {
    return JSON.parse(Buffer.from(s.payload).toString("utf8")) as unknown;
  } catch (err) {
    throw new MigrationStreamFormatError(
      "payload",
      SectionType[s.type],
      `section is not JSON: ${(err as Error).message}`,
    );
  }
}

/**
 * Reads the header and the sections from a socket, checking lengths and CRCs. Backpressure: the
 * socket is paused while more than {@link READER_HIGH_WATER} bytes wait, resumed once read.
 */
export class SectionReader {
  readonly #stream: Duplex;
  #paused = false;
  #chunks: Buffer[] = [];
  #have = 0;
  #ended = false;
  #error: Error | null = null;
  #wake: (() => void) | null = null;
  /** bytes consumed so far */
  bytesRead = 0;

  /**
   * @param stream the connection (data is taken from now on)
   */
  constructor(stream: Duplex) {
    this.#stream = stream;
    stream.on("data", (c: Buffer) => {
      this.#chunks.push(c);
      this.#have += c.length;
      if (!this.#paused && this.#have > READER_HIGH_WATER) {
        this.#paused = true;
        stream.pause();
      }
      this.#poke();
    });
    stream.on("end", () => {
      this.#ended = true;
      this.#poke();
    });
    stream.on("close", () => {
      this.#ended = true;
      this.#poke();
    });
    stream.on("error", (err: Error) => {
      this.#error = err;
      this.#poke();
    });
  }

  #poke(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  async #need(n: number, what: string): Promise<Buffer> {
    while (this.#have < n) {
      // A section larger than the high-water mark needs more than that buffered.
      if (this.#paused) {
        this.#paused = false;
        this.#stream.resume();
      }
      if (this.#error) throw this.#error;
      if (this.#ended) {
        throw new MigrationStreamFormatError(
          what,
          `${this.#have} of ${n} bytes`,
          "stream truncated (peer closed)",
        );
      }
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
    const first = this.#chunks[0] as Buffer;
    let out: Buffer;
    if (first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this.#chunks[0] as Buffer;
        const take = Math.min(c.length, n - off);
        c.copy(out, off, 0, take);
        off += take;
        if (take === c.length) this.#chunks.shift();
        else this.#chunks[0] = c.subarray(take);
      }
    }
    this.#have -= n;
    this.bytesRead += n;
    if (this.#paused && this.#have <= READER_HIGH_WATER) {
      this.#paused = false;
      this.#stream.resume();
    }
    return out;
  }

  /**
   * Read and check the header.
   * @returns the stream version
   */
  async header(): Promise<number> {
    return decodeHeader(await this.#need(STREAM_HEADER_SIZE, "header"));
  }

  /**
   * Read the next section.
   * @returns the section (its CRC checked)
   * @throws MigrationStreamFormatError for a truncated stream, an oversized section, non-zero
   *   flags or reserved bytes, or a bad CRC
   */
  async next(): Promise<Section> {
    const h = await this.#need(8, "section header");
    const type = h.readUInt8(0) as SectionType;
    const name = SectionType[type] ?? String(type);
    const flags = h.readUInt8(1);
    if (flags !== 0) {
      throw new MigrationStreamFormatError("flags", flags, `section ${name}: flags must be 0`);
    }
    const reserved = h.readUInt16BE(2);
    if (reserved !== 0) {
      throw new MigrationStreamFormatError(
        "reserved",
        reserved,
        `section ${name}: reserved bytes must be 0`,
      );
    }
    const len = h.readUInt32BE(4);
    if (len > MAX_SECTION_SIZE)
      throw new MigrationStreamFormatError("length", len, "section too large");
    const body = await this.#need(len + 4, `section ${SectionType[type] ?? type}`);
    const c = crc32(body.subarray(0, len), crc32(h));
    const want = body.readUInt32BE(len);
    if (c !== want) {
      throw new MigrationStreamFormatError(
        "crc",
        `0x${want.toString(16)} (computed 0x${c.toString(16)})`,
        `section ${SectionType[type] ?? type}: checksum mismatch`,
      );
    }
    // Copy: the chunk buffer may be reused by a later concat.
    return { type, payload: new Uint8Array(body.subarray(0, len)) };
  }
}

/**
 * Write bytes and wait while the socket's buffer is full.
 * @param stream the connection
 * @param data the bytes
 * @returns when the data was queued below the high-water mark
 * @throws Error when the connection is closed or fails meanwhile
 */
export function writeAll(stream: Duplex, data: Uint8Array): Promise<void> {
  if (stream.destroyed || stream.writableEnded) {
    return Promise.reject(new Error("migration stream: connection closed"));
  }
  if (stream.write(data)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (err?: Error): void => {
      stream.off("drain", onDrain);
      stream.off("close", onClose);
      stream.off("error", onError);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const onClose = (): void => done(new Error("migration stream: connection closed"));
    const onError = (err: Error): void => done(err);
    stream.on("drain", onDrain);
    stream.on("close", onClose);
    stream.on("error", onError);
  });
}
