//! Error paths of the `away` binary print each cause once: library errors leave their
//! cause to `source()` and main.rs prints the chain (`{err:#}`). Root-free.

use std::path::Path;
use std::process::Command;

/// Run `away ARGS`, expect a failure, return the `error: …` text of stderr.
fn away_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_away"))
        .args(args)
        // nothing of the caller's environment may change the paths below
        .env_remove("AWAY_BROKER_DB")
        .env("RUST_LOG", "off")
        .output()
        .expect("run away");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "away {args:?} succeeded: {stderr}");
    let error = stderr.lines().filter(|l| l.starts_with("error: ")).collect::<Vec<_>>().join("\n");
    assert!(!error.is_empty(), "away {args:?}: no error line in {stderr:?}");
    error
}

/// No link of the chain is printed twice, and `cause` (the root cause) is there once.
fn assert_each_cause_once(error: &str, cause: &str) {
    assert_eq!(error.matches(cause).count(), 1, "{cause:?} once in {error:?}");
    assert!(error.matches("os error").count() <= 1, "one OS error: {error:?}");
    let links: Vec<&str> = error.trim_start_matches("error: ").split(": ").map(str::trim).collect();
    for (i, link) in links.iter().enumerate() {
        assert!(link.len() < 4 || !links[i + 1..].iter().any(|l| l.contains(link)), "{link:?} twice in {error:?}");
    }
}

#[test]
fn image_inspect_of_a_missing_tar() {
    let error = away_fails(&["image", "inspect", "/away-missing-dir/missing.tar"]);
    assert!(error.contains("/away-missing-dir/missing.tar"), "names the input: {error}");
    assert_each_cause_once(&error, "No such file or directory");
}

#[test]
fn image_inspect_of_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let error = away_fails(&["image", "inspect", path(dir.path())]);
    assert!(error.contains(path(dir.path())), "names the input: {error}");
    assert_each_cause_once(&error, "Is a directory");
}

#[test]
fn image_build_copying_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Containerfile"), "FROM scratch\nCOPY missing /x\n").unwrap();
    let out = dir.path().join("out");
    let error = away_fails(&["image", "build", path(dir.path()), "-o", path(&out)]);
    assert!(error.contains("Containerfile:2"), "names the recipe line: {error}");
    assert_each_cause_once(&error, "No such file or directory");
}

#[test]
fn broker_whose_database_directory_cannot_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let db = file.join("sub").join("broker.db");
    let error =
        away_fails(&["broker", "--listen", "127.0.0.1:0", "--db", path(&db), "--join-token", "j", "--user-token", "u"]);
    // the CA's directory beside the database is made first
    assert!(error.contains("cannot create directory") && error.contains("a-file/sub"), "{error}");
    assert_each_cause_once(&error, "os error");
}

#[test]
fn broker_whose_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let db = dir.path().join("broker.db");
    let error = away_fails(&["broker", "--listen", &addr, "--db", path(&db), "--join-token", "j", "--user-token", "u"]);
    assert!(error.contains(&addr), "names the address: {error}");
    assert_each_cause_once(&error, "Address already in use");
}

#[test]
fn run_of_a_bad_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(&spec, "name: x\nimage: y\nresources:\n  memroy: 1G\n").unwrap();
    let error = away_fails(&["run", path(&spec)]);
    assert_each_cause_once(&error, "unknown field `memroy`");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}
