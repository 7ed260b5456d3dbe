//! Warping a volume by a dense displacement field, as MONAI's
//! `Warp(mode="bilinear", padding_mode=...)` (`monai/networks/blocks/warp.py`) on its
//! PyTorch-native path, i.e. `F.grid_sample(..., align_corners=True)` on the grid
//! `ref_grid + ddf`.
//!
//! `out[b, :, p] = image[b, :, p + ddf[b, :, p]]` sampled trilinearly, where the DDF is in
//! voxels and its channel c displaces along spatial axis c (tensor dim 2 + c).
//!
//! Per axis of length n, the source coordinate is computed exactly as MONAI + PyTorch do in
//! the tensor's dtype, so f32 results match MONAI to the last bits:
//! `q = i + u`, normalised `g = (q * 2) / (n - 1) - 1` (MONAI), un-normalised
//! `q' = ((g + 1) / 2) * (n - 1)` (PyTorch `grid_sampler_unnormalize`). This round trip is
//! why a zero DDF is not an exact identity in f32 (errors up to ~7e-7). An axis of length 1
//! always samples coordinate 0.
//!
//! * [`Padding::Border`]: `q'` is clamped to `[0, n - 1]`; the gradient w.r.t. the
//!   coordinate is 0 wherever `q' <= 0` or `q' >= n - 1` (PyTorch's `clip_coordinates_set_grad`).
//! * [`Padding::Zeros`]: no clamp; corners outside the volume contribute 0.
//!
//! The corner weights follow PyTorch's `grid_sampler_3d` CPU kernel: per axis
//! `w_lo = (floor(q') + 1) - q'`, `w_hi = q' - floor(q')`, the corner weight is
//! `(w_D * w_W) * w_H` and the 8 corners are summed in PyTorch's order (tnw, tne, tsw, tse,
//! bnw, bne, bsw, bse, i.e. H slowest, D fastest).
//!
//! Implementation: on the CPU, one custom op with a hand-written backward pass (`warp/fused.rs`).
//! Elsewhere ([`warp_composed`]), whole-tensor candle ops. The corner weights are differentiable functions
//! of the DDF (the floors and masks are detached), and the corner values come from
//! `index_select` on the flattened image with u32 indices, per batch item, so gradients
//! reach both the image (via `index_add`) and the DDF. Peak extra memory is a few (B, N)
//! tensors plus, for the backward, the 8 gathered (C, N) corner values per batch item.

use candle_core::{bail, DType, Device, Result, Tensor};

use super::kernel::has_fast_path;

mod fused;

/// What happens at the volume border, as MONAI's `padding_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// Coordinates are clamped to the volume: the border voxels repeat outwards
    /// (MONAI's default, `"border"`).
    Border,
    /// Samples outside the volume read 0 (`"zeros"`).
    Zeros,
}

/// Warps `image` (B, C, H, W, D) by `ddf` (B, 3, H, W, D), trilinear interpolation,
/// differentiable w.r.t. both.
///
/// On the CPU (f32, f64) one fused op computes it and keeps nothing for the backward pass
/// (`warp/fused.rs`); elsewhere [`warp_composed`] builds it from candle ops.
pub fn warp(image: &Tensor, ddf: &Tensor, padding: Padding) -> Result<Tensor> {
    check_shapes(image, ddf)?;
    if has_fast_path(&[image, ddf]) {
        return fused::warp(image, ddf, padding);
    }
    warp_composed(image, ddf, padding)
}

