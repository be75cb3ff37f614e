//! Instance lifecycle beyond a foreground `up`: where an instance's state lives, the lock that
//! says it runs, its state disk, and the `down`, `status`, `logs` commands, `up --detach` and
//! `up --reset`.

pub mod detach;
pub mod down;
pub mod logs;
pub mod reset;
pub mod state;
pub mod state_disk;
pub mod status;
