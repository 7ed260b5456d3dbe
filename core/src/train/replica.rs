//! One replica of a data-parallel training job: the network, its optimizer and the cases,
//! driven step by step by a coordinator (the head) that all-reduces the gradients.
//!
//! Every replica holds the same parameters and the same Adam state. A step is split in two
//! so that the averaging can happen elsewhere: [`Replica::compute_gradient`] runs forward
//! and backward over this replica's shard of the global batch and returns the mean gradient
//! flattened in parameter order; [`Replica::apply_gradient`] takes the averaged gradient and
//! applies one Adam step. Replicas that apply the same averaged gradient stay identical,
//! which [`Replica::params_sha256`] lets the coordinator check.
//!
//! Micro-batches: a shard is processed `micro_batch` cases at a time and the gradients are
//! accumulated (weighted by cases), so that memory does not grow with the shard. BatchNorm
//! normalises with the statistics of each micro-batch, so one replica with micro-batches of
//! one case computes exactly what N replicas with one case each compute.
//!
//! Exactly-once steps: computing a gradient changes nothing in the replica, BatchNorm
//! running statistics included (each micro-batch's batch statistics are recorded and
//! returned instead); [`Replica::commit`] applies step `n` only when the replica holds step
//! `n - 1`, with the averaged gradient and every replica's micro-batch statistics in the
//! global batch's order, so all replicas keep identical running statistics whatever the
//! partition, an aborted step leaves no trace, and a repeated commit is recognised.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::dataset::CaseFiles;
use crate::evaluate::{evaluate_case, CaseMetrics, CaseTensors};
use crate::localnet::{LocalNet, TensorKind};
use crate::model::ModelConfig;
use crate::optim::{Adam, AdamConfig};
use crate::registration::RegistrationLoss;
use crate::train::dist::round::commit_check;
use crate::train::{batch_of, check_masks, load_case, LoadedCase, TrainConfig};
use crate::{Error, Result};

/// The gradient of a shard and its losses.
#[derive(Clone, Debug, Default)]
pub struct ShardGradient {
    /// The gradient summed over the shard's cases (each micro-batch's mean gradient times
    /// its cases), in f64, flattened in parameter order (empty when the shard is empty).
    /// Summed in f64, these sums add up to the same f32 mean whatever the partition of the
    /// global batch (f32 sums would differ in their last bits, which training amplifies).
    pub sum: Vec<f64>,
    /// Cases in the shard.
    pub samples: usize,
    /// Sums over the cases of (total, similarity, regularisation) loss.
    pub sums: (f64, f64, f64),
    /// Forward and backward time, milliseconds.
    pub compute_ms: f64,
    /// Each micro-batch's BatchNorm batch statistics, in the shard's order (see
    /// [`LocalNet::take_deferred_bn`](crate::localnet::LocalNet::take_deferred_bn)); the
    /// running statistics were left as they were.
    pub bn_batches: Vec<Vec<f32>>,
}

impl ShardGradient {
    /// The mean gradient over the shard's cases, f32.
    pub fn mean(&self) -> Vec<f32> {
        mean_of(&self.sum, self.samples)
    }
}

/// `sum / cases`, rounded to f32: how the coordinator turns the all-reduced sum into the
/// gradient every replica applies.
pub fn mean_of(sum: &[f64], cases: usize) -> Vec<f32> {
    let n = cases.max(1) as f64;
    sum.iter().map(|s| (s / n) as f32).collect()
}

/// What [`Replica::commit`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// The step was applied; the replica now holds it.
    Applied,
    /// The replica already held this step: nothing was applied a second time.
    AlreadyHeld,
}

/// Restores BatchNorm updates on every exit from a gradient computation.
struct DeferBn<'a>(&'a LocalNet);

impl<'a> DeferBn<'a> {
    fn new(net: &'a LocalNet) -> Self {
        net.defer_bn_updates(true);
        Self(net)
    }
}

impl Drop for DeferBn<'_> {
    fn drop(&mut self) {
        self.0.defer_bn_updates(false);
    }
}

