//! The executor's LSTM (P-tuning v1's prompt encoder) against torch.nn.LSTM: output and the
//! gradients of the input table and of every LSTM parameter, from `fixtures/lstm/make.py`.

use kiln_compiler::graph::{DType, Graph, InputKind, LayerKind, Op, ParamRole};
use kiln_compiler::plan::sharding::RankOps;
use kiln_runtime::exec::precision::Format;
use kiln_runtime::exec::{Batch, Params, Segment, Value};
use kiln_runtime::store::safetensors::read_safetensors;
use kiln_runtime::tensor::HostTensor;
use std::path::Path;

mod common;
use common::relative_l2;

#[test]
fn lstm_matches_torch() {
    let fixture = read_safetensors(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lstm/lstm.safetensors"),
    )
    .expect("the LSTM fixture");
    let (tokens, dim) = (fixture["table"].shape[0], fixture["table"].shape[1]);
    let (batch, hidden) = (2usize, 8usize);
    let mut g = Graph::new(batch as u64, tokens as u64, DType::F32);
    let layer = g.add_layer("embedding", LayerKind::Embedding);
    let table = g.add_param(
        "table",
        vec![tokens as u64, dim as u64],
        ParamRole::Adapter,
        layer,
    );
    let mut names = Vec::new();
    let mut params = Vec::new();
    for l in 0..2 {
        let input = if l == 0 { dim } else { 2 * hidden };
        for suffix in ["", "_reverse"] {
            for (kind, shape) in [
                ("weight_ih", vec![4 * hidden, input]),
                ("weight_hh", vec![4 * hidden, hidden]),
                ("bias_ih", vec![4 * hidden]),
                ("bias_hh", vec![4 * hidden]),
            ] {
                let name = format!("{kind}_l{l}{suffix}");
                params.push(g.add_param(
                    name.clone(),
                    shape.into_iter().map(|d| d as u64).collect(),
                    ParamRole::Adapter,
                    layer,
                ));
                names.push(name);
            }
        }
    }
    let ids = g.add_input(
        "input_ids",
        InputKind::TokenIds,
        vec![batch as u64, 1],
        layer,
    );
    let x = g.add("virtual", Op::VirtualTokens { table }, &[ids], layer);
    let lstm = g.add(
        "lstm",
        Op::Lstm {
            hidden: hidden as u64,
            layers: 2,
            bidirectional: true,
            params: params.clone(),
        },
        &[x],
        layer,
    );
    let mut values = vec![fixture["table"].clone()];
    values.extend(names.iter().map(|n| fixture[n.as_str()].clone()));
    let mut b = Batch::default();
    b.ints.insert("input_ids".into(), vec![vec![0]; batch]);
    let ops = RankOps::default();
    let params_on_device = Params::new(&g, &values, Format::F32).unwrap();
    let segment = Segment::forward(
        &g,
        &params_on_device,
        &b,
        &ops,
        &g.topo_order(),
        Vec::new(),
        None,
    )
    .unwrap();
    let out = segment.value(lstm).unwrap().to_host().unwrap();
    assert_eq!(out.shape, fixture["output"].shape);
    let err = relative_l2(&out.data, &fixture["output"].data);
    assert!(err < 1e-5, "output differs: relative L2 {err:e}");
    let upstream = Value::from_host(HostTensor::clone(&fixture["upstream"])).unwrap();
    let grads = segment.backward(&[(lstm, upstream)]).unwrap();
    let by_id: std::collections::BTreeMap<usize, Vec<f32>> = grads.params.into_iter().collect();
    let err = relative_l2(&by_id[&table], &fixture["grad.table"].data);
    assert!(err < 1e-4, "table gradient: relative L2 {err:e}");
    for (id, name) in params.iter().zip(&names) {
        let err = relative_l2(&by_id[id], &fixture[format!("grad.{name}").as_str()].data);
        assert!(err < 1e-4, "`{name}` gradient: relative L2 {err:e}");
    }
}
