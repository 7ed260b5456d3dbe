//! The shared half of a CPU custom op that computes a scalar loss and its gradient in one
//! pass: the gradient is kept from the forward pass and handed out, scaled by the incoming
//! gradient, by the backward pass (`losses::diffusion`, `refine::feature_ssd`).

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, Shape, Tensor, WithDType};

/// A gradient kept between a custom op's forward and backward passes.
pub(crate) struct StashedGradient {
    op: &'static str,
    grad: Mutex<Option<Tensor>>,
}

impl StashedGradient {
    /// Nothing kept yet; `op` names the op in errors.
    pub(crate) fn new(op: &'static str) -> Self {
        Self {
            op,
            grad: Mutex::new(None),
        }
    }

    /// Keeps `grad` (shaped `shape`, converted to `dtype`) and returns the scalar `loss` as
    /// the forward pass's output storage of `dtype`.
    pub(crate) fn forward<G: WithDType>(
        &self,
        loss: f64,
        grad: Vec<G>,
        shape: &Shape,
        dtype: DType,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let grad = Tensor::from_vec(grad, shape, &Device::Cpu)?.to_dtype(dtype)?;
        *self.grad.lock().map_err(|_| self.poisoned())? = Some(grad);
        let out = match dtype {
            DType::F64 => CpuStorage::F64(vec![loss]),
            _ => CpuStorage::F32(vec![loss as f32]),
        };
        Ok((out, Shape::from(())))
    }

    /// The kept gradient times `grad_res` (the gradient of the scalar output).
    pub(crate) fn backward(&self, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let guard = self.grad.lock().map_err(|_| self.poisoned())?;
        let Some(grad) = guard.as_ref() else {
            candle_core::bail!("{}: backward before forward", self.op)
        };
        Ok(Some(grad.broadcast_mul(grad_res)?))
    }

    fn poisoned(&self) -> candle_core::Error {
        candle_core::Error::Msg(format!("{}: poisoned", self.op))
    }
}