/// A training replica.
pub struct Replica {
    config: TrainConfig,
    model_config: ModelConfig,
    net: LocalNet,
    adam: Adam,
    objective: RegistrationLoss,
    train: Vec<LoadedCase>,
    val: Vec<LoadedCase>,
    /// (name, shape, element count) of each parameter, in optimizer order.
    layout: Vec<(String, Vec<usize>, usize)>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("params", &self.num_params())
            .field("train_cases", &self.train.len())
            .field("val_cases", &self.val.len())
            .finish()
    }
}

impl Replica {
    /// Loads and preprocesses the cases and builds the network from the config's seed.
    pub fn new(
        config: &TrainConfig,
        train: &[CaseFiles],
        val: &[CaseFiles],
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let model_config = config.model_config();
        let pre = &model_config.preprocess;
        check_masks(config.loss, train)?;
        let train = train
            .iter()
            .map(|c| load_case(c, pre, device, config.loss.needs_keypoints()))
            .collect::<Result<Vec<_>>>()?;
        let val = val
            .iter()
            .map(|c| load_case(c, pre, device, false))
            .collect::<Result<Vec<_>>>()?;
        let net = LocalNet::new(&model_config.network, config.seed, DType::F32, device)?;
        let params = net.parameters();
        let layout = params
            .iter()
            .map(|(name, var)| (name.clone(), var.dims().to_vec(), var.elem_count()))
            .collect();
        let adam = Adam::new(params, AdamConfig::with_lr(config.lr))?;
        Ok(Self {
            config: config.clone(),
            model_config,
            net,
            adam,
            objective: RegistrationLoss::new(config.loss),
            train,
            val,
            layout,
        })
    }

    /// The training config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model config the weights belong to.
    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// Trainable scalars (the length of a flattened gradient).
    pub fn num_params(&self) -> usize {
        self.layout.iter().map(|(_, _, n)| n).sum()
    }

    /// Training and validation cases loaded.
    pub fn case_counts(&self) -> (usize, usize) {
        (self.train.len(), self.val.len())
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.adam.step_count()
    }

    /// The network.
    pub fn net(&self) -> &LocalNet {
        &self.net
    }

    /// Forward and backward over `cases` (indices into the training list), `micro_batch`
    /// cases at a time; returns the mean gradient over the cases and each micro-batch's
    /// BatchNorm statistics. The replica's state is unchanged.
    pub fn compute_gradient(&self, cases: &[usize], micro_batch: usize) -> Result<ShardGradient> {
        let started = Instant::now();
        if let Some(&bad) = cases.iter().find(|&&i| i >= self.train.len()) {
            return Err(Error::invalid(
                "cases",
                format!(
                    "training case index {bad} out of range ({} cases)",
                    self.train.len()
                ),
            ));
        }
        if cases.is_empty() {
            return Ok(ShardGradient::default());
        }
        let micro_batch = if micro_batch == 0 {
            cases.len()
        } else {
            micro_batch
        };
        let mut sum = vec![0f64; self.num_params()];
        let mut sums = (0.0, 0.0, 0.0);
        let params = self.net.parameters();
        let defer = DeferBn::new(&self.net);
        for chunk in cases.chunks(micro_batch) {
            let loaded: Vec<&LoadedCase> = chunk.iter().map(|&i| &self.train[i]).collect();
            let batch = batch_of(&loaded)?;
            let ddf = self.net.forward_t(&batch.network_input()?, true)?;
            let parts = self.objective.forward(&ddf, &batch)?;
            let values = parts.values()?;
            if !values.0.is_finite() {
                return Err(Error::invalid(
                    "training",
                    format!(
                        "the loss became {} at step {}",
                        values.0,
                        self.adam.step_count() + 1
                    ),
                ));
            }
            let grads = parts.total.backward()?;
            // The micro-batch loss is a mean over its cases: weight it by its cases (exact in
            // f64).
            let weight = chunk.len() as f64;
            let mut offset = 0;
            for ((name, var), (_, _, n)) in params.iter().zip(&self.layout) {
                if let Some(g) = grads.get(var) {
                    let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    if g.len() != *n {
                        return Err(Error::ShapeMismatch {
                            op: "gradient",
                            expected: format!("{n} values for `{name}`"),
                            got: g.len().to_string(),
                        });
                    }
                    for (acc, v) in sum[offset..offset + n].iter_mut().zip(g) {
                        *acc += weight * f64::from(v);
                    }
                }
                offset += n;
            }
            let k = chunk.len() as f64;
            sums = (
                sums.0 + values.0 * k,
                sums.1 + values.1 * k,
                sums.2 + values.2 * k,
            );
        }
        let bn_batches = self.net.take_deferred_bn()?;
        drop(defer);
        Ok(ShardGradient {
            sum,
            samples: cases.len(),
            sums,
            compute_ms: started.elapsed().as_secs_f64() * 1e3,
            bn_batches,
        })
    }

