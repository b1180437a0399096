//! A linear layer with an optional LoRA adapter: `y = x·Wᵀ + b (+ (α/r)·x·downᵀ·upᵀ)`.

use candle_core::{DType, Result, Tensor, Var};

use super::lora::LoraAdapter;
use super::weights::Weights;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// Compute without recording gradients: weight, bias and adapter are detached at each
    /// forward (a frozen view that still sees in-place updates of the variables it shares).
    pub frozen: bool,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias, lora: None, frozen: false }
    }

    /// `<name>.weight [out, in]` and `<name>.bias [out]` from a checkpoint.
    pub fn load(w: &Weights, name: &str, in_dim: usize, out_dim: usize) -> crate::Result<Linear> {
        Ok(Linear::new(w.get(&format!("{name}.weight"), &[out_dim, in_dim])?, Some(w.get(&format!("{name}.bias"), &[out_dim])?)))
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// `x [..., in]` → `[..., out]` in the wider of the two dtypes.
    ///
    /// A weight that does not train (a base weight, or any weight of a frozen view) is multiplied
    /// as it is stored, through [`crate::ops::linear::frozen_matmul`]: no f32 copy of a 16-bit
    /// weight is made (on the CPU it is widened a block of rows at a time; on CUDA the product
    /// runs in bf16 with f32 accumulation), and the backward pass computes the input's gradient
    /// only. A trainable weight (a full-parameter fake, f32) goes through candle's matmul.
    ///
    /// With a frozen base weight (and bias) the layer is one graph node ([`crate::ops::graft`]):
    /// its value is computed without a graph and its backward pass is written out below, so the
    /// graph keeps the input and the output only, not the product, the biased product and the
    /// adapter's intermediates (four more tensors of the output's size).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else { candle_core::bail!("linear layer input is a scalar") };
        let rows: usize = lead.iter().product();
        let dt = wider(x.dtype(), self.weight.dtype());
        let x2 = x.to_dtype(dt)?.reshape((rows, last))?;
        let mut out = lead.to_vec();
        out.push(self.out_dim());
        let trains = !self.frozen && (self.weight.is_variable() || self.bias.as_ref().is_some_and(|b| b.is_variable()));
        if trains {
            // y = (W·xᵀ)ᵀ: W stays the contiguous left operand, so its gradient comes out of one
            // matmul as a contiguous [out, in] tensor (x·Wᵀ would produce it through a transpose).
            let mut y = self.weight.to_dtype(dt)?.matmul(&x2.t()?)?.t()?;
            if let Some(b) = &self.bias {
                y = y.broadcast_add(&b.to_dtype(dt)?)?;
            }
            if let Some(l) = &self.lora {
                y = (y + l.delta(&x2.to_dtype(l.down.dtype())?)?.to_dtype(dt)?)?;
            }
            return y.reshape(out);
        }
        let lora = self.lora.as_ref().map(|l| (l.down.as_tensor().detach(), l.up.as_tensor().detach(), l.scale()));
        let (w, bias) = (self.weight.detach(), self.bias.as_ref().map(|b| b.detach()));
        let value = frozen_value(&x2.detach(), &w, bias.as_ref(), lora.as_ref(), dt)?;
        let mut inputs = vec![x2];
        if let Some(l) = &self.lora {
            // A frozen view's adapter still adds to the input's gradient; its factors are passed
            // detached, so they get none.
            let f = |t: &Tensor| if self.frozen { t.detach() } else { t.clone() };
            inputs.extend([f(l.down.as_tensor()), f(l.up.as_tensor())]);
        }
        let scale = lora.as_ref().map(|l| l.2).unwrap_or(0.0);
        let bwd: crate::ops::graft::Backward = std::sync::Arc::new(move |i: &[Tensor], g: &Tensor| frozen_backward(&w, scale, i, g));
        crate::ops::graft::graft(value, &inputs, "linear", bwd)?.reshape(out)
    }

    /// Fold the adapter into the weight (`W += (α/r)·up·down`) and drop it.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let d = l.dense()?.to_dtype(self.weight.dtype())?;
            self.weight = (self.weight.detach() + d)?;
        }
        Ok(())
    }

    /// Make weight and bias trainable variables; returns them.
    pub fn make_trainable(&mut self) -> Result<Vec<Var>> {
        let mut vars = Vec::new();
        let w = Var::from_tensor(&self.weight.detach())?;
        self.weight = w.as_tensor().clone();
        vars.push(w);
        if let Some(b) = &self.bias {
            let v = Var::from_tensor(&b.detach())?;
            self.bias = Some(v.as_tensor().clone());
            vars.push(v);
        }
        Ok(vars)
    }
}

