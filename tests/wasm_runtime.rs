//! The Wasm runtime on its own: loading, validation and the precompiled-code cache.

mod support;

use std::time::Duration;

use ferry::store::Message;
use ferry::wasm::{GuestHost, LIVE_INSTANCES, Limits, LoadError, Runtime};

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

/// A host that offers nothing; the calls below never reach it.
struct Unreachable;

impl GuestHost for Unreachable {
    fn read_stream(&mut self, _: &str, _: u64) -> Result<Vec<Message>, String> {
        Err("no store here".into())
    }
    fn view_get(&mut self, _: &str, _: &str) -> Result<Option<String>, String> {
        Err("no store here".into())
    }
    fn new_id(&mut self, name: &str) -> String {
        name.to_owned()
    }
    fn deliver_email(&mut self, _: &str, _: &str) -> Result<(), String> {
        Err("no mail here".into())
    }
    fn secret(&mut self, _: &str) -> Result<String, String> {
        Err("no secrets here".into())
    }
}

/// A full pool is back-pressure: the instance past the limit waits until one is dropped, instead
/// of failing (which would end in parking a message that did nothing wrong).
#[test]
fn an_instance_past_the_pool_limit_waits_for_a_free_one() {
    let runtime = Runtime::new(None).expect("runtime");
    if !runtime.pools_instances() {
        eprintln!("no PAGEMAP_SCAN on this kernel: instances are not pooled, nothing to fill");
        return;
    }
    let counter = runtime
        .load_file(&support::guest("counter"), Limits::default())
        .expect("counter loads");
    let mut held: Vec<_> = (0..LIVE_INSTANCES)
        .map(|_| {
            counter
                .instantiate(Box::new(Unreachable))
                .expect("instance")
        })
        .collect();
    let (done, finished) = std::sync::mpsc::channel();
    let waiting = counter.clone();
    std::thread::spawn(move || {
        let instance = waiting.instantiate(Box::new(Unreachable));
        let _ = done.send(instance.map(|mut i| i.manifest().map(|m| m.name)));
    });
    assert!(
        matches!(
            finished.recv_timeout(Duration::from_millis(300)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ),
        "an instance past the limit was created"
    );
    held.pop();
    let name = finished
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting instance is created once one is dropped");
    assert_eq!(name, Ok(Ok("counter".to_owned())));
}
