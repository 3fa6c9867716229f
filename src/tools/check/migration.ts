/**
 * The migration section: a live migration from the first back-end to the second (`--second`)
 * under traffic, with the library's orchestrator (`migrateSource` / `receiveMigration` over a
 * loopback TCP connection): dirty log, pre-copy, stop, the back-end's state when both offer
 * DEVICE_STATE, SEND_RARP when offered, a SHA-256 of guest RAM checked on the destination.
 * Work carries sequence numbers: net frames on TX (the orchestrator's generator; frames that
 * come back on RX are counted), rng buffers and fs FUSE requests (tokens of the work queue).
 * The migration runs once per report; its rows read the same run.
 *
 * vhost-user: "Migration", "Migrating back-end state", VHOST_USER_SEND_RARP.
 */
import { createConnection, createServer } from "node:net";
import type { AddressInfo, Socket } from "node:net";
import { ProtocolFeature, hasFeature } from "../../protocol/constants.js";
import type { VhostUserFrontend } from "../../frontend/frontend.js";
import { migrateSource } from "../../orchestrator/source.js";
import type { MigratableGuest, MigrationResult } from "../../orchestrator/source.js";
import { receiveMigration } from "../../orchestrator/destination.js";
import type { IncomingResult } from "../../orchestrator/destination.js";
import { SeqTrafficGuest } from "../../orchestrator/traffic.js";
import type { WorkToken } from "./profiles.js";
import { drainUsed } from "./profiles.js";
import { errorText, finish, na, offersProtocol, startDevice } from "./session.js";
import type { CheckContext, CheckOutcome, CheckSpec, Started } from "./types.js";

const SPEC = "vhost-user: Migration, Migrating back-end state";
/** virtio device ids (VIRTIO 1.2 §5) by profile. */
const DEVICE_ID: Readonly<Record<string, number>> = Object.freeze({ net: 1, rng: 4, fs: 26 });
/** buffers completed before the migration starts, and after switch-over */
const WARMUP = 64;
/** the net guest's MAC: the generator's source address, announced by SEND_RARP */
const GUEST_MAC = Object.freeze([2, 0, 0, 0, 0, 1]);
const AFTER = 64;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Sequence numbers sent and completed, on either side. */
interface SeqLedger {
  /** sequence numbers handed to the device */
  sent: number;
  /** completed sequence numbers, source then destination */
  completed: number[];
  /** of which on the destination */
  completedAfter: number;
  /** net: frames that came back on RX */
  received: number;
  /** net: sequence numbers of the frames that came back on RX */
  receivedSeqs: number[];
}

/** What one migration run saw (shared by the rows of the section). */
export interface MigrationRun {
  /** why the run could not happen (n/a), or null */
  notApplicable: string | null;
  /** the error that ended the run, or null */
  error: string | null;
  result: MigrationResult | null;
  rarpSent: boolean;
  /** the second back-end offers PROTOCOL_F_RARP */
  rarpOffered: boolean;
  memoryVerified: boolean;
  ledger: SeqLedger;
}

/**
 * The work-queue driver for rng and fs: submits numbered buffers every millisecond; at pause it
 * stops and waits until the device used every buffer in flight (so that the rings move empty).
 */
class WorkGuest implements MigratableGuest {
  #timer: NodeJS.Timeout | null = null;
  #inFlight = 0;
  constructor(
    readonly ctx: CheckContext,
    readonly fe: VhostUserFrontend,
    readonly ledger: SeqLedger,
    readonly onDestination: boolean,
  ) {}

  #reap(): void {
    const q = this.fe.queue(this.ctx.workload.workQueue ?? 0);
    if (!q) return;
    for (const u of drainUsed(q)) {
      const tok = u.token as WorkToken | undefined;
      if (tok && typeof tok.seq === "number") {
        this.ledger.completed.push(tok.seq);
        if (this.onDestination) this.ledger.completedAfter++;
      }
      this.#inFlight--;
    }
  }

  /**
   * Submit up to `n` buffers now.
   * @param n how many
   */
  submit(n: number): void {
    const added = this.ctx.workload.submit(this.fe, n, this.ledger.sent);
    this.ledger.sent += added;
    this.#inFlight += added;
  }

  /** Submit and reap every millisecond. */
  start(): void {
    this.#timer = setInterval(() => {
      this.#reap();
      if (this.#inFlight < 16) this.submit(4);
    }, 1);
  }

  /**
   * Stop submitting and wait (up to 3 s) for the buffers in flight.
   * @returns when none is in flight or the time is up
   */
  async pause(): Promise<void> {
    if (this.#timer) clearInterval(this.#timer);
    this.#timer = null;
    const deadline = Date.now() + 3000;
    while (this.#inFlight > 0 && Date.now() < deadline) {
      this.#reap();
      await sleep(2);
    }
  }

  /** Go on after a failed migration. */
  resume(): void {
    this.start();
  }

  /**
   * Run until `n` more buffers completed (or 5 s).
   * @param n how many
   */
  async runFor(n: number): Promise<void> {
    const target = this.ledger.completed.length + n;
    this.start();
    const deadline = Date.now() + 5000;
    while (this.ledger.completed.length < target && Date.now() < deadline) await sleep(5);
    await this.pause();
  }
}

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond() && Date.now() < deadline) await sleep(5);
}

