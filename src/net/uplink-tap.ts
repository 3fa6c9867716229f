/**
 * The TAP uplink: a switch port whose other side is a Linux TAP interface, i.e. the host's
 * network stack (Linux `Documentation/networking/tuntap.rst`).
 *
 * By default the device is opened with IFF_VNET_HDR: every frame carries a 12-byte
 * virtio-net header (VIRTIO 1.2 §5.1.6), so partial checksums and TCP segmentation offload
 * frames cross between guests and the host stack unchanged, as with QEMU's `tap,vnet_hdr=on`
 * (the kernel completes or segments what it must). With `vnetHdr: false` (plain IFF_TAP |
 * IFF_NO_PI) the port takes only complete frames: its offloads are off and the switch completes
 * partial checksums and segments TSO frames before {@link TapPort.deliver} sees them.
 *
 * Frames are read in batches per readiness event (one read(2) per frame, nothing else native
 * per frame) and written with one write(2) each.
 */
import type { Logger } from "../backend/device.js";
import { native, isNativeError, POLL_READABLE } from "../native.js";
import type { FdWatcher } from "../native.js";
import type { Frame, PortCounters, PortHost, PortOffloads, SwitchPort } from "./port.js";
import { newPortCounters, newPortOffloads } from "./port.js";
import type { CsumRequest, GsoRequest } from "./port.js";
import type { Switch } from "./switch.js";
import {
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VirtioNetGso,
  writeVnetHeader,
} from "./virtio-net.js";

/** The header written for the kernel is the one the virtio-net device writes for a guest. */
export { writeVnetHeader };

/** Length of the virtio-net header on a TAP opened with IFF_VNET_HDR (TUNSETVNETHDRSZ). */
export const TAP_VNET_HDR_LEN = 12;
/** Largest frame read or written (a 64 KiB GSO frame plus headers fits). */
const TAP_BUFFER = 65_536 + 512;
/** Most frames read per readiness event before yielding to the event loop. */
const READ_BATCH = 64;

/** Options of {@link openTapUplink}. */
export interface TapUplinkOptions {
  /** the interface name */
  name: string;
  /** frames carry a virtio-net header and offloads pass through (default true) */
  vnetHdr?: boolean;
}

/** Counters a TAP port keeps besides the switch's. */
export interface TapPortStats {
  /** reads that returned a frame */
  reads: number;
  /** readiness events handled */
  wakeups: number;
  /** writes that failed for a reason other than EAGAIN / EIO (logged) */
  writeErrors: number;
  /** frames read with a virtio-net header the port could not use (counted malformed too) */
  badHeaders: number;
}

/**
 * A switch port over an open TAP fd. Owns the fd.
 */
export class TapPort implements SwitchPort {
  readonly name: string;
  /** the kernel's name of the interface */
  readonly ifname: string;
  readonly offloads: PortOffloads;
  readonly counters: PortCounters = newPortCounters();
  readonly stats: TapPortStats = { reads: 0, wakeups: 0, writeErrors: 0, badHeaders: 0 };
  /** frames carry a 12-byte virtio-net header */
  readonly vnetHdr: boolean;
  readonly #logger: Logger;
  #fd: number;
  #watcher: FdWatcher | null = null;
  #host: PortHost | null = null;
  readonly #buf = new Uint8Array(TAP_BUFFER);
  readonly #out = new Uint8Array(TAP_BUFFER);
  readonly #frame: Frame = { data: new Uint8Array(0), meta: {} };
  readonly #csum: CsumRequest = { start: 0, offset: 0 };
  readonly #gso: GsoRequest = { type: "tcpv4", size: 0, hdrLen: 0, ecn: false };

  /**
   * @param fd a non-blocking TAP fd (IFF_TAP | IFF_NO_PI, and IFF_VNET_HDR with a 12-byte
   *   header and TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN when `vnetHdr`); the
   *   port owns it from now on
   * @param ifname the interface name
   * @param logger the application's logger
   * @param vnetHdr whether the fd was opened with IFF_VNET_HDR
   */
  constructor(fd: number, ifname: string, logger: Logger, vnetHdr = false) {
    this.#fd = fd;
    this.ifname = ifname;
    this.name = `tap:${ifname}`;
    this.#logger = logger;
    this.vnetHdr = vnetHdr;
    // The kernel takes partial checksums and TSO/ECN frames from a vnet-header writer; UFO
    // is left to the switch (it drops those: no software UFO).
    this.offloads = newPortOffloads(false);
    if (vnetHdr) {
      this.offloads.csum = true;
      this.offloads.tso4 = true;
      this.offloads.tso6 = true;
      this.offloads.ecn = true;
    }
  }

