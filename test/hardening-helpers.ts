/**
 * Shared by the hardening tests and the fuzz / soak scripts: a `vhostkit switch` child process
 * (so a crash of the switch cannot take the test runner with it), guests on its ports, frames
 * with a sequence number, and the switch's fd count and RSS from /proc.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { VirtioFeature, featureSet } from "../src/protocol/constants.js";
import { GuestRam } from "../src/frontend/guest-ram.js";
import type { GuestRamOptions } from "../src/frontend/guest-ram.js";
import { VhostUserFrontend } from "../src/frontend/frontend.js";
import type { FrontendQueue } from "../src/frontend/queue.js";
import { parseMac } from "../src/net/frame.js";
import { sleep, until as untilShared } from "./helpers.js";

const here = dirname(fileURLToPath(import.meta.url));
/** bin/vhostkit.js at the repository root (dist/test/ -> ../../bin). */
export const BIN = join(here, "..", "..", "bin", "vhostkit.js");

/**
 * {@link untilShared} with the 8 s bound the hardening tests use.
 * @param cond the condition
 * @param what named in the timeout error
 * @param ms budget
 * @returns when `cond` holds
 */
export function until(cond: () => boolean, what: string, ms = 8000): Promise<void> {
  return untilShared(cond, what, ms);
}

export { sleep };

/** A running `vhostkit switch` child with its stderr collected. */
export class SwitchProcess {
  stderr = "";
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  #exited = false;
  /**
   * @param args switch arguments
   * @param env environment (default: this process's)
   */
  constructor(args: string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(process.execPath, [BIN, "switch", ...args], {
      env,
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.child.stderr?.setEncoding("utf8").on("data", (d: string) => {
      // keep the tail only: a long soak logs a lot
      this.stderr = (this.stderr + d).slice(-1_000_000);
    });
    this.exited = new Promise((resolve) =>
      this.child.once("exit", (code, signal) => {
        this.#exited = true;
        resolve({ code, signal });
      }),
    );
  }
  /** @returns true while the child runs */
  get alive(): boolean {
    return !this.#exited;
  }
  /** Wait for the ready line. */
  async ready(): Promise<void> {
    await until(
      () => this.stderr.includes("vhostkit switch: ready\n") || this.#exited,
      `the ready line (stderr so far: ${this.stderr})`,
    );
    if (this.#exited) throw new Error(`switch exited before ready: ${this.stderr}`);
  }
  /** @returns the number of fds the child holds (/proc/PID/fd) */
  fdCount(): number {
    return readdirSync(`/proc/${this.child.pid}/fd`).length;
  }
  /** @returns the child's resident set size in KiB (/proc/PID/status VmRSS) */
  rssKiB(): number {
    const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${this.child.pid}/status`, "utf8"));
    return m ? Number(m[1]) : -1;
  }
  /**
   * Stop the child (SIGTERM, then SIGKILL after 10 s).
   * @returns its exit code and signal
   */
  async stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (this.#exited) return this.exited;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    const r = await this.exited;
    clearTimeout(timer);
    return r;
  }
}

/** Features the test guests negotiate. */
export const GUEST_FEATURES = featureSet(VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX);

/** A vhostkit front-end as a guest on a switch port, with RX buffers posted. */
export interface TestGuest {
  fe: VhostUserFrontend;
  ram: GuestRam;
  rx: FrontendQueue;
  tx: FrontendQueue;
  close(): void;
}

/**
 * Connect a guest to `path`: negotiate, map `ram`, start RX and TX (128 entries), post RX
 * buffers.
 * @param path port socket
 * @param name memfd name
 * @param ramOptions the guest's memory (default: one 1 MiB region at GPA 0)
 * @param features virtio features (default {@link GUEST_FEATURES})
 * @returns the guest
 */
export async function connectGuest(
  path: string,
  name: string,
  ramOptions: GuestRamOptions = { regions: [{ gpa: 0, size: 1 << 20 }] },
  features = GUEST_FEATURES,
): Promise<TestGuest> {
  const fe = await VhostUserFrontend.connect(path, { timeoutMs: 5000 });
  fe.on("error", () => undefined);
  const ram = GuestRam.create({ ...ramOptions, name: `hardening-${name}` });
  try {
    await fe.negotiate({ features });
    const [rx, tx] = await fe.start(ram, [128, 128]);
    assert.ok(rx && tx);
    rx.postRxBuffers(64);
    return {
      fe,
      ram,
      rx,
      tx,
      close() {
        fe.close();
        ram.close();
      },
    };
  } catch (err) {
    fe.close();
    ram.close();
    throw err;
  }
}

/**
 * An Ethernet frame (EtherType 0x88b5) carrying a 16-bit sequence number at byte 14.
 * @param dst destination MAC
 * @param src source MAC
 * @param seq sequence number
 * @param len frame length (default 100)
 * @returns the frame
 */
export function seqFrame(dst: string, src: string, seq: number, len = 100): Uint8Array {
  const f = new Uint8Array(len);
  f.set(parseMac(dst), 0);
  f.set(parseMac(src), 6);
  f[12] = 0x88;
  f[13] = 0xb5;
  f[14] = seq >> 8;
  f[15] = seq & 0xff;
  return f;
}

/**
 * Send `count` frames from `from` to `to` (known MACs) in batches of at most 32 (fewer than the
 * receiver's posted buffers), waiting for each batch, and return what arrived.
 * @param from sending guest
 * @param to receiving guest
 * @param macs [source MAC, destination MAC]
 * @param count frames to send
 * @param first first sequence number
 * @returns the sequence numbers received
 */
export async function forward(
  from: TestGuest,
  to: TestGuest,
  macs: [string, string],
  count: number,
  first = 0,
): Promise<number[]> {
  const got: number[] = [];
  for (let sent = 0; sent < count;) {
    const batch = Math.min(32, count - sent);
    from.tx.reclaim();
    for (let i = 0; i < batch; i++) {
      assert.notEqual(from.tx.addFrame(seqFrame(macs[1], macs[0], first + sent + i)), null);
    }
    from.tx.kick();
    sent += batch;
    await until(() => {
      const frames = to.rx.receiveFrames();
      for (const f of frames) {
        if (f[12] === 0x88 && f[13] === 0xb5) got.push(((f[14] ?? 0) << 8) | (f[15] ?? 0));
      }
      if (frames.length > 0) to.rx.postRxBuffers(frames.length);
      return got.length >= sent;
    }, `${sent} frames (got ${got.length})`);
  }
  return got;
}
