//! `idemgate-server config check FILE` gives the filter's own verdict before deployment.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn check(json: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("idemgate-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!(
        "{:x}.json",
        json.len() * 31 + json.bytes().map(usize::from).sum::<usize>()
    ));
    std::fs::write(&file, json).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate-server"))
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_demo_configuration_is_valid() {
    let demo = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../envoy/demo-filter.json"
    ))
    .unwrap();
    let (ok, text) = check(&demo);
    assert!(ok, "{text}");
    assert!(text.contains("route payments"), "{text}");
    assert!(text.contains("key required"), "{text}");
}

#[test]
fn a_bad_configuration_names_the_field_and_fails() {
    for (json, field) in [
        (
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"ttl_s":0}]}"#,
            "routes[0].ttl_s",
        ),
        (
            r#"{"store":{"cluster":""},"routes":[{"name":"a","match":{"path":"/a"}}]}"#,
            "store.cluster",
        ),
        (
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"lock_ttl":5}]}"#,
            "routes[0].lock_ttl",
        ),
        (
            r#"{"store":{"cluster":"s"},"routes":[{"name":"a","match":{"path":"/a"},"key":"maybe"}]}"#,
            "routes[0].key",
        ),
    ] {
        let (ok, text) = check(json);
        assert!(!ok, "{json} should fail");
        assert!(text.contains(&format!("field `{field}`")), "{text}");
    }
}