  /** @returns true while the fd is open (the TAP carrier is on while it is attached) */
  get up(): boolean {
    return this.#fd >= 0;
  }

  /**
   * Write one frame to the TAP. A full queue (EAGAIN) counts `no-buffer`; an interface that is
   * administratively down (EIO) counts `port-down`.
   * @param frame the frame; with a virtio-net header its partial checksum / TSO metadata goes
   *   along (the kernel completes them), without one the switch has completed it already
   * @returns true when written
   */
  deliver(frame: Frame): boolean {
    if (this.#fd < 0) {
      this.counters.drops["port-down"]++;
      return false;
    }
    let d = frame.data;
    if (this.vnetHdr) {
      const out = this.#out;
      if (d.length + TAP_VNET_HDR_LEN > out.length) {
        this.counters.drops["too-big"]++;
        return false;
      }
      writeVnetHeader(out, frame);
      out.set(d, TAP_VNET_HDR_LEN);
      d = out.subarray(0, TAP_VNET_HDR_LEN + d.length);
    }
    let n: number | null;
    try {
      n = native.write(this.#fd, d, 0, d.length);
    } catch (err) {
      if (isNativeError(err) && err.code === "EIO") {
        this.counters.drops["port-down"]++;
        return false;
      }
      if (isNativeError(err) && err.code === "EINVAL") {
        this.counters.drops.malformed++;
        return false;
      }
      this.counters.drops["no-buffer"]++;
      if (this.stats.writeErrors++ === 0)
        this.#logger.warn(`${this.name}: write failed: ${(err as Error).message}`);
      return false;
    }
    if (n === null) {
      this.counters.drops["no-buffer"]++;
      return false;
    }
    return true;
  }

  /**
   * The port was added to a switch: start reading.
   * @param host the switch
   */
  attachHost(host: PortHost): void {
    this.#host = host;
    if (this.#fd < 0 || this.#watcher !== null) return;
    this.#watcher = new native.FdWatcher(this.#fd, (events, error) => {
      if (error !== null) {
        this.#logger.error(`${this.name}: watching the TAP fd failed: ${error.message}`);
        this.#stop();
        return;
      }
      if ((events & POLL_READABLE) !== 0) this.#readBatch();
    });
    this.#watcher.start(POLL_READABLE);
  }

  /** The port was removed from its switch: stop reading and close the fd. */
  detachHost(): void {
    this.#host = null;
    this.#stop();
  }

  #readBatch(): void {
    const host = this.#host;
    if (host === null) return;
    this.stats.wakeups++;
    const buf = this.#buf;
    const f = this.#frame;
    for (let i = 0; i < READ_BATCH && this.#fd >= 0; i++) {
      let n: number | null;
      try {
        n = native.read(this.#fd, buf, 0, buf.length);
      } catch (err) {
        this.#logger.error(`${this.name}: read failed: ${(err as Error).message}`);
        this.#stop();
        host.linkChanged(this);
        break;
      }
      if (n === null) break;
      if (n === 0) {
        this.#logger.warn(`${this.name}: the TAP fd returned end of file`);
        this.#stop();
        host.linkChanged(this);
        break;
      }
      this.stats.reads++;
      // LIFETIME: `f.data` views the port's own read buffer (not guest memory); the switch
      // copies what it keeps before receive() returns and the next read overwrites it.
      if (this.vnetHdr) {
        if (!this.#parseVnetHeader(buf, n)) {
          this.stats.badHeaders++;
          this.counters.drops.malformed++;
          continue;
        }
        f.data = buf.subarray(TAP_VNET_HDR_LEN, n);
      } else {
        f.data = buf.subarray(0, n);
        f.meta = {};
      }
      host.receive(this, f);
    }
    host.flush();
  }

