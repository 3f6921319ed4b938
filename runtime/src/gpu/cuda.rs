//! Kiln's kernels on an NVIDIA GPU, through the CUDA driver (cudarc's `driver`, loaded at run
//! time as NVRTC is): every source compiled by NVRTC for the device's compute capability and
//! loaded as a module, kernels launched by name on one stream, buffers allocated by the
//! device and freed with it.

use super::gemm::{Gemm, Product};
use super::launch::{Buffer, Grid, Launcher};
use super::memory::{bytes, Element, Kept, Memory};
use super::source::SOURCES;
use super::{nvrtc, GpuError};
use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

pub struct CudaDevice {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// The device's name and compute capability, for reports.
    pub name: String,
    pub capability: (i32, i32),
    /// Every buffer this device made, freed when it drops.
    allocations: Kept<CudaSlice<u8>>,
    /// cuBLAS on the device's stream, opened at the first product (the kernels alone do not
    /// need the library).
    blas: OnceLock<Result<Blas, GpuError>>,
}

/// A cuBLAS handle, destroyed with the device.
struct Blas(cublas_sys::cublasHandle_t);

// SAFETY: the handle is used only through `&CudaDevice`, whose calls run on one stream; cuBLAS
// handles may be used from any thread that binds their context.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

fn driver_error(what: &str) -> impl Fn(result::DriverError) -> GpuError + '_ {
    move |e| GpuError(format!("{what}: {e:?}"))
}

impl CudaDevice {
    /// GPU `ordinal` of this machine, with Kiln's kernels compiled and loaded on it.
    pub fn open(ordinal: usize) -> Result<CudaDevice, GpuError> {
        // SAFETY: only opens and closes the library (cudarc panics where there is none).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError(
                "no NVIDIA driver: libcuda.so.1 is not installed".into(),
            ));
        }
        result::init().map_err(driver_error("starting the driver"))?;
        let count = result::device::get_count().map_err(driver_error("counting the GPUs"))?;
        if ordinal >= usize::try_from(count).unwrap_or(0) {
            return Err(GpuError(format!(
                "there is no GPU {ordinal}: the driver finds {count} (CUDA_VISIBLE_DEVICES = {:?})",
                std::env::var("CUDA_VISIBLE_DEVICES").ok()
            )));
        }
        // PTX from an NVRTC newer than the driver does not load (the driver JIT-compiles it
        // and knows no newer PTX): say so instead of failing at the first module.
        let (major, minor) = nvrtc::version()?;
        let mut driver = 0;
        // SAFETY: the driver writes one integer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(driver_error("the driver's version"))?;
        if major * 1000 + minor * 10 > driver {
            let cuda = format!("{}.{}", driver / 1000, driver % 1000 / 10);
            return Err(GpuError(format!(
                "NVRTC {major}.{minor} is newer than the driver (CUDA {cuda}): its PTX would not \
                 load; put an NVRTC of CUDA {cuda} or older first on LD_LIBRARY_PATH"
            )));
        }
        let context = CudaContext::new(ordinal).map_err(driver_error("opening the GPU"))?;
        // SAFETY: every kernel, copy, product and free of this device runs on its one stream,
        // in order, so buffers need no events to order their uses (cudarc's tracking would add
        // two events per buffer, and Kiln makes thousands a step).
        unsafe { context.disable_event_tracking() };
        let name = context.name().map_err(driver_error("the GPU's name"))?;
        let capability = context
            .compute_capability()
            .map_err(driver_error("the GPU's compute capability"))?;
        let arch = format!("compute_{}{}", capability.0, capability.1);
        let mut functions = HashMap::new();
        for source in SOURCES {
            let ptx = nvrtc::compile(source, &arch)?;
            let module = context
                .load_module(Ptx::from_src(ptx))
                .map_err(driver_error(source.file))?;
            for &kernel in source.kernels {
                let function = module.load_function(kernel).map_err(driver_error(kernel))?;
                functions.insert(kernel, function);
            }
        }
        Ok(CudaDevice {
            stream: context.default_stream(),
            functions,
            name,
            capability,
            allocations: Kept::new(),
            blas: OnceLock::new(),
        })
    }

    /// cuBLAS, opened on the device's stream the first time.
    fn blas(&self) -> Result<&Blas, GpuError> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only opens and closes the library (cudarc panics where there is none).
                if !unsafe { cublas_sys::is_culib_present() } {
                    return Err(GpuError(
                        "no cuBLAS: libcublas.so (CUDA 12 or 13) is not on the library path; \
                         install the CUDA toolkit, or put the directory of the \
                         nvidia-cublas-cu12 wheel's library on LD_LIBRARY_PATH"
                            .into(),
                    ));
                }
                self.bind()?;
                let handle = cublas::create_handle()
                    .map_err(|e| GpuError(format!("opening cuBLAS: {e:?}")))?;
                // SAFETY: the handle was just made and the stream is this device's.
                unsafe { cublas::set_stream(handle, self.stream.cu_stream() as _) }
                    .map_err(|e| GpuError(format!("putting cuBLAS on the stream: {e:?}")))?;
                Ok(Blas(handle))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Makes the device's context this thread's, for the driver's calls that act on the
    /// current one.
    fn bind(&self) -> Result<(), GpuError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_error("binding the GPU's context"))
    }

    /// Waits for every kernel launched so far.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream
            .synchronize()
            .map_err(driver_error("waiting for the GPU"))
    }
}

