fn main() {
    if let Err(e) = rmlx::cli::run() {
        // One line for the user, causes joined; never a panic or a backtrace.
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}
