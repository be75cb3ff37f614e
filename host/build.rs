//! With the `embedded-bundle` feature: the bundle named by `OPENSHELL_EMBED_BUNDLE` (a path)
//! is built into the binary (`src/bundle.rs` includes it); a missing one fails the build.

fn main() {
    println!("cargo:rerun-if-env-changed=OPENSHELL_EMBED_BUNDLE");
    if std::env::var_os("CARGO_FEATURE_EMBEDDED_BUNDLE").is_none() {
        return;
    }
    let Some(path) = std::env::var_os("OPENSHELL_EMBED_BUNDLE") else {
        panic!("feature embedded-bundle: set OPENSHELL_EMBED_BUNDLE to the bundle's path");
    };
    let path = std::path::PathBuf::from(path);
    let path = std::fs::canonicalize(&path)
        .unwrap_or_else(|e| panic!("OPENSHELL_EMBED_BUNDLE {}: {e}", path.display()));
    println!("cargo:rerun-if-changed={}", path.display());
    println!(
        "cargo:rustc-env=OPENSHELL_EMBEDDED_BUNDLE_PATH={}",
        path.display()
    );
}
