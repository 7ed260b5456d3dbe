//! Which SIMD kernels the CPU ops use: the best level this CPU has ([`detected`]), capped
//! by `MEDRAY_SIMD` (`generic`, `avx2`, `avx512`) for the whole process or by
//! [`with_simd_limit`] for one thread's calls (tests run every level the machine has against
//! the generic code this way; benchmarks print [`simd_level`]). A kernel picks its path
//! once per call on the calling thread and hands the choice to its worker threads.

use std::cell::Cell;
use std::sync::OnceLock;

/// A SIMD instruction set level, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable code (what the compiler makes of it for the baseline target).
    Generic,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// AVX-512 Foundation (with AVX2 and FMA): 16 f32 lanes.
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Generic, SimdLevel::Avx2, SimdLevel::Avx512];

    /// Its name, as `MEDRAY_SIMD` takes it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Generic => "generic",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The level named `name`.
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.name() == name.trim())
    }

    /// The levels this CPU has, lowest first.
    #[must_use]
    pub fn supported() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| *l <= detected()).collect()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level this CPU has.
#[must_use]
pub fn detected() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Generic
    })
}

/// The process-wide cap from `MEDRAY_SIMD` (unset or unknown: none).
fn env_cap() -> Option<SimdLevel> {
    static CAP: OnceLock<Option<SimdLevel>> = OnceLock::new();
    *CAP.get_or_init(|| {
        let value = std::env::var("MEDRAY_SIMD").ok()?;
        let level = SimdLevel::parse(&value);
        if level.is_none() {
            tracing::warn!(
                value,
                "MEDRAY_SIMD: expected generic, avx2 or avx512; ignored"
            );
        }
        level
    })
}

thread_local! {
    static LIMIT: Cell<Option<SimdLevel>> = const { Cell::new(None) };
}

/// The level the CPU ops use on this thread now: the detected one, capped by `MEDRAY_SIMD`
/// and by [`with_simd_limit`].
#[must_use]
pub fn simd_level() -> SimdLevel {
    let mut level = detected();
    if let Some(cap) = env_cap() {
        level = level.min(cap);
    }
    if let Some(cap) = LIMIT.with(Cell::get) {
        level = level.min(cap);
    }
    level
}

/// What each CPU kernel runs at the current level, for benchmark headers (so that timings
/// from different machines or levels are never mixed up).
#[must_use]
pub fn describe() -> String {
    let level = simd_level();
    let tiles = match level {
        SimdLevel::Avx512 => {
            "direct conv tiles avx512 (Co a multiple of 32), avx2 (of 16), else gemm"
        }
        SimdLevel::Avx2 => "direct conv tiles avx2 (Co a multiple of 16), else gemm",
        SimdLevel::Generic => "direct conv gemm",
    };
    let capped = if level < detected() {
        format!(", capped from {} by MEDRAY_SIMD", detected())
    } else {
        String::new()
    };
    let weight_grad = if level >= SimdLevel::Avx512 {
        "avx512 tiles (Co a multiple of 32), else gemm"
    } else {
        "gemm"
    };
    format!(
        "SIMD {level}{capped}: {tiles}; conv weight gradients {weight_grad}; FFT products {level}; BatchNorm {level}; warp and other elementwise kernels compiler-vectorised for the build target"
    )
}

/// Runs `f` with this thread's CPU ops using at most `limit` (for tests and benchmarks).
pub fn with_simd_limit<R>(limit: SimdLevel, f: impl FnOnce() -> R) -> R {
    /// Puts the previous limit back, also when `f` panics.
    struct Restore(Option<SimdLevel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LIMIT.with(|cell| cell.set(self.0));
        }
    }
    let _restore = Restore(LIMIT.with(|cell| cell.replace(Some(limit))));
    f()
}

/// Defines `pub(crate) fn $name(level: SimdLevel, args...) -> R` that runs the
/// `#[inline(always)]` function `$body` compiled three times: for AVX-512 (F, with
/// AVX2 and FMA), for AVX2 with FMA, and for the baseline target, picked by `level`. The
/// body is plain Rust written so that the compiler vectorises it (fixed-width lane arrays,
/// no closures in the hot loop); each copy gets the vector width of its level.
///
/// `level` must not exceed [`detected`] (pass [`simd_level`]); a higher one is lowered.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(level: $crate::ops::simd::SimdLevel, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match level.min($crate::ops::simd::detected()) {
                    // SAFETY: the CPU has the features of the level (capped by `detected`).
                    $crate::ops::simd::SimdLevel::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    $crate::ops::simd::SimdLevel::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::ops::simd::SimdLevel::Generic => {}
                }
            }
            let _ = level;
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_caps_the_level_on_its_thread_only_and_is_undone() {
        let before = simd_level();
        with_simd_limit(SimdLevel::Generic, || {
            assert_eq!(simd_level(), SimdLevel::Generic);
            let other = std::thread::spawn(simd_level).join().unwrap();
            assert_eq!(other, before, "another thread keeps its level");
        });
        assert_eq!(simd_level(), before);
        assert!(SimdLevel::supported().contains(&SimdLevel::Generic));
        assert_eq!(SimdLevel::parse("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("sse"), None);
    }
}
