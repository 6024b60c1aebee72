fn main() {
    println!("cargo:rerun-if-changed=proto/shim.proto");
    prost_build::compile_protos(&["proto/shim.proto"], &["proto/"]).expect("compile shim.proto");
}
