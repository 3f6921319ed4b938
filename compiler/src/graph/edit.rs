//! Building and rewriting the graph: adding nodes (with inferred shapes), parameters and
//! layers, and splicing nodes into existing edges. Passes use only these operations, so the
//! graph's invariants (one output per node, edges carrying the producer's tensor, contiguous
//! input slots) hold by construction; `verify` re-checks them in debug builds.

use super::ir::*;
use super::shape::infer;
use petgraph::graph::NodeIndex;
use petgraph::visit::EdgeRef;
use petgraph::Direction;

impl Graph {
    pub fn new(batch: u64, seq: u64, dtype: DType) -> Graph {
        Graph {
            dag: Default::default(),
            params: Vec::new(),
            layers: Vec::new(),
            batch,
            seq,
            dtype,
            loss: None,
            problems: Vec::new(),
        }
    }

    pub fn add_layer(&mut self, name: impl Into<String>, kind: LayerKind) -> LayerId {
        self.layers.push(Layer {
            name: name.into(),
            kind,
        });
        self.layers.len() - 1
    }

    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        shape: Vec<u64>,
        role: ParamRole,
        layer: LayerId,
    ) -> ParamId {
        self.params.push(Param {
            name: name.into(),
            shape,
            role,
            trainable: true,
            layer,
        });
        self.params.len() - 1
    }

    pub fn add_input(
        &mut self,
        name: impl Into<String>,
        kind: InputKind,
        shape: Vec<u64>,
        layer: LayerId,
    ) -> NodeIndex {
        let dtype = match kind {
            InputKind::Rollout => DType::F32,
            _ => DType::I64,
        };
        let out = TensorMeta { shape, dtype };
        self.dag.add_node(Node {
            name: name.into(),
            op: Op::Input { kind },
            layer,
            out,
            cost: Cost::default(),
        })
    }

    /// Adds `op` reading `inputs` (in slot order), with its output shape inferred.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: Op,
        inputs: &[NodeIndex],
        layer: LayerId,
    ) -> NodeIndex {
        let name = name.into();
        let metas: Vec<&TensorMeta> = inputs.iter().map(|&i| &self.dag[i].out).collect();
        let out = match infer(&op, &metas, &self.params, self.dtype) {
            Ok(out) => out,
            Err(why) => {
                self.problems.push(format!("{name}: {why}"));
                TensorMeta {
                    shape: Vec::new(),
                    dtype: self.dtype,
                }
            }
        };
        let node = self.dag.add_node(Node {
            name,
            op,
            layer,
            out,
            cost: Cost::default(),
        });
        for (slot, &input) in inputs.iter().enumerate() {
            let tensor = self.dag[input].out.clone();
            self.dag.add_edge(input, node, Edge { slot, tensor });
        }
        node
    }

    /// Makes every consumer of `from` read `to` instead, except `to` itself (which usually
    /// reads `from`): how a pass wraps a node's output.
    pub fn redirect_consumers(&mut self, from: NodeIndex, to: NodeIndex, except: &[NodeIndex]) {
        let moves: Vec<(petgraph::graph::EdgeIndex, NodeIndex, usize)> = self
            .dag
            .edges_directed(from, Direction::Outgoing)
            .filter(|e| e.target() != to && !except.contains(&e.target()))
            .map(|e| (e.id(), e.target(), e.weight().slot))
            .collect();
        let tensor = self.dag[to].out.clone();
        for (edge, target, slot) in moves {
            self.dag.remove_edge(edge);
            self.dag.add_edge(
                to,
                target,
                Edge {
                    slot,
                    tensor: tensor.clone(),
                },
            );
        }
    }

    /// Inserts `op` after `node`: it reads `node` (slot 0) and `extra` inputs, and takes over
    /// `node`'s consumers.
    pub fn insert_after(
        &mut self,
        node: NodeIndex,
        name: impl Into<String>,
        op: Op,
        extra: &[NodeIndex],
    ) -> NodeIndex {
        let mut inputs = vec![node];
        inputs.extend_from_slice(extra);
        let layer = self.dag[node].layer;
        let new = self.add(name, op, &inputs, layer);
        self.redirect_consumers(node, new, &[]);
        new
    }

    /// Inserts `op` on input `slot` of `node`: it reads what that slot read, and feeds it.
    pub fn insert_before(
        &mut self,
        node: NodeIndex,
        slot: usize,
        name: impl Into<String>,
        op: Op,
    ) -> Option<NodeIndex> {
        let edge = self
            .dag
            .edges_directed(node, Direction::Incoming)
            .find(|e| e.weight().slot == slot)?;
        let (edge, source) = (edge.id(), edge.source());
        let layer = self.dag[node].layer;
        let new = self.add(name, op, &[source], layer);
        self.dag.remove_edge(edge);
        let tensor = self.dag[new].out.clone();
        self.dag.add_edge(new, node, Edge { slot, tensor });
        Some(new)
    }

    /// Makes input `slot` of `node` read `source` instead.
    pub fn replace_input(&mut self, node: NodeIndex, slot: usize, source: NodeIndex) {
        if let Some(edge) = self
            .dag
            .edges_directed(node, Direction::Incoming)
            .find(|e| e.weight().slot == slot)
            .map(|e| e.id())
        {
            self.dag.remove_edge(edge);
        }
        let tensor = self.dag[source].out.clone();
        self.dag.add_edge(source, node, Edge { slot, tensor });
    }

    /// Re-infers every output shape in topological order, after a pass that changed the
    /// sequence length (prompt tuning prepends tokens).
    pub fn reinfer(&mut self) {
        for n in self.topo_order() {
            // Inputs keep the shape a pass gave them; everything else follows from them.
            if !matches!(self.dag[n].op, Op::Input { .. }) {
                let inputs = self.inputs(n);
                let metas: Vec<&TensorMeta> = inputs.iter().map(|&i| &self.dag[i].out).collect();
                match infer(&self.dag[n].op, &metas, &self.params, self.dtype) {
                    Ok(out) => self.dag[n].out = out,
                    Err(why) => self.problems.push(format!("{}: {why}", self.dag[n].name)),
                }
            }
            let out = self.dag[n].out.clone();
            let edges: Vec<_> = self
                .dag
                .edges_directed(n, Direction::Outgoing)
                .map(|e| e.id())
                .collect();
            for e in edges {
                self.dag[e].tensor = out.clone();
            }
        }
    }

    /// Nodes whose name is `name` (module paths are unique, so at most one in practice).
    pub fn find(&self, name: &str) -> Option<NodeIndex> {
        self.dag.node_indices().find(|&n| self.dag[n].name == name)
    }

    /// Checks the invariants: acyclic, contiguous slots, edges carrying their producer's
    /// tensor, and every op's output equal to what its inputs imply.
    pub fn verify(&self) -> Result<(), String> {
        if let Some(p) = self.problems.first() {
            return Err(p.clone());
        }
        if let Err(cycle) = petgraph::algo::toposort(&self.dag, None) {
            return Err(format!(
                "the graph has a cycle through {}",
                self.dag[cycle.node_id()].name
            ));
        }
        for n in self.dag.node_indices() {
            let node = &self.dag[n];
            let mut slots: Vec<usize> = self
                .dag
                .edges_directed(n, Direction::Incoming)
                .map(|e| e.weight().slot)
                .collect();
            slots.sort();
            if slots.iter().enumerate().any(|(i, s)| i != *s) {
                return Err(format!(
                    "{}: input slots {slots:?} are not contiguous",
                    node.name
                ));
            }
            for e in self.dag.edges_directed(n, Direction::Outgoing) {
                if e.weight().tensor != node.out {
                    return Err(format!(
                        "{}: edge tensor {:?} differs from output {:?}",
                        node.name,
                        e.weight().tensor.shape,
                        node.out.shape
                    ));
                }
            }
            if matches!(node.op, Op::Input { .. }) {
                continue;
            }
            let inputs = self.inputs(n);
            let metas: Vec<&TensorMeta> = inputs.iter().map(|&i| &self.dag[i].out).collect();
            let expected = infer(&node.op, &metas, &self.params, self.dtype)
                .map_err(|e| format!("{}: {e}", node.name))?;
            if expected != node.out {
                return Err(format!(
                    "{}: output {:?} but inputs imply {:?}",
                    node.name, node.out.shape, expected.shape
                ));
            }
        }
        Ok(())
    }
}
