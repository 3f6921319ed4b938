//! The NVIDIA GPUs this machine offers, asked of the driver itself: `libcuda.so.1`, opened at
//! run time (not linked), so that one binary runs on machines with and without a driver and
//! can say which it found. The driver honours `CUDA_VISIBLE_DEVICES`.

use libloading::Library;
use std::ffi::{c_char, c_int, c_uint};

/// One GPU as the driver names it.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpu {
    pub name: String,
    pub memory_bytes: u64,
}

/// What the driver said.
#[derive(Clone, Debug, PartialEq)]
pub enum Gpus {
    /// The driver answered: its CUDA version (major, minor) and the GPUs it lets this process
    /// use (none, when `CUDA_VISIBLE_DEVICES` hides them all).
    Found { cuda: (i32, i32), gpus: Vec<Gpu> },
    /// No GPU can be used, and why: no driver, or the driver's error.
    Unusable(String),
}

impl std::fmt::Display for Gpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Gpus::Unusable(why) => write!(f, "no usable NVIDIA GPU ({why})"),
            Gpus::Found { cuda, gpus } if gpus.is_empty() => write!(
                f,
                "no NVIDIA GPU visible to this process (driver for CUDA {}.{}; CUDA_VISIBLE_DEVICES={})",
                cuda.0,
                cuda.1,
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            ),
            Gpus::Found { cuda, gpus } => {
                write!(f, "{} NVIDIA GPU", gpus.len())?;
                if gpus.len() > 1 {
                    f.write_str("s")?;
                }
                let names: Vec<String> = gpus
                    .iter()
                    .map(|g| format!("{}, {:.0} GiB", g.name, g.memory_bytes as f64 / GIB))
                    .collect();
                write!(f, " ({}; driver for CUDA {}.{})", names.join("; "), cuda.0, cuda.1)
            }
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Asks the driver which GPUs this process may use.
pub fn probe() -> Gpus {
    // SAFETY: libcuda is the NVIDIA driver's own library, whose initialisers are made to run
    // in any process that loads it.
    let lib = match unsafe { Library::new("libcuda.so.1") } {
        Ok(lib) => lib,
        Err(_) => return Gpus::Unusable("no NVIDIA driver: libcuda.so.1 is not installed".into()),
    };
    let found = match ask(&lib) {
        Ok(found) => found,
        Err(why) => Gpus::Unusable(why),
    };
    // Never unloaded: after cuInit the driver runs threads of its own inside the library.
    std::mem::forget(lib);
    found
}

/// `CUresult`: 0 is success.
type CuResult = c_int;

/// The driver's answers, through its C API (`cuda.h`): the entry points below have these
/// signatures since CUDA 3.2 (`cuDeviceTotalMem_v2`) and earlier.
fn ask(lib: &Library) -> Result<Gpus, String> {
    // SAFETY: each symbol is looked up by its documented name and called with its documented
    // signature, with pointers to live locals of the right sizes.
    unsafe {
        let init = symbol::<unsafe extern "C" fn(c_uint) -> CuResult>(lib, b"cuInit\0")?;
        let version =
            symbol::<unsafe extern "C" fn(*mut c_int) -> CuResult>(lib, b"cuDriverGetVersion\0")?;
        let count =
            symbol::<unsafe extern "C" fn(*mut c_int) -> CuResult>(lib, b"cuDeviceGetCount\0")?;
        let device =
            symbol::<unsafe extern "C" fn(*mut c_int, c_int) -> CuResult>(lib, b"cuDeviceGet\0")?;
        let name = symbol::<unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult>(
            lib,
            b"cuDeviceGetName\0",
        )?;
        let memory = symbol::<unsafe extern "C" fn(*mut usize, c_int) -> CuResult>(
            lib,
            b"cuDeviceTotalMem_v2\0",
        )?;

        let check = |what: &str, code: CuResult| match code {
            0 => Ok(()),
            // CUDA_ERROR_NO_DEVICE: none, or CUDA_VISIBLE_DEVICES hides them all.
            100 => Err(format!(
                "the NVIDIA driver found no GPU; CUDA_VISIBLE_DEVICES={}",
                std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
            )),
            code => Err(format!(
                "the NVIDIA driver's {what} failed with CUDA error {code}"
            )),
        };
        check("cuInit", init(0))?;
        let mut v = 0;
        check("cuDriverGetVersion", version(&mut v))?;
        let mut n = 0;
        check("cuDeviceGetCount", count(&mut n))?;
        let mut gpus = Vec::new();
        for ordinal in 0..n {
            let mut handle = 0;
            check("cuDeviceGet", device(&mut handle, ordinal))?;
            // One byte more than the driver may fill, so that the name always ends in NUL.
            let mut text = [0u8; 257];
            let room = (text.len() - 1) as c_int;
            check(
                "cuDeviceGetName",
                name(text.as_mut_ptr().cast::<c_char>(), room, handle),
            )?;
            let mut bytes = 0usize;
            check("cuDeviceTotalMem", memory(&mut bytes, handle))?;
            gpus.push(Gpu {
                name: std::ffi::CStr::from_bytes_until_nul(&text)
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                memory_bytes: bytes as u64,
            });
        }
        Ok(Gpus::Found {
            cuda: (v / 1000, v % 1000 / 10),
            gpus,
        })
    }
}

/// The driver's entry point `name` (NUL-terminated), as a function of type `F`.
///
/// # Safety
/// `F` must be the entry point's C signature.
unsafe fn symbol<F: Copy>(lib: &Library, name: &[u8]) -> Result<F, String> {
    lib.get::<F>(name).map(|f| *f).map_err(|e| {
        let name = String::from_utf8_lossy(&name[..name.len() - 1]).into_owned();
        format!("the NVIDIA driver has no {name}: {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_answers_or_says_why_not() {
        // Either way a sentence, never a panic: CI has no driver, a GPU machine has one.
        let text = probe().to_string();
        assert!(text.contains("NVIDIA"), "{text}");
    }

    #[test]
    fn found_gpus_are_listed_with_their_memory_and_the_drivers_cuda() {
        let h200 = Gpu {
            name: "NVIDIA H200".into(),
            memory_bytes: 141 << 30,
        };
        let found = Gpus::Found {
            cuda: (13, 0),
            gpus: vec![h200.clone(), h200],
        };
        assert_eq!(
            found.to_string(),
            "2 NVIDIA GPUs (NVIDIA H200, 141 GiB; NVIDIA H200, 141 GiB; driver for CUDA 13.0)"
        );
    }
}