/**
 * Migrate a device under traffic from `ctx.target` to `ctx.second`.
 * @param ctx the context (with a second target)
 * @returns what the run saw
 */
async function migrate(ctx: CheckContext): Promise<MigrationRun> {
  const ledger: SeqLedger = {
    sent: 0,
    completed: [],
    completedAfter: 0,
    received: 0,
    receivedSeqs: [],
  };
  const run: MigrationRun = {
    notApplicable: null,
    error: null,
    result: null,
    rarpSent: false,
    rarpOffered: false,
    memoryVerified: false,
    ledger,
  };
  const second = ctx.second;
  if (second === null) {
    run.notApplicable = "no --second back-end to migrate to";
    return run;
  }
  if (ctx.workload.workQueue === null) {
    run.notApplicable = `profile ${ctx.workload.name} makes the device do no work (use --profile net|fs|rng)`;
    return run;
  }
  if (!offersProtocol(ctx, ProtocolFeature.LOG_SHMFD)) {
    run.notApplicable = "LOG_SHMFD not offered: no dirty log, no live migration";
    return run;
  }
  let src: Started | null = null;
  let dst: IncomingResult | null = null;
  const server = createServer({ noDelay: true });
  let stream: Socket | null = null;
  let netGen: SeqTrafficGuest | null = null;
  let netGen2: SeqTrafficGuest | null = null;
  try {
    src = await startDevice(ctx, ctx.target, {});
    const s = src;
    let guest: MigratableGuest;
    let work: WorkGuest | null = null;
    if (ctx.workload.name === "net") {
      netGen = new SeqTrafficGuest(s.fe, { record: true, burst: 8 });
      const g = netGen;
      g.start();
      await waitFor(() => g.completed >= WARMUP, 5000);
      guest = g;
    } else {
      work = new WorkGuest(ctx, s.fe, ledger, false);
      work.start();
      await waitFor(() => ledger.completed.length >= WARMUP, 5000);
      guest = work;
    }
    const incoming = new Promise<IncomingResult>((resolve, reject) => {
      server.once("connection", (sock: Socket) => {
        receiveMigration({ stream: sock, connectBackend: () => second.open() }).then(
          resolve,
          reject,
        );
      });
    });
    incoming.catch(() => undefined);
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as AddressInfo).port;
    stream = await new Promise<Socket>((resolve, reject) => {
      const c = createConnection({ host: "127.0.0.1", port }, () => resolve(c));
      c.once("error", reject);
    });
    run.result = await migrateSource({
      frontend: s.fe,
      stream,
      guest,
      deviceId: DEVICE_ID[ctx.workload.name] ?? 1,
      // virtio-net: the MAC (the generator's source address), which SEND_RARP announces
      ...(ctx.workload.name === "net" ? { deviceFields: Uint8Array.from(GUEST_MAC) } : {}),
      verifyMemory: true,
      closeOnSuccess: false,
    });
    dst = await incoming;
    run.rarpSent = dst.rarpSent;
    run.rarpOffered = hasFeature(dst.frontend.protocolFeatures, ProtocolFeature.RARP);
    run.memoryVerified = dst.memoryVerified;
    if (netGen !== null) {
      netGen.stop();
      netGen2 = SeqTrafficGuest.restore(dst.frontend, dst.guestState ?? new Uint8Array());
      const g2 = netGen2;
      const before = g2.completed;
      g2.start();
      await waitFor(() => g2.completed - before >= AFTER, 5000);
      g2.pause();
      g2.stop();
      const end = Date.now() + 3000;
      while (g2.drain() > 0 && Date.now() < end) await sleep(5);
      ledger.sent = g2.nextSeq;
      ledger.completed = [...netGen.completedSeqs, ...g2.completedSeqs];
      ledger.completedAfter = g2.completedSeqs.length;
      ledger.received = netGen.received + g2.received;
      ledger.receivedSeqs = [...netGen.receivedSeqs, ...g2.receivedSeqs];
    } else {
      const w2 = new WorkGuest(ctx, dst.frontend, ledger, true);
      await w2.runFor(AFTER);
    }
  } catch (err) {
    run.error = errorText(err);
  } finally {
    netGen?.stop();
    netGen2?.stop();
    stream?.destroy();
    server.close();
    if (dst !== null) {
      await second.done(dst.frontend);
      if (!dst.ram.closed) dst.ram.close();
    }
    await finish(ctx.target, src);
  }
  return run;
}

/**
 * The migration run of a context, run once and shared by the section's rows.
 * @param ctx the context
 * @returns the run
 */
function migrationRun(ctx: CheckContext): Promise<MigrationRun> {
  let p = ctx.memo.get("migration") as Promise<MigrationRun> | undefined;
  if (p === undefined) {
    p = migrate(ctx);
    ctx.memo.set("migration", p);
  }
  return p;
}

