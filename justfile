# The everyday commands; each calls the same cargo xtask that works without just.

demo *ARGS:
    cargo xtask demo {{ARGS}}

test *ARGS:
    cargo xtask test {{ARGS}}

bench *ARGS:
    cargo xtask bench {{ARGS}}

lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
