//! What medray's CPU custom ops share: the float types they run on ([`Float`]) and one
//! dispatch from candle's type-erased storages to a kernel written once, generically
//! ([`CpuKernel`], [`run_cpu`]).
//!
//! Every custom op (conv3d and its transposed form, the fused BatchNorm, the mutual
//! information histograms) implements [`CpuKernel::run`] for any [`Float`] and forwards
//! candle's `cpu_fwd` to [`run_cpu`], which checks that all arguments share one dtype (f32
//! or f64) and are contiguous, and hands the kernel their data.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Shape, Tensor};

/// The element types of the CPU kernels: f32 and f64 (those of the `gemm` crate that
/// candle tensors use).
pub(crate) trait Float:
    Copy
    + Default
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + AddAssign
    + Mul<Output = Self>
    + Sub<Output = Self>
    + Div<Output = Self>
    + Debug
    + PartialOrd
{
    /// The multiplicative identity.
    const ONE: Self;
    /// Widens to f64 (exact).
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type.
    fn from_f64(v: f64) -> Self;
    /// The largest integer not above the value.
    fn floor(self) -> Self;
    /// The value as u32, as Rust's `as` casts it (saturating, NaN to 0), which is how candle
    /// converts a float tensor to u32.
    fn to_u32(self) -> u32;
    /// The values of a CPU storage of this type, `None` for another dtype.
    fn data(storage: &CpuStorage) -> Option<&[Self]>;
    /// Wraps a result as a CPU storage.
    fn storage(data: Vec<Self>) -> CpuStorage;
    /// These values as f32, when `Self` is f32 (for kernels that exist in f32 only).
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// f32 results as `Self`, when `Self` is f32.
    fn from_f32(values: Vec<f32>) -> Option<Vec<Self>>;
}

impl Float for f32 {
    const ONE: Self = 1.0;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn floor(self) -> Self {
        f32::floor(self)
    }
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn data(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn storage(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F32(data)
    }
    fn as_f32(values: &[Self]) -> Option<&[f32]> {
        Some(values)
    }
    fn from_f32(values: Vec<f32>) -> Option<Vec<Self>> {
        Some(values)
    }
}

impl Float for f64 {
    const ONE: Self = 1.0;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn floor(self) -> Self {
        f64::floor(self)
    }
    fn to_u32(self) -> u32 {
        self as u32
    }
    fn data(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn storage(data: Vec<Self>) -> CpuStorage {
        CpuStorage::F64(data)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn from_f32(_: Vec<f32>) -> Option<Vec<Self>> {
        None
    }
}

/// Whether `tensors` can run the CPU kernels: all on the CPU, all of one dtype, f32 or f64.
pub(crate) fn has_fast_path(tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// A CPU kernel written once for every [`Float`].
pub(crate) trait CpuKernel {
    /// The op's name, for errors.
    fn kernel_name(&self) -> &'static str;

    /// Computes the result from each argument's contiguous data and its layout.
    fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)>;
}

/// Runs `kernel` on candle CPU storages: all of one dtype, f32 or f64, each contiguous.
pub(crate) fn run_cpu<K: CpuKernel>(
    kernel: &K,
    args: &[(&CpuStorage, &Layout)],
) -> candle_core::Result<(CpuStorage, Shape)> {
    fn typed<T: Float, K: CpuKernel>(
        kernel: &K,
        args: &[(&CpuStorage, &Layout)],
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = kernel.kernel_name();
        let mut data = Vec::with_capacity(args.len());
        for (i, (storage, layout)) in args.iter().enumerate() {
            let Some(values) = T::data(storage) else {
                bail!(
                    "{name}: argument {i} is {:?} but argument 0 is {:?}",
                    storage.dtype(),
                    args[0].0.dtype()
                );
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("{name}: argument {i} is not contiguous (layout {layout:?})");
            };
            data.push((&values[start..end], *layout));
        }
        let (out, shape) = kernel.run(&data)?;
        Ok((T::storage(out), shape))
    }
    let Some((first, _)) = args.first() else {
        bail!("{}: no arguments", kernel.kernel_name());
    };
    match first {
        CpuStorage::F32(_) => typed::<f32, K>(kernel, args),
        CpuStorage::F64(_) => typed::<f64, K>(kernel, args),
        other => bail!(
            "{}: unsupported dtype {:?} (f32 or f64 expected)",
            kernel.kernel_name(),
            other.dtype()
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;

    /// Adds its two arguments; reports the dtype it ran with in the shape's rank.
    struct Add;

    impl CpuKernel for Add {
        fn kernel_name(&self) -> &'static str {
            "add"
        }
        fn run<T: Float>(&self, args: &[(&[T], &Layout)]) -> candle_core::Result<(Vec<T>, Shape)> {
            let (a, b) = (args[0].0, args[1].0);
            let out = a
                .iter()
                .zip(b)
                .map(|(x, y)| T::from_f64(x.to_f64() + y.to_f64()))
                .collect::<Vec<_>>();
            let n = out.len();
            Ok((out, Shape::from(n)))
        }
    }

    #[test]
    fn dispatches_f32_and_f64_and_reads_the_contiguous_window() {
        let s = CpuStorage::F32(vec![9.0, 1.0, 2.0]);
        let windowed = Layout::contiguous_with_offset(Shape::from(2), 1);
        let (out, shape) = run_cpu(&Add, &[(&s, &windowed), (&s, &windowed)]).unwrap();
        assert!(matches!(out, CpuStorage::F32(ref v) if v == &[2.0, 4.0]));
        assert_eq!(shape.dims(), [2]);
        let d = CpuStorage::F64(vec![1.5]);
        let one = Layout::contiguous(Shape::from(1));
        let (out, _) = run_cpu(&Add, &[(&d, &one), (&d, &one)]).unwrap();
        assert!(matches!(out, CpuStorage::F64(ref v) if v == &[3.0]));
    }

    #[test]
    fn mixed_dtypes_and_strided_arguments_are_refused_by_name() {
        let a = CpuStorage::F32(vec![1.0, 2.0]);
        let b = CpuStorage::F64(vec![1.0, 2.0]);
        let l = Layout::contiguous(Shape::from(2));
        let err = run_cpu(&Add, &[(&a, &l), (&b, &l)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("add: argument 1 is F64"), "{err}");
        let square = Layout::contiguous(Shape::from((2, 2)));
        let strided = square.transpose(0, 1).unwrap();
        let m = CpuStorage::F32(vec![1.0, 2.0, 3.0, 4.0]);
        let err = run_cpu(&Add, &[(&m, &square), (&m, &strided)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not contiguous"), "{err}");
        let u = CpuStorage::U8(vec![1]);
        let err = run_cpu(&Add, &[(&u, &l)]).unwrap_err().to_string();
        assert!(err.contains("unsupported dtype U8"), "{err}");
    }
}
