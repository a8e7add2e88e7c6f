//! `relu`: `y = max(x, 0)` element by element, as `torch.nn.ReLU()` (and
//! `torch.relu`). A NaN stays NaN, as in PyTorch, rather than becoming 0.
//! Any input shape, the output has the same. Vectorized
//! (`layer_kernels::elementwise::relu`).
//!
//! Backward: `dx = g` where `x > 0`, else 0 (as torch, whose gradient at 0
//! and at NaN is 0).
//!
//! Config: none (`{}`). Parameters: none.

use layer_api::ndarray::Zip;
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Grads, Layer, NoConfig, Params, INPUT};
use layer_kernels::elementwise::relu;

pub struct Relu;

impl Layer for Relu {
    const DESCRIPTION: &'static str = "y = max(x, 0), NaN kept, as torch.nn.ReLU";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Relu)
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input_shape.to_vec())
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        input_shape.iter().product::<usize>() as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        match (input.as_slice(), output.as_slice_mut()) {
            (Some(x), Some(y)) => relu(x, y),
            // Not what the host lends, but a view may be strided.
            _ => {
                output.zip_mut_with(&input, |y, &x| *y = if x <= 0.0 { 0.0 } else { x });
                Ok(())
            }
        }
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        if let Some(mut dx) = grads.input::<f32>(INPUT)? {
            Zip::from(&mut dx)
                .and(&input)
                .and(&grad_output)
                .for_each(|d, &x, &g| *d = if x > 0.0 { g } else { 0.0 });
        }
        Ok(())
    }
}

export_layer!(Relu);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    #[test]
    fn zeroes_negatives_and_keeps_the_rest() {
        let x = array![[-2.0f32, -0.5, 0.0], [0.25, 3.0, f32::INFINITY]].into_dyn();
        let y = testing::forward::<Relu>("{}", x, &[]).unwrap();
        assert_eq!(
            y,
            array![[0.0f32, 0.0, 0.0], [0.25, 3.0, f32::INFINITY]].into_dyn()
        );
    }

    #[test]
    fn nan_stays_nan_and_minus_infinity_becomes_zero() {
        let x = array![f32::NAN, f32::NEG_INFINITY, -1e-30].into_dyn();
        let y = testing::forward::<Relu>("{}", x, &[]).unwrap();
        assert!(y[0].is_nan(), "relu(NaN) = {}", y[0]);
        assert_eq!((y[1], y[2]), (0.0, 0.0));
    }

    #[test]
    fn any_shape_is_kept_and_options_are_refused() {
        let x = layer_api::ndarray::ArrayD::<f32>::zeros(vec![2, 0, 3]);
        let y = testing::forward::<Relu>("{}", x, &[]).unwrap();
        assert_eq!(y.shape(), &[2, 0, 3]);
        let err = testing::forward::<Relu>(r#"{"inplace": true}"#, array![1.0f32].into_dyn(), &[])
            .unwrap_err();
        assert!(err.contains("unknown field `inplace`"), "{err}");
    }

    fn input_gradient(x: ArrayD<f32>, g: ArrayD<f32>) -> ArrayD<f32> {
        let h = Harness::new::<Relu>("{}").unwrap();
        let got = h
            .gradients(vec![(INPUT, x.into())], &[], vec![(OUTPUT, g.into())])
            .unwrap();
        got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap()
    }

    #[test]
    fn backward_passes_the_gradient_where_x_is_positive_by_hand() {
        // x = 0 and NaN get 0, as torch's threshold_backward.
        let x = array![[-2.0f32, 0.5, 0.0], [3.0, -0.1, f32::NAN]].into_dyn();
        let g = array![[1.0f32, 2.0, 3.0], [-4.0, 5.0, 6.0]].into_dyn();
        assert_eq!(
            input_gradient(x, g),
            array![[0.0f32, 2.0, 0.0], [-4.0, 0.0, 0.0]].into_dyn()
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Away from the kink at 0: every |x| ≥ 0.1.
        let x = array![[-1.5f32, 0.25, 0.1], [-0.1, 2.0, -0.7]].into_dyn();
        let h = Harness::new::<Relu>("{}").unwrap();
        gradcheck(&h, vec![(INPUT, x.into())], &[], Tolerance::F32).unwrap();
    }
}
