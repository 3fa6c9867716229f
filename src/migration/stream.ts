/**
 * The versioned migration state stream (the layout of passt's `migrate.h`): a 16-byte header
 * (magic 0xB1BB1D1B0BB1D1B0, version, compat_version; network byte order) followed by the named
 * stages of that version, each with a source side (writes its section) and a target side
 * (parses it).
 *
 * Wire format after the header, all big-endian:
 *
 * ```
 * section := u16 name_len (1..255) | name (UTF-8) | u32 data_len | data | u32 crc32(name_len..data)
 * end     := u16 0 | u32 crc32(every byte of the stream before this field)
 * ```
 *
 * A section is written for every stage that has a source side, in the order of the version's
 * stage list. The target picks its newest version within the source's
 * [compat_version, version] and reads the sections in order: each stage of its version that has
 * a target side must find its section; a section the target's version does not know is skipped
 * (CRC-checked) only when the stream is of a newer version than the target's (that is what the
 * source promised by declaring a lower compat_version).
 *
 * Loading is transactional: every section is parsed and validated (CRC, bounds, values) by the
 * target sides, which return "apply" closures without touching the destination; only when the
 * whole stream, up to its end record and total CRC, is valid are the closures run in order.
 *
 * Spec: vhost-user "Migrating back-end state" (the state format is the back-end's own).
 */
import diagnosticsChannel from "node:diagnostics_channel";
import {
  MAX_STAGE_NAME_BYTES,
  STAGED_HEADER_SIZE,
  StageTable,
  decodeStreamHeader,
  stateStream,
} from "./staged.js";
import type { StagedVersion, StreamHeader } from "./staged.js";
import { MigrationStreamError, StageReader, StageWriter, crc32 } from "./state-codec.js";

/** Magic number of the header (passt `migrate.h`: `0xB1BB1D1B0BB1D1B0`, network order). */
export const MIGRATION_MAGIC = stateStream.magic;
/** Size of the header: magic u64, version u32, compat_version u32. */
export const MIGRATION_HEADER_SIZE = STAGED_HEADER_SIZE;
/** Longest stage name (bytes of UTF-8). */
export const MAX_STAGE_NAME = MAX_STAGE_NAME_BYTES;
/** Default cap on a whole stream (64 MiB, the back-end's default for LOAD). */
export const DEFAULT_MAX_STREAM_BYTES = 64 * 1024 * 1024;
/** Bytes a section adds around its data: name length, data length, CRC. */
const SECTION_OVERHEAD = 2 + 4 + 4;

/**
 * Name of the diagnostics channel on which stage events are published
 * (`{ event: "save" | "load" | "skip" | "apply", stage, version, bytes }`).
 */
export const MIGRATION_DIAGNOSTICS_CHANNEL = "vhostkit:migration";
const diagnostics = diagnosticsChannel.channel(MIGRATION_DIAGNOSTICS_CHANNEL);

/** What a target side returns: a closure that applies the parsed state (or nothing to apply). */
export type ApplyStage = () => void;

/**
 * One named stage of a version (passt: `struct migrate_stage`).
 * @typeParam Ctx what the stage saves from and loads into (e.g. a device)
 */
export interface MigrationStage<Ctx> {
  /** stage name, unique within a version (1..255 bytes of UTF-8); it appears in the stream */
  readonly name: string;
  /** largest section the stage may write or accept, in bytes (default: the stream's cap) */
  readonly maxBytes?: number;
  /**
   * Source side: write the stage's section. Must not change `ctx` (a failed migration resumes
   * the source as it was). Without it the stage has no section.
   * @param ctx the source
   * @param w the section writer
   */
  save?(ctx: Ctx, w: StageWriter): void;
  /**
   * Target side: parse and validate the section, without changing `ctx`; return what applies
   * it. The bytes are untrusted. Without it the section is skipped.
   * @param ctx the destination (read only here)
   * @param r the section reader; unread bytes at the end are an error (TRAILING_BYTES)
   * @returns a closure that applies the state, run only once the whole stream is valid
   */
  load?(ctx: Ctx, r: StageReader): ApplyStage | void;
}

