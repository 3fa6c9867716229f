/**
 * Network namespaces for tests that need the host's network stack (a TAP or VXLAN uplink):
 * create namespaces with unique names, veth pairs, TAP and VXLAN devices with iproute2, and
 * always delete them. Addresses are restricted to the documentation ranges 192.0.2.0/24 and
 * 198.51.100.0/24 and to fd00::/8 (documentation and unique-local ranges only). Needs root.
 */
import { execFile } from "node:child_process";
import { BlockList, isIP } from "node:net";
import { promisify } from "node:util";

import { uniqueName } from "./testpmd.js";

const execFileP = promisify(execFile);
const IP_TIMEOUT_MS = 10_000;

/**
 * Check that an address (optionally with a /prefix) lies in a range tests may use:
 * 192.0.2.0/24, 198.51.100.0/24 or fd00::/8, with a prefix no wider than the range.
 * @param cidr e.g. "192.0.2.1/24" or "fd00::1/64"
 * @returns the address without the prefix
 * @throws RangeError naming the address when it is outside those ranges
 */
export function checkTestAddress(cidr: string): string {
  const [addr = "", prefixText] = cidr.split("/");
  const family = isIP(addr);
  if (family === 0) throw new RangeError(`netns: not an IP address: ${JSON.stringify(cidr)}`);
  const prefix = prefixText === undefined ? (family === 4 ? 32 : 128) : Number(prefixText);
  const allowed = new BlockList();
  allowed.addSubnet("192.0.2.0", 24, "ipv4");
  allowed.addSubnet("198.51.100.0", 24, "ipv4");
  allowed.addSubnet("fd00::", 8, "ipv6");
  const minPrefix = family === 4 ? 24 : 8;
  if (!allowed.check(addr, family === 4 ? "ipv4" : "ipv6") || !(prefix >= minPrefix)) {
    throw new RangeError(
      `netns: address ${cidr} is outside 192.0.2.0/24, 198.51.100.0/24 and fd00::/8`,
    );
  }
  return addr;
}

/**
 * Run `ip ARGS` (iproute2), bounded in time.
 * @param args the arguments after `ip`
 * @returns stdout
 * @throws Error with the command and its stderr
 */
export async function ip(args: readonly string[]): Promise<string> {
  try {
    const { stdout } = await execFileP("ip", [...args], { timeout: IP_TIMEOUT_MS });
    return stdout;
  } catch (e) {
    const err = e as Error & { stderr?: string };
    throw new Error(`ip ${args.join(" ")}: ${(err.stderr ?? err.message).trim()}`);
  }
}

/** A network namespace owned by a test. */
export class Netns {
  private deleted = false;

  /** @internal use {@link createNetns}. */
  constructor(readonly name: string) {}

  /**
   * Run `ip -n NAME ARGS` inside the namespace.
   * @param args the arguments after `ip -n NAME`
   * @returns stdout
   */
  ip(args: readonly string[]): Promise<string> {
    return ip(["-n", this.name, ...args]);
  }

  /**
   * Run a program inside the namespace (`ip netns exec NAME ...`), bounded in time.
   * @param argv the program and its arguments
   * @param timeoutMs the bound, default 10 s
   * @returns stdout, stderr and the exit status (non-zero statuses do not throw)
   */
  async exec(
    argv: readonly string[],
    timeoutMs = 10_000,
  ): Promise<{ stdout: string; stderr: string; status: number }> {
    try {
      const { stdout, stderr } = await execFileP("ip", ["netns", "exec", this.name, ...argv], {
        timeout: timeoutMs,
      });
      return { stdout, stderr, status: 0 };
    } catch (e) {
      const err = e as Error & { stdout?: string; stderr?: string; code?: number | string };
      return {
        stdout: err.stdout ?? "",
        stderr: err.stderr ?? err.message,
        status: typeof err.code === "number" ? err.code : -1,
      };
    }
  }

  /**
   * Add an address to a device and bring it up.
   * @param dev the device in this namespace
   * @param cidr the address, checked by {@link checkTestAddress}
   */
  async addAddress(dev: string, cidr: string): Promise<void> {
    checkTestAddress(cidr);
    await this.ip(["addr", "add", cidr, "dev", dev, ...(cidr.includes(":") ? ["nodad"] : [])]);
    await this.ip(["link", "set", dev, "up"]);
  }

