//! The model file's per-layer choices about parameters, applied to what the
//! layers declared for an input shape: `"init"` replaces a parameter's default
//! initializer, and `"share"` stores a parameter as another layer's, so both
//! layers read (and a file holds) one tensor. Plugins know nothing of either.

use std::collections::BTreeMap;

use crate::error::Error;
use crate::model::{LayerSpec, ModelSpec};
use crate::params::ParamInfo;
use crate::plan::LayerPlan;

/// Applies every layer's `init` and `share` entries to `plans` (one per
/// layer of `spec`, in order). A shared parameter takes its owner's shape
/// check, initializer and fans, and `stored_as` names the owner; chains
/// (`2` shares `1`, which shares `0`) resolve to the first owner.
pub fn bind_params(spec: &ModelSpec, plans: &mut [LayerPlan]) -> Result<(), Error> {
    let invalid = |message: String| Error::Model {
        path: spec.path.clone(),
        message,
    };
    for (layer, plan) in spec.layers.iter().zip(plans.iter_mut()) {
        for (local, init) in &layer.init {
            let index = plan
                .params
                .iter()
                .position(|p| &p.local_name == local)
                .ok_or_else(|| invalid(unknown_param(layer, "init", local, &plan.params)))?;
            plan.params[index].init = init.clone();
        }
    }

    let declared: BTreeMap<String, ParamInfo> = plans
        .iter()
        .flat_map(|plan| &plan.params)
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    for (layer, plan) in spec.layers.iter().zip(plans.iter()) {
        for (local, target) in &layer.share {
            let param = plan
                .params
                .iter()
                .find(|p| &p.local_name == local)
                .ok_or_else(|| invalid(unknown_param(layer, "share", local, &plan.params)))?;
            if *target == param.name {
                return Err(invalid(format!(
                    "layer '{}': \"share\" ties '{}' to itself; name another layer's parameter",
                    layer.name, param.name
                )));
            }
            let owner = declared.get(target).ok_or_else(|| {
                invalid(format!(
                    "layer '{}': \"share\" ties '{}' to '{target}', which no layer declares; \
                     the model's parameters are: {}",
                    layer.name,
                    param.name,
                    declared.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            if owner.shape != param.shape {
                return Err(invalid(format!(
                    "layer '{}': '{}' has shape {:?}, but '{target}', which it shares, has \
                     shape {:?}; shared parameters must have the same shape",
                    layer.name, param.name, param.shape, owner.shape
                )));
            }
            links.insert(param.name.clone(), target.clone());
        }
    }

    for plan in plans.iter_mut() {
        for param in plan.params.iter_mut() {
            let mut owner = &param.name;
            let mut path = vec![param.name.clone()];
            while let Some(next) = links.get(owner) {
                if path.contains(next) {
                    path.push(next.clone());
                    return Err(invalid(format!(
                        "\"share\" entries form a cycle: {}; one parameter of the cycle must \
                         own its tensor",
                        path.join(" → ")
                    )));
                }
                path.push(next.clone());
                owner = next;
            }
            if *owner != param.name {
                let owner = &declared[owner];
                param.stored_as = owner.name.clone();
                param.init = owner.init.clone();
                param.fan_in = owner.fan_in;
                param.fan_out = owner.fan_out;
            }
        }
    }
    Ok(())
}

fn unknown_param(layer: &LayerSpec, field: &str, local: &str, params: &[ParamInfo]) -> String {
    let has = if params.is_empty() {
        "it has no parameters".to_string()
    } else {
        format!(
            "its parameters are: {}",
            params
                .iter()
                .map(|p| p.local_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "layer '{}' (plugin '{}'): \"{field}\" names parameter '{local}', which the layer \
         does not have; {has}",
        layer.name, layer.plugin
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use layer_api::Init;

    use super::*;

    fn param(layer: &str, local: &str, shape: &[usize]) -> ParamInfo {
        let name = format!("{layer}.{local}");
        ParamInfo {
            stored_as: name.clone(),
            name,
            layer: layer.to_string(),
            local_name: local.to_string(),
            shape: shape.to_vec(),
            fan_in: shape[0],
            fan_out: *shape.last().unwrap(),
            init: Init::normal(0.0, 1.0),
        }
    }

    /// Three dense-like layers of 4 features each, with `layers` as the
    /// model file's layer list.
    fn bind(layers: &str) -> Result<Vec<LayerPlan>, String> {
        let spec = ModelSpec::parse(
            &format!(r#"{{"format": 1, "layers": {layers}}}"#),
            Path::new("m.json"),
        )
        .unwrap();
        let mut plans: Vec<LayerPlan> = ["0", "1", "2"]
            .iter()
            .map(|l| LayerPlan {
                inputs: Vec::new(),
                outputs: Vec::new(),
                input_shape: vec![2, 4],
                output_shape: vec![2, 4],
                params: vec![param(l, "weight", &[4, 4]), param(l, "bias", &[4])],
            })
            .collect();
        bind_params(&spec, &mut plans).map_err(|e| e.to_string())?;
        Ok(plans)
    }

    const PLAIN: &str = r#"{"type": "d"}"#;

    #[test]
    fn init_replaces_the_default_of_the_named_parameter_only() {
        let plans = bind(&format!(
            r#"[{{"type": "d", "init": {{"bias": "zeros"}}}}, {PLAIN}, {PLAIN}]"#
        ))
        .unwrap();
        assert_eq!(plans[0].params[1].init, Init::Zeros);
        assert_eq!(plans[0].params[0].init, Init::normal(0.0, 1.0));
        assert_eq!(plans[1].params[1].init, Init::normal(0.0, 1.0));
    }

    #[test]
    fn a_shared_parameter_is_stored_as_its_owner_with_the_owners_init() {
        let plans = bind(
            r#"[{"type": "d", "init": {"weight": "ones"}},
                {"type": "d", "share": {"weight": "0.weight"}},
                {"type": "d", "share": {"weight": "1.weight"}}]"#,
        )
        .unwrap();
        assert_eq!(plans[0].params[0].stored_as, "0.weight");
        assert_eq!(plans[1].params[0].stored_as, "0.weight");
        assert_eq!(plans[2].params[0].stored_as, "0.weight", "chains resolve");
        assert_eq!(plans[2].params[0].init, Init::Ones);
        assert_eq!(plans[1].params[1].stored_as, "1.bias");
    }

    #[test]
    fn sharing_mistakes_name_both_ends() {
        let cases = [
            (
                r#"[{"type": "d"}, {"type": "d", "share": {"weight": "0.bias"}}]"#,
                "layer '1': '1.weight' has shape [4, 4], but '0.bias', which it shares, has \
                 shape [4]",
            ),
            (
                r#"[{"type": "d"}, {"type": "d", "share": {"weight": "0.wieght"}}]"#,
                "ties '1.weight' to '0.wieght', which no layer declares",
            ),
            (
                r#"[{"type": "d", "share": {"weight": "0.weight"}}]"#,
                "ties '0.weight' to itself",
            ),
            (
                r#"[{"type": "d", "share": {"weight": "1.weight"}},
                    {"type": "d", "share": {"weight": "0.weight"}}]"#,
                "cycle: 0.weight → 1.weight → 0.weight",
            ),
            (
                r#"[{"type": "d", "share": {"kernel": "1.weight"}}]"#,
                "layer '0' (plugin 'd'): \"share\" names parameter 'kernel', which the layer \
                 does not have; its parameters are: weight, bias",
            ),
            (
                r#"[{"type": "d", "init": {"kernel": "zeros"}}]"#,
                "layer '0' (plugin 'd'): \"init\" names parameter 'kernel'",
            ),
        ];
        for (layers, expected) in cases {
            let err = bind(layers).unwrap_err();
            assert!(
                err.contains(expected),
                "{layers}\n  gave: {err}\n  want: {expected}"
            );
        }
    }
}
