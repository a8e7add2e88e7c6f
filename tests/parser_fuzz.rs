//! Property tests for the parsers that read what users hand the host: the
//! model file (`ModelSpec::parse`), `.npy` inputs (`npy`), `.npz` archives
//! (`npz`, inputs and parameter files alike) and safetensors parameter
//! files (`ParamFile`). Whatever the bytes, each returns a value or an error
//! and never panics; what it accepts is consistent with what it was given.
//! The memory budget is on, and small ([`FUZZ_BUDGET`]): sizes past it are
//! refused, not allocated.
//!
//! `cargo test` runs 256 cases per property; set `PROPTEST_CASES` for a
//! longer run. Crashes found by longer runs are kept as the `regression_`
//! tests at the end.

use std::io::Write;
use std::path::Path;

use host::model::ModelSpec;
use host::npy::{read_f32_bytes, write_f32, NpyError};
use host::param_file::ParamFile;
use host::tensor::Tensor;
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// The memory budget every property runs under: far above what the
/// generated arrays hold, far below the sizes their headers may claim.
const FUZZ_BUDGET: u64 = 1 << 20;

/// Sets the budget (the first call in the process does; every property
/// calls it first, so none runs under the default).
fn budget_on() {
    host::budget::set_limit(FUZZ_BUDGET);
    assert_eq!(host::budget::limit(), FUZZ_BUDGET);
}

// ---- .npy ----

/// Dtype strings: every one the reader accepts, and some it must refuse.
fn descr() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "<f4", "<f8", "<f2", ">f4", "=f8", "|b1", "|u1", "|i1", "<i2", ">u2", "<i4", "<u4",
            "<i8", ">u8", "<c8", "<c16", "|O", "<U3", "|S3", "<M8[ns]", "", "<", "f4", "<f3",
        ])
        .prop_map(str::to_string),
        "[<>|=]?[a-zA-Z][0-9]{0,3}",
    ]
}

/// Dimensions from tiny to absurd, so that some shapes overflow or claim far
/// more data than any file holds.
fn dim() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..6,
        1 => Just(1u64 << 31),
        1 => Just(1u64 << 40),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn shape_text(dims: &[u64]) -> String {
    match dims {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            dims.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An .npy file: magic, a version, a header dict assembled from parts that
/// may be wrong, and some data bytes.
fn npy_file() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![1u8, 2, 3, 4]),
        descr(),
        any::<bool>(),
        prop::collection::vec(dim(), 0..4),
        prop::sample::select(vec![
            "",
            "",
            "",
            " ",
            "\n",
            "'extra': 1, ",
            "}",
            "'shape': (1,), ",
        ]),
        // Empty data often, so that shapes with a zero-length axis are read.
        prop_oneof![
            1 => Just(Vec::new()),
            3 => prop::collection::vec(any::<u8>(), 0..96),
        ],
    )
        .prop_map(|(major, descr, fortran, dims, junk, data)| {
            let header = format!(
                "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {}, {junk}}}\n",
                if fortran { "True" } else { "False" },
                shape_text(&dims)
            );
            let mut bytes = b"\x93NUMPY".to_vec();
            bytes.extend_from_slice(&[major, 0]);
            if major == 1 {
                bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
            } else {
                bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
            }
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&data);
            bytes
        })
}

fn small_array() -> impl Strategy<Value = ArrayD<f32>> {
    prop::collection::vec(0usize..4, 0..4).prop_flat_map(|shape| {
        let n = shape.iter().product::<usize>();
        prop::collection::vec(any::<f32>(), n).prop_map(move |values| {
            ArrayD::from_shape_vec(IxDyn(&shape), values).expect("one value per element")
        })
    })
}

fn written(array: &ArrayD<f32>) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_f32(&mut bytes, array).expect("writing to memory");
    bytes
}

