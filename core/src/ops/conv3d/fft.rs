//! FFT-tiled 3D convolution in f32 (the algorithm cuDNN calls `FFT_TILING`), for kernels
//! of size 5 and up, where it needs far fewer operations than the direct tap loops: LocalNet's
//! level-0 `k = 7` convolutions cost `Ci * Co * 343` multiply-adds per voxel directly, and
//! about `(Ci + Co) * 3 log2(N)` FFT butterflies plus `Ci * Co / 2` complex multiply-adds per
//! voxel here.
//!
//! The output volume is cut into tiles of `T = N - k + 1` voxels per axis. For each tile the
//! `N`-wide input block around it (`T + k - 1` voxels, zero outside the volume) is taken to the
//! frequency domain (a real FFT along the contiguous last axis, then complex FFTs along the
//! other two), multiplied there with the spectra of the kernels zero-padded to `N`, summed over
//! input channels, and brought back; the `T` valid outputs of the circular result are exactly
//! those of the linear convolution, since no index wraps around the block. The three passes:
//!
//! * forward `y = corr(x, w)`: `Y = conj(W) · X`, outputs at block offset 0;
//! * input gradient `dx = conv(dy, w)`: `DX = W · DY`, outputs at block offset `k - 1`;
//! * weight gradient `dw[l] = Σ_p dy[p] x[p + l - pad]`: `Σ_tiles conj(DY) · X`, summed in the
//!   frequency domain over all tiles, then one inverse transform per `(Co, Ci)` pair, read at
//!   lags `0..k`; each tile's `dy` block holds only that tile's own `T` outputs.
//!
//! The frequency-domain products run over chunks of [`CHUNK`] frequencies stored as split real
//! and imaginary parts (two AVX registers each), so that one chunk of every kernel spectrum
//! stays in cache while the products of a whole group of tiles use it. Block edges are picked
//! per axis from [`BLOCKS`] to waste the fewest padded voxels; tiles are processed in groups
//! holding up to [`GROUP_BYTES`] of spectra, to bound their memory. Accuracy: the FFT's
//! rounding error grows with `log N` instead of with the number of taps; against the direct
//! kernels the outputs agree to about `1e-6` of their scale (`tests.rs`).

use std::sync::Arc;

use rayon::prelude::*;

use crate::ops::simd::{simd_level, SimdLevel};
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

use super::Epilogue;

/// The smallest kernel the FFT path takes (below it the direct loops always win).
pub(super) const MIN_KERNEL: usize = 5;
/// Frequencies per chunk of the pointwise products.
const CHUNK: usize = 16;
/// Floats per chunk of one spectrum: `CHUNK` real parts, then `CHUNK` imaginary parts.
const CHUNK_FLOATS: usize = 2 * CHUNK;
/// The FFT block edges tried per axis: even and 2-3-5-smooth (fast for `rustfft`), at most 32
/// since the kernel spectra hold `Ci * Co * N^3 / 2` complex values (142 MB for 32 x 32
/// channels at `N = 32`).
const BLOCKS: [usize; 9] = [8, 10, 12, 16, 18, 20, 24, 30, 32];
/// Most bytes of tile spectra held at once (inputs and outputs of a group of tiles); a group
/// has 2 to 16 tiles. Fewer tiles per group read each kernel spectrum chunk more often.
const GROUP_BYTES: usize = 64 << 20;
/// Most bytes of spectrum buffers kept between calls ([`Buffers`]).
const POOL_BYTES: usize = 512 << 20;

/// Spectrum buffers kept between convolutions: the kernel and tile spectra of one call are
/// hundreds of MB (142 MB of kernel spectra for 32 x 32 channels at 96 x 96 x 104), and
/// fresh allocations of that size come straight from the kernel as untouched pages, whose
/// first-write faults (and, for pages first read as zeros, copy-on-write faults with TLB
/// shootdowns across threads) cost as much as the FFTs. Reused buffers are already mapped.
/// At most [`POOL_BYTES`] are kept, and only until a convolution takes the direct path
/// ([`release_buffers`]): in LocalNet the FFT calls come in runs (the level-0 convolutions
/// of the forward pass, then of the backward pass).
struct Buffers;

static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

