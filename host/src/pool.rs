//! The host's threads: one pool per thread count, made once per process and
//! shared by every run, and lent to a plugin's call (interface 1.3's
//! `lend_pool`) when the host does not split that call across threads
//! itself.
//!
//! A batch large enough is cut into pieces of rows, one call per piece on
//! the pool's threads. A smaller one (a single row, a few dozen) runs as one
//! call, and that call gets the pool instead, to split its work another way
//! (a product's output columns). Either the host splits a call or the
//! plugin does, never both, so no more threads are busy than `--threads`
//! asked for.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use layer_api::abi::{HostPool, PoolTask, TableRef};
use rayon::ThreadPool;

use crate::error::Error;

/// The pool of `threads` threads, made on first use; `None` for one thread
/// (everything then runs on the calling thread).
pub fn shared(threads: usize) -> Result<Option<Arc<ThreadPool>>, Error> {
    if threads <= 1 {
        return Ok(None);
    }
    static POOLS: Mutex<BTreeMap<usize, Arc<ThreadPool>>> = Mutex::new(BTreeMap::new());
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = pools.get(&threads) {
        return Ok(Some(Arc::clone(pool)));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("layer-worker-{i}"))
        .build()
        .map_err(|e| Error::Threads(e.to_string()))?;
    let pool = Arc::new(pool);
    pools.insert(threads, Arc::clone(&pool));
    Ok(Some(pool))
}

/// Runs `call` (one `forward` or `backward` of the plugin whose table is
/// `table`, on this thread) with `pool` lent to it, when there is a pool of
/// two or more threads and the plugin takes one (interface 1.3); otherwise
/// just runs it.
pub(crate) fn lending<T>(
    table: &TableRef,
    pool: Option<&ThreadPool>,
    call: impl FnOnce() -> T,
) -> T {
    let (Some(pool), Some(lend)) = (pool, table.lend_pool()) else {
        return call();
    };
    if pool.current_num_threads() < 2 {
        return call();
    }
    let lent = HostPool {
        threads: pool.current_num_threads(),
        context: std::ptr::from_ref(pool).cast::<c_void>(),
        run: run_tasks,
    };
    lend(Some(&lent));
    // Ends the loan even if `call` unwinds (the host's own code between the
    // two `lend`s), so that the plugin never keeps a pointer to `pool`.
    struct EndLoan(extern "C" fn(Option<&HostPool>));
    impl Drop for EndLoan {
        fn drop(&mut self) {
            (self.0)(None);
        }
    }
    let _end = EndLoan(lend);
    call()
}

/// [`HostPool::run`]: [`spread`] on the lent pool.
extern "C" fn run_tasks(context: *const c_void, tasks: usize, task: PoolTask, data: *const c_void) {
    // SAFETY: `context` is the `&ThreadPool` that `lending` put in the
    // `HostPool`, which outlives the loan this call happens during.
    let pool = unsafe { &*context.cast::<ThreadPool>() };
    spread(pool, tasks, task, data);
}

/// Runs `task(i)` once for each `i` in `0..tasks`, on `pool` and this
/// thread, and returns when all have: the host's own pieces of a batch.
/// A panic in a task is raised again here once every task has ended.
pub fn run_each<F: Fn(usize) + Sync>(pool: &ThreadPool, tasks: usize, task: F) {
    type Caught = Mutex<Option<Box<dyn std::any::Any + Send>>>;
    extern "C" fn call<F: Fn(usize) + Sync>(data: *const c_void, index: usize) {
        // SAFETY: `data` is the `(F, Caught)` below, alive until `spread`
        // returns, which it does only after every task has.
        let (task, caught) = unsafe { &*data.cast::<(F, Caught)>() };
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| task(index))) {
            let mut slot = caught.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(payload);
            } else {
                std::mem::forget(payload);
            }
        }
    }
    let shared: (F, Caught) = (task, Mutex::new(None));
    spread(pool, tasks, call::<F>, std::ptr::from_ref(&shared).cast());
    let caught = shared.1.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some(payload) = caught {
        std::panic::resume_unwind(payload);
    }
}

