//! The block format (every flipped bit and cut caught), the settings, the hash
//! key, and the store: read back, reopened, corrupt files, the size cap.
use super::*;
use mlx_rs::Array;
use std::fs;
use std::path::{Path, PathBuf};

fn block(hash: u64) -> BlockFile {
    let a = |seed: u8| RawArray {
        dtype: u32::from(mlx_rs::Dtype::Float32),
        shape: vec![1, 2, 3, 2],
        data: (0..48).map(|i| i as u8 ^ seed).collect(),
    };
    BlockFile {
        signature: 7,
        hash,
        parent: 0x99,
        depth: 2,
        tokens: vec![5, 6, 7],
        arrays: vec![a(1), a(2), a(3), a(4)],
    }
}

#[test]
fn format_round_trips_and_every_flip_or_cut_is_caught() {
    let b = block(0xabc);
    let bytes = encode(&b);
    assert_eq!(bytes.len(), FIXED + 3 * 4 + 4 * DESC + 4 * 48 + 4);
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 0xabc);
    assert_eq!(u32::from_le_bytes(bytes[32..36].try_into().unwrap()), 2);
    assert_eq!(decode(&bytes).unwrap(), b);
    let f = parse_fixed(&bytes).unwrap();
    assert_eq!(
        (f.signature, f.hash, f.depth, f.file_len),
        (7, 0xabc, 2, bytes.len() as u64)
    );
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(
            decode(&bad).is_err(),
            "a flipped bit at byte {i} was not caught"
        );
    }
    for n in [0, 5, FIXED, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            decode(&bytes[..n]).is_err(),
            "cut to {n} bytes was not caught"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert!(decode(&long).is_err());
}

#[test]
fn settings_are_checked() {
    assert_eq!(parse_gb("20").unwrap(), 20.0);
    assert_eq!(parse_gb("0.5GB").unwrap(), 0.5);
    for bad in ["0", "-1", "x", "", "inf", "nan"] {
        assert!(parse_gb(bad).is_err(), "{bad}");
    }
    let tmp = tempfile::tempdir().unwrap();
    assert!(SsdConfig::new(tmp.path(), 0.0).is_err());
    assert!(SsdConfig::new(tmp.path(), -2.0).is_err());
    assert_eq!(
        SsdConfig::new(&tmp.path().join("a/b"), 1.0)
            .unwrap()
            .max_bytes,
        1_000_000_000
    );
    let file = tmp.path().join("f");
    fs::write(&file, b"x").unwrap();
    let e = SsdConfig::new(&file.join("sub"), 1.0).unwrap_err();
    assert!(format!("{e:#}").contains("--kv-ssd-dir"), "{e:#}");
}

/// Two layers' keys and values, each [3 slots, 2 heads, 4].
fn kv(seed: f32) -> Vec<Array> {
    let a = |x: f32| Array::from_slice(&(0..24).map(|i| i as f32 * x).collect::<Vec<_>>(), &[3, 2, 4]);
    vec![a(seed), a(seed + 1.0), a(seed + 2.0), a(seed + 3.0)]
}

/// Block and temp files (not the key).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with(KEY_FILE))
        .collect();
    v.sort();
    v
}

/// The hash key stays with the directory (a restart matches its blocks);
/// without it the files there cannot match and are deleted.
#[test]
fn the_hash_key_lives_with_the_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SsdConfig { dir: tmp.path().to_path_buf(), max_bytes: 1 << 20 };
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    let key = s.key();
    assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
    s.flush();
    drop(s);
    let s = SsdStore::open(&cfg, 42).unwrap();
    assert_eq!((s.key(), s.blocks()), (key, 1));
    drop(s);
    let sub = tmp.path().join(format!("{:016x}", 42));
    fs::remove_file(sub.join(KEY_FILE)).unwrap();
    let s = SsdStore::open(&cfg, 42).unwrap();
    assert_ne!(s.key(), key);
    assert_eq!(s.blocks(), 0);
    assert!(files(&sub).is_empty());
}

