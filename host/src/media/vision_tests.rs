use super::*;
use std::path::PathBuf;

fn processor(v: Value) -> ImageProcessor {
    ImageProcessor::from_json(&v).unwrap()
}

fn fixed_processor() -> ImageProcessor {
    processor(serde_json::json!({
        "image_processor_type": "SiglipImageProcessor", "size": {"height": 4, "width": 4},
        "do_resize": true, "do_rescale": true, "rescale_factor": 0.00392156862745098,
        "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]
    }))
}

fn budget_processor(patch: usize, pool: usize) -> ImageProcessor {
    processor(serde_json::json!({"image_processor_type": "Gemma4ImageProcessor", "patch_size": patch,
        "pooling_kernel_size": pool, "max_soft_tokens": 6}))
}

/// Gemma3Processor's layout: `<boi>` per image, "\n\n" around the block.
fn gemma3_like(t: usize) -> VisionSpec {
    VisionSpec {
        image_token: 9,
        placeholders: Placeholders::Fixed(t),
        marker: "<boi>".into(),
        before: "\n\n<boi>".into(),
        image: "<img>".into(),
        after: "<eoi>\n\n".into(),
        processor: fixed_processor(),
    }
}

/// Gemma4Processor's layout: the image token per image, boi/eoi around.
fn gemma4_like() -> VisionSpec {
    VisionSpec {
        image_token: 9,
        placeholders: Placeholders::PooledPatches { patch: 4, pool: 2 },
        marker: "<|image|>".into(),
        before: "<|image>".into(),
        image: "<|image|>".into(),
        after: "<image|>".into(),
        processor: budget_processor(4, 2),
    }
}

fn pixels(h: usize, w: usize) -> Pixels {
    Pixels { data: vec![0.0; 3 * h * w], shape: vec![3, h, w], grid_thw: None }
}

#[test]
fn config_fields_pick_the_layout() {
    let g3 = serde_json::json!({"vision_config": {"patch_size": 14}, "image_token_index": 262144, "mm_tokens_per_image": 256,
        "boi_token_index": 255999, "eoi_token_index": 256000});
    let p = VisionSpec::parts(&g3).unwrap();
    assert_eq!((p.image, p.boi, p.eoi, p.fixed), (262144, Some(255999), Some(256000), Some(256)));
    assert_eq!(VisionSpec::layout(&p, &fixed_processor()).unwrap(), Some(Placeholders::Fixed(256)));
    // Gemma 4: no fixed count; the processor's budget over the tower's pooled patches.
    let g4 = serde_json::json!({"vision_config": {"patch_size": 16, "pooling_kernel_size": 3}, "image_token_id": 258880,
        "boi_token_id": 255999, "eoi_token_id": 258882, "vision_soft_tokens_per_image": 280});
    let p = VisionSpec::parts(&g4).unwrap();
    assert_eq!((p.image, p.fixed, p.tower), (258880, None, (Some(16), Some(3))));
    assert_eq!(VisionSpec::layout(&p, &budget_processor(16, 3)).unwrap(), Some(Placeholders::PooledPatches { patch: 16, pool: 3 }));
    // A processor pooling otherwise than the tower: a config error (500).
    let e = VisionSpec::layout(&p, &budget_processor(16, 2)).unwrap_err();
    assert!(e.to_string().contains("differ from vision_config's 16 / 3"), "{e}");
    assert_eq!(e.http_status(), 500);
    // Neither layout (a fixed-size processor, no count): no images.
    assert_eq!(VisionSpec::layout(&p, &fixed_processor()).unwrap(), None);
    // No vision tower or no placeholder token: no images.
    assert!(VisionSpec::parts(&serde_json::json!({"image_token_index": 5, "mm_tokens_per_image": 4})).is_none());
    assert!(VisionSpec::parts(&serde_json::json!({"vision_config": {}, "mm_tokens_per_image": 4})).is_none());
}

#[test]
fn markers_expand_as_gemma3_processor() {
    let s = gemma3_like(3);
    let out = s.expand("<user>look <boi> and <boi>!", &[3, 3]).unwrap();
    assert_eq!(out, "<user>look \n\n<boi><img><img><img><eoi>\n\n and \n\n<boi><img><img><img><eoi>\n\n!");
    let e = s.expand("<user>look <boi>", &[3, 3]).unwrap_err();
    assert!(e.contains("1 image marker(s) `<boi>` for 2 image(s)"), "{e}");
    assert_eq!(s.tokens_for(&pixels(4, 4)), Ok(3));
    assert_eq!((s.fixed_tokens(), s.min_tokens()), (Some(3), 3));
}

