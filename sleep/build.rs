//! kip-sleep brings its own program start (origin's `_start`) and links nothing else: no C
//! runtime start files, fully static, not position-independent (nothing would relocate it).
fn main() {
    for arg in ["-nostartfiles", "-static", "-no-pie"] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
