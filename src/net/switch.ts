/**
 * A learning Ethernet switch between ports (vhost-user guests, TAP and VXLAN uplinks): source
 * MAC learning with ageing, flooding of broadcast, multicast and unknown unicast to every other
 * port that is up, no hairpinning, per-port counters with drop reasons, and offload fix-ups
 * between ports (a partial checksum is completed, a TSO frame segmented, for a destination
 * that cannot take them) as IEEE 802.1D bridges and Linux's bridge + GSO layer do.
 *
 * The switch is synchronous: {@link Switch.receive} routes a frame and every destination port
 * copies it before the call returns; ports that took frames are flushed once per batch
 * ({@link Switch.flush}, called by the sending port at the end of its batch, or from a
 * microtask otherwise).
 */
import type { Logger } from "../backend/device.js";
import { silentLogger } from "../backend/device.js";
import {
  ETH_HLEN,
  FrameError,
  completeChecksum,
  forEachTcpSegment,
  formatMac,
  macKey,
  toMacBytes,
} from "./frame.js";
import type {
  Frame,
  GsoRequest,
  PortCounters,
  PortHost,
  PortOffloads,
  SwitchPort,
} from "./port.js";

/** Default MAC ageing time (IEEE 802.1D default: 300 s). */
export const DEFAULT_AGEING_MS = 300_000;
/** Default size limit of the MAC table. */
export const DEFAULT_MAX_MACS = 16_384;
/** Largest GSO segment the switch builds (headers + gso_size). */
const SEGMENT_BUFFER = 65_536 + 512;
/** Entries of the MAC lookup cache in front of the table (a power of 2). */
const MAC_CACHE = 256;

/** Options of {@link Switch}. */
export interface SwitchOptions {
  /** forget a MAC not seen for this long (ms; default 300 000) */
  ageingMs?: number;
  /** the clock, in ms (default Date.now); tests inject their own */
  clock?: () => number;
  /** most MACs learned (default 16 384); new MACs are not learned beyond it */
  maxMacs?: number;
  /** sweep aged MACs every this many ms (default min(ageingMs, 30 000); 0: only lazily) */
  sweepIntervalMs?: number;
  /** the application's logger */
  logger?: Logger;
}

/** One row of {@link Switch.macTable}. */
export interface MacTableEntry {
  /** `52:54:00:12:34:56` */
  mac: string;
  /** name of the port it was learned on */
  port: string;
  /** ms since the MAC was last seen */
  age: number;
}

/** Stats of one port (a copy). */
export interface PortStats {
  name: string;
  up: boolean;
  offloads: PortOffloads;
  counters: PortCounters;
}

/** Stats of the switch (a copy). */
export interface SwitchStats {
  ports: PortStats[];
  /** MACs in the table (aged ones included until swept) */
  macs: number;
  /** new MACs not learned because the table was full */
  learnOverflows: number;
  /** frames segmented in software, and the segments they made */
  softwareGso: { frames: number; segments: number };
  /** partial checksums completed in software */
  softwareCsum: number;
}

interface MacSlot {
  port: SwitchPort;
  seen: number;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Whether a port accepts a GSO frame as it is.
 * @param off the port's offloads
 * @param gso the frame's GSO request
 * @returns true when the frame can be delivered unsegmented
 */
export function acceptsGso(off: PortOffloads, gso: GsoRequest): boolean {
  if (!off.csum) return false; // virtio: every GUEST_TSO*/UFO needs GUEST_CSUM
  if (gso.ecn === true && !off.ecn) return false;
  switch (gso.type) {
    case "tcpv4":
      return off.tso4;
    case "tcpv6":
      return off.tso6;
    case "udp":
      return off.ufo;
  }
}

/**
 * The switch.
 */
export class Switch implements PortHost {
  readonly ageingMs: number;
  readonly maxMacs: number;
  readonly logger: Logger;
  readonly #clock: () => number;
  readonly #ports: SwitchPort[] = [];
  readonly #byName = new Map<string, SwitchPort>();
  readonly #macs = new Map<number, MacSlot>();
  readonly #dirty = new Set<SwitchPort>();
  #flushScheduled = false;
  readonly #flushTask = (): void => {
    this.#flushScheduled = false;
    this.flush();
  };
  readonly #segBuf = new Uint8Array(SEGMENT_BUFFER);
  readonly #segFrame: Frame = { data: new Uint8Array(0), meta: { dataValid: true } };
  /**
   * A direct-mapped cache in front of `#macs`, keyed by the MAC as two int32 halves, so that
   * the per-frame learn and lookup build no number above 2^31 (a heap number in V8) and hash
   * nothing. It holds the table's own slot objects (a move or a refresh updates them in place);
   * any removal from the table empties it ({@link Switch.#macsChanged}).
   */
  readonly #cacheHi = new Int32Array(MAC_CACHE).fill(-1);
  readonly #cacheLo = new Int32Array(MAC_CACHE);
  readonly #cacheSlot: (MacSlot | null)[] = new Array<MacSlot | null>(MAC_CACHE).fill(null);
  #cacheUsed = false;
  /** the last port found to be in the switch by {@link receive} (a burst comes from one port) */
  #lastFrom: SwitchPort | null = null;
  /** the clock read once for a port's batch ({@link Switch.beginBatch}), or NaN */
  #batchNow = NaN;
  #sweepTimer: NodeJS.Timeout | null = null;
  #lastFullSweep = -Infinity;
  #learnOverflows = 0;
  #gsoFrames = 0;
  #gsoSegments = 0;
  #softCsum = 0;
  #closed = false;

