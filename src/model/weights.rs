//! Weights for a teacher from any checkpoint [`crate::store::Checkpoint`] reads, in any layout,
//! under canonical diffusers names. Tensors stay in the memory map until a module asks for one;
//! each is then decoded (dense dtypes with their fp8 scale, or GGUF blocks dequantized) to f32
//! and converted to the requested candle dtype, one tensor at a time.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{clean, Error, Kind, Result};
use crate::layout::{Layout, Registry};
use crate::store::{Checkpoint, Encoding, SCALE_SUFFIXES};

/// An opened checkpoint with its family, layout and diffusers-dialect config.
pub struct Weights {
    pub ck: Checkpoint,
    /// `wan22` or `qwen_image`.
    pub family: String,
    pub variant: String,
    pub layout: Layout,
    /// The config in diffusers' dialect (from config.json in either dialect, or from shapes).
    pub config: Value,
    /// config.json as found (for fields no dialect maps), when there is one.
    pub raw_config: Option<Value>,
    pub dtype: DType,
    pub device: Device,
    /// Diffusers name → index into `ck.tensors`.
    index: HashMap<String, usize>,
    /// Weight index → index of its per-tensor fp8 scale.
    scales: HashMap<usize, usize>,
    /// Prefix of the parameter names (`model.diffusion_model.`, ...).
    prefix: String,
}

impl Weights {
    /// Open `path` (file or folder) and map its tensor names to diffusers names.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Weights> {
        let ck = Checkpoint::open(path)?;
        let raw_config = ck.config.as_ref().map(|c| c.json.clone());
        let entries = ck.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let mut w = Weights::from_entries(ck, entries, raw_config, dtype, device)?;
        // The release twin the files name (Wan2.1 T2V-14B / Wan2.2 T2V-A14B expert).
        if let Some(v) = crate::pitfalls::named_variant(&w.ck, &w.family, &w.variant) {
            w.variant = v;
        }
        Ok(w)
    }

    /// Some tensors of `ck` as one model: `entries` are (name in the model's own layout, index
    /// into `ck.tensors`), e.g. one expert of a routed MoE file (`experts.3.` stripped).
    pub fn from_entries(
        ck: Checkpoint,
        entries: Vec<(String, usize)>,
        raw_config: Option<Value>,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights> {
        let reg = Registry::builtin();
        let shapes: Vec<(&str, &[u64])> = entries.iter().map(|(n, i)| (n.as_str(), ck.tensors[*i].shape.as_slice())).collect();
        let det = reg.detect(&shapes, raw_config.as_ref()).map_err(|e| e.with_path(&ck.path))?;
        let fam = reg.require(&det.family)?;
        let config = fam.translate_config(det.layout, Layout::Diffusers, &det.config).map_err(|e| e.with_path(&ck.path))?;
        let mut index = HashMap::new();
        let by_name: HashMap<&str, usize> = entries.iter().map(|(n, i)| (n.as_str(), *i)).collect();
        let mut scales = HashMap::new();
        for (name, i) in &entries {
            let (name, i) = (name.as_str(), *i);
            let t = &ck.tensors[i];
            if let Some(base) = SCALE_SUFFIXES.iter().find_map(|s| name.strip_suffix(s)) {
                if let Some(&w) = by_name.get(format!("{base}.weight").as_str()) {
                    if t.numel() != 1 {
                        return Err(Error::at(
                            Kind::Unsupported,
                            &ck.path,
                            format!("fp8 scale `{}` has {} elements; only per-tensor scales are supported", clean(name), t.numel()),
                        ));
                    }
                    scales.insert(w, i);
                }
                continue;
            }
            if crate::store::is_scale_companion(name) {
                continue;
            }
            let Some(stripped) = name.strip_prefix(det.prefix.as_str()) else { continue };
            if let Ok(canon) = fam.rename(det.layout, Layout::Diffusers, stripped) {
                index.insert(canon, i);
            }
        }
        Ok(Weights {
            family: det.family.clone(),
            variant: det.variant.clone(),
            layout: det.layout,
            config,
            raw_config,
            dtype,
            device: device.clone(),
            index,
            scales,
            prefix: det.prefix.clone(),
            ck,
        })
    }

    /// A parameter name of this checkpoint's layout (`blocks.0.self_attn.q.weight`) under its
    /// diffusers name (`blocks.0.attn1.to_q.weight`); `None` when the layout has no such name.
    pub fn diffusers_name(&self, name: &str) -> Option<String> {
        let fam = Registry::builtin().require(&self.family).ok()?;
        fam.rename(self.layout, Layout::Diffusers, name.strip_prefix(self.prefix.as_str())?).ok()
    }

    pub fn path(&self) -> &Path {
        &self.ck.path
    }

    /// Every tensor of the model: its diffusers name and stored shape (headers only).
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[u64])> {
        self.index.iter().map(|(n, &i)| (n.as_str(), self.ck.tensors[i].shape.as_slice()))
    }

    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// A config value in diffusers' dialect.
    pub fn cfg(&self, key: &str) -> Option<&Value> {
        self.config.get(key).filter(|v| !v.is_null()).or_else(|| self.raw_config.as_ref()?.get(key).filter(|v| !v.is_null()))
    }

    /// An integer config value, or a clear error naming it.
    pub fn cfg_usize(&self, key: &str) -> Result<usize> {
        self.cfg(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| Error::at(Kind::Malformed, self.path(), format!("the {} config has no integer `{key}`", self.family)))
    }

    /// Tensor `name` (diffusers name) with `shape`, in the compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// Tensor `name` with `shape` in f32 whatever the compute dtype (modulation tables, norms
    /// diffusers keeps in f32).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, super::ops::wide(self.dtype))
    }

    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::at(
                Kind::Inconsistent,
                self.path(),
                format!("the checkpoint has no tensor `{name}` (diffusers name), which the model needs"),
            )
        })?;
        let e = &self.ck.tensors[i];
        let have: Vec<usize> = e.shape.iter().map(|&d| d as usize).collect();
        let numel: usize = shape.iter().product();
        // GGUF files may store a tensor flattened or reshaped (ComfyUI-GGUF `orig_shape`).
        let reshaped_ok = matches!(self.ck.format, crate::store::Format::Gguf) && have.iter().product::<usize>() == numel;
        if have != shape && !reshaped_ok {
            return Err(Error::at(
                Kind::Inconsistent,
                self.path(),
                format!("tensor `{}` has shape {have:?}, the model needs {shape:?}", clean(&e.name)),
            ));
        }
        let scale = match self.scales.get(&i) {
            Some(&s) => {
                let st = &self.ck.tensors[s];
                let d = st.encoding.dense().ok_or_else(|| Error::at(Kind::Unsupported, self.path(), "quantized fp8 scale"))?;
                let mut v = [0f32];
                crate::cast::decode_f32(d, self.ck.bytes(st), &mut v, 1.0).map_err(|er| er.context(clean(&st.name)))?;
                v[0]
            }
            None => 1.0,
        };
        let bytes = self.ck.bytes(e);
        // Stored as wanted: one copy from the map into the tensor (on a GPU, straight to the
        // device), no f32 detour.
        if let (Encoding::Dense(d), 1.0) = (e.encoding, scale) {
            if candle_dtype(d) == Some(dtype) && bytes.len() == numel * dtype.size_in_bytes() {
                let t = Tensor::from_raw_buffer(bytes, dtype, shape, &self.device).map_err(Error::from);
                self.ck.release(e);
                return t;
            }
        }
        let mut vals = vec![0f32; numel];
        match e.encoding {
            Encoding::Dense(d) => crate::cast::decode_f32(d, bytes, &mut vals, scale),
            Encoding::Ggml(g) => crate::quant::dequantize(g, bytes, &mut vals).map(|()| {
                if scale != 1.0 {
                    vals.iter_mut().for_each(|v| *v *= scale);
                }
            }),
        }
        .map_err(|er| er.with_path(self.path()).context(format!("tensor `{}`", clean(&e.name))))?;
        self.ck.release(e);
        Tensor::from_vec(vals, shape, &self.device).and_then(|t| t.to_dtype(dtype)).map_err(Error::from)
    }
}

