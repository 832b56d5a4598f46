use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Unit tests and lints of user space do not need the kernel object; an agent built this
        // way refuses to start and says why.
        std::fs::write(out_dir.join("agent-ebpf"), [])?;
        return Ok(());
    }
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("the agent crate has no parent directory"))?
        .join("agent-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {ebpf_dir:?}"))?;
    // The agent's `abi-next` feature builds the kernel programs with the next map layout too;
    // `verifier-reject` with a program the verifier must refuse (the kernel matrix's self-test);
    // `floor` with programs that return at once (bench connect's floor).
    let mut features = Vec::new();
    for (cargo_env, feature) in [
        ("CARGO_FEATURE_ABI_NEXT", "abi-next"),
        ("CARGO_FEATURE_VERIFIER_REJECT", "verifier-reject"),
        ("CARGO_FEATURE_FLOOR", "floor"),
    ] {
        println!("cargo:rerun-if-env-changed={cargo_env}");
        if std::env::var_os(cargo_env).is_some() {
            features.push(feature);
        }
    }
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir,
            features: &features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the kernel programs (run `cargo xtask setup` first)")
}
