//! `bulwark chaos` from the binary, on bad input: a scenario file with an unknown field, a bad
//! value or a missing section is refused at load with file, line and reason (exit 2), and a run
//! of an unknown id lists the known ones (exit 2). No server is needed to refuse.

use std::process::Command;

const GOOD: &str = r#"
id = "ok_demo"
category = "layer2"
severity = 2
description = "demo"
recovery_limit_s = 10.0

[steady_state]
checks = ["services_answer"]

[[inject]]
kind = "pause_scheduler"
duration_s = 1.0

[verify]

[control]
description = "nothing"
absent = []
[[control.inject]]
kind = "pause_scheduler"
duration_s = 0.0
"#;

fn chaos(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .arg("chaos")
        .args(args)
        .arg("--scenarios")
        .arg(dir)
        .env_remove("BULWARK_CONFIG")
        .output()
        .expect("bulwark runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dir_with(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("written");
    }
    dir
}

#[test]
fn a_good_directory_lists() {
    let dir = dir_with(&[("ok_demo.toml", GOOD.to_owned())]);
    let (code, out, err) = chaos(dir.path(), &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok_demo"), "{out}");
}

#[test]
fn an_unknown_field_is_refused_with_file_line_and_reason() {
    let text = GOOD.replace("duration_s = 1.0", "duration_s = 1.0\nlength_s = 3.0");
    let dir = dir_with(&[("ok_demo.toml", text)]);
    let (code, _, err) = chaos(dir.path(), &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ok_demo.toml:"), "{err}");
    assert!(err.contains("length_s"), "{err}");
}

#[test]
fn a_bad_value_is_refused_at_its_line() {
    let text = GOOD.replace("severity = 2", "severity = 9");
    let dir = dir_with(&[("ok_demo.toml", text)]);
    let (code, _, err) = chaos(dir.path(), &["run", "ok_demo"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ok_demo.toml:4:"), "{err}");
    assert!(err.contains("severity must be 1-5, got 9"), "{err}");
}

#[test]
fn a_missing_section_is_named() {
    let text = GOOD.replace("[verify]\n", "");
    let dir = dir_with(&[("ok_demo.toml", text)]);
    let (code, _, err) = chaos(dir.path(), &["list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ok_demo.toml:"), "{err}");
    assert!(err.contains("missing field `verify`"), "{err}");
}

#[test]
fn an_unknown_id_lists_the_known_ones() {
    let dir = dir_with(&[("ok_demo.toml", GOOD.to_owned())]);
    let (code, _, err) = chaos(dir.path(), &["run", "L2_nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown scenario(s): L2_nope"), "{err}");
    assert!(err.contains("known: ok_demo"), "{err}");
}
