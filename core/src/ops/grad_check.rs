//! Test helper: compares candle's autograd gradients with central finite differences.
#![allow(clippy::unwrap_used)] // test-only code may unwrap (COMMON.md)

use candle_core::{DType, Device, Tensor, Var};

/// A fixed, irregular tensor of `shape` (f64) used as test input or as the weights of a
/// scalar probe loss: `sin(0.37 t + phase) + 0.1 cos(1.3 t)` over the flat index t.
pub(crate) fn smooth_tensor(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|t| {
            let t = t as f64;
            (0.37 * t + phase).sin() + 0.1 * (1.3 * t).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Checks d/dx of `sum(f(x) * r)` for a fixed probe `r` against central differences
/// with step `h`, over every element of `x` (keep `x` small). `f` takes the inputs in
/// order; `wrt` picks the one being differentiated. Panics with the worst element on
/// failure.
pub(crate) fn check_grad(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    wrt: usize,
    h: f64,
    tol: f64,
) {
    assert_eq!(
        inputs[wrt].dtype(),
        DType::F64,
        "gradient checks run in f64"
    );
    let var = Var::from_tensor(&inputs[wrt]).unwrap();
    let mut args: Vec<Tensor> = inputs.to_vec();
    args[wrt] = var.as_tensor().clone();
    let out = f(&args).unwrap();
    let probe = smooth_tensor(out.dims(), 0.3);
    let loss = (out * &probe).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var.as_tensor())
        .expect("the input takes part in the loss")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let shape = inputs[wrt].dims().to_vec();
    let base: Vec<f64> = inputs[wrt].flatten_all().unwrap().to_vec1().unwrap();
    let loss_at = |values: Vec<f64>| -> f64 {
        let mut args: Vec<Tensor> = inputs.to_vec();
        args[wrt] = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
        let out = f(&args).unwrap();
        (out * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let mut worst = (0usize, 0.0f64, 0.0f64, 0.0f64);
    for t in 0..base.len() {
        let mut plus = base.clone();
        plus[t] += h;
        let mut minus = base.clone();
        minus[t] -= h;
        let numeric = (loss_at(plus) - loss_at(minus)) / (2.0 * h);
        let err = (numeric - analytic[t]).abs() / (1.0 + numeric.abs());
        if err > worst.3 {
            worst = (t, analytic[t], numeric, err);
        }
    }
    assert!(
        worst.3 <= tol,
        "gradient mismatch at flat index {}: autograd {} vs finite difference {} (err {})",
        worst.0,
        worst.1,
        worst.2,
        worst.3
    );
}

/// The element of a rank-5 tensor at `index`, as f64.
pub(crate) fn value_at(t: &Tensor, index: [usize; 5]) -> f64 {
    let mut e = t.clone();
    for i in index {
        e = e.get(i).unwrap();
    }
    e.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}
