/**
 * The check battery as data: one row per check (id, section, spec reference, title, run). Each
 * check opens its own connection(s); the robustness checks, which may end a back-end that
 * stops on a malformed message, run last.
 *
 * vhost-user spec sections cited: "Feature negotiation", "Protocol features", "Communication"
 * (REPLY_ACK), "Ring states" / "Starting and stopping rings", "Memory regions", "Migration"
 * (dirty log), "Migrating back-end state" (device state), and the message descriptions.
 */
import { native } from "../../native.js";
import {
  DeviceStateDirection,
  DeviceStatePhase,
  FrontendRequest,
  ProtocolFeature,
  VHOST_LOG_PAGE,
  VirtioFeature,
  featureSet,
} from "../../protocol/constants.js";
import type { DeviceStateReply } from "../../protocol/codecs.js";
import { encodeFrontendRequest } from "../../protocol/framing.js";
import { readRaw, sendRaw } from "./raw.js";
import type { RawMessage } from "./raw.js";
import { GuestRam } from "../../frontend/guest-ram.js";
import {
  FrontendDirtyLog,
  loadBackendState,
  saveBackendState,
  startDirtyLogging,
} from "../../frontend/migration.js";
import type { FrontendQueue, UsedBuffer } from "../../frontend/queue.js";
import { splitRingSizes } from "../../virtq/layout.js";
import {
  FuseOp,
  collectUsed,
  drainUsed,
  frameSeq,
  fuseCall,
  fuseRequest,
  writeExtent,
} from "./profiles.js";
import {
  LOG_ALL_MASK,
  bitNames,
  errorText,
  finish,
  hex,
  na,
  offers,
  offersProtocol,
  restartRing,
  startDevice,
  withConnection,
  withDevice,
} from "./session.js";
import { ROBUSTNESS_CHECKS } from "./robustness.js";
import { MIGRATION_CHECKS } from "./migration.js";
import type { CheckContext, CheckOutcome, CheckSpec, Started } from "./types.js";

const FR = FrontendRequest;
const PF = ProtocolFeature;
const SPEC = "vhost-user";

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function pass(detail: string, fact = false): CheckOutcome {
  return fact ? { result: "pass", detail, fact } : { result: "pass", detail };
}

function fail(detail: string): CheckOutcome {
  return { result: "fail", detail };
}

function noWork(ctx: CheckContext): CheckOutcome | null {
  return ctx.workload.workQueue === null
    ? na(`profile ${ctx.workload.name} makes the device do no work (use --profile net|fs|rng)`)
    : null;
}

function workQueue(ctx: CheckContext, s: Started): FrontendQueue {
  const q = s.fe.queue(ctx.workload.workQueue ?? 0);
  if (!q) throw new Error("work queue not set up");
  return q;
}

/** Frames looped back on the net profile's RX ring (by sequence number). */
function loopedSeqs(s: Started): number[] {
  const rx = s.fe.queue(0);
  if (!rx) return [];
  const out: number[] = [];
  for (const f of rx.receiveFrames()) {
    const seq = frameSeq(f);
    if (seq !== null) out.push(seq);
  }
  rx.postRxBuffers(Math.max(0, Math.min(128, rx.size - rx.outstanding)));
  return out;
}

/**
 * Submit `n` work buffers and wait until the device used them all.
 * @returns used buffers of the work queue and a note on what else the device did
 */
async function doWork(
  ctx: CheckContext,
  s: Started,
  n: number,
  seq0: number,
  timeoutMs = 3000,
): Promise<{ used: UsedBuffer[]; note: string }> {
  const q = workQueue(ctx, s);
  const added = ctx.workload.submit(s.fe, n, seq0);
  if (added !== n) throw new Error(`only ${added} of ${n} buffers fit the ring`);
  const used = await collectUsed(q, n, timeoutMs);
  let note = "";
  if (ctx.workload.name === "net") {
    await sleep(50);
    const back = loopedSeqs(s);
    note = back.length > 0 ? `; ${back.length} frame(s) came back on RX` : "; none came back on RX";
  }
  return { used, note };
}

