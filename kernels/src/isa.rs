//! Which instruction set the matrix kernels run on: what the CPU offers,
//! the best of it for each product's shape by default, or the one
//! `LAYER_KERNELS_ISA` names.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces one kernel path for every product,
/// for measuring a slower path on a faster machine (`avx2` on an AVX-512
/// CPU) or ruling a path out when hunting a fault. Unset, empty or `auto`:
/// [`Policy::Auto`].
pub const ISA_VARIABLE: &str = "LAYER_KERNELS_ISA";

/// A kernel path: the instruction set the matrix product's microkernels
/// and packing use. Every path computes the same products; they differ in
/// speed and in the last bits of rounding (each sums `k` products in its
/// own order), never in what they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F registers, 16 floats wide (x86-64-v4 CPUs).
    Avx512,
    /// AVX2 with FMA, 8 floats wide (x86-64-v3 CPUs).
    Avx2,
    /// What every CPU runs: plain scalar code on x86-64 without AVX2, the
    /// `gemm` crate's own choice (NEON on aarch64, …) elsewhere.
    Baseline,
}

impl Isa {
    /// Every path, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Baseline];

    /// The name `LAYER_KERNELS_ISA` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Baseline => "baseline",
        }
    }

    /// The CPU features the path needs, as `/proc/cpuinfo` and
    /// `is_x86_feature_detected!` spell them.
    pub fn needs(self) -> &'static [&'static str] {
        match self {
            Isa::Avx512 => &["avx512f", "avx2", "fma"],
            Isa::Avx2 => &["avx2", "fma"],
            Isa::Baseline => &[],
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        crate::driver::supported(self)
    }

    /// The paths this CPU can run, fastest first (never empty: the
    /// baseline runs everywhere).
    pub fn supported() -> Vec<Isa> {
        Isa::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// The fastest path this CPU can run on wide products (found once: every
    /// product asks).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::supported()[0])
    }
}

/// How [`crate::matmul`] picks a path for each product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The best path for the product's shape ([`Policy::path_for`]).
    Auto,
    /// Every product on this path.
    Forced(Isa),
}

/// Fewer output columns than this leave AVX-512's 16 lanes partly empty.
const AVX512_MIN_COLUMNS: usize = 16;

impl Policy {
    /// The policy of this process: `LAYER_KERNELS_ISA`'s path, or
    /// [`Policy::Auto`] when it is unset, empty or `auto`. Read once; an
    /// unknown name, or a path this CPU lacks, is an error that every
    /// product then reports (a forced path never silently becomes another).
    pub fn from_env() -> Result<Policy, String> {
        static POLICY: OnceLock<Result<Policy, String>> = OnceLock::new();
        POLICY
            .get_or_init(|| choose(std::env::var(ISA_VARIABLE).ok().as_deref()))
            .clone()
    }

    /// The path for element-by-element and row-by-row kernels: the forced
    /// one, or the best (their rows are long and contiguous, so every
    /// lane is used).
    pub fn elementwise_path(self) -> Isa {
        match self {
            Policy::Forced(isa) => isa,
            Policy::Auto => Isa::best(),
        }
    }

    /// The path for a product of `rows × depth` by `depth × columns`.
    ///
    /// Auto takes the best path, except AVX2 instead of AVX-512 for fewer
    /// than 16 output columns (AVX-512 fills its 16-float registers along
    /// the columns, so 8 columns leave half of each empty) and for a single
    /// row (a matrix-vector product, bound by memory rather than
    /// arithmetic). On a Zen 4 EPYC, one thread, 4096 rows: 64 → 8 took
    /// 80 µs on AVX-512 and 70 on AVX2, 8 → 1 25 µs and 7; 784 → 1024 at
    /// 64 rows 984 µs and 1198. The choice depends on the columns and
    /// whether there is more than one row, never on how many: pieces of
    /// two or more rows of a batch run on the same path as the whole.
    pub fn path_for(self, rows: usize, columns: usize) -> Isa {
        match self {
            Policy::Forced(isa) => isa,
            Policy::Auto => {
                let best = Isa::best();
                let narrow = columns < AVX512_MIN_COLUMNS || rows < 2;
                if best == Isa::Avx512 && narrow && Isa::Avx2.is_supported() {
                    Isa::Avx2
                } else {
                    best
                }
            }
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The policy for a value of `LAYER_KERNELS_ISA` (`None`: unset).
fn choose(requested: Option<&str>) -> Result<Policy, String> {
    let requested = requested.map(str::trim).unwrap_or("");
    if requested.is_empty() || requested.eq_ignore_ascii_case("auto") {
        return Ok(Policy::Auto);
    }
    let names: Vec<_> = Isa::ALL.iter().map(|isa| isa.name()).collect();
    let isa = Isa::ALL
        .into_iter()
        .find(|isa| isa.name().eq_ignore_ascii_case(requested))
        .ok_or_else(|| {
            format!(
                "{ISA_VARIABLE}={requested:?} names no kernel path: use auto, {}, or unset it",
                names.join(", ")
            )
        })?;
    if !isa.is_supported() {
        let have: Vec<_> = Isa::supported().iter().map(|isa| isa.name()).collect();
        return Err(format!(
            "{ISA_VARIABLE}={requested} asks for the {} kernels, which need the CPU features {}; \
             this CPU runs only: {}",
            isa.name(),
            isa.needs().join(", "),
            have.join(", ")
        ));
    }
    Ok(Policy::Forced(isa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_empty_or_auto_means_auto() {
        for value in [None, Some(""), Some("  "), Some("auto"), Some("AUTO")] {
            assert_eq!(choose(value), Ok(Policy::Auto), "{value:?}");
        }
    }

    #[test]
    fn every_supported_path_can_be_forced_by_name_in_any_case() {
        for isa in Isa::supported() {
            assert_eq!(choose(Some(isa.name())), Ok(Policy::Forced(isa)));
            assert_eq!(
                choose(Some(&isa.name().to_uppercase())),
                Ok(Policy::Forced(isa))
            );
            assert_eq!(Policy::Forced(isa).path_for(1, 1), isa);
        }
        assert_eq!(Isa::supported().last(), Some(&Isa::Baseline));
    }

    #[test]
    fn unknown_and_unsupported_paths_are_refused_with_the_choices() {
        let err = choose(Some("sse9")).unwrap_err();
        assert!(err.contains("LAYER_KERNELS_ISA=\"sse9\""), "{err}");
        assert!(err.contains("auto, avx512, avx2, baseline"), "{err}");
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
            let err = choose(Some(isa.name())).unwrap_err();
            assert!(err.contains(isa.needs()[0]), "{err}");
            assert!(err.contains("baseline"), "{err}");
        }
    }

    #[test]
    fn auto_takes_a_supported_path_that_does_not_depend_on_the_row_count() {
        for columns in [1, 8, 15, 16, 24, 1024] {
            let path = Policy::Auto.path_for(2, columns);
            assert!(path.is_supported());
            for rows in [3, 64, 65, 4096] {
                assert_eq!(Policy::Auto.path_for(rows, columns), path);
            }
            assert!(Policy::Auto.path_for(1, columns).is_supported());
        }
        // Wide products take the best path.
        assert_eq!(Policy::Auto.path_for(64, 1024), Isa::best());
    }
}
