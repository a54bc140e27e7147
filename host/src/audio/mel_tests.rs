//! The log-mel front end against tests/fixtures/whisper/mel_golden.safetensors
//! (tests/goldens/whisper_mel.py: faster-whisper's FeatureExtractor and
//! mlx-whisper's `log_mel_spectrogram` on the same synthetic signal).
use super::*;

/// tests/goldens/whisper_mel.py's `signal()`, computed the same way (f64, then f32).
fn signal() -> Vec<f32> {
    let n = 8037usize;
    (0..n)
        .map(|i| {
            let t = i as f64;
            let mut x = 0.5 * (2.0 * std::f64::consts::PI * 440.0 * t / 16000.0).sin();
            x += 0.3 * (2.0 * std::f64::consts::PI * 1234.5 * t / 16000.0 + 0.3).sin() * (t / n as f64);
            x += 0.05 * (((t * 7919.0) % 1000.0) / 1000.0 - 0.5);
            if i == 4000 {
                x += 0.9;
            }
            x as f32
        })
        .collect()
}

fn golden(name: &str) -> (Vec<usize>, Vec<f32>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/whisper/mel_golden.safetensors");
    let bytes = std::fs::read(path).expect("mel golden fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let t = st.tensor(name).expect(name);
    let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (t.shape().to_vec(), v)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn mel_equals_faster_whisper_80_and_128() {
    let x = signal();
    for n_mels in [80, 128] {
        let (shape, want) = golden(&format!("fw{n_mels}"));
        let got = whisper_features(&x, n_mels).unwrap();
        assert_eq!([got.n_frames, got.n_mels], [shape[0], shape[1]]);
        assert_eq!(got.content_frames, shape[0] - 1);
        let d = max_abs(&got.data, &want);
        eprintln!("n_mels {n_mels}: max abs diff {d:e}");
        assert!(d < 1e-4, "n_mels {n_mels}: max abs diff {d}");
    }
}

#[test]
fn mel_with_30s_padding_equals_mlx_whisper() {
    let x = signal();
    let (shape, want) = golden("oa80_head");
    let got = log_mel_spectrogram(&x, 80, WINDOW_SAMPLES).unwrap();
    assert_eq!(got.n_frames, (x.len() + WINDOW_SAMPLES) / HOP);
    assert_eq!(got.content_frames, got.n_frames - WINDOW_FRAMES);
    let d = max_abs(&got.data[..shape[0] * 80], &want);
    eprintln!("30 s padding: max abs diff {d:e}");
    assert!(d < 1e-4, "max abs diff {d}");
}

#[test]
fn filters_are_slaney_normalised_triangles() {
    for n_mels in [80, 128] {
        let f = mel_filters(n_mels).unwrap(); // [n_mels, 201]
        assert_eq!(f.len(), n_mels * N_FREQ);
        assert!(f.iter().all(|&w| w >= 0.0));
        // every band has some weight; the DC bin is in none
        for m in 0..n_mels {
            assert!(f[m * N_FREQ..(m + 1) * N_FREQ].iter().any(|&w| w > 0.0), "band {m} empty");
        }
        assert!((0..n_mels).all(|m| f[m * N_FREQ] == 0.0));
    }
    assert!(mel_filters(64).is_err());
}

#[test]
fn windows_cut_and_pad_to_3000_frames() {
    // 65 s of a quiet tone: content 6500 frames -> windows at 0, 3000, 6000.
    let x: Vec<f32> = (0..65 * 16000).map(|i| 0.1 * (i as f32 * 0.05).sin()).collect();
    let m = whisper_features(&x, 80).unwrap();
    assert_eq!(m.content_frames, 6500);
    let w = m.windows();
    assert_eq!(w.iter().map(|w| (w.seek, w.frames)).collect::<Vec<_>>(), [(0, 3000), (3000, 3000), (6000, 500)]);
    for win in &w {
        assert_eq!(win.data.len(), WINDOW_FRAMES * 80);
        assert_eq!(&win.data[..80], m.frame(win.seek));
    }
    // the padding is zeros in the log-mel domain
    assert!(w[2].data[500 * 80..].iter().all(|&v| v == 0.0));
    assert!(w[2].data[499 * 80..500 * 80].iter().any(|&v| v != 0.0));
    let late = m.window_at(6400);
    assert_eq!((late.seek, late.frames), (6400, 100));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!(matches!(whisper_features(&[], 80), Err(AudioError::Empty)));
    assert!(matches!(whisper_features(&[0.0, f32::NAN], 80), Err(AudioError::Malformed(_))));
    assert!(matches!(whisper_features(&[0.0; 100], 81), Err(AudioError::Mel(_))));
    // Very short input still works (reflect padding longer than the signal).
    let one = whisper_features(&[0.5], 80).unwrap();
    assert_eq!((one.n_frames, one.content_frames), (1, 0));
    assert!(one.windows().is_empty());
    assert!(log_mel_spectrogram(&[0.5; 10], 80, 0).is_err());
    // silence: every value is the floor, (log10(1e-10) + 4) / 4
    let s = whisper_features(&[0.0; 1600], 80).unwrap();
    assert!(s.data.iter().all(|&v| (v - (-1.5)).abs() < 1e-6));
}
