//! The arithmetic that the coordinator (head) and the replicas (workers) of a data-parallel
//! training job must agree on: how a global batch is split, how gradients are encoded on the
//! wire and averaged, and what a checkpoint records.

pub mod round;

use serde::{Deserialize, Serialize};

use crate::optim::ReduceLrOnPlateau;
use crate::train::{EpochSummary, TrainConfig};
use crate::{Error, Result};

/// How gradient chunks travel. Replicas upload their shard's gradient *sum* (see
/// [`GradEncoding::encode_sum`]); the coordinator sends back the mean
/// ([`GradEncoding::encode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GradEncoding {
    /// Exact: sums go up as f64 (8 bytes a value), means come back as f32 (4 bytes), so the
    /// mean is the same, bit for bit, however the global batch is split.
    #[default]
    F32,
    /// IEEE half precision, 2 bytes a value, after a 4-byte f32 scale per chunk: a chunk
    /// whose largest value would overflow half precision (65504) is divided by a power of two
    /// first, so large gradients travel instead of turning into inf.
    F16,
    /// bfloat16, 2 bytes a value.
    Bf16,
}

impl GradEncoding {
    /// Parses `fp32`, `fp16` or `bf16`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" | "fp32" | "f32" => Ok(Self::F32),
            "fp16" | "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            other => Err(Error::invalid(
                "grad_compression",
                format!("`{other}` is not one of fp32, fp16, bf16"),
            )),
        }
    }

    /// Bytes per value.
    pub fn bytes_per_value(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Bytes of a chunk before its values (the F16 scale).
    pub fn header_bytes(self) -> usize {
        match self {
            Self::F16 => 4,
            Self::F32 | Self::Bf16 => 0,
        }
    }

    /// Bytes per value of an uploaded sum.
    pub fn sum_bytes_per_value(self) -> usize {
        match self {
            Self::F32 => 8,
            Self::F16 | Self::Bf16 => 2,
        }
    }

    /// Values that fit a chunk of `payload` bytes, up (sums) and down (means).
    pub fn values_per_chunk(self, payload: usize) -> usize {
        let width = self.bytes_per_value().max(self.sum_bytes_per_value());
        (payload.saturating_sub(self.header_bytes()) / width).max(1)
    }

    /// Encodes a replica's gradient sum for the upload: f64 for [`GradEncoding::F32`]
    /// (exact), otherwise compressed like [`GradEncoding::encode`].
    pub fn encode_sum(self, values: &[f64]) -> Vec<u8> {
        match self {
            Self::F32 => {
                let mut out = Vec::with_capacity(values.len() * 8);
                values
                    .iter()
                    .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
                out
            }
            Self::F16 | Self::Bf16 => {
                let narrow: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                self.encode(&narrow)
            }
        }
    }

    /// Decodes `expected` values of an uploaded sum; a payload of another length or a value
    /// that is not finite is refused.
    pub fn decode_sum(self, bytes: &[u8], expected: usize) -> Result<Vec<f64>> {
        match self {
            Self::F32 => {
                if bytes.len() != expected * 8 {
                    return Err(Error::invalid(
                        "gradient chunk",
                        format!(
                            "{} bytes, expected {} ({expected} values of 8 bytes)",
                            bytes.len(),
                            expected * 8
                        ),
                    ));
                }
                let values: Vec<f64> = bytes
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                    .collect();
                if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::invalid(
                        "gradient chunk",
                        format!("value {bad} is not finite"),
                    ));
                }
                Ok(values)
            }
            Self::F16 | Self::Bf16 => Ok(self
                .decode(bytes, expected)?
                .into_iter()
                .map(f64::from)
                .collect()),
        }
    }

    /// The power of two that brings the largest finite magnitude of `values` under 2^15
    /// (half precision's largest finite value is 65504); 1 when it already is.
    fn f16_scale(values: &[f32]) -> f32 {
        let max = values
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        if max <= 32768.0 {
            1.0
        } else {
            2f32.powi((max / 32768.0).log2().ceil() as i32)
        }
    }

    /// Encodes values, little-endian.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.header_bytes() + values.len() * self.bytes_per_value());
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => {
                let scale = Self::f16_scale(values);
                out.extend_from_slice(&scale.to_le_bytes());
                values.iter().for_each(|v| {
                    out.extend_from_slice(&half::f16::from_f32(*v / scale).to_le_bytes());
                });
            }
            Self::Bf16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        out
    }

    /// Decodes `expected` values; a payload of another length is refused.
    pub fn decode(self, bytes: &[u8], expected: usize) -> Result<Vec<f32>> {
        let width = self.bytes_per_value();
        let header = self.header_bytes();
        if bytes.len() != header + expected * width {
            return Err(Error::invalid(
                "gradient chunk",
                format!(
                    "{} bytes, expected {} ({header} + {expected} values of {width} bytes)",
                    bytes.len(),
                    header + expected * width
                ),
            ));
        }
        let (scale, bytes) = if header == 4 {
            let scale = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if !(scale.is_finite() && scale >= 1.0) {
                return Err(Error::invalid(
                    "gradient chunk",
                    format!("scale {scale} is not a finite value >= 1"),
                ));
            }
            (scale, &bytes[4..])
        } else {
            (1.0, bytes)
        };
        let values: Vec<f32> = match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32() * scale)
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "gradient chunk",
                format!("value {bad} is not finite"),
            ));
        }
        Ok(values)
    }
}

