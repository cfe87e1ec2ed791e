//! Front end of the project's figures, `benches/figures.rs`:
//! `cargo run --release --example bench [FILTER]` prints the same JSON lines as
//! `cargo bench --bench figures [-- FILTER]`.

#[path = "../benches/figures.rs"]
mod figures;

fn main() {
    figures::run(std::env::args().nth(1));
}
