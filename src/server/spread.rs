//! Spreads caller connections over the worker threads by how many each has open.
//!
//! Each worker accepts from its own `SO_REUSEPORT` listener, and the kernel picks the listener
//! by a hash of the connection's addresses, not by how busy the workers are: a `wrk -c64` start
//! (65 connections: wrk opens one more) was split 39/26 or 37/28 about as often as 33/32
//! (benches/load/RESULTS.md). Calls on a keep-alive connection stay with the worker that has
//! it, so the worker with half again as many connections answers each of them half again as
//! slowly; with a few long-lived connections, hashing can leave a worker (and a core) with none.
//! Here a worker that accepts a connection while another worker has fewer open hands it to the
//! one with fewest (one cross-thread hand-over per connection, not per call); the connection
//! then stays there until it closes. Open connections are never moved: shares that drift apart
//! as connections close even out again as new ones arrive.
//!
//! The open counts are gauges (`cliqgate_worker_connections{worker}`). A worker's count
//! includes connections handed to it that it has not taken yet, so two hand-overs in a row go
//! to different workers. Workers accepting at the same instant may all read the counts before
//! any adds its own, so simultaneous accepts can leave the shares further apart than one.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A connection on its way from the worker that accepted it to another. A std stream: a tokio
/// one stays registered with the event loop it was accepted on.
struct Handover {
    stream: std::net::TcpStream,
    peer: SocketAddr,
}

/// One worker's part: its index, everyone's counts and inboxes, and its own inbox.
pub struct Share {
    index: usize,
    open: Arc<[Gauge]>,
    inboxes: Arc<[mpsc::UnboundedSender<Handover>]>,
    inbox: mpsc::UnboundedReceiver<Handover>,
}

/// One share per worker, counting in `gauges` (one per worker).
pub fn shares(gauges: Vec<Gauge>) -> Vec<Share> {
    let (inboxes, receivers): (Vec<_>, Vec<_>) =
        gauges.iter().map(|_| mpsc::unbounded_channel()).unzip();
    let open: Arc<[Gauge]> = gauges.into();
    let inboxes: Arc<[_]> = inboxes.into();
    receivers
        .into_iter()
        .enumerate()
        .map(|(index, inbox)| Share {
            index,
            open: open.clone(),
            inboxes: inboxes.clone(),
            inbox,
        })
        .collect()
}

/// Which worker should take a new connection, given each worker's open count: `None` for the
/// one that accepted it (`me`), or one with fewer open. Ties stay where they are, so a
/// balanced proxy hands nothing over.
fn destination(open: impl IntoIterator<Item = i64>, me: usize) -> Option<usize> {
    let (mut fewest, mut least, mut mine) = (me, i64::MAX, i64::MAX);
    for (worker, count) in open.into_iter().enumerate() {
        if worker == me {
            mine = count;
        }
        if count < least {
            (fewest, least) = (worker, count);
        }
    }
    (least < mine).then_some(fewest)
}

/// A connection's place in its worker's open count, given back when the connection ends (its
/// task finishes or is aborted).
pub struct Placed {
    open: Gauge,
    handed_over: bool,
}

impl Placed {
    /// Whether another worker accepted the connection. Its socket then starts out with no
    /// readiness known to this worker's event loop (tokio marks only sockets it accepted itself
    /// as ready), though the caller's first request is usually waiting in it.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl Share {
    /// A connection this worker just accepted: `Some` to serve it here, counted; `None` if it
    /// was handed to a worker with fewer connections.
    pub fn place(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, Placed)> {
        let Some(to) = destination(self.open.iter().map(Gauge::get), self.index) else {
            return Some((stream, self.count_here()));
        };
        // A stream that cannot leave this event loop (the event loop refused to let go of it)
        // is closed; a worker that has stopped taking connections (shutdown) leaves it here.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "could not hand a connection over; closed");
                return None;
            }
        };
        self.open[to].inc();
        match self.inboxes[to].send(Handover { stream, peer }) {
            Ok(()) => None,
            Err(mpsc::error::SendError(back)) => {
                self.open[to].dec();
                match TcpStream::from_std(back.stream) {
                    Ok(stream) => Some((stream, self.count_here())),
                    Err(e) => {
                        tracing::debug!(error = %e, "could not take a connection back; closed");
                        None
                    }
                }
            }
        }
    }

    /// The next connection another worker handed to this one, registered with this worker's
    /// event loop and counted. Pending forever while none comes.
    pub async fn handed(&mut self) -> (TcpStream, SocketAddr, Placed) {
        loop {
            // This share holds a sender to its own inbox, so the channel closes only in
            // `close`, after which this is not called.
            let Some(handover) = self.inbox.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            if let Some(taken) = self.take(handover) {
                return taken;
            }
        }
    }

    /// Stops taking connections, and returns those already handed to this worker: the worker
    /// serves them like the others it has when it stops (a request already sent is answered,
    /// then the connection closes). Waits for hand-overs in flight, which take no time.
    pub async fn close(&mut self) -> Vec<(TcpStream, SocketAddr, Placed)> {
        self.inbox.close();
        let mut left = Vec::new();
        while let Some(handover) = self.inbox.recv().await {
            left.extend(self.take(handover));
        }
        left
    }

    fn take(&self, Handover { stream, peer }: Handover) -> Option<(TcpStream, SocketAddr, Placed)> {
        // Counted by the sender already.
        let placed = Placed {
            open: self.open[self.index].clone(),
            handed_over: true,
        };
        match TcpStream::from_std(stream) {
            Ok(stream) => Some((stream, peer, placed)),
            Err(e) => {
                tracing::debug!(error = %e, "could not take a handed-over connection; closed");
                None
            }
        }
    }

    fn count_here(&self) -> Placed {
        let open = self.open[self.index].clone();
        open.inc();
        Placed {
            open,
            handed_over: false,
        }
    }
}

