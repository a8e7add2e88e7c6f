//! `centered`: `y = x - mean(x)`, the mean taken over every element of the
//! input, batch axis included (the custom-layers chapter's `CenteredLayer`).
//! It has no parameters (so nothing to initialize), and it is not
//! batch-independent: each output element depends on the whole batch.
//! Backward: `dx = g - mean(g)`, the mean over every element, in `f64`.

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Grads, Layer, NoConfig, Params, INPUT};

pub struct Centered;

impl Layer for Centered {
    const DESCRIPTION: &'static str = "y = x - mean(x), the mean over every element";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Centered)
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input_shape.to_vec())
    }

    fn batch_independent(&self) -> bool {
        false
    }

    fn flops(&self, input_shape: &[usize]) -> u64 {
        // A sum, then a subtraction per element.
        2 * input_shape.iter().product::<usize>() as u64
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        if input.is_empty() {
            return Ok(());
        }
        // Summing in f64 keeps the mean exact enough that the output's own
        // mean is zero to within f32 rounding of the elements.
        let sum: f64 = input.iter().map(|&x| f64::from(x)).sum();
        let mean = (sum / input.len() as f64) as f32;
        output.zip_mut_with(&input, |y, &x| *y = x - mean);
        Ok(())
    }

    const BACKWARD: bool = true;

    fn backward(
        &self,
        _input: ArrayViewD<'_, f32>,
        _output: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        grad_output: ArrayViewD<'_, f32>,
        grads: &mut Grads<'_>,
    ) -> Result<(), String> {
        // Every output element moves by -1/n with each input element, so
        // the input gradient is the output gradient less its mean.
        let Some(mut dx) = grads.input::<f32>(INPUT)? else {
            return Ok(());
        };
        if grad_output.is_empty() {
            return Ok(());
        }
        let sum: f64 = grad_output.iter().map(|&g| f64::from(g)).sum();
        let mean = sum / grad_output.len() as f64;
        dx.zip_mut_with(&grad_output, |d, &g| *d = (f64::from(g) - mean) as f32);
        Ok(())
    }
}

export_layer!(Centered);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD, IxDyn};
    use layer_api::testing::{self, gradcheck, Harness, Tolerance};
    use layer_api::OUTPUT;

    #[test]
    fn subtracts_the_mean_of_every_element_batch_included() {
        // Sum 24 over 6 elements: the mean is 4.
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 9.0]].into_dyn();
        let y = testing::forward::<Centered>("{}", x, &[]).unwrap();
        assert_eq!(y, array![[-3.0f32, -2.0, -1.0], [0.0, 1.0, 5.0]].into_dyn());
    }

    #[test]
    fn matches_mean_subtraction_on_a_larger_input() {
        let shape = [3, 2, 5];
        let values: Vec<f32> = (0..30)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
            .collect();
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64;
        let x = ArrayD::from_shape_vec(IxDyn(&shape), values.clone()).unwrap();
        let y = testing::forward::<Centered>("{}", x, &[]).unwrap();
        assert_eq!(y.shape(), &shape);
        for (got, &v) in y.iter().zip(&values) {
            let want = (f64::from(v) - mean) as f32;
            assert!((got - want).abs() < 1e-6, "{got} != {want}");
        }
    }

    #[test]
    fn an_empty_input_gives_an_empty_output() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[0, 4]));
        let y = testing::forward::<Centered>("{}", x, &[]).unwrap();
        assert_eq!(y.shape(), &[0, 4]);
    }

    #[test]
    fn refuses_a_config_with_fields() {
        let err = testing::forward::<Centered>(r#"{"units": 3}"#, array![1.0f32].into_dyn(), &[])
            .unwrap_err();
        assert!(err.contains("unknown field `units`"), "{err}");
    }

    #[test]
    fn backward_subtracts_the_mean_gradient_by_hand() {
        // g sums to 12 over 6 elements: dx = g - 2.
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 9.0]].into_dyn();
        let g = array![[1.0f32, 0.0, -1.0], [2.0, 4.0, 6.0]].into_dyn();
        let h = Harness::new::<Centered>("{}").unwrap();
        let got = h
            .gradients(vec![(INPUT, x.into())], &[], vec![(OUTPUT, g.into())])
            .unwrap();
        let dx = got.inputs[0]
            .1
            .clone()
            .unwrap()
            .into_array::<f32>()
            .unwrap();
        assert_eq!(
            dx,
            array![[-1.0f32, -2.0, -3.0], [0.0, 2.0, 4.0]].into_dyn()
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let x = ArrayD::from_shape_vec(
            IxDyn(&[2, 3, 2]),
            (0..12).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect(),
        )
        .unwrap();
        let h = Harness::new::<Centered>("{}").unwrap();
        gradcheck(&h, vec![(INPUT, x.into())], &[], Tolerance::F32).unwrap();
    }
}
