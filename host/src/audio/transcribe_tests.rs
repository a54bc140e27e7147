//! The temperature fallback's decisions (faster-whisper's
//! `generate_with_fallback`) over a scripted decoder, the schedule, and the
//! compression ratio against Python's zlib.
use super::super::window::{compression_ratio, Decoded};
use super::*;

fn decoded(avg_logprob: f32, no_speech_prob: f32) -> Decoded {
    Decoded { tokens: vec![1, 2, 3], sum_logprob: avg_logprob as f64 * 4.0, avg_logprob, no_speech_prob }
}

/// Runs the fallback over `script` (per temperature: avg logprob,
/// no-speech probability, compression ratio); returns the temperatures
/// tried and what was kept (temperature, avg logprob, ratio).
fn fallback(temperatures: &[f32], script: &[(f32, f32, f32)]) -> (Vec<f32>, (f32, f32, f32)) {
    let opts = Options { temperatures: temperatures.to_vec(), ..Options::default() };
    let mut tried = Vec::new();
    let (d, t, r) = decode_with_fallback(&opts, |t| {
        let (lp, ns, cr) = script[tried.len()];
        tried.push(t);
        Ok((decoded(lp, ns), cr))
    })
    .unwrap();
    (tried, (t, d.avg_logprob, r))
}

const SCHEDULE: [f32; 6] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0];

#[test]
fn the_schedule_is_openai_whispers() {
    assert_eq!(fallback_temperatures(0.0, 0.2), SCHEDULE.to_vec());
    assert_eq!(fallback_temperatures(0.5, 0.2), vec![0.5, 0.7, 0.9]);
    assert_eq!(fallback_temperatures(1.0, 0.2), vec![1.0]);
    assert_eq!(fallback_temperatures(0.3, 0.0), vec![0.3]);
    assert_eq!(Options::default().temperatures, vec![0.0]);
}

#[test]
fn compression_ratio_spots_repetition() {
    // Python: len(b) / len(zlib.compress(b)) gives 0.863 and 5.333.
    let plain = compression_ratio("The quick round-fark jump over the lazy dog.");
    assert!((plain - 44.0 / 51.0).abs() < 0.05, "{plain}");
    let rep = compression_ratio(&" the".repeat(20));
    assert!(rep > 2.4 && (rep - 80.0 / 15.0).abs() < 0.5, "{rep}");
    assert_eq!(compression_ratio(""), 0.0);
}

#[test]
fn a_window_that_passes_is_decoded_once_greedily() {
    let (tried, kept) = fallback(&SCHEDULE, &[(-0.3, 0.01, 1.2)]);
    assert_eq!(tried, vec![0.0]);
    assert_eq!(kept, (0.0, -0.3, 1.2));
}

#[test]
fn a_repetitive_greedy_window_is_retried_at_the_next_temperature() {
    // Greedy repeats itself (ratio 5.3, though confident); 0.2 is fine.
    let (tried, kept) = fallback(&SCHEDULE, &[(-0.1, 0.01, 5.3), (-0.4, 0.01, 1.1)]);
    assert_eq!(tried, vec![0.0, 0.2]);
    assert_eq!(kept, (0.2, -0.4, 1.1));
}

#[test]
fn a_low_logprob_window_is_retried_until_one_passes() {
    let (tried, kept) = fallback(&SCHEDULE, &[(-1.5, 0.1, 1.0), (-1.2, 0.1, 1.0), (-0.9, 0.1, 1.0)]);
    assert_eq!(tried, vec![0.0, 0.2, 0.4]);
    assert_eq!(kept, (0.4, -0.9, 1.0));
}

#[test]
fn silence_is_not_retried() {
    // No speech (0.9 > 0.6) with a low log-probability: kept (then skipped).
    let (tried, kept) = fallback(&SCHEDULE, &[(-1.5, 0.9, 1.0)]);
    assert_eq!(tried, vec![0.0]);
    assert_eq!(kept.0, 0.0);
    // A likely no-speech window that repeats itself is retried all the same.
    let (tried, _) = fallback(&SCHEDULE, &[(-0.5, 0.9, 3.0), (-0.5, 0.9, 1.0)]);
    assert_eq!(tried, vec![0.0, 0.2]);
}

#[test]
fn when_all_fail_the_likeliest_under_the_ratio_is_kept_with_the_last_temperature() {
    let script = [(-1.1, 0.1, 1.0), (-0.2, 0.1, 3.0), (-1.05, 0.1, 1.5), (-2.0, 0.1, 1.0), (-1.3, 0.1, 2.9), (-1.6, 0.1, 1.0)];
    let (tried, kept) = fallback(&SCHEDULE, &script);
    assert_eq!(tried, SCHEDULE.to_vec());
    // -0.2 is repetitive (3.0): among the others -1.05 (at 0.4) is best.
    assert_eq!(kept, (1.0, -1.05, 1.5));
    // All repetitive: the best of all.
    let script = [(-1.1, 0.1, 3.0), (-0.2, 0.1, 3.0)];
    let (_, kept) = fallback(&[0.0, 0.5], &script);
    assert_eq!(kept, (0.5, -0.2, 3.0));
}

#[test]
fn one_temperature_means_no_fallback() {
    let (tried, kept) = fallback(&[0.0], &[(-1.5, 0.1, 5.0)]);
    assert_eq!(tried, vec![0.0]);
    assert_eq!(kept, (0.0, -1.5, 5.0));
}

#[test]
fn best_of_keeps_the_likeliest_sample_and_greedy_decodes_once() {
    let mut calls = 0;
    let lps = [-3.0, -1.0, -2.0];
    let d = best_of(3, 0.4, |t| {
        assert_eq!(t, 0.4);
        calls += 1;
        Ok(decoded(lps[calls - 1], 0.0))
    })
    .unwrap();
    assert_eq!((calls, d.avg_logprob), (3, -1.0));
    let mut calls = 0;
    best_of(5, 0.0, |t| {
        assert_eq!(t, 0.0);
        calls += 1;
        Ok(decoded(-0.5, 0.0))
    })
    .unwrap();
    assert_eq!(calls, 1);
}
