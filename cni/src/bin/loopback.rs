//! The `loopback` CNI plugin binary.

fn main() {
    berth_cni::plugin_main(berth_cni::Plugin::Loopback)
}
