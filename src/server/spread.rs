//! Keeps the worker threads' shares of caller connections even.
//!
//! Each worker accepts from its own `SO_REUSEPORT` listener, and the kernel picks the listener
//! by a hash of the connection's addresses, not by how busy the workers are: 64 connections
//! over 2 workers were split 39/26 or 37/28 about as often as 32/32 (benches/load/RESULTS.md).
//! Calls on a keep-alive connection stay with the worker that has it, so the worker with half
//! again as many connections answers each of them half again as slowly, and sets the tail
//! latency of the whole proxy. Here a worker that accepts a connection while another worker
//! has fewer open hands it to the one with fewest (one cross-thread hand-over per connection,
//! not per call); the connection stays there until it closes.
//!
//! The open counts are gauges (`cliqgate_worker_connections{worker}`). A worker's count
//! includes connections handed to it that it has not taken yet, so two hand-overs in a row go
//! to different workers. Two workers accepting at the same instant may both read the counts
//! before either adds its own: the shares can then differ by one more than they would.

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
fn destination(open: &[i64], me: usize) -> Option<usize> {
    let (fewest, count) = open.iter().enumerate().min_by_key(|&(_, count)| *count)?;
    (*count < open[me]).then_some(fewest)
}

/// Decrements a worker's open count when the connection it counts ends (its task finishes or
/// is aborted).
pub struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Share {
    /// A connection this worker just accepted: `Some` to serve it here, counted; `None` if it
    /// was handed to a worker with fewer connections.
    pub fn place(&self, stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, Open)> {
        let open: Vec<i64> = self.open.iter().map(Gauge::get).collect();
        let Some(to) = destination(&open, self.index) else {
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
                let stream = TcpStream::from_std(back.stream).ok()?;
                Some((stream, self.count_here()))
            }
        }
    }

    /// The next connection another worker handed to this one, registered with this worker's
    /// event loop and counted. Pending forever while none comes.
    pub async fn handed(&mut self) -> (TcpStream, SocketAddr, Open) {
        loop {
            // This share holds a sender to its own inbox, so the channel never closes.
            let Some(Handover { stream, peer }) = self.inbox.recv().await else {
                std::future::pending::<()>().await;
                continue;
            };
            let open = Open(self.open[self.index].clone());
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer, open),
                Err(e) => tracing::debug!(error = %e, "could not take a handed-over connection"),
            }
        }
    }

    fn count_here(&self) -> Open {
        let gauge = self.open[self.index].clone();
        gauge.inc();
        Open(gauge)
    }
}

impl Drop for Share {
    /// Connections handed to this worker after it stopped taking them close unanswered, as
    /// those still in its listener's backlog do; they are no longer counted.
    fn drop(&mut self) {
        self.inbox.close();
        while self.inbox.try_recv().is_ok() {
            self.open[self.index].dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_a_worker_with_fewer_or_stays() {
        assert_eq!(destination(&[0, 0], 0), None, "a tie stays");
        assert_eq!(destination(&[3, 3, 3], 2), None);
        assert_eq!(destination(&[1, 0], 0), Some(1));
        assert_eq!(destination(&[0, 1], 1), Some(0));
        assert_eq!(destination(&[5, 2, 4], 2), Some(1), "to the fewest");
        assert_eq!(destination(&[5, 2, 4], 1), None, "already the fewest");
        assert_eq!(destination(&[7], 0), None, "a single worker keeps all");
    }

    #[test]
    fn placing_one_at_a_time_keeps_the_shares_within_one() {
        // Whatever worker the kernel picks for each new connection, the shares never differ by
        // more than one (here the connections that close are the busiest worker's).
        let picks = [0, 0, 0, 1, 0, 2, 2, 2, 2, 1, 0, 0, 0, 0];
        let mut open = [0i64; 3];
        for (n, &accepted_by) in picks.iter().enumerate() {
            let to = destination(&open, accepted_by).unwrap_or(accepted_by);
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
