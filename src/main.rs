//! Entry point: everything is wired in [`session_gateway::cli`].

fn main() {
    std::process::exit(session_gateway::cli::main());
}
