/**
 * The protocol coverage table, generated from the request table (docs/protocol.md).
 */
import { type SizeRange } from "./codecs.js";
import {
  type AnyRequestSpec,
  type HandlerReply,
  BACKEND_REQUEST_SPECS,
  FRONTEND_REQUEST_SPECS,
  describeGate,
} from "./table.js";
import { ProtocolFeature } from "./constants.js";

function range(r: SizeRange | null): string {
  if (r === null) return "-";
  return r.min === r.max ? String(r.min) : `${r.min}..${r.max}`;
}

function reply(spec: AnyRequestSpec): string {
  if (spec.replyCodec === null) return "ack only";
  const body = `${spec.replyCodec.name} (${range(spec.replySize)})`;
  if (spec.reply === "postcopy") return `${body}, postcopy only; else ack only`;
  if (spec.replyFeature !== null) {
    return `${body}, with ${ProtocolFeature[spec.replyFeature]}; else ack only`;
  }
  return body;
}

/** The back-end column: whether the handler table has the request, and how it answers. */
function handled(rule: HandlerReply | undefined): string {
  if (rule === undefined) return "not handled";
  return rule === "none" ? "handled, no REPLY_ACK" : "handled";
}

function rows(
  specs: readonly AnyRequestSpec[],
  backend?: ReadonlyMap<number, HandlerReply>,
): string[] {
  return specs.map((s) =>
    [
      "",
      String(s.id),
      s.name,
      `${s.codec.name} (${range(s.size)})`,
      range(s.fds),
      reply(s),
      range(s.replyFds),
      describeGate(s.gate) + (s.allowedBeforeFeatures ? ", before SET_FEATURES" : ""),
      ...(backend ? [handled(backend.get(s.id))] : []),
      s.summary,
      "",
    ]
      .join(" | ")
      .trim(),
  );
}

const HEAD = [
  "| id | name | request payload (bytes) | fds | reply | reply fds | gate | what |",
  "|---|---|---|---|---|---|---|---|",
];

const HEAD_WITH_BACKEND = [
  "| id | name | request payload (bytes) | fds | reply | reply fds | gate | back-end | what |",
  "|---|---|---|---|---|---|---|---|---|",
];

/** Options of {@link renderProtocolDoc}. */
export interface ProtocolDocOptions {
  /**
   * The front-end requests vhostkit's back-end handles, each with its reply rule
   * (`BackendSession.handledRequests`): shown in a "back-end" column. The protocol layer
   * cannot import the back-end, so the caller passes it.
   */
  backend?: ReadonlyMap<number, HandlerReply>;
}

/**
 * Render docs/protocol.md from the request table.
 * @param options the back-end's handled requests, for the "back-end" column
 * @returns the Markdown text
 */
export function renderProtocolDoc(options: ProtocolDocOptions = {}): string {
  const backend = options.backend;
  return [
    "# vhost-user protocol coverage",
    "",
    "Generated from `src/protocol/table.ts` by `node scripts/gen-protocol-doc.mjs` (after a",
    "build); `test/protocol-doc.test.ts` fails when this file is out of date. Do not edit by hand.",
    "",
    "Every request below is decoded, validated (size, fds, fields) and encoded by the library.",
    '"ack only" means the request has no reply body: with REPLY_ACK negotiated and NEED_REPLY',
    "set, the receiver answers with a u64 (0 = success). A request that has a reply body gets",
    "exactly one reply, whatever NEED_REPLY says.",
    ...(backend
      ? [
          "",
          'The "back-end" column comes from the back-end\'s handler table (`BackendSession`,',
          "`src/backend/session.ts`): a request it does not handle is refused with",
          '`ERR_VHOST_REQUEST_FAILED` "request not supported by this back-end" (a failure reply',
          'where one is due, else the connection is closed). "no REPLY_ACK": a success is not',
          "acknowledged even when NEED_REPLY is set (a failure is).",
        ]
      : []),
    "",
    "## Front-end requests (main channel)",
    "",
    ...(backend ? HEAD_WITH_BACKEND : HEAD),
    ...rows(FRONTEND_REQUEST_SPECS, backend),
    "",
    "## Back-end requests (back-end request channel)",
    "",
    ...HEAD,
    ...rows(BACKEND_REQUEST_SPECS),
    "",
  ].join("\n");
}
