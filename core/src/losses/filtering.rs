//! Separable 1-D filtering along the spatial axes of `(B, C, H, W, D)` tensors, shared by
//! [`super::MultiScaleLoss`] (zero-padded "same" output, as MONAI
//! `monai/networks/layers/simplelayers.py::separable_filtering`) and the SSIM metric ("valid"
//! output, as its unpadded `conv3d`).
//!
//! Filtering one axis of length `L` is written as a matrix product with an `(L, L_out)`
//! Toeplitz matrix holding the taps, after moving that axis last. The product keeps autograd,
//! runs as one GEMM on any device, handles zero padding exactly (taps that would fall in the
//! padding simply have no matrix entry) and needs no `(L_out, K)` im2col buffer, which
//! matters for the 97-tap kernel of scale 16. It costs `L` instead of `K` multiply-adds per
//! output, a small factor at registration sizes (`L` ≈ 100).

use candle_core::{Tensor, D};

/// Output extent of a 1-D filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Extent {
    /// Same length as the input, zero padding `(K-1)/2` on each side (PyTorch `padding=(K-1)//2`
    /// with an odd kernel).
    Same,
    /// Only the `L - K + 1` positions where the kernel fits entirely (no padding).
    Valid,
}

/// Cross-correlates `x` with `taps` along tensor dim `dim` (PyTorch convention: output
/// `o` = `Σ_t taps[t]·x[o + t - pad]`). The taps are cast to `x`'s dtype.
pub(crate) fn filter_axis(
    x: &Tensor,
    dim: usize,
    taps: &[f32],
    extent: Extent,
) -> candle_core::Result<Tensor> {
    let rank = x.rank();
    let len = x.dim(dim)?;
    let k = taps.len();
    let (out_len, pad) = match extent {
        Extent::Same => (len, (k - 1) / 2),
        Extent::Valid => {
            if k > len {
                candle_core::bail!("valid filter of {k} taps does not fit an axis of {len} voxels")
            }
            (len - k + 1, 0)
        }
    };
    // matrix[i][o] = taps[i - o + pad] where that index is a tap.
    let mut matrix = vec![0f32; len * out_len];
    for i in 0..len {
        for o in 0..out_len {
            let t = i + pad;
            if t >= o && t - o < k {
                matrix[i * out_len + o] = taps[t - o];
            }
        }
    }
    let matrix = Tensor::from_vec(matrix, (len, out_len), x.device())?.to_dtype(x.dtype())?;
    let last = rank - 1;
    let moved = if dim == last {
        x.contiguous()?
    } else {
        x.transpose(dim, last)?.contiguous()?
    };
    let mut dims = moved.dims().to_vec();
    let rows = moved.elem_count() / len;
    let filtered = moved.reshape((rows, len))?.matmul(&matrix)?;
    dims[last] = out_len;
    let filtered = filtered.reshape(dims)?;
    if dim == last {
        Ok(filtered)
    } else {
        filtered.transpose(dim, D::Minus1)
    }
}

/// Filters the three spatial axes (tensor dims 2, 3, 4) of a `(B, C, H, W, D)` tensor with the
/// same taps, in the order MONAI applies them (axis 0 first).
pub(crate) fn filter_spatial(
    x: &Tensor,
    taps: &[f32],
    extent: Extent,
) -> candle_core::Result<Tensor> {
    let mut out = x.clone();
    for dim in 2..5 {
        out = filter_axis(&out, dim, taps, extent)?;
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (docs/STYLE.md)
mod tests {
    use super::*;
    use crate::losses::test_support::grid;

    /// Direct zero-padded cross-correlation along dim 3, written out with loops.
    fn reference(x: &[f64], shape: [usize; 5], taps: &[f32], extent: Extent) -> Vec<f64> {
        let [b, c, h, w, d] = shape;
        let k = taps.len();
        let (wo, pad) = match extent {
            Extent::Same => (w, (k as isize - 1) / 2),
            Extent::Valid => (w - k + 1, 0),
        };
        let mut out = Vec::new();
        for outer in 0..b * c * h {
            for o in 0..wo {
                for z in 0..d {
                    let mut s = 0.0;
                    for (t, &tap) in taps.iter().enumerate() {
                        let i = o as isize + t as isize - pad;
                        if i >= 0 && (i as usize) < w {
                            s += f64::from(tap) * x[(outer * w + i as usize) * d + z];
                        }
                    }
                    out.push(s);
                }
            }
        }
        out
    }

    #[test]
    fn matches_direct_correlation_same_and_valid() {
        let shape = [2, 1, 3, 9, 4];
        let x = grid(shape, |b, _, i, j, k| {
            (1.0 + b as f64) * (0.7 * i + 1.3 * j - 0.2 * k).sin()
        });
        let flat = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Asymmetric taps so that a flipped (convolution) kernel would fail; 11 taps > 9 voxels
        // exercises padding wider than the axis.
        for taps in [
            vec![0.5f32, -1.0, 2.0],
            (0..11).map(|t| t as f32 * 0.1 - 0.3).collect(),
        ] {
            for extent in [Extent::Same, Extent::Valid] {
                if extent == Extent::Valid && taps.len() > 9 {
                    assert!(filter_axis(&x, 3, &taps, extent).is_err());
                    continue;
                }
                let got = filter_axis(&x, 3, &taps, extent).unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let want = reference(&flat, shape, &taps, extent);
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-12, "{g} vs {w}");
                }
            }
        }
    }
}
