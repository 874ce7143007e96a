//! The Wasm runtime on its own: loading, validation and the precompiled-code cache.

mod support;

use ferry::wasm::{Limits, LoadError, Runtime};

fn cached_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    files.sort();
    files
}

#[test]
fn caches_precompiled_code_by_content_hash() {
    let cache = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(support::guest("counter")).expect("component");
    let runtime = Runtime::new(Some(cache.path().to_path_buf())).expect("runtime");
    let first = runtime.load(&bytes, Limits::default()).expect("load");
    let files = cached_files(cache.path());
    assert_eq!(files.len(), 1);
    let name = files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(first.hash()),
        "{name} is keyed by the content hash"
    );

    // A second runtime (a restart) reads the same file instead of compiling again.
    let written = std::fs::metadata(&files[0])
        .expect("meta")
        .modified()
        .expect("mtime");
    let again = Runtime::new(Some(cache.path().to_path_buf()))
        .expect("runtime")
        .load(&bytes, Limits::default())
        .expect("load from cache");
    assert_eq!(again.manifest(), first.manifest());
    assert_eq!(
        std::fs::metadata(&files[0])
            .expect("meta")
            .modified()
            .expect("mtime"),
        written,
        "the cached code was used, not rewritten"
    );

    // Other bytes, another entry.
    let chaos = std::fs::read(support::guest("chaos")).expect("component");
    runtime.load(&chaos, Limits::default()).expect("load");
    assert_eq!(cached_files(cache.path()).len(), 2);
}

#[test]
fn recompiles_when_the_cached_code_is_damaged() {
    let cache = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(support::guest("counter")).expect("component");
    let runtime = Runtime::new(Some(cache.path().to_path_buf())).expect("runtime");
    runtime.load(&bytes, Limits::default()).expect("load");
    let file = cached_files(cache.path()).remove(0);
    std::fs::write(&file, b"damaged").expect("damage");
    let loaded = Runtime::new(Some(cache.path().to_path_buf()))
        .expect("runtime")
        .load(&bytes, Limits::default())
        .expect("compiled again");
    assert_eq!(loaded.manifest().name, "counter");
    assert!(
        std::fs::read(&file).expect("read").len() > 1000,
        "the entry was rewritten"
    );
}

#[test]
fn refuses_components_that_are_not_services() {
    let runtime = Runtime::new(None).expect("runtime");
    let other = std::fs::read(support::guest("not_a_service")).expect("component");
    match runtime.load(&other, Limits::default()) {
        Err(LoadError::World(reason)) => {
            assert!(reason.contains("ferry:service/handler@0.1.0"), "{reason}")
        }
        other => panic!("expected a world error, got {other:?}"),
    }
    let greedy = std::fs::read(support::guest("greedy")).expect("component");
    match runtime.load(&greedy, Limits::default()) {
        Err(LoadError::Import(reason)) => {
            assert!(reason.contains("test:greedy/socket"), "{reason}")
        }
        other => panic!("expected an import error, got {other:?}"),
    }
    match runtime.load(b"\0asm\x01\0\0\0", Limits::default()) {
        Err(LoadError::Compile(_)) => {}
        other => panic!("a core module is not a component: {other:?}"),
    }
}
