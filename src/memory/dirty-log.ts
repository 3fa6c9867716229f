/**
 * The dirty-page log shared with the front-end during live migration
 * (vhost-user: Migration, VHOST_USER_SET_LOG_BASE, VHOST_F_LOG_ALL).
 *
 * One bit per 4 KiB guest page: `log[page >> 3] |= 1 << (page & 7)` with `page = gpa >> 12`,
 * set with atomic OR because the front-end reads and clears the log concurrently.
 *
 * Marks are batched: single-page and partial-word marks go into a small pending set of
 * (32-bit word index, mask) pairs, coalesced per word, and reach the shared log on
 * {@link DirtyLog.flush} (or when the set is full). Whole words inside a long range are OR'ed
 * at once. Ring code flushes before publishing a used index.
 */
import { GuestMemoryError, hex } from "./address.js";

/** log2 of the dirty-log page size */
export const LOG_PAGE_SHIFT = 12;
/** The dirty-log page size (VHOST_LOG_PAGE, 4 KiB). */
export const LOG_PAGE_SIZE = 1 << LOG_PAGE_SHIFT;

/** pending (word, mask) pairs kept before a forced flush */
const PENDING_CAPACITY = 16;

/** Largest log accepted: its 32-bit word indexes must fit in an Int32Array. */
const MAX_LOG_BYTES = 2 ** 33;

/**
 * A dirty-page bitmap in shared memory.
 *
 * LIFETIME: holds views into `buffer` (usually the SET_LOG_BASE mapping); do not use the log
 * after that mapping is unmapped.
 */
export class DirtyLog {
  /** the memory that holds the bitmap */
  readonly buffer: ArrayBuffer;
  /** byte offset of the bitmap in `buffer` (the bit of guest page 0) */
  readonly offset: number;
  /** size of the bitmap in bytes */
  readonly size: number;
  /** number of pages the log covers (size * 8) */
  readonly pages: number;

  readonly #u8: Uint8Array;
  readonly #u32: Uint32Array | null;
  readonly #words: number;
  readonly #pendWord = new Int32Array(PENDING_CAPACITY);
  readonly #pendMask = new Int32Array(PENDING_CAPACITY);
  #pendCount = 0;
  /** the pages of the last two single-page marks since the last flush (NaN: none) */
  #lastPage = NaN;
  #lastPage2 = NaN;