#[test]
fn markers_expand_as_gemma4_processor() {
    let s = gemma4_like();
    // Each image its own count; the marker is the image token itself.
    let out = s.expand("<|turn>user\ndescribe<|image|>and<|image|>please<turn|>", &[2, 1]).unwrap();
    assert_eq!(out, "<|turn>user\ndescribe<|image><|image|><|image|><image|>and<|image><|image|><image|>please<turn|>");
    assert!(s.expand("no images", &[2]).unwrap_err().contains("0 image marker(s) `<|image|>` for 1 image(s)"));
    // (H / 4 / 2) * (W / 4 / 2) per image; sizes that do not pool evenly are refused.
    assert_eq!(s.tokens_for(&pixels(8, 24)), Ok(3));
    assert_eq!(s.tokens_for(&pixels(16, 48)), Ok(12));
    assert!(s.tokens_for(&pixels(12, 24)).unwrap_err().contains("multiples of 8"));
    assert_eq!((s.fixed_tokens(), s.min_tokens()), (None, 1));
}

#[test]
fn placeholder_spans_in_prompt_order() {
    let s = gemma3_like(2);
    // Two images back to back form one run of 4.
    let ids = [1, 8, 9, 9, 7, 2, 8, 9, 9, 9, 9, 7];
    assert_eq!(s.placeholder_spans(&ids, &[2, 2, 2]).unwrap(), vec![2..4, 7..9, 9..11]);
    assert!(s.placeholder_spans(&ids, &[2, 2]).unwrap_err().contains("6 image placeholder tokens; its 2 image(s) take 4"));
    // Counts per image: 3 then 1 then 2, the last two touching.
    let ids = [1, 9, 9, 9, 7, 9, 9, 9, 7];
    assert_eq!(s.placeholder_spans(&ids, &[3, 1, 2]).unwrap(), vec![1..4, 5..6, 6..8]);
    // An image across two runs, or counts that do not end a run: refused.
    assert!(s.placeholder_spans(&ids, &[2, 4]).unwrap_err().contains("straddles"));
    assert!(s.placeholder_spans(&ids, &[4, 2]).unwrap_err().contains("straddles"));
    assert!(s.placeholder_spans(&[9, 9, 9], &[1, 1, 1]).is_ok());
    assert!(s.placeholder_spans(&[1, 2], &[]).unwrap().is_empty());
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The tiny Gemma 4 fixture against mlx-vlm 0.7.10's Gemma4Processor
/// (scripts/dev/gemma4_serve_golden.py): each chat case's rendered prompt,
/// its images preprocessed and counted by the host, expands and tokenizes
/// to mlx-vlm's ids.
#[test]
fn gemma4_fixture_expands_as_mlx_vlm() {
    let dir = repo().join("tests/fixtures/models/gemma4-vision-tiny");
    let tok = Tokenizer::from_model_dir(&dir).unwrap();
    let spec = VisionSpec::from_model_dir(&dir, Some(&tok)).unwrap().expect("the fixture takes images");
    assert_eq!(spec.placeholders, Placeholders::PooledPatches { patch: 4, pool: 2 });
    assert_eq!((spec.image_token, spec.marker.as_str()), (290, "<|image|>"));
    let golden: Value =
        serde_json::from_slice(&std::fs::read(repo().join("tests/fixtures/goldens/gemma4-vision-serve/golden.json")).unwrap()).unwrap();
    let ids = |v: &Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect() };
    for (name, case) in golden["cases"].as_object().unwrap() {
        let mut counts = Vec::new();
        for part in case["parts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap()).filter(|p| p.ends_with(".png")) {
            let bytes = std::fs::read(repo().join("tests/fixtures/images").join(part)).unwrap();
            let img = super::super::decode_image("p", &bytes, &Default::default()).unwrap();
            counts.push(spec.tokens_for(&spec.processor.preprocess("p", &img).unwrap()).unwrap());
        }
        assert_eq!(counts.iter().map(|&c| c as u64).collect::<Vec<_>>(), ids(&case["soft_tokens"]), "{name}: soft tokens");
        let expanded = spec.expand(case["prompt"].as_str().unwrap(), &counts).unwrap();
        let got: Vec<u64> = tok.encode(&expanded, false).unwrap().into_iter().map(u64::from).collect();
        assert_eq!(got, ids(&case["prompt_ids"]), "{name}: prompt ids");
        let spans = spec.placeholder_spans(&tok.encode(&expanded, false).unwrap(), &counts).unwrap();
        assert_eq!(spans.iter().map(|r| r.len()).collect::<Vec<_>>(), counts, "{name}: spans");
    }
}
