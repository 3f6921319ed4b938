//! The compiled program: everything a run of one experiment needs, decided once — its lowered
//! graphs and the typed execution plan (stages, schedules, and every parameter's and value's
//! tensor-parallel layout). Back ends (`kiln run`, export, the reports) read a `Program`; none
//! lowers or plans again. Every program is checked (`check`) before it is handed out, the way
//! naga validates a module before any back end sees it.

use crate::diagnostics::{Code, Diagnostic, Diagnostics};
use crate::graph::{compile_graph, Graph};
use crate::plan::sharding::ParamLayout;
use crate::plan::{Action, ExecutionPlan, GroupAxis, Planner, Submeshes};
use crate::spec::{Experiment, Objective, OutputHead};

/// A checked, lowered and planned experiment.
#[derive(Clone, Debug)]
pub struct Program {
    pub experiment: Experiment,
    /// The trained model's graph (for PPO the policy, with its frozen reference copy inside).
    pub graph: Graph,
    /// PPO: the reward model that scores rollouts (the policy's architecture with a scalar
    /// head, as the reward stage trained it).
    pub reward_model: Option<Graph>,
    pub plan: ExecutionPlan,
}

/// Lowers and plans a checked experiment with the planner's whole search: pipeline stages may
/// run on data x tensor grids of their own (Alpa's submeshes), which the runtime executes.
pub fn compile(e: &Experiment) -> Result<Program, Diagnostics> {
    compile_with(e, Submeshes::PerStage)
}

/// Lowers and plans a checked experiment among the plans `submeshes` allows.
pub fn compile_with(e: &Experiment, submeshes: Submeshes) -> Result<Program, Diagnostics> {
    let planner = Planner::new(e, compile_graph(e)?);
    let plan = planner.plan(submeshes)?;
    let reward_model = match &e.objective {
        Objective::Ppo(_) => Some(compile_graph(&reward_model_of(e))?),
        _ => None,
    };
    let program = Program {
        experiment: e.clone(),
        graph: planner.into_graph(),
        reward_model,
        plan,
    };
    check(&program).map_err(|problem| {
        let mut d = Diagnostics::default();
        d.push(Diagnostic::new(
            Code::Internal,
            format!("the plan of `{}` is inconsistent: {problem}", e.name),
        ));
        d
    })?;
    Ok(program)
}

/// The experiment whose graph is PPO's reward model: the policy's model with a reward head and
/// no adapters, trained on chosen/rejected pairs.
fn reward_model_of(e: &Experiment) -> Experiment {
    let mut spec = e.clone();
    spec.objective = Objective::Reward {
        chosen: "chosen".into(),
        rejected: "rejected".into(),
    };
    spec.model.output_heads = vec![OutputHead::Reward];
    spec.adapters.clear();
    spec.adapter_weights.clear();
    spec
}

