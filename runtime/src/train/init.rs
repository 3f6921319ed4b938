//! Parameter initialisation as the reference implementations initialise them, for the
//! parameters a run does not load from a checkpoint.

use crate::rng::Rng;
use crate::tensor::{param_shape, HostTensor};
use kiln_compiler::graph::{Graph, ParamRole};

/// Initial values as the reference implementations initialise them: weights N(0, 0.02), biases
/// zero, norm weights one; LoRA A kaiming-uniform U(±1/√in) and B zero (PEFT); IA3 vectors one;
/// virtual-token tables N(0, 1).
pub fn initialise(g: &Graph, seed: u64) -> Vec<HostTensor> {
    let mut rng = Rng(seed ^ 0x5EED);
    g.params
        .iter()
        .map(|p| {
            let shape = param_shape(p);
            let n: usize = shape.iter().product();
            let name = p.name.as_str();
            let data: Vec<f32> = if name.ends_with("lora_B.weight")
                || matches!(p.role, ParamRole::Bias | ParamRole::NormBias)
                || name.ends_with(".bias")
            {
                vec![0.0; n]
            } else if name.ends_with("lora_A.weight") {
                let bound = 1.0 / (shape[1] as f64).sqrt();
                (0..n)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            } else if name.ends_with("ia3_l")
                || name.ends_with("lora_magnitude_vector")
                || p.role == ParamRole::Norm
            {
                vec![1.0; n]
            } else if name == "prompt_encoder.embedding.weight" {
                (0..n).map(|_| rng.normal() as f32).collect()
            } else {
                (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
            };
            HostTensor { shape, data }
        })
        .collect()
}
