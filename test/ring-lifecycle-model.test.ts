/**
 * Model-based property test of a ring's lifecycle at the migration boundary, main-thread
 * queues, split and packed (the model and its steps: test/ring-lifecycle-model.ts).
 */
import { test } from "node:test";

import { checkModel } from "./ring-lifecycle-model.js";

for (const packed of [false, true]) {
  test(`ring lifecycle against a model (${packed ? "packed" : "split"}): used exactly once, never while stopped; writes logged; base as the model's`, async () => {
    await checkModel(packed, false, 25);
  });
}
