/**
 * The one mechanism behind both migration streams: a 16-byte header (u64 magic, u32 version,
 * u32 compat_version, network byte order) and, per version, an ordered list of named stages.
 * The receiver picks the newest version it knows within the sender's
 * [compat_version, version] and aborts with an error naming both ranges otherwise; a stage of
 * a newer sender that the chosen version does not know is skipped.
 *
 * Two streams use it, told apart by their magic:
 * - {@link stateStream}: a back-end's own state, carried over SET_DEVICE_STATE_FD
 *   (src/migration/stream.ts, `MigrationFormat`);
 * - {@link hostStream}: the stream between the source and the destination hosts
 *   (src/orchestrator/stream.ts and the stage lists of src/orchestrator/source.ts and
 *   destination.ts).
 *
 * (passt `migrate.h`: `struct migrate_header`, `struct migrate_stage`,
 * `struct migrate_version`)
 */
import { MigrationStreamError } from "./state-codec.js";

/** Header size of every staged stream: magic u64, version u32, compat_version u32. */
export const STAGED_HEADER_SIZE = 16;
/** Longest stage name (bytes of UTF-8). */
export const MAX_STAGE_NAME_BYTES = 255;

/** Which stream a header belongs to. */
export interface StreamKind {
  /** name for errors (`"state stream"`, `"host stream"`) */
  readonly name: string;
  /** the header's magic */
  readonly magic: bigint;
}

/** The back-end state stream (SET_DEVICE_STATE_FD), passt's magic. */
export const stateStream: StreamKind = Object.freeze({
  name: "state stream",
  magic: 0xb1bb1d1b0bb1d1b0n,
});

/** The host stream between the source and destination orchestrators ("VHKMHOST"). */
export const hostStream: StreamKind = Object.freeze({
  name: "host stream",
  magic: 0x56484b4d484f5354n,
});

/** A parsed header. */
export interface StreamHeader {
  /** the sender's version (how the stream is encoded) */
  version: number;
  /** the oldest version able to read it */
  compatVersion: number;
}

/**
 * Encode a header.
 * @param kind which stream
 * @param version the sender's version
 * @param compatVersion the oldest version able to read it
 * @returns 16 bytes
 */
export function encodeStreamHeader(
  kind: StreamKind,
  version: number,
  compatVersion: number,
): Uint8Array {
  const out = new Uint8Array(STAGED_HEADER_SIZE);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, kind.magic, false);
  view.setUint32(8, version, false);
  view.setUint32(12, compatVersion, false);
  return out;
}

/**
 * Check and parse a header.
 * @param kind which stream is expected
 * @param data at least 16 bytes (the rest is ignored)
 * @returns version and compat_version
 * @throws MigrationStreamError TRUNCATED, BAD_MAGIC (naming the stream expected) or BAD_HEADER
 * (passt `migrate.h`: `struct migrate_header`)
 */
