/**
 * The protocol coverage table, generated from the request table (docs/protocol.md).
 */
import { type SizeRange } from "./codecs.js";
import {
  type AnyRequestSpec,
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

function rows(specs: readonly AnyRequestSpec[]): string[] {
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

/**
 * Render docs/protocol.md from the request table.
 * @returns the Markdown text
 */
export function renderProtocolDoc(): string {
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
    "",
    "## Front-end requests (main channel)",
    "",
    ...HEAD,
    ...rows(FRONTEND_REQUEST_SPECS),
    "",
    "## Back-end requests (back-end request channel)",
    "",
    ...HEAD,
    ...rows(BACKEND_REQUEST_SPECS),
    "",
  ].join("\n");
}