  /**
   * @param options ageing, clock, table size, logger
   * @throws RangeError for a non-positive ageing time or table size
   */
  constructor(options: SwitchOptions = {}) {
    this.ageingMs = options.ageingMs ?? DEFAULT_AGEING_MS;
    this.maxMacs = options.maxMacs ?? DEFAULT_MAX_MACS;
    if (!(this.ageingMs > 0))
      throw new RangeError(`Switch: ageingMs must be positive (ageingMs=${this.ageingMs})`);
    if (!(this.maxMacs > 0))
      throw new RangeError(`Switch: maxMacs must be positive (maxMacs=${this.maxMacs})`);
    this.#clock = options.clock ?? Date.now;
    this.logger = options.logger ?? silentLogger;
    const sweep = options.sweepIntervalMs ?? Math.min(this.ageingMs, 30_000);
    if (sweep > 0) {
      this.#sweepTimer = setInterval(() => this.expire(), sweep);
      this.#sweepTimer.unref();
    }
  }

  // --- ports ---------------------------------------------------------------------------

  /**
   * Add a port; it is told through {@link SwitchPort.attachHost}.
   * @param port the port
   * @throws Error naming the port when its name is taken or the switch is closed
   */
  addPort(port: SwitchPort): void {
    if (this.#closed) throw new Error(`Switch: addPort(${port.name}) after close`);
    if (this.#byName.has(port.name))
      throw new Error(`Switch: a port named ${port.name} exists already`);
    this.#ports.push(port);
    this.#byName.set(port.name, port);
    port.attachHost?.(this);
    this.logger.info(`switch: port ${port.name} added (${port.up ? "up" : "down"})`);
  }

  /**
   * Remove a port: its MACs are flushed and it is told through {@link SwitchPort.detachHost}.
   * @param port the port, or its name
   * @returns true when it was a port of this switch
   */
  removePort(port: SwitchPort | string): boolean {
    const p = typeof port === "string" ? this.#byName.get(port) : port;
    if (p === undefined || this.#byName.get(p.name) !== p) return false;
    this.#ports.splice(this.#ports.indexOf(p), 1);
    if (this.#lastFrom === p) this.#lastFrom = null;
    this.#byName.delete(p.name);
    this.#dirty.delete(p);
    this.flushMacs(p);
    p.detachHost?.();
    this.logger.info(`switch: port ${p.name} removed`);
    return true;
  }

  /** @returns the ports, in the order they were added */
  get ports(): readonly SwitchPort[] {
    return this.#ports;
  }

  /**
   * @param name a port name
   * @returns the port, or undefined
   */
  port(name: string): SwitchPort | undefined {
    return this.#byName.get(name);
  }

  /**
   * A port's link changed: when it went down, the MACs learned on it are flushed.
   * @param port the port
   */
  linkChanged(port: SwitchPort): void {
    if (this.#byName.get(port.name) !== port) return;
    this.logger.info(`switch: port ${port.name} ${port.up ? "up" : "down"}`);
    if (!port.up) this.flushMacs(port);
  }

  // --- forwarding ----------------------------------------------------------------------

  /**
   * Forward a frame that came in on `from`: learn its source MAC, then deliver it to the port
   * that owns the destination MAC, or flood it (broadcast, multicast, unknown or aged unicast)
   * to every other port that is up. Never back to `from`.
   * @param from the port it came from (must be a port of this switch)
   * @param frame the frame (see {@link Frame} for its lifetime)
   */
  receive(from: SwitchPort, frame: Frame): void {
    const c = from.counters;
    if (from !== this.#lastFrom) {
      if (this.#byName.get(from.name) !== from) return;
      this.#lastFrom = from;
    }
    if (!from.up) {
      c.drops["port-down"]++;
      return;
    }
    const d = frame.data;
    if (d.length < ETH_HLEN) {
      c.drops.malformed++;
      return;
    }
    c.rxPackets++;
    c.rxBytes += d.length;
    const batchNow = this.#batchNow;
    const now = batchNow === batchNow ? batchNow : this.#clock();
    // Learn the source unless it is a group address (or all zeros).
    if (((d[6] as number) & 1) === 0) {
      const known = this.#cached(d, 6);
      if (known !== null && known.port === from) known.seen = now;
      else {
        const src = macKey(d, 6);
        if (src !== 0) this.#learn(src, from, now);
      }
    }
    if (((d[0] as number) & 1) !== 0) {
      this.#flood(from, frame);
    } else {
      let slot = this.#cached(d, 0) ?? undefined;
      const dst = slot === undefined ? macKey(d, 0) : 0;
      if (slot === undefined) slot = this.#macs.get(dst);
      if (slot !== undefined && now - slot.seen < this.ageingMs && slot.port.up) {
        if (slot.port === from) c.drops.hairpin++;
        else this.#deliverTo(from, slot.port, frame);
      } else {
        if (slot !== undefined) {
          this.#macs.delete(macKey(d, 0));
          this.#macsChanged();
        }
        this.#flood(from, frame);
      }
    }
    if (this.#dirty.size > 0 && !this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flushTask);
    }
  }

  /**
   * A port begins a batch of {@link receive} calls (a burst taken from its transmit ring): the
   * clock is read once for the batch, until {@link flush} ends it.
   */
  beginBatch(): void {
    this.#batchNow = this.#clock();
  }

  /**
   * The table's slot of the unicast MAC at `d[off, off + 6)`, from the lookup cache (filled
   * from the table on a miss), or null when the table has none.
   */
  #cached(d: Uint8Array, off: number): MacSlot | null {
    const hi = ((d[off] as number) << 8) | (d[off + 1] as number);
    const lo =
      ((d[off + 2] as number) << 24) |
      ((d[off + 3] as number) << 16) |
      ((d[off + 4] as number) << 8) |
      (d[off + 5] as number);
    const i = (lo ^ (lo >>> 8) ^ (lo >>> 16) ^ hi) & (MAC_CACHE - 1);
    if (this.#cacheHi[i] === hi && this.#cacheLo[i] === lo) return this.#cacheSlot[i] ?? null;
    const slot = this.#macs.get(hi * 4294967296 + (lo >>> 0));
    if (slot === undefined) return null;
    this.#cacheHi[i] = hi;
    this.#cacheLo[i] = lo;
    this.#cacheSlot[i] = slot;
    this.#cacheUsed = true;
    return slot;
  }

  /** A MAC left the table: the lookup cache may hold its slot, so it is emptied. */
  #macsChanged(): void {
    if (!this.#cacheUsed) return;
    this.#cacheUsed = false;
    this.#cacheHi.fill(-1);
    this.#cacheSlot.fill(null);
  }

  /** Flush every port that took frames since the last flush (one notification per batch). */
  flush(): void {
    this.#batchNow = NaN;
    if (this.#dirty.size === 0) return;
    const dirty = [...this.#dirty];
    this.#dirty.clear();
    for (const p of dirty) {
      try {
        p.flush?.();
      } catch (err) {
        this.logger.warn(`switch: port ${p.name} failed to flush: ${errorText(err)}`);
      }
    }
  }

  #learn(key: number, port: SwitchPort, now: number, seen = now): void {
    const slot = this.#macs.get(key);
    if (slot !== undefined) {
      if (slot.port !== port) {
        this.logger.debug(`switch: ${formatMac(key)} moved ${slot.port.name} -> ${port.name}`);
        slot.port = port;
      }
      slot.seen = seen;
      return;
    }
    if (this.#macs.size >= this.maxMacs) {
      // Full: sweep aged entries at most once a second, then give up on this MAC.
      if (now - this.#lastFullSweep >= 1000) {
        this.#lastFullSweep = now;
        this.expire();
      }
      if (this.#macs.size >= this.maxMacs) {
        this.#learnOverflows++;
        return;
      }
    }
    this.#macs.set(key, { port, seen });
  }

  #flood(from: SwitchPort, frame: Frame): void {
    const ports = this.#ports;
    let reached = 0;
    for (let i = 0; i < ports.length; i++) {
      const p = ports[i] as SwitchPort;
      if (p !== from && p.up) {
        this.#deliverTo(from, p, frame);
        reached++;
      }
    }
    // Every frame the switch takes ends somewhere in the counters: one that no port could be
    // offered is a drop of its source port.
    if (reached === 0) from.counters.drops["no-destination"]++;
  }

  /** Deliver to one port, completing offloads it cannot take. */
  #deliverTo(from: SwitchPort, to: SwitchPort, frame: Frame): void {
    const meta = frame.meta;
    const off = to.offloads;
    const gso = meta.gso;
    if (gso !== undefined) {
      if (acceptsGso(off, gso)) {
        this.#hand(to, frame);
        return;
      }
      if (gso.type === "udp") {
        to.counters.drops.offload++;
        return;
      }
      this.#segment(from, to, frame.data, gso.size);
      return;
    }
    const cs = meta.needsCsum;
    if (cs !== undefined && !off.csum) {
      try {
        completeChecksum(frame.data, cs.start, cs.offset);
      } catch (err) {
        if (!(err instanceof FrameError)) throw err;
        from.counters.drops.malformed++;
        return;
      }
      // In place: the frame is complete for every later destination too.
      meta.needsCsum = undefined;
      meta.dataValid = true;
      this.#softCsum++;
    }
    this.#hand(to, frame);
  }

  #segment(from: SwitchPort, to: SwitchPort, data: Uint8Array, gsoSize: number): void {
    const f = this.#segFrame;
    try {
      const n = forEachTcpSegment(data, gsoSize, this.#segBuf, (seg) => {
        f.data = seg;
        this.#hand(to, f);
      });
      this.#gsoFrames++;
      this.#gsoSegments += n;
    } catch (err) {
      if (!(err instanceof FrameError)) throw err;
      if (err.field === "gso_segments") from.counters.drops["gso-segments"]++;
      else from.counters.drops.malformed++;
      this.logger.debug(`switch: GSO frame from ${from.name} dropped: ${err.message}`);
    }
  }

  #hand(to: SwitchPort, frame: Frame): void {
    let taken: boolean;
    try {
      taken = to.deliver(frame);
    } catch (err) {
      // A port that fails (its guest memory went away, say) must not break the sender's
      // batch or the other destinations: count it as that port's drop.
      to.counters.drops["port-down"]++;
      this.logger.warn(`switch: port ${to.name} failed to take a frame: ${errorText(err)}`);
      taken = false;
    }
    if (taken) {
      const c = to.counters;
      c.txPackets++;
      c.txBytes += frame.data.length;
    }
    if (to.flush !== undefined) this.#dirty.add(to);
  }

  // --- MAC table -----------------------------------------------------------------------

  /**
   * The MAC table, aged entries left out (and removed).
   * @returns one row per MAC
   */
  macTable(): MacTableEntry[] {
    const now = this.#clock();
    const rows: MacTableEntry[] = [];
    for (const [key, slot] of this.#macs) {
      const age = now - slot.seen;
      if (age >= this.ageingMs) {
        this.#macs.delete(key);
        this.#macsChanged();
        continue;
      }
      rows.push({ mac: formatMac(key), port: slot.port.name, age });
    }
    return rows;
  }

  #resolve(port: SwitchPort | string, what: string): SwitchPort {
    const p = typeof port === "string" ? this.#byName.get(port) : port;
    if (p === undefined || this.#byName.get(p.name) !== p) {
      throw new Error(
        `Switch.${what}: not a port of this switch (port=${typeof port === "string" ? port : port.name})`,
      );
    }
    return p;
  }

  /**
   * Teach the switch a MAC (import of a saved table, static entries). The table size limit
   * applies to a MAC not yet known, as for a learned one.
   * @param mac the MAC (text or 6 bytes; unicast, not all zeros)
   * @param port the port (object or name)
   * @param age ms since it was seen (default 0; an age at or past the ageing time learns nothing)
   * @throws RangeError for a malformed or group MAC or a negative or non-finite age; Error when
   *   the port is not in this switch
   */
  learn(mac: string | Uint8Array, port: SwitchPort | string, age = 0): void {
    this.#learnChecked(mac, port, age, "learn");
  }

  /**
   * The one checked path for MACs taught from outside the data path: resolve the port, check
   * the MAC is unicast and the age sane, then learn under the table size limit.
   * @returns the name of the port the MAC was on before, or null
   */
  #learnChecked(
    mac: string | Uint8Array,
    port: SwitchPort | string,
    age: number,
    what: string,
  ): string | null {
    const p = this.#resolve(port, what);
    const bytes = toMacBytes(mac);
    const key = macKey(bytes);
    if (((bytes[0] as number) & 1) !== 0 || key === 0) {
      throw new RangeError(`Switch.${what}: not a unicast MAC (mac=${formatMac(bytes)})`);
    }
    if (!Number.isFinite(age) || age < 0) {
      throw new RangeError(`Switch.${what}: age must be a finite number >= 0 (age=${age})`);
    }
    const slot = this.#macs.get(key);
    const prev = slot !== undefined ? slot.port.name : null;
    if (age >= this.ageingMs) return prev; // already aged out: nothing to learn
    const now = this.#clock();
    this.#learn(key, p, now, now - age);
    return prev;
  }

