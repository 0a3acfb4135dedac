//! Integration tests of `tandemd`'s local API, its operation (shutdown) and its configuration CLI,
//! in one test binary. The API runs in-process on 127.0.0.1:0 over a fake backend; the CLI tests
//! run the real binary.

mod support;

mod api_auth;
mod api_bad_input;
mod api_cancel;
mod api_chat;
mod api_info;
mod api_queue;
mod config_cli;
mod daemon_shutdown;
