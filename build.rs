//! Embeds the bundled signature set (`signatures/*.toml`) into the binary so
//! `chatwall` runs from any directory with no files beside it.
use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("signatures");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    // The bundled set is what `chatwall` runs with by default: building a
    // binary without it would ship a proxy that refuses nothing.
    assert!(
        !files.is_empty(),
        "no signature files in {}: the bundled set cannot be empty",
        dir.display()
    );
    let mut out = String::from("/// (file name, contents) of every bundled signature file.\npub static BUNDLED: &[(&str, &str)] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let _ = writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            f.display().to_string()
        );
    }
    out.push_str("];\n");
    let version = std::fs::read_to_string(dir.join("VERSION")).unwrap_or_default();
    let _ = writeln!(out, "/// The bundled set's `signatures/VERSION` stamp.\npub static BUNDLED_VERSION: &str = {:?};", version.trim());
    println!("cargo:rerun-if-changed={}", dir.join("VERSION").display());
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    std::fs::write(Path::new(&out_dir).join("bundled_signatures.rs"), out)
        .expect("OUT_DIR is writable");
}