/// The sanity pass: every layer on one stage, the stages' devices tiling the mesh, every
/// parameter laid out consistently with its shape on its stage's groups, every collective's
/// group the size of the stages' grid, and every stage's schedule running each of its
/// microbatches forward then backward exactly once before the optimizer.
pub fn check(p: &Program) -> Result<(), String> {
    let (g, plan) = (&p.graph, &p.plan);
    let mut owner: Vec<Option<usize>> = vec![None; g.layers.len()];
    for (s, stage) in plan.stages.iter().enumerate() {
        for run in &stage.layers {
            for l in run.layers.clone() {
                let slot = owner
                    .get_mut(l)
                    .ok_or_else(|| format!("stage {s} names layer {l}, which the graph lacks"))?;
                if slot.replace(s).is_some() {
                    return Err(format!("layer `{}` is on two stages", g.layers[l].name));
                }
            }
        }
    }
    if let Some(l) = owner.iter().position(Option::is_none) {
        return Err(format!("layer `{}` is on no stage", g.layers[l].name));
    }
    // Every stage's replicas split the same microbatches, which make up the batch.
    let rows = |stage: &crate::plan::Stage| stage.submesh.data * stage.micro_batch;
    for (s, stage) in plan.stages.iter().enumerate() {
        if rows(stage) * plan.strategy.microbatches != plan.strategy.global_batch {
            return Err(format!(
                "stage {s}'s {} replicas of {} rows over {} microbatches do not make the batch of {}",
                stage.submesh.data, stage.micro_batch, plan.strategy.microbatches, plan.strategy.global_batch
            ));
        }
    }
    let mut next_device = 0;
    for (s, stage) in plan.stages.iter().enumerate() {
        let grid = stage.submesh;
        if stage.devices.start != next_device
            || stage.devices.end - stage.devices.start != grid.devices()
        {
            return Err(format!(
                "stage {s}'s devices {:?} do not follow the previous stage's or hold its {} x {} grid",
                stage.devices, grid.data, grid.tensor
            ));
        }
        next_device = stage.devices.end;
        check_layout(g, s, stage.submesh.tensor as usize, &stage.layout)?;
    }
    if next_device != plan.mesh.devices {
        return Err(format!(
            "the stages hold {next_device} of the mesh's {} devices",
            plan.mesh.devices
        ));
    }
    for c in &plan.collectives {
        let stages: Vec<usize> = match &c.group.stages {
            Some(list) => list.iter().map(|&s| s as usize).collect(),
            None => (0..plan.stages.len()).collect(),
        };
        for s in stages {
            let grid = plan
                .stages
                .get(s)
                .ok_or_else(|| {
                    format!(
                        "collective `{}` names stage {s}, which the plan lacks",
                        c.kind
                    )
                })?
                .submesh;
            let size = match c.group.axis {
                GroupAxis::Tensor => grid.tensor,
                GroupAxis::Data => grid.data,
                GroupAxis::Pipeline => 2,
            };
            if size != c.group_size {
                return Err(format!(
                    "collective `{}` runs among {} devices but stage {s}'s group has {size}",
                    c.kind, c.group_size
                ));
            }
        }
    }
    if plan.schedule.len() != plan.stages.len() {
        return Err("the schedule does not list every stage".into());
    }
    for (s, schedule) in plan.schedule.iter().enumerate() {
        check_schedule(
            s,
            plan.strategy.microbatches as usize,
            schedule.chunks as usize,
            &schedule.actions,
        )?;
    }
    Ok(())
}

/// Every parameter's split tiles its shape.
fn check_layout(
    g: &Graph,
    stage: usize,
    size: usize,
    layout: &crate::plan::sharding::TensorLayout,
) -> Result<(), String> {
    if layout.size != size
        || layout.params.len() != g.params.len()
        || layout.forms.len() != g.dag.node_count()
    {
        return Err(format!(
            "stage {stage}'s layout is not of its graph and group"
        ));
    }
    for (p, placed) in g.params.iter().zip(&layout.params) {
        let ParamLayout::Shard { axis, sections } = placed else {
            continue;
        };
        let whole = p.shape.get(*axis).copied().unwrap_or(0) as usize;
        // A section need not divide by the group (a vocabulary of 50257 rows over 8 ranks, or
        // BERT's two token types over 4): ranks then hold shares that differ by a row.
        if sections.is_empty() || sections.iter().sum::<usize>() != whole {
            return Err(format!(
                "`{}` ({:?}) is split along axis {axis} in sections {sections:?}, which do not tile it over {size} ranks",
                p.name, p.shape
            ));
        }
    }
    Ok(())
}

