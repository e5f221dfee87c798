//! One module per subcommand.

pub mod common;
pub mod tokenize;
pub mod trace;
