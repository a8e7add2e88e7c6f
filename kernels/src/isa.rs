//! Which instruction set the matrix kernels run on: what the CPU offers,
//! the best of it by default, or the one `LAYER_KERNELS_ISA` names.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces one kernel path, for measuring a
/// slower path on a faster machine (`avx2` on an AVX-512 CPU) or ruling a
/// path out when hunting a fault. Unset or empty: the best path the CPU has.
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

    /// The fastest path this CPU can run.
    pub fn best() -> Isa {
        Isa::supported()[0]
    }

    /// The path `matmul` runs in this process: the one `LAYER_KERNELS_ISA`
    /// names, or the best one when it is unset or empty. Read once; an
    /// unknown name, or a path this CPU lacks, is an error that every
    /// product then reports (a forced path never silently becomes another).
    pub fn selected() -> Result<Isa, String> {
        static SELECTED: OnceLock<Result<Isa, String>> = OnceLock::new();
        SELECTED
            .get_or_init(|| choose(std::env::var(ISA_VARIABLE).ok().as_deref()))
            .clone()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The path for a value of `LAYER_KERNELS_ISA` (`None`: unset).
fn choose(requested: Option<&str>) -> Result<Isa, String> {
    let requested = requested.map(str::trim).unwrap_or("");
    if requested.is_empty() {
        return Ok(Isa::best());
    }
    let names = || {
        Isa::ALL
            .iter()
            .map(|isa| isa.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let isa = Isa::ALL
        .into_iter()
        .find(|isa| isa.name().eq_ignore_ascii_case(requested))
        .ok_or_else(|| {
            format!(
                "{ISA_VARIABLE}={requested:?} names no kernel path: use one of {}, or unset it",
                names()
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
    Ok(isa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_or_empty_means_the_best_path() {
        assert_eq!(choose(None), Ok(Isa::best()));
        assert_eq!(choose(Some("")), Ok(Isa::best()));
        assert_eq!(choose(Some("  ")), Ok(Isa::best()));
    }

    #[test]
    fn every_supported_path_can_be_named_in_any_case() {
        for isa in Isa::supported() {
            assert_eq!(choose(Some(isa.name())), Ok(isa));
            assert_eq!(choose(Some(&isa.name().to_uppercase())), Ok(isa));
        }
        assert_eq!(Isa::supported().last(), Some(&Isa::Baseline));
    }

    #[test]
    fn unknown_and_unsupported_paths_are_refused_with_the_choices() {
        let err = choose(Some("sse9")).unwrap_err();
        assert!(err.contains("LAYER_KERNELS_ISA=\"sse9\""), "{err}");
        assert!(err.contains("avx512, avx2, baseline"), "{err}");
        for isa in Isa::ALL.into_iter().filter(|isa| !isa.is_supported()) {
            let err = choose(Some(isa.name())).unwrap_err();
            assert!(err.contains(isa.needs()[0]), "{err}");
            assert!(err.contains("baseline"), "{err}");
        }
    }
}
