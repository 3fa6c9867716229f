/**
 * The RARP announcement a back-end broadcasts for a guest after migration
 * (vhost-user: VHOST_USER_SEND_RARP), built as QEMU's `announce_self_create` builds it
 * (net/announce.c): a broadcast Ethernet frame of type RARP (0x8035), hardware type 1
 * (Ethernet), protocol 0x0800, opcode 3 (reverse request), sender and target hardware
 * address = the guest MAC, protocol addresses 0, padded to the 60-byte Ethernet minimum.
 * Its purpose is to teach every switch on the way where the MAC now lives.
 */
import { ETH_ZLEN, EtherType, toMacBytes } from "./frame.js";

/** RARP opcode "reverse request" (RFC 903). */
export const RARP_OP_REQUEST_REVERSE = 3;

/**
 * Build the RARP announcement for a MAC.
 * @param mac the guest MAC (6 bytes, or text)
 * @returns a new 60-byte frame
 * @throws RangeError for a malformed MAC
 */
export function buildRarp(mac: Uint8Array | string): Uint8Array {
  const m = toMacBytes(mac);
  const f = new Uint8Array(ETH_ZLEN);
  f.fill(0xff, 0, 6); // destination: broadcast
  f.set(m, 6); // source: the guest
  f[12] = EtherType.RARP >> 8;
  f[13] = EtherType.RARP & 0xff;
  f[14] = 0; // hardware type 1 (Ethernet)
  f[15] = 1;
  f[16] = EtherType.IPV4 >> 8; // protocol type IPv4
  f[17] = EtherType.IPV4 & 0xff;
  f[18] = 6; // hardware address length
  f[19] = 4; // protocol address length
  f[20] = 0;
  f[21] = RARP_OP_REQUEST_REVERSE;
  f.set(m, 22); // sender hardware address; sender protocol address 0 at 28..31
  f.set(m, 32); // target hardware address; target protocol address 0 at 38..41; padding to 60
  return f;
}
