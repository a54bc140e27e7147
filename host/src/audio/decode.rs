//! Decode wav, flac and mp3 (symphonia) to mono f32 at 16 kHz.
//!
//! Channels are averaged; other rates are resampled with rubato's FFT
//! resampler (synchronous, fixed ratio, anti-aliased; docs/decisions.md).
//! Anything that is not audio symphonia can read, holds no samples, or is
//! cut short comes back as an [`AudioError`], never a panic (symphonia runs
//! under `catch_unwind` as a last guard).
use std::io::Cursor;
use std::path::Path;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::{AudioError, SAMPLE_RATE};

/// Decoded audio, mono at 16 kHz.
#[derive(Debug, Clone)]
pub struct Audio {
    /// [n] mono samples at 16 kHz, nominally in [-1, 1].
    pub samples: Vec<f32>,
    /// The file's own sample rate.
    pub source_rate: u32,
    /// The file's channel count.
    pub source_channels: usize,
    /// The container's codec, e.g. "pcm_s16le", "flac", "mp3".
    pub codec: String,
}

impl Audio {
    /// Length in seconds.
    pub fn duration(&self) -> f64 {
        self.samples.len() as f64 / SAMPLE_RATE as f64
    }
}

/// Decode the file at `path` (the extension is a hint only; the content decides).
pub fn decode_file(path: &Path) -> Result<Audio, AudioError> {
    let bytes = std::fs::read(path).map_err(|source| AudioError::Io { path: path.display().to_string(), source })?;
    let ext = path.extension().and_then(|e| e.to_str());
    decode_bytes(bytes, ext)
}

/// Decode an in-memory file (an upload). `ext` ("wav", "mp3", ...) is a hint.
pub fn decode_bytes(bytes: Vec<u8>, ext: Option<&str>) -> Result<Audio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    let ext = ext.map(str::to_owned);
    let (interleaved, rate, channels, codec) = std::panic::catch_unwind(move || decode_interleaved(bytes, ext.as_deref()))
        .map_err(|_| AudioError::Malformed("the decoder failed on this input".into()))??;
    let mono = downmix(&interleaved, channels);
    if mono.is_empty() {
        return Err(AudioError::Empty);
    }
    let samples = resample_to_16k(&mono, rate)?;
    Ok(Audio { samples, source_rate: rate, source_channels: channels, codec })
}

/// Average `channels` interleaved channels. [frames * channels] -> [frames]
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    interleaved.chunks_exact(channels).map(|f| f.iter().sum::<f32>() / channels as f32).collect()
}

/// Resample mono `samples` from `rate` to 16 kHz (a copy when already 16 kHz).
pub fn resample_to_16k(samples: &[f32], rate: u32) -> Result<Vec<f32>, AudioError> {
    if rate == SAMPLE_RATE {
        return Ok(samples.to_vec());
    }
    if rate == 0 {
        return Err(AudioError::Malformed("sample rate 0".into()));
    }
    let err = |message: String| AudioError::Resample { from: rate, message };
    let mut rs = Fft::<f32>::new(rate as usize, SAMPLE_RATE as usize, 1024, 1, FixedSync::Input).map_err(|e| err(e.to_string()))?;
    let input = InterleavedSlice::new(samples, 1, samples.len()).map_err(|e| err(e.to_string()))?;
    let out = rs.process_all(&input, samples.len(), None).map_err(|e| err(e.to_string()))?;
    Ok(out.take_data())
}

type Decoded = (Vec<f32>, u32, usize, String);

fn decode_interleaved(bytes: Vec<u8>, ext: Option<&str>) -> Result<Decoded, AudioError> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), MediaSourceStreamOptions::default());
    let mut hint = Hint::new();
    if let Some(e) = ext {
        hint.with_extension(e);
    }
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &FormatOptions::default(), &MetadataOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(m) => AudioError::Unsupported(format!("not a wav, flac or mp3 stream ({m})")),
            other => AudioError::Malformed(other.to_string()),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Unsupported("no audio track".into()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let codec = symphonia::default::get_codecs()
        .get_codec(params.codec)
        .map(|d| d.short_name.to_string())
        .unwrap_or_else(|| format!("codec {:?}", params.codec));
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unsupported(format!("{codec}: {e}")))?;
    let mut rate = params.sample_rate.unwrap_or(0);
    let mut channels = params.channels.map(|c| c.count()).unwrap_or(0);
    let mut out: Vec<f32> = Vec::new();
    let mut bad_packets = 0usize;
    let mut good_packets = 0usize;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(AudioError::Malformed(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet) {
            Ok(buf) => {
                let spec = *buf.spec();
                if buf.frames() == 0 {
                    continue;
                }
                let ch = spec.channels.count();
                if good_packets > 0 && (ch != channels || spec.rate != rate) {
                    return Err(AudioError::Unsupported(format!(
                        "the stream changes from {channels} channels at {rate} Hz to {ch} at {} Hz",
                        spec.rate
                    )));
                }
                channels = ch;
                rate = spec.rate;
                let mut sb = SampleBuffer::<f32>::new(buf.capacity() as u64, spec);
                sb.copy_interleaved_ref(buf);
                out.extend_from_slice(sb.samples());
                good_packets += 1;
            }
            // A corrupt frame (mp3 streams often start or end with one) is skipped.
            Err(SymError::DecodeError(_)) => bad_packets += 1,
            Err(e) => return Err(AudioError::Malformed(e.to_string())),
        }
    }
    if good_packets == 0 {
        return Err(if bad_packets > 0 {
            AudioError::Malformed(format!("{bad_packets} packets and none decodable"))
        } else {
            AudioError::Empty
        });
    }
    if channels == 0 || rate == 0 {
        return Err(AudioError::Malformed(format!("{channels} channels at {rate} Hz")));
    }
    Ok((out, rate, channels, codec))
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
