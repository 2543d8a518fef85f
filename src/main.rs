//! Entry point: everything is wired in [`session_gateway::cli`].

/// mimalloc instead of the system allocator: glibc's malloc and free were
/// about a quarter of the instructions of a proxied request with a session
/// (callgrind), and a session read adds several allocations of a
/// kilobyte and more (the value, the `X-Session` header, the upstream
/// request head).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(session_gateway::cli::main());
}
