//! Matrix products on gemm's AVX-512 path (dfdx 0.13's gemm stops at AVX2: 2.8x fewer FLOP/s
//! on this machine's cores), over strided views of row-major buffers.

/// A strided matrix: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// Row-major `rows × cols` at the start of `data`, rows `stride` apart.
    pub(super) fn at(data: &[f32], rows: usize, cols: usize, stride: usize) -> Mat {
        // The products index through raw pointers: this is what keeps them inside `data`.
        assert!(rows == 0 || (rows - 1) * stride + cols <= data.len());
        Mat {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs: stride as isize,
            cs: 1,
        }
    }
    pub(super) fn rows(data: &[f32], rows: usize, cols: usize) -> Mat {
        Mat::at(data, rows, cols, cols)
    }
    pub(super) fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale · a·b` for a row-major `dst` with rows `dst_stride`
/// apart.
///
/// # Safety
/// `a` and `b` must describe readable memory, `dst` writable memory for `a.rows × b.cols`
/// elements at that stride that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    dst: *mut f32,
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    debug_assert_eq!(a.cols, b.rows);
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}
