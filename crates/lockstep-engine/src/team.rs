//! A team of threads that spin between the small parallel loops of a decode step, instead of
//! rayon's workers falling asleep after each loop and being woken for the next.
//!
//! A one-token decode step runs about four parallel loops per layer (the matmuls, attention),
//! each a few tens of microseconds, with short serial work between them (norms, RoPE, residual
//! adds). rayon's idle workers spin only briefly before they sleep, so each loop began with a
//! futex wake-up and each end with a sleep: about 6% of a 0.5B decode step's samples (`perf`).
//! Inside [`lead`], the other workers of rayon's pool spin on this team's board for the whole
//! forward pass, and [`for_each`] hands them each loop's iterations without a wake-up. The
//! iterations, and so every value, are exactly those of the rayon loop they replace: each
//! iteration writes its own outputs, whichever thread runs it.
//!
//! A helper waiting for the next loop may read ahead bytes an iteration named
//! ([`read_ahead_while_idle`]: the next matrix a decode step streams), so that the leader's
//! serial work between loops is not time the memory goes unread.
//!
//! `LOCKSTEP_TEAM=off` (or `0`) turns the team off and every loop runs on rayon's pool;
//! `auto` (the default) and `on` use it ([`wanted`]).
//!
//! Outside [`lead`] (prefill, which runs few and long loops where rayon's work stealing serves
//! well), in an iteration that itself calls [`for_each`], or on a helper thread, [`for_each`] is
//! rayon's `for_each` over `0..n`.

use rayon::prelude::*;
use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

/// One loop posted to the team: `f(i)` for every `i < n`, each `i` claimed by one thread.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    /// The next `i` to claim.
    next: AtomicUsize,
    /// Iterations not yet finished.
    pending: AtomicUsize,
    /// The first panic an iteration raised, re-raised on the leader.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs iterations until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (self.f)(i))) {
                self.panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(p);
            }
            self.pending.fetch_sub(1, SeqCst);
        }
    }
}

/// The environment variable that turns the team off.
pub const ENV: &str = "LOCKSTEP_TEAM";

/// Whether decode steps should run on a team (`LOCKSTEP_TEAM` is not `off`); a bad value is a
/// one-line error.
pub fn wanted() -> crate::error::Result<bool> {
    Ok(crate::switch::Switch::from_env(ENV)?.is_on(|| true))
}

/// What the leader and its helpers share.
struct Board {
    /// The job posted now; null between jobs.
    job: AtomicPtr<Job<'static>>,
    /// Incremented at each posting, so a helper enters each job once.
    posted: AtomicUsize,
    /// Helpers that may be reading the job; the leader waits for none before the job ends.
    inside: AtomicUsize,
    /// Set when the leader's work is done: helpers return.
    closed: AtomicBool,
}

impl Board {
    /// A helper's life: spin until a job is posted, help with it, until the board closes.
    fn help(&self) {
        let (mut seen, mut idle) = (0, Idle::default());
        // A hint this thread was given outside this team (as a leader, or in another) is stale.
        IDLE_READ.set((0, 0));
        while !self.closed.load(SeqCst) {
            let posted = self.posted.load(SeqCst);
            if posted == seen {
                if !read_ahead_a_little() {
                    idle.wait();
                }
                continue;
            }
            (seen, idle) = (posted, Idle::default());
            IDLE_READ.set((0, 0));
            self.inside.fetch_add(1, SeqCst);
            let p = self.job.load(SeqCst);
            // SAFETY: a job stays alive while `inside` is non-zero and it is posted: the leader
            // unposts it, then waits for `inside` to reach zero, before it is dropped. Loading
            // the pointer after the increment makes a non-null one still posted then.
            if let Some(job) = unsafe { p.as_ref() } {
                job.work();
            }
            self.inside.fetch_sub(1, SeqCst);
        }
    }
}

/// Waiting for another thread: a short spin, then a yield of the core at each turn, so that a
/// thread the team waits on (or another process) gets it when the cores are shared.
#[derive(Default)]
struct Idle(u32);

impl Idle {
    /// Spins this many turns before it starts to yield.
    const SPINS: u32 = 128;

