//! The executor's PPO loss against TRL's `PPOTrainer.loss` in PyTorch (`fixtures/ppo/make.py`):
//! log-probabilities of taken tokens for the policy and a frozen reference, a value head, the
//! clipped policy and value losses over response tokens, their reported parts, and the
//! gradients of every trained weight.

use kiln_compiler::graph::{DType, Graph, InputKind, LayerKind, Layout, Op, ParamRef, ParamRole};
use kiln_compiler::plan::sharding::RankOps;
use kiln_runtime::exec::precision::Format;
use kiln_runtime::exec::{forward_backward, Batch, Params, Segment};
use kiln_runtime::store::safetensors::read_safetensors;
use kiln_runtime::tensor::HostTensor;
use std::path::Path;

mod common;
use common::relative_l2;

fn ints(t: &HostTensor) -> Vec<Vec<i64>> {
    t.data
        .chunks(t.shape[1])
        .map(|row| row.iter().map(|&x| x as i64).collect())
        .collect()
}

#[test]
fn ppo_loss_matches_trl() {
    let fx = read_safetensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ppo/ppo.safetensors"),
    )
    .expect("the PPO fixture");
    let (vocab, hidden) = (fx["lm"].shape[0] as u64, fx["lm"].shape[1] as u64);
    let (batch, seq) = (fx["taken"].shape[0] as u64, fx["taken"].shape[1] as u64);
    let mut g = Graph::new(batch, seq, DType::F32);
    let layer = g.add_layer("head", LayerKind::Embedding);
    let table = g.add_param("table", vec![vocab, hidden], ParamRole::Embedding, layer);
    let lm = g.add_param("lm", vec![vocab, hidden], ParamRole::Weight, layer);
    let reference = g.add_param("ref", vec![vocab, hidden], ParamRole::Weight, layer);
    g.params[reference].trainable = false;
    let v_w = g.add_param("v_w", vec![1, hidden], ParamRole::Weight, layer);
    let v_b = g.add_param("v_b", vec![1], ParamRole::Bias, layer);
    let ids = g.add_input("input_ids", InputKind::TokenIds, vec![batch, seq], layer);
    let x = g.add("embedding", Op::Embedding { table }, &[ids], layer);
    let linear = |weight, bias: Option<usize>, out| Op::Linear {
        weight: ParamRef::whole(weight),
        bias: bias.map(ParamRef::whole),
        layout: Layout::OutIn,
        in_features: hidden,
        out_features: out,
    };
    let logits = g.add("lm_head", linear(lm, None, vocab), &[x], layer);
    let ref_logits = g.add("ref.lm_head", linear(reference, None, vocab), &[x], layer);
    let values = g.add("v_head", linear(v_w, Some(v_b), 1), &[x], layer);
    let taken = g.add_input(
        "response_tokens",
        InputKind::Labels,
        vec![batch, seq],
        layer,
    );
    let logp = g.add("log_probs", Op::TokenLogProbs, &[logits, taken], layer);
    let ref_logp = g.add(
        "ref_log_probs",
        Op::TokenLogProbs,
        &[ref_logits, taken],
        layer,
    );
    let rollout = g.add_input("rollout", InputKind::Rollout, vec![batch, seq, 4], layer);
    let op = Op::PpoLoss {
        kl: 0.1,
        clip: 0.2,
        value_clip: 0.2,
        value_coef: 0.1,
    };
    let loss = g.add("loss", op, &[logp, ref_logp, values, rollout], layer);
    g.loss = Some(loss);

    let weights: Vec<HostTensor> = ["table", "lm", "ref", "v_w", "v_b"]
        .iter()
        .map(|n| fx[*n].clone())
        .collect();
    let mut b = Batch::default();
    b.ints.insert("input_ids".into(), ints(&fx["input_ids"]));
    b.ints.insert("response_tokens".into(), ints(&fx["taken"]));
    b.floats.insert("rollout".into(), fx["rollout"].clone());

    // The log-probabilities of both heads, 0 where no token is taken.
    let ops = RankOps::default();
    let params = Params::new(&g, &weights, Format::F32).unwrap();
    let forward =
        Segment::forward(&g, &params, &b, &ops, &g.topo_order(), Vec::new(), None).unwrap();
    for (node, name) in [(logp, "log_probs"), (ref_logp, "ref_log_probs")] {
        let got = forward.value(node).unwrap().to_host().unwrap();
        let err = relative_l2(&got.data, &fx[name].data);
        assert!(err < 1e-6, "{name}: relative L2 {err:e}");
    }
    drop(forward);

    let out = forward_backward(&g, &weights, &b, Format::F32).unwrap();
    let want = fx["loss"].data[0];
    assert!(
        (out.loss - want).abs() < 1e-6,
        "loss {} vs TRL's {want}",
        out.loss
    );
    for name in [
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "value_clip_fraction",
        "approx_kl",
    ] {
        let (got, want) = (out.stats[name], fx[name].data[0]);
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "{name}: {got} vs TRL's {want}"
        );
    }
    for (id, name) in [(table, "table"), (lm, "lm"), (v_w, "v_w"), (v_b, "v_b")] {
        let grad = out.grads[id].as_ref().expect("a trained weight's gradient");
        let err = relative_l2(grad, &fx[format!("grad.{name}").as_str()].data);
        assert!(err < 1e-5, "gradient of `{name}`: relative L2 {err:e}");
    }
    assert!(out.grads[reference].is_none(), "the reference is frozen");
}
