/**
 * A harness for QEMU 7.2's libvhost-user back-ends as real peers of vhostkit's front-end:
 * `virtiofsd` (virtio-fs, device id 26; package qemu-system-common) and `vhost-user-gpu`
 * (virtio-gpu, device id 16; package qemu-system-gui). Both listen on a Unix socket and serve one
 * front-end; the harness starts one, waits for its socket, keeps its output and its exit status
 * (a libvhost-user back-end exits on requests it does not handle and panics on a closed call
 * fd: the tests assert on both), and stops it.
 *
 * See docs/testing-peers.md.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { accessSync, constants as fsConstants, rmSync } from "node:fs";
import { lstat, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Where Debian 12 installs QEMU's helper binaries. */
export const QEMU_LIBEXEC = "/usr/lib/qemu";
/** virtiofsd of QEMU 7.2 (C, libvhost-user), from qemu-system-common. */
export const VIRTIOFSD = join(QEMU_LIBEXEC, "virtiofsd");
/** vhost-user-gpu of QEMU 7.2 (libvhost-user), from qemu-system-gui. */
export const VHOST_USER_GPU = join(QEMU_LIBEXEC, "vhost-user-gpu");

/**
 * Check that a peer binary is installed and executable.
 * @param path the binary
 * @throws Error naming the binary and the Debian package that ships it
 */
export function assertPeer(path: string): void {
  try {
    accessSync(path, fsConstants.X_OK);
  } catch {
    const pkg = path === VHOST_USER_GPU ? "qemu-system-gui" : "qemu-system-common";
    throw new Error(`${path} is not installed (Debian package ${pkg}; .ci/run installs it)`);
  }
}

/** A running libvhost-user back-end. */
export class LibvhostUserPeer {
  /** stdout and stderr, as they came */
  output = "";
  /** exit code, or null while running / when killed by a signal */
  exitCode: number | null = null;
  /** the signal that ended it, or null */
  exitSignal: NodeJS.Signals | null = null;
  #exited: Promise<void>;
  readonly #onProcessExit = (): void => {
    if (this.running) this.child.kill("SIGKILL");
    try {
      rmSync(this.socketPath, { force: true });
    } catch {
      // gone
    }
  };

  /**
   * @param name for messages
   * @param child the process
   * @param socketPath its listening socket
   */
  constructor(
    readonly name: string,
    readonly child: ChildProcess,
    readonly socketPath: string,
  ) {
    const append = (b: Buffer): void => {
      this.output += b.toString();
      if (this.output.length > 1 << 20) this.output = this.output.slice(-(512 << 10));
    };
    child.stdout?.on("data", append);
    child.stderr?.on("data", append);
    this.#exited = new Promise((resolve) => {
      child.once("exit", (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        process.off("exit", this.#onProcessExit);
        resolve();
      });
    });
    process.on("exit", this.#onProcessExit);
  }

  /** @returns true while the process runs */
  get running(): boolean {
    return this.exitCode === null && this.exitSignal === null;
  }

  /**
   * Wait for the process to end by itself.
   * @param ms give up after this long
   * @returns true when it ended
   */
  async waitExit(ms: number): Promise<boolean> {
    let t: NodeJS.Timeout | null = null;
    const timeout = new Promise<false>((resolve) => {
      t = setTimeout(() => resolve(false), ms);
    });
    const r = await Promise.race([this.#exited.then(() => true as const), timeout]);
    if (t) clearTimeout(t);
    return r;
  }

  /**
   * Assert the process still runs.
   * @throws Error with its output when it has ended
   */
  assertRunning(): void {
    if (!this.running) {
      throw new Error(
        `${this.name} exited (code ${this.exitCode}, signal ${this.exitSignal}):\n${this.output}`,
      );
    }
  }

  /** SIGTERM, then SIGKILL after 2 s; the socket file is removed. */
  async stop(): Promise<void> {
    if (this.running) {
      this.child.kill("SIGTERM");
      if (!(await this.waitExit(2000))) {
        this.child.kill("SIGKILL");
        await this.waitExit(2000);
      }
    }
    await rm(this.socketPath, { force: true });
  }
}

async function waitForSocket(peer: LibvhostUserPeer, ms: number): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if ((await lstat(peer.socketPath)).isSocket()) return;
    } catch {
      // not yet
    }
    peer.assertRunning();
    if (Date.now() > end)
      throw new Error(`${peer.name}: no socket after ${ms} ms:\n${peer.output}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Options of {@link startVirtiofsd}. */
export interface VirtiofsdOptions {
  /** the directory to share */
  source: string;
  /** the socket path (default: a new one under the temporary directory) */
  socketPath?: string;
  /** extra `-o` options, e.g. ["log_level=debug"] */
  extraOptions?: readonly string[];
}

/**
 * Start QEMU 7.2's virtiofsd: `virtiofsd --socket-path=S -o source=DIR -o cache=none
 * -o sandbox=chroot`, and wait for its socket. chroot keeps it out of new namespaces, which a
 * test machine may not allow; the vhost-user side is the same.
 * @param opts the directory, the socket, extra options
 * @returns the running peer
 */
export async function startVirtiofsd(opts: VirtiofsdOptions): Promise<LibvhostUserPeer> {
  assertPeer(VIRTIOFSD);
  const sock = opts.socketPath ?? join(await mkdtemp(join(tmpdir(), "vk-vfs-")), "vfs.sock");
  const args = [
    `--socket-path=${sock}`,
    "-o",
    `source=${opts.source}`,
    "-o",
    "cache=none",
    "-o",
    "sandbox=chroot",
  ];
  for (const o of opts.extraOptions ?? []) args.push("-o", o);
  const child = spawn(VIRTIOFSD, args, { stdio: ["ignore", "pipe", "pipe"] });
  const peer = new LibvhostUserPeer("virtiofsd", child, sock);
  await waitForSocket(peer, 5000);
  return peer;
}

/**
 * Start QEMU 7.2's vhost-user-gpu (`vhost-user-gpu --socket-path=S`) and wait for its socket.
 * @param socketPath the socket (default: a new one under the temporary directory)
 * @returns the running peer
 */
export async function startVhostUserGpu(socketPath?: string): Promise<LibvhostUserPeer> {
  assertPeer(VHOST_USER_GPU);
  const sock = socketPath ?? join(await mkdtemp(join(tmpdir(), "vk-gpu-")), "gpu.sock");
  const child = spawn(VHOST_USER_GPU, [`--socket-path=${sock}`], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const peer = new LibvhostUserPeer("vhost-user-gpu", child, sock);
  await waitForSocket(peer, 5000);
  return peer;
}