/// Splits a global batch across `members` replicas: contiguous, the first ones get one case
/// more when it does not divide evenly, and a replica may get none.
pub fn shard(batch: &[usize], members: usize) -> Vec<Vec<usize>> {
    let members = members.max(1);
    let (base, extra) = (batch.len() / members, batch.len() % members);
    let mut out = Vec::with_capacity(members);
    let mut start = 0;
    for r in 0..members {
        let n = base + usize::from(r < extra);
        out.push(batch[start..start + n].to_vec());
        start += n;
    }
    out
}

/// The global batches of `epoch` (1-based): the epoch's permutation of the training cases
/// (see [`crate::train::epoch_order`]) cut into `batch_size` pieces; the last may be short.
pub fn epoch_batches(
    n_train: usize,
    seed: u64,
    epoch: usize,
    batch_size: usize,
) -> Vec<Vec<usize>> {
    crate::train::epoch_order(n_train, seed, epoch)
        .chunks(batch_size.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Sizes of the chunks a flattened gradient of `num_params` values is cut into.
pub fn chunk_lengths(num_params: usize, chunk_floats: usize) -> Vec<usize> {
    let chunk = chunk_floats.max(1);
    (0..num_params.div_ceil(chunk))
        .map(|k| chunk.min(num_params - k * chunk))
        .collect()
}

/// The commit point of a distributed training job's checkpoints (`state.json` in the
/// stage): everything needed to continue exactly where it stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistState {
    /// The training config.
    pub config: TrainConfig,
    /// Dataset trained on.
    pub dataset: String,
    /// Training and validation case ids.
    pub train_cases: Vec<String>,
    /// Validation case ids.
    pub val_cases: Vec<String>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Learning rate for the next epoch.
    pub lr: f64,
    /// Best validation score so far (binary Dice, or soft Dice without binary masks).
    pub best_val: Option<f64>,
    /// Epoch of the best score.
    pub best_epoch: Option<usize>,
    /// The scheduler.
    pub scheduler: ReduceLrOnPlateau,
    /// Stage key prefix of the checkpoint (weights.safetensors, optimizer.safetensors).
    pub checkpoint: String,
    /// Stage key of the best weights so far: the weights of the best epoch's checkpoint
    /// (kept while it is the best), or of the job this one resumed. `None` in states written
    /// before it was recorded (the best weights are then `best/weights.safetensors`).
    #[serde(default)]
    pub best_weights: Option<String>,
    /// The replicas' whole-state checksum at the checkpoint (step, parameters, BatchNorm
    /// statistics and counters, Adam's moments): a replica restored from it must match.
    #[serde(default)]
    pub state_sha256: Option<String>,
    /// Every epoch so far.
    pub history: Vec<EpochSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        assert_eq!(shard(&[7, 3], 2), vec![vec![7], vec![3]]);
        assert_eq!(shard(&[7, 3], 3), vec![vec![7], vec![3], vec![]]);
        assert_eq!(shard(&[1, 2, 3, 4, 5], 2), vec![vec![1, 2, 3], vec![4, 5]]);
        assert_eq!(shard(&[1, 2], 1), vec![vec![1, 2]]);
    }

    #[test]
    fn epoch_batches_are_a_partition() {
        let b = epoch_batches(7, 1, 2, 3);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 1]);
        let mut all: Vec<usize> = b.concat();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[test]
    fn chunks_cover_every_parameter() {
        assert_eq!(chunk_lengths(10, 4), vec![4, 4, 2]);
        assert_eq!(chunk_lengths(8, 4), vec![4, 4]);
        assert!(chunk_lengths(0, 4).is_empty());
    }

    #[test]
    fn sums_travel_exactly_in_fp32_mode() {
        let v = [0.1f64 + 1e-12, -3.0e7, 1.0e-30];
        let bytes = GradEncoding::F32.encode_sum(&v);
        assert_eq!(bytes.len(), 24);
        assert_eq!(GradEncoding::F32.decode_sum(&bytes, 3).unwrap(), v.to_vec());
        assert!(GradEncoding::F32.decode_sum(&bytes, 2).is_err());
        let nan = GradEncoding::F32.encode_sum(&[f64::NAN]);
        assert!(GradEncoding::F32.decode_sum(&nan, 1).is_err());
        let back = GradEncoding::Bf16
            .decode_sum(&GradEncoding::Bf16.encode_sum(&[2.0, -0.5]), 2)
            .unwrap();
        assert_eq!(back, vec![2.0, -0.5]);
    }

    #[test]
    fn encodings_round_trip_and_refuse_bad_payloads() {
        let v = [0.5f32, -1.25, 3.0e-3, 0.0];
        for enc in [GradEncoding::F32, GradEncoding::F16, GradEncoding::Bf16] {
            let bytes = enc.encode(&v);
            assert_eq!(
                bytes.len(),
                enc.header_bytes() + v.len() * enc.bytes_per_value()
            );
            let back = enc.decode(&bytes, v.len()).expect("decodes");
            for (a, b) in v.iter().zip(&back) {
                assert!(
                    (a - b).abs() <= 0.01 * a.abs() + 1e-6,
                    "{enc:?}: {a} vs {b}"
                );
            }
            assert!(enc.decode(&bytes, v.len() + 1).is_err());
        }
        assert_eq!(
            GradEncoding::F32
                .decode(&GradEncoding::F32.encode(&v), 4)
                .expect("exact"),
            v.to_vec()
        );
        let nan = GradEncoding::F32.encode(&[f32::NAN]);
        assert!(GradEncoding::F32.decode(&nan, 1).is_err());
        assert!(GradEncoding::parse("int8").is_err());
    }

    /// Issue 17 item 7: a gradient above half precision's range (65504) used to become inf,
    /// which the head took for a protocol error and evicted the replica.
    #[test]
    fn fp16_scales_large_gradients_instead_of_overflowing() {
        let v = [1.0e6f32, -3.0e5, 1.0, 70_000.0, 0.0];
        let bytes = GradEncoding::F16.encode(&v);
        let back = GradEncoding::F16.decode(&bytes, v.len()).expect("finite");
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-3 * 1.0e6, "{a} vs {b}");
        }
        // A chunk within range keeps scale 1, so its small values keep their precision.
        let small = [0.5f32, -1.25e-3];
        let back = GradEncoding::F16
            .decode(&GradEncoding::F16.encode(&small), 2)
            .expect("decodes");
        assert!((back[1] - small[1]).abs() <= 1e-6, "{back:?}");
        // A bad scale on the wire is refused, naming the chunk.
        let mut bad = GradEncoding::F16.encode(&small);
        bad[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = GradEncoding::F16.decode(&bad, 2).unwrap_err().to_string();
        assert!(e.contains("scale"), "{e}");
        // Chunk sizing leaves room for the scale, and for f64 sums.
        assert_eq!(GradEncoding::F16.values_per_chunk(1004), 500);
        assert_eq!(GradEncoding::F32.values_per_chunk(1004), 125);
    }
}
