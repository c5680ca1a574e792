// Link-time settings for libtorch, from the torch lib folder that torch-sys (links = "tch") linked
// against. Cargo hands torch-sys's `cargo:libtorch_lib=DIR` to the build scripts of packages that
// depend on torch-sys directly, as DEP_TCH_LIBTORCH_LIB: that is why Cargo.toml names torch-sys
// beside tch. `rustc-link-arg` applies to every target of the package: the binary, the test
// binaries, examples and benches.
// - an rpath to that folder, so the binary runs without LD_LIBRARY_PATH (libtorch's own libraries
//   find their neighbours and the CUDA libraries through their own $ORIGIN rpaths);
// - libtorch_cuda kept even though no symbol of it is referenced (the linker's --as-needed would drop
//   it, and CUDA would then be unavailable at run time; DESIGN.md §4).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=torch-sys did not report its lib folder (DEP_TCH_LIBTORCH_LIB): \
             no rpath, the binary needs the torch lib folder on LD_LIBRARY_PATH"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
