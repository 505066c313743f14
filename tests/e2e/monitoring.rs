//! The example alerting rules (`docs/prometheus/alerts.yml`) name only metrics herald exports.

use crate::support::TestApp;
use std::collections::HashSet;
use std::path::Path;

#[tokio::test]
async fn every_metric_the_example_alerts_use_is_exported() {
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/prometheus/alerts.yml"),
    )
    .unwrap();
    // `herald_` followed by a metric name, outside the rule names (which are CamelCase).
    let mut named = HashSet::new();
    for (i, _) in rules.match_indices("herald_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        named.insert(name);
    }
    assert!(named.len() >= 6, "{named:?}");

    let app = TestApp::spawn().await;
    let text = app.metrics_text().await;
    // Families are declared by `# TYPE <name> <kind>` even before their first sample; a
    // counter's samples end in `_total`, a histogram's in `_bucket`, `_sum` and `_count`.
    let declared: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &named {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            declared.contains(family),
            "{name} is not exported: {declared:?}"
        );
    }
    app.stop().await;
}
