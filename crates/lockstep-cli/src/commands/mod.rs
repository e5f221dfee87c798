//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod common;
pub mod compare;
pub mod generate;
pub mod reference;
pub mod selftest;
pub mod serve;
pub mod tokenize;
pub mod trace;
pub mod verify;
pub mod verify_endpoint;
