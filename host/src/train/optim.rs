//! The host's optimizers, step for step as torch's `SGD` and `Adam`
//! (single-tensor form) compute them, in `float32`.

use std::collections::BTreeMap;

use ndarray::ArrayD;

use crate::params::ParamStore;

/// An optimizer and its settings, spelled as torch spells them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    },
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

/// What an optimizer carries from step to step: the step count and, per
/// parameter, SGD's momentum buffer or Adam's two moments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub step: u64,
    /// By parameter's stored name: `[momentum]` or `[exp_avg, exp_avg_sq]`.
    pub buffers: BTreeMap<String, Vec<ArrayD<f32>>>,
}

/// Parameters smaller than this are updated on one thread: handing pieces
/// to other threads costs more than the update.
const MIN_SPLIT_ELEMENTS: usize = 1 << 16;

impl Optimizer {
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adam { .. } => "adam",
        }
    }

    /// The names of the buffers it keeps per parameter.
    pub fn buffer_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
            Optimizer::Sgd { .. } => &[],
            Optimizer::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    /// Updates every parameter that has a gradient in `grads`: one pass
    /// over each parameter, its gradient and its buffers, cut into one
    /// piece per thread of `pool` when it is large (each element's update
    /// depends on that element alone, so the bits do not change).
    pub fn step(
        &self,
        state: &mut State,
        params: &mut ParamStore,
        grads: &BTreeMap<String, ArrayD<f32>>,
        pool: Option<&rayon::ThreadPool>,
    ) {
        state.step = state.step.saturating_add(1);
        let t = state.step as f64;
        for (name, grad) in grads {
            let Some(p) = params.get_mut(name) else {
                continue;
            };
            let buffers = self.buffer_names().len();
            let first = !state.buffers.contains_key(name);
            let bufs = state.buffers.entry(name.clone()).or_insert_with(|| {
                (0..buffers)
                    .map(|_| ArrayD::zeros(grad.raw_dim()))
                    .collect()
            });
            let p = p.as_slice_mut().expect("parameters are contiguous");
            let g = grad.as_slice().expect("gradients are contiguous");
            let mut bufs: Vec<&mut [f32]> = bufs
                .iter_mut()
                .map(|b| b.as_slice_mut().expect("buffers are contiguous"))
                .collect();
            match pool {
                Some(pool) if p.len() >= MIN_SPLIT_ELEMENTS => {
                    let len = p.len().div_ceil(pool.current_num_threads());
                    let mut buf_pieces: Vec<_> =
                        bufs.into_iter().map(|b| b.chunks_mut(len)).collect();
                    let pieces: Vec<_> = p
                        .chunks_mut(len)
                        .zip(g.chunks(len))
                        .map(|(p, g)| {
                            let bufs: Vec<&mut [f32]> =
                                buf_pieces.iter_mut().filter_map(Iterator::next).collect();
                            std::sync::Mutex::new(Some((p, g, bufs)))
                        })
                        .collect();
                    crate::pool::run_each(pool, pieces.len(), |i| {
                        let piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some((p, g, mut bufs)) = piece {
                            self.update(p, g, &mut bufs, first, t);
                        }
                    });
                }
                _ => self.update(p, g, &mut bufs, first, t),
            }
        }
    }

    /// The update of elements `p` with gradients `g` and buffers `bufs`
    /// (as [`Optimizer::buffer_names`]), at step `t`; `first`: the buffers
    /// were just made. As torch: the settings are doubles, and each
    /// scalar an operation takes (`1 - beta1`, `lr / bias_correction1`) is
    /// computed in double and then rounded to float32.
    fn update(&self, p: &mut [f32], g: &[f32], bufs: &mut [&mut [f32]], first: bool, t: f64) {
        match *self {
            Optimizer::Sgd {
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
            } => {
                let (lr, momentum, weight_decay) =
                    (lr as f32, momentum as f32, weight_decay as f32);
                let undamped = (1.0 - dampening) as f32;
                let decayed = |g: f32, p: f32| {
                    if weight_decay != 0.0 {
                        g + weight_decay * p
                    } else {
                        g
                    }
                };
                if momentum == 0.0 {
                    for (p, &g) in p.iter_mut().zip(g) {
                        *p += -lr * decayed(g, *p);
                    }
                    return;
                }
                // torch starts the momentum buffer at the first gradient,
                // undamped.
                for ((p, &g), b) in p.iter_mut().zip(g).zip(bufs[0].iter_mut()) {
                    let g = decayed(g, *p);
                    *b = if first {
                        g
                    } else {
                        *b * momentum + undamped * g
                    };
                    let step = if nesterov { g + momentum * *b } else { *b };
                    *p += -lr * step;
                }
            }
            Optimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let step_size = (lr / (1.0 - beta1.powf(t))) as f32;
                let bias2_sqrt = (1.0 - beta2.powf(t)).sqrt() as f32;
                let (w1, beta2_32, w2) = ((1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
                let (eps, weight_decay) = (eps as f32, weight_decay as f32);
                let (m, v) = bufs.split_at_mut(1);
                for (((p, &g), m), v) in p
                    .iter_mut()
                    .zip(g)
                    .zip(m[0].iter_mut())
                    .zip(v[0].iter_mut())
                {
                    let g = if weight_decay != 0.0 {
                        g + weight_decay * *p
                    } else {
                        g
                    };
                    // m.lerp_(g, 1 - beta1), in the form torch's lerp takes
                    // for that weight; v = beta2 v + (1 - beta2) g².
                    *m = if w1 < 0.5 {
                        *m + w1 * (g - *m)
                    } else {
                        g - (g - *m) * (1.0 - w1)
                    };
                    *v = *v * beta2_32 + w2 * g * g;
                    let denom = v.sqrt() / bias2_sqrt + eps;
                    *p += -step_size * (*m / denom);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn store(v: ArrayD<f32>) -> ParamStore {
        ParamStore::from_tensors(BTreeMap::from([("w".to_string(), v)]))
    }

    #[test]
    fn sgd_with_momentum_by_hand() {
        let sgd = Optimizer::Sgd {
            lr: 0.5,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        };
        let mut params = store(array![1.0f32].into_dyn());
        let mut state = State::default();
        let grads = BTreeMap::from([("w".to_string(), array![2.0f32].into_dyn())]);
        // Step 1: buf = 2, w = 1 - 0.5*2 = 0. Step 2: buf = 0.9*2 + 2 = 3.8,
        // w = 0 - 0.5*3.8 = -1.9.
        sgd.step(&mut state, &mut params, &grads, None);
        assert_eq!(params.get("w").unwrap()[[0]], 0.0);
        sgd.step(&mut state, &mut params, &grads, None);
        assert!((params.get("w").unwrap()[[0]] + 1.9).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_lr_times_the_sign() {
        let adam = Optimizer::Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut params = store(array![1.0f32, 1.0].into_dyn());
        let mut state = State::default();
        let grads = BTreeMap::from([("w".to_string(), array![3.0f32, -0.5].into_dyn())]);
        // m̂ = g, v̂ = g², so the step is lr * g / |g| (up to eps).
        adam.step(&mut state, &mut params, &grads, None);
        let w = params.get("w").unwrap();
        assert!(
            (w[[0]] - 0.9).abs() < 1e-6 && (w[[1]] - 1.1).abs() < 1e-6,
            "{w}"
        );
    }

    /// A parameter large enough to be cut into pieces on a pool, over a few
    /// steps of each optimizer: the same bits as on one thread.
    #[test]
    fn pieces_on_a_pool_update_as_one_thread_does() {
        let n = 3 * MIN_SPLIT_ELEMENTS + 7;
        let values = |seed: usize| {
            ArrayD::from_shape_fn(ndarray::IxDyn(&[n]), |i| {
                ((i[0] * 7919 + seed) % 1000) as f32 / 500.0 - 1.0
            })
        };
        let pool = crate::pool::shared(3).unwrap().unwrap();
        for optimizer in [
            Optimizer::Sgd {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.1,
                weight_decay: 0.01,
                nesterov: false,
            },
            Optimizer::Adam {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        ] {
            let (mut alone, mut split) = (store(values(1)), store(values(1)));
            let (mut state_alone, mut state_split) = (State::default(), State::default());
            for step in 0..3 {
                let grads = BTreeMap::from([("w".to_string(), values(step + 2))]);
                optimizer.step(&mut state_alone, &mut alone, &grads, None);
                optimizer.step(&mut state_split, &mut split, &grads, Some(&pool));
            }
            let same = alone
                .get("w")
                .unwrap()
                .iter()
                .zip(split.get("w").unwrap().iter())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}", optimizer.name());
            assert_ne!(alone.get("w").unwrap(), values(1));
        }
    }
}
