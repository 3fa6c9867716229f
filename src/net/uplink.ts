/**
 * Host uplinks of the virtual switch: what `--uplink TEXT` means, and opening one.
 *
 * - `tap:NAME[,vnet_hdr=off]`: a TAP device (created if missing, attached if it exists);
 *   frames go to and come from the host's network stack, with a virtio-net header so
 *   checksum and TSO offloads pass through unless `vnet_hdr=off` (see `src/net/uplink-tap.ts`).
 * - `vxlan:vni=42,local=198.51.100.1,remote=198.51.100.2[,remote=...][,port=4789]
 *   [,dstport=4789][,dev=IFNAME]`: VXLAN over UDP (RFC 7348) to one or more remote VTEPs, so
 *   switches on different hosts (or a Linux vxlan device) form one segment
 *   (see `src/net/uplink-vxlan.ts`).
 *
 * An uplink is a {@link SwitchPort} added to the switch; `close()` removes it and releases its
 * fd or socket.
 */
import { isIP } from "node:net";
import type { Logger } from "../backend/device.js";
import type { Switch } from "./switch.js";
import { openTapUplink } from "./uplink-tap.js";
import { openVxlanUplink, VXLAN_PORT } from "./uplink-vxlan.js";

/** A TAP uplink. */
export interface TapUplinkSpec {
  kind: "tap";
  /** the interface name (1..15 bytes, as IFNAMSIZ allows) */
  name: string;
  /** frames carry a virtio-net header and offloads pass through (default true) */
  vnetHdr: boolean;
}

/** A VXLAN uplink (RFC 7348). */
export interface VxlanUplinkSpec {
  kind: "vxlan";
  /** VXLAN network identifier, 0..2^24-1 */
  vni: number;
  /** local IPv4/IPv6 address the UDP socket binds to */
  local: string;
  /** local UDP port (default 4789, the IANA VXLAN port) */
  localPort: number;
  /** remote VTEP addresses (same family as `local`); flooded frames go to every one */
  remotes: string[];
  /** UDP port of the remote VTEPs (default 4789) */
  remotePort: number;
  /** interface `local` must belong to (checked when opening), if given */
  dev?: string | undefined;
  /** learn VTEPs from any sender, not only the remotes (`learn=any`; absent: remotes only) */
  learnRemotes?: true;
}

/** What `--uplink` describes. */
export type UplinkSpec = TapUplinkSpec | VxlanUplinkSpec;

/** An open uplink, attached to its switch as a port. */
export interface Uplink {
  /** the port's name in the switch (`tap:NAME` or `vxlan:VNI`) */
  readonly name: string;
  /** Remove the port from the switch and release the device or socket. Idempotent. */
  close(): void;
}

/**
 * Error for an `--uplink` text that cannot be parsed; names the field and the value.
 *
 * Shaped like `VhostUserError` (`code`, `field`, `value`, `fatal`) without deriving from
 * it: its code is not in the closed `VhostErrorCode` union of src/protocol/errors.ts.
 */
export class UplinkSpecError extends Error {
  /** stable error code */
  readonly code = "ERR_VHOST_UPLINK_SPEC" as const;
  /** never fatal: nothing was opened */
  readonly fatal = false as const;
  /** the offending field (`kind`, `name`, `vni`, `local`, `remote`, `port`, ...) */
  readonly field: string;
  /** the offending value */
  readonly value: string;
  /**
   * @param field the field
   * @param value its value
   * @param message what is wrong
   */
  constructor(field: string, value: string, message: string) {
    super(`uplink: ${field}=${JSON.stringify(value)}: ${message}`);
    this.name = "UplinkSpecError";
    this.field = field;
    this.value = value;
  }
}

const IFNAMSIZ = 16;

function checkIfName(field: string, name: string): string {
  // Linux dev_valid_name: 1..15 bytes, not "." or "..", no '/', ':' or whitespace.
  if (
    name.length === 0 ||
    Buffer.byteLength(name) >= IFNAMSIZ ||
    name === "." ||
    name === ".." ||
    /[/:\s]/.test(name)
  ) {
    throw new UplinkSpecError(
      field,
      name,
      "not a valid interface name (1-15 bytes, no '/', ':' or spaces)",
    );
  }
  return name;
}

function parsePort(field: string, text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) < 1 || Number(text) > 65535)
    throw new UplinkSpecError(field, text, "not a UDP port (1-65535)");
  return Number(text);
}

function parseAddress(field: string, text: string): string {
  if (isIP(text) === 0) throw new UplinkSpecError(field, text, "not an IPv4 or IPv6 address");
  return text;
}

/**
 * Parse the text of `--uplink`.
 * @param text `tap:NAME[,vnet_hdr=on|off]` or `vxlan:vni=N,local=ADDR,remote=ADDR[,remote=ADDR...][,port=P]
 *   [,dstport=P][,dev=IFNAME][,learn=remotes|any]` (`learn=any`: learn VTEPs from any sender)
 * @returns the spec
 * @throws UplinkSpecError naming the bad field and its value
 */
