/**
 * Robustness checks: the malformed-message set (bad version, reserved flags, oversize, unknown
 * ids, wrong sizes, wrong fd counts, a region larger than its fd, a bad ring index, a message
 * cut short then a hang-up), each on a fresh connection, then a fresh connection must still be
 * served; and, with the back-end's pid, its fd count after many connections.
 *
 * vhost-user: "Header" (version, flags), "Communication"; the rule that a back-end may close a
 * connection it cannot trust but must keep serving others.
 */
import { readdirSync } from "node:fs";
import { native } from "../../native.js";
import {
  FLAG_NEED_REPLY,
  FrontendRequest,
  HEADER_SIZE,
  VHOST_USER_VERSION,
  VirtioFeature,
  featureSet,
} from "../../protocol/constants.js";
import { encodeFrontendRequest, encodeHeader } from "../../protocol/framing.js";
import { errorText, na } from "./session.js";
import type { CheckContext, CheckOutcome, CheckSpec } from "./types.js";

const FR = FrontendRequest;

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** One message of a malformed exchange; `poke`: an eventfd (one of the exchange's) written after it. */
interface Chunk {
  data: Uint8Array;
  fds: number[];
  poke?: number;
}

/** One malformed exchange: the messages (with fds) to send on a fresh connection. */
interface Malformed {
  id: string;
  title: string;
  /** build the bytes and fds; fds are closed after sending */
  build(): { chunks: Chunk[]; hangUp?: boolean };
}

function header(
  request: number,
  flags: number,
  size: number,
  body: Uint8Array = new Uint8Array(0),
): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + body.length);
  out.set(encodeHeader({ request, flags, size }), 0);
  out.set(body, HEADER_SIZE);
  return out;
}

function u64(v: bigint): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, v, true);
  return b;
}

const setup = (): Chunk[] => [
  { data: encodeFrontendRequest(FR.SET_OWNER, null), fds: [] },
  {
    data: encodeFrontendRequest(FR.SET_FEATURES, featureSet(VirtioFeature.VERSION_1)),
    fds: [],
  },
];