fn bits(array: &ArrayD<f32>) -> Vec<u32> {
    array.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #[test]
    fn npy_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        budget_on();
        let _ = read_f32_bytes(&bytes);
    }

    #[test]
    fn npy_assembled_headers_never_panic_and_accepted_data_fits(bytes in npy_file()) {
        budget_on();
        if let Ok(array) = read_f32_bytes(&bytes) {
            // Every element came from the data bytes, each at least one byte.
            prop_assert!(array.len() <= bytes.len());
        }
    }

    #[test]
    fn npy_written_arrays_read_back_bit_for_bit(array in small_array()) {
        budget_on();
        let back = read_f32_bytes(&written(&array)).expect("a written file reads");
        prop_assert_eq!(back.shape(), array.shape());
        prop_assert_eq!(bits(&back), bits(&array));
    }

    #[test]
    fn npy_truncated_or_extended_files_are_refused(
        array in small_array(),
        cut in any::<prop::sample::Index>(),
        extra in 1usize..8,
    ) {
        budget_on();
        let bytes = written(&array);
        let at = cut.index(bytes.len());
        prop_assert!(read_f32_bytes(&bytes[..at]).is_err());
        let mut longer = bytes.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        let is_trailing = matches!(read_f32_bytes(&longer), Err(NpyError::TrailingData { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn npy_corrupted_bytes_never_panic(
        array in small_array(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        budget_on();
        let mut bytes = written(&array);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let _ = read_f32_bytes(&bytes);
    }
}

// ---- .npz archives ----

/// One member: a name (few, so that some repeat), and `.npy` bytes that
/// may be anything the `.npy` strategies make.
fn npz_member() -> impl Strategy<Value = (String, Vec<u8>)> {
    (
        prop::sample::select(vec![
            "a.npy",
            "b.npy",
            "c.npy",
            "x.npy",
            "a",
            "dir/a.npy",
            "",
        ]),
        prop_oneof![
            2 => small_array().prop_map(|a| written(&a)),
            2 => npy_file(),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ],
    )
        .prop_map(|(name, bytes)| (name.to_string(), bytes))
}

/// An archive of `members`, stored or deflated, as the zip writer makes
/// it (it refuses a repeated name itself: that member is left out).
fn zip_of(members: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let options = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, bytes) in members {
        if zip.start_file(name.as_str(), options).is_ok() {
            zip.write_all(bytes).expect("writing to memory");
        }
    }
    zip.finish().expect("finishing in memory").into_inner()
}

/// Overwrites the declared uncompressed size of every member (local
/// headers and central directory) with `size`, as a hostile archive would.
fn declare_size(bytes: &mut [u8], size: u32) {
    for at in 0..bytes.len().saturating_sub(30) {
        let field = match &bytes[at..at + 4] {
            b"PK\x03\x04" => at + 22,
            b"PK\x01\x02" => at + 24,
            _ => continue,
        };
        bytes[field..field + 4].copy_from_slice(&size.to_le_bytes());
    }
}

/// Bytes of element data a tensor holds.
fn tensor_bytes(t: &Tensor) -> usize {
    t.bytes().len()
}

proptest! {
    #[test]
    fn npz_arbitrary_bytes_never_panic(
        zip_like in any::<bool>(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        budget_on();
        let mut bytes = if zip_like { b"PK\x03\x04".to_vec() } else { Vec::new() };
        bytes.extend(tail);
        let _ = host::npz::read(bytes);
    }

    #[test]
    fn npz_assembled_archives_never_panic_and_accepted_arrays_fit(
        members in prop::collection::vec(npz_member(), 0..5),
        deflate in any::<bool>(),
    ) {
        budget_on();
        let bytes = zip_of(&members, deflate);
        let uncompressed: usize = members.iter().map(|(_, b)| b.len()).sum();
        if let Ok(arrays) = host::npz::read(bytes) {
            let mut names: Vec<&str> = arrays.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), arrays.len());
            // Each element came from the member's bytes, which were at most
            // 8 per element converted to at most 8 bytes in memory.
            let held: usize = arrays.iter().map(|(_, t)| tensor_bytes(t)).sum();
            prop_assert!(held <= 8 * uncompressed, "{} from {}", held, uncompressed);
        }
    }

    #[test]
    fn npz_written_archives_read_back(arrays in prop::collection::vec(small_array(), 0..4)) {
        budget_on();
        let tensors: Vec<Tensor> = arrays.iter().cloned().map(Tensor::F32).collect();
        let names: Vec<String> = (0..tensors.len()).map(|i| format!("t{i}")).collect();
        let pairs: Vec<(&str, &Tensor)> =
            names.iter().map(String::as_str).zip(&tensors).collect();
        let mut bytes = std::io::Cursor::new(Vec::new());
        host::npz::write(&mut bytes, &pairs).expect("writing to memory");
        let back = host::npz::read(bytes.into_inner()).map_err(TestCaseError::fail)?;
        prop_assert_eq!(back.len(), tensors.len());
        for ((name, t), (want_name, want)) in back.iter().zip(names.iter().zip(&tensors)) {
            prop_assert_eq!(name, want_name);
            prop_assert_eq!(t, want);
        }
    }

    #[test]
    fn npz_corrupted_or_lying_archives_never_panic(
        members in prop::collection::vec(npz_member(), 1..4),
        deflate in any::<bool>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        declared in prop::option::of(prop_oneof![
            Just(0u32),
            1u32..200,
            Just(FUZZ_BUDGET as u32 + 1),
            Just(u32::MAX),
        ]),
    ) {
        budget_on();
        let mut bytes = zip_of(&members, deflate);
        if let Some(size) = declared {
            declare_size(&mut bytes, size);
        }
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let result = host::npz::read(bytes.clone());
        // A member declared past the budget is never read into memory.
        if declared.is_some_and(|d| u64::from(d) > FUZZ_BUDGET) && bytes.len() < 1 << 16 {
            if let Ok(arrays) = &result {
                prop_assert!(arrays.is_empty(), "read {} arrays", arrays.len());
            }
        }
        let _ = ParamFile::from_bytes(Path::new("fuzz/p.npz"), bytes);
    }
}

// ---- safetensors ----

/// A safetensors file: an 8-byte header length (right or wrong), a JSON
/// header whose entries' dtypes, shapes and offsets may be wrong (or, half
/// the time, offsets laid end to end as the shapes say, with that much
/// data), and data.
fn safetensors_file() -> impl Strategy<Value = Vec<u8>> {
    let entry = (
        prop::sample::select(vec!["F32", "F64", "F16", "BF16", "I32", "U8", "BOOL", "X"]),
        prop::collection::vec(dim(), 0..4),
        0u64..64,
        0u64..64,
    );
    (
        prop::collection::vec(entry, 0..4),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..128),
        prop_oneof![3 => Just(0i64), 1 => -8i64..8, 1 => Just(1i64 << 40)],
    )
        .prop_map(|(entries, consistent, data, skew)| {
            let mut header = Map::new();
            let mut end = 0u64;
            for (i, (dtype, shape, start, len)) in entries.into_iter().enumerate() {
                let (start, len) = if consistent {
                    let size = match dtype {
                        "F64" => 8,
                        "F32" | "I32" => 4,
                        "F16" | "BF16" => 2,
                        _ => 1,
                    };
                    let bytes = shape
                        .iter()
                        .try_fold(size, |n: u64, &d| n.checked_mul(d))
                        .filter(|&b| b <= 1024)
                        .unwrap_or(0);
                    (end, bytes)
                } else {
                    (start, len)
                };
                end = start + len;
                header.insert(
                    format!("t{i}"),
                    json!({"dtype": dtype, "shape": shape, "data_offsets": [start, start + len]}),
                );
            }
            let text = Value::Object(header).to_string();
            let len = (text.len() as i64).wrapping_add(skew) as u64;
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(text.as_bytes());
            if consistent {
                bytes.extend((0..end).map(|i| {
                    data.get(i as usize % data.len().max(1))
                        .copied()
                        .unwrap_or(0)
                }));
            } else {
                bytes.extend(data);
            }
            bytes
        })
}

proptest! {
    #[test]
    fn safetensors_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        budget_on();
        let _ = ParamFile::from_bytes(Path::new("fuzz/p.safetensors"), bytes);
    }

    #[test]
    fn safetensors_assembled_headers_never_panic_and_accepted_tensors_fit(
        bytes in safetensors_file(),
    ) {
        budget_on();
        if let Ok(file) = ParamFile::from_bytes(Path::new("fuzz/p.safetensors"), bytes.clone()) {
            for tensor in file.tensors.values() {
                let elements = tensor.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                prop_assert!(elements.is_some());
                if let Ok(values) = &tensor.values {
                    prop_assert_eq!(Some(values.len()), elements);
                    prop_assert!(values.len() <= bytes.len());
                }
            }
        }
    }
}

