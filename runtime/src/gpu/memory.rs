//! Device memory as the kernels' callers see it: values copied to the device as a
//! [`Buffer`], and back.

use super::launch::Buffer;
use super::GpuError;
use std::collections::HashMap;
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

    /// Gives `buffer`'s memory back (once kernels launched before have finished with it).
    ///
    /// # Safety
    /// `buffer` was made by this memory and is not freed yet, and nothing reads or writes it
    /// (or a copy of it) from now on.
    unsafe fn free<T: Element>(&self, buffer: Buffer<'_, T>);
}

/// A buffer its holder owns: freed when it drops, and lent out only for as long as it lives.
pub struct Owned<'m, M: Memory + ?Sized, T: Element> {
    memory: &'m M,
    buffer: Buffer<'m, T>,
}

impl<'m, M: Memory + ?Sized, T: Element> Owned<'m, M, T> {
    /// A new buffer holding `values`.
    pub fn upload(memory: &'m M, values: &[T]) -> Result<Self, GpuError> {
        let buffer = memory.upload(values)?;
        Ok(Owned { memory, buffer })
    }

    /// A new buffer of `len` zeros.
    pub fn zeros(memory: &'m M, len: usize) -> Result<Self, GpuError> {
        let buffer = memory.zeros(len)?;
        Ok(Owned { memory, buffer })
    }

    /// The buffer, for kernels, for as long as this borrow.
    pub fn buffer(&self) -> Buffer<'_, T> {
        self.buffer
    }

    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The values, once every kernel launched before has finished.
    pub fn download(&self) -> Result<Vec<T>, GpuError> {
        self.memory.download(self.buffer)
    }
}

impl<M: Memory + ?Sized, T: Element> Drop for Owned<'_, M, T> {
    fn drop(&mut self) {
        // SAFETY: the buffer was made by `memory` and only ever lent out for borrows of `self`,
        // which have ended.
        unsafe { self.memory.free(self.buffer) }
    }
}

/// `values` as bytes.
pub(super) fn bytes<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: elements are plain numbers without padding.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

/// The allocations a device made, by address, kept until freed or until it drops, each lent
/// out as buffers.
pub(super) struct Kept<A>(Mutex<HashMap<u64, A>>);

impl<A> Kept<A> {
    pub(super) fn new() -> Self {
        Kept(Mutex::new(HashMap::new()))
    }

    /// Drops the allocation at `address`, if this keeps one there.
    pub(super) fn release(&self, address: u64) {
        let released = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&address);
        drop(released);
    }

    /// Keeps `allocation` and lends its `len` elements at `address` for as long as `self`.
    ///
    /// # Safety
    /// `allocation` holds `len` elements of `T` at `address` for as long as it is kept.
    pub(super) unsafe fn lend<T>(&self, allocation: A, address: u64, len: usize) -> Buffer<'_, T> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address, allocation);
        // SAFETY: the caller's contract, and the allocation now lives as long as `self`.
        unsafe { Buffer::from_raw(address, len) }
    }
}
