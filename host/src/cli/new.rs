//! `ferry new NAME --lang rust|js|python`: a new service folder from the templates built into
//! the binary (`host/templates/`): the WIT, a minimal service (one command, one event, a
//! projection, a view), its scenarios for `ferry test`, and a README saying how to build it. The
//! JavaScript and Python tool versions are the ones Ferry's own twins are built and tested with.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::store::validate_service_name;

/// The language of a new service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Js,
    Python,
}

const WIT: &str = include_str!("../../../wit/service.wit");
const SCENARIOS: &str = include_str!("../../templates/scenarios.toml");
const RUST: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    ("README.md", include_str!("../../templates/rust/README.md")),
    (".gitignore", include_str!("../../templates/rust/gitignore")),
];
const JS: &[(&str, &str)] = &[
    ("app.js", include_str!("../../templates/js/app.js")),
    ("README.md", include_str!("../../templates/js/README.md")),
    (".gitignore", include_str!("../../templates/js/gitignore")),
];
const PYTHON: &[(&str, &str)] = &[
    ("app.py", include_str!("../../templates/python/app.py")),
    (
        "README.md",
        include_str!("../../templates/python/README.md"),
    ),
    (
        ".gitignore",
        include_str!("../../templates/python/gitignore"),
    ),
];
/// The pins Ferry's own JavaScript and Python services are built with.
const JS_TOOLS: &str = include_str!("../../../guests/js/package.json");
const PYTHON_TOOLS: &str = include_str!("../../../guests/python/requirements.txt");

/// The component a new service's build writes, relative to its folder.
pub fn component_path(name: &str, lang: Lang) -> String {
    match lang {
        Lang::Rust => format!(
            "target/wasm32-wasip2/release/{}.wasm",
            name.replace('-', "_")
        ),
        Lang::Js | Lang::Python => format!("{name}.wasm"),
    }
}

/// Writes the service folder `parent/NAME`; refuses a name that is not a service name and a
/// folder that exists.
pub fn write_service(parent: &Path, name: &str, lang: Lang) -> anyhow::Result<PathBuf> {
    validate_service_name(name)?;
    let folder = parent.join(name);
    anyhow::ensure!(
        !folder.exists(),
        "{} exists already; pick another name or folder",
        folder.display()
    );
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{component}}", &component_path(name, lang))
    };
    let mut files: Vec<(String, String)> = match lang {
        Lang::Rust => RUST,
        Lang::Js => JS,
        Lang::Python => PYTHON,
    }
    .iter()
    .map(|(path, text)| ((*path).to_owned(), fill(text)))
    .collect();
    files.push(("scenarios.toml".into(), fill(SCENARIOS)));
    files.push(("wit/service.wit".into(), WIT.to_owned()));
    match lang {
        Lang::Rust => {}
        Lang::Js => files.push(("package.json".into(), js_package(name)?)),
        Lang::Python => files.push(("requirements.txt".into(), python_requirements())),
    }
    for (path, text) in files {
        let path = folder.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(folder)
}

/// `package.json` with the componentize-js Ferry's JavaScript twin is built with.
fn js_package(name: &str) -> anyhow::Result<String> {
    let mut package: serde_json::Value =
        serde_json::from_str(JS_TOOLS).context("the built-in package.json")?;
    package["name"] = name.into();
    package["description"] = format!("The {name} service: a Ferry service component").into();
    Ok(serde_json::to_string_pretty(&package)? + "\n")
}

/// `requirements.txt` with the componentize-py Ferry's Python twin is built with.
fn python_requirements() -> String {
    let pins: Vec<&str> = PYTHON_TOOLS
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .collect();
    format!(
        "# The pinned tool that builds this service into a component\n{}\n",
        pins.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_with_the_name_filled_in() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (lang, name, expected) in [
            (Lang::Rust, "tally-rs", vec!["Cargo.toml", "src/lib.rs"]),
            (Lang::Js, "tally-js", vec!["app.js", "package.json"]),
            (Lang::Python, "tally-py", vec!["app.py", "requirements.txt"]),
        ] {
            let folder = write_service(dir.path(), name, lang).expect("written");
            for file in expected
                .iter()
                .chain(&["README.md", "scenarios.toml", "wit/service.wit"])
            {
                let text = std::fs::read_to_string(folder.join(file)).expect(file);
                assert!(!text.contains("{{"), "{file} of {name} keeps a placeholder");
            }
            let scenarios = std::fs::read_to_string(folder.join("scenarios.toml")).expect("read");
            assert!(scenarios.contains(&format!("stream = \"{name}:command.a\"")));
            assert!(crate::scenario::read_file(&folder.join("scenarios.toml")).is_ok());
        }
        let package = std::fs::read_to_string(dir.path().join("tally-js/package.json"))
            .expect("package.json");
        assert!(package.contains("\"name\": \"tally-js\""));
        assert!(package.contains("@bytecodealliance/componentize-js"));
        let requirements = std::fs::read_to_string(dir.path().join("tally-py/requirements.txt"))
            .expect("requirements");
        assert!(requirements.contains("componentize-py=="));
    }

    #[test]
    fn refuses_a_bad_name_and_an_existing_folder() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(write_service(dir.path(), "9lives", Lang::Rust).is_err());
        assert!(write_service(dir.path(), "a.b", Lang::Rust).is_err());
        write_service(dir.path(), "once", Lang::Rust).expect("written");
        let again = write_service(dir.path(), "once", Lang::Js).expect_err("exists");
        assert!(again.to_string().contains("exists already"), "{again}");
    }
}