const MALFORMED: readonly Malformed[] = [
  {
    id: "bad-version",
    title: "GET_FEATURES with version 2 in the flags",
    build: () => ({ chunks: [{ data: header(FR.GET_FEATURES, 0x2, 0), fds: [] }] }),
  },
  {
    id: "reserved-flags",
    title: "GET_FEATURES with a reserved flag bit (bit 8) set",
    build: () => ({
      chunks: [{ data: header(FR.GET_FEATURES, VHOST_USER_VERSION | 0x100, 0), fds: [] }],
    }),
  },
  {
    id: "oversize",
    title: "SET_FEATURES announcing a 1 MiB payload",
    build: () => ({
      chunks: [
        { data: header(FR.SET_FEATURES, VHOST_USER_VERSION, 1 << 20, new Uint8Array(64)), fds: [] },
      ],
    }),
  },
  {
    id: "unknown-request",
    title: "request id 99 (unknown) with NEED_REPLY",
    build: () => ({
      chunks: [{ data: header(99, VHOST_USER_VERSION | FLAG_NEED_REPLY, 0), fds: [] }],
    }),
  },
  {
    id: "wrong-size",
    title: "SET_FEATURES with a 4-byte payload",
    build: () => ({
      chunks: [
        { data: header(FR.SET_FEATURES, VHOST_USER_VERSION, 4, new Uint8Array(4)), fds: [] },
      ],
    }),
  },
  {
    id: "wrong-fd-count",
    title: "SET_VRING_KICK carrying 3 fds",
    build: () => ({
      chunks: [
        ...setup(),
        {
          data: header(FR.SET_VRING_KICK, VHOST_USER_VERSION, 8, u64(0n)),
          fds: [native.eventfd(0), native.eventfd(0), native.eventfd(0)],
        },
      ],
    }),
  },
  {
    id: "bad-ring-index",
    title: "SET_VRING_NUM for ring 200 with NEED_REPLY",
    build: () => ({
      chunks: [
        ...setup(),
        {
          data: encodeFrontendRequest(
            FR.SET_VRING_NUM,
            { index: 200, num: 256 },
            { needReply: true },
          ),
          fds: [],
        },
      ],
    }),
  },
  {
    id: "region-beyond-fd",
    title:
      "SET_MEM_TABLE with a 1 MiB region on a 4 KiB memfd, a ring placed beyond the fd, kicked",
    build: () => {
      const mfd = native.memfdCreate("vhostkit-check-short");
      native.ftruncate(mfd, 4096);
      const kick = native.eventfd(0);
      const call = native.eventfd(0);
      const ua = 0x7f00_0000_0000n;
      const ring = 0x80000n;
      return {
        chunks: [
          ...setup(),
          {
            data: encodeFrontendRequest(FR.SET_MEM_TABLE, {
              regions: [
                {
                  guestPhysAddr: 0n,
                  memorySize: 1n << 20n,
                  userspaceAddr: ua,
                  mmapOffset: 0n,
                },
              ],
            }),
            fds: [mfd],
          },
          { data: encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 64 }), fds: [] },
          { data: encodeFrontendRequest(FR.SET_VRING_BASE, { index: 0, num: 0 }), fds: [] },
          {
            data: encodeFrontendRequest(FR.SET_VRING_ADDR, {
              index: 0,
              flags: 0,
              descUserAddr: ua + ring,
              usedUserAddr: ua + ring + 0x1000n,
              availUserAddr: ua + ring + 0x400n,
              logGuestAddr: ring + 0x1000n,
            }),
            fds: [],
          },
          {
            data: encodeFrontendRequest(FR.SET_VRING_CALL, { index: 0, noFd: false }),
            fds: [call],
          },
          {
            data: encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: false }),
            fds: [kick],
          },
          {
            data: encodeFrontendRequest(FR.SET_VRING_ENABLE, { index: 0, num: 1 }),
            fds: [],
            poke: kick,
          },
        ],
      };
    },
  },
  {
    id: "truncated-hang-up",
    title: "SET_FEATURES cut after 4 of 8 payload bytes, then a hang-up",
    build: () => ({
      chunks: [
        {
          data: header(FR.SET_FEATURES, VHOST_USER_VERSION, 8, new Uint8Array(4)),
          fds: [],
        },
      ],
      hangUp: true,
    }),
  },
];

/** What the back-end did with a malformed exchange on its connection. */
async function sendAndWatch(fd: number, m: Malformed): Promise<{ reaction: string; sent: number }> {
  const { chunks, hangUp } = m.build();
  let sent = 0;
  try {
    for (const c of chunks) {
      const n = native.sendmsg(fd, c.data, 0, c.data.length, c.fds);
      if (n === null) break;
      sent++;
      if (c.poke !== undefined) native.eventfdWrite(c.poke, 1);
      await sleep(5);
    }
  } catch (err) {
    return { reaction: `send failed (${errorText(err)})`, sent };
  } finally {
    for (const c of chunks) for (const f of c.fds) native.close(f);
  }
  if (hangUp) return { reaction: "hung up", sent };
  const buf = new Uint8Array(4096);
  const deadline = Date.now() + 800;
  let replies = 0;
  while (Date.now() < deadline) {
    let r;
    try {
      r = native.recvmsg(fd, buf, 0, buf.length);
    } catch (err) {
      return { reaction: `connection reset (${errorText(err)})`, sent };
    }
    if (r === null) {
      await sleep(10);
      continue;
    }
    for (const f of r.fds) native.close(f);
    if (r.bytes === 0) return { reaction: "closed the connection", sent };
    replies++;
  }
  return {
    reaction: replies > 0 ? "answered and kept the connection" : "kept the connection",
    sent,
  };
}