    fn wait(&mut self) {
        if self.0 < Self::SPINS {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Bytes a helper brings into its cache at a turn of its wait ([`read_ahead_while_idle`]):
/// small enough that a loop posted meanwhile starts within about a microsecond.
const READ_AHEAD_TURN: usize = 1 << 10;

/// Asks this thread, where it is a team's helper, to bring the `bytes` bytes from `from` into
/// its second-level cache while it waits for the next loop ([`lead`]): a hint given at the end
/// of a loop's iteration about what the thread will read in the next loop, so that the time the
/// leader spends on serial work between loops is not time the memory goes unread. Only the
/// helper's wait reads them, a little at each turn, and a posted loop ends it; on the leader,
/// or outside a team, nothing reads them (a helper's wait forgets a hint from before it began).
pub fn read_ahead_while_idle(from: *const u8, bytes: usize) {
    IDLE_READ.set((from as usize, bytes));
}

/// One turn of the read-ahead [`read_ahead_while_idle`] asked for; `false` when none is left.
fn read_ahead_a_little() -> bool {
    let (at, left) = IDLE_READ.get();
    if left == 0 {
        return false;
    }
    let n = left.min(READ_AHEAD_TURN);
    #[cfg(target_arch = "x86_64")]
    for line in (0..n).step_by(64) {
        // SAFETY: a prefetch is a hint: it never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                at.wrapping_add(line) as *const i8,
            )
        };
    }
    IDLE_READ.set((at.wrapping_add(n), left - n));
    true
}

thread_local! {
    /// What this thread, a helper, still reads ahead while it waits: (address, bytes).
    static IDLE_READ: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// The board this thread leads, and whether it is inside one of its loops' iterations.
    static LEADING: Cell<(*const Board, bool)> = const { Cell::new((ptr::null(), false)) };
}

/// Runs `f` on this thread with the other threads of rayon's pool spinning as its team, so that
/// the [`for_each`] loops `f` runs start without waking anyone. The helpers return when `f` does
/// (or panics). Nested, or with a pool of one thread, it only runs `f`.
pub fn lead<R>(f: impl FnOnce() -> R) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || !LEADING.get().0.is_null() {
        return f();
    }
    let board = Board {
        job: AtomicPtr::new(ptr::null_mut()),
        posted: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
    };
    /// Closes the board and forgets it when `f` returns or panics.
    struct Close<'a>(&'a Board);
    impl Drop for Close<'_> {
        fn drop(&mut self) {
            self.0.closed.store(true, SeqCst);
            LEADING.set((ptr::null(), false));
        }
    }
    rayon::in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| board.help());
        }
        let _close = Close(&board);
        LEADING.set((&board, false));
        f()
    })
}

/// `f(i)` for every `i` in `0..n`, in parallel: on the team when this thread leads one
/// ([`lead`]), otherwise on rayon's pool. Returns when every call has; a panic in one is raised
/// here once all have run.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync + Send) {
    let (board, in_loop) = LEADING.get();
    // SAFETY: LEADING holds a board only while `lead` keeps it alive on this thread.
    let board = match unsafe { board.as_ref() } {
        Some(b) if !in_loop && n > 1 => b,
        _ => return (0..n).into_par_iter().for_each(f),
    };
    let job = Job {
        f: &f,
        n,
        next: AtomicUsize::new(0),
        pending: AtomicUsize::new(n),
        panic: Mutex::new(None),
    };
    LEADING.set((board, true));
    // SAFETY (lifetime): the job is unposted, and no helper is inside it, before it drops below.
    let p = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
    board.job.store(p, SeqCst);
    board.posted.fetch_add(1, SeqCst);
    job.work();
    let mut idle = Idle::default();
    while job.pending.load(SeqCst) != 0 {
        idle.wait();
    }
    board.job.store(ptr::null_mut(), SeqCst);
    while board.inside.load(SeqCst) != 0 {
        idle.wait();
    }
    LEADING.set((board, false));
    let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = panic {
        resume_unwind(p);
    }
}

/// `f(i, piece)` for each `chunk`-long piece of `data` (the last one shorter where `chunk` does
/// not divide it), through [`for_each`]: on the team inside [`lead`], else on rayon's pool. For
/// element-wise work on long buffers that a decode step may also reach (a rayon loop of its own
/// started there would find every worker but one spinning on the team).
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    assert!(chunk > 0, "pieces of at least one element");
    let (len, p) = (data.len(), SendPtr(data.as_mut_ptr()));
    for_each(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        // SAFETY: piece `i` lies inside `data`, no other iteration's piece overlaps it, and
        // `data`'s borrow outlives the loop.
        let piece = unsafe { p.slice(start, chunk.min(len - start)) };
        f(i, piece)
    });
}

