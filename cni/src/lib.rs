//! berth-cni: the CNI specification's types shared by Berth's plugins and by
//! berthd's plugin invocation.

pub mod spec;
