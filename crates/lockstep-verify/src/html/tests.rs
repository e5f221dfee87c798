//! The HTML report on small synthetic traces: well-formed, escaped, one chart group per layer,
//! the first divergence highlighted.

use super::*;
use crate::report::{NamedComparison, Phase};
use crate::tests::{balanced_tags, compare, f64_trace, set, LAYERS};

#[test]
fn escapes_every_special_character() {
    assert_eq!(
        esc("<a href=\"x\">&'</a>"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
    );
}

#[test]
fn html_report_has_one_chart_group_per_layer_and_highlights_the_divergence() {
    let r = f64_trace();
    let mut t = r.clone();
    set(&mut t, "layers.1.q_rope", 1, 0.0);
    let bad = compare(&r, &t, None);
    let good = compare(&r, &r, None);
    let phases = vec![
        Phase::pass("tokenization <ok>", "47/47 & more"),
        Phase::from_comparisons(
            "forward",
            vec![NamedComparison::new("<script>x</script>", bad.clone())],
        ),
    ];
    let full = vec![(
        Tier::F64,
        vec![
            NamedComparison::new("a", good),
            NamedComparison::new("b", bad),
        ],
    )];
    let html = render(&HtmlReport {
        title: "lockstep verify <t>",
        model: "m & n",
        phases: &phases,
        full: &full,
        local: &[],
    });
    assert!(html.starts_with("<!DOCTYPE html>"));
    // Well-formed from <body> to the script (void <br> written as <br/> for the checker).
    let body = &html[html.find("<body>").unwrap()..html.find("<script>").unwrap()];
    balanced_tags(&format!("{body}</body>").replace("<br>", "<br/>")).unwrap();
    assert!(!html.contains("<script>x</script>"), "label not escaped");
    assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"));
    assert!(html.contains("lockstep verify &lt;t&gt;"));
    assert_eq!(html.matches("class=\"layer-chart\"").count(), 1);
    assert_eq!(html.matches("data-layer=\"").count(), LAYERS);
    assert_eq!(
        html.matches("class=\"layer diverge\" data-layer=\"1\"")
            .count(),
        1
    );
    assert!(html.contains("<code>layers.1.q_rope</code> — seen end to end"));
    assert!(html.contains("Likely cause:</b> RoPE"), "{html}");
    assert!(
        !html.contains("http://")
            || html.matches("http://").count()
                == html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(),
        "no external references"
    );
    assert!(!html.contains("https://"));

    let ok = compare_html(
        "compare",
        &[NamedComparison::new("a", compare(&r, &r, None))],
    );
    assert!(ok.contains("<b>No divergence</b>"));
    assert_eq!(ok.matches("data-layer=\"").count(), LAYERS);
}