impl Buffers {
    /// A buffer of `len` zeros: the smallest kept one that holds `len`, else a new one.
    fn take(len: usize) -> Vec<f32> {
        let kept = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            let best = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            best.map(|i| pool.swap_remove(i))
        };
        match kept {
            Some(mut v) => {
                v.clear();
                v.resize(len, 0.0);
                v
            }
            None => vec![0.0; len],
        }
    }

    /// Frees every kept buffer.
    fn clear() {
        POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Keeps `v` for a later [`Buffers::take`], dropping the smallest kept buffers while
    /// the pool would hold more than [`POOL_BYTES`].
    fn give(v: Vec<f32>) {
        if crate::memory::keeps_freed_memory() {
            // The allocator keeps freed memory mapped itself (`crate::memory`).
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(v);
        pool.sort_by_key(|b| std::cmp::Reverse(b.capacity()));
        let mut total = 0;
        pool.retain(|b| {
            total += b.capacity() * std::mem::size_of::<f32>();
            total <= POOL_BYTES
        });
    }
}

/// The FFT convolution of one volume size and kernel size: block edges, tiles, FFT plans.
struct Plan {
    size: [usize; 3],
    kernel: usize,
    /// FFT block edge `N` per axis.
    block: [usize; 3],
    /// Tiles per axis.
    tiles: [usize; 3],
    /// Frequencies of the real FFT along the last axis, `N2 / 2 + 1`.
    half: usize,
    /// Frequencies of one block spectrum, `N0 * N1 * half`.
    freqs: usize,
    /// Chunks of [`CHUNK`] frequencies per spectrum (the last one zero-padded).
    chunks: usize,
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    /// Forward complex FFTs along axes 0 and 1.
    fwd: [Arc<dyn Fft<f32>>; 2],
    /// Inverse complex FFTs along axes 0 and 1.
    inv: [Arc<dyn Fft<f32>>; 2],
}

/// How the blocks of one tensor are cut around the tiles.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    /// Channels of the tensor.
    channels: usize,
    /// Voxels between a block's first voxel and its tile's origin, per axis.
    shift: usize,
    /// Voxels kept per axis from the block's start (zeros beyond).
    extent: [usize; 3],
    /// Whether the spectra are conjugated.
    conj: bool,
}

/// Per-thread buffers of the block transforms.
struct Workspace {
    /// One real block, `N0 * N1 * N2`.
    real: Vec<f32>,
    /// One spectrum; holds the result of [`Plan::forward`] and the input of [`Plan::inverse`].
    a: Vec<Complex32>,
    /// The other spectrum-sized buffer, for transposes.
    b: Vec<Complex32>,
    /// FFT scratch, as long as the longest need of the plans.
    scratch: Vec<Complex32>,
}

impl Plan {
    /// The plan for `size` and an odd `kernel`; `None` when no block edge fits the kernel.
    fn new(size: [usize; 3], kernel: usize) -> Option<Self> {
        let mut block = [0; 3];
        let mut tiles = [0; 3];
        for axis in 0..3 {
            // The fewest padded voxels along the axis, then the fewest tiles.
            let (n, t) = BLOCKS
                .iter()
                .filter(|&&n| n > kernel)
                .map(|&n| (n, size[axis].div_ceil(n - kernel + 1)))
                .min_by_key(|&(n, t)| (n * t, t))?;
            block[axis] = n;
            tiles[axis] = t;
        }
        let [n0, n1, n2] = block;
        let half = n2 / 2 + 1;
        let freqs = n0 * n1 * half;
        let mut real = RealFftPlanner::<f32>::new();
        let mut complex = FftPlanner::<f32>::new();
        Some(Self {
            size,
            kernel,
            block,
            tiles,
            half,
            freqs,
            chunks: freqs.div_ceil(CHUNK),
            r2c: real.plan_fft_forward(n2),
            c2r: real.plan_fft_inverse(n2),
            fwd: [complex.plan_fft_forward(n0), complex.plan_fft_forward(n1)],
            inv: [complex.plan_fft_inverse(n0), complex.plan_fft_inverse(n1)],
        })
    }

