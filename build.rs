// Link-time settings for libtorch, from the torch lib folder that torch-sys (links = "tch") linked
// against. Cargo hands torch-sys's `cargo:libtorch_lib=DIR` to the build scripts of packages that
// depend on torch-sys directly, as DEP_TCH_LIBTORCH_LIB: that is why Cargo.toml names torch-sys
// beside tch. `rustc-link-arg` applies to every target of the package: the binary, the test
// binaries, examples and benches.
// - an rpath to that folder, so the binary runs without LD_LIBRARY_PATH (libtorch's own libraries
//   find their neighbours and the CUDA libraries through their own $ORIGIN rpaths);
// - libtorch_cuda kept even though no symbol of it is referenced (the linker's --as-needed would drop
//   it, and CUDA would then be unavailable at run time; DESIGN.md §4).
// It also compiles the c10d shim (csrc/c10d_shim.cpp, PyTorch's distributed runtime: src/dist/)
// against the same libtorch's headers, with ProcessGroupNCCL when libtorch has CUDA and the NCCL
// and CUDA headers of the wheel's nvidia packages are found.
use std::path::{Path, PathBuf};

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
    let cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    c10d_shim(Path::new(&lib), cuda);
}

/// The c10d shim as a static library; NCCL first when it can be, else Gloo alone.
fn c10d_shim(lib: &Path, cuda: bool) {
    for f in [
        "csrc/c10d_shim.cpp",
        "csrc/gloo-decls/gloo/context.h",
        "csrc/gloo-decls/gloo/rendezvous/store.h",
        "csrc/gloo-decls/gloo/transport/device.h",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=DISTILL_NO_NCCL");
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let build = |nccl: Option<&[PathBuf]>| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .file("csrc/c10d_shim.cpp")
            .include("csrc/gloo-decls")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .define("USE_DISTRIBUTED", None)
            .define("USE_C10D_GLOO", None)
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-deprecated-declarations")
            .warnings(false)
            .cargo_warnings(false);
        if let Some(dirs) = nccl {
            b.define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .define("DISTILL_NCCL", None);
            for d in dirs {
                b.include(d);
            }
        }
        b.try_compile("distill_c10d")
    };
    let nccl_dirs = cuda
        .then(|| nvidia_includes(lib))
        .flatten()
        .filter(|_| std::env::var_os("DISTILL_NO_NCCL").is_none());
    if let Some(dirs) = nccl_dirs {
        match build(Some(&dirs)) {
            Ok(()) => return,
            Err(_) => println!(
                "cargo:warning=the c10d shim did not compile with NCCL (are the nvidia-cuda-crt and nvidia-cuda-cccl headers installed? scripts/setup.sh does it); Gloo only"
            ),
        }
    }
    if let Err(e) = build(None) {
        panic!(
            "the c10d shim (csrc/c10d_shim.cpp) did not compile against {}: {e}",
            include.display()
        );
    }
}

/// The include folders of the CUDA runtime and NCCL that the PyPI torch wheel depends on
/// (site-packages/nvidia/*/include), when both headers are there.
fn nvidia_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    let nvidia = lib.parent()?.parent()?.join("nvidia");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&nvidia)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("include"))
        .filter(|p| p.is_dir())
        .collect();
    let has = |h: &str| dirs.iter().any(|d| d.join(h).exists());
    (has("nccl.h") && has("cuda_runtime_api.h")).then_some(dirs)
}
