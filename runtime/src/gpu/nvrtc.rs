//! Compiling the kernels to PTX with NVRTC, CUDA's run-time compiler. The library is loaded
//! when first needed (cudarc's `dynamic-loading`): `libnvrtc.so.13` or `.12` from the CUDA
//! toolkit, or from the `nvidia-cuda-nvrtc-cu12` wheel with its directory on
//! `LD_LIBRARY_PATH`. NVRTC needs no GPU, so CI compiles every source.

use super::source::Source;
use super::GpuError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

/// Whether an NVRTC library can be loaded (cudarc panics where none is, so ask first).
pub fn available() -> bool {
    // SAFETY: only opens and closes the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The loaded NVRTC's CUDA version (major, minor).
pub fn version() -> Result<(i32, i32), GpuError> {
    if !available() {
        return Err(GpuError("NVRTC is not installed".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two integers.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| GpuError(format!("NVRTC's version: {e:?}")))?;
    Ok((major, minor))
}

/// `source` compiled to PTX for GPUs of compute capability `arch` (e.g. `compute_80`).
pub fn compile(source: &Source, arch: &str) -> Result<String, GpuError> {
    if !available() {
        return Err(GpuError(
            "NVRTC is not installed (libnvrtc.so.13 or .12: the CUDA toolkit, or the \
             nvidia-cuda-nvrtc-cu12 wheel's lib directory on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let options = CompileOptions {
        name: Some(source.file.to_string()),
        // Kiln's kernels use no C++ library headers, so none need to be found.
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(source.program(), options)
        .map(|ptx| ptx.to_src())
        .map_err(|e| match e {
            CompileError::CompileError { log, .. } => GpuError(format!(
                "{} does not compile for {arch}:\n{}",
                source.file,
                log.to_string_lossy()
            )),
            other => GpuError(format!("NVRTC on {}: {other:?}", source.file)),
        })
}