    fn workspace(&self) -> Workspace {
        let [n0, n1, n2] = self.block;
        let scratch = [
            self.r2c.get_scratch_len(),
            self.c2r.get_scratch_len(),
            self.fwd[0].get_inplace_scratch_len(),
            self.fwd[1].get_inplace_scratch_len(),
            self.inv[0].get_inplace_scratch_len(),
            self.inv[1].get_inplace_scratch_len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        Workspace {
            real: vec![0.0; n0 * n1 * n2],
            a: vec![Complex32::default(); self.freqs],
            b: vec![Complex32::default(); self.freqs],
            scratch: vec![Complex32::default(); scratch],
        }
    }

    /// Valid outputs per tile and axis, `N - k + 1`.
    fn tile(&self) -> [usize; 3] {
        self.block.map(|n| n - self.kernel + 1)
    }

    fn tiles_per_item(&self) -> usize {
        self.tiles.iter().product()
    }

    fn voxels(&self) -> usize {
        self.size.iter().product()
    }

    /// Tiles per group when each tile holds the spectra of `channels` channels.
    fn group(&self, channels: usize) -> usize {
        let tile_bytes = channels * self.spectrum_floats() * std::mem::size_of::<f32>();
        (GROUP_BYTES / tile_bytes.max(1)).clamp(2, 16)
    }

    /// Floats of one spectrum in chunks.
    fn spectrum_floats(&self) -> usize {
        self.chunks * CHUNK_FLOATS
    }

    /// The first output voxel of tile `t` (row-major over the tile grid).
    fn origin(&self, t: usize) -> [usize; 3] {
        let [_, t1, t2] = self.tiles;
        let tile = self.tile();
        [
            t / (t1 * t2) * tile[0],
            t / t2 % t1 * tile[1],
            t % t2 * tile[2],
        ]
    }

    /// 1 / (N0 N1 N2): the inverse FFTs are unnormalised.
    fn scale(&self) -> f32 {
        1.0 / self.block.iter().product::<usize>() as f32
    }

    /// Copies into `ws.real` the block of the one-channel volume `vol` whose first voxel
    /// sits at `start` (which may lie outside the volume): voxels outside the volume or at
    /// block indices `>= extent` are zero. Returns how many leading planes and rows may be
    /// nonzero (for [`Plan::forward`]).
    fn gather(
        &self,
        vol: &[f32],
        start: [isize; 3],
        extent: [usize; 3],
        real: &mut [f32],
    ) -> [usize; 2] {
        let [n0, n1, n2] = self.block;
        let [s0, s1, s2] = self.size;
        // The block indices along each axis whose voxel lies inside the volume and extent.
        let span = |axis: usize, n: usize, s: usize| {
            let lo = (-start[axis]).max(0) as usize;
            let hi = (s as isize - start[axis]).clamp(0, n.min(extent[axis]) as isize) as usize;
            (lo.min(hi), hi)
        };
        let (lo0, hi0) = span(0, n0, s0);
        let (lo1, hi1) = span(1, n1, s1);
        let (lo2, hi2) = span(2, n2, s2);
        real.fill(0.0);
        for i0 in lo0..hi0 {
            let v0 = (start[0] + i0 as isize) as usize;
            for i1 in lo1..hi1 {
                let v1 = (start[1] + i1 as isize) as usize;
                let src = (v0 * s1 + v1) * s2;
                let v2 = (start[2] + lo2 as isize) as usize;
                let dst = (i0 * n1 + i1) * n2;
                real[dst + lo2..dst + hi2].copy_from_slice(&vol[src + v2..src + v2 + hi2 - lo2]);
            }
        }
        [hi0, hi1]
    }

    /// The spectrum of `ws.real` into `ws.a`, layout `[m][f1][f0]` (`m` the real-FFT
    /// frequency of the last axis). Planes `>= live[0]` and rows `(i0, i1 >= live[1])` of
    /// the block must be zero; their transforms are skipped.
    fn forward(&self, ws: &mut Workspace, live: [usize; 2]) {
        let [n0, n1, n2] = self.block;
        let h = self.half;
        let Workspace {
            real,
            a,
            b,
            scratch,
        } = ws;
        let zero = Complex32::default();
        // Axis 2: real FFT of every row, into a[i0][i1][m].
        for i0 in 0..n0 {
            for i1 in 0..n1 {
                let row = i0 * n1 + i1;
                let out = &mut a[row * h..(row + 1) * h];
                if i0 < live[0] && i1 < live[1] {
                    self.r2c
                        .process_with_scratch(&mut real[row * n2..(row + 1) * n2], out, scratch)
                        .expect("the buffers have the plan's lengths");
                } else {
                    out.fill(zero);
                }
            }
        }
        // Axis 1: per plane, a[i0][i1][m] -> b[i0][m][i1], FFT of each line.
        for i0 in 0..n0 {
            let plane = i0 * n1 * h..(i0 + 1) * n1 * h;
            let dst = &mut b[plane.clone()];
            if i0 < live[0] {
                transpose(&a[plane], dst, n1, h);
                self.fwd[1].process_with_scratch(dst, scratch);
            } else {
                dst.fill(zero);
            }
        }
        // Axis 0: b[i0][(m, f1)] -> a[(m, f1)][i0], FFT of each line.
        transpose(b, a, n0, h * n1);
        self.fwd[0].process_with_scratch(a, scratch);
    }

    /// The block of the spectrum in `ws.a` (consumed) into `ws.real`, times `N0 N1 N2`.
    /// Only planes `< need[0]` and, in them, rows `< need[1]` are computed.
    fn inverse(&self, ws: &mut Workspace, need: [usize; 2]) {
        let [n0, n1, n2] = self.block;
        let h = self.half;
        let Workspace {
            real,
            a,
            b,
            scratch,
        } = ws;
        // Axis 0, then a[(m, f1)][i0] -> b[i0][(m, f1)] for the needed planes.
        self.inv[0].process_with_scratch(a, scratch);
        for i0 in 0..need[0] {
            for (line, value) in b[i0 * h * n1..(i0 + 1) * h * n1].iter_mut().enumerate() {
                *value = a[line * n0 + i0];
            }
        }
        for i0 in 0..need[0] {
            let plane = i0 * n1 * h..(i0 + 1) * n1 * h;
            // Axis 1 along b[i0][m][f1], then back to a[i0][i1][m].
            self.inv[1].process_with_scratch(&mut b[plane.clone()], scratch);
            transpose(&b[plane.clone()], &mut a[plane], h, n1);
            for i1 in 0..need[1] {
                let row = i0 * n1 + i1;
                let spectrum = &mut a[row * h..(row + 1) * h];
                // A real signal's spectrum is real at frequency 0 (and N/2); rounding in the
                // other axes leaves a trace of imaginary part there, which the real
                // inverse FFT refuses.
                spectrum[0].im = 0.0;
                if n2 % 2 == 0 {
                    spectrum[h - 1].im = 0.0;
                }
                self.c2r
                    .process_with_scratch(spectrum, &mut real[row * n2..(row + 1) * n2], scratch)
                    .expect("the buffers have the plan's lengths");
            }
        }
    }

    /// Writes `map(scale * real[offset + i])` for tile outputs `i` (clipped to the volume)
    /// into the one-channel volume `out`, at `origin`.
    fn scatter(
        &self,
        real: &[f32],
        offset: usize,
        origin: [usize; 3],
        out: &mut [f32],
        map: impl Fn(f32) -> f32,
    ) {
        let [_, n1, n2] = self.block;
        let [_, s1, s2] = self.size;
        let tile = self.tile();
        let count: [usize; 3] = std::array::from_fn(|a| tile[a].min(self.size[a] - origin[a]));
        let scale = self.scale();
        for i0 in 0..count[0] {
            for i1 in 0..count[1] {
                let src = ((offset + i0) * n1 + offset + i1) * n2 + offset;
                let dst = ((origin[0] + i0) * s1 + origin[1] + i1) * s2 + origin[2];
                for (o, &v) in out[dst..dst + count[2]]
                    .iter_mut()
                    .zip(&real[src..src + count[2]])
                {
                    *o = map(scale * v);
                }
            }
        }
    }

    /// The spectra of the `(rows, cols)` kernels of `w` (`(Co, Ci, k, k, k)`), in chunks,
    /// layout `[row][chunk][col]`: `rows = Co` for the forward pass (conjugated), `rows = Ci`
    /// for the input gradient (`transpose`). A chunk of one row for all columns is one
    /// contiguous run, as [`products_with`] reads it.
    fn kernel_spectra(&self, w: &[f32], co: usize, ci: usize, transpose: bool) -> Vec<f32> {
        let k = self.kernel;
        let k3 = k * k * k;
        let [_, n1, n2] = self.block;
        let cols = if transpose { co } else { ci };
        let mut spectra = Buffers::take(co * ci * self.spectrum_floats());
        spectra
            .par_chunks_mut(cols * self.spectrum_floats())
            .enumerate()
            .for_each_init(
                || self.workspace(),
                |ws, (row, dst)| {
                    for col in 0..cols {
                        let (o, c) = if transpose { (col, row) } else { (row, col) };
                        let taps = &w[(o * ci + c) * k3..(o * ci + c + 1) * k3];
                        ws.real.fill(0.0);
                        for a in 0..k {
                            for b in 0..k {
                                let at = (a * n1 + b) * n2;
                                ws.real[at..at + k].copy_from_slice(&taps[(a * k + b) * k..][..k]);
                            }
                        }
                        self.forward(ws, [k, k]);
                        to_chunks(&ws.a, &mut dst[col * CHUNK_FLOATS..], cols, !transpose);
                    }
                },
            );
        spectra
    }

    /// The spectra of the blocks of the tiles `tiles` (numbered over the batch), one per
    /// tile and channel of the channels-first `input`, cut as `blocks` says, in chunks,
    /// layout `[tile][channel][chunk]`, into `dst`.
    fn block_spectra(
        &self,
        input: &[f32],
        blocks: Blocks,
        tiles: std::ops::Range<usize>,
        dst: &mut [f32],
    ) {
        let Blocks {
            channels,
            shift,
            extent,
            conj,
        } = blocks;
        let (first, count) = (tiles.start, tiles.len());
        let per_item = self.tiles_per_item();
        let vox = self.voxels();
        dst[..count * channels * self.spectrum_floats()]
            .par_chunks_mut(self.spectrum_floats())
            .enumerate()
            .for_each_init(
                || self.workspace(),
                |ws, (i, out)| {
                    let tile = first + i / channels;
                    let (item, t) = (tile / per_item, tile % per_item);
                    let channel = i % channels;
                    let start = self.origin(t).map(|o| o as isize - shift as isize);
                    let vol = &input[(item * channels + channel) * vox..][..vox];
                    let live = self.gather(vol, start, extent, &mut ws.real);
                    self.forward(ws, live);
                    to_chunks(&ws.a, out, 1, conj);
                },
            );
    }

    /// `out[tile][row] = Σ_col spectra[row][col] ⊙ input[tile][col]` over all tiles, then
    /// back to voxels: the shared body of the forward pass and the input gradient. `input`
    /// has `cols` channels, the result `rows`; `offset` is where the valid outputs sit in
    /// the block.
    fn apply(
        &self,
        input: &[f32],
        batch: usize,
        [cols, rows]: [usize; 2],
        spectra: &[f32],
        offset: usize,
        epilogue: Option<&Epilogue>,
    ) -> Vec<f32> {
        let vox = self.voxels();
        let per_item = self.tiles_per_item();
        let total = batch * per_item;
        let group = self.group(cols + rows).min(total);
        let sf = self.spectrum_floats();
        let pad = (self.kernel - 1) / 2;
        let mut out = vec![0.0; batch * rows * vox];
        let mut xs = Buffers::take(group * cols * sf);
        let mut ys = Buffers::take(group * rows * sf);
        let coefficients = epilogue.map(|e| e.coefficients::<f32>(rows));
        for first in (0..total).step_by(group) {
            let count = group.min(total - first);
            let blocks = Blocks {
                channels: cols,
                shift: pad,
                extent: self.block,
                conj: false,
            };
            self.block_spectra(input, blocks, first..first + count, &mut xs);
            let simd = simd_level();
            ys[..count * rows * sf]
                .par_chunks_mut(count * rows * CHUNK_FLOATS)
                .enumerate()
                .for_each(|(c, dst)| {
                    let sizes = Sizes {
                        chunks: self.chunks,
                        tiles: count,
                        rows,
                        cols,
                    };
                    chunk_products(Product::Sum, simd, dst, spectra, &xs, c, sizes);
                });
            let ys = &ys;
            out.par_chunks_mut(vox).enumerate().for_each_init(
                || self.workspace(),
                |ws, (i, dst)| {
                    let (item, row) = (i / rows, i % rows);
                    for g in 0..count {
                        let tile = first + g;
                        if tile / per_item != item {
                            continue;
                        }
                        from_chunks(&mut ws.a, |c| {
                            &ys[((c * count + g) * rows + row) * CHUNK_FLOATS..][..CHUNK_FLOATS]
                        });
                        self.inverse(ws, [self.block[0], self.block[1]]);
                        let origin = self.origin(tile % per_item);
                        match &coefficients {
                            None => self.scatter(&ws.real, offset, origin, dst, |v| v),
                            Some((scale, shift, relu)) => {
                                let (s, t, relu) = (scale[row], shift[row], *relu);
                                self.scatter(&ws.real, offset, origin, dst, |v| {
                                    let v = v * s + t;
                                    if relu {
                                        v.max(0.0)
                                    } else {
                                        v
                                    }
                                });
                            }
                        }
                    }
                },
            );
        }
        Buffers::give(xs);
        Buffers::give(ys);
        out
    }
}

/// Frees the spectrum buffers kept between FFT convolutions. The direct path calls it: its
/// own padded copies are large, and between the FFT calls of a LocalNet step (the level-0
/// convolutions, forward then backward) the kept buffers would only add to the peak.
pub(super) fn release_buffers() {
    Buffers::clear();
}

/// The plan of a convolution of `size` with kernel `kernel`, when the FFT path takes it.
fn plan(size: [usize; 3], kernel: usize) -> Option<Plan> {
    if kernel < MIN_KERNEL {
        return None;
    }
    Plan::new(size, kernel)
}

/// `conv3d(x, w)` (stride 1, "same" zero padding) of the channels-first `x` (`(B, Ci, S)`)
/// with `w` (`(Co, Ci, k, k, k)`), each output mapped through `epilogue`; `None` when the
/// FFT path does not take this shape (kernels below 5).
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    batch: usize,
    [ci, co]: [usize; 2],
    size: [usize; 3],
    kernel: usize,
    epilogue: Option<&Epilogue>,
) -> Option<Vec<f32>> {
    let plan = plan(size, kernel)?;
    let spectra = plan.kernel_spectra(w, co, ci, false);
    let y = plan.apply(x, batch, [ci, co], &spectra, 0, epilogue);
    Buffers::give(spectra);
    Some(y)
}

