//! cuDNN for CUDA tensors (cargo feature `cudnn`): the three calls of a 3D convolution
//! with a cubic kernel, one zero padding and one stride for all axes, in NCDHW layout
//! (candle's contiguous `(B, C, H, W, D)`).
//!
//! [`Call::Forward`] is the convolution, [`Call::BackwardData`] its input gradient and
//! [`Call::BackwardFilter`] its weight gradient. `conv3d`'s three passes use them as
//! named; `conv_transpose3d` (stride 2, padding 1) is the backward-data call of the
//! stride-2 convolution, so its forward pass runs [`Call::BackwardData`], its input
//! gradient [`Call::Forward`] and its weight gradient [`Call::BackwardFilter`] with the
//! roles of input and output swapped.
//!
//! Each call picks cuDNN's heuristic algorithm and allocates the workspace it asks for.
//! The math type is cuDNN's default, as in PyTorch (`torch.backends.cudnn.allow_tf32`):
//! f32 convolutions may run on TF32 tensor cores on Ampere and newer GPUs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvForward, Cudnn, CudnnDataType,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Error, Layout, Shape, WithDType};

thread_local! {
    /// cuDNN handles are neither `Send` nor `Sync`: one per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
}

fn handle(device: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(cudnn) = handles.borrow().get(&device.id()) {
            return Ok(cudnn.clone());
        }
        let cudnn = Cudnn::new(device.cuda_stream()).map_err(Error::wrap)?;
        handles.borrow_mut().insert(device.id(), cudnn.clone());
        Ok(cudnn)
    })
}

/// Which cuDNN convolution call to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Call {
    /// Arguments `(x, w)`, result `y`.
    Forward,
    /// Arguments `(dy, w)`, result `dx`.
    BackwardData,
    /// Arguments `(dy, x)`, result `dw`.
    BackwardFilter,
}

/// The shapes of the convolution a [`Call`] belongs to: input `x` `(B, C, ...)`, filter
/// `w` `(K, C, k, k, k)`, output `y` `(B, K, ...)`, with `pad` and `stride` on every
/// spatial axis.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub x: [usize; 5],
    pub w: [usize; 5],
    pub y: [usize; 5],
    pub pad: usize,
    pub stride: usize,
}

impl Geometry {
    /// The shape of `call`'s two arguments and of its result.
    fn shapes(&self, call: Call) -> ([usize; 5], [usize; 5], [usize; 5]) {
        match call {
            Call::Forward => (self.x, self.w, self.y),
            Call::BackwardData => (self.y, self.w, self.x),
            Call::BackwardFilter => (self.y, self.x, self.w),
        }
    }
}

/// Runs `call` on two contiguous CUDA arguments of dtype f32 or f64 and returns its result
/// and the result's shape, `op` naming the operation in errors.
pub(super) fn run(
    op: &str,
    call: Call,
    geometry: &Geometry,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (shape_a, shape_b, result) = geometry.shapes(call);
    for (name, (storage, layout), expected) in [("first", a, shape_a), ("second", b, shape_b)] {
        if layout.dims() != expected || !layout.is_contiguous() {
            bail!(
                "{op}: cuDNN {call:?} expects a contiguous {name} argument of shape {expected:?}, \
                 got {:?} (contiguous: {})",
                layout.dims(),
                layout.is_contiguous()
            );
        }
        if storage.dtype() != a.0.dtype() {
            bail!(
                "{op}: arguments of different dtypes ({:?}, {:?})",
                a.0.dtype(),
                storage.dtype()
            );
        }
    }
    let storage = match a.0.dtype() {
        DType::F32 => run_typed::<f32>(call, geometry, a, b)?,
        DType::F64 => run_typed::<f64>(call, geometry, a, b)?,
        other => bail!("{op}: the cuDNN path runs f32 and f64, got {other:?}"),
    };
    Ok((storage, Shape::from(result.to_vec())))
}

