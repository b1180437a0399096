//! PNG plots without dependencies: scatter panels of samples at every expert boundary and loss
//! curves. The encoder writes uncompressed (stored) deflate blocks; files are small anyway.

use std::path::Path;

use super::metrics::to_rows;
use super::rundir::{LogLine, RunDir};
use super::toy::sample::LoadedRun;
use crate::atomic;
use crate::error::Result;

/// An RGB canvas.
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<[u8; 3]>,
}

impl Canvas {
    pub fn new(w: usize, h: usize) -> Canvas {
        Canvas { w, h, px: vec![[255, 255, 255]; w * h] }
    }
    pub fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }
    pub fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            self.set(x + dx, y + dy, c);
        }
    }
    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            self.set((x0 + t * (x1 - x0)).round() as i64, (y0 + t * (y1 - y0)).round() as i64, c);
        }
    }
    pub fn rect(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: [u8; 3]) {
        let (a, b, cc, d) = (x0 as f64, y0 as f64, x1 as f64, y1 as f64);
        self.line(a, b, cc, b, c);
        self.line(a, d, cc, d, c);
        self.line(a, b, a, d, c);
        self.line(cc, b, cc, d, c);
    }
    /// PNG bytes (8-bit RGB).
    pub fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.h * (1 + 3 * self.w));
        for y in 0..self.h {
            raw.push(0);
            for x in 0..self.w {
                raw.extend_from_slice(&self.px[y * self.w + x]);
            }
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.w as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.h as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &zlib_stored(&raw));
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let c = crc32(&out[start..]);
    out.extend_from_slice(&c.to_be_bytes());
}

/// CRC-32 (IEEE, reflected), as PNG chunks use.
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
        *t = c;
    }
    let mut c = 0xFFFF_FFFFu32;
    for b in data {
        c = table[((c ^ *b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

/// zlib stream of stored deflate blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    for (i, b) in blocks.iter().enumerate() {
        out.push(u8::from(i + 1 == blocks.len()));
        let len = b.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for x in data {
        a = (a + *x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

const CLASS_COLORS: [[u8; 3]; 6] = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189], [255, 127, 14], [23, 190, 207]];

/// One scatter panel: rows `[n, d]` flattened, d, class of each row, mode centres to mark.
pub type Panel = (Vec<f64>, usize, Vec<u32>, Vec<[f64; 2]>);

/// Scatter panels side by side: `panels[i]` = (rows `[n, ≥2]` flattened, d, classes, mode
/// centres to mark). Coordinates in [−range, range].
pub fn scatter_panels(panels: &[Panel], range: f64) -> Canvas {
    let s = 240;
    let mut c = Canvas::new(s * panels.len().max(1) + 8, s + 8);
    for (pi, (rows, d, cls, centres)) in panels.iter().enumerate() {
        let ox = 4 + pi * s;
        let to = |v: f64, o: usize| o as f64 + (v + range) / (2.0 * range) * (s - 8) as f64 + 4.0;
        c.rect(ox, 4, ox + s - 2, s + 2, [180, 180, 180]);
        for m in centres {
            let (x, y) = (to(m[0], ox), to(-m[1], 4));
            c.line(x - 5.0, y, x + 5.0, y, [0, 0, 0]);
            c.line(x, y - 5.0, x, y + 5.0, [0, 0, 0]);
        }
        for (i, p) in rows.chunks(*d).enumerate() {
            let col = CLASS_COLORS[cls.get(i).copied().unwrap_or(0) as usize % CLASS_COLORS.len()];
            c.dot(to(p[0], ox) as i64, to(-p[1], 4) as i64, col);
        }
    }
    c
}

/// Loss curves from `log.jsonl`: generator loss (top) and fake loss (bottom), log scale,
/// phase changes as grey lines.
pub fn loss_curves(lines: &[LogLine]) -> Canvas {
    let (w, h) = (640, 400);
    let mut c = Canvas::new(w, h);
    if lines.is_empty() {
        return c;
    }
    let maxg = lines.iter().map(|l| l.global_step).max().unwrap_or(1).max(1) as f64;
    type Series<'a> = (&'a dyn Fn(&LogLine) -> f64, usize, [u8; 3]);
    let panels: [Series; 2] = [(&|l: &LogLine| l.gen_loss, 0, [31, 119, 180]), (&|l: &LogLine| l.fake_loss, 1, [214, 39, 40])];
    for (f, row, col) in panels {
        let y0 = 8 + row * (h / 2);
        let ph = h / 2 - 16;
        c.rect(8, y0, w - 8, y0 + ph, [180, 180, 180]);
        let vals: Vec<f64> = lines.iter().map(|l| f(l).max(1e-12).log10()).collect();
        let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max).max(lo + 1e-9);
        let mut prev: Option<(f64, f64)> = None;
        let mut phase = lines[0].phase;
        for (l, v) in lines.iter().zip(&vals) {
            let x = 8.0 + l.global_step as f64 / maxg * (w - 16) as f64;
            let y = (y0 + ph) as f64 - (v - lo) / (hi - lo) * ph as f64;
            if l.phase != phase {
                c.line(x, y0 as f64, x, (y0 + ph) as f64, [200, 200, 200]);
                phase = l.phase;
                prev = None;
            }
            if let Some((px, py)) = prev {
                c.line(px, py, x, y, col);
            }
            prev = Some((x, y));
        }
    }
    c
}

/// `samples.png` (noise, then the state after each step, the last panel being the samples;
/// expert boundaries are where the routed expert changes) and `losses.png`.
pub fn run_plots(run: &LoadedRun, dir: &Path, seed: u64) -> Result<()> {
    let n = 1000;
    let traj = run.trajectory(n, None, seed ^ 0x9107, None)?;
    let mut rng = crate::rng::Rng::new(seed ^ 0x9107);
    let _ = super::dmd::noise(&mut rng, n, &[run.mixture.dim]);
    let cls = run.mixture.sample_classes(n, &mut rng);
    let sig = run.sigmas(None);
    let panels: Vec<_> = traj
        .iter()
        .zip(&sig)
        .map(|(x, s)| {
            let centres = run.mixture.means.iter().map(|m| [(1.0 - s) * m[0], (1.0 - s) * m[1]]).collect();
            (to_rows(x), run.mixture.dim, cls.clone(), centres)
        })
        .collect();
    let png = scatter_panels(&panels, 3.5).png();
    atomic::write_file(&dir.join("samples.png"), &png)?;
    loss_plot(&run.dir, dir)
}

/// `dir/losses.png`: the loss curves of the run in `run_dir` (its `log.jsonl`), for any model.
pub fn loss_plot(run_dir: &Path, dir: &Path) -> Result<()> {
    let lines: Vec<LogLine> = RunDir::new(run_dir).read_log()?;
    atomic::write_file(&dir.join("losses.png"), &loss_curves(&lines).png())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_adler_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let z = zlib_stored(b"Wikipedia");
        assert_eq!(&z[z.len() - 4..], &0x11E6_0398u32.to_be_bytes());
        let png = Canvas::new(3, 2).png();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