/// The input gradient `(B, Ci, S)` of [`forward`] from the output gradient `dy`
/// (`(B, Co, S)`).
pub(super) fn input_grad(
    dy: &[f32],
    w: &[f32],
    batch: usize,
    [ci, co]: [usize; 2],
    size: [usize; 3],
    kernel: usize,
) -> Option<Vec<f32>> {
    let plan = plan(size, kernel)?;
    let spectra = plan.kernel_spectra(w, co, ci, true);
    let dx = plan.apply(dy, batch, [co, ci], &spectra, kernel - 1, None);
    Buffers::give(spectra);
    Some(dx)
}

/// The weight gradient `(Co, Ci, k, k, k)` of [`forward`] from its input `x` and output
/// gradient `dy`.
pub(super) fn weight_grad(
    x: &[f32],
    dy: &[f32],
    batch: usize,
    [ci, co]: [usize; 2],
    size: [usize; 3],
    kernel: usize,
) -> Option<Vec<f32>> {
    let plan = plan(size, kernel)?;
    let per_item = plan.tiles_per_item();
    let total = batch * per_item;
    let group = plan.group(ci + co).min(total);
    let sf = plan.spectrum_floats();
    let pad = (kernel - 1) / 2;
    // Sums over tiles of conj(DY[co]) ⊙ X[ci], layout [chunk][co][ci].
    let mut sums = Buffers::take(plan.chunks * co * ci * CHUNK_FLOATS);
    let mut dys = Buffers::take(group * co * sf);
    let mut xs = Buffers::take(group * ci * sf);
    for first in (0..total).step_by(group) {
        let count = group.min(total - first);
        // dy: each tile's own outputs only; x: the whole block around them.
        let dy_blocks = Blocks {
            channels: co,
            shift: 0,
            extent: plan.tile(),
            conj: true,
        };
        let x_blocks = Blocks {
            channels: ci,
            shift: pad,
            extent: plan.block,
            conj: false,
        };
        plan.block_spectra(dy, dy_blocks, first..first + count, &mut dys);
        plan.block_spectra(x, x_blocks, first..first + count, &mut xs);
        let simd = simd_level();
        sums.par_chunks_mut(co * ci * CHUNK_FLOATS)
            .enumerate()
            .for_each(|(c, dst)| {
                let sizes = Sizes {
                    chunks: plan.chunks,
                    tiles: count,
                    rows: co,
                    cols: ci,
                };
                chunk_products(Product::Outer, simd, dst, &dys, &xs, c, sizes);
            });
    }
    Buffers::give(dys);
    Buffers::give(xs);
    let k3 = kernel * kernel * kernel;
    let [_, n1, n2] = plan.block;
    let scale = plan.scale();
    let mut dw = vec![0.0; co * ci * k3];
    dw.par_chunks_mut(k3).enumerate().for_each_init(
        || plan.workspace(),
        |ws, (pair, dst)| {
            from_chunks(&mut ws.a, |c| {
                &sums[(c * co * ci + pair) * CHUNK_FLOATS..][..CHUNK_FLOATS]
            });
            plan.inverse(ws, [kernel, kernel]);
            for a in 0..kernel {
                for b in 0..kernel {
                    let src = (a * n1 + b) * n2;
                    for (d, &v) in dst[(a * kernel + b) * kernel..][..kernel]
                        .iter_mut()
                        .zip(&ws.real[src..src + kernel])
                    {
                        *d = v * scale;
                    }
                }
            }
        },
    );
    Buffers::give(sums);
    Some(dw)
}

