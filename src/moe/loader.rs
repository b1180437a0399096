//! A loader for runtimes: open a routed checkpoint lazily and route by σ.
//!
//! ```no_run
//! use phasekit::moe::MoeCheckpoint;
//! let m = MoeCheckpoint::open(std::path::Path::new("student.safetensors"))?;
//! let e = m.expert_for_sigma(0.9).expect("σ in [0, 1]");
//! let (shape, w) = m.weight_f32(e, "blocks.0.self_attn.q.weight", true)?;
//! # Ok::<(), phasekit::Error>(())
//! ```
//! Nothing is read until a tensor is asked for; bytes come straight from the memory map.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::format::{LoraPart, MoeMeta};
use super::routing::{ExpertKind, Routing};
use crate::cast;
use crate::dtype::DType;
use crate::error::{clean, Error, Kind, Result};
pub use crate::lora::delta::{apply_lora_delta, Lora};
use crate::store::{Checkpoint, Encoding, TensorEntry};

/// A tensor as stored: dtype, shape and bytes borrowed from the map.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub bytes: &'a [u8],
}

/// An opened `phasekit.moe/1` checkpoint (one file or a sharded set).
pub struct MoeCheckpoint {
    ck: Checkpoint,
    meta: MoeMeta,
    by_name: HashMap<String, usize>,
}

impl MoeCheckpoint {
    /// Map the file(s), validate the safetensors structure and parse the MoE metadata. Tensor
    /// hashes are not recomputed here (`phasekit verify` does that).
    pub fn open(path: &Path) -> Result<MoeCheckpoint> {
        let ck = Checkpoint::open(path)?;
        let meta = MoeMeta::from_metadata(&ck.metadata).map_err(|e| e.with_path(path))?;
        let by_name = ck.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(MoeCheckpoint { ck, meta, by_name })
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }
    pub fn meta(&self) -> &MoeMeta {
        &self.meta
    }
    pub fn routing(&self) -> &Routing {
        &self.meta.routing
    }
    pub fn num_experts(&self) -> usize {
        self.meta.routing.experts.len()
    }
    pub fn expert_for_sigma(&self, sigma: f64) -> Option<usize> {
        self.meta.routing.expert_for_sigma(sigma)
    }
    pub fn kind(&self, expert: usize) -> ExpertKind {
        self.meta.routing.experts[expert].kind
    }

    /// The base LoRA expert `i` applies to: 0 (`base.`) or `j` (`bases.<j>.`).
    pub fn expert_base(&self, i: usize) -> usize {
        self.meta.routing.experts[i].base.unwrap_or(0)
    }

    /// The parameters of the base LoRA expert `i` applies to: param → stored name.
    pub fn base_params(&self, i: usize) -> BTreeMap<String, String> {
        self.meta.expert_base_tensors(i)
    }

    /// Expert `i`'s stored parameters (LoRA parts for LoRA experts): param → stored name.
    pub fn expert_params(&self, i: usize) -> BTreeMap<String, String> {
        self.meta.expert_tensors(i)
    }

    /// A stored tensor by its stored name.
    pub fn raw(&self, stored: &str) -> Result<RawTensor<'_>> {
        let &i = self
            .by_name
            .get(stored)
            .ok_or_else(|| Error::inconsistent(&self.ck.path, format!("tensor '{}' is not in the file", clean(stored))))?;
        Ok(self.view(&self.ck.tensors[i]))
    }

    fn view<'a>(&'a self, t: &'a TensorEntry) -> RawTensor<'a> {
        let dtype = match t.encoding {
            Encoding::Dense(d) => d,
            Encoding::Ggml(_) => DType::U8,
        };
        RawTensor { name: &t.name, dtype, shape: &t.shape, bytes: self.ck.bytes(t) }
    }

    /// Expert `i`'s tensor `param` as stored (for a LoRA expert: `X.lora_down.weight` etc.).
    pub fn expert_tensor(&self, i: usize, param: &str) -> Result<RawTensor<'_>> {
        let params = self.expert_params(i);
        let stored =
            params.get(param).ok_or_else(|| Error::inconsistent(&self.ck.path, format!("expert {i} has no tensor '{}'", clean(param))))?;
        self.raw(stored)
    }

    /// The names of expert `i`'s full weights (a LoRA expert's are the base's).
    pub fn weight_names(&self, i: usize) -> Vec<String> {
        match self.kind(i) {
            ExpertKind::Full => self.expert_params(i).into_keys().collect(),
            ExpertKind::Lora => self.meta.expert_base_tensors(i).into_keys().collect(),
        }
    }

    /// Expert `i`'s weight `param` as f32. For a LoRA expert, `apply_lora` adds
    /// (alpha/rank)·up·down to the weight of its own base; without it that base weight is returned.
    pub fn weight_f32(&self, i: usize, param: &str, apply_lora: bool) -> Result<(Vec<u64>, Vec<f32>)> {
        match self.kind(i) {
            ExpertKind::Full => {
                let t = self.expert_tensor(i, param)?;
                Ok((t.shape.to_vec(), decode(&t)?))
            }
            ExpertKind::Lora => {
                let base = self.meta.expert_base_tensors(i);
                let stored =
                    base.get(param).ok_or_else(|| Error::inconsistent(&self.ck.path, format!("base has no tensor '{}'", clean(param))))?;
                let t = self.raw(stored)?;
                let mut w = decode(&t)?;
                if apply_lora {
                    if let Some(lora) = self.lora_of(i, param)? {
                        apply_lora_delta(&mut w, t.shape, &lora)?;
                    }
                }
                Ok((t.shape.to_vec(), w))
            }
        }
    }

    /// The LoRA (down, up, scale) expert `i` applies to weight `param`, if any.
    pub fn lora_of(&self, i: usize, param: &str) -> Result<Option<Lora>> {
        let Some(p) = param.strip_suffix(".weight") else { return Ok(None) };
        let params = self.expert_params(i);
        let get = |part: LoraPart| params.get(&format!("{p}{}", part.suffix()));
        let (Some(d), Some(u)) = (get(LoraPart::Down), get(LoraPart::Up)) else { return Ok(None) };
        let (d, u) = (self.raw(d)?, self.raw(u)?);
        let alpha = match get(LoraPart::Alpha) {
            Some(a) => {
                let t = self.raw(a)?;
                let v = crate::lora::keys::alpha_value(t.dtype, t.bytes).ok_or_else(|| {
                    Error::malformed(&self.ck.path, format!("LoRA alpha '{}' is not one integer or float value", clean(a)))
                })?;
                Some(v as f32)
            }
            None => None,
        };
        Ok(Some(Lora::new(decode(&d)?, d.shape, decode(&u)?, u.shape, alpha)?))
    }
}

/// Decode a float tensor to f32.
pub fn decode(t: &RawTensor) -> Result<Vec<f32>> {
    if !t.dtype.is_castable_float() {
        return Err(Error::new(Kind::Unsupported, format!("tensor '{}' of {} is not a float tensor", clean(t.name), t.dtype)));
    }
    let n = crate::dtype::numel(t.shape).unwrap_or(0) as usize;
    let mut out = vec![0f32; n];
    cast::decode_f32(t.dtype, t.bytes, &mut out, 1.0)?;
    Ok(out)
}
