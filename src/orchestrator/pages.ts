/**
 * Guest pages in the migration stream: PAGES sections carry u32 iteration, u32 count, then per
 * page u32 page number (gpa / 4096), u8 kind (0: all zero, 1: data) and, for data, 4096 bytes.
 */
import { createHash } from "node:crypto";
import type { Duplex } from "node:stream";
import type { GuestRam } from "../frontend/guest-ram.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { SectionType, MigrationStreamFormatError, frameSection } from "./stream.js";

/** Bytes per migrated page (VHOST_LOG_PAGE). */
export const PAGE_SIZE = 4096;
/** Pages per PAGES section. */
export const PAGES_PER_SECTION = 256;

/** Counters of pages sent. */
export interface PageCounters {
  /** pages sent (zero and data) */
  pages: number;
  /** of which all-zero (sent as a marker) */
  zeroPages: number;
  /** stream bytes of PAGES sections */
  bytes: number;
}

/** Bytes of one PAGES section at most: header, iteration and count, the pages, CRC. */
const SECTION_CAPACITY = 8 + 8 + PAGES_PER_SECTION * (5 + PAGE_SIZE) + 4;

/** One reusable section buffer and the write that still holds it. */
interface SendSlot {
  readonly buf: Buffer;
  /** settles when the stream has flushed the last write of this buffer (an error or null) */
  pending: Promise<Error | null> | null;
}

/**
 * Sends pages of guest RAM in PAGES sections from two section buffers that it reuses for the
 * whole migration: the page copy goes straight into the section (header and CRC written in
 * place), so a pass allocates nothing and touches no fresh memory. Both buffers are faulted in
 * when the sender is made (before the stop), so the final pass takes no page fault.
 *
 * A section is handed to the stream without waiting for it to be flushed; a buffer is filled
 * again only once the stream has flushed it (LIFETIME: the socket holds a reference to the
 * bytes until its write callback), so at most two sections are in flight and the final pages
 * go out while the source goes on with the device state.
 */
export class PageSender {
  readonly #stream: Duplex;
  readonly #memory: GuestMemory;
  readonly #counters: PageCounters;
  readonly #slots: [SendSlot, SendSlot];
  #next = 0;

  /**
   * @param stream the connection
   * @param memory the source's guest memory
   * @param counters updated as pages go out
   */
  constructor(stream: Duplex, memory: GuestMemory, counters: PageCounters) {
    this.#stream = stream;
    this.#memory = memory;
    this.#counters = counters;
    // fill(): fault the pages in now, outside the downtime.
    const slot = (): SendSlot => ({
      buf: Buffer.allocUnsafeSlow(SECTION_CAPACITY).fill(0),
      pending: null,
    });
    this.#slots = [slot(), slot()];
  }

  /**
   * Send pages in PAGES sections of one iteration.
   * @param iteration the iteration number written in each section
   * @param pages page numbers (pages outside every region are skipped)
   * @returns when every section was handed to the stream (not necessarily flushed)
   * @throws Error when the connection is closed or fails while a section is written
   */
  async send(iteration: number, pages: Iterable<number>): Promise<void> {
    const counters = this.#counters;
    let slot = await this.#take();
    let buf = slot.buf;
    let off = 16;
    let n = 0;
    for (const page of pages) {
      const gpa = page * PAGE_SIZE;
      const r = this.#memory.tryRegionFor(gpa, PAGE_SIZE);
      if (r === null) continue;
      // LIFETIME: a view of the mapped page, used only within this iteration of the loop.
      const at = r.bytes.byteOffset + (gpa - r.gpa);
      const src = Buffer.from(r.bytes.buffer, at, PAGE_SIZE);
      buf.writeUInt32BE(page, off);
      // ORDERING: the back-end (and the guest) may be writing this page while it is copied: no
      // barrier can order a plain copy against them. Pre-copy relies on the dirty log instead:
      // the log was fetched and cleared before this copy, so any write that races it sets the
      // page's bit again and the page goes out again in a later pass (the final pass runs with
      // the rings stopped). The zero check looks at the copy, so the kind matches what is sent.
      src.copy(buf, off + 5);
      if (isZeroPage(buf, off + 5)) {
        buf[off + 4] = 0;
        off += 5;
        counters.zeroPages++;
      } else {
        buf[off + 4] = 1;
        off += 5 + PAGE_SIZE;
      }
      n++;
      counters.pages++;
      if (n === PAGES_PER_SECTION) {
        this.#write(slot, iteration, n, off);
        slot = await this.#take();
        buf = slot.buf;
        off = 16;
        n = 0;
      }
    }
    if (n > 0) this.#write(slot, iteration, n, off);
  }

  /**
   * Wait until the stream has flushed every section handed to it.
   * @throws Error when a write failed
   */
  async flushed(): Promise<void> {
    for (const slot of this.#slots) {
      const err = await slot.pending;
      if (err) throw err;
    }
  }

