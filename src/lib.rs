//! The `afflio` command's library: the replay pipeline (JSON Lines -> engine
//! -> Parquet) shared by `replay`, `demo` and the tests, and the demo
//! traffic generator.

pub mod bench;
pub mod demo;
pub mod fraudlab;
pub mod payouts;
pub mod replay;
pub mod review;
pub mod showcase;
