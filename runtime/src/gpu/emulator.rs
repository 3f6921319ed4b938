//! Kiln's kernel sources built for the host under `emulation.h` with the system's C++
//! compiler (`$CXX`, else `c++`), loaded as a [`Launcher`]: the kernels' tests run them where
//! no GPU is.

use super::gemm::{Gemm, Operand, Product};
use super::launch::{Buffer, Grid, Launcher};
use super::memory::{bytes, Element, Kept, Memory};
use super::source::{shared_sizes, COMMON, SOURCES};
use super::GpuError;
use libloading::Library;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

type Emulate = unsafe extern "C" fn(*const c_char, *const u32, u32, *mut *mut c_void) -> i32;

pub struct Emulator {
    // Kept open for as long as `emulate` is called.
    _library: Library,
    emulate: Emulate,
    /// The emulation's grid and block are process-wide: one launch at a time (tests run in
    /// parallel).
    one_at_a_time: Mutex<()>,
    /// The buffers `upload` made, as 8-byte words (aligned for every element), kept for the
    /// process.
    allocations: Kept<Box<[u64]>>,
}

/// The emulator, built once per test process.
pub fn emulator() -> &'static Emulator {
    static EMULATOR: OnceLock<Emulator> = OnceLock::new();
    EMULATOR.get_or_init(|| build().unwrap_or_else(|e| panic!("building the GPU emulation: {e}")))
}

/// One translation unit: the emulation, every source, and a table from kernel names to
/// launches of them.
fn translation_unit() -> String {
    let mut unit = format!("#include \"emulation.h\"\n{}{COMMON}\n", shared_sizes());
    for source in SOURCES {
        unit += &source.numbered();
        unit += "\n";
    }
    unit += "#line 1 \"kernel table\"\n";
    unit += "extern \"C\" int kiln_emulate(const char* kernel, const unsigned* grid, unsigned threads, void** args) {\n";
    unit += "    const dim3 blocks{grid[0], grid[1], grid[2]}, block{threads, 1, 1};\n";
    for name in SOURCES.iter().flat_map(|s| s.kernels) {
        unit += &format!(
            "    if (!std::strcmp(kernel, \"{name}\")) return kiln_emulation::launch({name}, blocks, block, args) ? 0 : 2;\n"
        );
    }
    unit += "    return 1;\n}\n";
    unit
}

fn build() -> Result<Emulator, String> {
    let dir = std::env::temp_dir().join(format!("kiln-gpu-emulation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let unit = dir.join("kernels.cpp");
    let library = dir.join("libkiln_kernels.so");
    std::fs::write(&unit, translation_unit()).map_err(|e| format!("{}: {e}", unit.display()))?;
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gpu");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let output = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-I"])
        .arg(&here)
        .arg(&unit)
        .arg("-o")
        .arg(&library)
        .output()
        .map_err(|e| format!("running {compiler}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{compiler} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // SAFETY: the library is the one just built; its initialisers only set up statics.
    let library_handle = unsafe { Library::new(&library) }.map_err(|e| e.to_string())?;
    // SAFETY: `kiln_emulate` has this signature in the translation unit above.
    let emulate =
        *unsafe { library_handle.get::<Emulate>(b"kiln_emulate\0") }.map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Emulator {
        _library: library_handle,
        emulate,
        one_at_a_time: Mutex::new(()),
        allocations: Kept::new(),
    })
}

impl Launcher for Emulator {
    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: Grid,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        let name = CString::new(kernel).map_err(|e| GpuError(e.to_string()))?;
        let _running = self
            .one_at_a_time
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match (self.emulate)(
            name.as_ptr(),
            grid.blocks.as_ptr(),
            grid.threads,
            args.as_mut_ptr(),
        ) {
            0 => Ok(()),
            1 => Err(GpuError(format!("no kernel `{kernel}`"))),
            _ => Err(GpuError(format!(
                "`{kernel}` over {grid:?}: blocks are whole warps, up to 1024 threads"
            ))),
        }
    }
}

impl Memory for Emulator {
    fn upload<'a, T: Element>(&'a self, values: &[T]) -> Result<Buffer<'a, T>, GpuError> {
        let data = bytes(values);
        let mut words = vec![0u64; data.len().div_ceil(8).max(1)].into_boxed_slice();
        // SAFETY: `words` holds at least `data.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), words.as_mut_ptr().cast(), data.len())
        };
        let address = words.as_mut_ptr() as u64;
        // SAFETY: the words hold `values.len()` elements at `address`.
        Ok(unsafe { self.allocations.lend(words, address, values.len()) })
    }

    unsafe fn free<T: Element>(&self, buffer: Buffer<'_, T>) {
        self.allocations.release(buffer.address());
    }

    fn download<T: Element>(&self, buffer: Buffer<'_, T>) -> Result<Vec<T>, GpuError> {
        let mut values = vec![T::default(); buffer.len()];
        // SAFETY: `buffer` holds `len` elements in host memory (`Buffer::from_raw`'s contract).
        unsafe {
            std::ptr::copy_nonoverlapping(
                buffer.address() as *const T,
                values.as_mut_ptr(),
                buffer.len(),
            )
        };
        Ok(values)
    }
}

impl Gemm for Emulator {
    fn gemm(
        &self,
        product: Product,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        c: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        product.check(a, b, c)?;
        // SAFETY: the emulation's buffers are host memory, and the product was checked.
        unsafe { host_gemm(product, a, b, c) };
        Ok(())
    }
}

/// The product on host memory, each element summed over k in order (the emulation's).
///
/// # Safety
/// The buffers hold host memory, and `product` was checked against them.
unsafe fn host_gemm(product: Product, a: Buffer<'_, f32>, b: Buffer<'_, f32>, c: Buffer<'_, f32>) {
    let Product { m, n, k, .. } = product;
    let at = |buffer: Buffer<'_, f32>, op: Operand, row: usize, col: usize| {
        let (row, col) = if op.transposed {
            (col, row)
        } else {
            (row, col)
        };
        // SAFETY: `check` bounded every element of the operand.
        unsafe { *(buffer.address() as *const f32).add(op.offset + row * op.stride + col) }
    };
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0.0f32;
            for l in 0..k {
                sum += at(a, product.a, i, l) * at(b, product.b, l, j);
            }
            // SAFETY: as above, for C.
            let out = unsafe {
                &mut *(c.address() as *mut f32).add(product.c.offset + i * product.c.stride + j)
            };
            *out = if product.accumulate { *out + sum } else { sum };
        }
    }
}