/**
 * A version and its ordered stages (passt: `struct migrate_version`); `compat` (default: `id`)
 * is the oldest version able to read it.
 * @typeParam Ctx what the stages save from and load into
 */
export type MigrationVersion<Ctx> = StagedVersion<MigrationStage<Ctx>>;

/** Options of {@link MigrationFormat}. */
export interface MigrationFormatOptions {
  /** name for errors and diagnostics (e.g. `"virtio-net port"`) */
  name?: string;
  /** largest stream written or accepted, in bytes (default 64 MiB) */
  maxBytes?: number;
}

/** Options of {@link MigrationFormat.saveStream}. */
export interface SaveOptions {
  /** the version to write (default: the newest registered) */
  version?: number;
}

/** The parsed header of a stream. */
export type MigrationHeader = StreamHeader;

/** What {@link MigrationFormat.prepareLoad} found, ready to apply. */
export interface PreparedLoad {
  /** the stream's header */
  header: MigrationHeader;
  /** the local version chosen to read it */
  version: number;
  /** stages whose section was parsed, in order */
  loaded: string[];
  /** sections skipped (unknown to the chosen version, or without a target side) */
  skipped: string[];
  /** total bytes of the stream */
  bytes: number;
  /**
   * Apply every parsed stage, in order.
   * @throws MigrationStreamError ALREADY_COMMITTED on a second call, APPLY_FAILED when an
   *   apply closure throws (the stages before it were applied)
   */
  commit(): void;
}

/** What {@link MigrationFormat.loadStream} did. */
export type LoadResult = Omit<PreparedLoad, "commit">;

/** One section as found by {@link inspectStream}. */
export interface SectionInfo {
  name: string;
  /** offset of its data in the stream */
  offset: number;
  /** length of its data */
  length: number;
}

/**
 * Read and check a state stream's header.
 * @param data the stream
 * @returns version and compat_version
 * @throws MigrationStreamError TRUNCATED, BAD_MAGIC or BAD_HEADER
 * (passt `migrate.h`: `struct migrate_header`)
 */
export function readHeader(data: Uint8Array): MigrationHeader {
  return decodeStreamHeader(stateStream, data);
}

/** A cursor over the stream bytes, with errors naming the stream offset. */
class Cursor {
  readonly view: DataView;
  off: number;
  constructor(
    readonly data: Uint8Array,
    off: number,
  ) {
    this.view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    this.off = off;
  }
  need(n: number, field: string, stage?: string): number {
    if (this.data.length - this.off < n) {
      throw new MigrationStreamError(
        "TRUNCATED",
        `stream ends ${n - (this.data.length - this.off)} byte(s) short at offset ${this.off}`,
        { field, value: this.data.length, ...(stage !== undefined ? { stage } : {}) },
      );
    }
    const at = this.off;
    this.off += n;
    return at;
  }
}

interface RawSection {
  name: string;
  data: Uint8Array;
  offset: number;
}

/**
 * Walk the sections of a stream after its header, checking every CRC, the end record and the
 * total CRC; nothing is interpreted.
 */
