//! Helpers for VM tests.
