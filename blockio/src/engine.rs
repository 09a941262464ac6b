//! The engine: one worker thread per ring, each owning its ring; callers
//! anywhere submit operations and wait for them, blocking or async. An op is
//! routed by its file descriptor, so the ops of one file go through one ring
//! in submission order; a worker batches everything waiting into one
//! submission (many SQEs per io_uring_enter).

use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use crate::policy::Policy;
use crate::ring::{Backend, Done, Mode, Op, Ring};

type Keepalive = Box<dyn Send>;

struct Request {
    ops: Vec<Op>,
    /// Chained (IOSQE_IO_LINK): each runs only if the previous succeeded.
    linked: bool,
    completion: Arc<Shared>,
    /// Whatever must outlive the I/O (the caller's open files).
    _keep: Option<Keepalive>,
}

#[derive(Default)]
struct State {
    done: Option<Vec<Done>>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

/// The results of one submission, in the order the ops were given.
pub struct Completion {
    shared: Arc<Shared>,
}

impl Completion {
    /// Block until done.
    pub fn wait(self) -> Vec<Done> {
        let mut st = self.shared.state.lock().unwrap();
        loop {
            if let Some(d) = st.done.take() {
                return d;
            }
            st = self.shared.cond.wait(st).unwrap();
        }
    }
}

impl Future for Completion {
    type Output = Vec<Done>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Done>> {
        let mut st = self.shared.state.lock().unwrap();
        match st.done.take() {
            Some(d) => Poll::Ready(d),
            None => {
                st.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

pub struct Engine {
    senders: Vec<Sender<Request>>,
    workers: Vec<JoinHandle<()>>,
    backend: Backend,
}

impl Engine {
    pub fn new(policy: &Policy) -> Engine {
        Self::with(
            policy.rings.max(1),
            policy.queue_depth,
            policy.iopoll,
            false,
            Mode::Auto,
        )
    }

    /// `rings` workers with rings of `depth`; `pin` pins worker i to CPU i.
    pub fn with(rings: usize, depth: u32, iopoll: bool, pin: bool, mode: Mode) -> Engine {
        let mut senders = Vec::new();
        let mut workers = Vec::new();
        let (btx, brx) = mpsc::channel();
        for i in 0..rings.max(1) {
            let (tx, rx) = mpsc::channel::<Request>();
            senders.push(tx);
            let btx = btx.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("cstore-ring-{i}"))
                    .spawn(move || {
                        if pin {
                            pin_to_cpu(i);
                        }
                        let ring = Ring::new(depth, iopoll, mode);
                        let _ = btx.send(ring.backend());
                        worker(ring, rx)
                    })
                    .expect("spawn ring worker"),
            );
        }
        let backend = brx.recv().unwrap_or(Backend::Sync);
        Engine {
            senders,
            workers,
            backend,
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn rings(&self) -> usize {
        self.senders.len()
    }

    fn route(&self, fd: RawFd) -> &Sender<Request> {
        &self.senders[(fd.unsigned_abs() as usize) % self.senders.len()]
    }

    /// Submit ops (all on `fd`'s ring); `linked` chains them in order.
    pub fn submit(
        &self,
        fd: RawFd,
        ops: Vec<Op>,
        linked: bool,
        keep: Option<Keepalive>,
    ) -> Completion {
        let shared = Arc::new(Shared::default());
        let req = Request {
            ops,
            linked,
            completion: shared.clone(),
            _keep: keep,
        };
        if let Err(mpsc::SendError(req)) = self.route(fd).send(req) {
            // Worker gone (only at shutdown): fail every op.
            finish(
                &req.completion,
                req.ops
                    .into_iter()
                    .map(|op| Done {
                        user_data: 0,
                        result: Err(io::Error::other("blockio engine stopped")),
                        op,
                        statx: None,
                    })
                    .collect(),
            );
        }
        Completion { shared }
    }

    /// One op, blocking.
    pub fn run(&self, fd: RawFd, op: Op) -> Done {
        self.submit(fd, vec![op], false, None)
            .wait()
            .pop()
            .expect("one result")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.senders.clear();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn finish(shared: &Shared, done: Vec<Done>) {
    let mut st = shared.state.lock().unwrap();
    st.done = Some(done);
    if let Some(w) = st.waker.take() {
        w.wake();
    }
    shared.cond.notify_all();
}

struct Pending {
    completion: Arc<Shared>,
    results: Vec<Option<Done>>,
    left: usize,
    _keep: Option<Keepalive>,
}

type Queue = std::collections::VecDeque<(u64, Op, bool)>;

/// Requests in flight on one worker, by id; an op's tag is id << 32 | index.
#[derive(Default)]
struct Book {
    pending: Vec<Option<Pending>>,
    free_ids: Vec<usize>,
}

impl Book {
    fn add(&mut self, req: Request, queue: &mut Queue) {
        let id = self.free_ids.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        let n = req.ops.len();
        for (i, op) in req.ops.into_iter().enumerate() {
            queue.push_back((((id as u64) << 32) | i as u64, op, req.linked && i + 1 < n));
        }
        self.pending[id] = Some(Pending {
            completion: req.completion,
            results: (0..n).map(|_| None).collect(),
            left: n,
            _keep: req._keep,
        });
    }

    fn complete(&mut self, d: Done) {
        let (id, i) = (
            (d.user_data >> 32) as usize,
            (d.user_data & 0xffff_ffff) as usize,
        );
        let p = self.pending[id].as_mut().expect("live request");
        p.results[i] = Some(d);
        p.left -= 1;
        if p.left == 0 {
            let p = self.pending[id].take().unwrap();
            self.free_ids.push(id);
            finish(
                &p.completion,
                p.results
                    .into_iter()
                    .map(|r| r.expect("all done"))
                    .collect(),
            );
        }
    }
}

fn worker(mut ring: Ring, rx: Receiver<Request>) {
    let mut book = Book::default();
    let mut queue = Queue::new();
    let mut done = Vec::new();
    loop {
        // Block for work only when nothing is in flight; then take all
        // that waits, so it goes to the kernel in one submission.
        if ring.in_flight() == 0 && queue.is_empty() {
            match rx.recv() {
                Ok(req) => book.add(req, &mut queue),
                Err(_) => return, // every sender gone, nothing in flight
            }
        }
        while queue.len() < ring.capacity() {
            match rx.try_recv() {
                Ok(req) => book.add(req, &mut queue),
                Err(_) => break,
            }
        }
        while let Some((tag, op, link)) = queue.pop_front() {
            if let Err(op) = ring.push(op, tag, link) {
                queue.push_front((tag, op, link));
                break;
            }
        }
        let wait = usize::from(ring.in_flight() > 0);
        if let Err(e) = ring.submit(wait) {
            tracing::error!(error = %e, "io_uring submit failed");
        }
        ring.reap(&mut done);
        for d in done.drain(..) {
            book.complete(d);
        }
    }
}

fn pin_to_cpu(i: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        libc::CPU_SET(i % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}
