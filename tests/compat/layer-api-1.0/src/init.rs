//! Parameter initializers: the shared vocabulary between a plugin (which
//! declares a default for each parameter) and the host (which samples it, or
//! applies an override from the model file). The JSON form is the same in both
//! places: a bare name (`"zeros"`) or a one-key object with arguments
//! (`{"normal": {"std": 0.05}}`).

use serde::{de::Error as _, Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// How a parameter's initial values are drawn.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Every element set to `value`.
    Constant { value: f32 },
    /// Normal distribution (defaults: mean 0, std 1, as `torch.randn`).
    Normal { mean: f32, std: f32 },
    /// Uniform on `[low, high)` (defaults: 0 and 1).
    Uniform { low: f32, high: f32 },
    /// Glorot uniform: bound `gain * sqrt(6 / (fan_in + fan_out))`.
    XavierUniform { gain: f32 },
    /// Glorot normal: std `gain * sqrt(2 / (fan_in + fan_out))`.
    XavierNormal { gain: f32 },
    /// He uniform: bound `gain * sqrt(3 / fan)` (gain defaults to sqrt(2)).
    KaimingUniform { mode: FanMode, gain: f32 },
    /// He normal: std `gain / sqrt(fan)` (gain defaults to sqrt(2)).
    KaimingNormal { mode: FanMode, gain: f32 },
}

/// Which fan the Kaiming initializers scale by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FanMode {
    #[default]
    FanIn,
    FanOut,
}

impl Init {
    /// `Normal` with the given mean and standard deviation.
    pub fn normal(mean: f32, std: f32) -> Init {
        Init::Normal { mean, std }
    }

    /// `Uniform` on `[low, high)`.
    pub fn uniform(low: f32, high: f32) -> Init {
        Init::Uniform { low, high }
    }

    /// The JSON text of this initializer, as a model file would write it.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an initializer always serializes")
    }

    /// Parses the JSON form; the error says what would have been right.
    pub fn from_json(value: &Value) -> Result<Init, String> {
        let (name, args) = match value {
            Value::String(name) => (name.as_str(), Value::Object(Default::default())),
            Value::Object(map) if map.len() == 1 => {
                let (name, args) = map.iter().next().expect("one entry");
                (name.as_str(), args.clone())
            }
            other => {
                return Err(format!(
                    "an initializer is a name such as \"zeros\" or an object with one key \
                     such as {{\"normal\": {{\"std\": 0.05}}}}, not `{other}`"
                ))
            }
        };
        let parse_err = |e: serde_json::Error| format!("initializer `{name}`: {e}");
        let init = match name {
            "zeros" => {
                serde_json::from_value::<NoArgs>(args).map_err(parse_err)?;
                Init::Zeros
            }
            "ones" => {
                serde_json::from_value::<NoArgs>(args).map_err(parse_err)?;
                Init::Ones
            }
            "constant" => {
                let a: ConstantArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::Constant { value: a.value }
            }
            "normal" => {
                let a: NormalArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::Normal {
                    mean: a.mean,
                    std: a.std,
                }
            }
            "uniform" => {
                let a: UniformArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::Uniform {
                    low: a.low,
                    high: a.high,
                }
            }
            "xavier_uniform" => {
                let a: GainArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::XavierUniform { gain: a.gain }
            }
            "xavier_normal" => {
                let a: GainArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::XavierNormal { gain: a.gain }
            }
            "kaiming_uniform" => {
                let a: KaimingArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::KaimingUniform {
                    mode: a.mode,
                    gain: a.gain,
                }
            }
            "kaiming_normal" => {
                let a: KaimingArgs = serde_json::from_value(args).map_err(parse_err)?;
                Init::KaimingNormal {
                    mode: a.mode,
                    gain: a.gain,
                }
            }
            other => {
                return Err(format!(
                    "unknown initializer `{other}`; expected one of {}",
                    Init::NAMES.join(", ")
                ))
            }
        };
        init.validate()
            .map_err(|e| format!("initializer `{name}`: {e}"))?;
        Ok(init)
    }

    /// Every initializer name, as the JSON form spells it.
    pub const NAMES: &'static [&'static str] = &[
        "zeros",
        "ones",
        "constant",
        "normal",
        "uniform",
        "xavier_uniform",
        "xavier_normal",
        "kaiming_uniform",
        "kaiming_normal",
    ];

    fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("`{name}` must be a finite number, not {v}"))
            }
        };
        match *self {
            Init::Zeros | Init::Ones => Ok(()),
            Init::Constant { value } => finite("value", value),
            Init::Normal { mean, std } => {
                finite("mean", mean)?;
                finite("std", std)?;
                if std < 0.0 {
                    return Err(format!("`std` must be at least 0, not {std}"));
                }
                Ok(())
            }
            Init::Uniform { low, high } => {
                finite("low", low)?;
                finite("high", high)?;
                if low >= high {
                    return Err(format!("`low` ({low}) must be less than `high` ({high})"));
                }
                Ok(())
            }
            Init::XavierUniform { gain }
            | Init::XavierNormal { gain }
            | Init::KaimingUniform { gain, .. }
            | Init::KaimingNormal { gain, .. } => {
                finite("gain", gain)?;
                if gain <= 0.0 {
                    return Err(format!("`gain` must be greater than 0, not {gain}"));
                }
                Ok(())
            }
        }
    }
}