/// `dst[c][i] = src[i][c]` for a `rows x cols` row-major `src`.
fn transpose(src: &[Complex32], dst: &mut [Complex32], rows: usize, cols: usize) {
    for (r, line) in src.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in line.iter().enumerate() {
            dst[c * rows + r] = v;
        }
    }
}

/// A spectrum (`freqs` values) in chunks, chunk `c` at `dst[c * stride * CHUNK_FLOATS..]`:
/// the real parts of frequencies `c * CHUNK..`, then their imaginary parts (negated with
/// `conj`); past the end, zeros.
fn to_chunks(spectrum: &[Complex32], dst: &mut [f32], stride: usize, conj: bool) {
    let sign = if conj { -1.0 } else { 1.0 };
    for c in 0..spectrum.len().div_ceil(CHUNK) {
        let chunk = &mut dst[c * stride * CHUNK_FLOATS..][..CHUNK_FLOATS];
        let (re, im) = chunk.split_at_mut(CHUNK);
        let values = &spectrum[c * CHUNK..];
        for j in 0..CHUNK {
            let v = values.get(j).copied().unwrap_or_default();
            re[j] = v.re;
            im[j] = sign * v.im;
        }
    }
}

/// The inverse of [`to_chunks`] (without conjugation) into `spectrum`, chunk `c` read from
/// `chunk(c)`.
fn from_chunks<'a>(spectrum: &mut [Complex32], chunk: impl Fn(usize) -> &'a [f32]) {
    for (c, values) in spectrum.chunks_mut(CHUNK).enumerate() {
        let (re, im) = chunk(c).split_at(CHUNK);
        for (j, v) in values.iter_mut().enumerate() {
            *v = Complex32::new(re[j], im[j]);
        }
    }
}

