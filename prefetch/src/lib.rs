//! Prefetch logic shared by the client and the trace tools: access streams and trace files
//! (`trace`), file-type detection (`filetype`), the model's input features (`features`),
//! predictors behind one trait (`predict`), and the replay model that judges them (`replay`).

pub mod features;
pub mod filetype;
mod lru;
pub mod model;
pub mod predict;
pub mod replay;
pub mod select;
pub mod trace;

pub use predict::{EXTRA_HEURISTICS, HEURISTICS, Predictor, Read, all_heuristics, by_name};
pub use replay::{ReplayConfig, Score, replay};
pub use trace::{Access, Op, Trace};
