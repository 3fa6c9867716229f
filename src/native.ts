/**
 * The native addon's whole surface, typed.
 *
 * Every function checks its arguments in JavaScript-facing C code before any syscall and
 * throws a {@link NativeError} (`code` such as `"EBADF"`, `errno`, `syscall`) on failure.
 * Calls that would block on a non-blocking fd return `null` instead of throwing `EAGAIN`.
 */
import { createRequire } from "node:module";

/** Error thrown by the addon: the errno name, its number and the syscall that failed. */
export interface NativeError extends Error {
  /** errno name, e.g. `"EBADF"`, or `"EINVAL_ARG"` for an argument rejected before any syscall */
  code: string;
  /** errno number (0 for argument errors) */
  errno: number;
  /** name of the syscall (or addon function) that failed */
  syscall: string;
}

/** Result of {@link NativeBinding.recvmsg}. */
export interface RecvResult {
  /** bytes received; 0 means the peer closed the connection */
  bytes: number;
  /** fds received with these bytes (SCM_RIGHTS, already O_CLOEXEC) */
  fds: number[];
  /** true when the kernel truncated the ancillary data or more than 8 fds arrived (the surplus was closed) */
  fdsTruncated: boolean;
}

/** File seals (fcntl F_ADD_SEALS / F_GET_SEALS), as in <linux/fcntl.h>. */
export const FileSeal = {
  /** the seal set itself is sealed */
  SEAL: 0x1,
  /** the file cannot shrink: no SIGBUS on a mapping of it */
  SHRINK: 0x2,
  /** the file cannot grow */
  GROW: 0x4,
  /** the contents cannot be written */
  WRITE: 0x8,
} as const;

/** Readiness events for {@link FdWatcher}. */
export const POLL_READABLE = 1;
/** Readiness events for {@link FdWatcher}. */
export const POLL_WRITABLE = 2;

/**
 * Watches one fd for readiness with `uv_poll_t` on the calling environment's own event loop
 * (so it works in worker threads). The callback gets the ready events, or an error.
 */
export interface FdWatcher {
  /** Start or change the watched events (`POLL_READABLE | POLL_WRITABLE`). */
  start(events: number): void;
  /** Stop watching; `start` may be called again. */
  stop(): void;
  /** Stop and release the handle; the fd itself is not closed. Idempotent. */
  close(): void;
}

/** Constructor of {@link FdWatcher}. */
export interface FdWatcherConstructor {
  new (fd: number, callback: (events: number, error: NativeError | null) => void): FdWatcher;
}