    /// Values in one micro-batch's BatchNorm statistics.
    pub fn bn_batch_len(&self) -> usize {
        self.net.bn_batch_len()
    }

    /// Applies optimizer step `step` exactly once: the all-reduced mean gradient `flat` with
    /// Adam at `lr`, then the BatchNorm running-statistic updates of the global batch's
    /// micro-batches (`bn_batches`, in the global order). A replica that already holds `step`
    /// applies nothing ([`Committed::AlreadyHeld`]); one that is not at `step - 1` refuses.
    pub fn commit(
        &mut self,
        step: u64,
        flat: &[f32],
        lr: f64,
        bn_batches: &[Vec<f32>],
    ) -> Result<Committed> {
        let apply = commit_check(self.step_count(), step)
            .map_err(|reason| Error::invalid("commit", reason))?;
        if !apply {
            return Ok(Committed::AlreadyHeld);
        }
        let len = self.bn_batch_len();
        if let Some(bad) = bn_batches.iter().position(|b| b.len() != len) {
            return Err(Error::ShapeMismatch {
                op: "batch-norm statistics",
                expected: format!("{len} values per micro-batch"),
                got: format!("{} in micro-batch {bad}", bn_batches[bad].len()),
            });
        }
        self.apply_gradient(flat, lr)?;
        for b in bn_batches {
            self.net.apply_bn_batch(b)?;
        }
        Ok(Committed::Applied)
    }

    /// One Adam step at `lr` with a flattened gradient (the all-reduced mean).
    pub fn apply_gradient(&mut self, flat: &[f32], lr: f64) -> Result<()> {
        if flat.len() != self.num_params() {
            return Err(Error::ShapeMismatch {
                op: "apply gradient",
                expected: format!("{} values", self.num_params()),
                got: flat.len().to_string(),
            });
        }
        let device = self.net.device().clone();
        let mut named = HashMap::with_capacity(self.layout.len());
        let mut offset = 0;
        for (name, shape, n) in &self.layout {
            let t = Tensor::from_slice(&flat[offset..offset + n], shape.as_slice(), &device)?;
            named.insert(name.clone(), t);
            offset += n;
        }
        self.adam.set_lr(lr);
        self.adam.step_named(&named)
    }

    /// Registers validation cases (indices into the validation list) in eval mode.
    pub fn validate(&self, cases: &[usize]) -> Result<Vec<(usize, CaseMetrics)>> {
        let mut out = Vec::with_capacity(cases.len());
        for &i in cases {
            let case = self.val.get(i).ok_or_else(|| {
                Error::invalid(
                    "cases",
                    format!(
                        "validation case index {i} out of range ({} cases)",
                        self.val.len()
                    ),
                )
            })?;
            let input = Tensor::cat(&[&case.moving, &case.fixed], 1)?;
            let ddf = self.net.forward_t(&input, false)?.detach();
            let metrics = evaluate_case(
                &CaseTensors {
                    fixed: &case.fixed,
                    moving: &case.moving,
                    ddf: &ddf,
                    fixed_mask: case.fixed_mask.as_ref(),
                    moving_mask: case.moving_mask.as_ref(),
                },
                None,
            )?;
            out.push((i, metrics));
        }
        Ok(out)
    }