/// The sizes of one chunk's frequency-domain products: chunks per spectrum, tiles in the
/// group, and the channel counts (`rows` produced, `cols` summed over; for the weight
/// gradient, `Co` and `Ci`).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    chunks: usize,
    tiles: usize,
    rows: usize,
    cols: usize,
}

/// `a * b + c`, fused where the caller is compiled with FMA.
#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `acc += k ⊙ x` over one chunk (split complex parts).
#[inline(always)]
fn mac<const FMA: bool>(
    acc: &mut [f32; CHUNK_FLOATS],
    k: &[f32; CHUNK_FLOATS],
    x: &[f32; CHUNK_FLOATS],
) {
    for j in 0..CHUNK {
        let (kr, ki, xr, xi) = (k[j], k[CHUNK + j], x[j], x[CHUNK + j]);
        acc[j] = fma::<FMA>(kr, xr, fma::<FMA>(-ki, xi, acc[j]));
        acc[CHUNK + j] = fma::<FMA>(kr, xi, fma::<FMA>(ki, xr, acc[CHUNK + j]));
    }
}

/// One chunk of `CHUNK_FLOATS` floats starting at chunk index `at` of `v`.
#[inline(always)]
fn chunk(v: &[f32], at: usize) -> &[f32; CHUNK_FLOATS] {
    v[at * CHUNK_FLOATS..(at + 1) * CHUNK_FLOATS]
        .try_into()
        .expect("a chunk is CHUNK_FLOATS long")
}

