//! Closed-form test inputs of spec §8 and a finite-difference gradient checker, shared by the
//! loss and metric tests.
//!
//! The formulas are those the reference values in `docs/monai-spec.md` §8 were produced with
//! (numpy `idx = np.indices(shape)`, evaluated in float64, cast to float32 where a test says
//! "f32").

use candle_core::{DType, Device, Tensor, Var};

/// Shape of the §8 image tensors A and B.
pub const SHAPE: [usize; 5] = [1, 1, 16, 20, 24];

/// Fills a `(b, c, i, j, k)` grid of `shape` with `f`, in float64.
pub fn grid(shape: [usize; 5], f: impl Fn(usize, usize, f64, f64, f64) -> f64) -> Tensor {
    let [nb, nc, ni, nj, nk] = shape;
    let mut v = Vec::with_capacity(nb * nc * ni * nj * nk);
    for b in 0..nb {
        for c in 0..nc {
            for i in 0..ni {
                for j in 0..nj {
                    for k in 0..nk {
                        v.push(f(b, c, i as f64, j as f64, k as f64));
                    }
                }
            }
        }
    }
    Tensor::from_vec(v, shape.to_vec(), &Device::Cpu).unwrap()
}

/// A = 0.5 + 0.45·sin(0.3i + 0.2j)·cos(0.25k), shape (1,1,16,20,24).
pub fn image_a(dtype: DType) -> Tensor {
    grid(SHAPE, |_, _, i, j, k| {
        0.5 + 0.45 * (0.3 * i + 0.2 * j).sin() * (0.25 * k).cos()
    })
    .to_dtype(dtype)
    .unwrap()
}

/// B = 0.5 + 0.45·sin(0.3(i+1.5) + 0.2j)·cos(0.25k - 0.3), shape (1,1,16,20,24).
pub fn image_b(dtype: DType) -> Tensor {
    grid(SHAPE, |_, _, i, j, k| {
        0.5 + 0.45 * (0.3 * (i + 1.5) + 0.2 * j).sin() * (0.25 * k - 0.3).cos()
    })
    .to_dtype(dtype)
    .unwrap()
}

/// The §8 bending-energy DDF (1,3,16,20,24):
/// `(c+1)·0.5·sin(0.3i + 0.2j(c+1))·cos(0.25k) + 0.01·i·j`.
pub fn bending_field() -> Tensor {
    grid([1, 3, 16, 20, 24], |_, c, i, j, k| {
        let c1 = c as f64 + 1.0;
        c1 * 0.5 * (0.3 * i + 0.2 * j * c1).sin() * (0.25 * k).cos() + 0.01 * i * j
    })
}

/// The §8 "fixed" mask: ellipsoid ((i-7.5)/5)² + ((j-9.5)/7)² + ((k-11.5)/8)² ≤ 1, 1184 voxels.
pub fn ellipsoid() -> Tensor {
    grid(SHAPE, |_, _, i, j, k| {
        let r2 = ((i - 7.5) / 5.0).powi(2) + ((j - 9.5) / 7.0).powi(2) + ((k - 11.5) / 8.0).powi(2);
        if r2 <= 1.0 {
            1.0
        } else {
            0.0
        }
    })
}

/// The §8 soft mask: 1/(1 + exp(8(r-1))), r = sqrt(((i-8)/5)² + ((j-10)/7)² + ((k-11)/8)²).
pub fn soft_mask() -> Tensor {
    grid(SHAPE, |_, _, i, j, k| {
        let r =
            (((i - 8.0) / 5.0).powi(2) + ((j - 10.0) / 7.0).powi(2) + ((k - 11.0) / 8.0).powi(2))
                .sqrt();
        1.0 / (1.0 + (8.0 * (r - 1.0)).exp())
    })
}

/// The value of a 0-d (or one-element) tensor as f64.
pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0]
}

/// Compares the autograd gradient of `loss(x)` w.r.t. the f64 tensor `x` with central finite
/// differences at the flat indices `probes`; panics with the worst mismatch.
pub fn check_gradient(x: &Tensor, loss: impl Fn(&Tensor) -> Tensor, probes: &[usize]) {
    let var = Var::from_tensor(x).unwrap();
    let value = loss(var.as_tensor());
    let grads = value.backward().unwrap();
    let analytic = grads
        .get(var.as_tensor())
        .expect("loss does not depend on its input")
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-6;
    let mut nonzero = 0;
    for &p in probes {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[p] += delta;
            let t = Tensor::from_vec(v, x.shape(), x.device()).unwrap();
            scalar(&loss(&t))
        };
        let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let tol = 1e-5 * numeric.abs().max(analytic[p].abs()) + 1e-9;
        assert!(
            (numeric - analytic[p]).abs() <= tol,
            "gradient at {p}: autograd {} vs finite difference {numeric}",
            analytic[p]
        );
        if numeric.abs() > 1e-9 {
            nonzero += 1;
        }
    }
    assert!(
        nonzero > 0,
        "every probed gradient is zero: the check proves nothing"
    );
}
