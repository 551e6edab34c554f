//! TEMPORARY: the fused attention kernel's API over a reference composition (autograd for the
//! backward), until kiln_kernels::attention lands.

use candle_core::{Result, Tensor, Var, D};

#[derive(Clone, Copy)]
pub struct AttentionMask<'a> {
    pub causal: bool,
    pub segment_ids: Option<&'a Tensor>,
}

fn visible(tq: usize, tk: usize, b: usize, mask: AttentionMask) -> Result<Tensor> {
    let segs: Option<Vec<Vec<u32>>> = match mask.segment_ids {
        Some(s) => Some(s.to_vec2::<u32>()?),
        None => None,
    };
    let mut m = vec![0f32; b * tq * tk];
    for r in 0..b {
        for i in 0..tq {
            let p = tk - tq + i;
            for j in 0..tk {
                let ok =
                    (!mask.causal || j <= p) && segs.as_ref().is_none_or(|s| s[r][j] == s[r][p]);
                if !ok {
                    m[(r * tq + i) * tk + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, tq, tk), &candle_core::Device::Cpu)
}

pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let g = h / hkv;
    let scores = q
        .reshape((b, hkv, g * tq, hd))?
        .matmul(&k.t()?)?
        .reshape((b, h, tq, tk))?;
    let scores =
        ((scores * scale)?.broadcast_add(&visible(tq, tk, b, mask)?.to_dtype(q.dtype())?))?;
    let mx = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&mx)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.reshape((b, hkv, g * tq, tk))?
        .matmul(v)?
        .reshape((b, h, tq, hd))
}

pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<(Tensor, Tensor)> {
    let out = reference_attention(
        &q.contiguous()?,
        &k.contiguous()?,
        &v.contiguous()?,
        scale,
        mask,
    )?;
    let lse = Tensor::zeros(1, candle_core::DType::F32, q.device())?;
    Ok((out, lse))
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    _out: &Tensor,
    _lse: &Tensor,
    dout: &Tensor,
    scale: f64,
    mask: AttentionMask,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (qv, kv, vv) = (
        Var::from_tensor(&q.contiguous()?)?,
        Var::from_tensor(&k.contiguous()?)?,
        Var::from_tensor(&v.contiguous()?)?,
    );
    let out = reference_attention(&qv, &kv, &vv, scale, mask)?;
    let g = (out * dout.contiguous()?)?.sum_all()?.backward()?;
    Ok((
        g.get(&qv).unwrap().clone(),
        g.get(&kv).unwrap().clone(),
        g.get(&vv).unwrap().clone(),
    ))
}
