//! The `portmap` CNI plugin binary.

fn main() {
    berth_cni::plugin_main(berth_cni::Plugin::Portmap)
}