export function decodeStreamHeader(kind: StreamKind, data: Uint8Array): StreamHeader {
  if (data.length < STAGED_HEADER_SIZE) {
    throw new MigrationStreamError(
      "TRUNCATED",
      `${kind.name} shorter than its ${STAGED_HEADER_SIZE}-byte header`,
      { field: "header", value: data.length },
    );
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const magic = view.getBigUint64(0, false);
  if (magic !== kind.magic) {
    throw new MigrationStreamError("BAD_MAGIC", `not a vhostkit ${kind.name}`, {
      field: "magic",
      value: magic,
    });
  }
  const version = view.getUint32(8, false);
  const compatVersion = view.getUint32(12, false);
  if (version === 0 || compatVersion === 0 || compatVersion > version) {
    throw new MigrationStreamError(
      "BAD_HEADER",
      `${kind.name}: version ${version} with compat_version ${compatVersion}: need ` +
        `1 <= compat_version <= version`,
      { field: "compat_version", value: compatVersion },
    );
  }
  return { version, compatVersion };
}

/**
 * A version and its ordered stages.
 * @typeParam S the stage type of the stream
 */
export interface StagedVersion<S extends { readonly name: string }> {
  /** version number, >= 1 */
  readonly id: number;
  /**
   * oldest version able to read a stream of this version (default: `id`); a version that only
   * adds stages can declare the previous one, whose receivers then skip the new stages
   */
  readonly compat?: number;
  /** the stages, in stream order */
  readonly stages: readonly S[];
}

/**
 * The versions one side of a stream knows, checked once: version ids 1..2^32-1 and unique,
 * 1 <= compat <= id, stage names 1..255 bytes and unique within a version.
 * @typeParam S the stage type
 */
export class StageTable<S extends { readonly name: string }> {
  /** which stream */
  readonly kind: StreamKind;
  /** name for errors (the owner of the table, e.g. a device) */
  readonly name: string;
  readonly #versions: readonly StagedVersion<S>[];

  /**
   * @param kind which stream
   * @param versions every version this side knows (any order)
   * @param name name for errors (default the stream's)
   * @throws MigrationStreamError BAD_DEFINITION for a malformed table
   */
  constructor(kind: StreamKind, versions: readonly StagedVersion<S>[], name = kind.name) {
    this.kind = kind;
    this.name = name;
    const def = (what: string, field: string, value: unknown): MigrationStreamError =>
      new MigrationStreamError("BAD_DEFINITION", `${name}: ${what}`, { field, value });
    if (versions.length === 0) throw def("no version defined", "versions.length", 0);
    const ids = new Set<number>();
    const enc = new TextEncoder();
    for (const v of versions) {
      if (!Number.isInteger(v.id) || v.id < 1 || v.id > 0xffff_ffff)
        throw def("version ids are 1..2^32-1", "version.id", v.id);
      if (ids.has(v.id)) throw def("version defined twice", "version.id", v.id);
      ids.add(v.id);
      const compat = v.compat ?? v.id;
      if (!Number.isInteger(compat) || compat < 1 || compat > v.id)
        throw def(`compat of version ${v.id} must be 1..${v.id}`, "version.compat", compat);
      const names = new Set<string>();
      for (const s of v.stages) {
        const n = enc.encode(s.name).length;
        if (n === 0 || n > MAX_STAGE_NAME_BYTES)
          throw def(`stage names are 1..${MAX_STAGE_NAME_BYTES} bytes`, "stage.name", s.name);
        if (names.has(s.name))
          throw def(`stage named twice in version ${v.id}`, "stage.name", s.name);
        names.add(s.name);
      }
    }
    this.#versions = [...versions].sort((a, b) => a.id - b.id);
  }

  /** @returns the version ids this side knows, ascending */
  get versions(): number[] {
    return this.#versions.map((v) => v.id);
  }

  /** @returns the newest version */
  get newest(): StagedVersion<S> {
    return this.#versions[this.#versions.length - 1] as StagedVersion<S>;
  }

  /**
   * A version by id.
   * @param id the version id
   * @returns the version, or undefined
   */
  version(id: number): StagedVersion<S> | undefined {
    return this.#versions.find((v) => v.id === id);
  }

  /**
   * The header a sender of a version writes.
   * @param id the version (default the newest)
   * @returns the 16 bytes
   * @throws MigrationStreamError BAD_DEFINITION for an unknown version
   */
  header(id = this.newest.id): Uint8Array {
    const v = this.version(id);
    if (v === undefined) {
      throw new MigrationStreamError("BAD_DEFINITION", `${this.name}: no such version`, {
        field: "version",
        value: id,
      });
    }
    return encodeStreamHeader(this.kind, v.id, v.compat ?? v.id);
  }

  /**
   * The version a receiver uses: the newest it knows within [compat_version, version].
   * @param header the sender's header
   * @returns the version
   * @throws MigrationStreamError NO_COMPATIBLE_VERSION naming the sender's range and the
   *   versions known here
   */
  chooseVersion(header: StreamHeader): StagedVersion<S> {
    for (let i = this.#versions.length - 1; i >= 0; i--) {
      const v = this.#versions[i] as StagedVersion<S>;
      if (v.id >= header.compatVersion && v.id <= header.version) return v;
    }
    throw new MigrationStreamError(
      "NO_COMPATIBLE_VERSION",
      `${this.name}: stream version ${header.version} (compatible back to ` +
        `${header.compatVersion}) but this side knows versions ${this.versions.join(", ")}`,
      { field: "version", value: `${header.compatVersion}..${header.version}` },
    );
  }
}
