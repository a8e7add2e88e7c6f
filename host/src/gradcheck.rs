//! `check-plugin`'s `gradcheck`: a layer's `backward` compared with central
//! finite differences of its `forward`.
//!
//! The loss is `sum(w * y)` over every float output `y`, with fixed
//! pseudo-random weights `w` in [-1, 1] (rounded to the output's type, so
//! that the loss and the output gradient `backward` is given agree). For
//! each element of each float input and each parameter, the derivative of
//! the loss is estimated as `(L(v + h) - L(v - h)) / (2h)` and compared with
//! what `backward` gave: `|backward - numeric| <= atol + rtol * |numeric|`.
//! A tensor of more than [`SAMPLE`] elements is checked on a fixed sample
//! of that many.
//!
//! The change of the loss is summed as `sum(w * (y' - y))` over the
//! outputs `y'` of the moved input and `y` of the unmoved one, in float64:
//! outputs the element does not reach are bit for bit the same in both and
//! cancel exactly, so the rounding of a float32 forward enters only
//! through the outputs that moved (one row of a dense layer's, not all).
//!
//! A function with a kink (`relu` at 0) has no derivative there, and a
//! central difference across one is wrong whatever `backward` says; a dense
//! layer of a thousand relu units has kinks within a step of many inputs.
//! An element outside the tolerance is taken to lie within a step of a
//! kink, and is counted and not compared, when the function is visibly not
//! smooth there: its two one-sided differences disagree, or either differs
//! from the one-sided difference at half the step, by at least as much as
//! `backward` and the central difference do. (For a smooth function all
//! four agree to within the step's own error, far below the tolerance, so
//! a wrong gradient is not excused.)
//!
//! The loop runs where the plugin runs: in its worker process
//! ([`crate::isolate`]), against the plugin's own table, so a plugin that
//! crashes or hangs in `backward` costs the worker, not the host. It only
//! needs a way to run the layer forward and backward ([`Differentiable`]).

use std::collections::BTreeSet;

use layer_api::DType;
use serde::{Deserialize, Serialize};

use crate::tensor::Tensor;

/// The most elements of one tensor that are compared; larger tensors are
/// checked on a fixed sample of this many.
pub const SAMPLE: usize = 256;

/// The central-difference step and the tolerance
/// `|analytic - numeric| <= atol + rtol * |numeric|`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub step: f64,
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// For float32 tensors (inputs, and parameters, which are always
    /// float32 in this host). The step trades rounding (a float32 output of
    /// size 30 rounds by 2e-6; a thousand of them moved, over 2 x 3e-3,
    /// make about 1e-2 at worst) against kinks crossed (fewer as it
    /// shrinks).
    pub const F32: Tolerance = Tolerance {
        step: 3e-3,
        atol: 1e-2,
        rtol: 1e-2,
    };
    /// For float64 inputs.
    pub const F64: Tolerance = Tolerance {
        step: 1e-6,
        atol: 1e-5,
        rtol: 1e-3,
    };

    /// The tolerance for a tensor of `dtype`: float64 gets [`Tolerance::F64`],
    /// everything else [`Tolerance::F32`].
    pub fn for_dtype(dtype: DType) -> Tolerance {
        if dtype == DType::F64 {
            Tolerance::F64
        } else {
            Tolerance::F32
        }
    }

    /// `step 1e-2, |backward - fd| <= 1e-2 + 1e-2 |fd|`.
    pub fn text(&self) -> String {
        format!(
            "step {:e}, |backward - fd| <= {:e} + {:e} |fd|",
            self.step, self.atol, self.rtol
        )
    }
}

/// Which tensor a gradient belongs to: an input or a parameter, by position
/// (in the signature's order, in the plan's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Which {
    Input(usize),
    Param(usize),
}

/// How one tensor's gradient was compared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compared {
    pub which: Which,
    /// Its number of elements.
    pub elements: usize,
    /// How many were compared (all, or [`SAMPLE`]).
    pub checked: usize,
    /// How many of those were within a step of a kink, so not compared.
    pub kinks: usize,
}