function malformedCheck(m: Malformed): CheckSpec {
  return {
    id: `robustness.${m.id}`,
    section: "robustness",
    spec: "vhost-user: Header, Communication",
    title: `${m.title}: only that connection fails; the back-end keeps serving`,
    run: async (ctx: CheckContext): Promise<CheckOutcome> => {
      let fd = -1;
      try {
        fd = await ctx.target.openFd();
      } catch (err) {
        return { result: "fail", detail: `no connection before the message: ${errorText(err)}` };
      }
      let reaction: string;
      try {
        reaction = (await sendAndWatch(fd, m)).reaction;
      } finally {
        native.close(fd);
      }
      await sleep(50);
      const exit = await ctx.target.takeExit(300);
      // A shell running the spawn command reports a child killed by signal N as 128 + N.
      const signal =
        exit?.signal ??
        (exit?.code != null && exit.code > 128 ? `signal ${exit.code - 128}` : null);
      if (signal !== null) {
        return {
          result: "fail",
          detail: `${reaction}; the back-end process was killed by ${signal}`,
        };
      }
      const exitNote = exit
        ? `; the back-end process exited with status ${exit.code} (it serves one front-end; restarted)`
        : "";
      try {
        const fe = await ctx.target.open();
        await ctx.target.done(fe);
      } catch (err) {
        return {
          result: "fail",
          detail: `${reaction}${exitNote}; then no fresh connection was served: ${errorText(err)}`,
        };
      }
      return {
        result: "pass",
        detail: `${reaction}${exitNote}; a fresh connection answered GET_FEATURES`,
      };
    },
  };
}

function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

const fdLeak: CheckSpec = {
  id: "robustness.fd-count",
  section: "robustness",
  spec: "vhost-user: Communication (no fd outlives its connection)",
  title: "the back-end's fd count after many connections that share memory and eventfds",
  run: async (ctx) => {
    if (ctx.pid === null) return na("needs --pid");
    if (ctx.target.restartable) return na("the back-end is restarted per connection (--spawn)");
    const before = fdCount(ctx.pid);
    const n = ctx.connections;
    for (let i = 0; i < n; i++) {
      const fe = await ctx.target.open();
      const mfd = native.memfdCreate("vhostkit-check-fds");
      native.ftruncate(mfd, 1 << 16);
      const kick = native.eventfd(0);
      const call = native.eventfd(0);
      try {
        fe.send(FR.SET_OWNER, null);
        fe.send(FR.SET_FEATURES, featureSet(VirtioFeature.VERSION_1));
        fe.send(
          FR.SET_MEM_TABLE,
          {
            regions: [
              {
                guestPhysAddr: 0n,
                memorySize: 1n << 16n,
                userspaceAddr: 0x7f00_0000_0000n,
                mmapOffset: 0n,
              },
            ],
          },
          [mfd],
        );
        fe.send(FR.SET_VRING_CALL, { index: 0, noFd: false }, [call]);
        fe.send(FR.SET_VRING_KICK, { index: 0, noFd: false }, [kick]);
        await fe.getFeatures();
      } finally {
        native.close(mfd);
        native.close(kick);
        native.close(call);
        fe.close();
      }
      await sleep(5);
    }
    await sleep(500);
    const after = fdCount(ctx.pid);
    const d = `pid ${ctx.pid}: ${before} fds before, ${after} after ${n} connections (each SET_MEM_TABLE + 2 eventfds)`;
    return after <= before + 2 ? { result: "pass", detail: d } : { result: "fail", detail: d };
  },
};

/** The robustness rows of the battery (each on fresh connections). */
export const ROBUSTNESS_CHECKS: readonly CheckSpec[] = Object.freeze([
  ...MALFORMED.map(malformedCheck),
  fdLeak,
]);

/** @returns the ids of the malformed messages, for docs and tests */
export function malformedIds(): string[] {
  return MALFORMED.map((m) => m.id);
}
