//! Resizing RGB8 images the way PIL's `Image.resize` does (what Hugging Face
//! image processors call), so preprocessed pixels match the Python reference
//! exactly rather than within a rounding step: separable convolution,
//! horizontal pass then vertical, filter support widened by the scale when
//! downscaling, weights normalised then fixed-point (22 fractional bits),
//! round-half-up and clamp to u8 after each pass. `image`'s own resize
//! rounds differently (±1 in u8, ~0.008 after normalisation).

/// PIL resample filters (the `resample` integer in preprocessor configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,  // 0
    Bilinear, // 2
    Bicubic,  // 3
}

impl Filter {
    /// From PIL's enum value; `None` for LANCZOS (1), BOX (4), HAMMING (5).
    pub fn from_pil(v: i64) -> Option<Filter> {
        match v {
            0 => Some(Filter::Nearest),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.5,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Nearest => unreachable!("nearest has its own path"),
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: first input index and fixed-point weights.
struct Coeffs {
    bounds: Vec<(usize, usize)>, // (xmin, count)
    ksize: usize,
    k: Vec<i32>, // [out, ksize]
}

fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // `as` truncates toward zero, as C's (int) cast in PIL.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let w = &mut w[..xmax];
        for (x, wx) in w.iter_mut().enumerate() {
            *wx = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
        }
        let ww: f64 = w.iter().sum();
        for (kx, &wx) in k[xx * ksize..].iter_mut().zip(w.iter()) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            *kx = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coeffs { bounds, ksize, k }
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes row-major RGB8 `src` ([h, w, 3]) to [out_h, out_w, 3].
pub fn resize_rgb8(
    src: &[u8],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Vec<u8> {
    assert_eq!(src.len(), w * h * 3, "resize_rgb8: buffer is not [h, w, 3]");
    if out_w == w && out_h == h {
        return src.to_vec();
    }
    if filter == Filter::Nearest {
        return nearest(src, w, h, out_w, out_h);
    }
    let horiz = coeffs(w, out_w, filter);
    let vert = coeffs(h, out_h, filter);
    // Only the input rows the vertical pass reads go through the horizontal one.
    let (y_first, y_last) = if out_h != h {
        let last = vert.bounds[out_h - 1];
        (vert.bounds[0].0, last.0 + last.1)
    } else {
        (0, h)
    };
    let half = 1i32 << (PRECISION_BITS - 1);
    // Horizontal: [y_last - y_first, out_w, 3].
    let (tmp, tw) = if out_w != w {
        let mut tmp = vec![0u8; (y_last - y_first) * out_w * 3];
        for y in y_first..y_last {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for (xx, &(xmin, n)) in horiz.bounds.iter().enumerate() {
                let k = &horiz.k[xx * horiz.ksize..xx * horiz.ksize + n];
                for c in 0..3 {
                    let mut ss = half;
                    for (x, &kx) in k.iter().enumerate() {
                        ss += row[(xmin + x) * 3 + c] as i32 * kx;
                    }
                    tmp[((y - y_first) * out_w + xx) * 3 + c] = clip8(ss);
                }
            }
        }
        (tmp, out_w)
    } else {
        (src[y_first * w * 3..y_last * w * 3].to_vec(), w)
    };
    if out_h == h {
        return tmp;
    }
    // Vertical: [out_h, out_w, 3].
    let mut out = vec![0u8; out_h * tw * 3];
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let k = &vert.k[yy * vert.ksize..yy * vert.ksize + n];
        let ymin = ymin - y_first;
        for x in 0..tw * 3 {
            let mut ss = half;
            for (y, &ky) in k.iter().enumerate() {
                ss += tmp[(ymin + y) * tw * 3 + x] as i32 * ky;
            }
            out[yy * tw * 3 + x] = clip8(ss);
        }
    }
    out
}

/// PIL's NEAREST: source index floor((x + 0.5) * in / out).
fn nearest(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_w * out_h * 3];
    for yy in 0..out_h {
        let y = (((yy as f64 + 0.5) * h as f64 / out_h as f64) as usize).min(h - 1);
        for xx in 0..out_w {
            let x = (((xx as f64 + 0.5) * w as f64 / out_w as f64) as usize).min(w - 1);
            out[(yy * out_w + xx) * 3..][..3].copy_from_slice(&src[(y * w + x) * 3..][..3]);
        }
    }
    out
}
