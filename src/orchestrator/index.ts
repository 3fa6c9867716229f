/**
 * Live migration, front-end side: the orchestrator that moves a device driven by vhostkit's
 * front-end from a back-end on one host to a back-end on another.
 */
export * from "./stream.js";
export * from "./pages.js";
export * from "./virtio-state.js";
export * from "./source.js";
export * from "./destination.js";
export * from "./traffic.js";