  /**
   * Decode the virtio-net header the kernel put before a frame into the frame's metadata.
   * @param b the read buffer
   * @param n bytes read
   * @returns false when the header is unusable (UFO, unknown GSO type, field outside the frame)
   */
  #parseVnetHeader(b: Uint8Array, n: number): boolean {
    const frameLen = n - TAP_VNET_HDR_LEN;
    if (frameLen < 14) return false;
    const meta: Frame["meta"] = {};
    const flags = b[0] as number;
    if ((flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) {
      const start = (b[6] as number) | ((b[7] as number) << 8);
      const offset = (b[8] as number) | ((b[9] as number) << 8);
      if (start + offset + 2 > frameLen) return false;
      this.#csum.start = start;
      this.#csum.offset = offset;
      meta.needsCsum = this.#csum;
    } else if ((flags & VIRTIO_NET_HDR_F_DATA_VALID) !== 0) {
      meta.dataValid = true;
    }
    const gsoType = b[1] as number;
    const gt = gsoType & ~VirtioNetGso.ECN;
    if (gt !== VirtioNetGso.NONE) {
      const g = this.#gso;
      if (gt === VirtioNetGso.TCPV4) g.type = "tcpv4";
      else if (gt === VirtioNetGso.TCPV6) g.type = "tcpv6";
      else return false;
      g.size = (b[4] as number) | ((b[5] as number) << 8);
      if (g.size === 0) return false;
      g.hdrLen = (b[2] as number) | ((b[3] as number) << 8);
      g.ecn = (gsoType & VirtioNetGso.ECN) !== 0;
      meta.gso = g;
    }
    this.#frame.meta = meta;
    return true;
  }

  #stop(): void {
    this.#watcher?.close();
    this.#watcher = null;
    if (this.#fd >= 0) {
      try {
        native.close(this.#fd);
      } catch {
        // already closed: nothing to release
      }
      this.#fd = -1;
    }
  }
}

/**
 * Open (or create) a TAP interface and add it to the switch as a port named `tap:NAME`.
 * @param sw the switch
 * @param options the interface name; `vnetHdr` (default true) for the virtio-net header
 * @param logger the application's logger
 * @returns the port's name and close (removes the port, closes the fd)
 * @throws Error naming the interface: /dev/net/tun missing, EPERM (needs CAP_NET_ADMIN),
 *   EBUSY (the device is attached elsewhere or is not a TAP), or an invalid name
 */
export async function openTapUplink(
  sw: Switch,
  options: TapUplinkOptions,
  logger: Logger,
): Promise<{ name: string; port: TapPort; close(): void }> {
  let opened: { fd: number; name: string; vnetHdr: boolean };
  try {
    opened = native.tapOpen(options.name, options.vnetHdr ?? true);
  } catch (err) {
    throw tapError(options.name, err);
  }
  const port = new TapPort(opened.fd, opened.name, logger, opened.vnetHdr);
  try {
    sw.addPort(port);
  } catch (err) {
    port.detachHost();
    throw err;
  }
  logger.info(
    `${port.name}: TAP uplink attached to interface ${opened.name}` +
      (opened.vnetHdr ? " (virtio-net header: checksum and TSO offloads)" : " (plain frames)"),
  );
  return {
    name: port.name,
    port,
    close(): void {
      if (!sw.removePort(port)) port.detachHost();
    },
  };
}

function tapError(name: string, err: unknown): Error {
  if (!isNativeError(err)) return err instanceof Error ? err : new Error(String(err));
  let why: string;
  switch (err.code) {
    case "ENOENT":
    case "ENODEV":
      why = "/dev/net/tun does not exist (is the tun module loaded?)";
      break;
    case "EPERM":
    case "EACCES":
      why = "permission denied (opening a TAP device needs CAP_NET_ADMIN)";
      break;
    case "EBUSY":
      why = "the interface is busy (attached by another process, or not a TAP device)";
      break;
    case "EINVAL":
      why = "the interface exists and is not a TAP device, or the name is invalid";
      break;
    default:
      why = err.message;
  }
  const e = new Error(`tap uplink: cannot open TAP interface ${JSON.stringify(name)}: ${why}`, {
    cause: err,
  });
  return Object.assign(e, { code: err.code });
}