/// The element of a gradient furthest outside its tolerance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    pub which: Which,
    /// Its index along each axis.
    pub index: Vec<usize>,
    pub analytic: f64,
    pub numeric: f64,
    pub tolerance: Tolerance,
    /// The tensor's number of elements, and how many were compared.
    pub elements: usize,
    pub checked: usize,
}

/// What one gradcheck found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GradReport {
    pub compared: Vec<Compared>,
    pub worst: Option<Mismatch>,
}

/// A call into the layer that failed: what it said, and whether it
/// panicked.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub panicked: bool,
    pub message: String,
}

/// A layer the loop can run: `forward`, and `forward` then `backward`,
/// each with its parameters prepared for that call alone.
pub trait Differentiable {
    /// The outputs for `inputs` (one per declared input, `None`: left out)
    /// and `params` (float32, in the plan's order).
    fn forward(
        &mut self,
        inputs: &[Option<Tensor>],
        params: &[Tensor],
    ) -> Result<Vec<Tensor>, Failure>;

    /// The gradient of every float input (`None` for others and for inputs
    /// left out) and every parameter, given `outputs` (what `forward` gave
    /// for these inputs and parameters) and the gradient of each output
    /// (`None`: not a float).
    fn backward(
        &mut self,
        inputs: &[Option<Tensor>],
        params: &[Tensor],
        outputs: &[Tensor],
        output_grads: &[Option<Tensor>],
    ) -> Result<(Vec<Option<Tensor>>, Vec<Tensor>), Failure>;
}

/// Whether finite differences are run on tensors of `dtype`: float32 and
/// float64 (float16 and bfloat16 are too coarse for a difference quotient).
pub fn is_checked_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

