/**
 * The VXLAN uplink (RFC 7348): a switch port that carries Ethernet frames in UDP datagrams to
 * remote VTEPs (other vhostkit switches, Linux vxlan devices, ...), so switches on different
 * hosts form one segment.
 *
 * - Encapsulation (RFC 7348 §5): an 8-byte header `flags(8) = 0x08 (I), reserved(24),
 *   VNI(24), reserved(8)` followed by the inner Ethernet frame (no FCS), in one UDP datagram to
 *   the remote's port (4789 by default).
 * - Flooding (§4.2, head-end replication): broadcast, multicast and unknown unicast go to every
 *   configured remote.
 * - Learning (§4.1): the VTEP address a datagram came from is learned for the inner source
 *   MAC; unicast to a learned MAC goes to that VTEP only. Only configured remotes are learned
 *   by default (`learnRemotes` allows any sender), so a spoofed datagram cannot redirect
 *   unicast elsewhere; the table is capped (`maxVteps`) and swept on a timer.
 * - Outer UDP source port (§5): a hash of the inner flow, in 49152..65535, so ECMP routers
 *   spread flows; the port sends from a small pool of sockets bound to such ports and receives
 *   on the bound port only.
 * - Decapsulation: a datagram without the I flag, too short, or with another VNI is dropped and
 *   counted ({@link VxlanPortStats}); the others go into the switch.
 *
 * The port takes complete frames only (offloads off): the switch completes partial checksums
 * and segments TSO frames first, as a Linux vxlan device without offloads would need.
 */
import { createSocket } from "node:dgram";
import type { RemoteInfo, Socket } from "node:dgram";
import { isIP } from "node:net";
import { networkInterfaces } from "node:os";
import type { Logger } from "../backend/device.js";
import { ETH_HLEN, flowHash, formatMac, macKey } from "./frame.js";
import type { Frame, PortCounters, PortHost, PortOffloads, SwitchPort } from "./port.js";
import { newPortCounters, newPortOffloads } from "./port.js";
import type { Switch } from "./switch.js";

/** IANA-assigned VXLAN UDP port (RFC 7348 §5). */
export const VXLAN_PORT = 4789;
/** Length of the VXLAN header. */
export const VXLAN_HLEN = 8;
/** The I flag: the VNI is valid (RFC 7348 §5). */
export const VXLAN_FLAG_I = 0x08;
/** Default ageing of learned remote VTEPs (ms), as the switch's MAC ageing. */
const DEFAULT_VTEP_AGEING_MS = 300_000;
/** Default cap of the learned VTEP table, as the switch's MAC table. */
export const DEFAULT_MAX_VTEPS = 16_384;
/** First outer UDP source port (RFC 7348 §5: the dynamic/private range 49152-65535). */
export const VXLAN_SRC_PORT_MIN = 49152;
/** Number of outer UDP source ports (49152..65535). */
export const VXLAN_SRC_PORT_COUNT = 16384;
/** Default number of source-port sockets {@link openVxlanUplink} binds. */
export const DEFAULT_SOURCE_PORTS = 8;

/** Options of {@link openVxlanUplink} (the fields of a `vxlan:` uplink spec). */
export interface VxlanUplinkOptions {
  /** VXLAN network identifier (0..2^24-1) */
  vni: number;
  /** local address to bind */
  local: string;
  /** local UDP port (0: any) */
  localPort: number;
  /** remote VTEP addresses, flooded frames go to each */
  remotes: string[];
  /** the remotes' UDP port */
  remotePort: number;
  /** interface `local` must belong to */
  dev?: string | undefined;
  /** forget a learned VTEP after this many ms (default 300 000) */
  ageingMs?: number;
  /** most learned inner MACs (default 16 384); beyond it, new MACs are flooded */
  maxVteps?: number;
  /** learn VTEPs from any sender, not only the configured remotes (default false) */
  learnRemotes?: boolean;
  /** sweep aged VTEPs this often in ms (default min(ageingMs, 30 000); 0: never) */
  sweepIntervalMs?: number;
  /**
   * sockets to bind for outer source ports in 49152..65535 chosen by flow hash (default 8;
   * 0: send from the bound socket)
   */
  sourcePorts?: number;
  /** clock in ms (default Date.now) */
  clock?: () => number;
}