  /**
   * Wrap a bitmap.
   * @param buffer the memory that holds it (the SET_LOG_BASE mapping)
   * @param offset byte offset of the bitmap in `buffer`
   * @param size size of the bitmap in bytes
   * @throws GuestMemoryError when [offset, offset+size) does not fit in `buffer`
   */
  constructor(buffer: ArrayBuffer, offset: number, size: number) {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(size) ||
      offset < 0 ||
      size < 0 ||
      size > MAX_LOG_BYTES ||
      offset + size > buffer.byteLength
    ) {
      throw new GuestMemoryError(
        `dirty log: [offset ${offset}, +size ${size}) does not fit in a buffer of ` +
          `${buffer.byteLength} bytes`,
        { field: "size", value: size },
      );
    }
    this.buffer = buffer;
    this.offset = offset;
    this.size = size;
    this.pages = size * 8;
    // LIFETIME: views into the log mapping; valid until it is unmapped.
    this.#u8 = new Uint8Array(buffer, offset, size);
    // On a little-endian host, bit (page & 31) of 32-bit word (page >> 5) is bit (page & 7) of
    // byte (page >> 3). Words need a 4-aligned offset; bytes past the last whole word go
    // through the byte view.
    if (offset % 4 === 0 && isLittleEndianHost()) {
      this.#words = Math.floor(size / 4);
      this.#u32 = new Uint32Array(buffer, offset, this.#words);
    } else {
      this.#words = 0;
      this.#u32 = null;
    }
  }

  /**
   * Mark every 4 KiB page touched by [gpa, gpa+len) dirty (batched until flush()).
   * @param gpa guest-physical address of the first byte written
   * @param len number of bytes written (0 marks nothing)
   * @throws GuestMemoryError naming the address and the log size when the range reaches past
   *   the pages the log covers (nothing is marked then)
   */
  mark(gpa: number, len: number): void {
    if (len === 0) return;
    const end = gpa + len - 1;
    // Integer shifts below 2^31 (most guest addresses): cheaper than dividing doubles.
    const small = gpa >= 0 && end < 0x80000000;
    const first = small ? gpa >> LOG_PAGE_SHIFT : Math.floor(gpa / LOG_PAGE_SIZE);
    const last = small ? end >> LOG_PAGE_SHIFT : Math.floor(end / LOG_PAGE_SIZE);
    // A page among the last two marked is pending already (the data path marks receive
    // buffers and used elements, which mostly fall in the pages marked just before): nothing
    // to add. It was checked when it was marked, and a range inside it is in bounds (NaN or a
    // negative length never compares equal).
    if (last === first && len > 0 && (first === this.#lastPage || first === this.#lastPage2)) {
      return;
    }
    this.check(gpa, len);
    if (first === last) {
      this.#lastPage2 = this.#lastPage;
      this.#lastPage = first;
    }
    // page < 2^36 (size <= 2^33): word indexes < 2^31, so plain division is exact.
    const fw = Math.floor(first / 32);
    const lw = Math.floor(last / 32);
    const fb = first % 32;
    const lb = last % 32;
    if (fw === lw) {
      this.#pend(fw, maskBits(fb, lb));
      return;
    }
    this.#pend(fw, maskBits(fb, 31));
    for (let w = fw + 1; w < lw; w++) this.#orWord(w, -1);
    this.#pend(lw, maskBits(0, lb));
  }

  /**
   * Check that [gpa, gpa+len) can be marked, before guest memory is written: a write the log
   * cannot cover must not happen at all (vhost-user "Migration": every write is logged).
   * @param gpa guest-physical address of the first byte to be written
   * @param len number of bytes (0 always passes)
   * @throws GuestMemoryError naming the address and the log size when the range reaches past
   *   the pages the log covers
   */
  check(gpa: number, len: number): void {
    if (len === 0) return;
    const last = Math.floor((gpa + len - 1) / LOG_PAGE_SIZE);
    if (
      !Number.isSafeInteger(gpa) ||
      !Number.isSafeInteger(len) ||
      gpa < 0 ||
      len < 0 ||
      !(last < this.pages)
    ) {
      throw new GuestMemoryError(
        `dirty log: range [${hex(gpa)}, +${len}) is beyond the log of ${this.size} bytes ` +
          `(it covers guest addresses below ${hex(this.pages * LOG_PAGE_SIZE)})`,
        { gpa, length: len, field: "log size", value: this.size },
      );
    }
  }

  /**
   * Write the batched marks into the shared log (atomic OR per word).
   * ORDERING: call before publishing a used index, so the front-end never sees a used buffer
   * whose pages are not yet logged.
   */
  flush(): void {
    // ORDERING: after a flush the front-end may clear a page's bit (its log sync): the next
    // write to the page must mark it again.
    this.#lastPage = NaN;
    this.#lastPage2 = NaN;
    const n = this.#pendCount;
    for (let i = 0; i < n; i++) {
      this.#orWord(this.#pendWord[i] as number, this.#pendMask[i] as number);
    }
    this.#pendCount = 0;
  }

  /**
   * Whether a page's bit is set in the shared log (batched marks not yet flushed do not count).
   * @param gpa any guest-physical address inside the page
   * @returns true when the page is marked dirty
   * @throws GuestMemoryError when the address is beyond the log
   */
  isDirty(gpa: number): boolean {
    const page = Math.floor(gpa / LOG_PAGE_SIZE);
    if (!(page >= 0 && page < this.pages)) {
      throw new GuestMemoryError(`dirty log: ${hex(gpa)} is beyond the log of ${this.size} bytes`, {
        gpa,
        field: "log size",
        value: this.size,
      });
    }
    // ORDERING: atomic load; the front-end clears bits concurrently.
    return (Atomics.load(this.#u8, Math.floor(page / 8)) & (1 << (page % 8))) !== 0;
  }

  /** @returns the number of (word, mask) pairs batched and not yet flushed */
  get pendingCount(): number {
    return this.#pendCount;
  }

  #pend(word: number, mask: number): void {
    const words = this.#pendWord;
    const n = this.#pendCount;
    for (let i = n - 1; i >= 0; i--) {
      if (words[i] === word) {
        this.#pendMask[i] = (this.#pendMask[i] as number) | mask;
        return;
      }
    }
    if (n === PENDING_CAPACITY) {
      this.flush();
      words[0] = word;
      this.#pendMask[0] = mask;
      this.#pendCount = 1;
      return;
    }
    words[n] = word;
    this.#pendMask[n] = mask;
    this.#pendCount = n + 1;
  }

  #orWord(word: number, mask: number): void {
    if (word < this.#words) {
      // ORDERING: atomic OR; the front-end clears bits concurrently (test-and-clear).
      Atomics.or(this.#u32 as Uint32Array, word, mask);
      return;
    }
    const byte0 = word * 4;
    for (let b = 0; b < 4; b++) {
      const m = (mask >>> (8 * b)) & 0xff;
      // ORDERING: atomic OR per byte at the log's tail (as for whole words above).
      if (m !== 0) Atomics.or(this.#u8, byte0 + b, m);
    }
  }
}

/**
 * Bits lo..hi (inclusive) of a 32-bit word.
 * @param lo lowest bit, 0..31
 * @param hi highest bit, lo..31
 * @returns the mask as an int32
 */
function maskBits(lo: number, hi: number): number {
  const upper = hi === 31 ? -1 : (1 << (hi + 1)) - 1;
  return upper & ~((1 << lo) - 1);
}

/**
 * Whether this host stores multi-byte integers little-endian (typed-array views of ring
 * fields and of the log rely on it).
 * @returns true on a little-endian host
 */
export function isLittleEndianHost(): boolean {
  return new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
}
