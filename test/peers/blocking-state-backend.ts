/**
 * A minimal vhost-user back-end that moves its device state the way the back-ends built on
 * rust-vmm's vhost-user-backend (virtiofsd-rs) and on QEMU 10's libvhost-user do: right after
 * answering SET_DEVICE_STATE_FD it reads or writes the whole state through the fd in one
 * blocking loop (here on a worker thread, as those back-ends do on their own thread), treats
 * EAGAIN as a failure, and answers CHECK_DEVICE_STATE with the outcome. No peer installed here
 * implements DEVICE_STATE (QEMU 7.2's virtiofsd and DPDK 22.11 do not), so this stands in for
 * them; it offers exactly the protocol features it is given.
 *
 * It answers the negotiation requests, acks everything else it is sent (REPLY_ACK), and does
 * not touch guest memory.
 */
import { Worker } from "node:worker_threads";

import { Channel } from "../../src/channel.js";
import type { FrontendMessage } from "../../src/channel.js";
import { native } from "../../src/native.js";
import {
  DeviceStateDirection,
  FrontendRequest,
  ProtocolFeature,
  VirtioFeature,
  featureMask,
  featureSet,
  hasFeature,
} from "../../src/protocol/constants.js";

/** The body of the worker: one blocking loop over the transfer fd. */
const WORKER_SOURCE = `
const { workerData, parentPort } = require("node:worker_threads");
const fs = require("node:fs");
const { fd, direction, state } = workerData;
try {
  if (direction === "save") {
    const buf = Buffer.from(state.buffer, state.byteOffset, state.byteLength);
    let off = 0;
    while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off);
    fs.closeSync(fd);
    parentPort.postMessage({ ok: true, bytes: off });
  } else {
    const parts = [];
    const chunk = Buffer.alloc(1 << 16);
    for (;;) {
      const n = fs.readSync(fd, chunk, 0, chunk.length, null);
      if (n === 0) break;
      parts.push(Buffer.from(chunk.subarray(0, n)));
    }
    fs.closeSync(fd);
    const data = Buffer.concat(parts);
    parentPort.postMessage({ ok: true, bytes: data.length, data });
  }
} catch (err) {
  try { fs.closeSync(fd); } catch {}
  parentPort.postMessage({ ok: false, code: err.code, message: String(err.message) });
}
`;

/** The outcome of one transfer. */
export interface BlockingTransfer {
  ok: boolean;
  bytes?: number;
  /** errno name of the failure (EAGAIN for a non-blocking fd) */
  code?: string;
  message?: string;
  data?: Uint8Array;
}

/** A back-end on one connection; see the file comment. */
export class BlockingStateBackend {
  readonly channel: Channel<"main">;
  /** the state a SAVE writes */
  state: Uint8Array;
  /** the last state a LOAD read */
  loaded: Uint8Array | null = null;
  /** every transfer's outcome */
  readonly transfers: BlockingTransfer[] = [];
  /** request names received */
  readonly received: string[] = [];
  #pending: Promise<BlockingTransfer> | null = null;

  /**
   * @param fd the connected socket (owned)
   * @param state the state a SAVE writes
   * @param protocolFeatures the protocol features offered
   */
  constructor(
    fd: number,
    state: Uint8Array,
    readonly protocolFeatures: bigint = featureSet(
      ProtocolFeature.LOG_SHMFD,
      ProtocolFeature.RARP,
      ProtocolFeature.REPLY_ACK,
      ProtocolFeature.DEVICE_STATE,
    ),
  ) {
    this.state = state;
    this.channel = new Channel<"main">(fd, { role: "backend", kind: "main", name: "blocking-be" });
    this.channel.on("message", (m: FrontendMessage) => {
      void this.#on(m);
    });
    this.channel.on("error", () => undefined);
  }

  async #on(m: FrontendMessage): Promise<void> {
    this.received.push(m.name);
    const ch = this.channel;
    const ack = (): void => {
      if (m.needReply && hasFeature(ch.protocolFeatures, ProtocolFeature.REPLY_ACK)) {
        ch.ack(m.request, true);
      }
    };
    switch (m.request) {
      case FrontendRequest.GET_FEATURES:
        ch.reply(
          m.request,
          featureSet(VirtioFeature.VERSION_1, VirtioFeature.PROTOCOL_FEATURES) |
            featureMask(VirtioFeature.LOG_ALL),
        );
        return;
      case FrontendRequest.GET_PROTOCOL_FEATURES:
        ch.reply(m.request, this.protocolFeatures);
        return;
      case FrontendRequest.SET_PROTOCOL_FEATURES:
        ch.setNegotiatedProtocolFeatures(m.payload);
        return;
      case FrontendRequest.SET_DEVICE_STATE_FD: {
        const fd = m.fds[0] as number;
        for (const extra of m.fds.slice(1)) native.close(extra);
        const save = m.payload.direction === DeviceStateDirection.SAVE;
        ch.reply(m.request, { result: 0, noFd: true });
        // ORDERING: the reply goes first; the blocking loop runs while the front-end reads.
        this.#pending = new Promise<BlockingTransfer>((resolve) => {
          const w = new Worker(WORKER_SOURCE, {
            eval: true,
            workerData: { fd, direction: save ? "save" : "load", state: this.state },
          });
          w.once("message", (r: BlockingTransfer) => {
            resolve(r);
            void w.terminate();
          });
          w.once("error", (e: Error) => resolve({ ok: false, message: e.message }));
        });
        return;
      }
      case FrontendRequest.CHECK_DEVICE_STATE: {
        const r = this.#pending ? await this.#pending : { ok: false, message: "no transfer" };
        this.#pending = null;
        this.transfers.push(r);
        if (r.ok && r.data) this.loaded = new Uint8Array(r.data);
        ch.reply(m.request, r.ok ? 0n : 1n);
        return;
      }
      default:
        for (const fd of m.fds) native.close(fd);
        ack();
    }
  }

  /** Close the connection. */
  close(): void {
    this.channel.close();
  }
}