  /**
   * The MACs learned on a port, aged entries left out (and removed).
   * @param portName the port's name
   * @returns one entry per MAC with ms since it was last seen; empty for an unknown port
   */
  macsOnPort(portName: string): { mac: string; ageMs: number }[] {
    const p = this.#byName.get(portName);
    if (p === undefined) return [];
    const now = this.#clock();
    const out: { mac: string; ageMs: number }[] = [];
    for (const [key, slot] of this.#macs) {
      if (slot.port !== p) continue;
      const age = now - slot.seen;
      if (age >= this.ageingMs) {
        this.#macs.delete(key);
        this.#macsChanged();
        continue;
      }
      out.push({ mac: formatMac(key), ageMs: age });
    }
    return out;
  }

  /**
   * Move a MAC to a port as if just seen there, as a RARP from that port does (the table size
   * limit applies to a MAC not yet known).
   * @param mac the MAC (text or 6 bytes)
   * @param portName the port's name
   * @param ageMs ms since it was seen (default 0), e.g. the age saved with a port's state
   * @throws RangeError for a malformed or group MAC or a negative age; Error when no port has
   *   that name
   */
  learnMac(mac: Uint8Array | string, portName: string, ageMs = 0): void {
    this.#learnChecked(mac, portName, ageMs, "learnMac");
  }