function* sections(data: Uint8Array, stageCap: (name: string) => number): Generator<RawSection> {
  const c = new Cursor(data, MIGRATION_HEADER_SIZE);
  const decoder = new TextDecoder("utf-8", { fatal: true });
  for (;;) {
    const start = c.off;
    const nameLen = c.view.getUint16(c.need(2, "section.name_len"), false);
    if (nameLen === 0) {
      const at = c.need(4, "end.crc");
      const want = c.view.getUint32(at, false);
      const got = crc32(data.subarray(0, at));
      if (want !== got) {
        throw new MigrationStreamError("CRC_MISMATCH", `stream CRC is 0x${got.toString(16)}`, {
          field: "end.crc",
          value: want,
        });
      }
      if (c.off !== data.length) {
        throw new MigrationStreamError(
          "TRAILING_BYTES",
          `${data.length - c.off} byte(s) after the end record`,
          { field: "end", value: c.off },
        );
      }
      return;
    }
    if (nameLen > MAX_STAGE_NAME) {
      throw new MigrationStreamError("TOO_LARGE", `stage name longer than ${MAX_STAGE_NAME}`, {
        field: "section.name_len",
        value: nameLen,
      });
    }
    const nameAt = c.need(nameLen, "section.name");
    let name: string;
    try {
      name = decoder.decode(data.subarray(nameAt, nameAt + nameLen));
    } catch {
      throw new MigrationStreamError("BAD_VALUE", "stage name is not UTF-8", {
        field: "section.name",
        value: data.subarray(nameAt, nameAt + nameLen),
      });
    }
    const len = c.view.getUint32(c.need(4, "section.data_len", name), false);
    const cap = stageCap(name);
    if (len > cap) {
      throw new MigrationStreamError("TOO_LARGE", `section larger than ${cap} bytes`, {
        stage: name,
        field: "section.data_len",
        value: len,
      });
    }
    const dataAt = c.need(len, "section.data", name);
    const crcAt = c.need(4, "section.crc", name);
    const want = c.view.getUint32(crcAt, false);
    const got = crc32(data.subarray(start, crcAt));
    if (want !== got) {
      throw new MigrationStreamError("CRC_MISMATCH", `section CRC is 0x${got.toString(16)}`, {
        stage: name,
        field: "section.crc",
        value: want,
      });
    }
    yield { name, data: data.subarray(dataAt, dataAt + len), offset: dataAt };
  }
}

/**
 * List the sections of a stream (diagnostics and tests): the header and every CRC are checked,
 * no stage is interpreted.
 * @param data the stream
 * @param maxSection largest section accepted (default 64 MiB)
 * @returns the header and the sections in order
 * @throws MigrationStreamError for a malformed stream
 */
export function inspectStream(
  data: Uint8Array,
  maxSection = DEFAULT_MAX_STREAM_BYTES,
): { header: MigrationHeader; sections: SectionInfo[] } {
  const header = readHeader(data);
  const out: SectionInfo[] = [];
  for (const s of sections(data, () => maxSection)) {
    out.push({ name: s.name, offset: s.offset, length: s.data.length });
  }
  return { header, sections: out };
}

/**
 * A versioned state format: the versions a device knows, each with its stages; saves streams of
 * one version and loads streams of any version it can read.
 *
 * @example
 * const format = new MigrationFormat<MyDevice>([
 *   { id: 1, stages: [counters] },
 *   { id: 2, compat: 1, stages: [counters, filter] },
 * ]);
 * const bytes = format.saveStream(source);       // v2, compat 1
 * format.loadStream(destination, bytes);          // all or nothing
 *
 * @typeParam Ctx what the stages save from and load into
 * (passt `migrate.h`: `struct migrate_version`, `struct migrate_stage`)
 */
export class MigrationFormat<Ctx> {
  /** name for errors and diagnostics */
  readonly name: string;
  /** largest stream written or accepted */
  readonly maxBytes: number;
  readonly #table: StageTable<MigrationStage<Ctx>>;

  /**
   * @param versions every version this side knows (any order)
   * @param options name and stream cap
   * @throws MigrationStreamError BAD_DEFINITION for a malformed table (no version, duplicate
   *   ids or stage names, a bad compat, a bad stage name)
   */
  constructor(versions: readonly MigrationVersion<Ctx>[], options: MigrationFormatOptions = {}) {
    this.name = options.name ?? "state";
    this.maxBytes = options.maxBytes ?? DEFAULT_MAX_STREAM_BYTES;
    this.#table = new StageTable(stateStream, versions, this.name);
  }

  /** @returns the version ids this side knows, ascending */
  get versions(): number[] {
    return this.#table.versions;
  }

  /** @returns the newest version id */
  get newest(): number {
    return this.#table.newest.id;
  }

  /**
   * The local version a target uses for a stream: the newest within [compat_version, version].
   * @param header the stream's header
   * @returns the version
   * @throws MigrationStreamError NO_COMPATIBLE_VERSION naming both ranges
   */
  chooseVersion(header: MigrationHeader): MigrationVersion<Ctx> {
    return this.#table.chooseVersion(header);
  }

