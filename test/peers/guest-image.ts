/**
 * A tiny Linux guest for QEMU: Debian's kernel from /boot, and an initramfs (cpio "newc" +
 * gzip, written here in Node, no root or cpio tool needed) holding busybox-static, the virtio
 * modules of the same kernel, and an /init that configures eth0.. from the kernel command line,
 * prints a ready marker on the serial console and then serves commands read from the console.
 *
 * The console protocol (used by test/peers/qemu.ts):
 * - the host writes one line `ID:TIMEOUT_S:COMMAND` (COMMAND is one line for `sh -c`);
 * - the guest answers `@@VK-BEGIN ID`, the command's stdout+stderr, then `@@VK-END ID STATUS`;
 *   the command runs under busybox `timeout -s KILL TIMEOUT_S` with stdin from /dev/null.
 *
 * Kernel command-line parameters read by /init:
 * - `vk.ip=A[+A..][,A[+A..]..]`: addresses (CIDR) of eth0, eth1, ... (`+` joins several for
 *   one interface, `-` leaves one interface without address);
 * - `vk.mods=a,b`: extra modules to load after the virtio-net ones (must be in the image).
 *
 * See docs/testing-peers.md.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdir, open, readFile, readdir, rename, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { promisify } from "node:util";
import { gzipSync, gunzipSync } from "node:zlib";

const execFileP = promisify(execFile);

/** The marker /init prints once the network is configured and the command loop runs. */
export const GUEST_READY_MARKER = "VK-GUEST-READY";

/** The virtio modules, in the order they must be loaded (each depends on the ones before it). */
export const VIRTIO_NET_MODULES: readonly string[] = [
  "virtio_ring",
  "virtio",
  "virtio_pci_modern_dev",
  "virtio_pci_legacy_dev",
  "virtio_pci",
  "failover",
  "net_failover",
  "virtio_net",
];

/** Options for {@link buildGuestImage}. */
export interface GuestImageOptions {
  /** Kernel version (a /lib/modules/<ver> directory), default the newest with a /boot/vmlinuz. */
  readonly kernelVersion?: string;
  /** Modules loaded after {@link VIRTIO_NET_MODULES}, e.g. ["virtio_blk"]. */
  readonly extraModules?: readonly string[];
  /** Cache directory, default `$TMPDIR/vhostkit-guest`. */
  readonly cacheDir?: string;
  /** busybox binary (must be static), default /bin/busybox then /usr/bin/busybox. */
  readonly busybox?: string;
}

/** A built guest: paths for QEMU's `-kernel` and `-initrd`. */
export interface GuestImage {
  readonly kernelVersion: string;
  readonly kernel: string;
  readonly initrd: string;
  /** Module names in the image, in load order. */
  readonly modules: readonly string[];
}

/** One entry of a cpio archive. */
export interface CpioEntry {
  /** Path inside the archive, without a leading "/". */
  readonly name: string;
  /** File type and permission bits, e.g. 0o100755 for an executable file. */
  readonly mode: number;
  /** File contents (files), link target (symlinks); empty for directories and devices. */
  readonly data?: Buffer;
  /** Device major/minor for character and block devices. */
  readonly rdev?: readonly [number, number];
}

/** Mode type bits of a directory (S_IFDIR). */
export const S_IFDIR = 0o040000;
/** Mode type bits of a regular file (S_IFREG). */
export const S_IFREG = 0o100000;
/** Mode type bits of a symbolic link (S_IFLNK). */
export const S_IFLNK = 0o120000;
/** Mode type bits of a character device (S_IFCHR). */
export const S_IFCHR = 0o020000;

function hex8(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`cpio: header field out of range: ${n}`);
  }
  return n.toString(16).padStart(8, "0");
}

function pad4(len: number): Buffer {
  return Buffer.alloc((4 - (len % 4)) % 4);
}

/**
 * Write a cpio archive in the "newc" format (the one the kernel's initramfs unpacker reads).
 * @param entries the entries, parents before children
 * @returns the archive, ending with the TRAILER!!! record
 * @throws RangeError when a field does not fit its 8 hex digits
 */
export function writeCpioNewc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const record = (e: CpioEntry): void => {
    const name = Buffer.from(`${e.name}\0`, "utf8");
    const data = e.data ?? Buffer.alloc(0);
    const isDir = (e.mode & 0o170000) === S_IFDIR;
    const header =
      "070701" +
      hex8(ino++) +
      hex8(e.mode) +
      hex8(0) + // uid
      hex8(0) + // gid
      hex8(isDir ? 2 : 1) + // nlink
      hex8(0) + // mtime: fixed, so the archive is reproducible
      hex8(data.length) +
      hex8(0) + // devmajor
      hex8(0) + // devminor
      hex8(e.rdev?.[0] ?? 0) +
      hex8(e.rdev?.[1] ?? 0) +
      hex8(name.length) +
      hex8(0); // check
    const h = Buffer.from(header, "ascii");
    parts.push(h, name, pad4(h.length + name.length), data, pad4(data.length));
  };
  for (const e of entries) record(e);
  record({ name: "TRAILER!!!", mode: 0 });
  return Buffer.concat(parts);
}