  /**
   * Move a MAC to a port (e.g. its VM migrated there), as if just seen on it (the table size
   * limit applies to a MAC not yet known).
   * @param mac the MAC
   * @param port the new port
   * @returns the name of the port it was on, or null when it was unknown
   * @throws RangeError for a malformed or group MAC; Error when the port is not in this switch
   */
  moveMac(mac: string | Uint8Array, port: SwitchPort | string): string | null {
    return this.#learnChecked(mac, port, 0, "moveMac");
  }

  /**
   * Forget one MAC.
   * @param mac the MAC
   * @returns true when it was known
   */
  forgetMac(mac: string | Uint8Array): boolean {
    const gone = this.#macs.delete(macKey(toMacBytes(mac)));
    this.#macsChanged();
    return gone;
  }

  /**
   * Forget the MACs learned on a port, or every MAC.
   * @param port the port (default: all ports)
   * @returns the number of MACs forgotten
   */
  flushMacs(port?: SwitchPort): number {
    if (port === undefined) {
      const n = this.#macs.size;
      this.#macs.clear();
      this.#macsChanged();
      return n;
    }
    let n = 0;
    for (const [key, slot] of this.#macs) {
      if (slot.port === port) {
        this.#macs.delete(key);
        this.#macsChanged();
        n++;
      }
    }
    if (n > 0) this.logger.debug(`switch: ${n} MAC(s) of ${port.name} flushed`);
    return n;
  }