  /**
   * Create a TAP device in this namespace.
   * @param opts device name (default unique), address, multi_queue
   * @returns the device name
   */
  async addTap(opts: { name?: string; addr?: string; multiQueue?: boolean } = {}): Promise<string> {
    const dev = opts.name ?? ifName("vkt");
    await this.ip([
      "tuntap",
      "add",
      "dev",
      dev,
      "mode",
      "tap",
      ...(opts.multiQueue === true ? ["multi_queue"] : []),
    ]);
    if (opts.addr !== undefined) await this.addAddress(dev, opts.addr);
    else await this.ip(["link", "set", dev, "up"]);
    return dev;
  }

  /**
   * Create a VXLAN device in this namespace.
   * @param opts VNI, local and remote underlay addresses, underlay device, UDP port, overlay address
   * @returns the device name
   */
  async addVxlan(opts: {
    vni: number;
    local: string;
    remote: string;
    dev: string;
    dstPort?: number;
    name?: string;
    addr?: string;
  }): Promise<string> {
    checkTestAddress(opts.local);
    checkTestAddress(opts.remote);
    const name = opts.name ?? ifName("vkx");
    await this.ip([
      "link",
      "add",
      name,
      "type",
      "vxlan",
      "id",
      String(opts.vni),
      "local",
      opts.local,
      "remote",
      opts.remote,
      "dstport",
      String(opts.dstPort ?? 4789),
      "dev",
      opts.dev,
    ]);
    if (opts.addr !== undefined) await this.addAddress(name, opts.addr);
    else await this.ip(["link", "set", name, "up"]);
    return name;
  }

  /** Delete the namespace and every device in it (idempotent, never throws). */
  async delete(): Promise<void> {
    if (this.deleted) return;
    this.deleted = true;
    await ip(["netns", "del", this.name]).catch(() => undefined);
  }
}

/**
 * A unique interface name of at most 15 characters (IFNAMSIZ - 1).
 * @param stem up to 4 characters
 * @returns e.g. "vkt-1a2b3c4d"
 */
export function ifName(stem: string): string {
  return uniqueName(stem.slice(0, 4)).slice(0, 15);
}

/**
 * Create a network namespace with a unique name and its loopback up.
 * @param stem a readable stem, default "vkns"
 * @returns the namespace; delete it in a finally (or use {@link withNetns})
 */
export async function createNetns(stem = "vkns"): Promise<Netns> {
  const ns = new Netns(uniqueName(stem));
  await ip(["netns", "add", ns.name]);
  try {
    await ns.ip(["link", "set", "lo", "up"]);
  } catch (e) {
    await ns.delete();
    throw e;
  }
  return ns;
}

/**
 * Connect two namespaces with a veth pair and give each end an address.
 * @param a one namespace
 * @param b the other
 * @param opts addresses of the a and b ends (checked), optional names
 * @returns the device names in a and in b
 */
export async function addVethPair(
  a: Netns,
  b: Netns,
  opts: { addrA?: string; addrB?: string; nameA?: string; nameB?: string } = {},
): Promise<{ devA: string; devB: string }> {
  const devA = opts.nameA ?? ifName("vkva");
  const devB = opts.nameB ?? ifName("vkvb");
  if (opts.addrA !== undefined) checkTestAddress(opts.addrA);
  if (opts.addrB !== undefined) checkTestAddress(opts.addrB);
  await ip([
    "link",
    "add",
    devA,
    "netns",
    a.name,
    "type",
    "veth",
    "peer",
    "name",
    devB,
    "netns",
    b.name,
  ]);
  if (opts.addrA !== undefined) await a.addAddress(devA, opts.addrA);
  else await a.ip(["link", "set", devA, "up"]);
  if (opts.addrB !== undefined) await b.addAddress(devB, opts.addrB);
  else await b.ip(["link", "set", devB, "up"]);
  return { devA, devB };
}

/**
 * Create `count` namespaces, run `fn`, and delete them all afterwards, even on failure.
 * @param count how many namespaces
 * @param fn the test body
 * @returns what `fn` returns
 */
export async function withNetns<T>(count: number, fn: (ns: Netns[]) => Promise<T>): Promise<T> {
  const list: Netns[] = [];
  try {
    for (let i = 0; i < count; i++) list.push(await createNetns());
    return await fn(list);
  } finally {
    for (const n of list) await n.delete();
  }
}
