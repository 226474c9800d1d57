//! Output helpers shared by the commands: every command prints a table for
//! people and, with `--json`, one JSON document for scripts.

use serde::Serialize;

/// Print `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
