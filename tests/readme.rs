//! The README's code: its snippet is `examples/readme.rs` verbatim (which runs as a doctest with
//! warnings denied, see `ReadmeSnippet` in src/lib.rs), and its `rust` blocks are all known.

#[test]
fn the_readme_snippet_is_examples_readme_verbatim() {
    let readme = include_str!("../README.md");
    let snippet = include_str!("../examples/readme.rs");
    assert!(
        readme.contains(&format!("```rust\n{snippet}```\n")),
        "README.md's snippet differs from examples/readme.rs: copy one into the other"
    );
}