/// The tasks on `pool` and the calling thread, which would otherwise only
/// wait: every thread, the caller included, takes the next task not yet
/// taken until none is left, so a pool thread that starts late (asleep,
/// or waiting for a busy core) finds its share already done rather than
/// holding the call up; at most the pool's size plus the caller run, and
/// only as many as there are tasks.
///
/// The calling thread then waits for tasks still running by spinning, not
/// by sleeping: waking a sleeping thread took 20 to 30 µs on a virtual
/// machine, which was most of a split 784 × 1024 matrix-vector product's
/// time (35 µs per half). After about half a millisecond it yields its core, so a
/// task that waits for a busy core still runs.
fn spread(pool: &ThreadPool, tasks: usize, task: PoolTask, data: *const c_void) {
    /// `data` moved to the pool's threads; it was made for `task`, to be
    /// called from any thread.
    #[derive(Clone, Copy)]
    struct Data(*const c_void);
    // SAFETY: see above: `data` is only passed back to `task`.
    unsafe impl Send for Data {}
    impl Data {
        fn get(self) -> *const c_void {
            self.0
        }
    }
    /// Which task is next, and how many have returned.
    struct Progress {
        next: AtomicUsize,
        done: AtomicUsize,
    }
    /// Runs tasks until none is left to take. `task` never unwinds (an
    /// `extern "C"` function that tried would abort), so every task taken
    /// is counted done.
    fn take_tasks(progress: &Progress, tasks: usize, task: PoolTask, data: Data) {
        loop {
            let index = progress.next.fetch_add(1, Ordering::Relaxed);
            if index >= tasks {
                return;
            }
            task(data.get(), index);
            progress.done.fetch_add(1, Ordering::Release);
        }
    }
    if tasks == 0 {
        return;
    }
    let data = Data(data);
    let progress = Arc::new(Progress {
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    });
    for _ in 1..tasks.min(pool.current_num_threads() + 1) {
        let progress = Arc::clone(&progress);
        // A helper that starts after every task was taken only reads the
        // counter: it never uses `data` after this function returns.
        pool.spawn(move || take_tasks(&progress, tasks, task, data));
    }
    take_tasks(&progress, tasks, task, data);
    let mut spins = 0u32;
    while progress.done.load(Ordering::Acquire) != tasks {
        if spins < SPINS_BEFORE_YIELDING {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

/// Spins before [`spread`] starts yielding: about 0.5 ms on the Zen 4
/// development machine (20 000 `spin_loop` hints took 510 to 550 µs).
const SPINS_BEFORE_YIELDING: u32 = 20_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_thread_count() {
        assert!(shared(1).unwrap().is_none());
        let a = shared(3).unwrap().unwrap();
        let b = shared(3).unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 3);
    }

    #[test]
    fn every_task_runs_once() {
        let pool = shared(2).unwrap().unwrap();
        let counts: Vec<AtomicUsize> = (0..7).map(|_| AtomicUsize::new(0)).collect();
        extern "C" fn count(data: *const c_void, index: usize) {
            // SAFETY: the test passes its `Vec<AtomicUsize>`.
            let counts = unsafe { &*data.cast::<Vec<AtomicUsize>>() };
            counts[index].fetch_add(1, Ordering::SeqCst);
        }
        let context = std::ptr::from_ref(pool.as_ref()).cast::<c_void>();
        run_tasks(context, 7, count, std::ptr::from_ref(&counts).cast());
        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        run_tasks(context, 0, count, std::ptr::from_ref(&counts).cast());
        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn run_each_runs_every_task_and_raises_a_panic_after_all_ended() {
        let pool = shared(2).unwrap().unwrap();
        let counts: Vec<AtomicUsize> = (0..5).map(|_| AtomicUsize::new(0)).collect();
        run_each(&pool, 5, |i| {
            counts[i].fetch_add(1, Ordering::SeqCst);
        });
        assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        let ended = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            run_each(&pool, 4, |i| {
                if i == 2 {
                    panic!("task {i} was told to panic");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                ended.fetch_add(1, Ordering::SeqCst);
            })
        }));
        assert!(result.is_err());
        assert_eq!(ended.load(Ordering::SeqCst), 3);
    }
}
