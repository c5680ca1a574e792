//! Quantisers for the GGUF types the writer produces, each ggml's reference algorithm
//! (`quantize_row_*_ref` in ggml-quants.c) in the same f32 arithmetic, so the bytes equal ggml's:
//! - F16: IEEE half, round to nearest even.
//! - Q8_0: blocks of 32; d = max|x|/127, q = round(x/d) (half away from zero); 34 bytes (f16 d, 32 × i8).
//! - Q5_0: blocks of 32; d = m/−16 for the x of largest |x| (m), q = min(31, trunc(x/d + 16.5)),
//!   5 bits each (low nibbles packed j | j+16 << 4, fifth bits in a u32); 22 bytes.
//! - Q4_K: super-blocks of 256 = 8 sub-blocks of 32; per sub-block x ≈ d·sc·q − dmin·m, q ∈ [0, 15],
//!   sc and m 6-bit, d and dmin f16 per super-block; the sub-block's (scale, min) from a weighted
//!   least-squares search (`make_qkx2_quants`: weights av|x| + |x|, 21 trial scales); 144 bytes.
//!
//! The dequantisers are in `gguf::dequantize_into`.
use super::gguf::GgmlType;
use half::f16;

/// The bytes of `x` (a whole number of blocks of `ty`) stored as `ty`; None for a type this module
/// does not quantise or a length that is not a whole number of blocks. Blocks are independent: a
/// long `x` is cut at block boundaries and quantised on all cores, with the same bytes.
pub fn quantize(ty: GgmlType, x: &[f32]) -> Option<Vec<u8>> {
    let (qk, bytes) = ty.block()?;
    if !x.len().is_multiple_of(qk)
        || !matches!(
            ty,
            GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_K
        )
    {
        return None;
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // at least 64k values a piece: below that a thread costs more than it saves
    let blocks_per_piece = (x.len() / qk).div_ceil(threads).max((1 << 16) / qk);
    let pieces: Vec<&[f32]> = x.chunks(blocks_per_piece * qk).collect();
    let mut out = Vec::with_capacity(x.len() / qk * bytes);
    if pieces.len() <= 1 {
        quantize_blocks(ty, x, &mut out);
    } else {
        let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = pieces
                .iter()
                .map(|p| {
                    s.spawn(move || {
                        let mut o = Vec::with_capacity(p.len() / qk * bytes);
                        quantize_blocks(ty, p, &mut o);
                        o
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a quantiser thread does not panic"))
                .collect()
        });
        parts.iter().for_each(|p| out.extend_from_slice(p));
    }
    Some(out)
}

/// Append the blocks of `x` as `ty` (one of the types `quantize` accepts) to `out`.
fn quantize_blocks(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    match ty {
        GgmlType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => x.chunks_exact(32).for_each(|b| q8_0_block(b, out)),
        GgmlType::Q5_0 => x.chunks_exact(32).for_each(|b| q5_0_block(b, out)),
        GgmlType::Q4_K => x.chunks_exact(256).for_each(|b| q4_k_block(b, out)),
        other => unreachable!("quantize accepts no {other:?}"),
    }
}

/// ggml's `nearest_int`: round to nearest, ties to even, through the f32 mantissa (|v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12582912.0f32).to_bits();
    (bits & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `quantize_row_q8_0_ref`, one block of 32.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    // roundf rounds half away from zero, as f32::round does
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

/// `quantize_row_q5_0_ref`, one block of 32.
fn q5_0_block(x: &[f32], out: &mut Vec<u8>) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16::from_f32(d).to_le_bytes());
    // (int8_t)(x·id + 16.5): truncation toward zero; the value lies in [0.5, 32.5]
    let q = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
    let mut qh = 0u32;
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let (q0, q1) = (q(x[j]), q(x[j + 16]));
        qs[j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= ((q0 as u32 & 0x10) >> 4) << j;
        qh |= ((q1 as u32 & 0x10) >> 4) << (j + 16);
    }
    out.extend(qh.to_le_bytes());
    out.extend(qs);
}

/// `make_qkx2_quants` (n = 32, nmax = 15, rmin = −1, rdelta = 0.1, nstep = 20, squared error):
/// the scale s and offset −min (returned as `the_min` ≥ 0) minimising Σ w (s·L + min − x)², with
/// L = clamp(round((x − min)/s), 0, 15) for 21 trial scales around (max − min)/15, each refitted by
/// weighted least squares. Writes the levels into `l`.
fn make_qkx2_quants(x: &[f32], w: &[f32], l: &mut [u8]) -> (f32, f32) {
    const NMAX: i32 = 15;
    let (rmin, rdelta, nstep) = (-1.0f32, 0.1f32, 20);
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|v| *v = 0);
        return (0.0, -min);
    }
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + NMAX as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, NMAX);
            laux[i] = q as u8;
            let lf = q as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += w[i] * (diff * diff);
            }
            if mad < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `quantize_row_q4_K_ref`, one super-block of 256: layout f16 d, f16 dmin, 12 bytes of packed 6-bit
/// scales and mins (`get_scale_min_k4`), 128 bytes of 4-bit levels (sub-blocks 2c and 2c+1 share
/// the low and high nibbles of bytes 32c..32c+32).
fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut w = [0f32; 32];
        for (wi, v) in w.iter_mut().zip(xs) {
            *wi = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &w, &mut l[32 * j..32 * j + 32]);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        // assigned to uint8_t in ggml: the int wraps modulo 256 before the MIN
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0F) | ((lm & 0x0F) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d16 = f16::from_f32(max_scale / 63.0);
    let dmin16 = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let d = d16.to_f32() * sc as f32;
        if d == 0.0 {
            continue; // ggml keeps the levels of the sub-block's own fit
        }
        let dm = dmin16.to_f32() * m as f32;
        for i in 0..32 {
            l[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    out.extend(d16.to_le_bytes());
    out.extend(dmin16.to_le_bytes());
    out.extend(packed);
    for c in 0..4 {
        let base = 64 * c;
        out.extend((0..32).map(|i| l[base + i] | (l[base + 32 + i] << 4)));
    }
}

/// ggml's `get_scale_min_k4` (as in `gguf::dequantize_into`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4, 2.6, -2.6].map(nearest_int),
            [0, 2, 2, 0, -2, 2, 3, -3]
        );
    }
}