#[test]
fn store_reads_back_survives_reopen_skips_corrupt_and_holds_the_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SsdConfig {
        dir: tmp.path().to_path_buf(),
        max_bytes: 1 << 20,
    };
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
    // Read at once: served from the queued bytes or the file, never corrupt.
    let got = s.load(1, None, 0, &[1, 2, 3]).unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].as_slice::<f32>(), kv(1.0)[3].as_slice::<f32>());
    assert_eq!((s.reads, s.corrupt), (1, 0));
    // Wrong tokens (a hash collision) are never served.
    assert!(s.load(1, None, 0, &[1, 2, 4]).is_none());
    assert_eq!(s.corrupt, 1);
    // Nor the right tokens after another parent, or at another depth.
    assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
    assert!(s.load(1, Some(5), 1, &[1, 2, 3]).is_none());
    assert!(s.put(1, None, 0, &[1, 2, 3], &kv(1.0)));
    assert!(s.load(1, None, 3, &[1, 2, 3]).is_none());
    assert_eq!(s.corrupt, 3);
    assert!(
        s.put(1, None, 0, &[1, 2, 3], &kv(1.0))
            && s.put(2, Some(1), 1, &[4, 5, 6], &kv(2.0))
            && s.put(3, Some(2), 2, &[7, 8, 9], &kv(3.0))
    );
    let one = s.bytes() / 3;
    s.flush();
    drop(s);
    let sub = tmp.path().join(format!("{:016x}", 42));
    assert_eq!(files(&sub).len(), 3);
    // Restart: indexed, read back.
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    assert_eq!((s.blocks(), s.bytes()), (3, 3 * one));
    assert_eq!(
        s.load(2, Some(1), 1, &[4, 5, 6]).unwrap()[0].as_slice::<f32>(),
        kv(2.0)[0].as_slice::<f32>()
    );
    // Flip a payload byte of block 3, truncate block 1.
    let p3 = sub.join(format!("{:016x}.kvb", 3));
    let mut b = fs::read(&p3).unwrap();
    let n = b.len();
    b[n - 10] ^= 1;
    fs::write(&p3, b).unwrap();
    assert!(s.load(3, Some(2), 2, &[7, 8, 9]).is_none());
    assert_eq!(s.corrupt, 1);
    s.flush();
    assert!(!p3.exists(), "a corrupt file was kept");
    let p1 = sub.join(format!("{:016x}.kvb", 1));
    let b = fs::read(&p1).unwrap();
    fs::write(&p1, &b[..b.len() - 7]).unwrap();
    assert!(s.load(1, None, 0, &[1, 2, 3]).is_none());
    assert_eq!((s.corrupt, s.blocks()), (2, 1));
    s.flush();
    // At start-up: a truncated file, a file in the wrong place and a
    // stray temp file are deleted (the first two counted).
    drop(s);
    let p2 = sub.join(format!("{:016x}.kvb", 2));
    let b = fs::read(&p2).unwrap();
    fs::write(sub.join(format!("{:016x}.kvb", 9)), &b).unwrap();
    fs::write(&p2, &b[..100]).unwrap();
    fs::write(sub.join(format!("{:016x}.kvb.tmp", 8)), b"half").unwrap();
    let s = SsdStore::open(&cfg, 42).unwrap();
    assert_eq!((s.corrupt, s.blocks()), (2, 0));
    assert!(files(&sub).is_empty());
    drop(s);
    // Another signature does not see these blocks.
    assert_eq!(SsdStore::open(&cfg, 43).unwrap().blocks(), 0);
    // The cap: room for two files; the least recently used goes.
    let cfg = SsdConfig {
        dir: tmp.path().join("cap"),
        max_bytes: 2 * one + 10,
    };
    let mut s = SsdStore::open(&cfg, 42).unwrap();
    s.put(1, None, 0, &[1, 2, 3], &kv(1.0));
    s.put(2, Some(1), 1, &[4, 5, 6], &kv(2.0));
    s.touch(1);
    s.put(3, Some(2), 2, &[7, 8, 9], &kv(3.0));
    assert!(s.contains(1) && !s.contains(2) && s.contains(3));
    assert!(s.bytes() <= cfg.max_bytes);
    s.flush();
    let sub = cfg.dir.join(format!("{:016x}", 42));
    let on_disk: u64 = files(&sub)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!((files(&sub).len(), on_disk), (2, s.bytes()));
}
