//! The filter configuration's JSON Schema (`filter/idemgate-filter.schema.json`, generated
//! from the config types by `cargo xtask schema`): every stack checks its filter
//! configuration against it before Envoy starts, so the schema users validate with accepts
//! what the tests run.

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::bins::workspace_root;

/// Where the committed schema lives, relative to the workspace root.
pub const SCHEMA_PATH: &str = "filter/idemgate-filter.schema.json";

/// The committed schema file.
pub fn schema_file() -> PathBuf {
    workspace_root().join(SCHEMA_PATH)
}

/// The committed schema, parsed.
///
/// # Errors
/// The file is missing or is not JSON.
pub fn committed_schema() -> Result<Value> {
    let path = schema_file();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn validator() -> Result<&'static jsonschema::Validator> {
    static VALIDATOR: OnceLock<std::result::Result<jsonschema::Validator, String>> =
        OnceLock::new();
    VALIDATOR
        .get_or_init(|| {
            let schema = committed_schema().map_err(|e| format!("{e:#}"))?;
            jsonschema::validator_for(&schema)
                .map_err(|e| format!("{} is not a valid JSON Schema: {e}", SCHEMA_PATH))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// Checks a filter configuration against the committed schema.
///
/// # Errors
/// The schema cannot be loaded, or the configuration does not validate (every violation,
/// with its JSON Pointer).
pub fn check_filter_config(config: &Value) -> Result<()> {
    let errors: Vec<String> = validator()?
        .iter_errors(config)
        .map(|e| format!("at `{}`: {e}", e.instance_path()))
        .collect();
    if !errors.is_empty() {
        bail!(
            "the filter configuration does not validate against {SCHEMA_PATH} (regenerate it with `cargo xtask schema` if the config types changed):\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(())
}