// ---- model files ----

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "format", "name", "layers", "params", "seed", "type", "config", "sha256", "units", "junk",
    ])
    .prop_map(str::to_string)
}

/// JSON trees whose keys are mostly the ones a model file uses, so that
/// the parser gets past the syntax into its own checks.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(vec![0i64, 1, 2, -1, 8, i64::MAX]).prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z0-9./_-]{0,8}".prop_map(Value::String),
        Just(Value::String("a".repeat(64))),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A model file whose every part is valid.
fn valid_model() -> impl Strategy<Value = (Value, Vec<(Option<String>, String)>)> {
    let layer = (
        prop::option::of("[a-z][a-z0-9]{0,5}"),
        "[a-z][a-z_]{0,7}",
        prop::option::of(0u64..100),
    );
    (prop::collection::vec(layer, 1..5), any::<u64>()).prop_map(|(layers, seed)| {
        let mut seen = std::collections::HashSet::new();
        let layers: Vec<(Option<String>, String, Option<u64>)> = layers
            .into_iter()
            .enumerate()
            .map(|(i, (name, plugin, units))| {
                // Names must be unique, and a missing one becomes the index.
                let name = name.filter(|n| seen.insert(n.clone()));
                if name.is_none() {
                    seen.insert(i.to_string());
                }
                (name, plugin, units)
            })
            .collect();
        let model = json!({
            "format": 1,
            "seed": seed,
            "layers": layers.iter().map(|(name, plugin, units)| {
                let mut layer = Map::new();
                layer.insert("type".into(), json!(plugin));
                if let Some(name) = name {
                    layer.insert("name".into(), json!(name));
                }
                if let Some(units) = units {
                    layer.insert("config".into(), json!({"units": units}));
                }
                Value::Object(layer)
            }).collect::<Vec<_>>(),
        });
        let expected = layers
            .into_iter()
            .map(|(name, plugin, _)| (name, plugin))
            .collect();
        (model, expected)
    })
}

