// Regenerate docs/protocol.md from the request table and the back-end's handler table. Run
// after a build:
//   npx tsc -p tsconfig.json && node scripts/gen-protocol-doc.mjs
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { renderProtocolDoc } from "../dist/src/protocol/doc.js";
import { BackendSession } from "../dist/src/backend/session.js";

const target = fileURLToPath(new URL("../docs/protocol.md", import.meta.url));
writeFileSync(target, renderProtocolDoc({ backend: BackendSession.handledRequests }));
console.log(`wrote ${target}`);
