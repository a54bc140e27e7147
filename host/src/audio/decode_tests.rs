//! Decoding the tiny tones of tests/fixtures/whisper (made by
//! tests/goldens/whisper_mel.py with ffmpeg) and refusing bad input.
use super::*;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/whisper").join(name)
}

/// Amplitude (RMS * sqrt 2) and frequency (zero crossings) of the middle
/// half of a 16 kHz tone, away from codec and resampler edges.
fn tone_of(x: &[f32]) -> (f32, f32) {
    let mid = &x[x.len() / 4..3 * x.len() / 4];
    let rms = (mid.iter().map(|v| v * v).sum::<f32>() / mid.len() as f32).sqrt();
    let crossings = mid.windows(2).filter(|w| (w[0] < 0.0) != (w[1] < 0.0)).count();
    let hz = crossings as f32 / 2.0 / (mid.len() as f32 / 16000.0);
    (rms * 2f32.sqrt(), hz)
}

#[test]
fn wav_stereo_8k_is_averaged_and_upsampled() {
    let a = decode_file(&fixture("tone_stereo_8k.wav")).unwrap();
    assert_eq!((a.source_rate, a.source_channels), (8000, 2));
    assert_eq!(a.codec, "pcm_s16le");
    assert!((a.samples.len() as i64 - 6400).abs() <= 16, "{} samples", a.samples.len());
    let (amp, hz) = tone_of(&a.samples);
    assert!((amp - 0.4).abs() < 0.01, "amplitude {amp}"); // (0.6 + 0.2) / 2
    assert!((hz - 440.0).abs() < 10.0, "{hz} Hz");
}

#[test]
fn flac_44k_is_downsampled() {
    let a = decode_file(&fixture("tone_44k.flac")).unwrap();
    assert_eq!((a.source_rate, a.source_channels), (44100, 1));
    assert_eq!(a.codec, "flac");
    assert!((a.samples.len() as i64 - 8000).abs() <= 16, "{} samples", a.samples.len());
    let (amp, hz) = tone_of(&a.samples);
    assert!((amp - 0.5).abs() < 0.01, "amplitude {amp}");
    assert!((hz - 440.0).abs() < 10.0, "{hz} Hz");
}

#[test]
fn mp3_24k_decodes() {
    let a = decode_file(&fixture("tone_24k.mp3")).unwrap();
    assert_eq!((a.source_rate, a.source_channels), (24000, 1));
    assert_eq!(a.codec, "mp3");
    // lame adds encoder delay and padding: about 0.5 s, within 0.1 s
    assert!((a.duration() - 0.5).abs() < 0.1, "{} s", a.duration());
    let (amp, hz) = tone_of(&a.samples);
    assert!((amp - 0.5).abs() < 0.05, "amplitude {amp}");
    assert!((hz - 440.0).abs() < 10.0, "{hz} Hz");
    // the extension is only a hint: the same bytes named .wav still decode
    let bytes = std::fs::read(fixture("tone_24k.mp3")).unwrap();
    assert_eq!(decode_bytes(bytes, Some("wav")).unwrap().samples.len(), a.samples.len());
}

#[test]
fn bad_input_is_a_clear_error() {
    assert!(matches!(decode_bytes(Vec::new(), None), Err(AudioError::Empty)));
    let e = decode_bytes(b"this is not audio at all, just some text".repeat(20), Some("txt")).unwrap_err();
    assert!(matches!(e, AudioError::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("wav, flac and mp3"), "{e}");
    // a wav cut inside its header
    let wav = std::fs::read(fixture("tone_stereo_8k.wav")).unwrap();
    assert!(decode_bytes(wav[..30].to_vec(), Some("wav")).is_err());
    // a wav whose data chunk is empty
    let mut empty = wav[..44].to_vec();
    empty[40..44].copy_from_slice(&0u32.to_le_bytes());
    empty[4..8].copy_from_slice(&36u32.to_le_bytes());
    assert!(decode_bytes(empty, Some("wav")).is_err());
    // random bytes after a valid header: an error or some samples, never a panic
    let mut junk = wav[..44].to_vec();
    junk.extend((0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    let _ = decode_bytes(junk, Some("wav"));
    let missing = decode_file(std::path::Path::new("/nonexistent/a.wav")).unwrap_err();
    assert!(matches!(missing, AudioError::Io { .. }), "{missing}");
}

#[test]
fn resampling_keeps_length_and_tone() {
    let x: Vec<f32> = (0..48000).map(|i| 0.5 * (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 48000.0).sin()).collect();
    let y = resample_to_16k(&x, 48000).unwrap();
    assert!((y.len() as i64 - 16000).abs() <= 4, "{}", y.len());
    let (amp, hz) = tone_of(&y);
    assert!((amp - 0.5).abs() < 0.01 && (hz - 1000.0).abs() < 10.0, "{amp} {hz}");
    assert_eq!(resample_to_16k(&x[..100], 16000).unwrap(), x[..100].to_vec());
    assert!(resample_to_16k(&x, 0).is_err());
    assert_eq!(downmix(&[1.0, 0.0, 0.5, 0.5], 2), vec![0.5, 0.5]);
}