/// The two frequency-domain kernels of one chunk.
#[derive(Debug, Clone, Copy)]
enum Product {
    /// [`products_with`]: `out[tile][row] = Σ_col a[row][col] ⊙ b[tile][col]`.
    Sum,
    /// [`accumulate_with`]: `out[co][ci] += a[tile][co] ⊙ b[tile][ci]` over tiles.
    Outer,
}

/// Runs `kind` on chunk `c`, compiled for the SIMD level `simd` (the caller's
/// [`simd_level`], read once per call: worker threads do not see a thread's limit). A chunk
/// is 16 complex values, one AVX-512 register per part or two AVX2 ones.
fn chunk_products(
    kind: Product,
    simd: SimdLevel,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    c: usize,
    sizes: Sizes,
) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: the level is at most the detected one: the CPU has AVX-512F.
        SimdLevel::Avx512 => return unsafe { chunk_products_avx512(kind, out, a, b, c, sizes) },
        // SAFETY: as above, the CPU has AVX2 and FMA.
        SimdLevel::Avx2 => return unsafe { chunk_products_avx2(kind, out, a, b, c, sizes) },
        SimdLevel::Generic => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = simd;
    chunk_products_with::<false>(kind, out, a, b, c, sizes);
}

/// [`chunk_products`] compiled for AVX-512 (the compiler vectorises each 16-value chunk
/// loop into single 512-bit operations).
///
/// # Safety
/// The CPU must have AVX-512F (and AVX2 and FMA, which every AVX-512 CPU has).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn chunk_products_avx512(
    kind: Product,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    c: usize,
    sizes: Sizes,
) {
    chunk_products_with::<true>(kind, out, a, b, c, sizes);
}

