//! Values passed between segments (a tensor on the device, read back to the host to move to
//! another), the table entries the interpreter keeps per node, and the parameters a device holds.

use super::precision::Format;
use super::{err, Dev, ExecError, T0, T1, T2, T3};
use crate::tensor::HostTensor;
use dfdx::prelude::*;
use kiln_compiler::graph::Graph;

/// A node's value in the interpreter's table.
#[derive(Clone)]
pub(super) enum V {
    S(T0),
    R2(T2),
    R3(T3),
    /// Integer input `[b, s]` (or `[b]` as `[b, 1]`).
    Ints(Vec<Vec<i64>>),
}

impl V {
    pub(super) fn r3(&self, what: &str) -> Result<T3, ExecError> {
        match self {
            V::R3(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a rank-3 tensor")),
        }
    }
    pub(super) fn r2(&self, what: &str) -> Result<T2, ExecError> {
        match self {
            V::R2(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a rank-2 tensor")),
        }
    }
    pub(super) fn scalar(&self, what: &str) -> Result<T0, ExecError> {
        match self {
            V::S(t) => Ok(t.clone()),
            _ => err(format!("{what}: expected a scalar")),
        }
    }
    pub(super) fn ints(&self, what: &str) -> Result<&Vec<Vec<i64>>, ExecError> {
        match self {
            V::Ints(v) => Ok(v),
            _ => err(format!("{what}: expected integer input")),
        }
    }
}

/// A value computed by one segment and read by another: a tensor on the device (no copy between
/// segments of one device), or moved through the host to another device.
#[derive(Clone)]
pub struct Value(pub(super) V);

impl Value {
    pub fn from_host(t: HostTensor) -> Result<Value, ExecError> {
        let dev = Dev::default();
        match *t.shape.as_slice() {
            [] if t.data.len() == 1 => Ok(Value(V::S(dev.tensor(t.data[0])))),
            [a, b] => Ok(Value(V::R2(dev.tensor_from_vec(t.data, (a, b))))),
            [a, b, c] => Ok(Value(V::R3(dev.tensor_from_vec(t.data, (a, b, c))))),
            ref other => err(format!("a value of shape {other:?}")),
        }
    }

    pub fn to_host(&self) -> Result<HostTensor, ExecError> {
        Ok(match &self.0 {
            V::S(t) => HostTensor::scalar(t.array()),
            V::R2(t) => HostTensor {
                shape: vec![t.shape().0, t.shape().1],
                data: t.as_vec(),
            },
            V::R3(t) => HostTensor {
                shape: vec![t.shape().0, t.shape().1, t.shape().2],
                data: t.as_vec(),
            },
            V::Ints(_) => return err("integer inputs are read from the batch, not sent"),
        })
    }

    pub fn scalar(x: f32) -> Value {
        Value(V::S(Dev::default().tensor(x)))
    }

    /// Zeros of the same shape (the gradient of a value nothing depended on).
    pub fn zeros_like(&self) -> Value {
        let dev = Dev::default();
        Value(match &self.0 {
            V::S(t) => V::S(dev.zeros_like(t)),
            V::R2(t) => V::R2(dev.zeros_like(t)),
            V::R3(t) => V::R3(dev.zeros_like(t)),
            V::Ints(v) => V::Ints(v.clone()),
        })
    }

    /// The element-wise sum (gradients from several readers).
    pub fn add(&self, other: &Value) -> Result<Value, ExecError> {
        Ok(Value(match (&self.0, &other.0) {
            (V::S(a), V::S(b)) => V::S(a.clone() + b.clone()),
            (V::R2(a), V::R2(b)) if a.shape() == b.shape() => V::R2(a.clone() + b.clone()),
            (V::R3(a), V::R3(b)) if a.shape() == b.shape() => V::R3(a.clone() + b.clone()),
            _ => return err("adding gradients of different shapes"),
        }))
    }
}

/// A parameter as a tape-less tensor of its own rank.
#[derive(Clone)]
pub(super) enum P {
    R1(T1),
    R2(T2),
}

/// The parameters a device holds, as tensors on it, shared by every segment it runs (one copy
/// however many microbatches are in flight): working copies of the host's f32 masters in the
/// number format the segments compute in.
pub struct Params {
    pub(super) tensors: Vec<Option<P>>,
    pub(super) format: Format,
}

impl Params {
    /// From host values, rounded to `format`; absent ones (held by other devices) stay absent.
    pub fn new(g: &Graph, values: &[HostTensor], format: Format) -> Result<Params, ExecError> {
        let mut params = Params::none(g, format);
        for (id, v) in values.iter().enumerate() {
            if !v.data.is_empty() {
                params.set(g, id, v)?;
            }
        }
        Ok(params)
    }

    /// None on the device yet.
    pub fn none(g: &Graph, format: Format) -> Params {
        Params {
            tensors: vec![None; g.params.len()],
            format,
        }
    }

    /// Puts parameter `id` on the device (a ZeRO-3 gather), rounded to the format.
    pub fn set(&mut self, g: &Graph, id: usize, v: &HostTensor) -> Result<(), ExecError> {
        let dev = Dev::default();
        let mut data = v.data.clone();
        self.format.round_all(&mut data);
        self.tensors[id] = Some(match v.shape.as_slice() {
            [n] => P::R1(dev.tensor_from_vec(data, (*n,))),
            [a, b] => P::R2(dev.tensor_from_vec(data, (*a, *b))),
            other => {
                return err(format!(
                    "parameter `{}` has rank {}",
                    g.params[id].name,
                    other.len()
                ))
            }
        });
        Ok(())
    }

    /// Drops the device's tensor of parameter `id` (segments holding it keep theirs).
    pub fn release(&mut self, id: usize) {
        self.tensors[id] = None;
    }

    /// Drops every tensor (before the optimizer updates the host copies).
    pub fn clear(&mut self) {
        self.tensors.iter_mut().for_each(|p| *p = None);
    }
}