/// Bytes of f32 scratch one chunk of rows of a grafted layer may use per operand (256 MiB, or
/// `PHASEKIT_CHUNK_MIB`): its value and its gradients are computed [`chunk_rows`] rows at a
/// time, so that the f32 copies a 16-bit activation needs (and candle's transient products) stay
/// bounded whatever the token count.
fn chunk_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| std::env::var("PHASEKIT_CHUNK_MIB").ok().and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(256).max(1) << 20)
}

/// Rows per chunk for a layer `in → out`.
fn chunk_rows(inp: usize, out: usize) -> usize {
    #[cfg(test)]
    if let Some(r) = tests::CHUNK.get() {
        return r;
    }
    (chunk_bytes() / (4 * inp.max(out).max(1))).max(64)
}

/// `f(a, r)` for row chunks `[a, a + r)` of `n` rows, written into one `[n, cols]` tensor
/// (one call and no copy when `n` fits one chunk).
fn by_chunks(
    n: usize,
    chunk: usize,
    cols: usize,
    dt: DType,
    dev: &candle_core::Device,
    f: impl Fn(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    if n <= chunk {
        return f(0, n);
    }
    let out = Tensor::zeros((n, cols), dt, dev)?;
    for a in (0..n).step_by(chunk) {
        let r = chunk.min(n - a);
        out.slice_set(&f(a, r)?.to_dtype(dt)?.contiguous()?, 0, a)?;
    }
    Ok(out)
}

/// `x·Wᵀ + b (+ s·(x·downᵀ)·upᵀ)` for a frozen `W` and bias, on detached tensors (`x [n, in]`
/// in `dt`; the adapter's product in the adapter's dtype), [`chunk_rows`] rows at a time.
fn frozen_value(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, lora: Option<&(Tensor, Tensor, f64)>, dt: DType) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let out = w.dim(0)?;
    by_chunks(n, chunk_rows(inp, out), out, dt, x.device(), |a, r| {
        let x = x.narrow(0, a, r)?;
        let mut y = crate::ops::linear::frozen_matmul(w, &x.t()?)?.t()?;
        if let Some(b) = bias {
            y = y.broadcast_add(&b.to_dtype(dt)?)?;
        }
        if let Some((down, up, scale)) = lora {
            let h = x.to_dtype(down.dtype())?.matmul(&down.t()?)?;
            let d = (h.matmul(&up.t()?)? * *scale)?;
            y = (y + d.to_dtype(dt)?)?;
        }
        Ok(y)
    })
}

/// The backward pass of [`frozen_value`]: inputs `[x]` or `[x, down, up]`, `g = ∂y [n, out]`.
/// `∂x = g·W + s·(g·up)·down`, `∂down = s·(g·up)ᵀ·x`, `∂up = s·gᵀ·(x·downᵀ)`, [`chunk_rows`]
/// rows at a time (the adapter's gradients summed over the chunks).
fn frozen_backward(w: &Tensor, scale: f64, inputs: &[Tensor], g: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let x = inputs[0].detach();
    let dt = x.dtype();
    let (n, inp) = x.dims2()?;
    let out = w.dim(0)?;
    let lora = (inputs.len() == 3).then(|| (inputs[1].detach(), inputs[2].detach()));
    // The adapter's own gradients only where its factors train (not in a frozen view).
    let factors = inputs.len() == 3 && (inputs[1].track_op() || inputs[2].track_op());
    let sums: std::cell::RefCell<Option<(Tensor, Tensor)>> = std::cell::RefCell::new(None);
    let gx = by_chunks(n, chunk_rows(inp, out), inp, dt, x.device(), |a, r| {
        let g = g.narrow(0, a, r)?;
        let mut gx = crate::ops::linear::input_grad(w, &g.t()?)?.t()?.to_dtype(dt)?;
        if let Some((down, up)) = &lora {
            let ld = down.dtype();
            let (xl, gl) = (x.narrow(0, a, r)?.to_dtype(ld)?, g.to_dtype(ld)?);
            let gu = gl.matmul(up)?;
            gx = (gx + (gu.matmul(down)? * scale)?.to_dtype(dt)?)?;
            if !factors {
                return Ok(gx);
            }
            let g_up = (gl.t()?.matmul(&xl.matmul(&down.t()?)?)? * scale)?;
            let g_down = (gu.t()?.matmul(&xl)? * scale)?;
            let mut s = sums.borrow_mut();
            *s = Some(match s.take() {
                None => (g_down, g_up),
                Some((d0, u0)) => ((d0 + g_down)?, (u0 + g_up)?),
            });
        }
        Ok(gx)
    })?;
    Ok(match sums.into_inner() {
        None if inputs.len() == 3 => vec![Some(gx), None, None],
        None => vec![Some(gx)],
        Some((g_down, g_up)) => vec![Some(gx), Some(g_down), Some(g_up)],
    })
}