/// The candle dtype of a stored float dtype, where candle has one.
fn candle_dtype(d: crate::DType) -> Option<DType> {
    match d {
        crate::DType::F32 => Some(DType::F32),
        crate::DType::F16 => Some(DType::F16),
        crate::DType::BF16 => Some(DType::BF16),
        crate::DType::F64 => Some(DType::F64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(p: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
    }

    #[test]
    fn original_and_diffusers_give_the_same_tensors() {
        let a = Weights::open(&fixture("wan22_t2v_tiny/diffusers"), DType::F32, &Device::Cpu).unwrap();
        let b = Weights::open(&fixture("wan22_t2v_tiny/original"), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(a.layout, Layout::Diffusers);
        assert_eq!(b.layout, Layout::Original);
        assert_eq!(a.index.len(), b.index.len());
        for name in a.index.keys() {
            let (ta, tb) = (&a.ck.tensors[a.index[name]], &b.ck.tensors[b.index[name]]);
            assert_eq!(ta.shape, tb.shape, "{name}");
            assert_eq!(a.ck.bytes(ta), b.ck.bytes(tb), "{name}");
        }
        assert_eq!(b.cfg_usize("num_attention_heads").unwrap(), 2);
        assert_eq!(b.cfg_usize("attention_head_dim").unwrap(), 16);
    }

    #[test]
    fn wrong_shape_names_tensor_and_file() {
        let a = Weights::open(&fixture("wan22_t2v_tiny/diffusers"), DType::F32, &Device::Cpu).unwrap();
        let e = a.get("proj_out.weight", &[3, 3]).unwrap_err();
        assert_eq!(e.kind(), Kind::Inconsistent);
        assert!(e.to_string().contains("proj_out.weight"), "{e}");
        assert!(e.path().is_some());
        let e = a.get("nope.weight", &[3]).unwrap_err();
        assert!(e.to_string().contains("nope.weight"));
    }
}