/** The functions the C addon exports. */
export interface NativeBinding {
  /** memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING). Returns the fd. */
  memfdCreate(name: string): number;
  /** ftruncate(fd, size). */
  ftruncate(fd: number, size: number): void;
  /** fstat(fd).st_size. */
  fstatSize(fd: number): number;
  /**
   * mmap(NULL, length, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, offset).
   * `offset` must be a multiple of the page size. Returns an external ArrayBuffer over the
   * mapping; it is unmapped by {@link munmap} or, failing that, when it is garbage-collected.
   */
  mmap(fd: number, offset: number, length: number, writable: boolean): ArrayBuffer;
  /**
   * Unmap a buffer returned by {@link mmap} now and detach it (its byteLength becomes 0, so no
   * view can reach the unmapped pages). Idempotent; throws for a buffer that mmap did not make.
   */
  munmap(buffer: ArrayBuffer): void;
  /**
   * A private, zero-filled anonymous mapping of `length` bytes (MAP_NORESERVE: memory is taken
   * only where it is written). `hugePages` asks for transparent huge pages (MADV_HUGEPAGE; a
   * hint, ignored where THP is off), so filling it takes 512 times fewer page faults. Released
   * like an {@link mmap} buffer: {@link munmap}, or garbage collection (Node counts its whole
   * length as external memory).
   */
  mapAnonymous(length: number, hugePages: boolean): ArrayBuffer;
  /**
   * Faults survived in a mapping made by {@link mmap}: a SIGBUS on an access beyond the end of
   * its file (the file was shrunk after mapping) is answered by mapping anonymous zero memory
   * over the faulting page, so the access goes on and reads zeros. Returns the number of such
   * faults and the byte offset in the mapping of the first, or `null` when there was none (or
   * the buffer is unmapped). A SIGBUS outside every mapping is fatal as before.
   */
  mappingFault(buffer: ArrayBuffer): { faults: number; offset: number } | null;
  /**
   * An eventfd (non-blocking) to which the addon adds 1 on every fault it survives in any
   * mapping of the process. Watch it with {@link FdWatcher}, read it with {@link eventfdRead},
   * then ask {@link mappingFault} which of one's own mappings faulted. Owned by the addon:
   * release it with {@link faultUnsubscribe}, never with {@link close}.
   */
  faultSubscribe(): number;
  /** Stop the notifications of {@link faultSubscribe} and close its eventfd. */
  faultUnsubscribe(fd: number): void;
  /** Faults survived in this process so far (all mappings). */
  faultCount(): number;
  /**
   * fcntl(fd, F_GET_SEALS): the file's seals (see {@link FileSeal}), or 0 for a file that
   * cannot carry seals.
   */
  fileSeals(fd: number): number;
  /** fcntl(fd, F_ADD_SEALS, seals). */
  addSeals(fd: number, seals: number): void;
  /** The system page size. */
  pageSize(): number;
  /** eventfd(initval, EFD_CLOEXEC | EFD_NONBLOCK). */
  eventfd(initval: number): number;
  /** Read an eventfd's counter (resetting it); `null` when it is zero (EAGAIN). */
  eventfdRead(fd: number): bigint | null;
  /** Add `value` (default 1) to an eventfd's counter. Returns false on EAGAIN (counter full). */
  eventfdWrite(fd: number, value?: bigint | number): boolean;
  /** pipe2(O_CLOEXEC | (nonBlocking ? O_NONBLOCK : 0)). Returns [readEnd, writeEnd]. */
  pipe(nonBlocking: boolean): [number, number];
  /** dup the fd with F_DUPFD_CLOEXEC. */
  dup(fd: number): number;
  /** close(fd). Throws on EBADF. */
  close(fd: number): void;
  /** Set or clear O_NONBLOCK. */
  setNonBlocking(fd: number, nonBlocking: boolean): void;
  /**
   * fcntl(F_SETPIPE_SZ): a pipe's capacity in bytes (rounded up by the kernel). Returns the
   * capacity set, or -1 when the fd is not a pipe or the size is refused.
   */
  setPipeSize(fd: number, bytes: number): number;
  /** read(fd) into `buffer[offset, offset+length)`. Returns bytes read (0 = EOF) or `null` on EAGAIN. */
  read(fd: number, buffer: Uint8Array, offset: number, length: number): number | null;
  /** write(fd) from `buffer[offset, offset+length)`. Returns bytes written or `null` on EAGAIN. */
  write(fd: number, buffer: Uint8Array, offset: number, length: number): number | null;
  /**
   * vmsplice(fd, SPLICE_F_NONBLOCK) of `buffer[offset, offset+length)` into the write end of a
   * pipe, without copying: the pipe refers to these pages until its reader consumes them, so
   * the bytes must stay unchanged (and the buffer alive) until then. Returns bytes queued or
   * `null` on EAGAIN; throws EBADF / EINVAL when `fd` is not a pipe's write end.
   */
  vmsplice(fd: number, buffer: Uint8Array, offset: number, length: number): number | null;
  /** socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC) + bind + listen. */
  unixListen(path: string, backlog: number): number;
  /** accept4(fd, SOCK_NONBLOCK | SOCK_CLOEXEC). Returns the fd, or `null` on EAGAIN. */
  unixAccept(fd: number): number | null;
  /**
   * socket + connect to `path`. Returns the connected, non-blocking fd. A Unix stream connect
   * completes at once or fails (ECONNREFUSED, ENOENT, EAGAIN when the backlog is full).
   */
  unixConnect(path: string): number;
  /** socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC). */
  socketpair(): [number, number];
  /**
   * sendmsg(fd, data[offset, offset+length), SCM_RIGHTS fds (at most 8), MSG_NOSIGNAL).
   * Returns bytes sent, or `null` on EAGAIN (nothing was sent, fds included).
   */
  sendmsg(
    fd: number,
    data: Uint8Array,
    offset: number,
    length: number,
    fds: number[],
  ): number | null;
  /**
   * recvmsg(fd, into buffer[offset, offset+length), MSG_CMSG_CLOEXEC), accepting up to 8 fds.
   * Returns `null` on EAGAIN.
   */
  recvmsg(fd: number, buffer: Uint8Array, offset: number, length: number): RecvResult | null;
  /** shutdown(fd, SHUT_RDWR). */
  shutdown(fd: number): void;
  /** Readiness watcher class. */
  FdWatcher: FdWatcherConstructor;
  /**
   * open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC) + ioctl(TUNSETIFF, IFF_TAP |
   * IFF_NO_PI): attach to the TAP interface `name` (1..15 bytes), creating it when missing.
   * With `vnetHdr` (default false): IFF_VNET_HDR, TUNSETVNETHDRSZ 12 and TUNSETOFFLOAD
   * (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN), so every frame read or written
   * starts with a 12-byte virtio-net header. Frames are then read and written whole with
   * {@link read} / {@link write}.
   */
  tapOpen(name: string, vnetHdr?: boolean): TapOpenResult;
}

/** Result of {@link NativeBinding.tapOpen}. */
export interface TapOpenResult {
  /** the non-blocking TAP fd (O_CLOEXEC) */
  fd: number;
  /** the interface name the kernel attached to */
  name: string;
  /** frames carry a 12-byte virtio-net header */
  vnetHdr: boolean;
}

function load(): NativeBinding {
  const require = createRequire(import.meta.url);
  const candidates = [
    "../build/Release/vhostkit.node",
    "../../build/Release/vhostkit.node",
    "../build/Debug/vhostkit.node",
    "../../build/Debug/vhostkit.node",
  ];
  const failures: string[] = [];
  for (const candidate of candidates) {
    try {
      return require(candidate) as NativeBinding;
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code !== "MODULE_NOT_FOUND") throw err;
      failures.push(candidate);
    }
  }
  throw new Error(
    `vhostkit: the native addon is not built (looked for ${failures.join(", ")}); ` +
      "run `npm ci` or `npx node-gyp rebuild` in the package directory",
  );
}

/** The loaded native addon. Loading fails with one clear error when it was not built. */
export const native: NativeBinding = load();

/**
 * Type guard for errors thrown by the addon.
 * @param err any thrown value
 * @returns true when `err` carries the addon's `code`, `errno` and `syscall`
 */
export function isNativeError(err: unknown): err is NativeError {
  return err instanceof Error && typeof (err as NativeError).syscall === "string";
}