export function parseUplinkSpec(text: string): UplinkSpec {
  const colon = text.indexOf(":");
  const kind = colon < 0 ? text : text.slice(0, colon);
  const rest = colon < 0 ? "" : text.slice(colon + 1);
  if (kind === "tap") {
    const [name = "", ...opts] = rest.split(",");
    if (name === "") throw new UplinkSpecError("name", name, "tap needs a name (tap:NAME)");
    let vnetHdr = true;
    for (const item of opts) {
      const eq = item.indexOf("=");
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? "" : item.slice(eq + 1);
      if (key !== "vnet_hdr")
        throw new UplinkSpecError(key, value, "unknown tap field (expected vnet_hdr)");
      if (value !== "on" && value !== "off")
        throw new UplinkSpecError(key, value, "expected on or off");
      vnetHdr = value === "on";
    }
    return { kind: "tap", name: checkIfName("name", name), vnetHdr };
  }
  if (kind !== "vxlan")
    throw new UplinkSpecError("kind", kind, "unknown uplink kind (expected tap or vxlan)");
  let vni: number | undefined;
  let local: string | undefined;
  let localPort = VXLAN_PORT;
  let remotePort = VXLAN_PORT;
  let dev: string | undefined;
  let learnAny = false;
  const remotes: string[] = [];
  const seen = new Set<string>();
  for (const item of rest === "" ? [] : rest.split(",")) {
    const eq = item.indexOf("=");
    if (eq <= 0) throw new UplinkSpecError("vxlan", item, "expected key=value");
    const key = item.slice(0, eq);
    const value = item.slice(eq + 1);
    if (key !== "remote" && seen.has(key))
      throw new UplinkSpecError(key, value, "given more than once");
    seen.add(key);
    switch (key) {
      case "vni":
        if (!/^\d{1,8}$/.test(value) || Number(value) > 0xffffff)
          throw new UplinkSpecError(key, value, "not a VNI (0-16777215)");
        vni = Number(value);
        break;
      case "local":
        local = parseAddress(key, value);
        break;
      case "remote":
        remotes.push(parseAddress(key, value));
        break;
      case "port":
        localPort = parsePort(key, value);
        break;
      case "dstport":
        remotePort = parsePort(key, value);
        break;
      case "dev":
        dev = checkIfName(key, value);
        break;
      case "learn":
        if (value !== "remotes" && value !== "any")
          throw new UplinkSpecError(key, value, "expected remotes or any");
        learnAny = value === "any";
        break;
      default:
        throw new UplinkSpecError(
          key,
          value,
          "unknown vxlan field (expected vni, local, remote, port, dstport, dev, learn)",
        );
    }
  }
  if (vni === undefined) throw new UplinkSpecError("vni", "", "missing (vxlan:vni=N,...)");
  if (local === undefined) throw new UplinkSpecError("local", "", "missing (local=ADDR)");
  if (remotes.length === 0)
    throw new UplinkSpecError("remote", "", "at least one remote=ADDR is needed");
  const family = isIP(local);
  for (const r of remotes) {
    if (isIP(r) !== family)
      throw new UplinkSpecError("remote", r, `not the same address family as local=${local}`);
  }
  const spec: VxlanUplinkSpec = { kind: "vxlan", vni, local, localPort, remotes, remotePort, dev };
  if (learnAny) spec.learnRemotes = true;
  return spec;
}

/**
 * Format a spec back into the text {@link parseUplinkSpec} reads.
 * @param spec the spec
 * @returns the text
 */
export function formatUplinkSpec(spec: UplinkSpec): string {
  if (spec.kind === "tap") return `tap:${spec.name}${spec.vnetHdr ? "" : ",vnet_hdr=off"}`;
  const parts = [`vni=${spec.vni}`, `local=${spec.local}`];
  for (const r of spec.remotes) parts.push(`remote=${r}`);
  if (spec.localPort !== VXLAN_PORT) parts.push(`port=${spec.localPort}`);
  if (spec.remotePort !== VXLAN_PORT) parts.push(`dstport=${spec.remotePort}`);
  if (spec.dev !== undefined) parts.push(`dev=${spec.dev}`);
  if (spec.learnRemotes === true) parts.push("learn=any");
  return `vxlan:${parts.join(",")}`;
}

/**
 * Open an uplink and add it to the switch as a port.
 * @param sw the switch
 * @param spec what to open (see {@link parseUplinkSpec})
 * @param logger the application's logger
 * @returns the open uplink (its port name, and close)
 * @throws Error naming the device or address: no such device / not permitted (TAP), address
 *   not available or in use (VXLAN)
 */
export async function openUplink(sw: Switch, spec: UplinkSpec, logger: Logger): Promise<Uplink> {
  if (spec.kind === "tap")
    return openTapUplink(sw, { name: spec.name, vnetHdr: spec.vnetHdr }, logger);
  return openVxlanUplink(sw, spec, logger);
}