impl<'de> Deserialize<'de> for Init {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Init::from_json(&value).map_err(D::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstantArgs {
    value: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NormalArgs {
    #[serde(default)]
    mean: f32,
    #[serde(default = "one")]
    std: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UniformArgs {
    #[serde(default)]
    low: f32,
    #[serde(default = "one")]
    high: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GainArgs {
    #[serde(default = "one")]
    gain: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KaimingArgs {
    #[serde(default)]
    mode: FanMode,
    #[serde(default = "sqrt_two")]
    gain: f32,
}

fn one() -> f32 {
    1.0
}

fn sqrt_two() -> f32 {
    std::f32::consts::SQRT_2
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bare_names_and_objects_parse_to_the_same_initializer() {
        assert_eq!(Init::from_json(&json!("zeros")).unwrap(), Init::Zeros);
        assert_eq!(Init::from_json(&json!({"zeros": {}})).unwrap(), Init::Zeros);
        assert_eq!(
            Init::from_json(&json!("normal")).unwrap(),
            Init::normal(0.0, 1.0)
        );
        assert_eq!(
            Init::from_json(&json!({"normal": {"std": 0.05}})).unwrap(),
            Init::normal(0.0, 0.05)
        );
        assert_eq!(
            Init::from_json(&json!({"kaiming_normal": {"mode": "fan_out"}})).unwrap(),
            Init::KaimingNormal {
                mode: FanMode::FanOut,
                gain: std::f32::consts::SQRT_2
            }
        );
    }

    #[test]
    fn every_initializer_round_trips_through_its_json_text() {
        let all = [
            Init::Zeros,
            Init::Ones,
            Init::Constant { value: 0.5 },
            Init::normal(1.0, 2.0),
            Init::uniform(-3.0, 3.0),
            Init::XavierUniform { gain: 1.0 },
            Init::XavierNormal { gain: 2.0 },
            Init::KaimingUniform {
                mode: FanMode::FanOut,
                gain: 1.0,
            },
            Init::KaimingNormal {
                mode: FanMode::FanIn,
                gain: 1.5,
            },
        ];
        for init in all {
            let text = init.to_json();
            let back: Init = serde_json::from_str(&text).unwrap();
            assert_eq!(back, init, "{text}");
        }
    }

    #[test]
    fn mistakes_are_refused_with_the_reason() {
        let err = Init::from_json(&json!("gaussian")).unwrap_err();
        assert!(err.contains("unknown initializer `gaussian`"), "{err}");
        assert!(err.contains("kaiming_normal"), "{err}");
        let err = Init::from_json(&json!({"normal": {"sigma": 1}})).unwrap_err();
        assert!(err.contains("unknown field `sigma`"), "{err}");
        let err = Init::from_json(&json!({"uniform": {"low": 2, "high": 1}})).unwrap_err();
        assert!(err.contains("must be less than"), "{err}");
        let err = Init::from_json(&json!({"normal": {"std": -1}})).unwrap_err();
        assert!(err.contains("at least 0"), "{err}");
        let err = Init::from_json(&json!(3)).unwrap_err();
        assert!(err.contains("an initializer is a name"), "{err}");
    }
}