/**
 * The /init script of the guest (busybox sh).
 * @param modules module names in load order (files /lib/modules/NAME.ko)
 * @returns the script text
 */
export function initScript(modules: readonly string[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
for m in ${modules.join(" ")}; do
  insmod /lib/modules/$m.ko || echo "VK-INSMOD-FAILED $m"
done
ips=""
for p in $(cat /proc/cmdline); do
  case "$p" in
    vk.ip=*) ips="\${p#vk.ip=}" ;;
    vk.mods=*) for m in $(echo "\${p#vk.mods=}" | tr ',' ' '); do
        insmod /lib/modules/$m.ko || echo "VK-INSMOD-FAILED $m"; done ;;
  esac
done
ip link set lo up
i=0
for spec in $(echo "$ips" | tr ',' ' '); do
  dev=eth$i
  n=0
  while [ ! -e /sys/class/net/$dev ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
  if [ ! -e /sys/class/net/$dev ]; then echo "VK-NO-DEVICE $dev"; fi
  if [ "$spec" != "-" ]; then
    for a in $(echo "$spec" | tr '+' ' '); do ip addr add "$a" dev $dev; done
  fi
  ip link set $dev up
  n=0
  while [ "$(cat /sys/class/net/$dev/carrier 2>/dev/null)" != 1 ] && [ $n -lt 50 ]; do
    sleep 0.1; n=$((n+1)); done
  [ $n -lt 50 ] || echo "VK-NO-CARRIER $dev"
  i=$((i+1))
done
stty -echo 2>/dev/null
echo "${GUEST_READY_MARKER} $(ls /sys/class/net | tr '\\n' ' ')"
while IFS= read -r line; do
  id="\${line%%:*}"
  rest="\${line#*:}"
  t="\${rest%%:*}"
  cmd="\${rest#*:}"
  echo "@@VK-BEGIN $id"
  timeout -s KILL "$t" sh -c "$cmd" </dev/null 2>&1
  echo "@@VK-END $id $?"
done
echo "VK-CONSOLE-EOF"
poweroff -f
`;
}

/** True when the ELF file at `path` has no PT_INTERP (is statically linked). */
async function isStaticElf(path: string): Promise<boolean> {
  const b = await readFile(path);
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2) return false;
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const off = phoff + i * phentsize;
    if (off + 4 > b.length) return false;
    if (b.readUInt32LE(off) === 3) return false; // PT_INTERP
  }
  return true;
}

/**
 * Pick the guest kernel: the newest /lib/modules/<ver> that has a /boot/vmlinuz-<ver>.
 * @returns the version string
 * @throws Error when none is installed (install linux-image-amd64)
 */
export async function findKernelVersion(): Promise<string> {
  const boots = (await readdir("/boot").catch(() => [] as string[]))
    .filter((f) => f.startsWith("vmlinuz-"))
    .map((f) => f.slice("vmlinuz-".length));
  const mods = new Set(await readdir("/lib/modules").catch(() => [] as string[]));
  const both = boots.filter((v) => mods.has(v));
  both.sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  const v = both[both.length - 1];
  if (v === undefined) {
    throw new Error(
      `guest image: no /boot/vmlinuz-<ver> with /lib/modules/<ver> (found vmlinuz for [${boots.join(", ")}]); install linux-image-amd64`,
    );
  }
  return v;
}

/**
 * Read a kernel module, decompressing .ko.xz / .ko.zst / .ko.gz.
 * @param path the module file
 * @returns the plain ELF module
 */
async function readModule(path: string): Promise<Buffer> {
  if (path.endsWith(".ko")) return readFile(path);
  if (path.endsWith(".ko.gz")) return gunzipSync(await readFile(path));
  const tool = path.endsWith(".ko.xz") ? "xz" : path.endsWith(".ko.zst") ? "zstd" : undefined;
  if (tool === undefined) throw new Error(`guest image: unknown module format ${path}`);
  const { stdout } = await execFileP(tool, ["-dc", path], {
    encoding: "buffer",
    maxBuffer: 64 << 20,
  });
  return stdout;
}

/**
 * Locate modules by name through modules.dep.
 * @param kver the kernel version
 * @param names module names ("virtio_net")
 * @returns name -> absolute path
 * @throws Error naming a module that is not there
 */
async function locateModules(kver: string, names: readonly string[]): Promise<Map<string, string>> {
  const root = join("/lib/modules", kver);
  const dep = await readFile(join(root, "modules.dep"), "utf8");
  const byName = new Map<string, string>();
  for (const line of dep.split("\n")) {
    const rel = line.split(":")[0];
    if (rel === undefined || rel === "") continue;
    const name = basename(rel).replace(/\.ko(\.(xz|zst|gz))?$/, "");
    byName.set(name, join(root, rel));
    byName.set(name.replace(/-/g, "_"), join(root, rel));
  }
  const out = new Map<string, string>();
  for (const n of names) {
    const p = byName.get(n);
    if (p === undefined) throw new Error(`guest image: module ${n} not in ${root}/modules.dep`);
    out.set(n, p);
  }
  return out;
}

/**
 * Build (or reuse from the cache) the guest kernel + initramfs. The cache key is the kernel
 * version plus a hash of the archive inputs, and the file is written atomically, so parallel
 * tests share one image safely.
 * @param opts kernel version, extra modules, cache directory, busybox path
 * @returns the kernel and initrd paths
 * @throws Error when the kernel, a module or a static busybox is missing
 */
export async function buildGuestImage(opts: GuestImageOptions = {}): Promise<GuestImage> {
  const kver = opts.kernelVersion ?? (await findKernelVersion());
  const kernel = join("/boot", `vmlinuz-${kver}`);
  await stat(kernel).catch(() => {
    throw new Error(`guest image: kernel ${kernel} missing; install linux-image-amd64`);
  });
  const modules = [...VIRTIO_NET_MODULES, ...(opts.extraModules ?? [])];
  let busybox = opts.busybox;
  if (busybox === undefined) {
    for (const c of ["/bin/busybox", "/usr/bin/busybox"]) {
      if ((await stat(c).catch(() => undefined)) !== undefined) {
        busybox = c;
        break;
      }
    }
  }
  if (busybox === undefined)
    throw new Error("guest image: busybox missing; install busybox-static");
  if (!(await isStaticElf(busybox))) {
    throw new Error(`guest image: ${busybox} is not statically linked; install busybox-static`);
  }
  const paths = await locateModules(kver, modules);
  const init = initScript(modules);
  const bb = await readFile(busybox);
  const modData: Array<[string, Buffer]> = [];
  for (const m of modules) {
    const p = paths.get(m);
    if (p === undefined) throw new Error(`guest image: module ${m} not located`);
    modData.push([m, await readModule(p)]);
  }
  const h = createHash("sha256").update(init).update(bb);
  for (const [m, d] of modData) h.update(m).update(d);
  const key = h.digest("hex").slice(0, 16);
  const dir = opts.cacheDir ?? join(tmpdir(), "vhostkit-guest");
  const initrd = join(dir, `initramfs-${kver}-${key}.cpio.gz`);
  if ((await stat(initrd).catch(() => undefined)) === undefined) {
    const dirEntry = (name: string): CpioEntry => ({ name, mode: S_IFDIR | 0o755 });
    const entries: CpioEntry[] = [
      ...["bin", "dev", "proc", "sys", "tmp", "run", "etc", "lib", "lib/modules"].map(dirEntry),
      { name: "dev/console", mode: S_IFCHR | 0o600, rdev: [5, 1] },
      { name: "dev/null", mode: S_IFCHR | 0o666, rdev: [1, 3] },
      { name: "dev/ttyS0", mode: S_IFCHR | 0o600, rdev: [4, 64] },
      { name: "bin/busybox", mode: S_IFREG | 0o755, data: bb },
      { name: "bin/sh", mode: S_IFLNK | 0o777, data: Buffer.from("busybox") },
      { name: "init", mode: S_IFREG | 0o755, data: Buffer.from(init, "utf8") },
      ...modData.map(([m, d]) => ({ name: `lib/modules/${m}.ko`, mode: S_IFREG | 0o644, data: d })),
    ];
    const gz = gzipSync(writeCpioNewc(entries), { level: 6 });
    await mkdir(dir, { recursive: true });
    const tmp = `${initrd}.${process.pid}.${Date.now()}.tmp`;
    const fh = await open(tmp, "w");
    try {
      await fh.writeFile(gz);
    } finally {
      await fh.close();
    }
    try {
      await rename(tmp, initrd);
    } catch (e) {
      await rm(tmp, { force: true });
      throw e;
    }
  }
  return { kernelVersion: kver, kernel, initrd, modules };
}
