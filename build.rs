//! Build script: embedded migrations (`sqlx::migrate!`) are read at compile time, so the
//! crate is rebuilt when `migrations/` changes.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