    /// sha256 of the parameters (f32 little-endian, in parameter order), hex.
    pub fn params_sha256(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        for (_, var) in self.net.parameters() {
            let v = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for x in v {
                hasher.update(x.to_le_bytes());
            }
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// sha256 of everything that must be equal on every replica of a job: the step held,
    /// every variable of the network (parameters and BatchNorm running statistics, in
    /// state_dict order), the BatchNorm batch counters and Adam's moments (by name), hex.
    pub fn state_sha256(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(self.step_count().to_le_bytes());
        let mut feed = |name: &str, t: &Tensor| -> Result<()> {
            hasher.update(name.as_bytes());
            for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                hasher.update(x.to_le_bytes());
            }
            Ok(())
        };
        for v in self.net.named_vars() {
            feed(&v.name, v.var.as_tensor())?;
        }
        let (moments, _) = self.adam.state_tensors();
        let mut names: Vec<&String> = moments.keys().collect();
        names.sort();
        for name in names {
            feed(name, &moments[name])?;
        }
        for n in self.net.batch_norms() {
            hasher.update(n.num_batches_tracked().to_le_bytes());
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// The BatchNorm running statistics, concatenated in state_dict order.
    pub fn bn_stats(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for v in self.net.named_vars() {
            if v.kind == TensorKind::Buffer {
                out.extend(
                    v.var
                        .as_tensor()
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                );
            }
        }
        Ok(out)
    }

    /// Loads running statistics produced by [`Replica::bn_stats`] (e.g. averaged across
    /// replicas).
    pub fn set_bn_stats(&self, values: &[f32]) -> Result<()> {
        let buffers: Vec<_> = self
            .net
            .named_vars()
            .into_iter()
            .filter(|v| v.kind == TensorKind::Buffer)
            .collect();
        let expected: usize = buffers.iter().map(|v| v.var.elem_count()).sum();
        if values.len() != expected {
            return Err(Error::ShapeMismatch {
                op: "batch-norm statistics",
                expected: format!("{expected} values"),
                got: values.len().to_string(),
            });
        }
        let mut offset = 0;
        for v in buffers {
            let n = v.var.elem_count();
            let t = Tensor::from_slice(&values[offset..offset + n], v.var.dims(), v.var.device())?
                .to_dtype(v.var.dtype())?;
            v.var.set(&t)?;
            offset += n;
        }
        Ok(())
    }

    /// The weights (MONAI state_dict) as safetensors bytes.
    pub fn weights_bytes(&self) -> Result<Vec<u8>> {
        serialize(&self.net.state_dict()?)
    }

    /// Adam's moments as safetensors bytes (`exp_avg.<name>`, `exp_avg_sq.<name>`).
    pub fn optimizer_bytes(&self) -> Result<Vec<u8>> {
        let (tensors, _) = self.adam.state_tensors();
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        serialize(&tensors)
    }

    /// Restores weights and optimizer state (as sent by another replica or read from a
    /// checkpoint) after `step` optimizer steps.
    pub fn load_state(&mut self, weights: &[u8], optimizer: &[u8], step: u64) -> Result<()> {
        let device = self.net.device().clone();
        let w = candle_core::safetensors::load_buffer(weights, &device)?;
        self.net.load_tensors(&w, Path::new("<replica weights>"))?;
        let o = candle_core::safetensors::load_buffer(optimizer, &device)?;
        self.adam
            .load_state_tensors(&o, step, Path::new("<replica optimizer state>"))
    }
}

/// Named tensors as safetensors bytes (sorted by name, so equal states give equal bytes).
pub fn serialize(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize(sorted, None)
        .map_err(|e| Error::invalid("safetensors", format!("cannot serialise: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Learn2RegDataset;
    use crate::localnet::Preset;
    use crate::synth::SynthConfig;

    fn replica_pair() -> (tempfile::TempDir, TrainConfig, Vec<CaseFiles>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SynthConfig::default()
            .with_cases(3)
            .with_size([16, 16, 16])
            .with_seed(5);
        crate::synth::generate(&config, dir.path(), |_, _| {}).expect("synth");
        let cases = Learn2RegDataset::open(dir.path())
            .expect("dataset")
            .split(0.0)
            .expect("split")
            .0;
        let train = TrainConfig {
            preset: Preset::Seed,
            num_channel_initial: 4,
            size: [16, 16, 16],
            lr: 1e-3,
            ..TrainConfig::default()
        };
        (dir, train, cases)
    }

    fn params(r: &Replica) -> Vec<f32> {
        r.net()
            .parameters()
            .iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("params")
            })
            .collect()
    }

    /// Two replicas with one case each, their gradients averaged, take the same steps as
    /// one replica with both cases in micro-batches of one.
    #[test]
    fn averaged_replicas_match_one_replica_with_micro_batches() {
        let (_dir, config, cases) = replica_pair();
        let dev = Device::Cpu;
        let mut one = Replica::new(&config, &cases, &[], &dev).expect("replica");
        let mut a = Replica::new(&config, &cases, &[], &dev).expect("replica");
        let mut b = Replica::new(&config, &cases, &[], &dev).expect("replica");
        assert_eq!(one.params_sha256().unwrap(), a.params_sha256().unwrap());
        for batch in [[0usize, 1], [2, 0], [1, 2]] {
            let g = one.compute_gradient(&batch, 1).expect("grad");
            assert_eq!(g.samples, 2);
            one.apply_gradient(&g.mean(), 1e-3).expect("apply");
            let ga = a.compute_gradient(&batch[..1], 0).expect("grad");
            let gb = b.compute_gradient(&batch[1..], 0).expect("grad");
            let total: Vec<f64> = ga.sum.iter().zip(&gb.sum).map(|(x, y)| x + y).collect();
            let mean = mean_of(&total, 2);
            // Summed in f64, the partition does not change a bit.
            assert_eq!(g.mean(), mean);
            a.apply_gradient(&mean, 1e-3).expect("apply");
            b.apply_gradient(&mean, 1e-3).expect("apply");
        }
        assert_eq!(a.params_sha256().unwrap(), b.params_sha256().unwrap());
        // Bit for bit: the gradient sums are partition-independent.
        assert_eq!(one.state_sha256().unwrap(), a.state_sha256().unwrap());
        assert_ne!(
            params(&one),
            params(&Replica::new(&config, &cases, &[], &dev).unwrap())
        );
    }

    /// Issue 17 item 3: BatchNorm statistics used to be updated by every forward (aborted
    /// steps included) and averaged over replicas at the epoch's end (so they depended on the
    /// partition). Now computing changes nothing, and the commit applies every micro-batch's
    /// statistics in the global order, identically on every replica.
    #[test]
    fn batch_norm_statistics_follow_the_global_batch_whatever_the_partition() {
        let (_dir, config, cases) = replica_pair();
        let dev = Device::Cpu;
        let mut one = Replica::new(&config, &cases, &[], &dev).expect("replica");
        let mut a = Replica::new(&config, &cases, &[], &dev).expect("replica");
        let mut b = Replica::new(&config, &cases, &[], &dev).expect("replica");
        let before = a.state_sha256().unwrap();
        let stats_before = a.bn_stats().unwrap();
        // An aborted step: computed, never committed. Nothing changed.
        let aborted = a.compute_gradient(&[2, 1], 1).expect("grad");
        assert_eq!(aborted.bn_batches.len(), 2);
        assert!(aborted
            .bn_batches
            .iter()
            .all(|s| s.len() == a.bn_batch_len()));
        assert_eq!(a.state_sha256().unwrap(), before);
        assert_eq!(a.bn_stats().unwrap(), stats_before);
        for (step, batch) in [[0usize, 1], [2, 0]].into_iter().enumerate() {
            let step = step as u64 + 1;
            let g = one.compute_gradient(&batch, 1).expect("grad");
            assert_eq!(
                one.commit(step, &g.mean(), 1e-3, &g.bn_batches).unwrap(),
                Committed::Applied
            );
            let ga = a.compute_gradient(&batch[..1], 0).expect("grad");
            let gb = b.compute_gradient(&batch[1..], 0).expect("grad");
            let total: Vec<f64> = ga.sum.iter().zip(&gb.sum).map(|(x, y)| x + y).collect();
            let mean = mean_of(&total, 2);
            let global: Vec<Vec<f32>> = ga
                .bn_batches
                .iter()
                .chain(&gb.bn_batches)
                .cloned()
                .collect();
            for r in [&mut a, &mut b] {
                assert_eq!(
                    r.commit(step, &mean, 1e-3, &global).unwrap(),
                    Committed::Applied
                );
            }
        }
        // Identical replicas, BN buffers, counters and Adam moments included.
        assert_eq!(a.state_sha256().unwrap(), b.state_sha256().unwrap());
        assert_ne!(a.state_sha256().unwrap(), before);
        // The same state, bit for bit, as one replica that saw the whole batch.
        assert_eq!(one.state_sha256().unwrap(), a.state_sha256().unwrap());
        assert_ne!(a.bn_stats().unwrap(), stats_before);
        let tracked = |r: &Replica| -> Vec<i64> {
            r.net()
                .batch_norms()
                .iter()
                .map(|n| n.num_batches_tracked())
                .collect()
        };
        assert_eq!(tracked(&one), tracked(&a));
        assert!(tracked(&a).iter().all(|&n| n == 4), "{:?}", tracked(&a));
        // A commit that arrives twice is applied once; a gap is refused.
        let sha = a.state_sha256().unwrap();
        assert_eq!(
            a.commit(2, &vec![1.0; a.num_params()], 1e-3, &[]).unwrap(),
            Committed::AlreadyHeld
        );
        assert_eq!(a.state_sha256().unwrap(), sha);
        let e = a
            .commit(4, &vec![1.0; a.num_params()], 1e-3, &[])
            .unwrap_err();
        assert!(e.to_string().contains("step 4 cannot follow step 2"), "{e}");
        assert!(a
            .commit(3, &vec![0.0; a.num_params()], 1e-3, &[vec![0.0]])
            .is_err());
        assert_eq!(a.state_sha256().unwrap(), sha);
    }

    #[test]
    fn state_round_trips_between_replicas() {
        let (_dir, config, cases) = replica_pair();
        let dev = Device::Cpu;
        let mut a = Replica::new(&config, &cases, &cases[..1], &dev).expect("replica");
        let g = a.compute_gradient(&[0, 1], 0).expect("grad");
        a.apply_gradient(&g.mean(), 1e-3).expect("apply");
        let stats: Vec<f32> = a.bn_stats().unwrap().iter().map(|v| v + 0.5).collect();
        a.set_bn_stats(&stats).unwrap();
        let mut b = Replica::new(&config, &cases, &[], &dev).expect("replica");
        assert_ne!(a.params_sha256().unwrap(), b.params_sha256().unwrap());
        b.load_state(
            &a.weights_bytes().unwrap(),
            &a.optimizer_bytes().unwrap(),
            1,
        )
        .expect("load");
        assert_eq!(a.params_sha256().unwrap(), b.params_sha256().unwrap());
        assert_eq!(a.bn_stats().unwrap(), b.bn_stats().unwrap());
        // The same next step on both: Adam's moments came along.
        let g = a.compute_gradient(&[2], 0).unwrap();
        a.apply_gradient(&g.mean(), 1e-3).unwrap();
        b.apply_gradient(&g.mean(), 1e-3).unwrap();
        assert_eq!(a.params_sha256().unwrap(), b.params_sha256().unwrap());
        assert!(a.set_bn_stats(&[1.0]).is_err());
        assert!(a.apply_gradient(&[0.0; 3], 1e-3).is_err());
        assert!(a.compute_gradient(&[9], 0).is_err());
        let v = a.validate(&[0]).unwrap();
        assert!(v[0].1.mi_loss.is_finite());
    }
}