  /** The next buffer, once the stream no longer holds it. */
  async #take(): Promise<SendSlot> {
    const slot = this.#slots[this.#next] as SendSlot;
    this.#next ^= 1;
    const err = await slot.pending;
    slot.pending = null;
    if (err) throw err;
    if (this.#stream.destroyed || this.#stream.writableEnded) {
      throw new Error("migration stream: connection closed");
    }
    return slot;
  }

  /** Header and CRC in place, then the section to the stream. */
  #write(slot: SendSlot, iteration: number, count: number, end: number): void {
    slot.buf.writeUInt32BE(iteration, 8);
    slot.buf.writeUInt32BE(count, 12);
    const section = frameSection(slot.buf, SectionType.PAGES, end - 8);
    this.#counters.bytes += section.length;
    slot.pending = new Promise<Error | null>((resolve) => {
      this.#stream.write(section, (err) => resolve(err ?? null));
    });
  }
}

/** A zero page, compared against by {@link isZeroPage} (never written). */
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** True when the 4096 bytes at `off` are all zero. */
function isZeroPage(buf: Buffer, off: number): boolean {
  return buf.compare(ZERO_PAGE, 0, PAGE_SIZE, off, off + PAGE_SIZE) === 0;
}

/**
 * Every page of every region, in order.
 * @param ram the guest RAM
 * @yields page numbers
 */
export function* allPages(ram: GuestRam): Generator<number> {
  for (const r of ram.regions) {
    const first = r.info.gpa / PAGE_SIZE;
    const count = r.info.size / PAGE_SIZE;
    for (let i = 0; i < count; i++) yield first + i;
  }
}

/** Which pages of a fresh (all-zero) destination RAM were written since it was created. */
export class TouchedPages {
  readonly #bits = new Map<number, Uint8Array>();

  /**
   * @param page page number
   * @returns true when the page was written
   */
  test(page: number): boolean {
    const chunk = this.#bits.get(Math.floor(page / 65536));
    return (
      chunk !== undefined && ((chunk[(page % 65536) >> 3] as number) & (1 << (page & 7))) !== 0
    );
  }

  /**
   * Mark a page written.
   * @param page page number
   */
  set(page: number): void {
    const k = Math.floor(page / 65536);
    let chunk = this.#bits.get(k);
    if (chunk === undefined) {
      chunk = new Uint8Array(8192);
      this.#bits.set(k, chunk);
    }
    const i = (page % 65536) >> 3;
    chunk[i] = (chunk[i] as number) | (1 << (page & 7));
  }
}

/**
 * Apply a PAGES payload to the destination's guest memory.
 * @param memory the destination's guest memory
 * @param payload the section payload
 * @param touched pages written so far (zero pages that were never written are skipped)
 * @returns the iteration and the number of pages
 * @throws MigrationStreamFormatError for a malformed payload or a page outside guest memory
 */
export function applyPages(
  memory: GuestMemory,
  payload: Uint8Array,
  touched?: TouchedPages,
): { iteration: number; pages: number } {
  const b = Buffer.from(payload.buffer, payload.byteOffset, payload.length);
  if (b.length < 8) throw new MigrationStreamFormatError("pages", b.length, "PAGES too short");
  const iteration = b.readUInt32BE(0);
  const count = b.readUInt32BE(4);
  let off = 8;
  for (let i = 0; i < count; i++) {
    if (off + 5 > b.length) throw new MigrationStreamFormatError("pages", i, "PAGES truncated");
    const page = b.readUInt32BE(off);
    const kind = b.readUInt8(off + 4);
    off += 5;
    const gpa = page * PAGE_SIZE;
    const r = memory.tryRegionFor(gpa, PAGE_SIZE);
    if (r === null) {
      throw new MigrationStreamFormatError(
        "page",
        `0x${gpa.toString(16)}`,
        "page outside guest memory",
      );
    }
    // LIFETIME: r.bytes is the destination RAM's mapping, open for the whole load.
    const at = gpa - r.gpa;
    if (kind === 0) {
      // A fresh page is zero already: writing it would only allocate it.
      if (touched === undefined || touched.test(page)) r.bytes.fill(0, at, at + PAGE_SIZE);
    } else if (kind === 1) {
      touched?.set(page);
      if (off + PAGE_SIZE > b.length)
        throw new MigrationStreamFormatError("pages", i, "PAGES truncated");
      r.bytes.set(b.subarray(off, off + PAGE_SIZE), at);
      off += PAGE_SIZE;
    } else {
      throw new MigrationStreamFormatError("page kind", kind, "unknown page kind");
    }
  }
  if (off !== b.length)
    throw new MigrationStreamFormatError("pages", b.length - off, "trailing bytes");
  return { iteration, pages: count };
}

/**
 * SHA-256 of guest RAM, region by region in memory-table order.
 * @param ram the guest RAM
 * @returns 32 bytes
 */
export function hashGuestRam(ram: GuestRam): Buffer {
  const h = createHash("sha256");
  // LIFETIME: the region views are used while the RAM is open.
  for (const r of ram.regions) for (const piece of r.pieces) h.update(piece.bytes);
  return h.digest();
}