async function rawConfigCheck(ctx: CheckContext): Promise<CheckOutcome> {
  let fd = -1;
  try {
    fd = await ctx.target.openFd();
    const ask = async (data: Uint8Array): Promise<RawMessage> => {
      sendRaw(fd, data);
      const m = await readRaw(fd);
      if (m === null) throw new Error("the back-end closed the connection");
      return m;
    };
    await ask(encodeFrontendRequest(FR.GET_FEATURES, null));
    await ask(encodeFrontendRequest(FR.GET_PROTOCOL_FEATURES, null));
    sendRaw(fd, encodeFrontendRequest(FR.SET_PROTOCOL_FEATURES, ctx.offeredProtocolFeatures));
    const cfg = (size: number): Uint8Array =>
      encodeFrontendRequest(FR.GET_CONFIG, {
        offset: 0,
        size,
        flags: 0,
        payload: new Uint8Array(size),
      });
    const small = await ask(cfg(4));
    const big = await ask(cfg(256));
    const alive = await ask(encodeFrontendRequest(FR.GET_FEATURES, null)).then(
      () => "connection kept",
      (err: unknown) => `then GET_FEATURES: ${errorText(err)}`,
    );
    const form = (m: RawMessage, size: number): string =>
      m.header.size === 12 + size
        ? `${size} bytes`
        : m.header.size === 0
          ? "an empty payload (failure form)"
          : m.header.size === 12
            ? "a header with size 0 (failure form)"
            : `a ${m.header.size}-byte payload`;
    const d = `GET_CONFIG(0, 4): ${form(small, 4)}; GET_CONFIG(0, 256): ${form(big, 256)}; ${alive}`;
    return small.header.size === 16 && alive === "connection kept" ? pass(d) : fail(d);
  } catch (err) {
    return fail(errorText(err));
  } finally {
    if (fd >= 0) native.close(fd);
    await sleep(30);
  }
}

// --- handshake and features ---------------------------------------------------------------

