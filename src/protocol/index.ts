/**
 * The vhost-user wire protocol as data: constants, payload codecs, the request table, framing
 * and coded errors.
 */
export * from "./constants.js";
export * from "./errors.js";
export * from "./codecs.js";
export * from "./table.js";
export * from "./framing.js";
export * from "./doc.js";