/// Each (microbatch, chunk) runs forward once and, later, backward once; the optimizer step
/// comes after every backward pass.
fn check_schedule(
    stage: usize,
    microbatches: usize,
    chunks: usize,
    actions: &[Action],
) -> Result<(), String> {
    let mut forward = vec![0u32; microbatches * chunks];
    let mut backward = vec![0u32; microbatches * chunks];
    let mut stepped = false;
    for a in actions {
        let (backwards, mb, chunk) = match *a {
            Action::Forward { mb, chunk } => (false, mb, chunk),
            Action::Backward { mb, chunk } => (true, mb, chunk),
            Action::Optimizer => {
                stepped = true;
                continue;
            }
            _ => continue,
        };
        if stepped || mb >= microbatches || chunk >= chunks {
            return Err(format!("stage {stage}'s schedule runs {a:?} out of place"));
        }
        let at = mb * chunks + chunk;
        if backwards && forward[at] == 0 {
            return Err(format!(
                "stage {stage}'s schedule runs {a:?} before its forward pass"
            ));
        }
        if backwards {
            backward[at] += 1;
        } else {
            forward[at] += 1;
        }
    }
    if !stepped || forward.iter().chain(&backward).any(|&n| n != 1) {
        return Err(format!(
            "stage {stage}'s schedule does not run each of its {microbatches} microbatches forward and backward once, then the optimizer"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parallel` on cpu(4), compiled and checked.
    fn program(parallel: &str) -> Program {
        let src = format!("import std.models.gpt2\nexperiment e {{ model = gpt2 {{ vocab = 64, positions = 16, hidden = 16, layers = 2, heads = 2 }}, parallel {{ mesh = cpu(4), {parallel} }}, train {{ batch = 4, micro_batch = 1, seq_len = 8 }} }}");
        let checked = crate::check_source("t.kiln", &src, None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        compile(&checked.module.experiments[0].value).expect("compiles")
    }

    /// BERT's two token types split by vocabulary over four ranks leave two ranks without a
    /// row: a valid layout (their partial sums are zero), not an inconsistent plan.
    #[test]
    fn tables_smaller_than_the_group_are_valid_layouts() {
        let src = "import std.models.bert\nexperiment e { model = bert_mini { positions = 16 }, objective = mlm, parallel { mesh = cpu(4), tensor = 4 }, train { batch = 4, seq_len = 8 } }";
        let checked = crate::check_source("t.kiln", src, None);
        assert!(checked.is_ok(), "{}", checked.render_errors());
        let program = compile(&checked.module.experiments[0].value);
        assert!(program.is_ok(), "{:?}", program.err().map(|d| d.items));
    }

    /// The sanity pass is not a formality: each kind of inconsistency it exists for is caught.
    #[test]
    fn the_sanity_pass_catches_inconsistent_plans() {
        let good = program("data = 2, pipeline = 2");
        assert_eq!(check(&good), Ok(()));
        let broken = |edit: &dyn Fn(&mut Program), expected: &str| {
            let mut p = good.clone();
            edit(&mut p);
            let err = check(&p).expect_err(expected);
            assert!(err.contains(expected), "{err}");
        };
        broken(
            &|p| {
                let run = p.plan.stages[1].layers[0].clone();
                p.plan.stages[0].layers.push(run);
            },
            "is on two stages",
        );
        broken(&|p| p.plan.stages[1].layers.clear(), "is on no stage");
        broken(&|p| p.plan.stages[1].devices.start += 1, "do not follow");
        broken(
            &|p| {
                p.plan
                    .collectives
                    .iter_mut()
                    .for_each(|c| c.group_size += 1)
            },
            "runs among",
        );
        broken(
            &|p| {
                p.plan.schedule[0]
                    .actions
                    .retain(|a| !matches!(a, Action::Backward { mb: 0, .. }))
            },
            "forward and backward once",
        );
        broken(
            &|p| {
                let last = p.plan.schedule[1].actions.pop();
                p.plan.schedule[1]
                    .actions
                    .insert(0, last.expect("an action"));
            },
            "out of place",
        );
        broken(
            &|p| p.plan.stages[0].micro_batch += 1,
            "do not make the batch",
        );
        broken(
            &|p| p.plan.stages[0].layout.size += 1,
            "is not of its graph",
        );
        // A tensor-parallel program: a split that does not tile its parameter.
        let split = program("data = 2, tensor = 2");
        assert_eq!(check(&split), Ok(()));
        let mut p = split.clone();
        let shard = p.plan.stages[0]
            .layout
            .params
            .iter_mut()
            .find_map(|layout| match layout {
                ParamLayout::Shard { sections, .. } => Some(sections),
                ParamLayout::Replicate => None,
            })
            .expect("tensor = 2 shards some parameter");
        shard[0] += 1;
        let err = check(&p).expect_err("a split that does not tile");
        assert!(err.contains("do not tile"), "{err}");
    }
}
