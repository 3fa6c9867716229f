/**
 * The host stream between the source and the destination front-end (TCP or a Unix socket):
 * the 16-byte header of every staged stream ({@link hostStream}: u64 magic "VHKMHOST", u32
 * version, u32 compat_version; src/migration/staged.ts), then the stages of the source's
 * version, each opened by a STAGE section naming it and made of sections, each
 * length-prefixed and checksummed.
 *
 * Section: u8 type, u8 flags (0), u16 reserved (0), u32 payload length, the payload, then u32
 * CRC-32 (zlib polynomial) of the 8 header bytes and the payload. Sections from the source are
 * {@link SectionType} values below 0x80; the destination answers on the same connection with
 * types from 0x80 (HELLO, DONE, FAIL, ITERATION_ACK) and no header.
 *
 * The receiver picks the newest version it knows within the source's
 * [compat_version, version]; the sections of a stage its version does not know are skipped
 * (passt `migrate.h`: versioned stages).
 */
import type { Duplex } from "node:stream";
import { StageTable, decodeStreamHeader, hostStream } from "../migration/staged.js";
import type { StagedVersion, StreamHeader } from "../migration/staged.js";
import { MigrationStreamError, crc32 } from "../migration/state-codec.js";
import { VhostUserError } from "../protocol/errors.js";

export { hostStream };
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
  /** UTF-8 stage name: the sections up to the next STAGE are that stage's */
  STAGE = 0x10,
  /** JSON: destination back-end's offer (destination → source) */
  HELLO = 0x81,
  /** JSON: the destination runs (destination → source); switch-over */
  DONE = 0x82,
  /** JSON: the destination failed and released everything (destination → source) */
  FAIL = 0x83,
  /** u32 iteration: the destination applied every page of that iteration */
  ITERATION_ACK = 0x84,
}

/** Options of {@link SectionReader.next}. */
export interface ReadOptions {
  /** hand out a view valid until the next read instead of a copy */
  readonly borrow?: boolean;
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
  out.set(payload, 8);
  return frameSection(out, type, payload.length);
}

/**
 * Write a section's header and CRC around a payload already in place at byte 8 of `buf`
 * (a sender that builds its payload where it will be sent, as the page sender does).
 * @param buf at least `8 + length + 4` bytes
 * @param type section type
 * @param length payload bytes (at most {@link MAX_SECTION_SIZE})
 * @returns the section: `buf`'s first `8 + length + 4` bytes
 */