  /**
   * Source side: write the header and every stage of a version.
   * @param ctx the source (not changed)
   * @param options the version to write (default the newest)
   * @returns the stream
   * @throws MigrationStreamError BAD_DEFINITION for an unknown version, STAGE_FAILED when a
   *   stage's save throws something else, TOO_LARGE / BAD_VALUE from the writers
   * (passt `migrate.h`; vhost-user "Migrating back-end state", SAVE)
   */
  saveStream(ctx: Ctx, options: SaveOptions = {}): Uint8Array {
    const id = options.version ?? this.newest;
    const parts: Uint8Array[] = [this.#table.header(id)];
    const v = this.#table.version(id) as MigrationVersion<Ctx>;
    let total = MIGRATION_HEADER_SIZE + 6;
    for (const stage of v.stages) {
      if (stage.save === undefined) continue;
      const cap = Math.min(stage.maxBytes ?? this.maxBytes, this.maxBytes);
      const w = new StageWriter(stage.name, { maxBytes: cap });
      try {
        stage.save(ctx, w);
      } catch (err) {
        if (err instanceof MigrationStreamError) throw err;
        throw new MigrationStreamError("STAGE_FAILED", `save failed: ${String(err)}`, {
          stage: stage.name,
          cause: err,
        });
      }
      const body = w.finish();
      const name = new TextEncoder().encode(stage.name);
      const sec = new Uint8Array(SECTION_OVERHEAD + name.length + body.length);
      const view = new DataView(sec.buffer);
      view.setUint16(0, name.length, false);
      sec.set(name, 2);
      view.setUint32(2 + name.length, body.length, false);
      sec.set(body, 6 + name.length);
      const crcAt = sec.length - 4;
      view.setUint32(crcAt, crc32(sec.subarray(0, crcAt)), false);
      total += sec.length;
      if (total > this.maxBytes) {
        throw new MigrationStreamError("TOO_LARGE", `stream exceeds ${this.maxBytes} bytes`, {
          stage: stage.name,
          field: "stream.length",
          value: total,
        });
      }
      parts.push(sec);
      diagnostics.publish({ event: "save", stage: stage.name, version: v.id, bytes: body.length });
    }
    const out = new Uint8Array(total);
    let off = 0;
    for (const p of parts) {
      out.set(p, off);
      off += p.length;
    }
    // End record: name_len 0, then the CRC of everything before the CRC field.
    const view = new DataView(out.buffer);
    view.setUint16(off, 0, false);
    view.setUint32(off + 2, crc32(out.subarray(0, off + 2)), false);
    return out;
  }

  /**
   * Target side, first half: check and parse the whole stream without changing `ctx`.
   * @param ctx the destination (read only)
   * @param data the stream (untrusted)
   * @returns what was parsed, with `commit()` to apply it
   * @throws MigrationStreamError for any defect: TRUNCATED, BAD_MAGIC, BAD_HEADER,
   *   NO_COMPATIBLE_VERSION, CRC_MISMATCH, UNEXPECTED_STAGE, TOO_LARGE, TRAILING_BYTES,
   *   BAD_VALUE, STAGE_FAILED
   * (passt `migrate.h`; vhost-user "Migrating back-end state", LOAD)
   */
  prepareLoad(ctx: Ctx, data: Uint8Array): PreparedLoad {
    if (data.length > this.maxBytes) {
      throw new MigrationStreamError("TOO_LARGE", `stream exceeds ${this.maxBytes} bytes`, {
        field: "stream.length",
        value: data.length,
      });
    }
    const header = readHeader(data);
    const v = this.chooseVersion(header);
    const expected = v.stages.filter((s) => s.load !== undefined);
    const known = new Map(v.stages.map((s) => [s.name, s]));
    const newerStream = header.version > v.id;
    const applies: { stage: string; apply: ApplyStage }[] = [];
    const loaded: string[] = [];
    const skipped: string[] = [];
    let next = 0;
    const cap = (name: string): number =>
      Math.min(known.get(name)?.maxBytes ?? this.maxBytes, this.maxBytes);
    for (const sec of sections(data, cap)) {
      const stage = known.get(sec.name);
      if (stage === undefined || stage.load === undefined) {
        if (stage === undefined && !newerStream) {
          throw new MigrationStreamError(
            "UNEXPECTED_STAGE",
            `version ${v.id} has no stage of that name`,
            { stage: sec.name, field: "section.name", value: sec.name },
          );
        }
        skipped.push(sec.name);
        diagnostics.publish({ event: "skip", stage: sec.name, version: v.id, bytes: 0 });
        continue;
      }
      if (expected[next] !== stage) {
        const want = expected[next]?.name ?? "end";
        throw new MigrationStreamError("UNEXPECTED_STAGE", `section out of order, "${want}" next`, {
          stage: sec.name,
          field: "section.name",
          value: sec.name,
        });
      }
      next++;
      const r = new StageReader(stage.name, sec.data);
      let apply: ApplyStage | void;
      try {
        apply = (stage.load as NonNullable<MigrationStage<Ctx>["load"]>)(ctx, r);
      } catch (err) {
        if (err instanceof MigrationStreamError) throw err;
        throw new MigrationStreamError("STAGE_FAILED", `load failed: ${String(err)}`, {
          stage: stage.name,
          cause: err,
        });
      }
      r.end();
      if (apply !== undefined) applies.push({ stage: stage.name, apply });
      loaded.push(stage.name);
      diagnostics.publish({
        event: "load",
        stage: stage.name,
        version: v.id,
        bytes: sec.data.length,
      });
    }
    if (next !== expected.length) {
      throw new MigrationStreamError(
        "UNEXPECTED_STAGE",
        `stream ended without ${expected.length - next} stage(s)`,
        {
          stage: (expected[next] as MigrationStage<Ctx>).name,
          field: "section.name",
          value: "end",
        },
      );
    }
    let committed = false;
    return {
      header,
      version: v.id,
      loaded,
      skipped,
      bytes: data.length,
      commit(): void {
        if (committed) {
          throw new MigrationStreamError("ALREADY_COMMITTED", "commit() called twice", {
            field: "commit",
            value: 2,
          });
        }
        committed = true;
        for (const a of applies) {
          try {
            a.apply();
          } catch (err) {
            throw new MigrationStreamError("APPLY_FAILED", `apply failed: ${String(err)}`, {
              stage: a.stage,
              cause: err,
            });
          }
          diagnostics.publish({ event: "apply", stage: a.stage, version: v.id, bytes: 0 });
        }
      },
    };
  }

  /**
   * Target side: parse and validate the whole stream, then apply it (all or nothing: a defect
   * found while parsing leaves `ctx` as it was).
   * @param ctx the destination
   * @param data the stream (untrusted)
   * @returns the versions, the stages loaded and skipped
   * @throws MigrationStreamError as {@link prepareLoad}, or APPLY_FAILED
   * (passt `migrate.h`; vhost-user "Migrating back-end state", LOAD)
   */
  loadStream(ctx: Ctx, data: Uint8Array): LoadResult {
    const prepared = this.prepareLoad(ctx, data);
    prepared.commit();
    const { commit: _commit, ...result } = prepared;
    void _commit;
    return result;
  }
}

/**
 * Define a versioned format (shorthand for `new MigrationFormat(versions, options)`).
 * @param versions every version this side knows
 * @param options name and stream cap
 * @returns the format
 * @throws MigrationStreamError BAD_DEFINITION for a malformed table
 */
export function defineMigration<Ctx>(
  versions: readonly MigrationVersion<Ctx>[],
  options: MigrationFormatOptions = {},
): MigrationFormat<Ctx> {
  return new MigrationFormat(versions, options);
}

/**
 * Save a stream (free-function form of {@link MigrationFormat.saveStream}).
 * @param format the format
 * @param ctx the source
 * @param options the version
 * @returns the stream
 */
export function saveStream<Ctx>(
  format: MigrationFormat<Ctx>,
  ctx: Ctx,
  options: SaveOptions = {},
): Uint8Array {
  return format.saveStream(ctx, options);
}

/**
 * Load a stream (free-function form of {@link MigrationFormat.loadStream}).
 * @param format the format
 * @param ctx the destination
 * @param data the stream (untrusted)
 * @returns what was loaded
 */
export function loadStream<Ctx>(
  format: MigrationFormat<Ctx>,
  ctx: Ctx,
  data: Uint8Array,
): LoadResult {
  return format.loadStream(ctx, data);
}
