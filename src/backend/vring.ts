/**
 * One virtqueue as the back-end keeps it: what the front-end configured (size, addresses,
 * base, kick/call/err fds), the started and enabled bits, and the device-side ring once the
 * ring starts (vhost-user: "Starting and stopping rings").
 */
import { native, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import type { GuestMemory } from "../memory/guest-memory.js";
import { uaddr as toUaddr } from "../memory/address.js";
import type { Gpa } from "../memory/address.js";
import { SplitDeviceQueue } from "../virtq/split.js";
import { PackedDeviceQueue } from "../virtq/packed.js";
import { splitRingSizes, packedRingSizes } from "../virtq/layout.js";
import type { DeviceQueue, DescChain, QueueBase } from "../virtq/types.js";
import type { BackendQueue, Logger } from "./device.js";

/** Ring addresses as SET_VRING_ADDR gives them (front-end virtual addresses). */
export interface VringAddresses {
  desc: number;
  avail: number;
  used: number;
  /** VHOST_VRING_F_LOG: log used-ring writes at logGuestAddr */
  log: boolean;
  logGuestAddr: number;
}

/** Ring format and notification features taken from the negotiated virtio features. */
export interface RingFormat {
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
}

/** Callbacks from a vring to its session. */
export interface VringHost {
  readonly log: Logger;
  /** current guest memory, or null before SET_MEM_TABLE */
  memory(): GuestMemory | null;
  format(): RingFormat;
  /** the device should process this queue now */
  process(vring: Vring): void;
  /** the queue started, stopped, or changed enabled state */
  stateChanged(vring: Vring): void;
}

/**
 * The back-end's record of one virtqueue. It implements {@link BackendQueue} for the device.
 */
export class Vring implements BackendQueue {
  readonly index: number;
  size = 0;
  addr: VringAddresses | null = null;
  /** SET_VRING_BASE value (or the value saved by GET_VRING_BASE) */
  base: QueueBase = { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true };
  #started = false;
  #enabled = false;
  /** set when the ring was found malformed; cleared when the ring is set up again */
  broken: string | null = null;

  kickFd = -1;
  callFd = -1;
  errFd = -1;
  /** true when SET_VRING_KICK came with the no-fd flag: the ring is polled */
  polling = false;

  #queue: DeviceQueue | null = null;
  #memory: GuestMemory | null = null;
  #kickWatcher: FdWatcher | null = null;
  #pollTimer: NodeJS.Timeout | null = null;
  readonly #host: VringHost;
  /** kicks received (counter for stats and tests) */
  kicks = 0;
  /** calls sent */
  calls = 0;

  /**
   * @param index queue index
   * @param host the session that owns the ring
   */
  constructor(index: number, host: VringHost) {
    this.index = index;
    this.#host = host;
  }

  /** @returns true while the ring is started */
  get started(): boolean {
    return this.#started;
  }

  /** @returns true while the ring is enabled */
  get enabled(): boolean {
    return this.#enabled;
  }

  /** @returns the memory the running ring uses. Throws when the ring is not started. */
  get memory(): GuestMemory {
    const mem = this.#memory ?? this.#host.memory();
    if (!mem) throw new Error(`queue ${this.index}: no memory table`);
    return mem;
  }

  /**
   * Set the enabled bit (SET_VRING_ENABLE, or SET_FEATURES without PROTOCOL_FEATURES).
   * @param enabled the new value
   */
  setEnabled(enabled: boolean): void {
    if (this.#enabled === enabled) return;
    this.#enabled = enabled;
    this.#host.stateChanged(this);
    if (enabled && this.#started) this.#host.process(this);
  }

  /**
   * Install a new kick fd (SET_VRING_KICK). The old one is closed. The ring starts when the
   * fd first becomes readable, or at once when `fd` is -1 (no-fd flag: the ring is polled).
   * @param fd the eventfd, or -1 for polling
   */
  setKick(fd: number): void {
    this.#stopKickWatch();
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd;
    this.polling = fd < 0;
    if (fd >= 0) {
      const watcher = new native.FdWatcher(fd, (_events, error) => {
        if (error) {
          this.#host.log.warn(`queue ${this.index}: kick fd error: ${error.message}`);
          this.#stopKickWatch();
          return;
        }
        this.#onKick();
      });
      watcher.start(POLL_READABLE);
      this.#kickWatcher = watcher;
    } else {
      // No fd: the front-end will never kick; the ring is started now and polled.
      this.#startPolling();
      this.#onKick();
    }
  }

  /**
   * Install a new call fd (SET_VRING_CALL); -1 means no fd. The old one is closed.
   * @param fd eventfd or -1
   */
  setCall(fd: number): void {
    if (this.callFd >= 0) native.close(this.callFd);
    this.callFd = fd;
  }

  /**
   * Install a new err fd (SET_VRING_ERR); -1 means no fd. The old one is closed.
   * @param fd eventfd or -1
   */
  setErr(fd: number): void {
    if (this.errFd >= 0) native.close(this.errFd);
    this.errFd = fd;
  }

  /** Kick handler: drain the eventfd, start the ring if needed, let the device work. */
  #onKick(): void {
    if (this.kickFd >= 0) {
      try {
        native.eventfdRead(this.kickFd);
      } catch {
        // A non-eventfd kick fd (a pipe, say) may not read 8 bytes; the readiness is the kick.
      }
    }
    this.kicks++;
    if (this.broken) return;
    if (!this.#started) {
      if (!this.#start()) return;
    }
    this.#host.process(this);
  }

  /** Process the ring once (used by the session after memory changes and for polling). */
  poke(): void {
    if (this.#started && !this.broken) this.#host.process(this);
  }

  /**
   * Start the ring: translate its addresses and build the device-side queue, re-reading the
   * used index from guest memory (split) or taking the packed base.
   * @returns true when the ring started
   */
  #start(): boolean {
    const mem = this.#host.memory();
    if (!mem || !this.addr || this.size === 0) {
      this.#host.log.warn(
        `queue ${this.index}: kicked before it was set up ` +
          `(memory=${mem ? "yes" : "no"}, addr=${this.addr ? "yes" : "no"}, size=${this.size}); ignored`,
      );
      return false;
    }
    try {
      this.#queue = this.#buildQueue(mem);
      this.#memory = mem;
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return false;
    }
    this.#started = true;
    this.#host.log.debug(`queue ${this.index}: started at avail ${this.base.availIdx}`);
    this.#host.stateChanged(this);
    return true;
  }

  #buildQueue(mem: GuestMemory): DeviceQueue {
    const addr = this.addr!;
    const fmt = this.#host.format();
    const usedLog = addr.log ? { logGuestAddr: addr.logGuestAddr } : null;
    if (fmt.packed) {
      const sizes = packedRingSizes(this.size);
      return new PackedDeviceQueue(mem, {
        size: this.size,
        desc: mem.uaddrToGpa(toUaddr(addr.desc), sizes.desc),
        driverEvent: mem.uaddrToGpa(toUaddr(addr.avail), sizes.driverEvent),
        deviceEvent: mem.uaddrToGpa(toUaddr(addr.used), sizes.deviceEvent),
        eventIdx: fmt.eventIdx,
        indirect: fmt.indirect,
        base: {
          availIdx: this.base.availIdx,
          availWrap: this.base.availWrap ?? true,
          usedIdx: this.base.usedIdx ?? this.base.availIdx,
          usedWrap: this.base.usedWrap ?? this.base.availWrap ?? true,
        },
        usedLog,
        index: this.index,
      });
    }
    const sizes = splitRingSizes(this.size);
    const desc: Gpa = mem.uaddrToGpa(toUaddr(addr.desc), sizes.desc);
    const avail: Gpa = mem.uaddrToGpa(toUaddr(addr.avail), sizes.avail);
    const used: Gpa = mem.uaddrToGpa(toUaddr(addr.used), sizes.used);
    return new SplitDeviceQueue(mem, {
      size: this.size,
      desc,
      avail,
      used,
      eventIdx: fmt.eventIdx,
      indirect: fmt.indirect,
      lastAvailIdx: this.base.availIdx,
      usedLog,
      index: this.index,
    });
  }

  /**
   * Rebuild the running ring over new guest memory (memory-table change while running), or
   * after its address flags changed (VHOST_VRING_F_LOG toggled during migration).
   */
  rebuild(): void {
    if (!this.#started || !this.#queue) return;
    const mem = this.#host.memory();
    if (!mem) {
      this.stop();
      return;
    }
    const base = this.#queue.getBase();
    this.base = base;
    try {
      this.#queue = this.#buildQueue(mem);
      this.#memory = mem;
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
    }
  }

  /**
   * Stop the ring (GET_VRING_BASE) and return its base. The ring keeps its fds; a later kick
   * starts it again from the returned base unless SET_VRING_BASE changes it.
   * @returns the next available index (and the packed fields)
   */
  stop(): QueueBase {
    if (this.#queue) {
      this.base = this.#queue.getBase();
    }
    const wasStarted = this.#started;
    this.#started = false;
    this.#queue = null;
    this.#memory = null;
    this.#stopPolling();
    if (wasStarted) this.#host.stateChanged(this);
    return { ...this.base };
  }

  /**
   * Mark the ring broken: it is no longer processed, and the front-end is told through the
   * err eventfd (vhost-user: VHOST_USER_SET_VRING_ERR).
   * @param reason what was wrong, with the field and value
   */
  markBroken(reason: string): void {
    if (this.broken) return;
    this.broken = reason;
    this.#host.log.error(`queue ${this.index}: broken: ${reason}`);
    if (this.errFd >= 0) {
      try {
        native.eventfdWrite(this.errFd, 1);
      } catch (err) {
        this.#host.log.warn(`queue ${this.index}: err fd write failed: ${String(err)}`);
      }
    }
    if (this.#queue) this.base = this.#queue.getBase();
    this.#started = false;
    this.#queue = null;
    this.#stopPolling();
    this.#host.stateChanged(this);
  }

  /** Forget the ring's configuration and close its fds (RESET_DEVICE, disconnect). */
  reset(): void {
    this.stop();
    this.dispose();
    this.size = 0;
    this.addr = null;
    this.base = { availIdx: 0, availWrap: true, usedIdx: 0, usedWrap: true };
    this.broken = null;
    this.polling = false;
    if (this.#enabled) {
      this.#enabled = false;
      this.#host.stateChanged(this);
    }
  }

  /** Close every fd and watcher; the object is dead afterwards. */
  dispose(): void {
    this.#started = false;
    this.#queue = null;
    this.#memory = null;
    this.#stopPolling();
    this.#stopKickWatch();
    for (const fd of [this.kickFd, this.callFd, this.errFd]) {
      if (fd >= 0) native.close(fd);
    }
    this.kickFd = this.callFd = this.errFd = -1;
  }

  #stopKickWatch(): void {
    if (this.#kickWatcher) {
      this.#kickWatcher.close();
      this.#kickWatcher = null;
    }
  }

  #startPolling(): void {
    this.#stopPolling();
    this.#pollTimer = setInterval(() => this.poke(), 1);
    this.#pollTimer.unref();
  }

  #stopPolling(): void {
    if (this.#pollTimer) {
      clearInterval(this.#pollTimer);
      this.#pollTimer = null;
    }
  }

  // --- BackendQueue -------------------------------------------------------------------

  /** @inheritdoc */
  pop(): DescChain | null {
    const q = this.#queue;
    if (!q || this.broken) return null;
    try {
      return q.pop();
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return null;
    }
  }

  /** @inheritdoc */
  pushUsed(chain: DescChain, written: number): void {
    const q = this.#queue;
    if (!q) return;
    try {
      q.pushUsed(chain, written);
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
    }
  }

  /** @inheritdoc */
  flush(): void {
    const q = this.#queue;
    if (!q) return;
    let notify: boolean;
    try {
      notify = q.publish();
    } catch (err) {
      this.markBroken(err instanceof Error ? err.message : String(err));
      return;
    }
    if (notify && this.callFd >= 0) {
      this.calls++;
      native.eventfdWrite(this.callFd, 1);
    }
  }

  /** @inheritdoc */
  read(chain: DescChain, dst: Uint8Array, offset = 0): number {
    const mem = this.memory;
    let copied = 0;
    let skip = offset;
    for (const seg of chain.readable) {
      if (copied >= dst.length) break;
      if (skip >= seg.len) {
        skip -= seg.len;
        continue;
      }
      const n = Math.min(seg.len - skip, dst.length - copied);
      // LIFETIME: the view is used at once and not kept.
      dst.set(mem.gpaToView((seg.gpa + skip) as Gpa, n), copied);
      copied += n;
      skip = 0;
    }
    return copied;
  }

  /** @inheritdoc */
  write(chain: DescChain, src: Uint8Array, offset = 0): number {
    const mem = this.memory;
    let copied = 0;
    let skip = offset;
    for (const seg of chain.writable) {
      if (copied >= src.length) break;
      if (skip >= seg.len) {
        skip -= seg.len;
        continue;
      }
      const n = Math.min(seg.len - skip, src.length - copied);
      mem.write((seg.gpa + skip) as Gpa, src.subarray(copied, copied + n));
      copied += n;
      skip = 0;
    }
    return copied;
  }

  /** The device-side ring while started (for tests and the session's own bookkeeping). */
  get deviceQueue(): DeviceQueue | null {
    return this.#queue;
  }
}
