//! `linear`: `torch.nn.Linear` exactly: `y = x · Wᵀ + b` with `W` of shape
//! `(out_features, in_features)` and `b` of shape `(out_features,)`, no
//! activation. `"bias": false` leaves `b` out, as `nn.Linear(…, bias=False)`
//! does, so a `state_dict` of `nn.Sequential(nn.Linear(…), …)` saved with
//! safetensors loads as it is. The last input axis holds the features; any
//! leading axes are kept. `in_features` may be left out of the config and is
//! then taken from the input.
//!
//! Parameters and their default initializers, PyTorch's; a model file may
//! override either with `"init"`:
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(out_features, in_features)` | `kaiming_uniform` (fan in, gain `√(1/3)`): uniform on `±1/√in_features`, as `kaiming_uniform_(a = √5)` | in `in_features`, out `out_features` |
//! | `bias` (unless `"bias": false`) | `(out_features,)` | `uniform` on `±1/√in_features` | in and out `out_features` |

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, FanMode, Init, Layer, ParamSpec, Params};
use ndarray::{linalg::general_mat_mul, Axis, Ix1, Ix2};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearConfig {
    /// Number of output features.
    pub out_features: usize,
    /// Number of input features; inferred from the input when absent.
    #[serde(default)]
    pub in_features: Option<usize>,
    /// Whether the layer adds a bias (default true, as in PyTorch).
    #[serde(default = "yes")]
    pub bias: bool,
}

fn yes() -> bool {
    true
}

pub struct Linear {
    out_features: usize,
    in_features: Option<usize>,
    bias: bool,
}

impl Linear {
    /// The number of input features, checked against the config.
    fn in_features(&self, input_shape: &[usize]) -> Result<usize, String> {
        let Some(&features) = input_shape.last() else {
            return Err(
                "needs an input of rank 1 or more, whose last axis holds the \
                        features; got a scalar"
                    .into(),
            );
        };
        match self.in_features {
            Some(expected) if expected != features => Err(format!(
                "expects {expected} input features (config `in_features`), but the input's \
                 last axis has {features} (input shape {input_shape:?})"
            )),
            _ => Ok(features),
        }
    }
}

impl Layer for Linear {
    const NAME: &'static str = "linear";
    const DESCRIPTION: &'static str =
        "y = x · Wᵀ + b, W of shape (out_features, in_features), as torch.nn.Linear";
    type Config = LinearConfig;

    fn new(config: LinearConfig) -> Result<Self, String> {
        if config.out_features == 0 {
            return Err("`out_features` must be at least 1".into());
        }
        if config.in_features == Some(0) {
            return Err("`in_features` must be at least 1 (or left out to infer it)".into());
        }
        Ok(Linear {
            out_features: config.out_features,
            in_features: config.in_features,
            bias: config.bias,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        self.in_features(input_shape)?;
        let mut shape = input_shape.to_vec();
        *shape.last_mut().expect("rank checked") = self.out_features;
        Ok(shape)
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        let in_features = self.in_features(input_shape)?;
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut specs = vec![ParamSpec::new(
            "weight",
            [self.out_features, in_features],
            Init::KaimingUniform {
                mode: FanMode::FanIn,
                gain: (1.0f32 / 3.0).sqrt(),
            },
        )
        .fans(in_features, self.out_features)];
        if self.bias {
            specs.push(ParamSpec::new(
                "bias",
                [self.out_features],
                Init::uniform(-bound, bound),
            ));
        }
        Ok(specs)
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let weight = params.get::<Ix2>("weight")?;
        let in_features = weight.ncols();
        let rows = input.len() / in_features.max(1);
        let x = input
            .into_shape_with_order((rows, in_features))
            .map_err(|e| format!("input as ({rows}, {in_features}): {e}"))?;
        let mut y = output
            .into_shape_with_order((rows, self.out_features))
            .map_err(|e| format!("output as ({rows}, {}): {e}", self.out_features))?;
        general_mat_mul(1.0, &x, &weight.t(), 0.0, &mut y);
        if self.bias {
            let bias = params.get::<Ix1>("bias")?;
            for mut row in y.axis_iter_mut(Axis(0)) {
                row += &bias;
            }
        }
        Ok(())
    }
}

export_layer!(Linear);
