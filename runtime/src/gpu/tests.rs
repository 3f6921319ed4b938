//! Every kernel against the CPU path (`parity`) under the host emulation; every source through
//! NVRTC where it is installed (CI installs it and sets `KILN_REQUIRE_NVRTC`); buffers that do
//! not fit a kernel refused before it runs.

use super::emulator::{emulator, Emulator};
use super::launch::*;
use super::nvrtc;
use super::parity::checks;
use super::source::{Source, SOURCES};

fn gpu() -> Kernels<'static, Emulator> {
    Kernels(emulator())
}

/// A host vector as the emulation's device buffer.
fn buf<T>(v: &mut [T]) -> Buffer<'_, T> {
    // SAFETY: the emulation's kernels run on host memory; every test keeps `v` alive and
    // unmoved until its kernels return.
    unsafe { Buffer::from_raw(v.as_mut_ptr() as u64, v.len()) }
}

#[test]
fn every_kernel_a_source_defines_is_listed() {
    const DEFINITION: &str = "extern \"C\" __global__ void ";
    for source in SOURCES {
        let defined: Vec<&str> = source
            .code
            .match_indices(DEFINITION)
            .map(|(at, _)| {
                let rest = &source.code[at + DEFINITION.len()..];
                &rest[..rest.find('(').expect("a kernel's parameters")]
            })
            .collect();
        assert_eq!(defined, source.kernels, "{}", source.file);
    }
}

#[test]
fn every_source_compiles_to_ptx_with_nvrtc() {
    if !nvrtc::available() {
        assert!(
            std::env::var_os("KILN_REQUIRE_NVRTC").is_none(),
            "KILN_REQUIRE_NVRTC is set, but no NVRTC library loads (LD_LIBRARY_PATH = {:?})",
            std::env::var_os("LD_LIBRARY_PATH")
        );
        eprintln!(
            "NVRTC is not installed: the CUDA sources were not compiled here (CI compiles them)"
        );
        return;
    }
    // A100, and H100/H200.
    for arch in ["compute_80", "compute_90"] {
        for source in SOURCES {
            let ptx = nvrtc::compile(source, arch).unwrap_or_else(|e| panic!("{e}"));
            for kernel in source.kernels {
                assert!(
                    ptx.contains(&format!(".entry {kernel}(")),
                    "{} compiled for {arch} has no entry `{kernel}`",
                    source.file
                );
            }
        }
    }
    let broken = Source {
        file: "broken.cu",
        code: "extern \"C\" __global__ void f(float* x) { x[0] = undeclared; }",
        kernels: &["f"],
    };
    let error = nvrtc::compile(&broken, "compute_80").unwrap_err().0;
    assert!(
        error.contains("broken.cu") && error.contains("undeclared"),
        "{error}"
    );
}

/// What the driver does when it loads PTX, done by ptxas from CUDA's toolkit (the
/// `nvidia-cuda-nvcc-cu12` wheel in CI, `KILN_PTXAS`): machine code for A100 and H100, which
/// fails where a kernel's shared memory does not fit; and no kernel spills registers to memory.
#[test]
fn every_kernel_assembles_for_a100_and_h100_without_spilling() {
    let Some(ptxas) = std::env::var_os("KILN_PTXAS") else {
        eprintln!("KILN_PTXAS is not set: the kernels were not assembled here (CI assembles them)");
        return;
    };
    assert!(
        nvrtc::available(),
        "KILN_PTXAS is set, but no NVRTC library loads"
    );
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, sm) in [("compute_80", "sm_80"), ("compute_90", "sm_90")] {
        for source in SOURCES {
            let ptx = nvrtc::compile(source, arch).unwrap_or_else(|e| panic!("{e}"));
            let path = dir.join(format!("{}.{sm}.ptx", source.file));
            std::fs::write(&path, ptx).unwrap();
            let out = std::process::Command::new(&ptxas)
                .args(["-arch", sm, "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .unwrap_or_else(|e| panic!("running {ptxas:?}: {e}"));
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{} for {sm}:\n{report}", source.file);
            for kernel in source.kernels {
                assert!(
                    report.contains(&format!("Compiling entry function '{kernel}' for '{sm}'")),
                    "{} for {sm} has no `{kernel}`:\n{report}",
                    source.file
                );
            }
            let spills = report.lines().any(|line| {
                line.contains("spill stores")
                    && !line.contains("0 bytes spill stores, 0 bytes spill loads")
            });
            assert!(
                !spills,
                "{} spills registers on {sm}:\n{report}",
                source.file
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_kernel_matches_the_cpu_path_under_the_emulation() {
    let failed: Vec<String> = checks::<Emulator>()
        .into_iter()
        .filter_map(|(name, check)| check(emulator()).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn target_rows_outside_the_logits_are_refused() {
    let mut xs = vec![0.0f32; 2 * 5 * 10];
    let mut targets = vec![0i64; 12];
    let (mut lse, mut picked) = (vec![0.0; 12], vec![0.0; 12]);
    // 12 rows of 6 positions would need 2 sequences of 6: the logits have 5 a sequence.
    let read = TargetRows {
        logits: buf(&mut xs),
        positions: 6,
        seq: 5,
        width: 10,
        first: 0,
    };
    let error = gpu()
        .softmax_statistics(read, buf(&mut targets), buf(&mut lse), buf(&mut picked))
        .unwrap_err();
    assert!(error.0.contains("12 target rows"), "{error}");
}

#[test]
fn attention_refuses_heads_wider_than_its_tiles_and_wrong_sizes() {
    let shape = AttentionShape {
        batch: 1,
        s: 4,
        s_kv: 4,
        heads: 1,
        kv_heads: 1,
        d: 256,
        causal: true,
    };
    let [mut q, mut k, mut v, mut y] = [(); 4].map(|_| vec![0.0f32; 4 * 256]);
    let mut stats = vec![0.0f32; 8];
    let tensors = AttentionTensors {
        q: buf(&mut q),
        k: buf(&mut k),
        v: buf(&mut v),
        key_keep: None,
        y: buf(&mut y),
        stats: buf(&mut stats),
    };
    let error = gpu().attention_forward(shape, tensors, None).unwrap_err();
    assert!(error.0.contains("up to 128 wide"), "{error}");
    let narrower = AttentionShape { d: 128, ..shape };
    let error = gpu()
        .attention_forward(narrower, tensors, None)
        .unwrap_err();
    assert!(
        error
            .0
            .contains("the queries holds 1024 values where the kernel reads 512"),
        "{error}"
    );
    let headless = AttentionShape {
        heads: 0,
        ..narrower
    };
    let error = gpu()
        .attention_forward(headless, tensors, None)
        .unwrap_err();
    assert!(error.0.contains("0 heads"), "{error}");
}
