//! The bundle: one compressed, versioned file with everything a boot needs (kernel, root
//! filesystem, openshell-init, manifest), what a user downloads. xtask writes it (`pack`,
//! feature `bundle-write`); the host checks, unpacks and reuses it (`unpack`, `install`).
//! The format and its checks: docs/bundle.md.

pub mod error;
pub mod install;
pub mod manifest;
pub mod owners;
#[cfg(feature = "bundle-write")]
pub mod pack;
pub mod root;
pub mod tar;
pub mod unpack;

#[cfg(all(test, feature = "bundle-write"))]
mod tests;
