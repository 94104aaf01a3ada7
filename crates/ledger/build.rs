//! Rebuild when a migration is added: `sqlx::migrate!` embeds the directory at compile time and
//! cargo does not otherwise notice new files in it (the approach sqlx documents).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
