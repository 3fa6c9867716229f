/**
 * Tests of the native addon (native/*.c) through its typed surface src/native.ts.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { Worker } from "node:worker_threads";
import fc from "fast-check";
import {
  isNativeError,
  native,
  POLL_READABLE,
  POLL_WRITABLE,
  type NativeError,
} from "../src/native.js";
import {
  childPattern,
  FDPASS_EVENT_VALUE,
  FDPASS_TEXT,
  parentPattern,
} from "./fixtures/native-patterns.js";

const PAGE = native.pageSize();
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

const tmpRoot = fs.mkdtempSync(path.join(os.tmpdir(), "vhostkit-native-"));
after(() => fs.rmSync(tmpRoot, { recursive: true, force: true }));

/** A fresh socket path in the test's temp dir. */
function socketPath(name: string): string {
  return path.join(tmpRoot, `${name}-${process.hrtime.bigint()}.sock`);
}

function fixture(name: string): string {
  return fileURLToPath(new URL(`./fixtures/${name}.js`, import.meta.url));
}

/** Asserts that fn throws a NativeError with this code and syscall; returns it. */
function throwsNative(fn: () => unknown, code: string, syscall: string): NativeError {
  let caught: unknown;
  try {
    fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(isNativeError(caught), `expected a NativeError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  assert.equal(caught.syscall, syscall, caught.message);
  if (code === "EINVAL_ARG") {
    assert.equal(caught.errno, 0);
  } else {
    assert.ok(caught.errno > 0);
    assert.match(caught.message, new RegExp(`^${syscall} failed: ${code} \\(.+\\)$`));
  }
  return caught;
}

function fdFlags(fd: number): number {
  const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8");
  const match = /^flags:\s+([0-7]+)$/m.exec(info);
  assert.ok(match?.[1] !== undefined, `no flags in fdinfo of ${fd}`);
  return parseInt(match[1], 8);
}

/** fd number -> link target, without the directory fd that listing /proc/self/fd opens. */
function openFds(): Map<string, string> {
  const result = new Map<string, string>();
  for (const entry of fs.readdirSync("/proc/self/fd")) {
    try {
      result.set(entry, fs.readlinkSync(`/proc/self/fd/${entry}`));
    } catch {
      // the listing's own directory fd, already closed
    }
  }
  return result;
}

function memfdMappings(name = ""): number {
  return fs
    .readFileSync("/proc/self/maps", "utf8")
    .split("\n")
    .filter((line) => line.includes(`memfd:${name}`)).length;
}

/** Resolves with the events of the first callback of a watcher on fd, then closes it. */
function nextEvent(fd: number, events: number, timeoutMs = 5000): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      watcher.close();
      reject(new Error(`fd ${fd} not ready within ${timeoutMs} ms`));
    }, timeoutMs);
    const watcher = new native.FdWatcher(fd, (ready, error) => {
      clearTimeout(timer);
      watcher.close();
      if (error !== null) reject(error);
      else resolve(ready);
    });
    watcher.start(events);
  });
}

function gcFunction(): () => void {
  setFlagsFromString("--expose-gc");
  return runInNewContext("gc") as () => void;
}

async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** Lines of a child's stdout, one at a time. */
function lineReader(child: ChildProcess): () => Promise<string> {
  assert.ok(child.stdout !== null);
  const pending: string[] = [];
  const waiters: ((line: string) => void)[] = [];
  createInterface({ input: child.stdout }).on("line", (line) => {
    const waiter = waiters.shift();
    if (waiter !== undefined) waiter(line);
    else pending.push(line);
  });
  return () => {
    const line = pending.shift();
    if (line !== undefined) return Promise.resolve(line);
    return new Promise((resolve) => waiters.push(resolve));
  };
}

async function exitCode(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null) return child.exitCode;
  const [code] = (await once(child, "exit")) as [number | null];
  return code;
}

describe("fds, pipes and eventfds", () => {
  it("pipe, write, read, EOF and EAGAIN", () => {
    const [r, w] = native.pipe(true);
    const data = new TextEncoder().encode("hello pipe");
    assert.equal(native.write(w, data, 0, data.length), data.length);
    const buf = new Uint8Array(32);
    assert.equal(native.read(r, buf, 4, 5), 5);
    assert.deepEqual(buf.subarray(4, 9), data.subarray(0, 5));
    assert.equal(native.read(r, buf, 0, 32), 5);
    assert.deepEqual(buf.subarray(0, 5), data.subarray(5));
    assert.equal(native.read(r, buf, 0, 32), null, "empty non-blocking pipe gives null");
    native.close(w);
    assert.equal(native.read(r, buf, 0, 32), 0, "EOF after the writer closed");
    native.close(r);
  });

  it("pipe flags, setNonBlocking and dup (O_CLOEXEC)", () => {
    const [r, w] = native.pipe(false);
    assert.equal(fdFlags(r) & O_NONBLOCK, 0);
    assert.equal(fdFlags(r) & O_CLOEXEC, O_CLOEXEC);
    native.setNonBlocking(r, true);
    assert.equal(fdFlags(r) & O_NONBLOCK, O_NONBLOCK);
    assert.equal(native.read(r, new Uint8Array(4), 0, 4), null);
    native.setNonBlocking(r, false);
    assert.equal(fdFlags(r) & O_NONBLOCK, 0);
    const w2 = native.dup(w);
    assert.notEqual(w2, w);
    assert.equal(fdFlags(w2) & O_CLOEXEC, O_CLOEXEC);
    native.close(w);
    assert.equal(native.write(w2, Uint8Array.of(7), 0, 1), 1, "the dup still writes");
    const buf = new Uint8Array(1);
    assert.equal(native.read(r, buf, 0, 1), 1);
    assert.equal(buf[0], 7);
    native.close(w2);
    native.close(r);
  });

  it("close of a closed fd is EBADF; write to a pipe without reader is EPIPE", () => {
    const [r, w] = native.pipe(true);
    native.close(r);
    throwsNative(() => native.close(r), "EBADF", "close");
    throwsNative(() => native.write(w, Uint8Array.of(1), 0, 1), "EPIPE", "write");
    native.close(w);
    throwsNative(() => native.dup(w), "EBADF", "fcntl");
    throwsNative(() => native.setNonBlocking(w, true), "EBADF", "fcntl");
    throwsNative(() => native.read(w, new Uint8Array(1), 0, 1), "EBADF", "read");
  });

  it("eventfd counts, reads as bigint, and reports a full counter", () => {
    const efd = native.eventfd(2);
    assert.equal(fdFlags(efd) & (O_NONBLOCK | O_CLOEXEC), O_NONBLOCK | O_CLOEXEC);
    assert.equal(native.eventfdWrite(efd), true);
    assert.equal(native.eventfdWrite(efd, 3), true);
    assert.equal(native.eventfdWrite(efd, 4n), true);
    assert.equal(native.eventfdRead(efd), 10n);
    assert.equal(native.eventfdRead(efd), null, "zero counter reads as null");
    const max = 2n ** 64n - 2n;
    assert.equal(native.eventfdWrite(efd, max), true);
    assert.equal(native.eventfdWrite(efd, 1), false, "full counter gives false");
    assert.equal(native.eventfdRead(efd), max);
    throwsNative(() => native.eventfdWrite(efd, 2n ** 64n - 1n), "EINVAL_ARG", "eventfdWrite");
    throwsNative(() => native.eventfdWrite(efd, 0), "EINVAL_ARG", "eventfdWrite");
    native.close(efd);
    throwsNative(() => native.eventfdRead(efd), "EBADF", "read");
    throwsNative(() => native.eventfdWrite(efd, 1), "EBADF", "write");
  });
});

describe("memfd and mmap", () => {
  it("memfd + ftruncate + fstatSize", () => {
    const fd = native.memfdCreate("vk-size");
    assert.match(fs.readlinkSync(`/proc/self/fd/${fd}`), /^\/memfd:vk-size/);
    assert.equal(fdFlags(fd) & O_CLOEXEC, O_CLOEXEC);
    assert.equal(native.fstatSize(fd), 0);
    native.ftruncate(fd, 3 * PAGE + 5);
    assert.equal(native.fstatSize(fd), 3 * PAGE + 5);
    native.close(fd);
    throwsNative(() => native.fstatSize(fd), "EBADF", "fstat");
    throwsNative(() => native.ftruncate(fd, 1), "EBADF", "ftruncate");
  });

  it("writes through one mapping are seen by a second mapping at an offset", () => {
    const fd = native.memfdCreate("vk-two-maps");
    native.ftruncate(fd, 4 * PAGE);
    const whole = native.mmap(fd, 0, 4 * PAGE, true);
    const tail = native.mmap(fd, 2 * PAGE, 2 * PAGE, false);
    assert.equal(whole.byteLength, 4 * PAGE);
    assert.equal(tail.byteLength, 2 * PAGE);
    // LIFETIME: the views are dropped before the buffers are unmapped at the end.
    const w = new Uint8Array(whole);
    const t = new Uint8Array(tail);
    for (let i = 0; i < 2 * PAGE; i++) w[2 * PAGE + i] = parentPattern(i);
    for (let i = 0; i < 2 * PAGE; i++) assert.equal(t[i], parentPattern(i));
    // through a third, writable mapping at the same offset, back into the first
    const third = native.mmap(fd, 2 * PAGE, PAGE, true);
    new Uint8Array(third).fill(0xab);
    assert.equal(w[2 * PAGE], 0xab);
    assert.equal(w[3 * PAGE - 1], 0xab);
    assert.equal(w[3 * PAGE], parentPattern(PAGE));
    for (const buffer of [whole, tail, third]) native.munmap(buffer);
    native.close(fd);
  });

  it("munmap unmaps now, detaches, and is idempotent", () => {
    const fd = native.memfdCreate("vk-munmap");
    native.ftruncate(fd, PAGE);
    const before = memfdMappings("vk-munmap");
    const buffer = native.mmap(fd, 0, PAGE, true);
    const view = new Uint8Array(buffer);
    view[0] = 1;
    assert.equal(memfdMappings("vk-munmap"), before + 1);
    native.munmap(buffer);
    assert.equal(buffer.byteLength, 0);
    assert.equal(view.length, 0, "views see a detached buffer");
    assert.equal(view[0], undefined);
    assert.equal(memfdMappings("vk-munmap"), before);
    native.munmap(buffer);
    native.munmap(buffer);
    assert.equal(buffer.byteLength, 0);
    // a detached view is refused as a data source of length > 0, never read
    throwsNative(() => native.write(1, view, 0, 1), "EINVAL_ARG", "write");
    native.close(fd);
  });

  it("munmap refuses buffers that mmap did not make", () => {
    throwsNative(() => native.munmap(new ArrayBuffer(16)), "EINVAL_ARG", "munmap");
    const detached = new ArrayBuffer(8);
    structuredClone(detached, { transfer: [detached] });
    throwsNative(() => native.munmap(detached), "EINVAL_ARG", "munmap");
    throwsNative(
      () => native.munmap(new Uint8Array(4) as unknown as ArrayBuffer),
      "EINVAL_ARG",
      "munmap",
    );
  });

  it("mmap checks offset, length and fd", () => {
    const fd = native.memfdCreate("vk-mmap-args");
    native.ftruncate(fd, 2 * PAGE);
    const unaligned = throwsNative(() => native.mmap(fd, 100, PAGE, true), "EINVAL_ARG", "mmap");
    assert.match(unaligned.message, /offset .*page size.* got 100$/);
    const zero = throwsNative(() => native.mmap(fd, 0, 0, true), "EINVAL_ARG", "mmap");
    assert.match(zero.message, /length .* got 0$/);
    throwsNative(() => native.mmap(fd, -PAGE, PAGE, true), "EINVAL_ARG", "mmap");
    throwsNative(() => native.mmap(fd, 0, PAGE, 1 as unknown as boolean), "EINVAL_ARG", "mmap");
    throwsNative(() => native.mmap(-1, 0, PAGE, true), "EINVAL_ARG", "mmap");
    native.close(fd);
    throwsNative(() => native.mmap(fd, 0, PAGE, true), "EBADF", "mmap");
    const [r, w] = native.pipe(true);
    throwsNative(() => native.mmap(r, 0, PAGE, false), "ENODEV", "mmap");
    native.close(r);
    native.close(w);
  });

  it("a mapping dropped without munmap is unmapped after garbage collection", async () => {
    const gc = gcFunction();
    const fd = native.memfdCreate("vk-gc-unmap");
    native.ftruncate(fd, PAGE);
    for (let i = 0; i < 20; i++) new Uint8Array(native.mmap(fd, 0, PAGE, true))[0] = i;
    native.close(fd);
    assert.equal(memfdMappings("vk-gc-unmap"), 20);
    for (let i = 0; i < 10 && memfdMappings("vk-gc-unmap") > 0; i++) {
      gc();
      await settle();
    }
    assert.equal(memfdMappings("vk-gc-unmap"), 0);
  });

  it("two processes that map one memfd see each other's writes", { timeout: 20000 }, async () => {
    const fd = native.memfdCreate("vk-shared");
    native.ftruncate(fd, 2 * PAGE);
    const child = spawn(process.execPath, [fixture("native-memfd-child")], {
      stdio: ["pipe", "pipe", "inherit", fd],
    });
    try {
      const nextLine = lineReader(child);
      assert.equal(await nextLine(), "child-wrote");
      const first = native.mmap(fd, 0, PAGE, false);
      const second = native.mmap(fd, PAGE, PAGE, true);
      const seen = new Uint8Array(first);
      for (let i = 0; i < PAGE; i++) assert.equal(seen[i], childPattern(i), `byte ${i}`);
      const mine = new Uint8Array(second);
      for (let i = 0; i < PAGE; i++) mine[i] = parentPattern(i);
      child.stdin?.write("parent-wrote\n");
      assert.equal(await nextLine(), "child-saw-parent");
      child.stdin?.end();
      assert.equal(await exitCode(child), 0);
      native.munmap(first);
      native.munmap(second);
    } finally {
      child.kill();
      native.close(fd);
    }
  });
});

describe("Unix sockets and fd passing", () => {
  it("sendmsg/recvmsg with 0, 1 and 8 fds; received fds work", () => {
    const [a, b] = native.socketpair();
    const buf = new Uint8Array(64);
    for (const count of [0, 1, 8]) {
      const eventfds = Array.from({ length: count }, () => native.eventfd(0));
      const data = new TextEncoder().encode(`message with ${count} fds`);
      assert.equal(native.sendmsg(a, data, 0, data.length, eventfds), data.length);
      const message = native.recvmsg(b, buf, 0, buf.length);
      assert.ok(message !== null);
      assert.equal(message.bytes, data.length);
      assert.deepEqual(buf.subarray(0, data.length), data);
      assert.equal(message.fdsTruncated, false);
      assert.equal(message.fds.length, count);
      message.fds.forEach((fd, i) => {
        assert.ok(!eventfds.includes(fd), "received fds are new fds");
        assert.equal(fdFlags(fd) & O_CLOEXEC, O_CLOEXEC, "received fds are O_CLOEXEC");
        native.eventfdWrite(fd, i + 1);
        native.close(fd);
      });
      eventfds.forEach((fd, i) => {
        assert.equal(native.eventfdRead(fd), BigInt(i + 1));
        native.close(fd);
      });
    }
    native.close(a);
    native.close(b);
  });

  it("9 fds are an argument error, and nothing is sent", () => {
    const [a, b] = native.socketpair();
    const fds = Array.from({ length: 9 }, () => a);
    const err = throwsNative(
      () => native.sendmsg(a, Uint8Array.of(1), 0, 1, fds),
      "EINVAL_ARG",
      "sendmsg",
    );
    assert.match(err.message, /fds .*at most 8/);
    assert.equal(native.recvmsg(b, new Uint8Array(4), 0, 4), null);
    native.close(a);
    native.close(b);
  });

  it("EAGAIN is null both ways; peer close gives 0 bytes; shutdown", () => {
    const [a, b] = native.socketpair();
    const buf = new Uint8Array(65536);
    assert.equal(native.recvmsg(b, buf, 0, buf.length), null, "empty socket");
    let sent = 0;
    for (;;) {
      const n = native.sendmsg(a, buf, 0, buf.length, []);
      if (n === null) break;
      sent += n;
      assert.ok(sent < 64 * 1024 * 1024, "the socket buffer never fills");
    }
    assert.ok(sent > 0);
    let received = 0;
    for (;;) {
      const message = native.recvmsg(b, buf, 0, buf.length);
      if (message === null) break;
      received += message.bytes;
    }
    assert.equal(received, sent);
    native.close(a);
    const eof = native.recvmsg(b, buf, 0, buf.length);
    assert.deepEqual(eof, { bytes: 0, fds: [], fdsTruncated: false });
    native.close(b);

    const [c, d] = native.socketpair();
    native.shutdown(c);
    assert.equal(native.recvmsg(d, buf, 0, 16)?.bytes, 0);
    throwsNative(() => native.sendmsg(c, buf, 0, 1, []), "EPIPE", "sendmsg");
    native.close(c);
    native.close(d);
    throwsNative(() => native.shutdown(c), "EBADF", "shutdown");
  });

  it("more than 8 fds from a peer: the first 8 are kept and the rest closed", () => {
    // The addon's sendmsg sends at most 8 fds, so the 11-fd sender is python3 (>= 3.9 for
    // socket.send_fds): a hard dependency, as for node-gyp, which needs python3 too.
    const python = spawnSync("python3", ["-c", "import socket; socket.send_fds"]);
    assert.equal(
      python.status,
      0,
      `python3 with socket.send_fds is required (node-gyp needs python3 too): ${String(python.error ?? python.stderr)}`,
    );
    const [a, b] = native.socketpair();
    const fdsBefore = openFds();
    const sender = spawnSync(
      "python3",
      [
        "-c",
        "import os, socket\n" +
          "s = socket.socket(fileno=3)\n" +
          "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(11)]\n" +
          "socket.send_fds(s, [b'x'], fds)\n",
      ],
      { stdio: ["ignore", "inherit", "inherit", a], timeout: 10000 },
    );
    assert.equal(sender.status, 0);
    const message = native.recvmsg(b, new Uint8Array(4), 0, 4);
    assert.ok(message !== null);
    assert.equal(message.bytes, 1);
    assert.equal(message.fds.length, 8);
    assert.equal(message.fdsTruncated, true);
    const fdsAfter = openFds();
    const added = [...fdsAfter.keys()].filter((fd) => !fdsBefore.has(fd));
    assert.deepEqual(added.map(Number).sort(), [...message.fds].sort(), "the surplus was closed");
    for (const fd of message.fds) {
      assert.equal(fdsAfter.get(String(fd)), "/dev/null");
      native.close(fd);
    }
    native.close(a);
    native.close(b);
  });

  it("unixListen, unixConnect, unixAccept", () => {
    const p = socketPath("listen");
    const listener = native.unixListen(p, 4);
    assert.ok(fs.statSync(p).isSocket());
    assert.equal(native.unixAccept(listener), null, "no pending connection");
    const client = native.unixConnect(p);
    assert.equal(fdFlags(client) & (O_NONBLOCK | O_CLOEXEC), O_NONBLOCK | O_CLOEXEC);
    const server = native.unixAccept(listener);
    assert.ok(server !== null);
    assert.equal(fdFlags(server) & (O_NONBLOCK | O_CLOEXEC), O_NONBLOCK | O_CLOEXEC);
    assert.equal(native.sendmsg(client, Uint8Array.of(9, 8), 0, 2, []), 2);
    const buf = new Uint8Array(2);
    assert.equal(native.recvmsg(server, buf, 0, 2)?.bytes, 2);
    assert.deepEqual(buf, Uint8Array.of(9, 8));
    throwsNative(() => native.unixListen(p, 4), "EADDRINUSE", "bind");
    for (const fd of [client, server, listener]) native.close(fd);
    throwsNative(() => native.unixConnect(p), "ECONNREFUSED", "connect");
    fs.unlinkSync(p);
    throwsNative(() => native.unixConnect(p), "ENOENT", "connect");
    throwsNative(() => native.unixAccept(listener), "EBADF", "accept4");
    const long = path.join(tmpRoot, "x".repeat(120));
    const err = throwsNative(() => native.unixListen(long, 1), "EINVAL_ARG", "unixListen");
    assert.match(err.message, /path must be 1 to 107 UTF-8 bytes/);
  });

  it("fds sent to another process work there", { timeout: 20000 }, async () => {
    const p = socketPath("fdpass");
    const listener = native.unixListen(p, 1);
    const efd = native.eventfd(0);
    const memfd = native.memfdCreate("vk-fdpass");
    native.ftruncate(memfd, PAGE);
    const child = spawn(process.execPath, [fixture("native-fdpass-child"), p], {
      stdio: ["ignore", "inherit", "inherit"],
    });
    let conn: number | null = null;
    try {
      assert.equal(await nextEvent(listener, POLL_READABLE), POLL_READABLE);
      conn = native.unixAccept(listener);
      assert.ok(conn !== null);
      assert.equal(native.sendmsg(conn, Uint8Array.of(1), 0, 1, [efd, memfd]), 1);
      await nextEvent(conn, POLL_READABLE);
      const ack = new Uint8Array(1);
      assert.equal(native.recvmsg(conn, ack, 0, 1)?.bytes, 1);
      assert.equal(ack[0], "k".charCodeAt(0));
      assert.equal(await exitCode(child), 0);
      assert.equal(native.eventfdRead(efd), FDPASS_EVENT_VALUE);
      const mapping = native.mmap(memfd, 0, PAGE, false);
      const text = new TextDecoder().decode(new Uint8Array(mapping, 0, FDPASS_TEXT.length));
      native.munmap(mapping);
      assert.equal(text, FDPASS_TEXT);
    } finally {
      child.kill();
      for (const fd of [conn, listener, efd, memfd]) if (fd !== null) native.close(fd);
    }
  });
});

describe("FdWatcher", () => {
  it("an eventfd write wakes a watcher in the main thread", async () => {
    const efd = native.eventfd(0);
    const woken = nextEvent(efd, POLL_READABLE);
    native.eventfdWrite(efd, 5);
    assert.equal(await woken, POLL_READABLE);
    assert.equal(native.eventfdRead(efd), 5n);
    native.close(efd);
  });

  it("a socket watched for writability reports POLL_WRITABLE", async () => {
    const [a, b] = native.socketpair();
    assert.equal(await nextEvent(a, POLL_READABLE | POLL_WRITABLE), POLL_WRITABLE);
    native.close(a);
    native.close(b);
  });

  it("fires again while the fd stays ready (re-armed), and not after stop", async () => {
    const efd = native.eventfd(1);
    let calls = 0;
    const watcher = new native.FdWatcher(efd, () => {
      calls++;
      if (calls === 3) watcher.stop();
    });
    watcher.start(POLL_READABLE);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(calls, 3);
    watcher.start(POLL_READABLE);
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.ok(calls > 3, "restarted");
    watcher.close();
    const frozen = calls;
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(calls, frozen);
    native.close(efd);
  });

  it("an eventfd write wakes a watcher in a worker thread", { timeout: 20000 }, async () => {
    const efd = native.eventfd(0);
    const worker = new Worker(new URL("./fixtures/native-watcher-worker.js", import.meta.url), {
      workerData: { fd: efd, mode: "wake" },
    });
    try {
      const [ready] = (await once(worker, "message")) as [unknown];
      assert.equal(ready, "ready");
      native.eventfdWrite(efd, 7);
      const [message] = (await once(worker, "message")) as [unknown];
      assert.deepEqual(message, { woken: "7" });
      const [code] = (await once(worker, "exit")) as [number];
      assert.equal(code, 0, "the worker ends once its watcher is closed");
    } finally {
      await worker.terminate();
      native.close(efd);
    }
  });

  it("terminating a worker with a started watcher and a live mapping is clean", async () => {
    const efd = native.eventfd(0);
    const before = memfdMappings("worker-abandon");
    const worker = new Worker(new URL("./fixtures/native-watcher-worker.js", import.meta.url), {
      workerData: { fd: efd, mode: "abandon" },
    });
    const [ready] = (await once(worker, "message")) as [unknown];
    assert.equal(ready, "ready");
    assert.equal(memfdMappings("worker-abandon"), before + 1);
    await worker.terminate();
    assert.equal(memfdMappings("worker-abandon"), before, "the worker's mapping was unmapped");
    native.eventfdWrite(efd, 1);
    await settle();
    native.close(efd);
  });

  it("a started watcher keeps the loop alive, a stopped one does not", async () => {
    for (const mode of ["stop", "keep"]) {
      const child = spawn(process.execPath, [fixture("native-liveness-child"), mode], {
        stdio: ["ignore", "pipe", "inherit"],
      });
      const nextLine = lineReader(child);
      assert.equal(await nextLine(), "started");
      const exited = exitCode(child);
      const timeout = new Promise<"alive">((resolve) => setTimeout(() => resolve("alive"), 1000));
      const outcome = await Promise.race([exited, timeout]);
      if (mode === "stop") assert.equal(outcome, 0, "exits by itself once the watcher stopped");
      else assert.equal(outcome, "alive", "a started watcher keeps the process alive");
      child.kill();
      await exited;
    }
  });

  it("close is idempotent; start after close throws; stop is harmless", () => {
    const efd = native.eventfd(0);
    const watcher = new native.FdWatcher(efd, () => assert.fail("never called"));
    watcher.stop();
    watcher.start(POLL_READABLE);
    watcher.close();
    watcher.close();
    watcher.stop();
    throwsNative(() => watcher.start(POLL_READABLE), "EBADF", "FdWatcher.start");
    native.close(efd);
  });

  it("a watcher on a closed fd reports an error or nothing, never crashes", async () => {
    const seen: (string | number)[] = [];
    const record = (events: number, error: NativeError | null): void => {
      seen.push(error?.code ?? events);
    };
    // closed before the watcher exists
    const [r0, w0] = native.pipe(true);
    native.close(r0);
    throwsNative(() => new native.FdWatcher(r0, record), "EBADF", "fcntl");
    // closed between construction and start
    const [r1, w1] = native.pipe(true);
    const early = new native.FdWatcher(r1, record);
    native.close(r1);
    throwsNative(() => early.start(POLL_READABLE), "EBADF", "epoll_ctl");
    // closed right after start, in the same tick (uv_poll_t would abort here)
    const [r2, w2] = native.pipe(true);
    const late = new native.FdWatcher(r2, record);
    late.start(POLL_READABLE);
    native.close(r2);
    // closed while a dup keeps the pipe open: one event, then the re-arm fails
    const [r3, w3] = native.pipe(true);
    const dupOfR3 = native.dup(r3);
    const dupped = new native.FdWatcher(r3, record);
    dupped.start(POLL_READABLE);
    native.close(r3);
    native.write(w3, Uint8Array.of(1), 0, 1);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(seen, [POLL_READABLE, "EBADF"]);
    for (const w of [early, late, dupped]) w.close();
    for (const fd of [w0, w1, w2, w3, dupOfR3]) native.close(fd);
  });

  it("unclosed watchers that are garbage collected do not crash", async () => {
    const gc = gcFunction();
    for (let i = 0; i < 200; i++) {
      const [r, w] = native.pipe(true);
      const watcher = new native.FdWatcher(r, () => undefined);
      if (i % 2 === 0) {
        watcher.start(POLL_READABLE | POLL_WRITABLE);
        watcher.stop();
      }
      native.close(r);
      native.close(w);
    }
    gc();
    await settle();
    gc();
    await settle();
    const efd = native.eventfd(0);
    const woken = nextEvent(efd, POLL_READABLE);
    native.eventfdWrite(efd, 1);
    assert.equal(await woken, POLL_READABLE, "watchers still work after the collection");
    native.close(efd);
  });

  it("a throwing callback is reported as an uncaught exception", async () => {
    const efd = native.eventfd(1);
    const listeners = process.listeners("uncaughtException");
    process.removeAllListeners("uncaughtException");
    const caught = new Promise<unknown>((resolve) => process.once("uncaughtException", resolve));
    const watcher = new native.FdWatcher(efd, () => {
      watcher.close();
      throw new Error("thrown from a watcher callback");
    });
    watcher.start(POLL_READABLE);
    try {
      const err = await caught;
      assert.ok(err instanceof Error);
      assert.equal(err.message, "thrown from a watcher callback");
    } finally {
      for (const listener of listeners) process.on("uncaughtException", listener);
      native.close(efd);
    }
  });
});

describe("no leaks", () => {
  it(
    "10,000 cycles leave /proc/self/fd and memfd mappings as they were",
    { timeout: 20000 },
    () => {
      const p = socketPath("leak");
      const missing = socketPath("missing");
      const buf = new Uint8Array(16);
      const cycle = (): void => {
        const [a, b] = native.socketpair();
        const passed = native.eventfd(0);
        native.sendmsg(a, Uint8Array.of(1), 0, 1, [passed]);
        const message = native.recvmsg(b, buf, 0, buf.length);
        for (const fd of message?.fds ?? []) native.close(fd);
        native.close(passed);
        native.close(a);
        native.close(b);

        const memfd = native.memfdCreate("vk-leak");
        native.ftruncate(memfd, PAGE);
        const mapping = native.mmap(memfd, 0, PAGE, true);
        new Uint8Array(mapping)[0] = 1;
        native.munmap(mapping);
        native.close(memfd);

        const efd = native.eventfd(0);
        native.eventfdWrite(efd, 1);
        native.eventfdRead(efd);
        native.close(efd);

        const listener = native.unixListen(p, 1);
        const client = native.unixConnect(p);
        const server = native.unixAccept(listener);
        if (server !== null) native.close(server);
        native.close(client);
        native.close(listener);
        fs.unlinkSync(p);
        assert.throws(() => native.unixConnect(missing), { code: "ENOENT" });
      };
      cycle(); // warm-up: lazily opened fds of the runtime, if any
      const fdsBefore = openFds();
      const mapsBefore = memfdMappings();
      for (let i = 0; i < 10000; i++) cycle();
      assert.deepEqual(openFds(), fdsBefore);
      assert.ok(memfdMappings() <= mapsBefore, "no memfd mapping left behind");
    },
  );
});

/* ------------------------------------------------------------------------------------------ */
/* Argument checks: every parameter of every function, with values of every wrong kind.       */

type Kind =
  | "fd"
  | "size"
  | "offset"
  | "bufOffset"
  | "bufLength"
  | "recvLength"
  | "bool"
  | "bytes"
  | "name"
  | "path"
  | "fdArray"
  | "initval"
  | "backlog"
  | "eventValue"
  | "events"
  | "callback"
  | "mmapBuffer";

interface Param {
  kind: Kind;
  valid: () => unknown;
}

interface Target {
  /** the syscall field of the argument errors */
  name: string;
  call: (args: unknown[]) => unknown;
  params: Param[];
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const isInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v);
const utf8Length = (s: string): number => new TextEncoder().encode(s).length;

/** Whether a value is acceptable for a kind (used to filter generated values). */
function acceptable(kind: Kind, v: unknown): boolean {
  switch (kind) {
    case "fd":
      return isInt(v) && v >= 0 && v <= 2 ** 31 - 1;
    case "size":
    case "offset":
      return isInt(v) && v >= 0 && v <= MAX_SAFE;
    case "bufOffset":
      return isInt(v) && v >= 0 && v <= 15;
    case "bufLength":
      return isInt(v) && v >= 0 && v <= 16;
    case "recvLength":
      return isInt(v) && v >= 1 && v <= 16;
    case "bool":
      return typeof v === "boolean";
    case "bytes":
      return v instanceof Uint8Array;
    case "name":
      return (
        typeof v === "string" && !v.includes("\0") && utf8Length(v) >= 1 && utf8Length(v) <= 249
      );
    case "path":
      return (
        typeof v === "string" && !v.includes("\0") && utf8Length(v) >= 1 && utf8Length(v) <= 107
      );
    case "fdArray":
      return Array.isArray(v) && v.length <= 8 && v.every((x) => acceptable("fd", x));
    case "initval":
      return isInt(v) && v >= 0 && v <= 2 ** 32 - 1;
    case "backlog":
      return isInt(v) && v >= 0 && v <= 2 ** 31 - 1;
    case "eventValue":
      return (
        v === undefined ||
        (isInt(v) && v >= 1 && v <= MAX_SAFE) ||
        (typeof v === "bigint" && v >= 1n && v < 2n ** 64n - 1n)
      );
    case "events":
      return isInt(v) && v >= 1 && v <= 3;
    case "callback":
      return typeof v === "function";
    case "mmapBuffer":
      return false; // only buffers returned by mmap, which the generators never make
  }
}

const common: unknown[] = [
  undefined,
  null,
  true,
  "3",
  "",
  NaN,
  Infinity,
  -Infinity,
  -1,
  1.5,
  -0.5,
  2 ** 53,
  1e300,
  -(2 ** 31),
  3n,
  -1n,
  {},
  [],
  [1],
  Symbol("s"),
  () => 3,
  new ArrayBuffer(4),
  new Uint16Array(2),
  new Int8Array(4),
  new Uint8ClampedArray(4),
  new DataView(new ArrayBuffer(4)),
  new Date(0),
  { valueOf: () => 3 },
];

const extra: Partial<Record<Kind, unknown[]>> = {
  fd: [2 ** 31, 2 ** 32 + 3],
  bufOffset: [16, 17, 15.5],
  bufLength: [17, 16.5],
  recvLength: [0, 17],
  name: ["a\0b", "x".repeat(250), "é".repeat(125)],
  path: ["a\0b", "x".repeat(108)],
  fdArray: [
    [-1],
    [1.5],
    ["3"],
    [null],
    new Array<number>(9).fill(0),
    { length: 1, 0: 1 },
    // eslint-disable-next-line no-sparse-arrays
    [0, , 1],
  ],
  initval: [2 ** 32],
  eventValue: [0, 0n, 2n ** 64n - 1n, 2n ** 64n, 2 ** 53, -(2n ** 63n)],
  events: [0, 4, 7, 8],
  backlog: [2 ** 31],
};

function badValues(kind: Kind): unknown[] {
  return [...common, ...(extra[kind] ?? [])].filter((v) => !acceptable(kind, v));
}

function targets(fds: { pipeRead: number; memfd: number; sock: number }): Target[] {
  const { pipeRead, memfd, sock } = fds;
  const fd = (value = pipeRead): Param => ({ kind: "fd", valid: () => value });
  const bytes: Param = { kind: "bytes", valid: () => new Uint8Array(16) };
  const offset: Param = { kind: "bufOffset", valid: () => 0 };
  const length: Param = { kind: "bufLength", valid: () => 1 };
  const n = native as unknown as Record<string, (...args: unknown[]) => unknown>;
  const fn = (name: string, ...params: Param[]): Target => ({
    name,
    call: (args) => Reflect.apply(n[name] as (...a: unknown[]) => unknown, native, args),
    params,
  });
  const watcher = (): { start: (...a: unknown[]) => unknown } =>
    new native.FdWatcher(pipeRead, () => undefined) as unknown as {
      start: (...a: unknown[]) => unknown;
    };
  return [
    fn("memfdCreate", { kind: "name", valid: () => "vk-args" }),
    fn("ftruncate", fd(memfd), { kind: "size", valid: () => PAGE }),
    fn("fstatSize", fd()),
    fn(
      "mmap",
      fd(memfd),
      { kind: "offset", valid: () => 0 },
      { kind: "size", valid: () => PAGE },
      { kind: "bool", valid: () => false },
    ),
    fn("munmap", { kind: "mmapBuffer", valid: () => new ArrayBuffer(1) }),
    fn("mapAnonymous", { kind: "size", valid: () => PAGE }, { kind: "bool", valid: () => true }),
    fn("eventfd", { kind: "initval", valid: () => 0 }),
    fn("eventfdRead", fd()),
    fn("eventfdWrite", fd(), { kind: "eventValue", valid: () => 1 }),
    fn("pipe", { kind: "bool", valid: () => true }),
    fn("dup", fd()),
    fn("close", fd()),
    fn("setNonBlocking", fd(), { kind: "bool", valid: () => true }),
    fn("read", fd(), bytes, offset, length),
    fn("write", fd(), bytes, offset, length),
    fn("vmsplice", fd(), bytes, offset, length),
    fn(
      "unixListen",
      { kind: "path", valid: () => socketPath("args") },
      { kind: "backlog", valid: () => 1 },
    ),
    fn("unixAccept", fd()),
    fn("unixConnect", { kind: "path", valid: () => socketPath("args") }),
    fn("sendmsg", fd(sock), bytes, offset, length, { kind: "fdArray", valid: () => [] }),
    fn("recvmsg", fd(sock), bytes, offset, { kind: "recvLength", valid: () => 1 }),
    fn("shutdown", fd()),
    {
      name: "FdWatcher",
      call: (args) => Reflect.construct(native.FdWatcher, args),
      params: [fd(), { kind: "callback", valid: () => () => undefined }],
    },
    {
      name: "FdWatcher.start",
      call: (args) => {
        const w = watcher();
        try {
          return Reflect.apply(w.start, w, args);
        } finally {
          (w as unknown as { close(): void }).close();
        }
      },
      params: [{ kind: "events", valid: () => POLL_READABLE }],
    },
  ];
}

function assertRejected(target: Target, args: unknown[], index: number): void {
  let caught: unknown;
  try {
    target.call(args);
  } catch (err) {
    caught = err;
  }
  let shown: string;
  try {
    shown = String(args[index]);
  } catch {
    shown = `a ${typeof args[index]} that cannot be shown`;
  }
  assert.ok(isNativeError(caught), `${target.name} accepted argument ${index} = ${shown}`);
  assert.equal(caught.code, "EINVAL_ARG", `${target.name}(${index} = ${shown}): ${caught.message}`);
  assert.equal(caught.errno, 0);
  assert.equal(caught.syscall, target.name);
  assert.ok(caught.message.startsWith(`${target.name}: `), caught.message);
  assert.match(caught.message, /, got .+$/);
}

describe("argument checks", () => {
  const [pipeRead, pipeWrite] = native.pipe(true);
  const [sock, peer] = native.socketpair();
  const memfd = native.memfdCreate("vk-args");
  native.ftruncate(memfd, PAGE);
  after(() => {
    for (const fd of [pipeRead, pipeWrite, sock, peer, memfd]) native.close(fd);
  });
  const all = targets({ pipeRead, memfd, sock });

  it("the valid baseline of every table entry is accepted", () => {
    // Sanity check of the table: with all arguments valid, no argument error is thrown.
    for (const target of all) {
      if (["munmap", "close", "unixListen", "unixConnect", "shutdown"].includes(target.name)) {
        continue; // these would act on the shared fds or need a listener
      }
      const args = target.params.map((p) => p.valid());
      let result: unknown;
      try {
        result = target.call(args);
      } catch (err) {
        assert.ok(
          isNativeError(err) && err.code !== "EINVAL_ARG",
          `${target.name}: ${String(err)}`,
        );
      }
      if (target.name === "memfdCreate" || target.name === "eventfd" || target.name === "dup") {
        native.close(result as number);
      } else if (target.name === "pipe") {
        for (const fd of result as number[]) native.close(fd);
      } else if (target.name === "mmap" || target.name === "mapAnonymous") {
        native.munmap(result as ArrayBuffer);
      } else if (target.name === "FdWatcher") {
        (result as { close(): void }).close();
      }
    }
    while (native.recvmsg(peer, new Uint8Array(64), 0, 64) !== null) {
      // drain what the sendmsg baseline sent
    }
  });

  it("every parameter rejects values of the wrong type or range", () => {
    for (const target of all) {
      target.params.forEach((param, index) => {
        for (const bad of badValues(param.kind)) {
          const args = target.params.map((p) => p.valid());
          args[index] = bad;
          assertRejected(target, args, index);
        }
      });
    }
  });

  it("offset and length must fit the buffer", () => {
    const buf = new Uint8Array(16);
    for (const [off, len] of [
      [17, 0],
      [16, 1],
      [8, 9],
      [0, 17],
    ] as const) {
      throwsNative(() => native.read(pipeRead, buf, off, len), "EINVAL_ARG", "read");
      throwsNative(() => native.write(pipeWrite, buf, off, len), "EINVAL_ARG", "write");
      throwsNative(() => native.sendmsg(sock, buf, off, len, []), "EINVAL_ARG", "sendmsg");
      throwsNative(() => native.recvmsg(sock, buf, off, len), "EINVAL_ARG", "recvmsg");
    }
    throwsNative(() => native.recvmsg(sock, buf, 0, 0), "EINVAL_ARG", "recvmsg");
    throwsNative(() => native.sendmsg(sock, buf, 0, 0, [memfd]), "EINVAL_ARG", "sendmsg");
    assert.equal(native.recvmsg(peer, buf, 0, 16), null, "nothing was sent");
  });

  it("generated wrong values are rejected (property)", () => {
    for (const target of all) {
      target.params.forEach((param, index) => {
        fc.assert(
          fc.property(
            fc.anything({ withBigInt: true, withTypedArray: true, withSparseArray: true }),
            (bad) => {
              fc.pre(!acceptable(param.kind, bad));
              const args = target.params.map((p) => p.valid());
              args[index] = bad;
              assertRejected(target, args, index);
            },
          ),
          { numRuns: 100 },
        );
      });
    }
  });
});
