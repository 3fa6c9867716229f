/**
 * The virtual switch, its vhost-user-net ports, their migration state and the host uplinks
 * (public API of `src/net/`).
 */
export * from "./port.js";
export * from "./frame.js";
export * from "./rarp.js";
export * from "./ctrl.js";
export * from "./switch.js";
export * from "./virtio-net.js";
export * from "./port-state.js";
export * from "./uplink.js";
export * from "./uplink-tap.js";
export * from "./uplink-vxlan.js";
