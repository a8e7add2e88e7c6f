//! `faulty`: a test plugin that passes its input through unchanged, except
//! where its config tells it to fail. Tests use it to check that the host
//! reports each failure, naming the layer, and keeps running.

use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, Params};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    #[default]
    None,
    PanicInNew,
    PanicInShape,
    PanicInForward,
    ErrorInForward,
    /// Fails only on an input holding a negative value: a streamed run then
    /// fails in the chunk that has one, after earlier chunks were written.
    ErrorOnNegativeInput,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultyConfig {
    #[serde(default)]
    pub fail: Failure,
}

pub struct Faulty {
    fail: Failure,
}

impl Layer for Faulty {
    const NAME: &'static str = "faulty";
    const DESCRIPTION: &'static str = "identity that fails on purpose (for tests)";
    type Config = FaultyConfig;

    fn new(config: FaultyConfig) -> Result<Self, String> {
        if config.fail == Failure::PanicInNew {
            panic!("faulty: told to panic in new");
        }
        Ok(Faulty { fail: config.fail })
    }

    fn output_shape(&self, input_shape: &[usize]) -> Result<Vec<usize>, String> {
        if self.fail == Failure::PanicInShape {
            panic!("faulty: told to panic in output_shape");
        }
        Ok(input_shape.to_vec())
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        input: ArrayViewD<'_, f32>,
        _params: &Params<'_>,
        mut output: ArrayViewMutD<'_, f32>,
    ) -> Result<(), String> {
        match self.fail {
            Failure::PanicInForward => panic!("faulty: told to panic in forward"),
            Failure::ErrorInForward => Err("faulty: told to fail in forward".into()),
            Failure::ErrorOnNegativeInput if input.iter().any(|&v| v < 0.0) => {
                Err("faulty: told to fail on a negative input".into())
            }
            _ => {
                output.assign(&input);
                Ok(())
            }
        }
    }
}

export_layer!(Faulty);
