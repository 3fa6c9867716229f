/**
 * Channel on live socketpairs: fds travel with their message, replies match requests,
 * REPLY_ACK, protocol errors close only the offending connection and leak no fd, and a large
 * burst goes through the EAGAIN path in order.
 */
import { afterEach, before, beforeEach, describe, it } from "node:test";
import assert from "node:assert/strict";
import diagnostics_channel from "node:diagnostics_channel";
import { once } from "node:events";
import { readdirSync } from "node:fs";
import { native } from "../src/native.js";
import {
  Channel,
  MESSAGE_DIAGNOSTICS_CHANNEL,
  type FrontendMessage,
  type BackendMessage,
  type MessageDiagnostic,
} from "../src/channel.js";
import {
  BackendRequest,
  FrontendRequest as FR,
  ProtocolFeature,
  VhostUserError,
  encodeFrontendReply,
  encodeFrontendRequest,
  encodeHeader,
  featureMask,
} from "../src/protocol/index.js";

function openFds(): string[] {
  return readdirSync("/proc/self/fd").sort();
}

/** A front-end and a back-end channel on the two ends of a socketpair. */
function mainPair(): { fe: Channel<"main">; be: Channel<"main"> } {
  const [a, b] = native.socketpair();
  return {
    be: new Channel(a, { role: "backend", kind: "main", name: "be" }),
    fe: new Channel(b, { role: "frontend", kind: "main", name: "fe" }),
  };
}

/** A channel of `role` on one end, the raw socket fd on the other. */
function rawPeer(role: "frontend" | "backend"): { ch: Channel<"main">; raw: number } {
  const [a, b] = native.socketpair();
  return { ch: new Channel(a, { role, kind: "main", name: `raw-${role}` }), raw: b };
}