/** Counters a VXLAN port keeps besides the switch's. */
export interface VxlanPortStats {
  /** datagrams received */
  rxDatagrams: number;
  /** dropped: shorter than the VXLAN header plus an Ethernet header */
  rxShort: number;
  /** dropped: I flag not set */
  rxBadFlags: number;
  /** dropped: another VNI */
  rxWrongVni: number;
  /** datagrams sent (one per remote for a flooded frame) */
  txDatagrams: number;
  /** frames sent as unicast to a learned VTEP */
  txUnicast: number;
  /** frames flooded to every remote */
  txFlooded: number;
  /** send errors (reported asynchronously by the socket) */
  txErrors: number;
  /** datagrams from a sender that is not a configured remote (delivered, not learned) */
  rxUnknownRemote: number;
  /** inner MACs not learned because the VTEP table was full */
  learnOverflows: number;
}

/** One learned inner MAC -> VTEP entry (a copy). */
export interface VtepEntry {
  mac: string;
  address: string;
  port: number;
  age: number;
}

interface VtepSlot {
  address: string;
  port: number;
  seen: number;
}

/**
 * Encode the VXLAN header (RFC 7348 §5) into `out[0..8)`.
 * @param out destination (at least 8 bytes)
 * @param vni the VNI (0..2^24-1)
 */
export function writeVxlanHeader(out: Uint8Array, vni: number): void {
  out[0] = VXLAN_FLAG_I;
  out[1] = 0;
  out[2] = 0;
  out[3] = 0;
  out[4] = (vni >>> 16) & 0xff;
  out[5] = (vni >>> 8) & 0xff;
  out[6] = vni & 0xff;
  out[7] = 0;
}

/**
 * Decode a VXLAN header (RFC 7348 §5).
 * @param d the datagram
 * @returns the VNI, or a reason the datagram is not valid VXLAN
 */
export function readVxlanHeader(d: Uint8Array): number | "short" | "flags" {
  if (d.length < VXLAN_HLEN + ETH_HLEN) return "short";
  // RFC 7348 §5: I must be 1; the other flag bits are reserved (ignored on receipt).
  if (((d[0] as number) & VXLAN_FLAG_I) === 0) return "flags";
  return ((d[4] as number) << 16) | ((d[5] as number) << 8) | (d[6] as number);
}

/**
 * A switch port over a UDP socket speaking VXLAN.
 */
