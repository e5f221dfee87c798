//! The reports (per-layer table, JSON, SVG, Markdown) and the likely causes.

use lockstep_trace::{LayerTap, TapName};

use crate::report::{self, NamedComparison, Phase};
use crate::tests::*;
use crate::*;

#[test]
fn per_layer_table_takes_the_max_per_layer() {
    let (o, r, t) = noisy("f32", 1e-5, 2e-5, "f32");
    let cmp = compare(&r, &t, Some(&o));
    let rows = cmp.per_layer();
    assert_eq!(rows.len(), LAYERS);
    for row in &rows {
        let want = cmp
            .tensors
            .iter()
            .filter(|x| x.layer() == Some(row.layer))
            .map(|x| x.stats.as_ref().unwrap().max_abs)
            .fold(0.0, f64::max);
        assert_eq!(row.ours_vs_ref, want);
        assert!(row.ref_vs_oracle.unwrap() > 0.0);
        assert!(row.ours_vs_oracle.unwrap() > 0.0);
    }
}

#[test]
fn json_has_the_top_level_fields() {
    let r = f64_trace();
    let mut t = r.clone();
    set(&mut t, "layers.1.post_norm", 2, 123.0);
    let cmp = compare(&r, &t, None);
    let ok = compare(&r, &r, None);
    let inputs = [
        NamedComparison::new("ok", ok),
        NamedComparison::new("broken", cmp),
    ];
    let v: serde_json::Value = serde_json::from_str(&report::json(&inputs)).unwrap();
    assert_eq!(v["first_divergence"], "layers.1.post_norm");
    assert_eq!(v["passed"], false);
    assert_eq!(v["tier"], "f64");
    assert_eq!(v["inputs"].as_array().unwrap().len(), 2);
    assert_eq!(v["inputs"][0]["first_divergence"], serde_json::Value::Null);
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 2 * (1 + base_tensors().len()));
    let bad = tensors
        .iter()
        .find(|x| x["input"] == "broken" && x["name"] == "layers.1.post_norm")
        .unwrap();
    assert_eq!(bad["status"], "fail");
    assert_eq!(bad["stats"]["max_abs_index"], 2);
    assert!(bad["tolerance"]["threshold"].as_f64().unwrap() > 0.0);
    assert!(bad["likely_cause"].as_str().unwrap().contains("RMSNorm"));
    assert!(v["verdict"]
        .as_str()
        .unwrap()
        .contains("first divergence at layers.1.post_norm"));
}

#[test]
fn svg_is_well_formed() {
    let (o, r, t) = noisy("f32", 1e-5, 2e-5, "f32");
    let cmp = compare(&r, &t, Some(&o));
    let svg = report::svg_per_layer(
        "per-layer error <f32> & co",
        &[NamedComparison::new("a", cmp)],
    );
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    balanced_tags(&svg).unwrap();
    assert_eq!(svg.matches("class=\"series\"").count(), 3);
    assert!(svg.contains("data-series=\"ours vs reference\""));
    assert!(svg.contains("data-series=\"reference vs oracle (noise floor)\""));
    assert!(svg.contains("&lt;f32&gt; &amp; co"));
    assert!(svg.contains(">1e-5<") || svg.contains(">1e-6<"), "{svg}");

    // No oracle: one series; identical traces (all zeros) and no layers also render.
    let r = f64_trace();
    let mut t = r.clone();
    set(
        &mut t,
        "layers.1.k",
        0,
        get(&r, "layers.1.k", 0) + f64::INFINITY,
    );
    for c in [compare(&r, &r, None), compare(&r, &t, None)] {
        let svg = report::svg_per_layer("x", &[NamedComparison::new("a", c)]);
        balanced_tags(&svg).unwrap();
        assert_eq!(svg.matches("<polyline class=\"series\"").count(), 1);
        for pts in svg.split("points=\"").skip(1) {
            let pts = &pts[..pts.find('"').unwrap()];
            for xy in pts.split_whitespace().flat_map(|p| p.split(',')) {
                assert!(xy.parse::<f64>().unwrap().is_finite(), "{svg}");
            }
        }
    }
    let svg = report::svg_per_layer("empty", &[]);
    balanced_tags(&svg).unwrap();
}

