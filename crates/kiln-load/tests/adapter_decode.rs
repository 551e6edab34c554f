//! An unmerged adapter on a quantised base decodes the same whether the base's Q|K|V and
//! gate|up stay stacked (`fuse_for_decoding`, what `kiln generate --adapter` runs) or run apart.

use candle_core::{DType, Device};
use kiln_load::{load_llama, Weights};
use kiln_model::{CausalLm, KvCache, LoraSpec, Params};
use kiln_testutil::{assert_close, Tol};

#[test]
fn stacked_base_projections_with_an_adapter_decode_like_separate_ones() {
    let cpu = Device::Cpu;
    let (mut apart, cfg, _) =
        load_llama(&kiln_testutil::smollm2_gguf(), Weights::default(), &cpu).unwrap();
    let spec = LoraSpec::all_projections(8, 16.0);
    let adapters = Params::lora_adapters(&cfg, &spec, 3, &cpu, DType::F32).unwrap();
    for (i, name) in adapters.adapter_names().into_iter().enumerate() {
        if name.ends_with("lora_B.weight") {
            let t = adapters.tensor(&name).unwrap();
            let b = kiln_testutil::uniform_tensor(i as u64, t.dims(), DType::F32).unwrap();
            adapters.set(&name, &(b * 0.05).unwrap()).unwrap();
        }
    }
    apart.attach_lora(&adapters, &spec).unwrap();
    let (mut stacked, _, _) =
        load_llama(&kiln_testutil::smollm2_gguf(), Weights::default(), &cpu).unwrap();
    stacked.attach_lora(&adapters, &spec).unwrap();
    stacked.fuse_for_decoding();
    let prompt = [1u32, 504, 2365, 282, 4649, 314];
    let (mut ca, mut cs) = (KvCache::new(), KvCache::new());
    let mut la = apart.prefill_row(0, &prompt, &mut ca).unwrap();
    let mut ls = stacked.prefill_row(0, &prompt, &mut cs).unwrap();
    for step in 0..6 {
        assert_close(&format!("step {step}"), &ls, &la, Tol::MODEL_F32);
        let next = la
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        la = apart.decode_step(&[0], &[next], &mut ca).unwrap();
        ls = stacked.decode_step(&[0], &[next], &mut cs).unwrap();
    }
}
