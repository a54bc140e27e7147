//! README.md's table of supported architectures and formats is what
//! `rmlx plugins --markdown` prints over the built plugins (between the
//! `plugins-table` markers). `RMLX_BLESS=1` rewrites it.
mod common;

const BEGIN: &str = "<!-- plugins-table:begin (generated: rmlx plugins --markdown) -->\n";
const END: &str = "<!-- plugins-table:end -->";

#[test]
fn readme_table_is_rmlx_plugins_markdown() {
    let out = std::process::Command::new(common::rmlx_bin())
        .args(["plugins", "--markdown", "--plugins"])
        .arg(common::plugins_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    for key in ["`llama`", "`qwen3`", "`affine`"] {
        assert!(table.contains(key), "{key} missing from:\n{table}");
    }
    assert!(table.starts_with("| Kind | Key | Provided by |\n|---|---|---|\n"), "{table}");
    let path = common::repo().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let start = readme.find(BEGIN).expect("README.md has no plugins-table:begin marker") + BEGIN.len();
    let end = start + readme[start..].find(END).expect("README.md has no plugins-table:end marker");
    if std::env::var_os("RMLX_BLESS").is_some() {
        std::fs::write(&path, format!("{}{table}{}", &readme[..start], &readme[end..])).unwrap();
        return;
    }
    assert_eq!(
        &readme[start..end],
        table,
        "README.md's table differs from `rmlx plugins --markdown`: run RMLX_BLESS=1 cargo test -p rmlx --test readme_plugins"
    );
}