/// [`warp`] from whole-tensor candle ops with candle's autograd (any device); the same values
/// as the fused CPU op, bit for bit.
pub fn warp_composed(image: &Tensor, ddf: &Tensor, padding: Padding) -> Result<Tensor> {
    let (b, c, spatial) = check_shapes(image, ddf)?;
    let n: usize = spatial.iter().product();
    let strides = [spatial[1] * spatial[2], spatial[2], 1];

    // Per axis: the two corner offsets (u32, (B, N)) and weights (dtype, (B, N)).
    let mut taps = Vec::with_capacity(3);
    for axis in 0..3 {
        let q = source_coordinate(ddf, axis, spatial, padding)?;
        taps.push(axis_taps(&q, spatial[axis], strides[axis], padding)?);
    }

    // Partial products shared by corners, in PyTorch's order: weight = (w_D * w_W) * w_H,
    // flat index = (offset_H + offset_W) + offset_D.
    let (tap_h, tap_w, tap_d) = (&taps[0], &taps[1], &taps[2]);
    let mut weight_dw = Vec::with_capacity(4);
    let mut offset_hw = Vec::with_capacity(4);
    for lo_hi in 0..4 {
        let (first, second) = (lo_hi >> 1, lo_hi & 1);
        weight_dw.push(tap_d[second].weight.mul(&tap_w[first].weight)?); // [w][d]
        offset_hw.push(tap_h[first].offset.add(&tap_w[second].offset)?); // [h][w]
    }

    let flat = image.reshape((b, c, n))?;
    let mut items = Vec::with_capacity(b);
    for item in 0..b {
        let values = flat.get(item)?; // (C, N)
        let mut acc: Option<Tensor> = None;
        for corner in 0..8 {
            // Bit 2 picks H, bit 1 W, bit 0 D: PyTorch's tnw, tne, tsw, ... order.
            let (h, w, d) = (corner >> 2, (corner >> 1) & 1, corner & 1);
            let index = offset_hw[2 * h + w]
                .get(item)?
                .add(&tap_d[d].offset.get(item)?)?;
            let weight = weight_dw[2 * w + d]
                .get(item)?
                .mul(&tap_h[h].weight.get(item)?)?
                .unsqueeze(0)?; // (1, N)
            let term = values.index_select(&index, 1)?.broadcast_mul(&weight)?;
            acc = Some(match acc {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        items.push(acc.expect("eight corners were summed"));
    }
    Tensor::stack(&items, 0)?.reshape(image.shape())
}

/// Warps `image` (B, C, H, W, D) by `ddf` (B, 3, H, W, D) with nearest-neighbour sampling
/// and border padding, for label masks. Rounds half to even like PyTorch's `nearbyint`.
/// Not differentiable (the result is detached).
///
/// On the CPU (f32, f64) one fused op (`warp/fused.rs`); elsewhere
/// [`warp_nearest_composed`].
pub fn warp_nearest(image: &Tensor, ddf: &Tensor) -> Result<Tensor> {
    check_shapes(image, ddf)?;
    if has_fast_path(&[image, ddf]) {
        return fused::warp_nearest(image, ddf);
    }
    warp_nearest_composed(image, ddf)
}

/// [`warp_nearest`] from candle ops (any device); the same values as the fused CPU op.
pub fn warp_nearest_composed(image: &Tensor, ddf: &Tensor) -> Result<Tensor> {
    let (b, c, spatial) = check_shapes(image, ddf)?;
    let n: usize = spatial.iter().product();
    let strides = [spatial[1] * spatial[2], spatial[2], 1];
    let ddf = ddf.detach();
    let mut index: Option<Tensor> = None;
    for axis in 0..3 {
        let q = source_coordinate(&ddf, axis, spatial, Padding::Border)?;
        let nearest = round_half_even(&q)?
            .clamp(0.0, (spatial[axis] - 1) as f64)?
            .to_dtype(DType::U32)?
            .affine(strides[axis] as f64, 0.0)?;
        index = Some(match index {
            None => nearest,
            Some(sum) => (sum + nearest)?,
        });
    }
    let index = index.expect("three axes were visited");
    let flat = image.detach().reshape((b, c, n))?;
    let items = (0..b)
        .map(|item| flat.get(item)?.index_select(&index.get(item)?, 1))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&items, 0)?.reshape(image.shape())
}

/// Checks that `ddf` is (B, 3, H, W, D) for `image` (B, C, H, W, D) and that the dtypes
/// agree; returns (B, C, [H, W, D]).
fn check_shapes(image: &Tensor, ddf: &Tensor) -> Result<(usize, usize, [usize; 3])> {
    let (b, c, h, w, d) = image.dims5()?;
    if ddf.dims() != [b, 3, h, w, d] {
        bail!(
            "warp: ddf must have shape {:?}, got {:?}",
            [b, 3, h, w, d],
            ddf.dims()
        )
    }
    if image.dtype() != ddf.dtype() {
        bail!(
            "warp: image ({:?}) and ddf ({:?}) must have the same dtype",
            image.dtype(),
            ddf.dtype()
        )
    }
    Ok((b, c, [h, w, d]))
}

/// The un-normalised source coordinate along `axis`, (B, N), after MONAI's normalisation
/// round trip and (for border padding) the clamp with its zero gradient outside `(0, n-1)`.
fn source_coordinate(
    ddf: &Tensor,
    axis: usize,
    spatial: [usize; 3],
    padding: Padding,
) -> Result<Tensor> {
    let b = ddf.dim(0)?;
    let n_axis = spatial[axis];
    let n: usize = spatial.iter().product();
    if n_axis == 1 {
        return Tensor::zeros((b, n), ddf.dtype(), ddf.device());
    }
    let u = ddf.narrow(1, axis, 1)?.reshape((b, n))?;
    let q = reference_grid(axis, spatial, ddf.dtype(), ddf.device())?.broadcast_add(&u)?;
    let last = (n_axis - 1) as f64;
    // MONAI: grid * 2 / (dim - 1) - 1, a true division as in PyTorch's CPU kernel.
    let divisor = Tensor::new(last, ddf.device())?.to_dtype(ddf.dtype())?;
    let g = q
        .affine(2.0, 0.0)?
        .broadcast_div(&divisor)?
        .affine(1.0, -1.0)?;
    // PyTorch grid_sampler_unnormalize (align_corners): ((coord + 1) / 2) * (size - 1).
    let q = g.affine(1.0, 1.0)?.affine(0.5, 0.0)?.affine(last, 0.0)?;
    match padding {
        Padding::Zeros => Ok(q),
        Padding::Border => {
            let inside = q.gt(0.0)?.mul(&q.lt(last)?)?;
            inside.where_cond(&q, &q.clamp(0.0, last)?.detach())
        }
    }
}

/// The voxel index along `axis` of every flat position, (1, N), in `dtype`.
fn reference_grid(
    axis: usize,
    spatial: [usize; 3],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut shape = [1usize; 3];
    shape[axis] = spatial[axis];
    Tensor::arange(0u32, spatial[axis] as u32, device)?
        .to_dtype(dtype)?
        .reshape(&shape[..])?
        .broadcast_as(&spatial[..])?
        .reshape((1, spatial.iter().product::<usize>()))
}

/// One of the two interpolation taps of an axis.
struct Tap {
    /// Flat offset of the tap along the axis (index * stride), clamped into the volume,
    /// u32 (B, N).
    offset: Tensor,
    /// Interpolation weight, 0 where the tap lies outside the volume, (B, N).
    weight: Tensor,
}

/// The low and high taps of an axis of length `n_axis` for coordinates `q` (B, N).
fn axis_taps(q: &Tensor, n_axis: usize, stride: usize, padding: Padding) -> Result<[Tap; 2]> {
    let last = (n_axis - 1) as f64;
    let lo = q.floor()?.detach();
    let hi = lo.affine(1.0, 1.0)?;
    let in_volume =
        |i: &Tensor| -> Result<Tensor> { i.ge(0.0)?.mul(&i.le(last)?)?.to_dtype(q.dtype()) };
    let weight_lo = hi.sub(q)?;
    let weight_hi = q.sub(&lo)?;
    let (weight_lo, weight_hi) = match padding {
        // The clamped coordinate keeps the low tap inside; the high tap leaves only when
        // its weight is already 0, but mask it all the same as PyTorch skips it.
        Padding::Border => (
            weight_lo,
            weight_hi.mul(&hi.le(last)?.to_dtype(q.dtype())?)?,
        ),
        Padding::Zeros => (
            weight_lo.mul(&in_volume(&lo)?)?,
            weight_hi.mul(&in_volume(&hi)?)?,
        ),
    };
    let to_offset =
        |i: Tensor| -> Result<Tensor> { i.to_dtype(DType::U32)?.affine(stride as f64, 0.0) };
    // Border: the clamped coordinate keeps `lo` in [0, n-1] and `hi` in [1, n].
    let (lo_inside, hi_inside) = match padding {
        Padding::Border => (lo.clone(), hi.minimum(last)?),
        Padding::Zeros => (lo.clamp(0.0, last)?, hi.clamp(0.0, last)?),
    };
    Ok([
        Tap {
            offset: to_offset(lo_inside)?,
            weight: weight_lo,
        },
        Tap {
            offset: to_offset(hi_inside)?,
            weight: weight_hi,
        },
    ])
}

/// Rounds to the nearest integer, ties to even (C's `nearbyint` in the default mode).
fn round_half_even(x: &Tensor) -> Result<Tensor> {
    let floor = x.floor()?;
    let frac = x.sub(&floor)?;
    let up = frac.gt(0.5)?.to_dtype(x.dtype())?;
    let tie = frac.eq(0.5)?.to_dtype(x.dtype())?;
    // floor is odd where floor - 2 * floor(floor / 2) == 1.
    let odd = floor.sub(&floor.affine(0.5, 0.0)?.floor()?.affine(2.0, 0.0)?)?;
    floor.add(&up)?.add(&tie.mul(&odd)?)
}

#[cfg(test)]
mod tests;