#[test]
fn markdown_reports_read_well() {
    let (o, r, t) = noisy("bf16", 0.05, 0.04, "bf16");
    let good = compare(&r, &t, Some(&o));
    let r64 = f64_trace();
    let mut t64 = r64.clone();
    set(&mut t64, "layers.0.q_rope", 1, 0.0);
    let bad = compare(&r64, &t64, None);
    let md = report::markdown(&[
        NamedComparison::new("bf16 prompt", good.clone()),
        NamedComparison::new("f64 prompt", bad.clone()),
    ]);
    assert!(md.contains("| Input | Tokens | Shape | Max abs difference | Tolerance | Status |"));
    assert!(md.contains("rounding drift within noise"));
    assert!(md.contains("bug: first divergence at layers.0.q_rope: RoPE"));
    assert!(md.contains("Per-layer error"));
    assert!(md.contains("Ref vs oracle (noise floor)"));
    assert!(md.contains("Top-5 overlap"));
    assert!(md.contains("**Worst case**"));
    assert!(md.contains("**First divergence:** `layers.0.q_rope`"));

    let phases = vec![
        Phase::pass("tokenization", "47/47 cases give identical ids"),
        Phase::fail("weights", "1 tensor differs")
            .with_details("- `lm_head.weight`: checksum differs"),
        Phase::from_comparisons("multi-token forward", vec![NamedComparison::new("p1", bad)]),
        Phase::from_comparisons("attention weights", vec![NamedComparison::new("p2", good)]),
        Phase::skip("layer-by-layer", "no oracle given"),
    ];
    let md = report::phased_markdown("lockstep verify", "Qwen2 test model, 3 layers", &phases);
    assert!(md.starts_with("# lockstep verify"));
    assert!(md.contains(
        "**Overall: FAIL** — 2 of 4 phase(s) failed: weights, multi-token forward (1 skipped)."
    ));
    assert!(md.contains("| 1 | tokenization | **PASS** |"));
    assert!(md.contains("| 5 | layer-by-layer | **SKIP** |"));
    assert!(md.contains("## 3. multi-token forward — FAIL"));
    assert!(md.contains("### Input `p1` — FAIL"));
    // Shortest first: the failures (with where and why) before the phase sections; per-tensor
    // tables only for failing inputs.
    let failures = md.find("## Failures").expect("a failures section");
    assert!(failures < md.find("## 1. tokenization").unwrap());
    assert!(md
        .contains("  - input `p1`: first divergence `layers.0.q_rope` (FAIL); likely cause: RoPE"));
    assert_eq!(md.matches("Per-tensor comparison").count(), 1, "{md}");
    assert!(md.contains("checksum differs"));
    let js: serde_json::Value =
        serde_json::from_str(&report::phased_json("v", "m", &phases)).unwrap();
    assert_eq!(js["passed"], false);
    assert_eq!(js["first_divergence"], "layers.0.q_rope");
    assert_eq!(js["phases"][4]["status"], "skip");
    assert_eq!(js["schema_version"], report::SCHEMA_VERSION);
    assert_eq!(js["phases"][4]["comparisons"], serde_json::Value::Null);
    assert!(js["phases"][0]["comparisons"]
        .get("schema_version")
        .is_none());
}

#[test]
fn likely_causes_cover_every_tap() {
    assert_eq!(likely_cause("embed"), "wrong embedding table / token ids");
    assert!(likely_cause("layers.3.input_norm").contains("RMSNorm"));
    assert!(likely_cause("final_norm").contains("RMSNorm"));
    assert!(likely_cause("layers.0.v").contains("bias"));
    assert!(likely_cause("layers.0.k_rope").contains("RoPE"));
    assert!(likely_cause("layers.0.attn_probs").contains("causal mask"));
    assert!(likely_cause("layers.0.attn_out").contains("GQA"));
    assert_eq!(likely_cause("layers.0.o_proj"), "o_proj weight");
    assert_eq!(likely_cause("layers.0.out"), "residual connection");
    assert!(likely_cause("layers.0.mlp_act").contains("SiLU"));
    assert_eq!(likely_cause("layers.0.mlp_out"), "down_proj");
    assert!(likely_cause("logits").contains("lm_head"));
    for tap in LayerTap::ALL {
        assert!(!likely_cause(&TapName::Layer(0, tap).to_string()).contains("not a canonical"));
    }
}

#[test]
fn time_per_step_lists_each_step_with_its_share() {
    use crate::report::{timings_markdown, StepTime};
    assert_eq!(timings_markdown(&[]), "");
    let step = |s: &str, seconds| StepTime {
        step: s.into(),
        seconds,
    };
    let md = timings_markdown(&[step("reference | f64", 3.0), step("ours", 1.0)]);
    assert!(md.starts_with("## Where the time went"), "{md}");
    assert!(md.contains("2 steps, 4.0 s in all"), "{md}");
    // In the order run, the pipe of a name escaped so the table keeps its columns.
    assert!(md.contains("| 1 | reference \\| f64 | 3.0 | 75% |"), "{md}");
    assert!(md.contains("| 2 | ours | 1.0 | 25% |"), "{md}");
    assert!(md.find("reference").unwrap() < md.find("ours").unwrap());
}