/// [`chunk_products`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_products_avx2(
    kind: Product,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    c: usize,
    sizes: Sizes,
) {
    chunk_products_with::<true>(kind, out, a, b, c, sizes);
}

#[inline(always)]
fn chunk_products_with<const FMA: bool>(
    kind: Product,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    c: usize,
    sizes: Sizes,
) {
    match kind {
        Product::Sum => products_with::<FMA>(a, b, out, c, sizes),
        Product::Outer => accumulate_with::<FMA>(out, a, b, c, sizes),
    }
}

/// Chunk `c` of `y[tile][row] = Σ_col k[row][col] ⊙ x[tile][col]` for `tiles` tiles:
/// `k` is `[row][chunk][col]`, `x` is `[tile][col][chunk]`, `y` (this chunk only) is
/// `[tile][row]`.
#[inline(always)]
fn products_with<const FMA: bool>(k: &[f32], x: &[f32], y: &mut [f32], c: usize, sizes: Sizes) {
    let Sizes {
        chunks,
        tiles,
        rows,
        cols,
    } = sizes;
    // Two tiles per pass, so that each kernel chunk loaded serves both.
    let mut t = 0;
    while t < tiles {
        let pair = (tiles - t).min(2);
        for row in 0..rows {
            let mut acc = [[0.0f32; CHUNK_FLOATS]; 2];
            for col in 0..cols {
                let kc = chunk(k, (row * chunks + c) * cols + col);
                mac::<FMA>(&mut acc[0], kc, chunk(x, (t * cols + col) * chunks + c));
                if pair == 2 {
                    mac::<FMA>(
                        &mut acc[1],
                        kc,
                        chunk(x, ((t + 1) * cols + col) * chunks + c),
                    );
                }
            }
            for (p, a) in acc.iter().enumerate().take(pair) {
                y[((t + p) * rows + row) * CHUNK_FLOATS..][..CHUNK_FLOATS].copy_from_slice(a);
            }
        }
        t += pair;
    }
}

/// Chunk `c` of `sums[co][ci] += dy[tile][co] ⊙ x[tile][ci]` over `tiles` tiles (`dy`
/// already conjugated): `dy` is `[tile][co][chunk]`, `x` is `[tile][ci][chunk]`, `sums`
/// (this chunk only) is `[co][ci]`.
#[inline(always)]
fn accumulate_with<const FMA: bool>(
    sums: &mut [f32],
    dy: &[f32],
    x: &[f32],
    c: usize,
    sizes: Sizes,
) {
    let Sizes {
        chunks,
        tiles,
        rows: co,
        cols: ci,
    } = sizes;
    // Two sums at a time stay in registers over all tiles; each dy chunk serves both.
    for o in 0..co {
        let mut i = 0;
        while i < ci {
            let pair = (ci - i).min(2);
            let at = o * ci + i;
            let mut acc = [[0.0f32; CHUNK_FLOATS]; 2];
            for (p, a) in acc.iter_mut().enumerate().take(pair) {
                *a = *chunk(sums, at + p);
            }
            for t in 0..tiles {
                let d = chunk(dy, (t * co + o) * chunks + c);
                mac::<FMA>(&mut acc[0], d, chunk(x, (t * ci + i) * chunks + c));
                if pair == 2 {
                    mac::<FMA>(&mut acc[1], d, chunk(x, (t * ci + i + 1) * chunks + c));
                }
            }
            for (p, a) in acc.iter().enumerate().take(pair) {
                sums[(at + p) * CHUNK_FLOATS..][..CHUNK_FLOATS].copy_from_slice(a);
            }
            i += pair;
        }
    }
}
