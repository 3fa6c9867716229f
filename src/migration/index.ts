/**
 * Live migration, back-end side: the versioned state stream (seed 004) and the codec its stages
 * use.
 */
export * from "./state-codec.js";
export * from "./stream.js";
export * from "./transfer.js";
