// Link-time settings for libtorch taken from torch-sys (links = "tch"):
// - an rpath to the torch lib folder, so the binary runs without LD_LIBRARY_PATH;
// - libtorch_cuda kept even though no symbol of it is referenced (the linker's --as-needed would drop
//   it, and CUDA would then be unavailable at run time; DESIGN.md §4).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch_cuda");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
