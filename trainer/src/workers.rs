//! The trainer's CPU worker pool (rayon's global pool): image checks, decoding and resampling
//! for feature extraction, and synthetic dataset writing all run on it, so one setting
//! (`--workers`) bounds how many cores they take.

/// Sizes the pool: `Some(n)` threads, or one per core when `None`. Must run before the first
/// parallel job; a second call (the pool already exists) is refused.
pub fn init_worker_pool(workers: Option<usize>) -> Result<(), rayon::ThreadPoolBuildError> {
    let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("agiqa-worker-{i}"));
    if let Some(n) = workers {
        builder = builder.num_threads(n);
    }
    builder.build_global()
}