function sendRaw(fd: number, bytes: Uint8Array, fds: number[] = []): void {
  const n = native.sendmsg(fd, bytes, 0, bytes.length, fds);
  assert.equal(n, bytes.length);
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Wait for a channel to close; collect the error it emitted, if any. */
function closed(ch: Channel): Promise<{ error: VhostUserError | undefined; cause: unknown }> {
  let error: VhostUserError | undefined;
  ch.on("error", (e: VhostUserError) => {
    error = e;
  });
  return new Promise((resolve) => {
    ch.once("close", (cause: unknown) => resolve({ error, cause }));
  });
}

/** A back-end that answers the requests the tests use. */
function serve(be: Channel<"main">): void {
  be.on("message", (m: FrontendMessage) => {
    for (const fd of m.fds) native.close(fd);
    switch (m.request) {
      case FR.GET_FEATURES:
        be.reply(m.request, 0x140000000n);
        return;
      case FR.GET_PROTOCOL_FEATURES:
        be.reply(m.request, 0x800bn);
        return;
      case FR.GET_VRING_BASE:
        be.reply(m, { index: m.payload.index, num: 0x1234 });
        return;
      default:
        if (be.needsAck(m)) be.ack(m, true);
    }
  });
}

/** Check that a healthy pair still works. */
async function roundTrip(fe: Channel<"main">): Promise<void> {
  const r = await fe.request(FR.GET_FEATURES, null);
  assert.equal(r.kind, "reply");
  assert.equal(r.payload, 0x140000000n);
}

let baseline: string[] = [];

before(() => {
  // The addon opens one epoll fd per environment on first use: open it before the baselines.
  const { fe, be } = mainPair();
  fe.close();
  be.close();
});

beforeEach(() => {
  baseline = openFds();
});

afterEach(() => {
  assert.deepEqual(openFds(), baseline, "fds leaked");
});

describe("channel: messages and fds", () => {
  it("a request with an fd arrives with its fd (an eventfd written on the other side)", async () => {
    const { fe, be } = mainPair();
    const efd = native.eventfd(0);
    const got = once(be, "message");
    fe.send(FR.SET_VRING_KICK, { index: 0, noFd: false }, [efd]);
    const [m] = (await got) as [FrontendMessage];
    assert.equal(m.name, "SET_VRING_KICK");
    assert.deepEqual(m.payload, { index: 0, noFd: false });
    assert.equal(m.fds.length, 1);
    const received = m.fds[0] as number;
    assert.notEqual(received, efd);
    assert.equal(native.eventfdWrite(received, 3), true);
    assert.equal(native.eventfdRead(efd), 3n);
    native.close(received);
    native.close(efd);
    fe.close();
    be.close();
  });

  it("matches replies to requests in order, with reply fds", async () => {
    const { fe, be } = mainPair();
    const pf = featureMask(ProtocolFeature.INFLIGHT_SHMFD);
    fe.setNegotiatedProtocolFeatures(pf);
    be.setNegotiatedProtocolFeatures(pf);
    be.on("message", (m: FrontendMessage) => {
      switch (m.request) {
        case FR.GET_FEATURES:
          be.reply(m.request, 0x140000000n);
          return;
        case FR.GET_VRING_BASE:
          be.reply(m, { index: m.payload.index, num: 100 + m.payload.index });
          return;
        case FR.GET_INFLIGHT_FD: {
          const memfd = native.memfdCreate("inflight");
          be.reply(m, { ...m.payload, mmapSize: 0x1000n }, [memfd]);
          native.close(memfd); // the channel never owns the fds it sends
          return;
        }
        default:
          assert.fail(`unexpected ${m.name}`);
      }
    });
    const [f, b0, b1, inflight] = await Promise.all([
      fe.request(FR.GET_FEATURES, null),
      fe.request(FR.GET_VRING_BASE, { index: 0, num: 0 }),
      fe.request(FR.GET_VRING_BASE, { index: 1, num: 0 }),
      fe.request(FR.GET_INFLIGHT_FD, {
        mmapSize: 0n,
        mmapOffset: 0n,
        numQueues: 2,
        queueSize: 256,
      }),
    ]);
    assert.equal(f.payload, 0x140000000n);
    assert.deepEqual(b0.payload, { index: 0, num: 100 });
    assert.deepEqual(b1.payload, { index: 1, num: 101 });
    assert.equal(inflight.kind, "reply");
    assert.deepEqual(inflight.payload, {
      mmapSize: 0x1000n,
      mmapOffset: 0n,
      numQueues: 2,
      queueSize: 256,
    });
    assert.equal(inflight.fds.length, 1);
    assert.equal(native.fstatSize(inflight.fds[0] as number), 0);
    native.close(inflight.fds[0] as number);
    assert.equal(fe.pendingRequests, 0);
    fe.close();
    be.close();
  });

  it("REPLY_ACK: NEED_REPLY is set and the ack awaited; a non-zero ack rejects", async () => {
    const { fe, be } = mainPair();
    const seen: FrontendMessage[] = [];
    be.on("message", (m: FrontendMessage) => {
      seen.push(m);
      if (!be.needsAck(m)) return;
      be.ack(m, m.request !== FR.SET_VRING_ADDR);
    });
    // without REPLY_ACK a request without a reply body cannot be awaited
    await assert.rejects(fe.request(FR.SET_VRING_NUM, { index: 0, num: 256 }), {
      code: "ERR_VHOST_NOT_NEGOTIATED",
    });
    const pf = featureMask(ProtocolFeature.REPLY_ACK);
    fe.setNegotiatedProtocolFeatures(pf);
    be.setNegotiatedProtocolFeatures(pf);
    const ok = await fe.request(FR.SET_VRING_NUM, { index: 0, num: 256 });
    assert.equal(ok.kind, "ack");
    assert.equal(ok.payload, 0n);
    assert.equal(seen.at(-1)?.needReply, true);
    await assert.rejects(
      fe.request(FR.SET_VRING_ADDR, {
        index: 0,
        flags: 0,
        descUserAddr: 0n,
        usedUserAddr: 0n,
        availUserAddr: 0n,
        logGuestAddr: 0n,
      }),
      (err: VhostUserError) => {
        assert.equal(err.code, "ERR_VHOST_REQUEST_FAILED");
        assert.equal(err.message, "SET_VRING_ADDR: peer answered with a failure ack (ack=0x1)");
        return true;
      },
    );
    // NEED_REPLY on a request with a reply body: one reply only, the body
    be.removeAllListeners("message");
    serve(be);
    const r = await fe.request(FR.GET_FEATURES, null, [], { needReply: true });
    assert.equal(r.kind, "reply");
    await roundTrip(fe);
    // send() without NEED_REPLY: no reply comes, nothing is pending
    fe.send(FR.SET_OWNER, null);
    assert.equal(fe.pendingRequests, 0);
    await roundTrip(fe);
    fe.close();
    be.close();
  });

  it("send() of a request with a reply body consumes the reply and closes its fds", async () => {
    const { fe, be } = mainPair();
    const pf = featureMask(ProtocolFeature.INFLIGHT_SHMFD);
    fe.setNegotiatedProtocolFeatures(pf);
    be.setNegotiatedProtocolFeatures(pf);
    be.on("message", (m: FrontendMessage) => {
      if (m.request === FR.GET_INFLIGHT_FD) {
        const memfd = native.memfdCreate("inflight");
        be.reply(m, m.payload, [memfd]);
        native.close(memfd);
      }
    });
    serve(be);
    fe.send(FR.GET_INFLIGHT_FD, { mmapSize: 0n, mmapOffset: 0n, numQueues: 1, queueSize: 8 });
    assert.equal(fe.pendingRequests, 1);
    await roundTrip(fe);
    assert.equal(fe.pendingRequests, 0);
    fe.close();
    be.close();
  });

  it("roles flip on the back-end request channel", async () => {
    const [a, b] = native.socketpair();
    const be = new Channel(a, { role: "backend", kind: "backend-req" });
    const fe = new Channel(b, { role: "frontend", kind: "backend-req" });
    assert.equal(be.isRequester, true);
    assert.equal(fe.isRequester, false);
    fe.on("message", (m: BackendMessage) => {
      if (m.request === BackendRequest.SHARED_OBJECT_LOOKUP) {
        const memfd = native.memfdCreate("dmabuf");
        fe.reply(m, 0n, [memfd]);
        native.close(memfd);
      }
    });
    const r = await be.request(
      BackendRequest.SHARED_OBJECT_LOOKUP,
      { uuid: new Uint8Array(16) },
      [],
      {
        needReply: true,
      },
    );
    assert.equal(r.kind, "reply");
    assert.equal(r.payload, 0n);
    assert.equal(r.fds.length, 1);
    native.close(r.fds[0] as number);
    // a front-end does not send requests on this channel
    assert.throws(() => fe.send(BackendRequest.CONFIG_CHANGE_MSG, null), TypeError);
    assert.throws(() => be.ack(BackendRequest.CONFIG_CHANGE_MSG, true), TypeError);
    be.close();
    fe.close();
  });

  it("publishes every message on diagnostics_channel", async () => {
    const { fe, be } = mainPair();
    serve(be);
    const seen: MessageDiagnostic[] = [];
    const listener = (m: unknown) => seen.push(m as MessageDiagnostic);
    diagnostics_channel.subscribe(MESSAGE_DIAGNOSTICS_CHANNEL, listener);
    try {
      await roundTrip(fe);
    } finally {
      diagnostics_channel.unsubscribe(MESSAGE_DIAGNOSTICS_CHANNEL, listener);
    }
    assert.deepEqual(
      seen.map((s) => `${s.channel}:${s.direction}:${s.kind}:${s.name}:${s.size}:${s.fds}`),
      [
        "fe:out:request:GET_FEATURES:0:0",
        "be:in:request:GET_FEATURES:0:0",
        "be:out:reply:GET_FEATURES:8:0",
        "fe:in:reply:GET_FEATURES:8:0",
      ],
    );
    fe.close();
    be.close();
  });

  it("close is idempotent; pending requests reject with ERR_VHOST_CLOSED when the peer goes", async () => {
    const { fe, be } = mainPair();
    be.on("message", () => be.close());
    const done = closed(fe);
    await assert.rejects(fe.request(FR.GET_FEATURES, null), { code: "ERR_VHOST_CLOSED" });
    const { cause } = await done;
    assert.ok(cause instanceof VhostUserError);
    fe.close();
    fe.close();
    assert.equal(fe.closed, true);
    assert.throws(() => fe.send(FR.SET_OWNER, null), { code: "ERR_VHOST_CLOSED" });
    await assert.rejects(fe.request(FR.GET_FEATURES, null), { code: "ERR_VHOST_CLOSED" });
  });

  it("a request timeout rejects with ERR_VHOST_TIMEOUT and closes the channel", async () => {
    const { fe, be } = mainPair();
    be.on("message", () => undefined); // never answers
    const done = closed(fe);
    const second = fe.request(FR.GET_PROTOCOL_FEATURES, null);
    await assert.rejects(fe.request(FR.GET_FEATURES, null, [], { timeoutMs: 30 }), {
      code: "ERR_VHOST_TIMEOUT",
    });
    await assert.rejects(second, { code: "ERR_VHOST_CLOSED" });
    await done;
    be.close();
  });
});

describe("channel: protocol errors close only that connection", () => {
  const cases: Array<{
    title: string;
    role: "frontend" | "backend";
    code: string;
    act: (raw: number, ch: Channel<"main">) => void;
    message?: RegExp;
    /** the case closes the raw end itself */
    closesRaw?: boolean;
  }> = [
    {
      title: "wrong payload size",
      role: "backend",
      code: "ERR_VHOST_BAD_PAYLOAD_SIZE",
      act: (raw) =>
        sendRaw(raw, concat(encodeHeader({ request: 8, flags: 1, size: 4 }), new Uint8Array(4))),
      message: /^SET_VRING_NUM: request payload must be 8 bytes \(size=4\)$/,
    },
    {
      title: "unknown request id",
      role: "backend",
      code: "ERR_VHOST_UNKNOWN_REQUEST",
      act: (raw) => sendRaw(raw, encodeHeader({ request: 99, flags: 1, size: 0 })),
      message: /\(request=99\)$/,
    },
    {
      title: "bad version",
      role: "backend",
      code: "ERR_VHOST_BAD_VERSION",
      act: (raw) => sendRaw(raw, encodeHeader({ request: 3, flags: 2, size: 0 })),
    },
    {
      title: "unexpected fds (an eventfd on SET_VRING_NUM)",
      role: "backend",
      code: "ERR_VHOST_UNEXPECTED_FDS",
      act: (raw) => {
        const efd = native.eventfd(0);
        sendRaw(raw, encodeFrontendRequest(FR.SET_VRING_NUM, { index: 0, num: 8 }), [efd]);
        native.close(efd);
      },
    },
    {
      title: "missing fds (SET_MEM_TABLE without fds)",
      role: "backend",
      code: "ERR_VHOST_MISSING_FDS",
      act: (raw) =>
        sendRaw(
          raw,
          encodeFrontendRequest(FR.SET_MEM_TABLE, {
            regions: [{ guestPhysAddr: 0n, memorySize: 4096n, userspaceAddr: 0n, mmapOffset: 0n }],
          }),
        ),
    },
    {
      title: "a truncated message (peer hangs up mid-body, with an fd pending)",
      role: "backend",
      code: "ERR_VHOST_TRUNCATED",
      act: (raw) => {
        const efd = native.eventfd(0);
        const m = encodeFrontendRequest(FR.SET_VRING_KICK, { index: 0, noFd: false });
        sendRaw(raw, m.subarray(0, 15), [efd]);
        native.close(efd);
        native.close(raw);
      },
      closesRaw: true,
      message:
        /^SET_VRING_KICK: peer hung up mid-message, 5 of 8 payload bytes missing \(missing=5\)$/,
    },
    {
      title: "a peer hanging up mid-header",
      role: "backend",
      code: "ERR_VHOST_TRUNCATED",
      act: (raw) => {
        sendRaw(raw, Uint8Array.of(8, 0, 0, 0, 1));
        native.close(raw);
      },
      closesRaw: true,
      message: /^header: peer hung up mid-header, 7 of 12 header bytes missing/,
    },
    {
      title: "a reply without a pending request",
      role: "frontend",
      code: "ERR_VHOST_UNEXPECTED_REPLY",
      act: (raw) => sendRaw(raw, encodeFrontendReply(FR.GET_FEATURES, 1n)),
    },
    {
      title: "a reply to the wrong request",
      role: "frontend",
      code: "ERR_VHOST_UNEXPECTED_REPLY",
      act: (raw, ch) => {
        ch.request(FR.GET_FEATURES, null).catch((err: VhostUserError) => {
          assert.equal(err.code, "ERR_VHOST_CLOSED");
        });
        sendRaw(raw, encodeFrontendReply(FR.GET_PROTOCOL_FEATURES, 1n));
      },
      message: /oldest pending request GET_FEATURES/,
    },
    {
      title: "a request on a reply stream",
      role: "frontend",
      code: "ERR_VHOST_BAD_FIELD",
      act: (raw) => sendRaw(raw, encodeFrontendRequest(FR.SET_OWNER, null)),
    },
  ];

  for (const c of cases) {
    it(`${c.title} -> ${c.code}`, async () => {
      const healthy = mainPair();
      serve(healthy.be);
      const { ch, raw } = rawPeer(c.role);
      if (c.role === "backend") {
        ch.on("message", (m: FrontendMessage) => {
          for (const fd of m.fds) native.close(fd);
        });
      }
      const done = closed(ch);
      c.act(raw, ch);
      const { error, cause } = await done;
      assert.ok(error instanceof VhostUserError, "no error emitted");
      assert.equal(error.code, c.code, error.message);
      assert.equal(cause, error);
      if (c.message) assert.match(error.message, c.message);
      assert.equal(ch.closed, true);
      // the other connection keeps working
      assert.equal(healthy.fe.closed, false);
      await roundTrip(healthy.fe);
      // (closing a raw end twice could close an fd the channel received under the same number)
      if (!c.closesRaw) native.close(raw);
      healthy.fe.close();
      healthy.be.close();
    });
  }

  it("without an error listener, a protocol error still only closes the connection", async () => {
    const { ch, raw } = rawPeer("backend");
    const done = new Promise((resolve) => ch.once("close", resolve));
    sendRaw(raw, encodeHeader({ request: 99, flags: 1, size: 0 }));
    const cause = await done;
    assert.ok(cause instanceof VhostUserError);
    native.close(raw);
  });
});

describe("channel: bursts and EAGAIN", () => {
  it("10,000 SET_VRING_NUM (with fds on some) arrive in order through a full socket buffer", async () => {
    const { fe, be } = mainPair();
    const N = 10_000;
    let next = 0;
    let calls = 0;
    const done = new Promise<void>((resolve, reject) => {
      be.on("message", (m: FrontendMessage) => {
        try {
          if (m.request === FR.SET_VRING_CALL) {
            assert.equal(m.fds.length, 1);
            assert.equal(native.eventfdWrite(m.fds[0] as number, 1), true);
            native.close(m.fds[0] as number);
            calls++;
            return;
          }
          assert.equal(m.request, FR.SET_VRING_NUM);
          assert.deepEqual(m.payload, { index: next % 256, num: next });
          next++;
          if (next === N) resolve();
        } catch (err) {
          reject(err as Error);
        }
      });
    });
    const efd = native.eventfd(0);
    let maxQueued = 0;
    for (let i = 0; i < N; i++) {
      fe.send(FR.SET_VRING_NUM, { index: i % 256, num: i });
      if (i % 1000 === 999) fe.send(FR.SET_VRING_CALL, { index: 0, noFd: false }, [efd]);
      maxQueued = Math.max(maxQueued, fe.writeQueueLength);
    }
    assert.ok(maxQueued > 0, "the socket buffer never filled: EAGAIN path not exercised");
    await done;
    assert.equal(calls, 10);
    // each call fd was a dup of efd: 10 writes of 1
    assert.equal(native.eventfdRead(efd), 10n);
    assert.equal(fe.writeQueueLength, 0);
    native.close(efd);
    serve(be);
    await roundTrip(fe);
    fe.close();
    be.close();
  });

  it("queued fds are released when the channel closes before they are sent", async () => {
    const { fe, be } = mainPair();
    be.on("message", (m: FrontendMessage) => {
      for (const fd of m.fds) native.close(fd);
    });
    const efd = native.eventfd(0);
    for (let i = 0; i < 5000 && fe.writeQueueLength === 0; i++) {
      fe.send(FR.SET_VRING_NUM, { index: 0, num: i });
    }
    assert.ok(fe.writeQueueLength > 0);
    for (let i = 0; i < 5; i++) fe.send(FR.SET_VRING_CALL, { index: 0, noFd: false }, [efd]);
    native.close(efd);
    fe.close();
    await new Promise((resolve) => setImmediate(resolve));
    be.close();
  });
});
