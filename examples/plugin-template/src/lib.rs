//! `scale`: multiplies each feature (the last input axis) by its own learned
//! factor, `y[..., i] = x[..., i] * factor[i]`. The layer is called `scale`
//! because the crate is: `export_layer!` names it after the library,
//! `libscale.so`.

use layer_api::ndarray::{Axis, Ix1};
use layer_api::{
    export_layer, ArrayViewD, ArrayViewMutD, Grads, Init, Layer, ParamSpec, Params, INPUT,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// The factors' initial value when no parameter file gives them.
    #[serde(default = "one")]
    initial: f32,
}

fn one() -> f32 {
    1.0
}

pub struct Scale {
    initial: f32,
}

impl Layer for Scale {
    const DESCRIPTION: &'static str = "y = x * factor, one factor per feature";
    type Config = ScaleConfig;

    fn new(config: ScaleConfig) -> Result<Self, String> {
        if !config.initial.is_finite() {
            return Err(format!("`initial` must be finite, not {}", config.initial));
        }
        Ok(Scale {
            initial: config.initial,
        })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        if input_shape.is_empty() {
            return Err("needs an input of rank 1 or more; got a scalar".into());
        }
        Ok(input_shape.to_vec())
    }

    fn params(&self, input_shape: &[usize]) -> Result<Vec<ParamSpec>, String> {
        let &features = input_shape
            .last()
            .ok_or("needs an input of rank 1 or more")?;
        let init = Init::Constant {
            value: self.initial,
        };
        Ok(vec![ParamSpec::new("factor", [features], init)])
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        let factor = params.get::<Ix1>("factor")?;
        output.assign(&input);
        output *= &factor; // broadcast along the last axis
        Ok(())
    }

    // Optional: the gradients, so that `host train` can train through it.
    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        let factor = params.get::<Ix1>("factor")?;
        // dL/dx = dL/dy * factor (`None`: the host does not need it).
        if let Some(mut grad_input) = grads.input::<f32>(INPUT)? {
            grad_input.assign(&grad_output);
            grad_input *= &factor;
        }
        // dL/dfactor[i] = the sum, over every row, of dL/dy[.., i] * x[.., i].
        if let Some(mut grad_factor) = grads.param("factor")? {
            let features = factor.len();
            let rows = input.len().checked_div(features).unwrap_or(0);
            let products = (&grad_output * &input)
                .into_shape_with_order((rows, features))
                .map_err(|e| e.to_string())?;
            grad_factor.assign(&products.sum_axis(Axis(0)).into_dyn());
        }
        Ok(())
    }
}

export_layer!(Scale);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::array;
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};

    #[test]
    fn multiplies_each_feature_by_its_own_factor() {
        let x = array![[1.0f32, -2.0, 3.0], [0.5, 4.0, -6.0]].into_dyn();
        let factor = array![1.0f32, -2.0, 0.5].into_dyn();
        let y = testing::forward::<Scale>("{}", x, &[("factor", factor)]).unwrap();
        assert_eq!(y, array![[1.0f32, 4.0, 1.5], [0.5, -8.0, -3.0]].into_dyn());
    }

    #[test]
    fn backward_agrees_with_finite_differences_of_forward() {
        let x = array![[1.0f32, -2.0, 3.0], [0.5, 4.0, -6.0]].into_dyn();
        let factor = array![1.0f32, -2.0, 0.5].into_dyn();
        let layer = Harness::new::<Scale>("{}").unwrap();
        gradcheck(
            &layer,
            vec![(INPUT, x.into())],
            &[("factor", factor)],
            Tolerance::F32,
        )
        .unwrap();
    }
}
