/**
 * Model-based property test of a ring's lifecycle at the migration boundary, worker-thread
 * queues, split and packed: the same model and steps as the main-thread variant
 * (test/ring-lifecycle-model.ts), with the device's handler in the ring's worker.
 */
import { test } from "node:test";

import { checkModel } from "./ring-lifecycle-model.js";

for (const packed of [false, true]) {
  test(`ring lifecycle against a model, worker queue (${packed ? "packed" : "split"}): used exactly once, never while stopped; writes logged; base as the model's`, async () => {
    await checkModel(packed, true, 15);
  });
}