  /**
   * Remove aged MACs now (also done by a timer and lazily on lookup).
   * @returns the number removed
   */
  expire(): number {
    const now = this.#clock();
    let n = 0;
    for (const [key, slot] of this.#macs) {
      if (now - slot.seen >= this.ageingMs) {
        this.#macs.delete(key);
        this.#macsChanged();
        n++;
      }
    }
    return n;
  }

  // --- stats and lifetime --------------------------------------------------------------

  /** @returns a snapshot of every port's counters and the table size */
  stats(): SwitchStats {
    return {
      ports: this.#ports.map((p) => ({
        name: p.name,
        up: p.up,
        offloads: { ...p.offloads },
        counters: { ...p.counters, drops: { ...p.counters.drops } },
      })),
      macs: this.#macs.size,
      learnOverflows: this.#learnOverflows,
      softwareGso: { frames: this.#gsoFrames, segments: this.#gsoSegments },
      softwareCsum: this.#softCsum,
    };
  }

  /** Remove every port and stop the ageing timer. The switch cannot be used afterwards. */
  close(): void {
    if (this.#closed) return;
    this.flush();
    for (const p of [...this.#ports]) this.removePort(p);
    this.#macs.clear();
    this.#macsChanged();
    if (this.#sweepTimer) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
    this.#closed = true;
  }
}
