//! Several sessions on several devices, and which one runs the next batch: the least busy, ties
//! broken round-robin across devices. The pool only sees a [`BatchRunner`], so the spreading is
//! tested with a fake backend, without ONNX Runtime.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::error::ScoreError;

/// One batch in the model's input layout: `rows` images back to back.
#[derive(Clone, Copy, Debug)]
pub enum Batch<'a> {
    /// `[rows, 3, R, R]`.
    PixelValues { data: &'a [f32], rows: usize },
    /// `[rows, R, R, 3]`.
    PixelsUint8 { data: &'a [u8], rows: usize },
}

impl Batch<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Batch::PixelValues { rows, .. } | Batch::PixelsUint8 { rows, .. } => *rows,
        }
    }
}

/// Runs one batch and returns one row of scores per image (what a session does).
pub trait BatchRunner: Send {
    fn run(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>, ScoreError>;
}

struct Slot<R> {
    device: i32,
    runner: Mutex<R>,
    /// Batches waiting for or running on this slot.
    in_flight: AtomicUsize,
}

/// Runners spread over devices; `Sync` when the runners are `Send`.
pub struct Pool<R> {
    /// Interleaved by device (d0 s0, d1 s0, d0 s1, ...), so that round-robin over equally
    /// busy slots alternates devices.
    slots: Vec<Slot<R>>,
    next: AtomicUsize,
}

impl<R: BatchRunner> Pool<R> {
    /// `runners[d]` are the sessions of device `devices[d]`.
    pub fn new(per_device: Vec<(i32, Vec<R>)>) -> Pool<R> {
        let mut queues: Vec<(i32, std::vec::IntoIter<R>)> = per_device
            .into_iter()
            .map(|(device, runners)| (device, runners.into_iter()))
            .collect();
        let mut slots = Vec::new();
        loop {
            let before = slots.len();
            for (device, runners) in &mut queues {
                if let Some(runner) = runners.next() {
                    slots.push(Slot {
                        device: *device,
                        runner: Mutex::new(runner),
                        in_flight: AtomicUsize::new(0),
                    });
                }
            }
            if slots.len() == before {
                break;
            }
        }
        Pool {
            slots,
            next: AtomicUsize::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The device of each slot, in slot order.
    pub fn devices(&self) -> Vec<i32> {
        self.slots.iter().map(|s| s.device).collect()
    }

    /// Claims the least busy slot (ties: the next in round-robin order) and returns its index.
    fn claim(&self) -> usize {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        loop {
            let (best, load) = (0..n)
                .map(|k| (start + k) % n)
                .map(|i| (i, self.slots[i].in_flight.load(Ordering::Acquire)))
                .min_by_key(|&(_, load)| load)
                .unwrap_or((start, 0));
            // Claim only if nobody took it meanwhile; else look again.
            if self.slots[best]
                .in_flight
                .compare_exchange(load, load + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return best;
            }
        }
    }

    /// Runs `batch` on the least busy runner.
    pub fn run(&self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>, ScoreError> {
        self.with(|runner| runner.run(batch))
    }

    /// Runs `f` on the least busy runner (warm-ups use it through [`Pool::each`] instead).
    pub fn with<T>(&self, f: impl FnOnce(&mut R) -> T) -> T {
        let i = self.claim();
        let slot = &self.slots[i];
        // Released even when `f` panics, so a crashed batch does not skew later choices.
        struct Release<'a>(&'a AtomicUsize);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _release = Release(&slot.in_flight);
        // A panic while another thread held the lock leaves the runner itself intact.
        let mut runner = slot
            .runner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut runner)
    }

    /// Runs `f` on every runner in turn, with its device (warm-up at load).
    pub fn each<E>(&self, mut f: impl FnMut(i32, &mut R) -> Result<(), E>) -> Result<(), E> {
        for slot in &self.slots {
            let mut runner = slot
                .runner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(slot.device, &mut runner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    /// Records which (device, session) ran each batch; optionally waits at a gate until
    /// `gate_size` batches are running at once.
    struct Fake {
        device: i32,
        session: usize,
        log: Log,
        gate: Option<Gate>,
    }

    impl BatchRunner for Fake {
        fn run(&mut self, batch: Batch<'_>) -> Result<Vec<Vec<f32>>, ScoreError> {
            self.log.lock().unwrap().push((self.device, self.session));
            if let Some(gate) = &self.gate {
                let (count, cv, size) = &**gate;
                let mut inside = count.lock().unwrap();
                *inside += 1;
                cv.notify_all();
                // Every batch must be running on its own runner for the gate to open; two on
                // one runner would serialise and time out.
                let (inside, timeout) = cv
                    .wait_timeout_while(inside, Duration::from_secs(5), |n| *n < *size)
                    .unwrap();
                drop(inside);
                if timeout.timed_out() {
                    return Err(ScoreError::Inference(
                        "batches did not run in parallel".into(),
                    ));
                }
            }
            if batch.rows() == 0 {
                return Err(ScoreError::Inference("empty batch".into()));
            }
            Ok(vec![vec![self.device as f32]; batch.rows()])
        }
    }

    /// Which `(device, session)` ran each batch, in order.
    type Log = Arc<Mutex<Vec<(i32, usize)>>>;
    /// Batches inside, wake-ups, how many must be inside at once.
    type Gate = Arc<(Mutex<usize>, Condvar, usize)>;

    fn pool(devices: &[i32], sessions: usize, gate: Option<Gate>) -> (Pool<Fake>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let per_device = devices
            .iter()
            .map(|&device| {
                let runners = (0..sessions)
                    .map(|session| Fake {
                        device,
                        session,
                        log: Arc::clone(&log),
                        gate: gate.clone(),
                    })
                    .collect();
                (device, runners)
            })
            .collect();
        (Pool::new(per_device), log)
    }

    const ONE: Batch<'static> = Batch::PixelValues {
        data: &[0.0; 3],
        rows: 1,
    };

    #[test]
    fn slots_interleave_devices() {
        let (pool, _) = pool(&[0, 1], 2, None);
        assert_eq!(pool.devices(), [0, 1, 0, 1]);
        let (pool, _) = pool_uneven();
        assert_eq!(pool.devices(), [0, 3, 0, 0]);
    }

    fn pool_uneven() -> (Pool<Fake>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let fake = |device, session| Fake {
            device,
            session,
            log: Arc::clone(&log),
            gate: None,
        };
        let pool = Pool::new(vec![
            (0, vec![fake(0, 0), fake(0, 1), fake(0, 2)]),
            (3, vec![fake(3, 0)]),
        ]);
        (pool, log)
    }

    #[test]
    fn sequential_batches_go_round_robin_over_devices() {
        let (pool, log) = pool(&[0, 1], 2, None);
        for _ in 0..8 {
            let scores = pool.run(ONE).unwrap();
            assert_eq!(scores.len(), 1);
        }
        let log = log.lock().unwrap();
        let devices: Vec<i32> = log.iter().map(|&(d, _)| d).collect();
        assert_eq!(devices, [0, 1, 0, 1, 0, 1, 0, 1]);
        for slot in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert_eq!(log.iter().filter(|&&s| s == slot).count(), 2, "{slot:?}");
        }
    }

    #[test]
    fn concurrent_batches_each_get_their_own_runner() {
        let gate = Arc::new((Mutex::new(0), Condvar::new(), 4));
        let (pool, log) = pool(&[0, 1], 2, Some(gate));
        let pool = Arc::new(pool);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || pool.run(ONE))
            })
            .collect();
        for t in threads {
            t.join().unwrap().expect("all four ran at once");
        }
        let mut used = log.lock().unwrap().clone();
        used.sort_unstable();
        assert_eq!(used, [(0, 0), (0, 1), (1, 0), (1, 1)]);
    }

    #[test]
    fn a_busy_runner_is_avoided() {
        let (pool, log) = pool(&[0, 1], 1, None);
        // Device 0's only runner is held busy while two more batches arrive: both go to 1.
        pool.with(|busy| {
            assert_eq!(busy.device, 0);
            pool.run(ONE).unwrap();
            pool.run(ONE).unwrap();
        });
        assert_eq!(*log.lock().unwrap(), [(1, 0), (1, 0)]);
        // Errors come back unchanged and release the slot.
        let empty = Batch::PixelsUint8 { data: &[], rows: 0 };
        assert!(matches!(pool.run(empty), Err(ScoreError::Inference(_))));
        assert!(pool
            .slots
            .iter()
            .all(|s| s.in_flight.load(Ordering::Acquire) == 0));
    }
}
