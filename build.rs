//! Compiles the project's own API, `proto/kip/v1/kip.proto`, with a vendored protoc so the
//! build needs nothing from the system.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment meanwhile.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/kip/v1/kip.proto");
    tonic_prost_build::configure().compile_protos(&["proto/kip/v1/kip.proto"], &["proto"])?;
    Ok(())
}
