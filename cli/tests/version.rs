//! The binary starts and names itself. (Its presence also makes `cargo test --workspace` build the
//! `vmnest` binary that the integration suite in `tests/` runs.)

#[test]
fn version_names_the_tool() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmnest"))
        .arg("--version")
        .output()
        .expect("run vmnest");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("vmnest "), "{text}");
}