export class VxlanPort implements SwitchPort {
  readonly name: string;
  readonly vni: number;
  readonly offloads: PortOffloads = newPortOffloads(false);
  readonly counters: PortCounters = newPortCounters();
  readonly stats: VxlanPortStats = {
    rxDatagrams: 0,
    rxShort: 0,
    rxBadFlags: 0,
    rxWrongVni: 0,
    txDatagrams: 0,
    txUnicast: 0,
    txFlooded: 0,
    txErrors: 0,
    rxUnknownRemote: 0,
    learnOverflows: 0,
  };
  readonly #remotes: readonly string[];
  readonly #remoteSet: ReadonlySet<string>;
  readonly #learnAny: boolean;
  readonly #maxVteps: number;
  readonly #remotePort: number;
  readonly #ageingMs: number;
  readonly #txSockets: Socket[];
  #sweepTimer: NodeJS.Timeout | null = null;
  #lastFullSweep = -Infinity;
  readonly #clock: () => number;
  readonly #vteps = new Map<number, VtepSlot>();
  readonly #logger: Logger;
  readonly #onSent = (err: Error | null): void => {
    if (err !== null && this.stats.txErrors++ === 0)
      this.#logger.warn(`${this.name}: send failed: ${err.message}`);
  };
  #socket: Socket | null;
  #host: PortHost | null = null;

  /**
   * @param socket a bound UDP socket; the port owns it from now on
   * @param options VNI, remotes, remote port, ageing, table cap, learning policy
   * @param logger the application's logger
   * @param txSockets sockets bound to source ports in 49152..65535 to send from, chosen by the
   *   inner flow's hash (RFC 7348 §5); the port owns them. Empty: send from `socket`.
   * @throws RangeError for a non-positive ageing time or table cap
   */
  constructor(
    socket: Socket,
    options: VxlanUplinkOptions,
    logger: Logger,
    txSockets: readonly Socket[] = [],
  ) {
    this.#socket = socket;
    this.vni = options.vni;
    this.name = `vxlan:${options.vni}`;
    this.#remotes = [...options.remotes];
    this.#remoteSet = new Set(options.remotes.map(normalizeAddress));
    this.#learnAny = options.learnRemotes ?? false;
    this.#remotePort = options.remotePort;
    this.#ageingMs = options.ageingMs ?? DEFAULT_VTEP_AGEING_MS;
    this.#maxVteps = options.maxVteps ?? DEFAULT_MAX_VTEPS;
    if (!(this.#ageingMs > 0))
      throw new RangeError(`${this.name}: ageingMs must be positive (ageingMs=${this.#ageingMs})`);
    if (!(this.#maxVteps > 0))
      throw new RangeError(`${this.name}: maxVteps must be positive (maxVteps=${this.#maxVteps})`);
    this.#clock = options.clock ?? Date.now;
    this.#logger = logger;
    this.#txSockets = [...txSockets];
    for (const t of this.#txSockets) {
      t.on("error", (err) => this.#logger.warn(`${this.name}: source-port socket: ${err.message}`));
    }
    const sweep = options.sweepIntervalMs ?? Math.min(this.#ageingMs, 30_000);
    if (sweep > 0) {
      this.#sweepTimer = setInterval(() => this.expire(), sweep);
      this.#sweepTimer.unref();
    }
    socket.on("message", (msg, rinfo) => this.#onMessage(msg, rinfo));
    socket.on("error", (err) => {
      this.#logger.error(`${this.name}: socket error: ${err.message}`);
    });
  }

  /** @returns true while the socket is open */
  get up(): boolean {
    return this.#socket !== null;
  }

  /** @returns the local address and port the socket is bound to */
  address(): { address: string; port: number } {
    if (this.#socket === null) throw new Error(`${this.name}: closed`);
    const a = this.#socket.address();
    return { address: a.address, port: a.port };
  }

  /**
   * Remove aged VTEP entries.
   * @returns the number removed
   */
  expire(): number {
    const now = this.#clock();
    let n = 0;
    for (const [key, s] of this.#vteps) {
      if (now - s.seen >= this.#ageingMs) {
        this.#vteps.delete(key);
        n++;
      }
    }
    return n;
  }

  /** @returns the number of entries in the VTEP table, aged ones not yet swept included */
  get vtepCount(): number {
    return this.#vteps.size;
  }

  /** @returns the learned inner MAC -> remote VTEP table (aged entries left out) */
  vtepTable(): VtepEntry[] {
    const now = this.#clock();
    const rows: VtepEntry[] = [];
    for (const [key, s] of this.#vteps) {
      if (now - s.seen >= this.#ageingMs) continue;
      rows.push({ mac: formatMac(key), address: s.address, port: s.port, age: now - s.seen });
    }
    return rows;
  }

  /**
   * Encapsulate a frame and send it: to the learned VTEP of its destination MAC, or to every
   * remote (broadcast, multicast, unknown unicast).
   * @param frame a complete frame
   * @returns true when handed to the socket
   */
  deliver(frame: Frame): boolean {
    let sock = this.#socket;
    if (sock === null) {
      this.counters.drops["port-down"]++;
      return false;
    }
    const d = frame.data;
    // One copy: the frame is only valid during this call, and dgram sends asynchronously.
    const dgram = Buffer.allocUnsafe(VXLAN_HLEN + d.length);
    writeVxlanHeader(dgram, this.vni);
    dgram.set(d, VXLAN_HLEN);
    // RFC 7348 §5: the source port is a hash of the inner flow (the socket bound to it).
    const tx = this.#txSockets;
    if (tx.length > 0) sock = tx[(flowHash(d) >>> 0) % tx.length] as Socket;
    if (((d[0] as number) & 1) === 0) {
      const slot = this.#vteps.get(macKey(d, 0));
      if (slot !== undefined) {
        if (this.#clock() - slot.seen < this.#ageingMs) {
          this.stats.txUnicast++;
          this.stats.txDatagrams++;
          sock.send(dgram, slot.port, slot.address, this.#onSent);
          return true;
        }
        this.#vteps.delete(macKey(d, 0));
      }
    }
    this.stats.txFlooded++;
    for (const r of this.#remotes) {
      this.stats.txDatagrams++;
      sock.send(dgram, this.#remotePort, r, this.#onSent);
    }
    return true;
  }

  /**
   * The port was added to a switch: deliver what arrives.
   * @param host the switch
   */
  attachHost(host: PortHost): void {
    this.#host = host;
  }

  /** The port was removed from its switch: close the socket. */
  detachHost(): void {
    this.#host = null;
    this.close();
  }

  /** Close the socket (idempotent). */
  close(): void {
    const s = this.#socket;
    if (s === null) return;
    this.#socket = null;
    if (this.#sweepTimer !== null) clearInterval(this.#sweepTimer);
    this.#sweepTimer = null;
    this.#vteps.clear();
    s.removeAllListeners("message");
    s.close();
    for (const t of this.#txSockets) t.close();
    this.#txSockets.length = 0;
  }

  #onMessage(msg: Buffer, rinfo: RemoteInfo): void {
    const host = this.#host;
    if (host === null) return;
    this.stats.rxDatagrams++;
    const vni = readVxlanHeader(msg);
    if (vni === "short") {
      this.stats.rxShort++;
      this.counters.drops.malformed++;
      return;
    }
    if (vni === "flags") {
      this.stats.rxBadFlags++;
      this.counters.drops.malformed++;
      return;
    }
    if (vni !== this.vni) {
      this.stats.rxWrongVni++;
      this.counters.drops.filtered++;
      return;
    }
    const inner = msg.subarray(VXLAN_HLEN);
    const known = this.#remoteSet.has(normalizeAddress(rinfo.address));
    if (!known) this.stats.rxUnknownRemote++;
    if ((known || this.#learnAny) && ((inner[6] as number) & 1) === 0) {
      const src = macKey(inner, 6);
      if (src !== 0) this.#learn(src, rinfo.address);
    }
    host.receive(this, { data: inner, meta: {} });
    host.flush();
  }

  #learn(key: number, address: string): void {
    const now = this.#clock();
    const slot = this.#vteps.get(key);
    if (slot !== undefined) {
      slot.address = address;
      slot.seen = now;
      return;
    }
    if (this.#vteps.size >= this.#maxVteps) {
      // Full: sweep aged entries at most once a second, then give up on this MAC (flooded).
      if (now - this.#lastFullSweep >= 1000) {
        this.#lastFullSweep = now;
        this.expire();
      }
      if (this.#vteps.size >= this.#maxVteps) {
        this.stats.learnOverflows++;
        return;
      }
    }
    this.#vteps.set(key, { address, port: this.#remotePort, seen: now });
  }
}

/** Lower-case an address and strip an IPv4-mapped IPv6 prefix, for comparing senders. */
function normalizeAddress(address: string): string {
  const a = address.toLowerCase();
  return a.startsWith("::ffff:") && a.includes(".") ? a.slice(7) : a;
}

/** Bind a UDP socket; reject with the socket error (the socket is then closed). */
function bindSocket(family: number, address: string, port: number): Promise<Socket> {
  const socket = createSocket({
    type: family === 6 ? "udp6" : "udp4",
    reuseAddr: false,
    ipv6Only: family === 6,
  });
  return new Promise<Socket>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      socket.close();
      reject(err);
    };
    socket.once("error", onError);
    socket.bind({ address, port, exclusive: true }, () => {
      socket.removeListener("error", onError);
      resolve(socket);
    });
  });
}

/**
 * Bind `count` sockets to distinct ports in 49152..65535 (RFC 7348 §5 source ports), skipping
 * ports in use; gives up (returning fewer) after a bounded number of tries.
 */
async function bindSourcePorts(family: number, address: string, count: number): Promise<Socket[]> {
  const out: Socket[] = [];
  const start = Math.floor(Math.random() * VXLAN_SRC_PORT_COUNT);
  const stride = Math.max(1, Math.floor(VXLAN_SRC_PORT_COUNT / Math.max(count, 1)));
  try {
    for (let i = 0, tries = 0; out.length < count && tries < count * 8; i++, tries++) {
      const port =
        VXLAN_SRC_PORT_MIN + ((start + i * stride + Math.floor(i / count)) % VXLAN_SRC_PORT_COUNT);
      try {
        out.push(await bindSocket(family, address, port));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EADDRINUSE") throw err;
      }
    }
  } catch (err) {
    for (const s of out) s.close();
    throw err;
  }
  return out;
}

function checkDev(dev: string, local: string): void {
  const addrs = networkInterfaces()[dev];
  if (addrs === undefined)
    throw new Error(`vxlan uplink: dev=${JSON.stringify(dev)}: no such interface`);
  const want = local.toLowerCase();
  if (!addrs.some((a) => a.address.toLowerCase() === want)) {
    throw new Error(
      `vxlan uplink: local=${local} is not an address of dev=${dev} ` +
        `(it has ${addrs.map((a) => a.address).join(", ") || "none"})`,
    );
  }
}

/**
 * Bind a UDP socket and add a VXLAN port (`vxlan:VNI`) to the switch.
 * @param sw the switch
 * @param options VNI, local address and port, remotes, remote port, interface
 * @param logger the application's logger
 * @returns the port's name, the port, and close (removes the port, closes the socket)
 * @throws Error naming the field: an invalid VNI or address, an address not on `dev`, the
 *   local address not available or the port in use
 */
export async function openVxlanUplink(
  sw: Switch,
  options: VxlanUplinkOptions,
  logger: Logger,
): Promise<{ name: string; port: VxlanPort; close(): void }> {
  if (!Number.isInteger(options.vni) || options.vni < 0 || options.vni > 0xffffff)
    throw new RangeError(`vxlan uplink: vni=${options.vni}: not in 0..16777215`);
  const family = isIP(options.local);
  if (family === 0) throw new Error(`vxlan uplink: local=${options.local}: not an IP address`);
  for (const r of options.remotes) {
    if (isIP(r) !== family)
      throw new Error(`vxlan uplink: remote=${r}: not an address of the same family as local`);
  }
  if (options.dev !== undefined) checkDev(options.dev, options.local);
  const nSrc = options.sourcePorts ?? DEFAULT_SOURCE_PORTS;
  if (!Number.isInteger(nSrc) || nSrc < 0 || nSrc > 256)
    throw new RangeError(`vxlan uplink: sourcePorts=${nSrc}: not in 0..256`);
  const socket = createSocket({
    type: family === 6 ? "udp6" : "udp4",
    reuseAddr: false,
    ipv6Only: family === 6,
  });
  await new Promise<void>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      socket.close();
      const why =
        err.code === "EADDRINUSE"
          ? "the UDP port is in use (a Linux vxlan device or another switch may hold it)"
          : err.code === "EADDRNOTAVAIL"
            ? "the address is not configured on this host"
            : err.message;
      reject(
        Object.assign(
          new Error(
            `vxlan uplink: cannot bind local=${options.local} port=${options.localPort}: ${why}`,
            { cause: err },
          ),
          { code: err.code },
        ),
      );
    };
    socket.once("error", onError);
    socket.bind({ address: options.local, port: options.localPort, exclusive: true }, () => {
      socket.removeListener("error", onError);
      resolve();
    });
  });
  let tx: Socket[];
  try {
    tx = await bindSourcePorts(family, options.local, nSrc);
  } catch (err) {
    socket.close();
    throw new Error(
      `vxlan uplink: cannot bind source ports on local=${options.local}: ${(err as Error).message}`,
      { cause: err },
    );
  }
  let port: VxlanPort;
  try {
    port = new VxlanPort(socket, options, logger, tx);
  } catch (err) {
    socket.close();
    for (const t of tx) t.close();
    throw err;
  }
  try {
    sw.addPort(port);
  } catch (err) {
    port.close();
    throw err;
  }
  const a = port.address();
  logger.info(
    `${port.name}: VXLAN uplink on ${a.address}:${a.port}, remotes ` +
      `${options.remotes.map((r) => `${r}:${options.remotePort}`).join(", ")}`,
  );
  return {
    name: port.name,
    port,
    close(): void {
      if (!sw.removePort(port)) port.close();
    },
  };
}