const handshake: CheckSpec[] = [
  {
    id: "handshake.get-features",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_GET_FEATURES`,
    title: "GET_FEATURES answers a u64 with REPLY set; VERSION_1 offered",
    run: (ctx) =>
      withConnection(ctx, async (fe) => {
        const f = await fe.getFeatures();
        const names = bitNames(f, VirtioFeature).join(",");
        if (f !== ctx.offeredFeatures) {
          return fail(`GET_FEATURES ${hex(f)}, first connection said ${hex(ctx.offeredFeatures)}`);
        }
        if (!offers(ctx, VirtioFeature.VERSION_1)) {
          return fail(`GET_FEATURES ${hex(f)} (${names}): VERSION_1 not offered`);
        }
        return pass(`GET_FEATURES ${hex(f)} (${names})`);
      }),
  },
  {
    id: "handshake.protocol-features",
    section: "handshake",
    spec: `${SPEC}: Protocol features`,
    title: "GET/SET_PROTOCOL_FEATURES are answered before SET_FEATURES",
    run: (ctx) => {
      if (!offers(ctx, VirtioFeature.PROTOCOL_FEATURES)) {
        return Promise.resolve(na("F_PROTOCOL_FEATURES (bit 30) not offered"));
      }
      return withConnection(ctx, async (fe) => {
        const pf = (await fe.request(FR.GET_PROTOCOL_FEATURES, null)).payload as bigint;
        fe.send(FR.SET_PROTOCOL_FEATURES, pf);
        // A round trip shows the back-end took SET_PROTOCOL_FEATURES and is still there.
        await fe.getFeatures();
        return pass(
          `GET_PROTOCOL_FEATURES ${hex(pf)} (${bitNames(pf, ProtocolFeature).join(",")}) ` +
            `before SET_FEATURES; SET_PROTOCOL_FEATURES ${hex(pf)} taken`,
        );
      });
    },
  },
  {
    id: "handshake.log-features",
    section: "handshake",
    spec: `${SPEC}: Migration, VHOST_USER_PROTOCOL_F_LOG_SHMFD`,
    title: "LOG_ALL offered together with LOG_SHMFD (a shared dirty log needs both)",
    run: (ctx) => {
      const all = offers(ctx, VirtioFeature.LOG_ALL);
      const shm = offersProtocol(ctx, PF.LOG_SHMFD);
      const d = `LOG_ALL ${all ? "offered" : "not offered"}, LOG_SHMFD ${shm ? "offered" : "not offered"}`;
      return Promise.resolve(all === shm ? pass(d) : fail(`${d}: dirty logging cannot work`));
    },
  },
  {
    id: "handshake.reply-ack",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_PROTOCOL_F_REPLY_ACK`,
    title: "with REPLY_ACK, every request with NEED_REPLY is acked (set-up sequence)",
    run: (ctx) => {
      if (!offersProtocol(ctx, PF.REPLY_ACK)) return Promise.resolve(na("REPLY_ACK not offered"));
      return withDevice(ctx, { prepare: false }, async (s) => {
        await s.fe.barrier();
        const n = s.fe.queues.size;
        return pass(
          `SET_OWNER, SET_FEATURES, SET_MEM_TABLE and for ${n} ring(s) SET_VRING_NUM, ` +
            `SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR, ` +
            `SET_VRING_ENABLE acked with 0`,
        );
      });
    },
  },
  {
    id: "handshake.queue-num",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_GET_QUEUE_NUM`,
    title: "with MQ, GET_QUEUE_NUM answers at least 1",
    run: (ctx) => {
      if (!offersProtocol(ctx, PF.MQ)) return Promise.resolve(na("MQ not offered"));
      return withConnection(ctx, async (fe) => {
        const neg = await fe.negotiate({ backendReq: false });
        const n = neg.queueNum ?? 0;
        return n >= 1 ? pass(`GET_QUEUE_NUM ${n}`) : fail(`GET_QUEUE_NUM ${n}`);
      });
    },
  },
  {
    id: "handshake.max-mem-slots",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_GET_MAX_MEM_SLOTS`,
    title: "with CONFIGURE_MEM_SLOTS, GET_MAX_MEM_SLOTS answers 1..509",
    run: (ctx) => {
      if (!offersProtocol(ctx, PF.CONFIGURE_MEM_SLOTS)) {
        return Promise.resolve(na("CONFIGURE_MEM_SLOTS not offered"));
      }
      return withConnection(ctx, async (fe) => {
        const neg = await fe.negotiate({ backendReq: false });
        const n = neg.maxMemSlots ?? 0;
        return n >= 1 && n <= 509
          ? pass(`GET_MAX_MEM_SLOTS ${n}`)
          : fail(`GET_MAX_MEM_SLOTS ${n} (outside 1..509)`);
      });
    },
  },
  {
    id: "handshake.config",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_GET_CONFIG`,
    title: "with CONFIG, GET_CONFIG answers the size asked; an oversize read fails cleanly",
    run: (ctx) => {
      if (!offersProtocol(ctx, PF.CONFIG)) return Promise.resolve(na("CONFIG not offered"));
      // Raw exchanges: the channel refuses an empty GET_CONFIG reply (libvhost-user's failure
      // form) by closing the connection, which would hide whether the back-end keeps it.
      return rawConfigCheck(ctx);
    },
  },
  {
    id: "handshake.status",
    section: "handshake",
    spec: `${SPEC}: VHOST_USER_SET_STATUS, VHOST_USER_GET_STATUS`,
    title: "with STATUS, GET_STATUS returns what SET_STATUS set",
    run: (ctx) => {
      if (!offersProtocol(ctx, PF.STATUS)) return Promise.resolve(na("STATUS not offered"));
      return withConnection(ctx, async (fe) => {
        await fe.negotiate({ backendReq: false });
        await fe.setFeatures();
        await fe.setStatus(0x0b);
        const st = await fe.getStatus();
        return st === 0x0b
          ? pass("SET_STATUS 0x0b, GET_STATUS 0x0b")
          : fail(`SET_STATUS 0x0b, GET_STATUS ${hex(st)}`);
      });
    },
  },
];

// --- ring lifecycle -----------------------------------------------------------------------

const rings: CheckSpec[] = [
  {
    id: "rings.disabled-no-side-effects",
    section: "rings",
    spec: `${SPEC}: Ring states (seed 002)`,
    title: "a started but disabled ring is processed without side effects",
    run: async (ctx) => {
      const skip = noWork(ctx);
      if (skip) return skip;
      if (!offers(ctx, VirtioFeature.PROTOCOL_FEATURES)) {
        return na("without F_PROTOCOL_FEATURES rings start enabled");
      }
      return withDevice(ctx, { enable: false, prepare: false }, async (s) => {
        if (ctx.workload.name === "net") s.fe.queue(0)?.postRxBuffers(64);
        const q = workQueue(ctx, s);
        ctx.workload.submit(s.fe, 8, 0);
        await sleep(300);
        const used = drainUsed(q).length;
        if (ctx.workload.name === "net") {
          const back = loopedSeqs(s).length;
          const d = `8 frames on disabled TX: ${used} consumed, ${back} delivered on RX`;
          return back === 0 ? pass(d) : fail(`${d} (a disabled ring must not send)`);
        }
        const d = `8 buffers on the disabled ring: ${used} used`;
        return used === 0 ? pass(d) : fail(`${d} (the device wrote while disabled)`);
      });
    },
  },
  {
    id: "rings.start-on-kick",
    section: "rings",
    spec: `${SPEC}: Starting and stopping rings`,
    title: "an enabled ring processes buffers after a kick",
    run: async (ctx) => {
      const skip = noWork(ctx);
      if (skip) return skip;
      return withDevice(ctx, {}, async (s) => {
        const { used, note } = await doWork(ctx, s, 32, 0);
        const q = workQueue(ctx, s);
        const d = `32 buffers kicked on queue ${q.index}: ${used.length} used, ${q.stats.calls} call(s)${note}`;
        return used.length === 32 ? pass(d) : fail(d);
      });
    },
  },
  ...(["split", "packed"] as const).map((fmt): CheckSpec => ({
    id: `rings.get-vring-base-${fmt}`,
    section: "rings",
    spec: `${SPEC}: VHOST_USER_GET_VRING_BASE (seed 002)`,
    title: `GET_VRING_BASE stops a ${fmt} ring and returns where it stopped; a restart continues there`,
    run: async (ctx) => {
      const skip = noWork(ctx);
      if (skip) return skip;
      if (fmt === "packed" && !offers(ctx, VirtioFeature.RING_PACKED)) {
        return na("RING_PACKED not offered");
      }
      const features = fmt === "packed" ? featureSet(VirtioFeature.RING_PACKED) : 0n;
      return withDevice(ctx, { features }, async (s) => {
        const q = workQueue(ctx, s);
        const n = 40;
        const first = await doWork(ctx, s, n, 0);
        if (first.used.length !== n) return fail(`${first.used.length} of ${n} used before stop`);
        const base = await s.fe.stopQueue(q.index);
        const added = q.stats.added;
        const expIdx = fmt === "packed" ? added % q.size : added & 0xffff;
        const expWrap = Math.floor(added / q.size) % 2 === 0;
        const got =
          fmt === "packed"
            ? `avail ${base.availIdx} wrap ${base.availWrap ? 1 : 0}, used ${base.usedIdx} wrap ${base.usedWrap ? 1 : 0}`
            : `${base.availIdx}`;
        const ok =
          base.availIdx === expIdx &&
          (fmt === "split" || (base.availWrap === expWrap && base.usedIdx === expIdx));
        if (!ok) {
          return fail(
            `GET_VRING_BASE(${q.index}) = ${got} after ${added} buffers, expected ${expIdx}` +
              (fmt === "packed" ? ` wrap ${expWrap ? 1 : 0}` : ""),
          );
        }
        await restartRing(s.fe, q.index, base);
        const second = await doWork(ctx, s, n, n);
        const d =
          `GET_VRING_BASE(${q.index}) = ${got} after ${added} buffers; after restart ` +
          `(SET_VRING_BASE, SET_VRING_CALL again) ${second.used.length} of ${n} used`;
        return second.used.length === n ? pass(d) : fail(d);
      });
    },
  })),
  {
    id: "rings.call-fd-at-get-vring-base",
    section: "rings",
    spec: `${SPEC}: VHOST_USER_GET_VRING_BASE`,
    title: "does the back-end keep the call fd across GET_VRING_BASE (a fact, not a verdict)",
    run: async (ctx) => {
      const skip = noWork(ctx);
      if (skip) return skip;
      return withDevice(ctx, {}, async (s) => {
        const q = workQueue(ctx, s);
        const before = await doWork(ctx, s, 8, 0);
        await sleep(100);
        const callsBefore = q.stats.calls;
        if (callsBefore === 0) {
          return na(`${before.used.length} buffers used with no call before any stop: cannot tell`);
        }
        await s.fe.stopQueue(q.index);
        // Restart WITHOUT SET_VRING_CALL (QEMU would send it; this probes the back-end).
        await s.fe.restartQueue(q.index, undefined, false, false);
        ctx.workload.submit(s.fe, 8, 8);
        const used = await collectUsed(q, 8, 1500).catch(() => [] as UsedBuffer[]);
        await sleep(100);
        const calls = q.stats.calls - callsBefore;
        const alive =
          !s.fe.closed &&
          (await s.fe.getFeatures().then(
            () => true,
            () => false,
          ));
        if (!alive) {
          const exit = await ctx.target.takeExit(500);
          return pass(
            `closes the call fd at GET_VRING_BASE: restarted without SET_VRING_CALL, the ` +
              `back-end ${exit ? `exited (status ${exit.code ?? exit.signal})` : "closed the connection"} ` +
              `on its next notification; a front-end must send SET_VRING_CALL at every start`,
            true,
          );
        }
        if (used.length === 8 && calls === 0) {
          return pass(
            "stops signalling the old call fd after GET_VRING_BASE (8 buffers used, 0 calls): " +
              "a front-end must send SET_VRING_CALL at every start",
            true,
          );
        }
        if (used.length < 8) {
          return pass(
            `drops the call fd at GET_VRING_BASE: restarted without SET_VRING_CALL, the ring ` +
              `does not run (${used.length} of 8 used, ${calls} call(s)); a front-end must send ` +
              `SET_VRING_CALL at every start`,
            true,
          );
        }
        return pass(
          `keeps the call fd: restarted without SET_VRING_CALL, 8 of 8 used, ` +
            `${calls} call(s) on the old eventfd`,
          true,
        );
      });
    },
  },
];

// --- memory -------------------------------------------------------------------------------

const memory: CheckSpec[] = [
  {
    id: "memory.set-mem-table",
    section: "memory",
    spec: `${SPEC}: VHOST_USER_SET_MEM_TABLE, Memory regions`,
    title: "SET_MEM_TABLE with two regions (GPA 0 and 4 GiB); buffers in the second are used",
    run: (ctx) =>
      withDevice(ctx, { prepare: ctx.workload.workQueue !== null }, async (s) => {
        const regions = s.ram
          .memoryTable()
          .map((r) => `${hex(r.guestPhysAddr)}+${hex(r.memorySize)}`)
          .join(", ");
        if (ctx.workload.workQueue === null) {
          await s.fe.getFeatures();
          return pass(`SET_MEM_TABLE [${regions}] taken (no work in profile generic)`);
        }
        const { used } = await doWork(ctx, s, 16, 0);
        const d = `SET_MEM_TABLE [${regions}]; 16 buffers (rings in region 0, buffers in region 1): ${used.length} used`;
        return used.length === 16 ? pass(d) : fail(d);
      }),
  },
  {
    id: "memory.replace-while-running",
    section: "memory",
    spec: `${SPEC}: VHOST_USER_SET_MEM_TABLE`,
    title: "a new SET_MEM_TABLE (same layout, new fds) while rings run; work continues",
    run: (ctx) =>
      withDevice(ctx, { prepare: ctx.workload.workQueue !== null }, async (s) => {
        const dup = s.ram.duplicate("vhostkit-check-copy");
        await s.fe.replaceMemory(dup, { mode: "live", closePrevious: true });
        s.ram = dup;
        if (ctx.workload.workQueue === null) {
          await s.fe.getFeatures();
          return pass("second SET_MEM_TABLE taken while rings run (no work in profile generic)");
        }
        const { used, note } = await doWork(ctx, s, 16, 100);
        const d = `memory replaced while running; then 16 buffers: ${used.length} used${note}`;
        return used.length === 16 ? pass(d) : fail(d);
      }),
  },
  {
    id: "memory.add-rem-reg",
    section: "memory",
    spec: `${SPEC}: VHOST_USER_ADD_MEM_REG, VHOST_USER_REM_MEM_REG`,
    title: "with CONFIGURE_MEM_SLOTS, regions added one by one work; one removed and added back",
    run: async (ctx) => {
      if (!offersProtocol(ctx, PF.CONFIGURE_MEM_SLOTS)) {
        return na("CONFIGURE_MEM_SLOTS not offered");
      }
      return withDevice(
        ctx,
        { memory: "add-mem-reg", prepare: ctx.workload.workQueue !== null },
        async (s) => {
          const second = s.ram.memoryTable()[1];
          if (second === undefined) return fail("no second region");
          const fd = s.ram.regions[1]?.fd ?? -1;
          // Remove the buffer region, then add it back, while the rings (in region 0) run.
          await s.fe.removeMemRegion(second);
          await s.fe.addMemRegion(s.ram, 1);
          await s.fe.barrier();
          if (ctx.workload.workQueue === null) {
            await s.fe.getFeatures();
            return pass("ADD_MEM_REG x2, REM_MEM_REG, ADD_MEM_REG taken");
          }
          const { used } = await doWork(ctx, s, 16, 0);
          const d = `ADD_MEM_REG x2 (fd ${fd >= 0 ? "sent" : "?"}), REM_MEM_REG + ADD_MEM_REG of region 1; 16 buffers: ${used.length} used`;
          return used.length === 16 ? pass(d) : fail(d);
        },
      );
    },
  },
];

// --- dirty log ----------------------------------------------------------------------------

function logPages(log: FrontendDirtyLog): Set<number> {
  const pages = new Set<number>();
  log.fetchAndClear((p) => pages.add(p));
  return pages;
}

function pagesOf(gpa: number, len: number, into: Set<number>): void {
  if (len <= 0) return;
  for (
    let p = Math.floor(gpa / VHOST_LOG_PAGE);
    p <= Math.floor((gpa + len - 1) / VHOST_LOG_PAGE);
    p++
  ) {
    into.add(p);
  }
}

function usedRingPages(q: FrontendQueue, into: Set<number>): void {
  const size = q.packed ? q.size * 16 : splitRingSizes(q.size).used;
  pagesOf(q.packed ? q.ring.desc : q.ring.used, size, into);
}

function describePages(pages: number[]): string {
  const shown = pages.slice(0, 6).map((p) => hex(p * VHOST_LOG_PAGE));
  return shown.join(",") + (pages.length > 6 ? `,... (${pages.length})` : "");
}

/** Work with logging on: which pages the back-end wrote (used ring, buffers) and which it marked. */
async function loggedWork(
  ctx: CheckContext,
  s: Started,
  log: FrontendDirtyLog,
  seq0: number,
): Promise<{ missing: number[]; extra: number[]; wrote: number; marked: number }> {
  logPages(log);
  const wq = workQueue(ctx, s);
  const added = ctx.workload.submit(s.fe, 16, seq0);
  const used = await collectUsed(wq, added, 3000);
  await sleep(100);
  const all: UsedBuffer[] = [...used];
  for (const i of ctx.workload.receiveQueues) {
    const q = s.fe.queue(i);
    if (q && q !== wq) all.push(...drainUsed(q));
  }
  const marked = logPages(log);
  const must = new Set<number>();
  for (const u of all) {
    const e = writeExtent(u);
    if (e) pagesOf(e.gpa, e.len, must);
  }
  const allowed = new Set(must);
  for (const q of s.fe.queues.values()) usedRingPages(q, allowed);
  // The used ring of every queue that returned buffers must be marked too.
  const touched = new Set([wq.index, ...ctx.workload.receiveQueues]);
  for (const i of touched) {
    const q = s.fe.queue(i);
    if (!q) continue;
    const ringPage = Math.floor((q.packed ? q.ring.desc : q.ring.used) / VHOST_LOG_PAGE);
    if (i === wq.index || all.some((u) => writeExtent(u) !== null)) must.add(ringPage);
  }
  if (used.length !== added) throw new Error(`${used.length} of ${added} used with logging on`);
  const missing = [...must].filter((p) => !marked.has(p)).sort((a, b) => a - b);
  const extra = [...marked].filter((p) => !allowed.has(p)).sort((a, b) => a - b);
  return { missing, extra, wrote: must.size, marked: marked.size };
}

function logPrereq(ctx: CheckContext): CheckOutcome | null {
  if (!offersProtocol(ctx, PF.LOG_SHMFD)) return na("LOG_SHMFD not offered");
  if (!offers(ctx, VirtioFeature.LOG_ALL)) return na("LOG_ALL not offered");
  return noWork(ctx);
}

const dirtyLog: CheckSpec[] = [
  {
    id: "dirty-log.marks-writes",
    section: "dirty-log",
    spec: `${SPEC}: Migration (seeds 000-002)`,
    title: "with LOG_ALL and VHOST_VRING_F_LOG, every page written is marked and nothing else",
    run: async (ctx) => {
      const skip = logPrereq(ctx);
      if (skip) return skip;
      return withDevice(ctx, {}, async (s) => {
        const log = await startDirtyLogging(s.fe);
        try {
          const r = await loggedWork(ctx, s, log, 0);
          const d =
            `SET_LOG_BASE (${log.size} bytes), SET_FEATURES +LOG_ALL, SET_VRING_ADDR +F_LOG; ` +
            `16 buffers: ${r.wrote} page(s) written (used.len and used ring), ${r.marked} marked`;
          if (r.missing.length > 0) return fail(`${d}; not marked: ${describePages(r.missing)}`);
          if (r.extra.length > 0)
            return fail(`${d}; marked but not written: ${describePages(r.extra)}`);
          return pass(d);
        } finally {
          log.close();
        }
      });
    },
  },
  {
    id: "dirty-log.replace-and-off",
    section: "dirty-log",
    spec: `${SPEC}: VHOST_USER_SET_LOG_BASE, Migration`,
    title: "a second SET_LOG_BASE moves logging to the new log; LOG_ALL off stops it",
    run: async (ctx) => {
      const skip = logPrereq(ctx);
      if (skip) return skip;
      return withDevice(ctx, {}, async (s) => {
        const first = await startDirtyLogging(s.fe);
        const second = FrontendDirtyLog.create(s.fe.memoryTable);
        try {
          const reply = await s.fe.request(
            FR.SET_LOG_BASE,
            { mmapSize: BigInt(second.size), mmapOffset: 0n },
            [second.fd],
          );
          for (const fd of reply.fds) native.close(fd);
          await s.fe.barrier();
          logPages(first);
          const r = await loggedWork(ctx, s, second, 200);
          const stale = logPages(first).size;
          if (r.missing.length > 0 || stale > 0) {
            return fail(
              `after a second SET_LOG_BASE: ${r.missing.length} written page(s) missing from the new log, ` +
                `${stale} marked in the old one`,
            );
          }
          for (const i of s.fe.queues.keys()) await s.fe.setVringLog(i, false);
          await s.fe.setFeatures(s.fe.features & ~LOG_ALL_MASK);
          await s.fe.barrier();
          logPages(second);
          const wq = workQueue(ctx, s);
          ctx.workload.submit(s.fe, 16, 300);
          const used = await collectUsed(wq, 16, 3000);
          await sleep(100);
          const after = logPages(second).size;
          const d =
            `new log: ${r.marked} page(s) marked, old log untouched; LOG_ALL off: ` +
            `${used.length} buffers used, ${after} page(s) marked`;
          return after === 0 ? pass(d) : fail(d);
        } finally {
          first.close();
          second.close();
        }
      });
    },
  },
];

// --- device state -------------------------------------------------------------------------

const deviceState: CheckSpec[] = [
  {
    id: "device-state.refused-while-running",
    section: "device-state",
    spec: `${SPEC}: Migrating back-end state (seed 003)`,
    title: "SET_DEVICE_STATE_FD is refused while a ring runs (started by a kick)",
    run: async (ctx) => {
      if (!offersProtocol(ctx, PF.DEVICE_STATE)) return na("DEVICE_STATE not offered");
      return withDevice(ctx, {}, async (s) => {
        // A ring starts at its first kick, not at SET_VRING_KICK (vhost-user: "Ring states"):
        // kick every ring (and have the work queue do work) so that the rings run.
        let work = "";
        if (ctx.workload.workQueue !== null) {
          const done = await doWork(ctx, s, 8, 0);
          work = `after ${done.used.length} of 8 buffers used, `;
        }
        for (const q of s.fe.queues.values()) q.forceKick();
        await s.fe.barrier();
        const [r, w] = native.pipe(true);
        try {
          const reply = await s.fe.request(
            FR.SET_DEVICE_STATE_FD,
            { direction: DeviceStateDirection.SAVE, phase: DeviceStatePhase.STOPPED },
            [w],
          );
          for (const fd of reply.fds) native.close(fd);
          const body = reply.payload as DeviceStateReply;
          return body.result !== 0
            ? pass(
                `${work}rings kicked: SET_DEVICE_STATE_FD(SAVE, STOPPED) with rings running: result ${body.result}`,
              )
            : fail(
                `${work}rings kicked: SET_DEVICE_STATE_FD(SAVE, STOPPED) with rings running: accepted (result 0)`,
              );
        } finally {
          native.close(r);
          native.close(w);
        }
      });
    },
  },
  {
    id: "device-state.save-load",
    section: "device-state",
    spec: `${SPEC}: Migrating back-end state, VHOST_USER_CHECK_DEVICE_STATE (seed 003)`,
    title: "SAVE with rings stopped, LOAD into the second back-end (or a fresh connection), CHECK",
    run: async (ctx) => {
      if (!offersProtocol(ctx, PF.DEVICE_STATE)) return na("DEVICE_STATE not offered");
      let src: Started | null = null;
      let dst: Started | null = null;
      const dstTarget = ctx.second ?? ctx.target;
      try {
        src = await startDevice(ctx, ctx.target, {});
        if (ctx.workload.workQueue !== null) await doWork(ctx, src, 8, 0);
        for (const i of src.fe.queues.keys()) await src.fe.stopQueue(i);
        const data = await saveBackendState(src.fe);
        await finish(ctx.target, src);
        src = null;
        const fe = await dstTarget.open();
        const ram = GuestRam.create({ size: 8 << 20, name: "vhostkit-check-dst" });
        dst = { fe, ram };
        await fe.negotiate({
          features: featureSet(VirtioFeature.VERSION_1) | ctx.workload.features,
        });
        await fe.setFeatures();
        await fe.setMemTable(ram);
        await loadBackendState(fe, data);
        return pass(
          `SAVE: ${data.length} byte(s), CHECK_DEVICE_STATE 0; LOAD into ` +
            `${ctx.second ? "the second back-end" : "a fresh connection"}: CHECK_DEVICE_STATE 0`,
        );
      } catch (err) {
        return fail(errorText(err));
      } finally {
        await finish(ctx.target, src);
        await finish(dstTarget, dst);
      }
    },
  },
];

// --- virtio-fs ----------------------------------------------------------------------------

function dirents(body: Uint8Array): { name: string; type: number }[] {
  const out: { name: string; type: number }[] = [];
  const dv = new DataView(body.buffer, body.byteOffset, body.byteLength);
  let off = 0;
  while (off + 24 <= body.length) {
    const namelen = dv.getUint32(off + 16, true);
    const type = dv.getUint32(off + 20, true);
    const name = Buffer.from(body.subarray(off + 24, off + 24 + namelen)).toString();
    out.push({ name, type });
    off += 24 + ((namelen + 7) & ~7);
  }
  return out;
}

const fs: CheckSpec[] = [
  {
    id: "fs.fuse-init-lookup-read",
    section: "fs",
    spec: "VIRTIO 1.2 §5.11 (virtio-fs); FUSE",
    title: "FUSE_INIT, then LOOKUP, OPEN and READ of a file in the shared directory",
    run: async (ctx) => {
      if (ctx.workload.name !== "fs") return na(`profile ${ctx.workload.name} (use --profile fs)`);
      return withDevice(ctx, { prepare: false }, async (s) => {
        const q = workQueue(ctx, s);
        const init = new Uint8Array(16);
        new DataView(init.buffer).setUint32(0, 7, true);
        new DataView(init.buffer).setUint32(4, 31, true);
        const ri = await fuseCall(q, fuseRequest(FuseOp.INIT, 1, 0, init), 16 + 64);
        if (ri.error !== 0) return fail(`FUSE_INIT: error ${ri.error}`);
        const dvi = new DataView(ri.body.buffer, ri.body.byteOffset, ri.body.byteLength);
        const version = `${dvi.getUint32(0, true)}.${dvi.getUint32(4, true)}`;
        const od = await fuseCall(q, fuseRequest(FuseOp.OPENDIR, 2, 1, new Uint8Array(8)), 32);
        if (od.error !== 0) return fail(`FUSE_INIT ${version}; OPENDIR(1): error ${od.error}`);
        const dfh = new DataView(od.body.buffer, od.body.byteOffset).getBigUint64(0, true);
        const rdIn = new Uint8Array(40);
        const rdv = new DataView(rdIn.buffer);
        rdv.setBigUint64(0, dfh, true);
        rdv.setUint32(16, 4096, true);
        const rd = await fuseCall(q, fuseRequest(FuseOp.READDIR, 3, 1, rdIn), 16 + 4096);
        if (rd.error !== 0) return fail(`FUSE_INIT ${version}; READDIR: error ${rd.error}`);
        const file = dirents(rd.body).find((e) => e.type === 8);
        if (file === undefined) {
          return pass(`FUSE_INIT ${version}; READDIR of the root: no regular file to read`);
        }
        const name = new TextEncoder().encode(`${file.name}\0`);
        const lk = await fuseCall(q, fuseRequest(FuseOp.LOOKUP, 4, 1, name), 16 + 128);
        if (lk.error !== 0) return fail(`LOOKUP ${file.name}: error ${lk.error}`);
        const ldv = new DataView(lk.body.buffer, lk.body.byteOffset, lk.body.byteLength);
        const nodeid = Number(ldv.getBigUint64(0, true));
        const size = Number(ldv.getBigUint64(40 + 8, true)); // entry_out.attr.size
        const op = await fuseCall(q, fuseRequest(FuseOp.OPEN, 5, nodeid, new Uint8Array(8)), 32);
        if (op.error !== 0) return fail(`OPEN ${file.name}: error ${op.error}`);
        const fh = new DataView(op.body.buffer, op.body.byteOffset).getBigUint64(0, true);
        const readIn = new Uint8Array(40);
        const rv = new DataView(readIn.buffer);
        rv.setBigUint64(0, fh, true);
        rv.setUint32(16, 4096, true);
        const rr = await fuseCall(q, fuseRequest(FuseOp.READ, 6, nodeid, readIn), 16 + 4096);
        const want = Math.min(size, 4096);
        const d =
          `FUSE_INIT ${version}; LOOKUP ${file.name} -> node ${nodeid}, size ${size}; ` +
          `OPEN fh ${fh}; READ 4096 -> error ${rr.error}, ${rr.body.length} byte(s)`;
        return rr.error === 0 && rr.body.length === want ? pass(d) : fail(d);
      });
    },
  },
];

/** The whole battery, in the order it runs (robustness last). */
export const CHECKS: readonly CheckSpec[] = Object.freeze([
  ...handshake,
  ...rings.filter((c) => c.id !== "rings.call-fd-at-get-vring-base"),
  ...memory,
  ...dirtyLog,
  ...deviceState,
  ...fs,
  ...MIGRATION_CHECKS,
  // Destructive for back-ends that close the call fd: after every non-destructive check.
  ...rings.filter((c) => c.id === "rings.call-fd-at-get-vring-base"),
  ...ROBUSTNESS_CHECKS,
]);
