//! Compiles `proto/cairn/v1/*.proto` with protox (pure Rust), so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not `env!`: a build script binary reused from
    // another checkout (a shared CARGO_TARGET_DIR) must not look there.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        "cairn/v1/agent_gateway.proto",
        "cairn/v1/admin.proto",
        "cairn/v1/probe.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
