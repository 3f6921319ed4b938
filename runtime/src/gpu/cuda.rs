//! Kiln's kernels on an NVIDIA GPU, through the CUDA driver (cudarc's `driver`, loaded at run
//! time as NVRTC is): every source compiled by NVRTC for the device's compute capability and
//! loaded as a module, kernels launched by name on one stream, buffers allocated by the
//! device and freed with it.

use super::launch::{Buffer, Grid, Launcher};
use super::memory::{bytes, Element, Kept, Memory};
use super::source::SOURCES;
use super::{nvrtc, GpuError};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

pub struct CudaDevice {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// The device's name and compute capability, for reports.
    pub name: String,
    pub capability: (i32, i32),
    /// Every buffer this device made, freed when it drops.
    allocations: Kept<CudaSlice<u8>>,
}

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
        })
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
