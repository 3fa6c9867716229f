/**
 * docs/protocol.md is generated from the request table and must be up to date.
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { FRONTEND_REQUEST_SPECS, renderProtocolDoc } from "../src/protocol/index.js";

// dist/test/protocol-doc.test.js -> the package root
const docPath = fileURLToPath(new URL("../../docs/protocol.md", import.meta.url));

it("docs/protocol.md matches the request table (run scripts/gen-protocol-doc.mjs)", () => {
  const text = renderProtocolDoc();
  for (const spec of FRONTEND_REQUEST_SPECS)
    assert.match(text, new RegExp(`\\| ${spec.id} \\| ${spec.name} \\|`));
  assert.equal(readFileSync(docPath, "utf8"), text);
});
