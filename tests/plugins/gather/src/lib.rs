//! `gather`: a test plugin with two named inputs of different element types
//! and two outputs of different element types, so that tests can check what
//! the host does beyond one `float32` tensor in and out.
//!
//! * inputs: `indices`, `int64` or `int32` of shape `(b,)`; `table`,
//!   `float32` of shape `(n, d)`;
//! * outputs: `rows`, `float32` `(b, d)`, `rows[i] = table[indices[i]]`;
//!   `sums`, `float64` `(b,)`, the sum of each gathered row computed in
//!   `float64`.
//!
//! An index outside `[0, n)` is an error naming it and the bound. The config
//! `{"offset": k}` adds `k` to every index (default 0): a deliberately wrong
//! layer for tests, whose output no longer matches a reference and whose
//! probes run out of the table.
//!
//! Not batch-independent: the table is an input, but its rows are not batch
//! rows (splitting it along axis 0 with `indices` would cut the table), so
//! the layer does not claim that row `i` of every output depends only on row
//! `i` of every input.

use layer_api::ndarray::{Ix1, Ix2};
use layer_api::{
    export_layer, DType, Inputs, MultiLayer, Outputs, Params, Plan, Probe, ProbeInput, Signature,
    TensorInfo,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatherConfig {
    /// Added to every index before the lookup.
    #[serde(default)]
    pub offset: i64,
}

pub struct Gather {
    offset: i64,
}

/// The table its probes use: `(PROBE_ROWS, 3)`, indices in `[0, PROBE_ROWS)`.
const PROBE_ROWS: usize = 5;

impl MultiLayer for Gather {
    const DESCRIPTION: &'static str =
        "rows[i] = table[indices[i]], sums[i] = the sum of that row in float64 (for tests)";
    type Config = GatherConfig;

    fn new(config: GatherConfig) -> Result<Self, String> {
        Ok(Gather {
            offset: config.offset,
        })
    }

    fn signature(&self) -> Signature {
        Signature::new()
            .input("indices", [DType::I64, DType::I32])
            .input("table", [DType::F32])
            .output("rows")
            .output("sums")
    }

    fn plan(&self, inputs: &[Option<TensorInfo>]) -> Result<Plan, String> {
        let [Some(indices), Some(table)] = inputs else {
            return Err("takes two inputs, `indices` and `table`".into());
        };
        let &[batch] = indices.shape.as_slice() else {
            return Err(format!(
                "`indices` must have shape (b,), got {:?}",
                indices.shape
            ));
        };
        let &[_, width] = table.shape.as_slice() else {
            return Err(format!(
                "`table` must have shape (n, d), got {:?}",
                table.shape
            ));
        };
        Ok(Plan::new([
            TensorInfo::new(DType::F32, [batch, width]),
            TensorInfo::new(DType::F64, [batch]),
        ]))
    }

    fn batch_independent(&self) -> bool {
        false
    }

    fn probes(&self) -> Vec<Probe> {
        // Index dtype left open: check-plugin tries int64 and int32.
        let table = ProbeInput::new([PROBE_ROWS, 3]).dtype(DType::F32);
        [6, 0]
            .map(|batch| {
                Probe::new([
                    Some(ProbeInput::new([batch]).range(0, PROBE_ROWS as i64)),
                    Some(table.clone()),
                ])
            })
            .to_vec()
    }

    fn forward(
        &self,
        inputs: &Inputs<'_>,
        _params: &Params<'_>,
        outputs: &mut Outputs<'_>,
    ) -> Result<(), String> {
        let table = inputs
            .get::<f32>("table")?
            .into_dimensionality::<Ix2>()
            .map_err(|e| format!("`table`: {e}"))?;
        let indices: Vec<i64> = match inputs.dtype("indices")? {
            Some(DType::I32) => inputs
                .get::<i32>("indices")?
                .iter()
                .map(|&i| i64::from(i))
                .collect(),
            _ => inputs.get::<i64>("indices")?.iter().copied().collect(),
        };
        let mut rows = outputs
            .take::<f32>("rows")?
            .into_dimensionality::<Ix2>()
            .map_err(|e| format!("`rows`: {e}"))?;
        let mut sums = outputs
            .take::<f64>("sums")?
            .into_dimensionality::<Ix1>()
            .map_err(|e| format!("`sums`: {e}"))?;
        let n = table.nrows();
        for (i, &given) in indices.iter().enumerate() {
            let index = given.saturating_add(self.offset);
            let row = usize::try_from(index)
                .ok()
                .filter(|&r| r < n)
                .ok_or_else(|| {
                    let which = if self.offset == 0 {
                        format!("indices[{i}]")
                    } else {
                        format!("indices[{i}] = {given} plus offset {}", self.offset)
                    };
                    format!("index {index} ({which}) is outside [0, {n}): the table has {n} rows")
                })?;
            let source = table.row(row);
            rows.row_mut(i).assign(&source);
            sums[i] = source.iter().map(|&v| f64::from(v)).sum();
        }
        Ok(())
    }
}

export_layer!(Gather);

#[cfg(test)]
mod tests {
    use super::*;
    use layer_api::ndarray::{array, ArrayD};
    use layer_api::testing::{Harness, Tensor};

    fn table() -> ArrayD<f32> {
        array![[1.0f32, 2.0], [0.5, -4.0], [3.0, 0.25]].into_dyn()
    }

    #[test]
    fn gathers_rows_and_sums_them_for_either_index_type() {
        let harness = Harness::new::<Gather>("{}").unwrap();
        for indices in [
            Tensor::from(array![2i64, 0, 2].into_dyn()),
            Tensor::from(array![2i32, 0, 2].into_dyn()),
        ] {
            let out = harness
                .run(vec![("indices", indices), ("table", table().into())], &[])
                .unwrap();
            assert_eq!(out[0].0, "rows");
            assert_eq!(
                out[0].1,
                Tensor::from(array![[3.0f32, 0.25], [1.0, 2.0], [3.0, 0.25]].into_dyn())
            );
            assert_eq!(
                out[1].1,
                Tensor::from(array![3.25f64, 3.0, 3.25].into_dyn())
            );
        }
    }

    #[test]
    fn an_index_outside_the_table_is_an_error_naming_it_and_the_bound() {
        let harness = Harness::new::<Gather>("{}").unwrap();
        let run = |h: &Harness, i: i64| {
            h.run(
                vec![
                    ("indices", array![0i64, i].into_dyn().into()),
                    ("table", table().into()),
                ],
                &[],
            )
            .unwrap_err()
        };
        assert_eq!(
            run(&harness, 3),
            "index 3 (indices[1]) is outside [0, 3): the table has 3 rows"
        );
        assert!(run(&harness, -1).starts_with("index -1 (indices[1])"));
        let shifted = Harness::new::<Gather>(r#"{"offset": 1}"#).unwrap();
        assert_eq!(
            run(&shifted, 2),
            "index 3 (indices[1] = 2 plus offset 1) is outside [0, 3): the table has 3 rows"
        );
    }
}
