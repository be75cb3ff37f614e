//! The contract between a subcommand and `main`: a subcommand returns its exit code, or an error
//! that also says which exit code it ends the process with. `main` prints that error, once.
//! Imports nothing from the crate, so every subcommand can implement it.

/// An error that ends a subcommand. Its message (`Display`) is printed by `main` after the
/// program's name; [`Failure::exit_code`] is the process's exit code.
pub trait Failure: std::fmt::Display {
    fn exit_code(&self) -> i32;
}
