//! How `ferry test` shows its results: a line per scenario and, for a failed one, each
//! difference with the field's path, expected and actual (coloured on a terminal unless
//! `NO_COLOR` is set); `--json` prints the results for tools.

use std::io::IsTerminal as _;

use super::ScenarioResult;

/// Prints the results; with `json`, one JSON document.
pub fn print(results: &[ScenarioResult], json: bool) {
    if json {
        let passed = results.iter().filter(|r| r.passed).count();
        let answer = serde_json::json!({
            "passed": passed,
            "failed": results.len() - passed,
            "scenarios": results,
        });
        println!("{answer}");
        return;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let paint = |code: &str, text: &str| match colour {
        true => format!("\x1b[{code}m{text}\x1b[0m"),
        false => text.to_owned(),
    };
    let mut file = None;
    for result in results {
        if file != Some(&result.file) {
            println!("{}", result.file.display());
            file = Some(&result.file);
        }
        if result.passed {
            println!(
                "  {} {} ({} ms)",
                paint("32", "ok  "),
                result.name,
                result.duration_ms
            );
            continue;
        }
        println!("  {} {}", paint("31", "FAIL"), result.name);
        for difference in &result.differences {
            println!("      {}", paint("1", &difference.at));
            println!("        expected: {}", paint("32", &difference.expected));
            println!("        actual:   {}", paint("31", &difference.actual));
        }
        if !result.written.is_empty() {
            println!("      written:");
            for line in &result.written {
                println!("        {line}");
            }
        }
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    let summary = format!("{} passed, {failed} failed", results.len() - failed);
    println!(
        "{}",
        match failed {
            0 => paint("32", &summary),
            _ => paint("31", &summary),
        }
    );
}