export function frameSection(buf: Buffer, type: SectionType, length: number): Buffer {
  buf.writeUInt32BE(0, 0); // flags and reserved bytes: 0
  buf.writeUInt8(type, 0);
  buf.writeUInt32BE(length, 4);
  buf.writeUInt32BE(crc32(buf.subarray(0, 8 + length)), 8 + length);
  return buf.subarray(0, 8 + length + 4);
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
  #peeked: Section | null = null;
  /** where a borrowed section that spans chunks is assembled (grown as needed, reused) */
  #scratch: Buffer | null = null;
  /** bytes consumed so far */
  bytesRead = 0;
  /** the stage being read (named in truncation errors) */
  stage = "header";

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

  async #need(n: number, what: string, borrow = false): Promise<Buffer> {
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
          `stream truncated (peer closed) in stage "${this.stage}"`,
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
      if (borrow) {
        // LIFETIME: the scratch buffer is handed out until the next read (see `next`).
        // Grown by doubling, never past the largest section (a sender's size is bounded).
        if (this.#scratch === null || this.#scratch.length < n) {
          const grown = Math.min(2 * (this.#scratch?.length ?? 0), MAX_SECTION_SIZE + 4);
          this.#scratch = Buffer.allocUnsafeSlow(Math.max(n, grown));
        }
        out = this.#scratch.subarray(0, n);
      } else out = Buffer.allocUnsafe(n);
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
   * @returns the sender's version and compat_version
   * @throws MigrationStreamError BAD_MAGIC, BAD_HEADER; MigrationStreamFormatError when
   *   truncated
   */
  async header(): Promise<StreamHeader> {
    return decodeStreamHeader(hostStream, await this.#need(STREAM_HEADER_SIZE, "header"));
  }

  /**
   * The next section of the current stage, or null (without consuming it) when the next
   * section opens a new stage.
   * @param options `borrow`: see {@link next}
   * @returns the section or null
   * @throws as {@link next}
   */
  async nextInStage(options: ReadOptions = {}): Promise<Section | null> {
    const s = this.#peeked ?? (await this.next(options));
    if (s.type === SectionType.STAGE) {
      this.#peeked = s;
      return null;
    }
    this.#peeked = null;
    return s;
  }

  /**
   * Read the STAGE section that opens the next stage.
   * @returns the stage name
   * @throws MigrationStreamFormatError when the next section is not a STAGE section
   */
  async stageName(): Promise<string> {
    const s = this.#peeked ?? (await this.next());
    this.#peeked = null;
    if (s.type !== SectionType.STAGE) {
      throw new MigrationStreamFormatError(
        "section",
        SectionType[s.type] ?? s.type,
        `expected a STAGE section after stage "${this.stage}"`,
      );
    }
    return Buffer.from(s.payload).toString("utf8");
  }

  /**
   * Read the next section.
   * @param options `borrow: true`: the payload is a view that stays valid only until the next
   *   read from this reader (no copy, no allocation: for sections used at once, such as PAGES);
   *   otherwise the payload is the caller's
   * @returns the section (its CRC checked)
   * @throws MigrationStreamFormatError for a truncated stream, an oversized section, non-zero
   *   flags or reserved bytes, or a bad CRC
   */
  async next(options: ReadOptions = {}): Promise<Section> {
    if (this.#peeked !== null) {
      const p = this.#peeked;
      this.#peeked = null;
      return p;
    }
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
    const borrow = options.borrow === true;
    const body = await this.#need(len + 4, `section ${SectionType[type] ?? type}`, borrow);
    const c = crc32(body.subarray(0, len), crc32(h));
    const want = body.readUInt32BE(len);
    if (c !== want) {
      throw new MigrationStreamFormatError(
        "crc",
        `0x${want.toString(16)} (computed 0x${c.toString(16)})`,
        `section ${SectionType[type] ?? type}: checksum mismatch`,
      );
    }
    // Copy unless borrowed: a view would keep its whole chunk alive, or be the scratch buffer.
    return {
      type,
      payload: borrow ? body.subarray(0, len) : new Uint8Array(body.subarray(0, len)),
    };
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

/**
 * One stage of the host stream on one side: what it does, and (source side) how to undo it
 * when a later stage fails.
 * @typeParam Ctx the side's migration context
 */
export interface HostStage<Ctx> {
  /** stage name, as in the STAGE section */
  readonly name: string;
  /**
   * Source: write the stage's sections (after its STAGE section). Destination: read them with
   * {@link SectionReader.nextInStage} until it returns null, or a known number of them.
   * @param ctx the migration context
   */
  run(ctx: Ctx): Promise<void>;
  /**
   * Undo what `run` did (source: resume the device as it was). Runs for the failed stage and
   * every stage before it, latest first.
   * @param ctx the migration context
   */
  rollback?(ctx: Ctx): Promise<void>;
}

/** A version of the host stream on one side: its ordered stages. */
export type HostVersion<Ctx> = StagedVersion<HostStage<Ctx>>;

/** The names of the stages of each host stream version, shared by both sides. */
export const HOST_STREAM_STAGES: Readonly<Record<number, readonly string[]>> = Object.freeze({
  1: Object.freeze([
    "setup",
    "precopy",
    "stop",
    "final pages",
    "virtio state",
    "backend state",
    "driver state",
    "guest state",
    "switchover",
  ]),
});

/**
 * Build one side's host stream versions from its stage functions, by the names of
 * {@link HOST_STREAM_STAGES}.
 * @param stages the side's stage functions by name
 * @returns the side's versions
 * @throws MigrationStreamError BAD_DEFINITION when a stage has no function
 */
export function hostVersions<Ctx>(
  stages: Readonly<Record<string, Omit<HostStage<Ctx>, "name">>>,
): HostVersion<Ctx>[] {
  return Object.entries(HOST_STREAM_STAGES).map(([id, names]) => ({
    id: Number(id),
    stages: names.map((name) => {
      const s = stages[name];
      if (s === undefined) {
        throw new MigrationStreamError("BAD_DEFINITION", "host stream stage without a function", {
          field: "stage.name",
          value: name,
        });
      }
      return { name, ...s };
    }),
  }));
}

/** Options of {@link runSourceStages}. */
export interface SourceStagesOptions {
  /** the version to send (default the newest) */
  version?: number;
  /** called as each stage starts */
  onStage?: (name: string) => void;
  /** called once when a stage failed, before the rollbacks */
  beforeRollback?: () => void;
}

/** A host stage failed: which one, and whether every rollback succeeded. */
export class HostStageError extends Error {
  /**
   * @param stage the stage that failed
   * @param cause what it threw
   * @param rolledBack every rollback ran without error
   */
  constructor(
    readonly stage: string,
    override readonly cause: unknown,
    readonly rolledBack: boolean,
  ) {
    super(`stage "${stage}" failed: ${cause instanceof Error ? cause.message : String(cause)}`);
    this.name = "HostStageError";
  }
}

/**
 * Source side: write the header and run every stage of a version in order, each after its
 * STAGE section; when one fails, roll back it and every earlier stage, latest first.
 * @param table the source's versions
 * @param ctx the migration context
 * @param send writes bytes to the stream
 * @param options the version to send, callbacks
 * @returns when every stage ran
 * @throws HostStageError naming the failed stage (its `cause` is what the stage threw)
 * (passt `migrate.h`: the source walks `migrate_version.s`)
 */
export async function runSourceStages<Ctx>(
  table: StageTable<HostStage<Ctx>>,
  ctx: Ctx,
  send: (b: Uint8Array) => Promise<void>,
  options: SourceStagesOptions = {},
): Promise<void> {
  const version = options.version ?? table.newest.id;
  const v = table.version(version);
  const started: HostStage<Ctx>[] = [];
  let current = "header";
  try {
    await send(table.header(version));
    for (const stage of v?.stages ?? []) {
      current = stage.name;
      started.push(stage);
      options.onStage?.(stage.name);
      await send(encodeSection(SectionType.STAGE, Buffer.from(stage.name, "utf8")));
      await stage.run(ctx);
    }
  } catch (err) {
    options.beforeRollback?.();
    let rolledBack = true;
    for (const stage of started.reverse()) {
      try {
        await stage.rollback?.(ctx);
      } catch {
        rolledBack = false;
      }
    }
    throw new HostStageError(current, err, rolledBack);
  }
}

/** Options of {@link runDestinationStages}. */
export interface DestinationStagesOptions {
  /** called with the version chosen, before the first stage */
  onVersion?: (version: number) => void;
  /** called as each stage starts */
  onStage?: (name: string) => void;
}

/** What the destination's walk through the stages found. */
export interface DestinationStagesResult {
  /** the source's header */
  header: StreamHeader;
  /** the version chosen to read it */
  version: number;
  /** stages run, in order */
  ran: string[];
  /** stages of a newer source skipped (their sections read and dropped) */
  skipped: string[];
}

/**
 * Destination side: read the header, choose the version, and run its stages in order as their
 * STAGE sections arrive. A stage the chosen version does not know is skipped when the source's
 * version is newer (it promised so by its compat_version); otherwise it is an error, as is a
 * stage out of order.
 * @param table the destination's versions
 * @param ctx the migration context
 * @param reader the stream (`reader.stage` follows the stage being read)
 * @param options callbacks
 * @returns the versions and the stages run and skipped
 * @throws MigrationStreamError NO_COMPATIBLE_VERSION naming both ranges, UNEXPECTED_STAGE;
 *   whatever a stage throws
 * (passt `migrate.h`: the target walks `migrate_version.s`)
 */
export async function runDestinationStages<Ctx>(
  table: StageTable<HostStage<Ctx>>,
  ctx: Ctx,
  reader: SectionReader,
  options: DestinationStagesOptions = {},
): Promise<DestinationStagesResult> {
  reader.stage = "header";
  const header = await reader.header();
  const v = table.chooseVersion(header);
  options.onVersion?.(v.id);
  const known = new Set(v.stages.map((s) => s.name));
  const ran: string[] = [];
  const skipped: string[] = [];
  for (const stage of v.stages) {
    for (;;) {
      const name = await reader.stageName();
      if (name === stage.name) break;
      if (known.has(name) || header.version <= v.id) {
        throw new MigrationStreamError(
          "UNEXPECTED_STAGE",
          `host stream version ${v.id}: stage "${name}" where "${stage.name}" comes next`,
          { stage: name, field: "stage", value: name },
        );
      }
      // A stage of a newer source: drop its sections.
      reader.stage = name;
      while ((await reader.nextInStage()) !== null) {
        // dropped
      }
      skipped.push(name);
    }
    reader.stage = stage.name;
    options.onStage?.(stage.name);
    await stage.run(ctx);
    ran.push(stage.name);
  }
  return { header, version: v.id, ran, skipped };
}

export { StageTable };
