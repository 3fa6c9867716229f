/**
 * Helpers shared by the test files: an fd snapshot for leak checks and a logger that keeps
 * what it is told.
 */
import { readdirSync, readlinkSync } from "node:fs";
import type { Logger } from "../src/backend/device.js";

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