/// A deterministic number in [-1, 1) for `(seed, a, b)`.
fn unit(seed: u64, a: u64, b: u64) -> f64 {
    let mut h =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    (h >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The flat indices compared in a tensor of `n` elements: all of them, or
/// [`SAMPLE`] distinct ones drawn from `salt`, ascending.
pub fn sample(n: usize, seed: u64, salt: u64) -> Vec<usize> {
    if n <= SAMPLE {
        return (0..n).collect();
    }
    let mut chosen = BTreeSet::new();
    let mut k = 0u64;
    while chosen.len() < SAMPLE {
        let u = (unit(seed ^ 0x5A5A, salt, k) + 1.0) / 2.0;
        chosen.insert(((u * n as f64) as usize).min(n - 1));
        k += 1;
    }
    chosen.into_iter().collect()
}

/// The index along each axis of the element at `flat` in C order.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}

fn get(t: &Tensor, i: usize) -> f64 {
    match t {
        Tensor::F32(a) => a.as_slice().map_or(f64::NAN, |s| f64::from(s[i])),
        Tensor::F64(a) => a.as_slice().map_or(f64::NAN, |s| s[i]),
        _ => f64::NAN,
    }
}

/// Sets element `i` to `v` (rounded to the tensor's type) and returns the
/// value it holds now.
fn set(t: &mut Tensor, i: usize, v: f64) -> f64 {
    match t {
        Tensor::F32(a) => a.as_slice_mut().map_or(f64::NAN, |s| {
            s[i] = v as f32;
            f64::from(s[i])
        }),
        Tensor::F64(a) => a.as_slice_mut().map_or(f64::NAN, |s| {
            s[i] = v;
            s[i]
        }),
        _ => f64::NAN,
    }
}

/// The loss weights: one per element of each float output, `None` for the
/// others, each already rounded to its output's type.
fn loss_weights(outputs: &[Tensor], seed: u64) -> Vec<Option<Tensor>> {
    outputs
        .iter()
        .enumerate()
        .map(|(k, y)| {
            let n = y.len();
            let w = |i: usize| unit(seed, k as u64 + 1, i as u64);
            let shape = ndarray::IxDyn(y.shape());
            match y.dtype() {
                DType::F32 => {
                    ndarray::ArrayD::from_shape_vec(shape, (0..n).map(|i| w(i) as f32).collect())
                        .ok()
                        .map(Tensor::F32)
                }
                DType::F64 => ndarray::ArrayD::from_shape_vec(shape, (0..n).map(w).collect())
                    .ok()
                    .map(Tensor::F64),
                _ => None,
            }
        })
        .collect()
}

/// `sum(w * (moved - base))` over the float outputs, in float64: the
/// change of the loss `sum(w * y)`, with the outputs that did not move
/// cancelling exactly.
fn loss_change(moved: &[Tensor], base: &[Tensor], weights: &[Option<Tensor>]) -> f64 {
    moved
        .iter()
        .zip(base)
        .zip(weights)
        .filter_map(|((m, b), w)| Some((m, b, w.as_ref()?)))
        .map(|(m, b, w)| {
            m.to_f64()
                .iter()
                .zip(b.to_f64().iter())
                .zip(w.to_f64().iter())
                .map(|((m, b), w)| (m - b) * w)
                .sum::<f64>()
        })
        .sum()
}

/// The worst element found so far, by how far it lies outside its
/// tolerance.
struct Worst {
    excess: f64,
    mismatch: Mismatch,
}

/// Compares `layer`'s backward with central differences at `inputs` and
/// `params`, with loss weights drawn from `seed`. Float32 and float64
/// inputs are checked with their own tolerance ([`Tolerance::for_dtype`]),
/// parameters with [`Tolerance::F32`]; other inputs are left as they are.
/// `Err` when a call into the layer failed (its message says which).
pub fn compare(
    layer: &mut dyn Differentiable,
    inputs: &[Option<Tensor>],
    params: &[Tensor],
    seed: u64,
) -> Result<GradReport, Failure> {
    let base = layer.forward(inputs, params)?;
    let weights = loss_weights(&base, seed);
    let (input_grads, param_grads) = layer.backward(inputs, params, &base, &weights)?;
    let mut report = GradReport::default();
    let mut worst: Option<Worst> = None;

    // The tensors to perturb, each with its gradient from backward.
    let mut targets: Vec<(Which, Tolerance, &Tensor)> = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let Some(x) = x else { continue };
        if !is_checked_float(x.dtype()) {
            continue;
        }
        let grad = input_grads
            .get(i)
            .and_then(Option::as_ref)
            .ok_or_else(|| Failure {
                panicked: false,
                message: format!("backward gave no gradient for input {i} (a bug in the host)"),
            })?;
        targets.push((Which::Input(i), Tolerance::for_dtype(x.dtype()), grad));
    }
    for (j, grad) in param_grads.iter().enumerate() {
        targets.push((Which::Param(j), Tolerance::F32, grad));
    }

    let mut moved_inputs: Vec<Option<Tensor>> = inputs.to_vec();
    let mut moved_params: Vec<Tensor> = params.to_vec();
    for (salt, (which, tolerance, grad)) in targets.into_iter().enumerate() {
        let (shape, elements) = match which {
            Which::Input(i) => {
                let x = inputs[i].as_ref().expect("a target input is present");
                (x.shape().to_vec(), x.len())
            }
            Which::Param(j) => (params[j].shape().to_vec(), params[j].len()),
        };
        let indices = sample(elements, seed, salt as u64);
        let mut kinks = 0;
        for &e in &indices {
            let h = tolerance.step;
            let mut loss_at = |delta: f64| -> Result<(f64, f64), Failure> {
                let (tensor, original) = match which {
                    Which::Input(i) => {
                        let t = moved_inputs[i].as_mut().expect("present");
                        let original = get(t, e);
                        (t, original)
                    }
                    Which::Param(j) => {
                        let t = &mut moved_params[j];
                        let original = get(t, e);
                        (t, original)
                    }
                };
                let moved_to = set(tensor, e, original + delta);
                let outputs = layer.forward(&moved_inputs, &moved_params);
                let tensor = match which {
                    Which::Input(i) => moved_inputs[i].as_mut().expect("present"),
                    Which::Param(j) => &mut moved_params[j],
                };
                set(tensor, e, original);
                Ok((moved_to - original, loss_change(&outputs?, &base, &weights)))
            };
            let (up, at_up) = loss_at(h)?;
            let (down, at_down) = loss_at(-h)?;
            let numeric = (at_up - at_down) / (up - down);
            let analytic = get(grad, e);
            let error = (analytic - numeric).abs();
            let allowed = tolerance.atol + tolerance.rtol * numeric.abs();
            // NaN and infinities are never within the tolerance.
            let excess = if error.is_finite() {
                error - allowed
            } else {
                f64::INFINITY
            };
            if excess <= 0.0 {
                continue;
            }
            // The one-sided differences, at the step and at half of it.
            let right = at_up / up;
            let left = at_down / down;
            let (half_up, at_half_up) = loss_at(h / 2.0)?;
            let (half_down, at_half_down) = loss_at(-h / 2.0)?;
            let rough = (right - left)
                .abs()
                .max(2.0 * (right - at_half_up / half_up).abs())
                .max(2.0 * (left - at_half_down / half_down).abs());
            if rough.is_finite() && rough >= error {
                kinks += 1;
                continue;
            }
            if worst.as_ref().is_none_or(|w| excess > w.excess) {
                worst = Some(Worst {
                    excess,
                    mismatch: Mismatch {
                        which,
                        index: unravel(e, &shape),
                        analytic,
                        numeric,
                        tolerance,
                        elements,
                        checked: indices.len(),
                    },
                });
            }
        }
        report.compared.push(Compared {
            which,
            elements,
            checked: indices.len(),
            kinks,
        });
    }
    report.worst = worst.map(|w| w.mismatch);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    /// `y = a * x³ + relu(x)` with one parameter `a` per element, whose
    /// backward can be wrong in one element of `x`'s gradient.
    struct Cube {
        wrong_at: Option<usize>,
        calls: usize,
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.to_f64().iter().copied().collect()
    }

    impl Differentiable for Cube {
        fn forward(
            &mut self,
            inputs: &[Option<Tensor>],
            params: &[Tensor],
        ) -> Result<Vec<Tensor>, Failure> {
            self.calls += 1;
            let x = inputs[0].as_ref().unwrap();
            let a = values(&params[0]);
            let y: Vec<f64> = values(x)
                .iter()
                .zip(&a)
                .map(|(x, a)| a * x * x * x + x.max(0.0))
                .collect();
            let y = ArrayD::from_shape_vec(IxDyn(x.shape()), y).unwrap();
            Ok(vec![match x.dtype() {
                DType::F64 => Tensor::F64(y),
                _ => Tensor::F32(y.mapv(|v| v as f32)),
            }])
        }

        fn backward(
            &mut self,
            inputs: &[Option<Tensor>],
            params: &[Tensor],
            _outputs: &[Tensor],
            output_grads: &[Option<Tensor>],
        ) -> Result<(Vec<Option<Tensor>>, Vec<Tensor>), Failure> {
            let x = values(inputs[0].as_ref().unwrap());
            let a = values(&params[0]);
            let g = values(output_grads[0].as_ref().unwrap());
            let mut dx: Vec<f64> = (0..x.len())
                .map(|i| g[i] * (3.0 * a[i] * x[i] * x[i] + if x[i] > 0.0 { 1.0 } else { 0.0 }))
                .collect();
            if let Some(i) = self.wrong_at {
                dx[i] += 0.5;
            }
            let da: Vec<f32> = (0..x.len())
                .map(|i| (g[i] * x[i] * x[i] * x[i]) as f32)
                .collect();
            let shape = IxDyn(inputs[0].as_ref().unwrap().shape());
            let dx = ArrayD::from_shape_vec(shape.clone(), dx).unwrap();
            let dx = match inputs[0].as_ref().unwrap().dtype() {
                DType::F64 => Tensor::F64(dx),
                _ => Tensor::F32(dx.mapv(|v| v as f32)),
            };
            Ok((
                vec![Some(dx)],
                vec![Tensor::F32(ArrayD::from_shape_vec(shape, da).unwrap())],
            ))
        }
    }

    fn input(shape: &[usize], f64: bool) -> (Vec<Option<Tensor>>, Vec<Tensor>) {
        let n: usize = shape.iter().product();
        // Every element at least 0.1 from relu's kink, but one a quarter
        // step from it.
        let x: Vec<f64> = (0..n)
            .map(|i| match unit(7, 1, i as u64) {
                _ if i == 3 => 0.0025,
                u => u.signum() * (0.1 + 0.9 * u.abs()),
            })
            .collect();
        let a: Vec<f32> = (0..n).map(|i| 0.5 * unit(7, 2, i as u64) as f32).collect();
        let x = ArrayD::from_shape_vec(IxDyn(shape), x).unwrap();
        let x = if f64 {
            Tensor::F64(x)
        } else {
            Tensor::F32(x.mapv(|v| v as f32))
        };
        (
            vec![Some(x)],
            vec![Tensor::F32(
                ArrayD::from_shape_vec(IxDyn(shape), a).unwrap(),
            )],
        )
    }

    #[test]
    fn a_right_gradient_passes_in_both_precisions_and_kinks_are_left_out() {
        for f64 in [false, true] {
            let (inputs, params) = input(&[4, 5], f64);
            let mut layer = Cube {
                wrong_at: None,
                calls: 0,
            };
            let report = compare(&mut layer, &inputs, &params, 0).unwrap();
            assert_eq!(report.worst, None, "float64: {f64}");
            assert_eq!(report.compared.len(), 2);
            assert_eq!(report.compared[0].checked, 20);
            // x = 0.0025 is within a float32 step (3e-3) of relu's kink,
            // not within a float64 one (1e-6).
            assert_eq!(
                report.compared[0].kinks,
                usize::from(!f64),
                "float64: {f64}"
            );
            // Two forwards per element, and two more at half the step for
            // the one outside the tolerance.
            assert_eq!(layer.calls, 1 + 2 * 40 + 2 * usize::from(!f64));
        }
    }

    #[test]
    fn a_wrong_element_is_named() {
        let (inputs, params) = input(&[4, 5], false);
        let mut layer = Cube {
            wrong_at: Some(7),
            calls: 0,
        };
        let report = compare(&mut layer, &inputs, &params, 0).unwrap();
        let worst = report.worst.unwrap();
        assert_eq!(worst.which, Which::Input(0));
        assert_eq!(worst.index, vec![1, 2]);
        assert!(
            (worst.analytic - worst.numeric - 0.5).abs() < 0.02,
            "{worst:?}"
        );
        assert_eq!(worst.tolerance, Tolerance::F32);
    }

    #[test]
    fn large_tensors_are_sampled() {
        let (inputs, params) = input(&[30, 20], false);
        let mut layer = Cube {
            wrong_at: None,
            calls: 0,
        };
        let report = compare(&mut layer, &inputs, &params, 0).unwrap();
        assert_eq!(report.worst, None);
        assert_eq!(report.compared[0].elements, 600);
        assert_eq!(report.compared[0].checked, SAMPLE);
        let s = sample(600, 0, 0);
        assert_eq!(s.len(), SAMPLE);
        assert!(s.windows(2).all(|w| w[0] < w[1]) && *s.last().unwrap() < 600);
        assert_eq!(s, sample(600, 0, 0), "the same sample each time");
        assert_ne!(s, sample(600, 0, 1), "another for another tensor");
        assert_eq!(sample(5, 0, 0), vec![0, 1, 2, 3, 4]);
    }
}