function outcome(
  run: MigrationRun,
  judge: (r: MigrationRun, res: MigrationResult) => CheckOutcome,
): CheckOutcome {
  if (run.notApplicable !== null) return na(run.notApplicable);
  if (run.error !== null || run.result === null) {
    return { result: "fail", detail: `migration failed: ${run.error ?? "no result"}` };
  }
  return judge(run, run.result);
}

function dupes(seqs: readonly number[]): number[] {
  const seen = new Set<number>();
  const out: number[] = [];
  for (const s of seqs) {
    if (seen.has(s)) out.push(s);
    seen.add(s);
  }
  return out;
}

function first(xs: readonly number[]): string {
  return xs.length <= 8 ? xs.join(",") : `${xs.slice(0, 8).join(",")},...`;
}

function summary(r: MigrationRun, res: MigrationResult): string {
  return (
    `${res.iterations} pre-copy iteration(s), ${res.pagesSent} page(s), downtime ` +
    `${res.downtimeMs.toFixed(1)} ms, device state ` +
    (res.deviceStateTransferred ? `${res.backendStateBytes} byte(s)` : "not transferred") +
    `, SEND_RARP ${rarp(r)}`
  );
}

function rarp(r: MigrationRun): string {
  if (r.rarpSent) return "sent and accepted";
  return r.rarpOffered
    ? "offered, not sent (the destination sends it for net only, without GUEST_ANNOUNCE)"
    : "not offered";
}

/** The rows of the migration section. */
export const MIGRATION_CHECKS: readonly CheckSpec[] = Object.freeze([
  {
    id: "migration.none-lost",
    section: "migration",
    spec: `${SPEC}; VHOST_USER_GET_VRING_BASE / SET_VRING_BASE`,
    title: "live migration under traffic: every numbered buffer sent completes, on one side",
    run: async (ctx: CheckContext) =>
      outcome(await migrationRun(ctx), (r, res) => {
        const done = new Set(r.ledger.completed);
        const lost: number[] = [];
        for (let i = 0; i < r.ledger.sent; i++) if (!done.has(i)) lost.push(i);
        const d =
          `${summary(r, res)}; seq 0..${r.ledger.sent - 1} sent, ` +
          `${r.ledger.completed.length - r.ledger.completedAfter} used before switch-over, ` +
          `${r.ledger.completedAfter} after` +
          (ctx.workload.name === "net" ? `, ${r.ledger.received} came back on RX` : "") +
          (lost.length > 0 ? `; lost: ${lost.length} (${first(lost)})` : "; none lost");
        return lost.length === 0 && r.ledger.sent > 0
          ? { result: "pass", detail: d }
          : { result: "fail", detail: d };
      }),
  },
  {
    id: "migration.none-duplicated",
    section: "migration",
    spec: `${SPEC}; VHOST_USER_GET_VRING_BASE / SET_VRING_BASE`,
    title: "no buffer is used twice across the switch-over (used index carried by the rings)",
    run: async (ctx: CheckContext) =>
      outcome(await migrationRun(ctx), (r) => {
        const dup = dupes(r.ledger.completed);
        const rxDup = dupes(r.ledger.receivedSeqs);
        const d =
          `${r.ledger.completed.length} completion(s) of ${r.ledger.sent} buffer(s); ` +
          (dup.length > 0 ? `duplicated: ${dup.length} (${first(dup)})` : "none duplicated") +
          (ctx.workload.name === "net"
            ? `; ${r.ledger.receivedSeqs.length} numbered frame(s) back on RX, ` +
              (rxDup.length > 0 ? `${rxDup.length} twice (${first(rxDup)})` : "none twice")
            : "");
        return dup.length === 0 && rxDup.length === 0
          ? { result: "pass", detail: d }
          : { result: "fail", detail: d };
      }),
  },
  {
    id: "migration.memory-equal",
    section: "migration",
    spec: `${SPEC} (dirty log: every page the back-end wrote is sent again)`,
    title: "guest RAM equal on both sides after switch-over (SHA-256 of all RAM)",
    run: async (ctx: CheckContext) =>
      outcome(await migrationRun(ctx), (r, res) => {
        const d =
          `SHA-256 of guest RAM at switch-over ${res.memoryHash?.slice(0, 16) ?? "none"}...: ` +
          (r.memoryVerified ? "equal on the destination" : "NOT equal on the destination") +
          ` (${res.finalPages} page(s) sent after the stop)`;
        return r.memoryVerified ? { result: "pass", detail: d } : { result: "fail", detail: d };
      }),
  },
  {
    id: "migration.destination-serves",
    section: "migration",
    spec: `${SPEC}; VHOST_USER_SET_VRING_BASE, SET_VRING_ENABLE`,
    title: "the second back-end uses new buffers after switch-over",
    run: async (ctx: CheckContext) =>
      outcome(await migrationRun(ctx), (r) => {
        const d = `${r.ledger.completedAfter} buffer(s) used by the second back-end after switch-over (wanted ${AFTER})`;
        return r.ledger.completedAfter >= AFTER
          ? { result: "pass", detail: d }
          : { result: "fail", detail: d };
      }),
  },
]);
