//! `centered`: `y = x - mean(x)`, the mean taken over every element of the
//! input, batch axis included (the custom-layers chapter's `CenteredLayer`).
//! It has no parameters (so nothing to initialize), and it is not
//! batch-independent: each output element depends on the whole batch.

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};

pub struct Centered;

impl Layer for Centered {
    const NAME: &'static str = "centered";
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
}

export_layer!(Centered);