fn rank(d: DType) -> u8 {
    match d {
        DType::F64 => 3,
        DType::F32 => 2,
        DType::BF16 | DType::F16 => 1,
        _ => 0,
    }
}

/// The wider float dtype of two.
fn wider(a: DType, b: DType) -> DType {
    if rank(a) >= rank(b) {
        a
    } else {
        b
    }
}

/// Which linear layers get adapters, and their shape.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Glob patterns (`*` matches any run of characters) over diffusers module names.
    pub targets: Vec<String>,
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 16, alpha: 16.0, targets: default_targets(), seed: 0 }
    }
}

/// Every attention projection (self, cross and added/text ones) and every FFN linear of both
/// teachers, in diffusers names.
pub fn default_targets() -> Vec<String> {
    ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0", "*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.to_add_out", "*.net.0.proj", "*.net.2"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Glob match with `*` wildcards over the whole name.
pub fn glob(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// Attach fresh adapters (zero `up`) to every named linear whose name matches a target;
/// returns how many were attached.
pub fn attach(linears: Vec<(String, &mut Linear)>, cfg: &LoraConfig) -> Result<usize> {
    let mut n = 0;
    for (i, (name, l)) in linears.into_iter().enumerate() {
        if cfg.targets.iter().any(|p| glob(p, &name)) {
            let dev = l.weight.device().clone();
            l.lora = Some(LoraAdapter::new(
                l.in_dim(),
                l.out_dim(),
                cfg.rank,
                cfg.alpha,
                cfg.seed.wrapping_add(i as u64),
                l.weight.dtype(),
                &dev,
            )?);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraAdapter;
    use candle_core::{Device, Var};

    thread_local! {
        /// Rows per chunk of the grafted layers on this thread, when set.
        pub(super) static CHUNK: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    #[test]
    fn globs() {
        assert!(glob("*.to_q", "blocks.0.attn1.to_q"));
        assert!(!glob("*.to_q", "blocks.0.attn1.to_qq"));
        assert!(glob("blocks.*.attn2.*", "blocks.3.attn2.to_k"));
        assert!(glob("proj_out", "proj_out"));
        assert!(!glob("*.net.2", "blocks.0.ffn.net.0.proj"));
    }

    #[test]
    fn lora_zero_is_exact_and_merge_matches() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 6, &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
        let mut l = Linear::new(w, Some(b));
        let base = l.forward(&x).unwrap();
        let mut name = vec![("blocks.0.attn1.to_q".to_string(), &mut l)];
        assert_eq!(attach(std::mem::take(&mut name), &LoraConfig { rank: 2, ..Default::default() }).unwrap(), 1);
        let with = l.forward(&x).unwrap();
        assert_eq!(base.flatten_all().unwrap().to_vec1::<f32>().unwrap(), with.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let lora = l.lora.as_ref().unwrap();
        lora.up.set(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap()).unwrap();
        let adapted = l.forward(&x).unwrap();
        l.merge().unwrap();
        let merged = l.forward(&x).unwrap();
        let diff = (&adapted - &merged).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let norm = adapted.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(diff / norm < 1e-6, "{diff} / {norm}");
        assert_eq!(merged.dtype(), DType::F32);
    }

    /// The grafted layer's gradients (input, LoRA down and up) against candle's autograd of the
    /// plain composition in f64, for f32 and bf16 base weights (rounded to bf16 in both), in one
    /// piece and in chunks of rows (22 rows: 5 chunks of 5 with a partial one, 2 of 16).
    #[test]
    fn the_grafted_layer_gives_the_gradients_of_the_composition() {
        let dev = Device::Cpu;
        let mut r = crate::rng::Rng::new(9);
        let mut t = |shape: &[usize]| Tensor::from_vec(r.normals_f32(shape.iter().product()), shape, &dev).unwrap();
        let (out, inp, rank, n) = (300, 37, 4, 11);
        let (w0, b0, x0, g) = (t(&[out, inp]), t(&[out]), t(&[2, n, inp]), t(&[2, n, out]));
        let (d0, u0) = (t(&[rank, inp]), t(&[out, rank]));
        let f64v = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (wdt, chunk) in [(DType::F32, None), (DType::BF16, None), (DType::F32, Some(5)), (DType::BF16, Some(16))] {
            CHUNK.set(chunk);
            let w = w0.to_dtype(wdt).unwrap();
            let mut l = Linear::new(w.clone(), Some(b0.to_dtype(wdt).unwrap()));
            l.lora = Some(LoraAdapter::from_tensors(&d0, &u0, 8.0).unwrap());
            let lo = l.lora.clone().unwrap();
            let x = Var::from_tensor(&x0).unwrap();
            let y = l.forward(x.as_tensor()).unwrap();
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            // The reference: the same math composed in f64, differentiated by candle.
            let (xr, dr, ur) = (
                Var::from_tensor(&x0.to_dtype(DType::F64).unwrap()).unwrap(),
                Var::from_tensor(&d0.to_dtype(DType::F64).unwrap()).unwrap(),
                Var::from_tensor(&u0.to_dtype(DType::F64).unwrap()).unwrap(),
            );
            let wr = w.to_dtype(DType::F64).unwrap();
            let br = b0.to_dtype(wdt).unwrap().to_dtype(DType::F64).unwrap();
            let yr = (xr.as_tensor().broadcast_matmul(&wr.t().unwrap()).unwrap().broadcast_add(&br).unwrap()
                + (xr
                    .as_tensor()
                    .broadcast_matmul(&dr.as_tensor().t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&ur.as_tensor().t().unwrap())
                    .unwrap()
                    * 2.0)
                    .unwrap())
            .unwrap();
            let gr = (&yr * g.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let rel = |a: &[f64], b: &[f64]| {
                let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
                (d / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
            };
            for (name, ours, theirs) in [
                ("y", f64v(&y), f64v(&yr)),
                ("dx", f64v(grads.get(x.as_tensor()).unwrap()), f64v(gr.get(xr.as_tensor()).unwrap())),
                ("ddown", f64v(grads.get(lo.down.as_tensor()).unwrap()), f64v(gr.get(dr.as_tensor()).unwrap())),
                ("dup", f64v(grads.get(lo.up.as_tensor()).unwrap()), f64v(gr.get(ur.as_tensor()).unwrap())),
            ] {
                let e = rel(&ours, &theirs);
                assert!(e < 1e-6, "{wdt:?} chunks of {chunk:?} rows, {name}: relative error {e}");
            }
            assert!(grads.get(&w).is_none(), "the frozen weight got a gradient");
            // A frozen view: the same input gradient (the adapter's part included), no gradient
            // for the adapter's factors.
            let mut fz = l.clone();
            fz.frozen = true;
            let xf = Var::from_tensor(&x0).unwrap();
            let gf = (&fz.forward(xf.as_tensor()).unwrap() * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel(&f64v(gf.get(xf.as_tensor()).unwrap()), &f64v(gr.get(xr.as_tensor()).unwrap()));
            assert!(e < 1e-6, "{wdt:?} frozen view dx: relative error {e}");
            assert!(gf.get(lo.down.as_tensor()).is_none() && gf.get(lo.up.as_tensor()).is_none());
        }
    }
}
