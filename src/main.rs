fn main() {
    std::process::exit(gimlet::cli::main());
}