/// `dims` as cuDNN's `int`s, with the strides of a contiguous array of that shape.
fn dims_and_strides(dims: [usize; 5]) -> candle_core::Result<([i32; 5], [i32; 5])> {
    let mut out = [0i32; 5];
    let mut strides = [0i32; 5];
    let mut stride = 1usize;
    for axis in (0..5).rev() {
        out[axis] = i32::try_from(dims[axis])
            .map_err(|_| Error::Msg(format!("cuDNN: dimension {dims:?} too large")))?;
        strides[axis] = i32::try_from(stride)
            .map_err(|_| Error::Msg(format!("cuDNN: tensor {dims:?} too large")))?;
        stride *= dims[axis];
    }
    Ok((out, strides))
}

fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let start = layout.start_offset();
    Ok(storage
        .as_cuda_slice::<T>()?
        .slice(start..start + layout.shape().elem_count()))
}

fn run_typed<T>(
    call: Call,
    geometry: &Geometry,
    a: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
) -> candle_core::Result<CudaStorage>
where
    T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType,
{
    let device = &a.0.device;
    let cudnn = handle(device)?;
    let spatial = |v: usize| -> candle_core::Result<[i32; 3]> {
        let v = i32::try_from(v).map_err(Error::wrap)?;
        Ok([v; 3])
    };
    let conv = cudnn
        .create_convnd::<T>(
            &spatial(geometry.pad)?,
            &spatial(geometry.stride)?,
            &[1; 3],
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(Error::wrap)?;
    let tensor = |dims: [usize; 5]| -> candle_core::Result<_> {
        let (dims, strides) = dims_and_strides(dims)?;
        cudnn
            .create_nd_tensor::<T>(&dims, &strides)
            .map_err(Error::wrap)
    };
    let x = tensor(geometry.x)?;
    let y = tensor(geometry.y)?;
    let w = cudnn
        .create_nd_filter::<T>(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            &dims_and_strides(geometry.w)?.0,
        )
        .map_err(Error::wrap)?;
    let (_, _, result) = geometry.shapes(call);
    let mut out: CudaSlice<T> = device.alloc_zeros(result.iter().product())?;
    let workspace = |bytes: usize| -> candle_core::Result<Option<CudaSlice<u8>>> {
        Ok(if bytes == 0 {
            None
        } else {
            Some(device.alloc_zeros::<u8>(bytes)?)
        })
    };
    let scale = (T::from_f64(1.0), T::from_f64(0.0));
    let (first, second) = (view::<T>(a.0, a.1)?, view::<T>(b.0, b.1)?);
    match call {
        Call::Forward => {
            let op = ConvForward {
                conv: &conv,
                x: &x,
                w: &w,
                y: &y,
            };
            let algo = op.pick_algorithm().map_err(Error::wrap)?;
            let mut ws = workspace(op.get_workspace_size(algo).map_err(Error::wrap)?)?;
            // SAFETY: the descriptors describe the contiguous arguments (shapes checked in
            // `run`) and the result allocated above, all of dtype T.
            unsafe { op.launch(algo, ws.as_mut(), scale, &first, &second, &mut out) }
                .map_err(Error::wrap)?;
        }
        Call::BackwardData => {
            let op = ConvBackwardData {
                conv: &conv,
                dx: &x,
                w: &w,
                dy: &y,
            };
            let algo = op.pick_algorithm().map_err(Error::wrap)?;
            let mut ws = workspace(op.get_workspace_size(algo).map_err(Error::wrap)?)?;
            // SAFETY: as above; `first` is dy, `second` the filter, `out` is dx.
            unsafe { op.launch(algo, ws.as_mut(), scale, &mut out, &second, &first) }
                .map_err(Error::wrap)?;
        }
        Call::BackwardFilter => {
            let op = ConvBackwardFilter {
                conv: &conv,
                x: &x,
                dw: &w,
                dy: &y,
            };
            let algo = op.pick_algorithm().map_err(Error::wrap)?;
            let mut ws = workspace(op.get_workspace_size(algo).map_err(Error::wrap)?)?;
            // SAFETY: as above; `first` is dy, `second` the input x, `out` is dw.
            unsafe { op.launch(algo, ws.as_mut(), scale, &second, &mut out, &first) }
                .map_err(Error::wrap)?;
        }
    }
    Ok(CudaStorage::wrap_cuda_slice(out, device.clone()))
}