impl Drop for Share {
    /// A share dropped without [`Share::close`] (its worker's accept loop was cancelled): the
    /// connections in its inbox close unanswered and are no longer counted.
    fn drop(&mut self) {
        self.inbox.close();
        while let Ok(handover) = self.inbox.try_recv() {
            drop(handover);
            self.open[self.index].dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_a_worker_with_fewer_or_stays() {
        assert_eq!(destination([0, 0], 0), None, "a tie stays");
        assert_eq!(destination([3, 3, 3], 2), None);
        assert_eq!(destination([1, 0], 0), Some(1));
        assert_eq!(destination([0, 1], 1), Some(0));
        assert_eq!(destination([5, 2, 4], 2), Some(1), "to the fewest");
        assert_eq!(destination([5, 2, 4], 1), None, "already the fewest");
        assert_eq!(destination([7], 0), None, "a single worker keeps all");
    }

    /// A loopback connection's accepting end.
    async fn accepted() -> (TcpStream, SocketAddr, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let caller = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        (stream, peer, caller)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hand_overs_are_counted_where_they_go_and_a_stopped_worker_gives_back_its_own() {
        let gauges = vec![Gauge::default(), Gauge::default()];
        let mut shares = shares(gauges.clone());
        let counts = || gauges.iter().map(Gauge::get).collect::<Vec<_>>();

        // Worker 0 keeps its first connection, and hands the next to worker 1.
        let (stream, peer, _caller) = accepted().await;
        let (_, first) = shares[0].place(stream, peer).expect("kept: a tie");
        assert!(!first.handed_over());
        let (stream, peer, _caller) = accepted().await;
        assert!(shares[0].place(stream, peer).is_none(), "handed over");
        assert_eq!(counts(), [1, 1], "counted by worker 1 before it takes it");

        // Worker 1 stops before taking it: it gets it back to serve as it stops.
        let left = shares[1].close().await;
        assert_eq!(left.len(), 1);
        assert!(left[0].2.handed_over());
        drop(left);
        assert_eq!(counts(), [1, 0], "no longer counted once served");

        // A stopped worker takes nothing more: worker 0 serves what it would have handed over.
        let (stream, peer, _caller) = accepted().await;
        let (_, kept) = shares[0]
            .place(stream, peer)
            .expect("kept: worker 1 has stopped");
        assert!(!kept.handed_over());
        assert_eq!(counts(), [2, 0]);
        drop((first, kept));
        assert_eq!(counts(), [0, 0]);
    }

    #[test]
    fn placing_one_at_a_time_keeps_the_shares_within_one() {
        // Whatever worker the kernel picks for each new connection, the shares never differ by
        // more than one (here the connections that close are the busiest worker's).
        let picks = [0, 0, 0, 1, 0, 2, 2, 2, 2, 1, 0, 0, 0, 0];
        let mut open = [0i64; 3];
        for (n, &accepted_by) in picks.iter().enumerate() {
            let to = destination(open, accepted_by).unwrap_or(accepted_by);
            open[to] += 1;
            if n % 5 == 4 {
                // A connection on the busiest worker closes.
                let busiest = (0..3).max_by_key(|&w| open[w]).unwrap();
                open[busiest] -= 1;
            }
            let spread = open.iter().max().unwrap() - open.iter().min().unwrap();
            assert!(spread <= 1, "after {n}: {open:?}");
        }
    }
}
