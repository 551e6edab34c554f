//! Model resolution lives in kiln-load (below the trainer, so every command shares it); this
//! module keeps the names the trainer and older callers use.

pub use kiln_load::{
    check_init_compatible, load_tokenizer, load_weights, resolve_kiln, KilnRun, LoadedWeights,
    ModelFormat, ResolvedModel,
};