fn parse(text: &str) -> Result<ModelSpec, host::Error> {
    ModelSpec::parse(text, Path::new("fuzz/m.json"))
}

proptest! {
    #[test]
    fn model_arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn model_json_trees_never_panic_and_accepted_models_are_valid(value in json_value()) {
        let text = value.to_string();
        if let Ok(spec) = parse(&text) {
            prop_assert!(!spec.layers.is_empty());
            let mut names: Vec<&str> = spec.layers.iter().map(|l| l.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            prop_assert_eq!(names.len(), spec.layers.len());
            prop_assert!(spec.layers.iter().all(|l| l.config.is_object()));
            prop_assert_eq!(value.get("format"), Some(&json!(1)));
        }
    }

    #[test]
    fn model_valid_files_parse_to_what_they_say((value, expected) in valid_model()) {
        let spec = parse(&serde_json::to_string_pretty(&value).unwrap())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(spec.seed, value["seed"].as_u64().unwrap());
        prop_assert_eq!(spec.layers.len(), expected.len());
        for (i, (layer, (name, plugin))) in spec.layers.iter().zip(&expected).enumerate() {
            prop_assert_eq!(&layer.plugin, plugin);
            let want = name.clone().unwrap_or_else(|| i.to_string());
            prop_assert_eq!(&layer.name, &want);
        }
    }

    #[test]
    fn model_syntax_errors_point_inside_the_text(
        (value, _) in valid_model(),
        cut in any::<prop::sample::Index>(),
    ) {
        let text = serde_json::to_string_pretty(&value).unwrap();
        let at = cut.index(text.len());
        if let Err(host::Error::ModelSyntax { line, column, .. }) = parse(&text[..at]) {
            let lines = text[..at].lines().count().max(1);
            prop_assert!(line >= 1 && line <= lines + 1, "line {} of {}", line, lines);
            prop_assert!(column <= text.len() + 1);
        }
    }
}

// ---- regressions: crashes found, kept as tests ----

/// An .npy file (format 1.0) with `header` and no data.
fn header_only(header: &str) -> Vec<u8> {
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes
}

/// An empty array whose other axes multiply past isize::MAX: the size check
/// passed (0 elements) and building the array panicked. A 200000-case run of
/// `npy_assembled_headers_never_panic_and_accepted_data_fits` found it as
/// shape (0, 18446744073709551615) within seconds.
#[test]
fn regression_empty_shape_with_huge_axes_is_refused_not_a_panic() {
    budget_on();
    let header =
        |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
    assert_eq!(
        read_f32_bytes(&header_only(&header("(0, 4611686018427387904, 4)")))
            .unwrap_err()
            .to_string(),
        "shape [0, 4611686018427387904, 4] is too large: 0 x 4611686018427387904 x 4 \
         elements overflow the address space"
    );
    assert!(matches!(
        read_f32_bytes(&header_only(&header("(0, 18446744073709551615)"))),
        Err(NpyError::TooLarge { .. })
    ));
    // Empty arrays whose axes do fit still read.
    let empty = read_f32_bytes(&header_only(&header("(0, 1000, 4)"))).unwrap();
    assert_eq!(empty.shape(), &[0, 1000, 4]);
}