impl Drop for CudaDevice {
    /// Kernels still running may use the buffers about to be freed: wait for them first.
    fn drop(&mut self) {
        let _ = self.synchronize();
        if let Some(Ok(blas)) = self.blas.take() {
            // SAFETY: the handle is this device's, and nothing runs on it any more.
            let _ = unsafe { cublas::destroy_handle(blas.0) };
        }
    }
}

/// cuBLAS's operation for an operand read as stored or transposed.
fn operation(transposed: bool) -> cublas_sys::cublasOperation_t {
    match transposed {
        true => cublas_sys::cublasOperation_t::CUBLAS_OP_T,
        false => cublas_sys::cublasOperation_t::CUBLAS_OP_N,
    }
}

impl Gemm for CudaDevice {
    /// cuBLAS is column-major: a row-major C = A·B is its Cᵀ = Bᵀ·Aᵀ, so the operands go in
    /// swapped, each with its row stride as the leading dimension.
    fn gemm(
        &self,
        product: Product,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        c: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        product.check(a, b, c)?;
        let blas = self.blas()?;
        self.bind()?;
        let Product { m, n, k, .. } = product;
        let (alpha, beta) = (1.0f32, if product.accumulate { 1.0f32 } else { 0.0 });
        let at = |buffer: Buffer<'_, f32>, offset: usize| {
            (buffer.address() + (offset * std::mem::size_of::<f32>()) as u64) as *mut f32
        };
        // `check` bounded every size and stride to i32.
        let int = |x: usize| x as i32;
        // SAFETY: the operands lie inside their buffers on this device (checked), and the
        // handle runs on this device's stream.
        unsafe {
            cublas::sgemm(
                blas.0,
                operation(product.b.transposed),
                operation(product.a.transposed),
                int(n),
                int(m),
                int(k),
                &alpha,
                at(b, product.b.offset),
                int(product.b.stride),
                at(a, product.a.offset),
                int(product.a.stride),
                &beta,
                at(c, product.c.offset),
                int(product.c.stride),
            )
        }
        .map_err(|e| GpuError(format!("a {m}×{k}·{k}×{n} product on cuBLAS: {e:?}")))
    }
}

impl Launcher for CudaDevice {
    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: Grid,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError> {
        let function = self
            .functions
            .get(kernel)
            .ok_or_else(|| GpuError(format!("no kernel `{kernel}`")))?;
        self.bind()?;
        let [x, y, z] = grid.blocks;
        result::launch_kernel(
            function.cu_function(),
            (x, y, z),
            (grid.threads, 1, 1),
            0,
            self.stream.cu_stream(),
            args,
        )
        .map_err(driver_error(kernel))
    }
}

impl Memory for CudaDevice {
    fn upload<'a, T: Element>(&'a self, values: &[T]) -> Result<Buffer<'a, T>, GpuError> {
        // At least one byte: an allocation of none has no address.
        let data = bytes(values);
        let slice = if data.is_empty() {
            self.stream.alloc_zeros::<u8>(1)
        } else {
            self.stream.clone_htod(data)
        }
        .map_err(driver_error("copying to the GPU"))?;
        let address = slice.device_ptr(&self.stream).0;
        // SAFETY: the allocation holds `values.len()` elements at `address`.
        Ok(unsafe { self.allocations.lend(slice, address, values.len()) })
    }

    fn zeros<'a, T: Element>(&'a self, len: usize) -> Result<Buffer<'a, T>, GpuError> {
        let size = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| GpuError(format!("a buffer of {len} elements")))?;
        let slice = self
            .stream
            .alloc_zeros::<u8>(size.max(1))
            .map_err(driver_error("allocating on the GPU"))?;
        let address = slice.device_ptr(&self.stream).0;
        // SAFETY: the allocation holds `len` elements at `address`.
        Ok(unsafe { self.allocations.lend(slice, address, len) })
    }

    unsafe fn free<T: Element>(&self, buffer: Buffer<'_, T>) {
        self.allocations.release(buffer.address());
    }

    fn download<T: Element>(&self, buffer: Buffer<'_, T>) -> Result<Vec<T>, GpuError> {
        self.synchronize()?;
        self.bind()?;
        let mut values = vec![T::default(); buffer.len()];
        // SAFETY: `buffer` holds `len` elements on this device (`Buffer::from_raw`'s contract),
        // and the stream is idle.
        unsafe { result::memcpy_dtoh_sync(&mut values, buffer.address()) }
            .map_err(driver_error("copying from the GPU"))?;
        Ok(values)
    }
}
