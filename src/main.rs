// mimalloc: the proxy allocates per request (pingora's header maps and
// buffers); glibc malloc took ~18% of a pass-through's CPU in bench/ profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(gimlet::cli::main());
}