/// A raw pointer that may cross threads: for loops whose iterations write disjoint parts of one
/// buffer ([`for_each`] callers split `&mut` slices through it).
pub(crate) struct SendPtr<T>(pub *mut T);

// Copied as the pointer it is, whatever `T` is (a derive would ask `T: Copy`).
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

// SAFETY: only used to hand disjoint ranges of one live buffer to the iterations of a loop that
// ends before the buffer's borrow does.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that a closure calling it captures the whole `SendPtr`, not
    /// its raw-pointer field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }

    /// The `len` elements from `start` on, as a mutable slice.
    ///
    /// # Safety
    /// They lie inside the live buffer the pointer came from, and no other reference to them
    /// exists while the slice does.
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Every iteration runs exactly once, in and out of a team, nested loops included, and the
    /// helpers are released when the lead ends.
    #[test]
    fn each_iteration_runs_once() {
        for threads in [1, 2, 4] {
            pool(threads).install(|| {
                let counts: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
                let run = || {
                    for n in [0, 1, 2, 7, 1000] {
                        for_each(n, |i| {
                            counts[i].fetch_add(1, SeqCst);
                            // A nested loop runs on rayon, inside the iteration.
                            for_each(3, |_| {
                                counts[i].fetch_add(10, SeqCst);
                            });
                        });
                    }
                };
                lead(run);
                run();
                // Each i < n is visited by each of the loops with n > i, twice (led, then not).
                for (i, c) in counts.iter().enumerate() {
                    let loops = [0, 1, 2, 7, 1000].iter().filter(|&&n| i < n).count() as u64;
                    assert_eq!(c.load(SeqCst), 2 * 31 * loops, "i = {i}, {threads} threads");
                }
            });
        }
    }

    /// Read-ahead asked for in iterations (of any size, at any address: prefetches never
    /// fault) leaves every loop's iterations run once, and a posted loop ends a helper's.
    #[test]
    fn read_ahead_between_loops() {
        pool(2).install(|| {
            let data = vec![7u8; 4 << 20];
            let sum = AtomicU64::new(0);
            lead(|| {
                for round in 0..200 {
                    for_each(4, |i| {
                        sum.fetch_add(i as u64, SeqCst);
                        let from = if round % 2 == 0 {
                            data.as_ptr()
                        } else {
                            ptr::null()
                        };
                        read_ahead_while_idle(from, data.len());
                    });
                }
            });
            assert_eq!(sum.load(SeqCst), 200 * 6);
        });
    }

    /// A lead from a thread outside the pool works the same, and many loops in a row too.
    #[test]
    fn outside_the_pool_and_many_loops() {
        let sum = AtomicU64::new(0);
        lead(|| {
            for _ in 0..2000 {
                for_each(5, |i| {
                    sum.fetch_add(i as u64, SeqCst);
                });
            }
        });
        assert_eq!(sum.load(SeqCst), 2000 * 10);
    }

    /// Each piece of `for_each_chunk_mut` is its own part of the buffer, numbered in order,
    /// the last one shorter, in and out of a team.
    #[test]
    fn chunks_cover_the_buffer_once() {
        pool(3).install(|| {
            for len in [0, 1, 9, 10, 11, 1000] {
                let run = || {
                    let mut v = vec![0usize; len];
                    for_each_chunk_mut(&mut v, 10, |i, piece| {
                        assert!(
                            piece.len() == 10 || (i + 1) * 10 >= len,
                            "piece {i} of {len}"
                        );
                        for (j, x) in piece.iter_mut().enumerate() {
                            *x += i * 10 + j + 1;
                        }
                    });
                    v
                };
                let want: Vec<usize> = (1..=len).collect();
                assert_eq!(lead(run), want);
                assert_eq!(run(), want);
            }
        });
    }

    /// A panic in an iteration, on whichever thread, reaches the caller after the loop, and the
    /// team still ends.
    #[test]
    fn a_panic_in_an_iteration_reaches_the_leader() {
        pool(3).install(|| {
            let r = catch_unwind(AssertUnwindSafe(|| {
                lead(|| {
                    for_each(64, |i| {
                        if i == 40 {
                            panic!("iteration {i}");
                        }
                    })
                })
            }));
            let msg = r.unwrap_err();
            assert_eq!(msg.downcast_ref::<String>().unwrap(), "iteration 40");
            // The pool is free again.
            let s = AtomicU64::new(0);
            lead(|| {
                for_each(10, |i| {
                    s.fetch_add(i as u64, SeqCst);
                })
            });
            assert_eq!(s.load(SeqCst), 45);
        });
    }
}
