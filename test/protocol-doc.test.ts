/**
 * docs/protocol.md is generated from the request table and the back-end's handler table, and
 * must be up to date.
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { FRONTEND_REQUEST_SPECS, renderProtocolDoc } from "../src/protocol/index.js";
import { BackendSession } from "../src/backend/session.js";

// dist/test/protocol-doc.test.js -> the package root
const docPath = fileURLToPath(new URL("../../docs/protocol.md", import.meta.url));

it("docs/protocol.md matches the request table (run scripts/gen-protocol-doc.mjs)", () => {
  const text = renderProtocolDoc({ backend: BackendSession.handledRequests });
  for (const spec of FRONTEND_REQUEST_SPECS)
    assert.match(text, new RegExp(`\\| ${spec.id} \\| ${spec.name} \\|`));
  assert.equal(readFileSync(docPath, "utf8"), text);
});

it("docs/protocol.md marks a request handled exactly when the back-end has a handler for it", () => {
  const lines = readFileSync(docPath, "utf8").split("\n");
  const head = lines.findIndex((l) => l.startsWith("| id | name |"));
  assert.ok(head >= 0, "the front-end table");
  const column = lines[head]!.split("|")
    .map((c) => c.trim())
    .indexOf("back-end");
  assert.ok(column > 0, "a back-end column in the front-end table");
  const marked = new Map<string, string>();
  for (const line of lines.slice(head + 2)) {
    if (!line.startsWith("|")) break;
    const cells = line.split("|").map((c) => c.trim());
    marked.set(cells[2]!, cells[column]!);
  }
  assert.equal(marked.size, FRONTEND_REQUEST_SPECS.length, "one row per front-end request");
  for (const spec of FRONTEND_REQUEST_SPECS) {
    const cell = marked.get(spec.name);
    const handler = BackendSession.handledRequests.get(spec.id);
    assert.equal(
      cell?.startsWith("handled"),
      handler !== undefined,
      `${spec.name}: docs/protocol.md says "${cell}", the handler table has ${handler ? `a "${handler}" handler` : "no handler"}`,
    );
  }
});
