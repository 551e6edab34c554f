//! The model against PyTorch: logits, loss, every parameter gradient, and 5 steps of AdamW
//! with clipping, on the tiny fixture made by tests/fixtures/tiny_llama/make_tiny_llama.py.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use kiln_model::{loss_sum, Llama, ModelConfig, Params};
use kiln_testutil::{assert_close, Tol};
use kiln_train::optim::AdamW;
use kiln_train::{optimizer_step, OptimConfig};

fn fixture(name: &str) -> (ModelConfig, HashMap<String, Tensor>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_llama");
    let config_file = if name.contains("tied") {
        "config_tied.json"
    } else {
        "config.json"
    };
    let cfg: ModelConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join(config_file)).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    (cfg, tensors)
}

fn split(all: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    all.iter()
        .filter(|(k, _)| {
            !k.starts_with("fixture.") && !k.starts_with("grad.") && !k.starts_with("adamw.")
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn check_forward_and_grads(name: &str) {
    let (cfg, all) = fixture(name);
    let params = Params::from_tensors(&cfg, split(&all), name).unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let ids = all["fixture.input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let targets = &all["fixture.targets"];
    let logits = model.forward_train(&ids, None).unwrap();
    let (b, t) = ids.dims2().unwrap();
    assert_close(
        "logits",
        &logits.reshape((b, t, cfg.vocab_size)).unwrap(),
        &all["fixture.logits"],
        Tol::MODEL_F32,
    );
    let (sum, n) = loss_sum(&logits, targets).unwrap();
    let loss = (sum / n as f64).unwrap();
    assert_close("loss", &loss, &all["fixture.loss"], Tol::MODEL_F32);
    // candle's autograd through the parameter views into the flat buffer.
    let grads = params
        .autograd_grads(&loss.backward().unwrap())
        .unwrap()
        .expect("the loss depends on the parameters");
    assert_eq!(grads.len(), params.layout().len());
    for (pname, g) in grads.iter() {
        assert_close(
            &format!("grad.{pname}"),
            g,
            &all[&format!("grad.{pname}")],
            Tol::GRAD_F32,
        );
    }
}

#[test]
fn forward_loss_and_gradients_match_pytorch() {
    check_forward_and_grads("tiny_llama");
}

#[test]
fn tied_embeddings_match_pytorch() {
    check_forward_and_grads("tiny_llama_tied");
}

#[test]
fn five_adamw_steps_with_clipping_match_pytorch() {
    let (cfg, all) = fixture("tiny_llama");
    let params = Params::from_tensors(&cfg, split(&all), "fixture").unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let optim = OptimConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_clip: 1.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(&params, &optim).unwrap();
    let ids = all["fixture.input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let targets = all["fixture.targets"].flatten_all().unwrap();
    let want_losses = all["fixture.adamw_losses"].to_vec1::<f32>().unwrap();
    let want_norms = all["fixture.adamw_grad_norms"].to_vec1::<f32>().unwrap();
    for i in 0..5 {
        let r = optimizer_step(
            &model,
            &params,
            &mut opt,
            &[(ids.clone(), targets.clone())],
            optim.lr,
            optim.grad_clip,
            None,
        )
        .unwrap();
        assert!(
            (r.loss - want_losses[i] as f64).abs() < 1e-4 * (1.0 + want_losses[i].abs() as f64),
            "step {i}: loss {} vs {}",
            r.loss,
            want_losses[i]
        );
        assert!(
            (r.grad_norm - want_norms[i] as f64).abs() < 1e-3 * want_norms[i] as f64,
            "step {i}: grad norm {} vs {}",
            r.grad_norm,
            want_norms[i]
        );
    }
    for (pname, value) in params.iter() {
        // Five steps compound float differences; GRAD tier is the honest tolerance here.
        assert_close(
            &format!("adamw.{pname}"),
            value,
            &all[&format!("adamw.{pname}")],
            Tol::GRAD_F32,
        );
    }
}

#[test]
fn hand_written_backward_matches_pytorch_and_autograd() {
    for name in ["tiny_llama", "tiny_llama_tied"] {
        let (cfg, all) = fixture(name);
        let params = Params::from_tensors(&cfg, split(&all), name).unwrap();
        let model = Llama::new(&cfg, &params).unwrap();
        let ids = all["fixture.input_ids"]
            .to_dtype(candle_core::DType::U32)
            .unwrap();
        let targets = all["fixture.targets"].flatten_all().unwrap();
        let n = kiln_kernels::count_valid_targets(&targets).unwrap();
        let mut grads = model.grads(&params).unwrap();
        let sum = model
            .forward_backward(&ids, &targets, 1.0 / n as f64, &mut grads, None)
            .unwrap();
        let want = all["fixture.loss"].to_scalar::<f32>().unwrap() as f64;
        assert!(
            (sum / n as f64 - want).abs() < 1e-5,
            "{name}: loss {} vs {want}",
            sum / n as f64
        );
        assert_eq!(grads.len(), params.layout().len());
        for pname in params.names() {
            assert_close(
                &format!("{name} grad.{pname}"),
                &grads[pname],
                &all[&format!("grad.{pname}")],
                Tol::GRAD_F32,
            );
        }
    }
}

#[test]
fn hand_written_backward_with_dropout_equals_autograd() {
    let (mut cfg, all) = fixture("tiny_llama");
    cfg.dropout = 0.2;
    let params = Params::from_tensors(&cfg, split(&all), "fixture").unwrap();
    let model = Llama::new(&cfg, &params).unwrap();
    let ids = all["fixture.input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let targets = all["fixture.targets"].flatten_all().unwrap();
    let mut rng = kiln_model::SplitMix64::new(3);
    let logits = model.forward_train(&ids, Some(&mut rng)).unwrap();
    let (sum, _) = loss_sum(&logits, &targets).unwrap();
    let auto = params
        .autograd_grads(&sum.backward().unwrap())
        .unwrap()
        .unwrap();
    let mut rng = kiln_model::SplitMix64::new(3);
    let mut grads = model.grads(&params).unwrap();
    model
        .forward_backward(&ids, &targets, 1.0, &mut grads, Some(&mut rng))
        .unwrap();
    assert_eq!(grads.len(), auto.len());
    for (pname, g) in auto.iter() {
        assert_close(&format!("grad.{pname}"), &grads[pname], g, Tol::GRAD_F32);
    }
}
