//! Device memory as the kernels' callers see it: values copied to the device as a
//! [`Buffer`], and back.

use super::launch::Buffer;
use super::GpuError;
use std::sync::Mutex;

/// What a kernel's buffers hold: plain values, copied to and from the device byte for byte.
///
/// # Safety
/// Every bit pattern is a value of the type, and it has no padding.
pub unsafe trait Element: Copy + Default + Send + Sync + 'static {}

// SAFETY: plain numbers.
unsafe impl Element for f32 {}
unsafe impl Element for u64 {}
unsafe impl Element for i64 {}

/// Where buffers are made. A buffer lives as long as the memory that made it, and borrows it.
pub trait Memory {
    /// A new buffer holding `values`.
    fn upload<'a, T: Element>(&'a self, values: &[T]) -> Result<Buffer<'a, T>, GpuError>;

    /// The values `buffer` holds once every kernel launched before has finished.
    fn download<T: Element>(&self, buffer: Buffer<'_, T>) -> Result<Vec<T>, GpuError>;

    /// A new buffer of `len` zeros.
    fn zeros<'a, T: Element>(&'a self, len: usize) -> Result<Buffer<'a, T>, GpuError> {
        self.upload(&vec![T::default(); len])
    }
}

/// `values` as bytes.
pub(super) fn bytes<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: elements are plain numbers without padding.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// The allocations a device made, kept until it drops, each lent out as buffers.
pub(super) struct Kept<A>(Mutex<Vec<A>>);

impl<A> Kept<A> {
    pub(super) fn new() -> Self {
        Kept(Mutex::new(Vec::new()))
    }

    /// Keeps `allocation` and lends its `len` elements at `address` for as long as `self`.
    ///
    /// # Safety
    /// `allocation` holds `len` elements of `T` at `address` for as long as it is kept.
    pub(super) unsafe fn lend<T>(&self, allocation: A, address: u64, len: usize) -> Buffer<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(allocation);
        // SAFETY: the caller's contract, and the allocation now lives as long as `self`.
        unsafe { Buffer::from_raw(address, len) }
    }
}
