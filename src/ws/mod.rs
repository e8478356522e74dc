//! The RFC 6455 layer: frames ([`codec`]) and the opening handshake
//! ([`handshake`]). Nothing here knows about users or JSON.

pub mod codec;
pub mod handshake;
