//! The OpenAPI document, fuzzed against the live server by a schema-driven fuzzer that herald
//! did not write (schemathesis, from PyPI; the test script installs it): every operation gets
//! generated valid and invalid requests, and no answer may be a `5xx`.

use crate::support::TestApp;
use std::process::Stdio;

#[tokio::test]
async fn the_openapi_document_fuzzed_against_the_live_server_finds_no_server_error() {
    let app = TestApp::spawn().await;
    // Something to find: a template, an account and a message, so ids are not all unknown.
    let template = app.inbox_template().await;
    let (s, _) = app
        .post(
            "/v1/send",
            serde_json::json!({"template_id": template, "receivers": ["u1"],
            "variables": {"name": "A"}}),
        )
        .await;
    assert_eq!(s, 202);
    let examples = std::env::var("HERALD_FUZZ_EXAMPLES").unwrap_or_else(|_| "30".into());
    let out = tokio::process::Command::new("schemathesis")
        .args([
            "run",
            concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"),
        ])
        .args(["--url", &app.url("")])
        .args(["--header", &format!("Authorization: Bearer {}", app.key)])
        .args(["--checks", "not_a_server_error"])
        .args([
            "--max-examples",
            &examples,
            "--seed",
            "20261127",
            "--workers",
            "1",
        ])
        .args(["--request-timeout", "10", "--no-color"])
        // schemathesis keeps a cache of what it found in its working directory.
        .current_dir(app.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("schemathesis is not installed: run the suite with scripts/test.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}
