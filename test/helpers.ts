/**
 * Helpers shared by the test files: an fd snapshot for leak checks, a logger that keeps what it
 * is told, a Node.js child process started until it says it is ready, and a dirty-log memfd
 * read back here.
 */
import { spawn } from "node:child_process";
import type { ChildProcess } from "node:child_process";
import { readdirSync, readlinkSync } from "node:fs";
import type { TestContext } from "node:test";
import type { Logger } from "../src/backend/device.js";
import { native } from "../src/native.js";

/**
 * The fds open in this process, as /proc/self/fd names, without epoll instances (the addon's
 * and libuv's come and go with watchers and worker threads).
 * @returns the fd numbers as strings
 */
export function openFds(): Set<string> {
  return new Set(
    readdirSync("/proc/self/fd").filter((fd) => {
      try {
        return !readlinkSync(`/proc/self/fd/${fd}`).includes("eventpoll");
      } catch {
        return false; // the directory fd of readdir itself
      }
    }),
  );
}

/** A logger that keeps every line, prefixed D, I, W or E by level. */
export class LineLogger implements Logger {
  readonly lines: string[] = [];
  debug(m: string): void {
    this.lines.push(`D ${m}`);
  }
  info(m: string): void {
    this.lines.push(`I ${m}`);
  }
  warn(m: string): void {
    this.lines.push(`W ${m}`);
  }
  error(m: string): void {
    this.lines.push(`E ${m}`);
  }
  /**
   * @param re what to look for
   * @returns true when a line kept so far matches
   */
  has(re: RegExp): boolean {
    return this.lines.some((l) => re.test(l));
  }
}

/**
 * Start `node ARGS` and wait until its stdout or stderr matches `wait`; the child is ended
 * (stdin closed, SIGTERM) when the test ends.
 * @param t the test that owns the child
 * @param args the arguments after the Node.js executable
 * @param wait what the child prints once it is ready
 * @returns the child
 * @throws Error when the child exits or says nothing matching within 10 s
 */
export async function startChild(
  t: TestContext,
  args: string[],
  wait: RegExp,
): Promise<ChildProcess> {
  const child = spawn(process.execPath, args, { stdio: ["pipe", "pipe", "pipe"] });
  t.after(() => {
    child.stdin?.end();
    child.kill("SIGTERM");
  });
  await new Promise<void>((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`child not ready: ${out}`)), 10_000);
    const on = (b: Buffer): void => {
      out += b.toString();
      if (wait.test(out)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on("data", on);
    child.stderr?.on("data", on);
    child.once("exit", (code) => reject(new Error(`child exited ${code}: ${out}`)));
  });
  return child;
}

/**
 * Wait `ms` milliseconds.
 * @param ms the delay
 * @returns when the time has passed
 */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Poll `cond` every 5 ms until it holds.
 * @param cond the condition
 * @param what what is awaited, for the error
 * @param ms the bound, default 5 s
 * @throws Error "timed out waiting for WHAT" when `cond` does not hold within `ms`
 */
export async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A dirty-log memfd mapped here too, to read what the back-end marked. */
export class LogFile {
  readonly fd: number;
  readonly bytes: Uint8Array;
  readonly #buf: ArrayBuffer;
  /**
   * @param size the log's size in bytes (what SET_LOG_BASE announces)
   * @param mapped bytes of memfd behind it (default `size`; at least one page)
   */
  constructor(
    readonly size: number,
    mapped = size,
  ) {
    this.fd = native.memfdCreate("vk-test-log");
    const len = Math.max(mapped, 4096);
    native.ftruncate(this.fd, len);
    this.#buf = native.mmap(this.fd, 0, len, true);
    this.bytes = new Uint8Array(this.#buf);
  }

  /**
   * @param gpa a guest physical address
   * @returns true when the bit of its 4 KiB page is set
   */
  dirty(gpa: number): boolean {
    const page = Math.floor(gpa / 4096);
    return ((this.bytes[page >> 3] as number) & (1 << (page & 7))) !== 0;
  }

  /** @returns the pages whose bit is set, within the log's size */
  pages(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.size; i++) {
      const b = this.bytes[i] as number;
      for (let bit = 0; bit < 8; bit++) if (b & (1 << bit)) out.push(i * 8 + bit);
    }
    return out;
  }

  /** Clear every bit within the log's size. */
  clear(): void {
    this.bytes.fill(0, 0, this.size);
  }

  /** Unmap and close the memfd. */
  close(): void {
    native.munmap(this.#buf);
    native.close(this.fd);
  }
}
