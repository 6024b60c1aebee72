//! Images: references, registry pulls, the content store, snapshots.

pub mod unpack;
