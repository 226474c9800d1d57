//! Output helpers shared by the commands: every command prints a table for
//! people and, with `--json`, one JSON document for scripts.

use serde::Serialize;

/// Print `value` as pretty JSON on stdout. A reader that stops early (`| head`, `| jq -e`
/// that exits) is not an error: the rest is not wanted (`println!` would panic there).
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
