/**
 * One virtqueue as the front-end (the driver) drives it: the driver-side ring in guest RAM, its
 * kick, call and err eventfds, batched kicks, waiting for used buffers, and a buffer pool for
 * network frames (12-byte virtio-net header + frame).
 *
 * VIRTIO 1.2 §2.7 (split), §2.8 (packed); vhost-user: VHOST_USER_SET_VRING_KICK/CALL/ERR.
 */
import { EventEmitter } from "node:events";
import { native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import type { Gpa } from "../memory/address.js";
import { SplitDriverQueue } from "../virtq/split.js";
import { PackedDriverQueue } from "../virtq/packed.js";
import type { PackedDriverPosition } from "../virtq/packed.js";
import type { QueueBase, Segment } from "../virtq/types.js";
import { packedRingSizes, splitRingSizes } from "../virtq/layout.js";
import type { GuestRam } from "./guest-ram.js";

/** virtio_net_hdr_v1 size once VERSION_1 is negotiated (VIRTIO 1.2 §5.1.6). */
export const VIRTIO_NET_HDR_SIZE = 12;

/** Default size of one pool buffer: a 1514-byte frame plus the header fits. */
export const DEFAULT_BUFFER_SIZE = 2048;

/** Where a ring lies in guest memory (GPAs). Packed: desc / driver event / device event. */
export interface RingAddresses {
  /** descriptor table (split) or descriptor ring (packed) */
  desc: Gpa;
  /** available ring (split) or driver event suppression structure (packed) */
  avail: Gpa;
  /** used ring (split) or device event suppression structure (packed) */
  used: Gpa;
  /** indirect descriptor tables (split with indirect), or null */
  indirectTable: Gpa | null;
}

/** A used buffer taken from a queue. */
export interface UsedBuffer {
  /** buffer id (split: head index; packed: buffer id) */
  id: number;
  /** bytes the device says it wrote */
  len: number;
  /** the token given to add() (a {@link PoolBuffer} for the net helpers) */
  token: unknown;
  /** receive pool buffers: a copy of the `len` bytes written (header included); else null */
  data: Uint8Array | null;
}

/** A pool buffer handed to the ring by the net helpers (the token of such buffers). */
export class PoolBuffer {
  /**
   * @param slot pool slot
   * @param gpa guest-physical address of the slot
   * @param receive true for a device-writable (RX) buffer
   */
  constructor(
    readonly slot: number,
    readonly gpa: Gpa,
    readonly receive: boolean,
  ) {}
}

/** Counters of a queue. */
export interface FrontendQueueStats {
  /** buffers added */
  added: number;
  /** used buffers taken */
  used: number;
  /** kick eventfd writes */
  kicks: number;
  /** kick() calls that published buffers but needed no notification */
  kicksSuppressed: number;
  /** call eventfd notifications seen */
  calls: number;
  /** err eventfd notifications seen */
  errors: number;
}

/** What the front-end passes to build a {@link FrontendQueue} (internal wiring). */
export interface FrontendQueueInit {
  index: number;
  size: number;
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  ram: GuestRam;
  ring: RingAddresses;
  kickFd: number;
  callFd: number;
  errFd: number;
  bufferSize: number;
  bufferRegion: number | undefined;
  /** split only: initial avail.idx / used.idx */
  startIdx: number;
}

/** A buffer token as a migration snapshot carries it: a pool buffer, or a plain JSON value. */
export type TokenSnapshot =
  | { kind: "pool"; slot: number; gpa: number; receive: boolean }
  | { kind: "value"; value: string | number | boolean | null }
  | { kind: "none" };

/**
 * The driver-side state of a queue, as a VM's guest kernel would keep it in guest RAM: what the
 * destination front-end needs to go on driving the ring after a migration. Plain JSON data.
 */
export interface DriverSnapshot {
  /** queue index */
  index: number;
  /** number of descriptors */
  size: number;
  /** packed ring */
  packed: boolean;
  /** EVENT_IDX */
  eventIdx: boolean;
  /** split indirect tables */
  indirect: boolean;
  /** ring addresses (GPAs) */
  ring: { desc: number; avail: number; used: number; indirectTable: number | null };
  /** split: the next used index the driver reads (== the device's last avail index) */
  lastUsedIdx: number;
  /** buffers made available and not used yet, in the order they were added */
  outstanding: {
    /** buffer id (packed: the id in the ring; split: the head index); absent in old snapshots */
    id?: number;
    segments: { gpa: number; len: number; writable: boolean }[];
    token: TokenSnapshot;
  }[];
  /**
   * packed: the driver's ring position (next avail / next used position and wrap counters,
   * in-flight ids and extents, free ids); the destination continues there over the migrated
   * ring memory. Absent for split rings (and in old snapshots: the buffers are re-posted).
   */
  packedPosition?: PackedDriverPosition;
  /** used buffers taken from the ring and not yet handed to the application */
  ready: { id: number; len: number; token: TokenSnapshot }[];
  /** the net-helper pool: GPA of slot 0, or null before first use */
  pool: number | null;
  /** free pool slots (in pop order) */
  freeSlots: number[];
  /** bytes per pool buffer */
  bufferSize: number;
}

function tokenSnapshot(t: unknown, queue: number): TokenSnapshot {
  if (t instanceof PoolBuffer)
    return { kind: "pool", slot: t.slot, gpa: t.gpa, receive: t.receive };
  if (t === undefined) return { kind: "none" };
  if (t === null || typeof t === "string" || typeof t === "number" || typeof t === "boolean") {
    return { kind: "value", value: t };
  }
  throw new RangeError(`queue ${queue}: a buffer token of type ${typeof t} cannot be migrated`);
}

function tokenFromSnapshot(t: TokenSnapshot): unknown {
  if (t.kind === "pool") return new PoolBuffer(t.slot, t.gpa as Gpa, t.receive);
  if (t.kind === "value") return t.value;
  return undefined;
}

interface Outstanding {
  segments: Segment[];
  token: unknown;
}

type Driver = SplitDriverQueue | PackedDriverQueue;

/**
 * A queue driven by the front-end.
 *
 * Events: `call` (the call eventfd fired), `queue-error` (the err eventfd fired: the back-end
 * found the ring broken).
 *
 * LIFETIME: the ring lives in the {@link GuestRam} it was set up in (or re-bound to); the
 * queue must not be used after that RAM is closed.
 */
export class FrontendQueue extends EventEmitter {
  /** queue index */
  readonly index: number;
  /** number of descriptors */
  readonly size: number;
  /** packed ring (VIRTIO_F_RING_PACKED) */
  readonly packed: boolean;
  /** VIRTIO_F_EVENT_IDX */
  readonly eventIdx: boolean;
  /** split indirect tables in use */
  readonly indirect: boolean;
  /** ring addresses (GPAs) */
  readonly ring: RingAddresses;
  /** counters */
  readonly stats: FrontendQueueStats = {
    added: 0,
    used: 0,
    kicks: 0,
    kicksSuppressed: 0,
    calls: 0,
    errors: 0,
  };
  /** the base returned by the last GET_VRING_BASE, or null */
  stoppedBase: QueueBase | null = null;
  /**
   * true between GET_VRING_BASE and the restart: kick() publishes but does not write the kick
   * eventfd (a kick would start the ring again in the back-end); the restart kicks once.
   */
  stopped = false;
  /** SET_VRING_ERR was sent at set-up (a restart sends it again; "skip" set-ups never do) */
  sentErr = false;
  /**
   * The ring is enabled (SET_VRING_ENABLE 1, or started without F_PROTOCOL_FEATURES); a stop
   * with GET_VRING_BASE leaves it as it was, so a migration saves the driver's choice.
   */
  enabled = true;
  /** size of one pool buffer */
  readonly bufferSize: number;
  #driver: Driver;
  #ram: GuestRam;
  #kickFd: number;
  #callFd: number;
  #errFd: number;
  #callWatcher: FdWatcher | null = null;
  #errWatcher: FdWatcher | null = null;
  readonly #outstanding = new Map<number, Outstanding>();
  readonly #ready: UsedBuffer[] = [];
  readonly #bufferRegion: number | undefined;
  #pool: Gpa | null = null;
  #freeSlots: number[] = [];
  #disposed = false;
  /** used-buffer notifications wanted ({@link setNotification}; true by default) */
  #notify = true;
  /**
   * packed with EVENT_IDX: the used event (RING_EVENT_FLAGS_DESC) is set at the driver's next
   * used position; cleared when a used buffer is taken (the position moves on)
   */
  #usedEventArmed = false;
  /**
   * packed: the ring memory (descriptor ring, driver and device event areas) as it was before
   * the constructor initialised it, kept until the first add() or restoreSnapshot(): a
   * migration destination continues on the migrated ring rather than on a zeroed one.
   */
  #ringBeforeInit: { desc: Uint8Array; driverEvent: Uint8Array; deviceEvent: Uint8Array } | null =
    null;

  /**
   * Build the driver side over ring memory the front-end allocated (use
   * {@link VhostUserFrontend.setupQueue}); the ring memory is initialised here.
   * @param init ring geometry, RAM, eventfds (this queue owns them from now on)
   */
  constructor(init: FrontendQueueInit) {
    super();
    this.index = init.index;
    this.size = init.size;
    this.packed = init.packed;
    this.eventIdx = init.eventIdx;
    this.indirect = init.indirect;
    this.ring = init.ring;
    this.bufferSize = init.bufferSize;
    this.#ram = init.ram;
    this.#kickFd = init.kickFd;
    this.#callFd = init.callFd;
    this.#errFd = init.errFd;
    this.#bufferRegion = init.bufferRegion;
    if (this.packed) {
      const sizes = packedRingSizes(this.size);
      this.#ringBeforeInit = {
        desc: init.ram.read(this.ring.desc, sizes.desc),
        driverEvent: init.ram.read(this.ring.avail, sizes.driverEvent),
        deviceEvent: init.ram.read(this.ring.used, sizes.deviceEvent),
      };
    }
    this.#driver = this.#buildDriver(init.ram, init.startIdx);
    if (this.#errFd >= 0) {
      const w = new native.FdWatcher(this.#errFd, (_ev, err) => {
        if (err) return;
        const n = native.eventfdRead(this.#errFd);
        if (n === null) return;
        this.stats.errors++;
        this.emit("queue-error", this.index);
      });
      w.start(POLL_READABLE);
      this.#errWatcher = w;
    }
  }

  #buildDriver(
    ram: GuestRam,
    startIdx: number,
    restore?: { position: PackedDriverPosition; tokens: ReadonlyMap<number, unknown> },
  ): Driver {
    // LIFETIME: the driver keeps views into `ram`'s mappings; rebind() replaces it before the
    // previous RAM may be closed, and dispose() drops nothing that could outlive `ram`.
    if (this.packed) {
      const opts = {
        size: this.size,
        desc: this.ring.desc,
        driverEvent: this.ring.avail,
        deviceEvent: this.ring.used,
        eventIdx: this.eventIdx,
        indirect: false,
      };
      return new PackedDriverQueue(ram.memory, restore ? { ...opts, restore } : opts);
    }
    const opts = {
      size: this.size,
      desc: this.ring.desc,
      avail: this.ring.avail,
      used: this.ring.used,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      startIdx,
      index: this.index,
    };
    return new SplitDriverQueue(
      ram.memory,
      this.ring.indirectTable !== null ? { ...opts, indirectTable: this.ring.indirectTable } : opts,
    );
  }

  /** @returns the driver-side ring (split or packed) */
  get driver(): SplitDriverQueue | PackedDriverQueue {
    return this.#driver;
  }

  /** @returns the guest RAM the ring lives in */
  get ram(): GuestRam {
    return this.#ram;
  }

  /** @returns the kick eventfd, or -1 when the back-end polls (no-fd flag) */
  get kickFd(): number {
    return this.#kickFd;
  }

  /** @returns the call eventfd, or -1 */
  get callFd(): number {
    return this.#callFd;
  }

  /** @returns the err eventfd, or -1 */
  get errFd(): number {
    return this.#errFd;
  }

  /** @returns buffers added and not yet used */
  get outstanding(): number {
    return this.#outstanding.size;
  }

  /** @returns free descriptors in the ring */
  get freeCount(): number {
    return this.#driver.freeCount;
  }

  /** @returns used buffers taken from the ring but not yet returned by getUsed() */
  get readyCount(): number {
    return this.#ready.length;
  }

  #checkLive(what: string): void {
    if (this.#disposed) throw new Error(`queue ${this.index}: ${what} after the queue was closed`);
  }

  /**
   * Add a buffer (visible to the device after {@link kick}).
   * @param segments device-readable segments first, then device-writable ones
   * @param token returned with the buffer by getUsed()
   * @returns the buffer id, or null when the ring is full
   * @throws VirtqueueError / RangeError for a bad segment list
   * (VIRTIO 1.2 §2.7.13, §2.8.21)
   */
  add(segments: Segment[], token?: unknown): number | null {
    this.#checkLive("add");
    this.#ringBeforeInit = null;
    const id = this.#driver.add(segments, token);
    if (id !== null) {
      this.#outstanding.set(id, { segments: segments.slice(), token });
      this.stats.added++;
    }
    return id;
  }

  /**
   * Publish added buffers and write the kick eventfd only when the ring says the device wants
   * a notification (EVENT_IDX avail_event, NO_NOTIFY, packed event suppression): one kick per
   * batch.
   * @returns true when the ring asked for a notification (the eventfd is written unless the
   *   queue is stopped or has no kick fd)
   * (VIRTIO 1.2 §2.7.13.4, §2.8.21.2)
   */
  kick(): boolean {
    this.#checkLive("kick");
    const need = this.#driver.kick();
    if (this.#ram.tracking) this.markRingDirty();
    if (need) {
      if (this.stopped) return need;
      if (this.#kickFd >= 0) {
        native.eventfdWrite(this.#kickFd, 1);
        this.stats.kicks++;
      }
    } else {
      this.stats.kicksSuppressed++;
    }
    return need;
  }

  /** Write the kick eventfd whatever the ring says (e.g. after a ring restart). */
  forceKick(): void {
    this.#checkLive("forceKick");
    if (this.#kickFd >= 0) {
      native.eventfdWrite(this.#kickFd, 1);
      this.stats.kicks++;
    }
  }

  #pullOne(): UsedBuffer | null {
    let u = this.#driver.getUsed();
    if (u === null) {
      if (!this.#armUsedEvent()) return null;
      // ORDERING: the used event was stored (seq-cst) before this second look at the ring: a
      // buffer the device used before it saw the event (and so did not notify) is found here;
      // one used after it is notified.
      u = this.#driver.getUsed();
      if (u === null) return null;
    }
    this.#usedEventArmed = false;
    this.#outstanding.delete(u.id);
    this.stats.used++;
    let data: Uint8Array | null = null;
    const t = u.token;
    if (t instanceof PoolBuffer && t.receive) {
      data = this.#ram.read(t.gpa, Math.min(u.len, this.bufferSize));
    }
    return { id: u.id, len: u.len, token: t, data };
  }

  /**
   * Packed ring with EVENT_IDX: on finding no used buffer, ask for one call when the device
   * uses the buffer at the driver's next used position (RING_EVENT_FLAGS_DESC), as the split
   * driver publishes used_event (VIRTIO 1.2 §2.8.10, §2.8.22; Linux
   * `virtqueue_enable_cb_prepare_packed`). Without it the event structure stays ENABLE and
   * every used buffer is notified.
   * @returns true when the event was stored now (look at the ring once more)
   */
  #armUsedEvent(): boolean {
    const d = this.#driver;
    if (!(d instanceof PackedDriverQueue) || !this.eventIdx || !this.#notify) return false;
    if (this.#usedEventArmed) return false;
    d.setUsedEvent(0);
    this.#usedEventArmed = true;
    if (this.#ram.tracking) this.#ram.markDirty(this.ring.avail, 4);
    return true;
  }

  /** Move every used buffer from the ring into the ready list. */
  #pullAll(): void {
    for (let u = this.#pullOne(); u !== null; u = this.#pullOne()) this.#ready.push(u);
  }

  #release(u: UsedBuffer): void {
    if (u.token instanceof PoolBuffer) this.#freeSlots.push(u.token.slot);
  }

  /**
   * Take the next used buffer (pool buffers go back to the pool; receive buffers carry a copy
   * of what the device wrote).
   * @returns the buffer, or null when none is used
   * @throws VirtqueueError when the device returned an id that is not outstanding
   */
  getUsed(): UsedBuffer | null {
    this.#checkLive("getUsed");
    const u = this.#ready.shift() ?? this.#pullOne();
    if (u !== null) this.#release(u);
    return u;
  }

  /**
   * Ask the device for used-buffer notifications (call eventfd) or not.
   * @param enabled true to ask for notifications
   * @returns true when used buffers are already waiting (split only; packed: false)
   * (VIRTIO 1.2 §2.7.7, §2.8.10)
   */
  setNotification(enabled: boolean): boolean {
    this.#checkLive("setNotification");
    this.#notify = enabled;
    const r = this.#driver.setNotification(enabled);
    // packed with EVENT_IDX: enabling sets the used event at the next used position
    this.#usedEventArmed = enabled && this.packed && this.eventIdx;
    return r === true;
  }

  #startCallWatch(): void {
    if (this.#callWatcher !== null || this.#callFd < 0 || this.#disposed) return;
    const w = new native.FdWatcher(this.#callFd, (_ev, err) => {
      if (err) return;
      const n = native.eventfdRead(this.#callFd);
      if (n === null) return;
      this.stats.calls++;
      this.emit("call", this.index);
    });
    w.start(POLL_READABLE);
    this.#callWatcher = w;
  }

  /**
   * Be called back on every call notification (watching the call eventfd starts now).
   * @param cb called with the queue index
   * @returns a function that removes the callback
   */
  onCall(cb: (index: number) => void): () => void {
    this.#checkLive("onCall");
    this.on("call", cb);
    this.#startCallWatch();
    return () => this.off("call", cb);
  }

  /**
   * Wait until at least `count` used buffers are ready (taken from the ring into the ready
   * list), woken by the call eventfd (or polling every millisecond when the queue has no call
   * fd). Call {@link getUsed} or {@link receiveFrames} to take them.
   * @param timeoutMs give up after this long (default 5000)
   * @param count how many used buffers to wait for (default 1)
   * @returns the number of used buffers ready
   * @throws Error (rejection) naming the queue and the count when the timeout expires
   */
  waitForUsed(timeoutMs = 5000, count = 1): Promise<number> {
    this.#checkLive("waitForUsed");
    return new Promise<number>((resolve, reject) => {
      let timer: NodeJS.Timeout | null = null;
      let poll: NodeJS.Timeout | null = null;
      const cleanup = (): void => {
        this.off("call", check);
        this.off("disposed", onDispose);
        if (timer) clearTimeout(timer);
        if (poll) clearInterval(poll);
      };
      const check = (): boolean => {
        if (this.#disposed) return false;
        try {
          this.#pullAll();
        } catch (err) {
          cleanup();
          reject(err as Error);
          return true;
        }
        if (this.#ready.length >= count) {
          cleanup();
          resolve(this.#ready.length);
          return true;
        }
        return false;
      };
      const onDispose = (): void => {
        cleanup();
        reject(new Error(`queue ${this.index}: closed while waiting for used buffers`));
      };
      if (check()) return;
      this.on("call", check);
      this.on("disposed", onDispose);
      this.#startCallWatch();
      if (this.#callFd < 0) poll = setInterval(check, 1);
      timer = setTimeout(() => {
        if (check()) return;
        cleanup();
        reject(
          new Error(
            `queue ${this.index}: ${this.#ready.length} of ${count} used buffers after ${timeoutMs} ms ` +
              `(outstanding=${this.#outstanding.size}, calls=${this.stats.calls})`,
          ),
        );
      }, timeoutMs);
    });
  }

  // --- network helpers ---------------------------------------------------------------

  #takeSlot(): PoolBuffer | null {
    if (this.#pool === null) {
      const bytes = this.size * this.bufferSize;
      let at: Gpa;
      try {
        at = this.#ram.alloc(bytes, 64, this.#bufferRegion);
      } catch {
        at = this.#ram.alloc(bytes, 64);
      }
      this.#pool = at;
      this.#freeSlots = Array.from({ length: this.size }, (_, i) => this.size - 1 - i);
    }
    const slot = this.#freeSlots.pop();
    if (slot === undefined) return null;
    return new PoolBuffer(slot, (this.#pool + slot * this.bufferSize) as Gpa, false);
  }

  #segmentsOf(at: Gpa, len: number, parts: number, writable: boolean): Segment[] {
    const n = Math.max(1, Math.min(parts, len));
    const step = Math.ceil(len / n);
    const segs: Segment[] = [];
    for (let off = 0; off < len; off += step) {
      segs.push({ gpa: (at + off) as Gpa, len: Math.min(step, len - off), writable });
    }
    return segs;
  }

  /**
   * Add one frame for transmission (a zeroed 12-byte virtio-net header, then the frame) in a
   * pool buffer, without kicking. Used transmit buffers are reclaimed when the pool runs out.
   * @param frame the Ethernet frame
   * @param parts split the buffer into this many descriptors (default 1)
   * @returns the buffer id, or null when the ring or the pool is full
   * @throws RangeError when the frame does not fit a pool buffer
   * (VIRTIO 1.2 §5.1.6.2)
   */
  addFrame(frame: Uint8Array, parts = 1): number | null {
    this.#checkLive("addFrame");
    const len = VIRTIO_NET_HDR_SIZE + frame.length;
    if (len > this.bufferSize) {
      throw new RangeError(
        `queue ${this.index}: frame of ${frame.length} bytes does not fit a ${this.bufferSize}-byte buffer`,
      );
    }
    let slot = this.#takeSlot();
    if (slot === null) {
      this.reclaim();
      slot = this.#takeSlot();
      if (slot === null) return null;
    }
    const buf = new Uint8Array(len);
    buf.set(frame, VIRTIO_NET_HDR_SIZE);
    this.#ram.write(slot.gpa, buf);
    const id = this.add(this.#segmentsOf(slot.gpa, len, parts, false), slot);
    if (id === null) this.#freeSlots.push(slot.slot);
    return id;
  }

  /**
   * Transmit one frame: {@link addFrame} then {@link kick}.
   * @param frame the Ethernet frame
   * @returns the buffer id, or null when the ring or the pool is full
   */
  sendFrame(frame: Uint8Array): number | null {
    const id = this.addFrame(frame);
    if (id !== null) this.kick();
    return id;
  }

  /**
   * Post receive buffers from the pool and kick once.
   * @param count how many buffers (default: as many as fit)
   * @param size bytes per buffer, header included (default: the pool buffer size)
   * @param parts descriptors per buffer (default 1)
   * @returns the number of buffers posted
   * (VIRTIO 1.2 §5.1.6.3)
   */
  postRxBuffers(count = this.size, size = this.bufferSize, parts = 1): number {
    this.#checkLive("postRxBuffers");
    if (size > this.bufferSize || size < 1) {
      throw new RangeError(
        `queue ${this.index}: RX buffer size ${size} outside 1..${this.bufferSize}`,
      );
    }
    let posted = 0;
    while (posted < count) {
      const s = this.#takeSlot();
      if (s === null) break;
      const token = new PoolBuffer(s.slot, s.gpa, true);
      const id = this.add(this.#segmentsOf(s.gpa, size, parts, true), token);
      if (id === null) {
        this.#freeSlots.push(s.slot);
        break;
      }
      posted++;
    }
    if (posted > 0) this.kick();
    return posted;
  }

  /**
   * Take every used buffer: receive pool buffers become frames (the virtio-net header
   * stripped), transmit pool buffers go back to the pool; other used buffers stay ready for
   * getUsed().
   * @returns the received frames, in ring order
   */
  receiveFrames(): Uint8Array[] {
    this.#checkLive("receiveFrames");
    this.#pullAll();
    const frames: Uint8Array[] = [];
    const keep: UsedBuffer[] = [];
    for (const u of this.#ready) {
      if (u.token instanceof PoolBuffer) {
        this.#release(u);
        if (u.token.receive && u.data !== null) {
          frames.push(u.data.subarray(Math.min(VIRTIO_NET_HDR_SIZE, u.data.length)));
        }
      } else {
        keep.push(u);
      }
    }
    this.#ready.length = 0;
    this.#ready.push(...keep);
    return frames;
  }

  /**
   * Return used transmit pool buffers to the pool (other used buffers stay ready).
   * @returns the number of buffers reclaimed
   */
  reclaim(): number {
    this.#checkLive("reclaim");
    this.#pullAll();
    let n = 0;
    const keep: UsedBuffer[] = [];
    for (const u of this.#ready) {
      if (u.token instanceof PoolBuffer && !u.token.receive) {
        this.#release(u);
        n++;
      } else {
        keep.push(u);
      }
    }
    this.#ready.length = 0;
    this.#ready.push(...keep);
    return n;
  }

  // --- restart and memory changes ----------------------------------------------------

  /**
   * Replace the kick eventfd (ring restart). The old one is closed.
   * @param fd the new eventfd, or -1 for none
   */
  replaceKickFd(fd: number): void {
    if (this.#kickFd >= 0) native.close(this.#kickFd);
    this.#kickFd = fd;
  }

  /** @returns the avail index the driver will publish next (split), or null (packed) */
  get availIdx(): number | null {
    return this.#driver instanceof SplitDriverQueue ? this.#driver.availIdx : null;
  }

  /** @returns the next used index the driver will read (split), or null (packed) */
  get lastUsedIdx(): number | null {
    return this.#driver instanceof SplitDriverQueue ? this.#driver.lastUsedIdx : null;
  }

  /**
   * Move the ring to another guest RAM with the same layout (a content copy), keeping every
   * buffer the device has not used: used buffers are taken first, the ring is initialised in the
   * new RAM (split: at the last used index; packed: at position 0, wrap 1, which needs a ring
   * restart with that base) and the outstanding buffers are added again and published, without
   * a kick. The device must not touch the ring between this call and the memory-table switch.
   * @param ram the new RAM (same GPAs)
   * @param startIdx split: index to start at (default: the last used index)
   */
  rebind(ram: GuestRam, startIdx?: number): void {
    this.#checkLive("rebind");
    this.#pullAll();
    const keep = [...this.#outstanding.values()];
    const start = startIdx ?? this.lastUsedIdx ?? 0;
    this.#ram = ram;
    this.#driver = this.#buildDriver(ram, start);
    this.#usedEventArmed = false;
    this.#outstanding.clear();
    for (const o of keep) {
      const id = this.#driver.add(o.segments, o.token);
      if (id === null) {
        throw new Error(`queue ${this.index}: rebind could not add back an outstanding buffer`);
      }
      this.#outstanding.set(id, o);
    }
    if (keep.length > 0) this.#driver.kick();
  }

  // --- migration -------------------------------------------------------------------

  /**
   * Take every used buffer from the ring into the ready list (after GET_VRING_BASE, so that the
   * driver's view ends where the device's does).
   * @returns the number of buffers ready
   */
  collectUsed(): number {
    this.#checkLive("collectUsed");
    this.#pullAll();
    return this.#ready.length;
  }

  /**
   * Mark the pages of the ring's driver-written parts (descriptors, available ring / driver
   * event area, indirect tables) dirty in the RAM's own tracker.
   */
  markRingDirty(): void {
    const sizes = this.packed ? packedRingSizes(this.size) : splitRingSizes(this.size);
    const availBytes = "avail" in sizes ? sizes.avail : sizes.driverEvent;
    this.#ram.markDirty(this.ring.desc, sizes.desc);
    this.#ram.markDirty(this.ring.avail, availBytes);
    if (this.ring.indirectTable !== null) {
      this.#ram.markDirty(this.ring.indirectTable, this.size * 16 * 16);
    }
  }

  /**
   * The driver-side state for a migration (see {@link DriverSnapshot}); call {@link collectUsed}
   * first so that no used buffer is left in the ring.
   * @returns a JSON-safe snapshot
   * @throws RangeError when a buffer token is neither a pool buffer nor a plain value
   */
  snapshot(): DriverSnapshot {
    this.#checkLive("snapshot");
    const seg = (s: Segment): { gpa: number; len: number; writable: boolean } => ({
      gpa: s.gpa,
      len: s.len,
      writable: s.writable === true,
    });
    return {
      index: this.index,
      size: this.size,
      packed: this.packed,
      eventIdx: this.eventIdx,
      indirect: this.indirect,
      ring: {
        desc: this.ring.desc,
        avail: this.ring.avail,
        used: this.ring.used,
        indirectTable: this.ring.indirectTable,
      },
      lastUsedIdx: this.lastUsedIdx ?? 0,
      outstanding: [...this.#outstanding].map(([id, o]) => ({
        id,
        segments: o.segments.map(seg),
        token: tokenSnapshot(o.token, this.index),
      })),
      ...(this.#driver instanceof PackedDriverQueue
        ? { packedPosition: this.#driver.position() }
        : {}),
      ready: this.#ready.map((u) => ({
        id: u.id,
        len: u.len,
        token: tokenSnapshot(u.token, this.index),
      })),
      pool: this.#pool,
      freeSlots: this.#freeSlots.slice(),
      bufferSize: this.bufferSize,
    };
  }

  /**
   * Load a snapshot into a queue freshly built over the same ring addresses (destination of a
   * migration), then restore the pool and the ready list (receive data re-read from guest RAM).
   * Packed ring with a `packedPosition`: the ring memory migrated with guest RAM is put back as
   * it was before the constructor initialised it (call this right after construction, before
   * any add(), as setupQueue does) and the driver continues at the source's position: buffers
   * in flight stay where they are (the device finds them from the source's SET_VRING_BASE),
   * used buffers not yet collected are collected from the ring, unpublished heads are published
   * without a kick. Otherwise (split, or a packed snapshot without a position): the ring was
   * initialised at the snapshot's last used index (split) or at position 0 (packed) and the
   * outstanding buffers are made available again in their order and published without a kick.
   * @param snap the source's snapshot
   * @throws Error when the queue is not fresh, a buffer cannot be added back, the packed ring
   *   memory is no longer available, or the outstanding ids disagree with the packed position;
   *   VirtqueueError (field "position.*") for a packed position that does not fit the ring
   * (VIRTIO 1.2 §2.8.21, §2.8.22; vhost-user "Migration")
   */
  restoreSnapshot(snap: DriverSnapshot): void {
    this.#checkLive("restoreSnapshot");
    if (this.#outstanding.size > 0 || this.#ready.length > 0) {
      throw new Error(`queue ${this.index}: restoreSnapshot needs a fresh queue`);
    }
    const image = this.#ringBeforeInit;
    this.#ringBeforeInit = null;
    if (this.packed && snap.packedPosition !== undefined) {
      this.#restorePacked(snap, snap.packedPosition, image);
    } else {
      this.#repost(snap);
    }
    this.#pool = snap.pool === null ? null : (snap.pool as Gpa);
    this.#freeSlots = snap.freeSlots.slice();
    for (const r of snap.ready) {
      const token = tokenFromSnapshot(r.token);
      let data: Uint8Array | null = null;
      if (token instanceof PoolBuffer && token.receive) {
        data = this.#ram.read(token.gpa, Math.min(r.len, this.bufferSize));
      }
      this.#ready.push({ id: r.id, len: r.len, token, data });
    }
  }

  #restorePacked(
    snap: DriverSnapshot,
    position: PackedDriverPosition,
    image: { desc: Uint8Array; driverEvent: Uint8Array; deviceEvent: Uint8Array } | null,
  ): void {
    if (image === null) {
      throw new Error(
        `queue ${this.index}: restoreSnapshot of a packed ring must come before any add(): ` +
          "the migrated ring memory was initialised",
      );
    }
    const inFlight = new Set(position.inFlight.map((b) => b.id));
    const buffers = new Map<number, Outstanding>();
    for (const o of snap.outstanding) {
      if (o.id === undefined || !inFlight.has(o.id) || buffers.has(o.id)) {
        throw new Error(
          `queue ${this.index}: outstanding buffer id ${String(o.id)} is not in flight in the ` +
            "packed ring position (or repeated)",
        );
      }
      buffers.set(o.id, {
        segments: o.segments.map((s) => ({ gpa: s.gpa as Gpa, len: s.len, writable: s.writable })),
        token: tokenFromSnapshot(o.token),
      });
    }
    if (buffers.size !== inFlight.size) {
      throw new Error(
        `queue ${this.index}: ${inFlight.size} buffers in flight in the packed ring position, ` +
          `${buffers.size} outstanding in the snapshot`,
      );
    }
    // The ring is not known to the device yet (SET_VRING_ADDR follows): put the migrated ring
    // memory back, then continue on it.
    this.#ram.write(this.ring.desc, image.desc);
    this.#ram.write(this.ring.avail, image.driverEvent);
    this.#ram.write(this.ring.used, image.deviceEvent);
    const tokens = new Map<number, unknown>();
    for (const [id, o] of buffers) tokens.set(id, o.token);
    const driver = this.#buildDriver(this.#ram, 0, { position, tokens }) as PackedDriverQueue;
    this.#driver = driver;
    this.#usedEventArmed = false;
    for (const [id, o] of buffers) this.#outstanding.set(id, o);
    if (position.pendingHeads.length > 0) driver.kick();
  }

  #repost(snap: DriverSnapshot): void {
    for (const o of snap.outstanding) {
      const segments: Segment[] = o.segments.map((s) => ({
        gpa: s.gpa as Gpa,
        len: s.len,
        writable: s.writable,
      }));
      const token = tokenFromSnapshot(o.token);
      const id = this.#driver.add(segments, token);
      if (id === null) {
        throw new Error(`queue ${this.index}: restoreSnapshot could not add back a buffer`);
      }
      this.#outstanding.set(id, { segments, token });
    }
    if (snap.outstanding.length > 0) this.#driver.kick();
  }

  /** Stop watching and close the eventfds. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#callWatcher?.close();
    this.#errWatcher?.close();
    this.#callWatcher = this.#errWatcher = null;
    for (const fd of [this.#kickFd, this.#callFd, this.#errFd]) if (fd >= 0) native.close(fd);
    this.#kickFd = this.#callFd = this.#errFd = -1;
    this.emit("disposed");
  }

  /** @returns true after dispose() */
  get disposed(): boolean {
    return this.#disposed;
  }
}
