//! `cast`: converts a `float32` or `float64` tensor to the element type its
//! config names (`{"to": "int64"}`), rounding to the nearest integer for
//! integer types, as a test of chains whose layers differ in element type.

use layer_api::ndarray::ArrayViewD;
use layer_api::{
    export_layer, DType, Inputs, MultiLayer, Outputs, Params, Plan, Signature, TensorInfo,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CastConfig {
    /// The output's element type, as numpy spells it.
    pub to: String,
}

pub struct Cast {
    to: DType,
}

fn converted<T: Copy>(x: &ArrayViewD<'_, f64>, f: impl Fn(f64) -> T) -> Vec<T> {
    x.iter().map(|&v| f(v)).collect()
}

impl MultiLayer for Cast {
    const DESCRIPTION: &'static str = "y = x converted to the config's element type (for tests)";
    type Config = CastConfig;

    fn new(config: CastConfig) -> Result<Self, String> {
        let to = DType::from_name(&config.to)
            .filter(|d| [DType::F32, DType::F64, DType::I64, DType::I32].contains(d))
            .ok_or_else(|| {
                format!(
                    "`to` must be float32, float64, int64 or int32, not \"{}\"",
                    config.to
                )
            })?;
        Ok(Cast { to })
    }

    fn signature(&self) -> Signature {
        Signature::new()
            .input("input", [DType::F32, DType::F64])
            .output("output")
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let x = inputs[0].as_ref().ok_or("the input is required")?;
        Ok(Plan::new([TensorInfo::new(self.to, x.shape.clone())]))
    }

    fn batch_independent(&self) -> bool {
        true
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        _params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let x = match inputs.dtype("input")? {
            Some(DType::F32) => inputs.get::<f32>("input")?.mapv(f64::from),
            _ => inputs.get::<f64>("input")?.to_owned(),
        };
        let x = x.view();
        match self.to {
            DType::F32 => fill(outputs.take::<f32>("output")?, converted(&x, |v| v as f32)),
            DType::F64 => fill(outputs.take::<f64>("output")?, converted(&x, |v| v)),
            DType::I64 => fill(
                outputs.take::<i64>("output")?,
                converted(&x, |v| v.round() as i64),
            ),
            _ => fill(
                outputs.take::<i32>("output")?,
                converted(&x, |v| v.round() as i32),
            ),
        }
        Ok(())
    }
}

fn fill<T: Copy>(mut out: layer_api::ArrayViewMutD<'_, T>, values: Vec<T>) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = v;
    }
}

export_layer!(Cast);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::Harness;

    #[test]
    fn rounds_to_int64_and_keeps_the_shape() {
        let h = Harness::new::<Cast>(r#"{"to": "int64"}"#).unwrap();
        let x: ArrayD<f32> = array![[1.4f32, -2.6], [0.5, 7.0]].into_dyn();
        let out = h.run(vec![("input", x.into())], &[]).unwrap();
        let y: ArrayD<i64> = out[0].1.clone().into_array().unwrap();
        // f64::round rounds half away from zero: 0.5 -> 1.
        assert_eq!(y, array![[1i64, -3], [1, 7]].into_dyn());
    }

    #[test]
    fn refuses_an_unknown_type() {
        let err = Harness::new::<Cast>(r#"{"to": "int8"}"#).err().unwrap();
        assert_eq!(
            err,
            "`to` must be float32, float64, int64 or int32, not \"int8\""
        );
    }
}
