//! `mydense`: `y = relu(x · W + b)` with `W` of shape `(in_units, units)` and
//! `b` of shape `(units,)` (the custom-layers chapter's `MyDense`/`MyLinear`).
//! The last input axis holds the features; any leading axes are kept, so an
//! input `(2, 3, 64)` gives `(2, 3, units)`. `in_units` may be left out of the
//! config and is then taken from the input.
//!
//! Parameters and their default initializers, as the chapter's `MyLinear`
//! (`torch.randn`); a model file may override either with `"init"`:
//!
//! | parameter | shape | default | fans (Xavier, Kaiming) |
//! | --- | --- | --- | --- |
//! | `weight` | `(in_units, units)` | `normal` (mean 0, std 1) | in `in_units`, out `units` |
//! | `bias` | `(units,)` | `normal` (mean 0, std 1) | in and out `units` |

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Init, Layer, ParamSpec, Params};
use ndarray::{Axis, Ix1, Ix2};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MyDenseConfig {
    /// Number of output features.
    pub units: usize,
    /// Number of input features; inferred from the input when absent.
    #[serde(default)]
    pub in_units: Option<usize>,
}

pub struct MyDense {
    units: usize,
    in_units: Option<usize>,
}

impl MyDense {
    /// The number of input features, checked against the config.
    fn in_units(&self, input_shape: &[usize]) -> Result<usize, String> {
        let Some(&features) = input_shape.last() else {
            return Err(
                "needs an input of rank 1 or more, whose last axis holds the \
                        features; got a scalar"
                    .into(),
            );
        };
        match self.in_units {
            Some(expected) if expected != features => Err(format!(
                "expects {expected} input features (config `in_units`), but the input's \
                 last axis has {features} (input shape {input_shape:?})"
            )),
            _ => Ok(features),
        }
    }
}

impl Layer for MyDense {
    const NAME: &'static str = "mydense";
    const DESCRIPTION: &'static str = "y = relu(x · W + b), W of shape (in_units, units)";
    type Config = MyDenseConfig;

    fn new(config: MyDenseConfig) -> Result<Self, String> {
        if config.units == 0 {
            return Err("`units` must be at least 1".into());
        }
        if config.in_units == Some(0) {
            return Err("`in_units` must be at least 1 (or left out to infer it)".into());
        }
        Ok(MyDense {
            units: config.units,
            in_units: config.in_units,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        self.in_units(input_shape)?;
        let mut shape = input_shape.to_vec();
        *shape.last_mut().expect("rank checked") = self.units;
        Ok(shape)
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        let in_units = self.in_units(input_shape)?;
        Ok(vec![
            ParamSpec::new("weight", [in_units, self.units], Init::normal(0.0, 1.0))
                .fans(in_units, self.units),
            ParamSpec::new("bias", [self.units], Init::normal(0.0, 1.0)),
        ])
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        let Ok(in_units) = self.in_units(input_shape) else {
            return 0;
        };
        let rows: usize = input_shape[..input_shape.len() - 1].iter().product();
        // The product, then bias and relu.
        (2 * rows * in_units * self.units + 2 * rows * self.units) as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let weight = params.get::<Ix2>("weight")?;
        let bias = params.get::<Ix1>("bias")?;
        let in_units = weight.nrows();
        let rows = input.len() / in_units.max(1);
        let x = input
            .into_shape_with_order((rows, in_units))
            .map_err(|e| format!("input as ({rows}, {in_units}): {e}"))?;
        let mut y = output
            .into_shape_with_order((rows, self.units))
            .map_err(|e| format!("output as ({rows}, {}): {e}", self.units))?;
        layer_kernels::matmul(x, weight, y.view_mut())?;
        for mut row in y.axis_iter_mut(Axis(0)) {
            row.zip_mut_with(&bias, |v, &b| *v = (*v + b).max(0.0));
        }
        Ok(())
    }
}

export_layer!(MyDense);
