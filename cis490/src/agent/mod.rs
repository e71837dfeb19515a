//! The guest agent: the in-guest writer (`cis490 agent`) and the host-side reader of
//! its virtio-serial stream.

pub mod clockmap;
pub mod guest;
pub mod line;
pub mod reader;
